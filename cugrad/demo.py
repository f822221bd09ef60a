"""``python -m cugrad demo``: train an MLP on scikit-learn's handwritten digits.

1,797 8×8 images of the digits 0–9 ship inside scikit-learn (no download). The network
is 64 → 128 (ReLU, fused into the Linear) → 10 with softmax cross-entropy and Adam,
trained on 80% of the images and tested on the rest. It runs on the GPU when one works
(``--device auto``), else on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import _backend, nn, optim
from ._arrays import asarray, to_numpy


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
    """A one-line progress bar on stderr (a terminal redraws it in place)."""

    def __init__(self, total: int, label: str, width: int = 30, stream=sys.stderr):
        self.total, self.label, self.width, self.stream = total, label, width, stream

    def update(self, done: int, info: str = "") -> None:
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {info}")
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


def train(epochs=30, batch_size=64, lr=3e-3, hidden=128, seed=0, device="auto",
          progress=True, log=print):
    """Train the demo network; returns a dict with the losses, accuracy and timings."""
    device = choose_device(device)
    xtr, ytr, xte, yte = load_digits_split(seed)
    xtr_d, ytr_d = asarray(xtr, device=device), asarray(ytr, device=device, dtype=np.int64)
    xte_d, yte_d = asarray(xte, device=device), asarray(yte, device=device, dtype=np.int64)
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(64, hidden, rng=rng, activation="relu"),
                          nn.Linear(hidden, 10, rng=rng)).to(device)
    criterion = nn.CrossEntropyLoss()
    opt = optim.Adam(model.parameters(), lr=lr)
    backend = "CUDA (cugrad kernels)" if device == "cuda" else "NumPy (CPU)"
    log(f"cugrad demo: digits, {len(xtr)} train / {len(xte)} test images, "
        f"MLP 64-{hidden}-10, Adam lr={lr}, backend {backend}")
    n_batches = (len(xtr) + batch_size - 1) // batch_size
    losses, epoch_times = [], []
    for epoch in range(1, epochs + 1):
        bar = ProgressBar(n_batches, f"epoch {epoch:3d}/{epochs}") if progress else None
        perm = asarray(rng.permutation(len(xtr)), device=device, dtype=np.int64)
        start = time.perf_counter()
        total = 0.0
        for b in range(n_batches):
            idx = perm[b * batch_size:(b + 1) * batch_size]
            opt.zero_grad()
            loss = criterion(model(xtr_d[idx]), ytr_d[idx])
            model.backward(criterion.backward())
            opt.step()
            total += float(loss)
            if bar:
                bar.update(b + 1, f"loss {total / (b + 1):.4f}")
        epoch_times.append(time.perf_counter() - start)
        losses.append(total / n_batches)
    acc = accuracy(model, xte_d, yte_d)
    log(f"test accuracy {acc * 100:.2f}%  |  backend {backend}  |  "
        f"{np.median(epoch_times) * 1e3:.1f} ms per epoch (median of {epochs})")
    return {"losses": losses, "test_accuracy": acc, "device": device,
            "epoch_seconds": epoch_times, "model": model}


def save_plot(losses, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'cugrad[examples]'") from None
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
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--plot", metavar="FILE.png", help="save the loss curve to this file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    result = train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                   hidden=args.hidden, seed=args.seed, device=args.device,
                   progress=not args.no_progress)
    if args.plot:
        save_plot(result["losses"], args.plot)
        print(f"loss curve saved to {args.plot}")
    return 0
