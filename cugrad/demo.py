"""``python -m cugrad demo``: train an MLP on scikit-learn's handwritten digits.

1,797 8×8 images of the digits 0–9 ship inside scikit-learn (no download). The network
is 64 → 128 (ReLU, fused into the Linear) → 10 with softmax cross-entropy and Adam,
trained on 80% of the images and tested on the rest. It runs on the GPU when one works
(``--device auto``), else on the CPU.

``--graph`` (GPU only) captures the training step as a CUDA graph once and replays it for
every full batch (``cugrad.capture_train_step``); the last, smaller batch of each epoch
runs eagerly. With ``--graph`` Adam is built with ``capturable=True`` (its step count lives
on the device, so the replays advance it); ``--optimizer sgd`` trains with SGD (momentum 0.9).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from . import _backend, nn, optim
from . import functional as F
from ._arrays import asarray, to_numpy
from ._cli import finite_positive, int_at_least, new_file
from .graph import capture_train_step

OPTIMIZERS = ("adam", "sgd")
DEFAULT_LR = {"adam": 3e-3, "sgd": 0.05}
SGD_MOMENTUM = 0.9


def load_digits_split(seed: int, test_fraction: float = 0.2):
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the demo needs scikit-learn for its data set: "
                         "pip install 'cugrad[examples]'") from None
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)          # pixels 0..16 -> [0, 1]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(axis=0), x[train].std(axis=0) + 1e-3
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


class ProgressBar:
    """A one-line progress bar on stderr. A terminal redraws it in place, at most every
    ``min_interval`` seconds (``due``); anything else (a log file, a pipe, CI) gets only the
    finished line of each epoch, so a log holds one line per epoch instead of a
    carriage-return run per batch."""

    def __init__(self, total: int, label: str, width: int = 30, stream=None,
                 min_interval: float = 0.1, clock=time.monotonic):
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.redraw = bool(isatty and isatty())
        self.min_interval, self.clock = min_interval, clock
        self._last = None

    def due(self, done: int) -> bool:
        """Whether ``update(done, ...)`` would draw now: the finished line always, a terminal's
        redraw when ``min_interval`` has passed since the last. The demo asks first, so that
        it reads the running loss (a wait for the GPU) only when it will be shown."""
        if done == self.total:
            return True
        return self.redraw and (self._last is None or self.clock() - self._last >= self.min_interval)

    def update(self, done: int, info: str = "") -> None:
        if not self.redraw and done != self.total:
            return
        self._last = self.clock()
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        start = "\r" if self.redraw else ""
        self.stream.write(f"{start}{self.label} [{bar}] {done}/{self.total} {info}")
        if done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def choose_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if _backend.cuda_available() else "cpu"
    return _backend.normalize_device(requested)


def accuracy(model, x, y) -> float:
    logits = to_numpy(model(x))
    return float((logits.argmax(axis=1) == to_numpy(y)).mean())


def make_optimizer(name: str, params, lr: float, graph: bool = False):
    """(optimiser, its description for the log) for ``name`` "adam" or "sgd"; for a graph,
    Adam counts its steps on the device (``capturable=True``)."""
    if name == "adam":
        return (optim.Adam(params, lr=lr, capturable=graph),
                f"Adam lr={lr}" + (" capturable" if graph else ""))
    return (optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM),
            f"SGD lr={lr} momentum={SGD_MOMENTUM}")


def train(epochs=30, batch_size=64, lr=None, hidden=128, seed=0, device="auto",
          progress=True, log=print, optimizer=None, graph=False):
    """Train the demo network; returns a dict with the losses, accuracy and timings.

    ``optimizer`` is "adam" (default) or "sgd"; ``lr`` defaults per optimiser
    (``DEFAULT_LR``). ``graph=True`` needs the CUDA backend: full batches replay a captured
    CUDA graph, a smaller last batch runs eagerly."""
    device = choose_device(device)
    optimizer = optimizer or "adam"
    if optimizer not in OPTIMIZERS:
        raise SystemExit(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    if device == "cuda" and not _backend.cuda_available():
        raise SystemExit(f"--device cuda needs the CUDA backend, which does not work here: "
                         f"{_backend.cuda_unavailable_reason()}. Use --device cpu (or auto, "
                         "which falls back to the CPU) to train on the CPU.")
    if graph and device != "cuda":
        reason = _backend.cuda_unavailable_reason() or "--device cpu was asked for"
        raise SystemExit(f"--graph needs the CUDA backend (CUDA graphs replay GPU work), "
                         f"and this run is on the CPU: {reason}. Drop --graph to train "
                         "eagerly on the CPU.")
    lr = DEFAULT_LR[optimizer] if lr is None else lr
    xtr, ytr, xte, yte = load_digits_split(seed)
    xtr_d, ytr_d = asarray(xtr, device=device), asarray(ytr, device=device, dtype=np.int64)
    xte_d, yte_d = asarray(xte, device=device), asarray(yte, device=device, dtype=np.int64)
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(64, hidden, rng=rng, activation="relu"),
                          nn.Linear(hidden, 10, rng=rng)).to(device)
    criterion = nn.CrossEntropyLoss()
    opt, opt_text = make_optimizer(optimizer, model.parameters(), lr, graph)
    backend = "CUDA (cugrad kernels)" if device == "cuda" else "NumPy (CPU)"
    log(f"cugrad demo: digits, {len(xtr)} train / {len(xte)} test images, "
        f"MLP 64-{hidden}-10, {opt_text}, backend {backend}")

    def eager_step(x, y):
        opt.zero_grad()
        loss = criterion(model(x), y)
        model.backward(criterion.backward(), input_grad=False)
        opt.step()
        return loss

    graph_step, graph_batch = None, 0
    if graph:
        graph_batch = min(batch_size, len(xtr))
        start = time.perf_counter()
        graph_step = capture_train_step(model, criterion, opt, xtr_d[:graph_batch],
                                        ytr_d[:graph_batch])
        remainder = len(xtr) % graph_batch
        log(f"training step captured as a CUDA graph in "
            f"{(time.perf_counter() - start) * 1e3:.0f} ms; batches of {graph_batch} replay "
            "it" + (f", the last batch of each epoch ({remainder} images) runs eagerly"
                    if remainder else ""))
    n_batches = (len(xtr) + batch_size - 1) // batch_size
    losses, epoch_times = [], []
    for epoch in range(1, epochs + 1):
        bar = ProgressBar(n_batches, f"epoch {epoch:3d}/{epochs}") if progress else None
        perm = asarray(rng.permutation(len(xtr)), device=device, dtype=np.int64)
        start = time.perf_counter()
        # The epoch's summed loss stays on the loss's device (F.accumulate, in stream order
        # after each step; a graph's loss buffer is overwritten by the next replay), so the
        # GPU is not waited for after every batch: only when the bar shows the running loss
        # and once at the end of the epoch, which the epoch's time therefore includes.
        total = None
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            step = graph_step if len(idx) == graph_batch else eager_step
            loss = step(xtr_d[idx], ytr_d[idx])
            if total is None:
                total = asarray(np.zeros((), loss.dtype), device=device)
            F.accumulate(total, loss)
            if bar and bar.due(b + 1):
                bar.update(b + 1, f"loss {float(total) / (b + 1):.4f}")
        mean_loss = float(total) / n_batches
        epoch_times.append(time.perf_counter() - start)
        losses.append(mean_loss)
        if not math.isfinite(mean_loss):
            raise SystemExit(f"training diverged: the mean loss of epoch {epoch} is "
                             f"{mean_loss} ({opt_text}, batch size {batch_size}); lower the "
                             "learning rate (--lr): small batches need a smaller one")
    acc = accuracy(model, xte_d, yte_d)
    mode = ", CUDA graph" if graph else ""
    log(f"test accuracy {acc * 100:.2f}%  |  backend {backend}{mode}  |  "
        f"{np.median(epoch_times) * 1e3:.1f} ms per epoch (median of {epochs})")
    return {"losses": losses, "test_accuracy": acc, "device": device,
            "epoch_seconds": epoch_times, "model": model, "optimizer": optimizer,
            "graph": graph}


PLOT_NEEDS = "--plot needs matplotlib: pip install 'cugrad[examples]'"


def _pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display); ImportError if
    matplotlib is missing."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_plot(losses, path: str) -> None:
    try:
        plt = _pyplot()
    except ImportError:
        raise SystemExit(PLOT_NEEDS) from None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss (cross-entropy)")
    ax.set_yscale("log")
    ax.set_title("cugrad demo: MLP on handwritten digits")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cugrad demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int_at_least(1), default=30,
                   help="passes over the training set (default: %(default)s)")
    p.add_argument("--batch-size", type=int_at_least(1), default=64,
                   help="examples per step (default: %(default)s)")
    p.add_argument("--lr", type=finite_positive(),
                   help="learning rate (default: 3e-3 for Adam, 0.05 for SGD)")
    p.add_argument("--optimizer", choices=OPTIMIZERS,
                   help="adam (default) or sgd (momentum 0.9)")
    p.add_argument("--graph", action="store_true",
                   help="replay the training step as a CUDA graph (GPU only)")
    p.add_argument("--hidden", type=int_at_least(1), default=128,
                   help="width of the hidden layer (default: %(default)s)")
    p.add_argument("--seed", type=int_at_least(0), default=0,
                   help="seed of the weights, the split and the batch order "
                        "(default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto (default): the GPU if one works, else the CPU")
    p.add_argument("--plot", metavar="FILE.png", type=new_file(".png"),
                   help="save the loss curve to this file (a .png, overwritten if it exists)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.plot:      # the file's folder and write access are checked by new_file above
        try:
            _pyplot()
        except ImportError as e:
            p.error(f"argument --plot: needs matplotlib, which cannot be imported here "
                    f"({e}): pip install 'cugrad[examples]', or drop --plot")
    result = train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   hidden=args.hidden, seed=args.seed, device=args.device,
                   progress=not args.no_progress, optimizer=args.optimizer,
                   graph=args.graph)
    if args.plot:
        save_plot(result["losses"], args.plot)
        print(f"loss curve saved to {args.plot}")
    return 0
