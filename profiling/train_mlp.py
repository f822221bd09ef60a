"""A realistic cugrad training loop to profile with Nsight Systems / Nsight Compute.

Two MLP configurations (Linear → ReLU layers, CrossEntropyLoss, SGD with momentum):

* ``large``: batch 4096, 1024 → 4096 → 4096 → 4096 → 1000. Each GEMM is 4096 × 4096 ×
  ≥1024, thousands of thread blocks: the GPU is full and the kernels' own speed shows.
* ``small``: batch 64, 64 → 128 → 128 → 10. Every kernel is a handful of blocks lasting a
  few microseconds: the step is bound by Python and kernel-launch latency, which is what
  the gaps between kernels on an Nsight Systems timeline show.

Warm-up steps (kernel compilation, CuPy's memory pool growth) run first; the measured
steps run between ``cudaProfilerStart``/``cudaProfilerStop`` so that
``nsys profile --capture-range=cudaProfilerApi`` and ``ncu --profile-from-start off``
record only them. Each step is also an NVTX range ``step`` in the domain ``train`` (when
the ``nvtx`` package is installed), around the ``cugrad`` domain's op and layer ranges.

    python profiling/train_mlp.py --device cpu --config small --steps 3   # smoke check
    nsys profile -t cuda,nvtx --capture-range=cudaProfilerApi -o mlp_large \\
        python profiling/train_mlp.py --device cuda --config large
    python profiling/train_mlp.py --device cuda --config small --table    # no Nsight

See profiling/README.md for reading the results.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

import cugrad  # noqa: E402
from cugrad._cli import int_at_least  # noqa: E402
from cugrad.nn import CrossEntropyLoss, Linear, ReLU, Sequential  # noqa: E402
from cugrad.optim import SGD  # noqa: E402
from cugrad.profiler import profile  # noqa: E402

CONFIGS = {
    #          batch, layer widths (input first, classes last)
    "large": (4096, [1024, 4096, 4096, 4096, 1000]),
    "small": (64, [64, 128, 128, 10]),
}


def build(widths: list[int], device: str, fused: bool, seed: int = 0) -> Sequential:
    rng = np.random.default_rng(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        hidden = i < len(widths) - 2
        if hidden and fused:
            layers.append(Linear(n_in, n_out, rng=rng, device=device, activation="relu"))
        else:
            layers.append(Linear(n_in, n_out, rng=rng, device=device))
            if hidden:
                layers.append(ReLU())
    return Sequential(*layers)


class _Cuda:
    """The few CUDA calls the loop needs, through CuPy (imported only for --device cuda)."""

    def __init__(self, device: str):
        self.cupy = None
        if device == "cuda":
            import cupy
            self.cupy = cupy

    def sync(self):
        if self.cupy is not None:
            self.cupy.cuda.Device().synchronize()

    @contextlib.contextmanager
    def capture(self):
        """cudaProfilerStart/Stop: the range nsys --capture-range=cudaProfilerApi and
        ncu --profile-from-start off record."""
        if self.cupy is None:
            yield
            return
        self.sync()
        self.cupy.cuda.profiler.start()
        try:
            yield
        finally:
            self.sync()
            self.cupy.cuda.profiler.stop()


def step_flops(batch: int, widths: list[int]) -> int:
    """The floating-point operations of the GEMMs one training step computes, 2·M·N·K per
    product: every layer's forward (batch × in × out) and weight gradient dW, and the input
    gradient dX of every layer but the first. The loop's ``backward(..., input_grad=False)``
    computes no dX for the first layer (nobody needs the gradient of the input batch), so
    the usual 6·batch·Σ in·out would count 2·batch·widths[0]·widths[1] operations that never
    ran (+3.5 % for the large configuration, +11.8 % for the small one). Bias, activation,
    loss and optimiser work are not counted."""
    products = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return 6 * batch * products - 2 * batch * widths[0] * widths[1]


def step_range():
    try:
        import nvtx
    except ImportError:
        return contextlib.nullcontext()
    return nvtx.annotate("step", domain="train", color="orange")


def _widths(text: str) -> list:
    """--widths: at least two positive integers, comma-separated (input, ..., classes)."""
    try:
        widths = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(widths) < 2 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected two or more positive widths (input, ..., "
                                         f"classes), got {text!r}")
    return widths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--config", choices=sorted(CONFIGS), default="large")
    ap.add_argument("--batch", type=int_at_least(1), help="override the configuration's batch size")
    ap.add_argument("--widths", type=_widths,
                    help="override the layer widths, e.g. 784,512,10")
    ap.add_argument("--steps", type=int_at_least(1), default=20, help="measured steps")
    ap.add_argument("--warmup", type=int_at_least(0), default=3, help="unmeasured steps first")
    ap.add_argument("--fused", action="store_true",
                    help="fuse ReLU into Linear (Linear(..., activation='relu'))")
    ap.add_argument("--table", action="store_true",
                    help="also print a cugrad.profile() table of the measured steps")
    args = ap.parse_args(argv)

    if args.device == "cuda" and not cugrad.cuda_available():
        print(f"train_mlp: no CUDA backend here: {cugrad.cuda_unavailable_reason()}",
              file=sys.stderr)
        return 2
    batch, widths = CONFIGS[args.config]
    batch = args.batch or batch
    widths = args.widths or widths
    if args.device == "cpu" and args.config == "large" and not (args.batch or args.widths):
        batch = 256                      # the large widths at a batch the CPU finishes

    cuda = _Cuda(args.device)
    model = build(widths, args.device, args.fused)
    loss_fn = CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(1)
    x = cugrad.asarray(rng.standard_normal((batch, widths[0]), dtype=np.float32),
                       device=args.device)
    y = cugrad.asarray(rng.integers(0, widths[-1], size=batch), device=args.device,
                       dtype=np.int64)

    def train_step():
        with step_range():
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()
        return loss

    for _ in range(args.warmup):
        train_step()
    cuda.sync()

    prof = profile() if args.table else contextlib.nullcontext()
    with cuda.capture(), prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = train_step()
        cuda.sync()
        elapsed = time.perf_counter() - t0

    flops = step_flops(batch, widths)       # the GEMMs computed: no dX for the first layer
    per_step = elapsed / max(args.steps, 1)
    label = "custom" if args.widths else args.config      # --widths replaces the config's
    print(f"{label} MLP {widths}, batch {batch}, {args.device}"
          f"{' (fused ReLU)' if args.fused else ''}: {args.steps} steps, "
          f"{per_step * 1e3:.3f} ms/step, {flops / per_step / 1e12:.2f} TFLOP/s (GEMMs), "
          f"loss {float(cugrad.to_numpy(loss)):.4f}")
    if args.table:
        print(prof)
    return 0


if __name__ == "__main__":
    sys.exit(main())
