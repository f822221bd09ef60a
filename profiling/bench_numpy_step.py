"""Benchmark (not a test): one training step through cugrad's NumPy backend against the
same step written directly in NumPy, in one process, reported as a ratio of medians.

The goal (issue 3) is cugrad within 10% of plain NumPy: the backend makes no copies the
math does not need, and validation, dispatch and NVTX ranges cost little.

    python profiling/bench_numpy_step.py [--batch 128] [--sizes 784,256,256,10] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

import cugrad  # noqa: E402
from cugrad._cli import int_at_least, new_file  # noqa: E402
from cugrad import nn, optim  # noqa: E402


def cugrad_step(model, crit, opt, x, y):
    opt.zero_grad()
    crit(model(x), y)
    model.backward(crit.backward(), input_grad=False)
    opt.step()


def numpy_model(model):
    return [(layer.weight.data.copy(), layer.bias.data.copy()) for layer in model.layers]


def numpy_step(params, x, y, lr):
    """The same network (Linear+ReLU ..., Linear), mean cross-entropy and SGD, by hand,
    computing what cugrad's step computes (no gradient for the input batch)."""
    acts = [x]
    h = x
    for i, (w, b) in enumerate(params):
        h = h @ w.T
        h += b
        if i < len(params) - 1:
            np.maximum(h, 0, out=h)
        acts.append(h)
    z = h - h.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    z[np.arange(len(y)), y] -= 1.0
    z /= len(y)
    g = z
    for i in range(len(params) - 1, -1, -1):
        w, b = params[i]
        if i < len(params) - 1:
            g *= acts[i + 1] > 0
        gw = g.T @ acts[i]
        gb = g.sum(axis=0)
        if i > 0:        # the first layer's input needs no gradient (input_grad=False)
            g = g @ w
        w -= lr * gw
        b -= lr * gb


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _sizes(text):
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if len(sizes) < 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected three or more positive widths (input, "
                                         f"hidden..., classes), got {text!r}")
    return sizes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int_at_least(1), default=128)
    p.add_argument("--sizes", type=_sizes, default="784,256,256,10",
                   help="layer widths, input first, at least three (one hidden layer)")
    p.add_argument("--repeats", type=int_at_least(5), default=200,
                   help="timed steps per side, in 5 interleaved rounds")
    p.add_argument("--json", type=new_file(".json"), metavar="FILE.json",
                   help="also write the result here (checked before the timing starts)")
    args = p.parse_args(argv)
    sizes = args.sizes
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], size=args.batch)
    layers = [nn.Linear(a, b, rng=i, activation="relu" if i < len(sizes) - 2 else None)
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))]
    model = nn.Sequential(*layers)
    params = numpy_model(model)
    crit, opt = nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=1e-3)

    for _ in range(20):                      # warm-up, both
        cugrad_step(model, crit, opt, x, y)
        numpy_step(params, x, y, 1e-3)
    # interleave the two so that machine noise hits both alike
    ours, peer = [], []
    per_round = max(1, args.repeats // 5)
    for _ in range(5):
        ours.append(median_ms(lambda: cugrad_step(model, crit, opt, x, y), per_round))
        peer.append(median_ms(lambda: numpy_step(params, x, y, 1e-3), per_round))
    ours_ms, peer_ms = statistics.median(ours), statistics.median(peer)
    result = {"name": "training step, NumPy backend", "shape": f"batch {args.batch}, "
              f"MLP {'-'.join(map(str, sizes))}", "ours_ms": ours_ms, "peer": "plain NumPy",
              "peer_ms": peer_ms, "ratio_ours_over_peer": ours_ms / peer_ms,
              "spread_ours_ms": [min(ours), max(ours)], "spread_peer_ms": [min(peer), max(peer)],
              "numpy": np.__version__, "cugrad": cugrad.__version__,
              "python": platform.python_version(), "machine": platform.machine()}
    print(f"{result['shape']}: cugrad {ours_ms:.3f} ms, plain NumPy {peer_ms:.3f} ms, "
          f"ratio {ours_ms / peer_ms:.3f} (medians of 5 medians of {per_round})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
