"""Shared fixtures: one suite parametrised over the backends that work here.

``backend`` yields a ``BackendCase`` for "numpy" and, marked ``gpu``, for "cuda"; the CUDA
case is skipped, with the reason, where no CUDA device works. ``rel_err`` is MATH.md §7's
‖out − ref‖ / ‖ref‖ (NaN never passes).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cugrad._backend import env_flag

# CUGRAD_FAKE_CUPY=1: `import cupy` finds the CPU stand-in of tests/fake_cupy (NumPy memory,
# kernels on the CPU harness), so the GPU-marked tests run their host code here.
FAKE_CUPY = env_flag("CUGRAD_FAKE_CUPY")   # the project's on/off reading (no CuPy import)
if FAKE_CUPY:
    _FAKE_DIR = str(Path(__file__).resolve().parent / "fake_cupy")
    sys.path.insert(0, _FAKE_DIR)
    # and in the Python subprocesses tests start (the installed-package checks)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_FAKE_DIR, os.environ.get("PYTHONPATH", "")) if p)

import numpy as np
import pytest

import cugrad
from cugrad._arrays import asarray, to_numpy



# GPU tests that the stand-in cannot make meaningful, skipped (with the reason) under it.
FAKE_CUPY_SKIPS = {
    "test_ops_on_a_non_blocking_stream_are_ordered_on_that_stream":
        "needs a stream that runs asynchronously to the host; the stand-in runs all work at "
        "once, in order",
    "test_kernels_compile_and_run_from_installed_package":
        "its subprocess's PYTHONPATH is the installed copy alone, where the stand-in is not "
        "importable",
    "test_loss_is_a_static_buffer_and_outlives_the_graph":
        "the stand-in never reuses memory and its recorded work keeps its buffers alive, so "
        "a buffer the graph lost could not show",
    "test_replay_follows_the_current_stream":
        "all streams run in order on one thread: a replay on the wrong stream could not show",
    "test_long_k_float32_products_stay_inside_the_bound":
        "K = 2^22 products take minutes on the CPU harness; test_harness_edges.py::"
        "test_gemm_long_k_is_split_for_accuracy_whatever_the_output runs the same plan with "
        "the cap shrunk",
    "test_100_calls_are_bitwise_identical":
        "100 launches a case take minutes on the CPU harness; there the reductions' "
        "independence of thread order is test_kernels_cpu.py::"
        "test_results_do_not_depend_on_thread_order",
}
# Products past this many multiply-adds take seconds each on the CPU harness, where
# test_kernels_cpu.py checks the same kernels at tile-boundary shapes.
FAKE_CUPY_MAX_MNK = 2_000_000


def pytest_collection_modifyitems(config, items):
    if not FAKE_CUPY:
        return
    for item in items:
        if item.get_closest_marker("gpu") is None:
            continue
        name = getattr(item, "originalname", item.name)
        reason = FAKE_CUPY_SKIPS.get(name)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if reason is None and {"m", "n", "k"} <= set(params):
            mnk = params["m"] * params["n"] * params["k"]
            if mnk > FAKE_CUPY_MAX_MNK:
                reason = (f"{mnk:,} multiply-adds: too slow for the CPU harness under the "
                          "stand-in; test_kernels_cpu.py covers the kernel at smaller shapes")
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=f"stand-in for CuPy: {reason}"))


def pytest_report_header(config):
    if FAKE_CUPY:
        return ("CUDA backend: the CPU stand-in for CuPy (tests/fake_cupy), not a GPU; "
                "kernels run on the CPU harness")
    return None


# Shapes that are multiples of no tile size.
ODD = (1, 7, 33, 127)


@dataclass
class BackendCase:
    name: str       # "numpy" or "cuda"
    device: str     # "cpu" or "cuda"

    def put(self, host, dtype=None):
        """A host array moved to this backend (dtype preserved unless given)."""
        host = np.asarray(host)
        return asarray(host, device=self.device, dtype=dtype or host.dtype)

    @staticmethod
    def get(x):
        return None if x is None else to_numpy(x)


def require_gpu() -> None:
    """Skip the test, with the reason, where no CUDA device works."""
    if not cugrad.cuda_available():
        pytest.skip(f"CUDA backend not tested: {cugrad.cuda_unavailable_reason()}")


@pytest.fixture
def gpu(monkeypatch):
    """CuPy, with fresh outputs poisoned (NaN) so an element a kernel misses shows; the
    test is skipped where no CUDA device works."""
    require_gpu()
    monkeypatch.setenv("CUGRAD_POISON_OUTPUTS", "1")
    import cupy
    return cupy


@pytest.fixture(params=["numpy", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request) -> BackendCase:
    if request.param == "cuda":
        require_gpu()
        # Kernels write every output element: poison fresh outputs so an unwritten one shows.
        os.environ.setdefault("CUGRAD_POISON_OUTPUTS", "1")
        return BackendCase("cuda", "cuda")
    return BackendCase("numpy", "cpu")


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


def rel_err(out, ref) -> float:
    out = np.asarray(to_numpy(out), dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, f"shape {out.shape} != reference shape {ref.shape}"
    assert not np.isnan(out).any() or np.isnan(ref).any(), "NaN in the output"
    denom = np.linalg.norm(ref)
    diff = np.linalg.norm(out - ref)
    return float(diff / denom) if denom > 0 else float(diff)


# float32: element-wise well under 1e-5, products and sums ~1e-4 (MATH.md §7).
def tol(dtype, kind="product") -> float:
    if np.dtype(dtype) == np.float64:
        return 1e-12
    return 1e-4 if kind == "product" else 1e-5


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def randn(rng, *shape, dtype=np.float32, scale=1.0):
    """Random non-zero data (never zeros: an unwritten output must not pass)."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def elementwise_rel_err(out, ref) -> float:
    """The largest |out - ref| / |ref| over the elements (ref nonzero everywhere): unlike
    rel_err's norms, a tiny entry beside large ones cannot hide its error."""
    out = np.asarray(to_numpy(out), dtype=np.float64)
    return float(np.max(np.abs(out - ref) / np.abs(ref)))


def row_rel_err(out, ref) -> float:
    """The largest rel_err of one row: rows of very different sizes (a tie's gradient of
    0.5 beside a confident row's 1e-6) each to their own bound."""
    out = np.asarray(to_numpy(out), dtype=np.float64)
    return max(rel_err(o, r) for o, r in zip(out, np.asarray(ref, dtype=np.float64)))


def confident_rows(dtype, c: int):
    """Logit rows whose softmax is nearly one-hot, with their exact float64 results.

    Each row holds b = 0 everywhere and a > 0 at its max positions (one, or a tie of two,
    at the first, a middle or the last column). With k maxima, s = Σ e^{z - max} =
    k + (c - k) e^{-a}; for k = 1, s - 1 = (c - 1) e^{-a} lies below half an ulp of 1 (float32:
    a = 20, 26; float64: a = 40, 60), so anything formed from s itself (ln s, softmax - 1)
    rounds to 0 while the true values are about s - 1. Returns (x, t, ref) with t the class
    index of each row's first max and ref the float64 "loss_rows", "grad" (of the summed
    loss), "softmax" and "log_softmax", from the closed forms (not from any ln s)."""
    gaps = (20.0, 26.0) if np.dtype(dtype) == np.float32 else (40.0, 60.0)
    layouts = [(0,), (c // 2,), (c - 1,)] + ([(0, c - 1)] if c > 1 else [])
    rows = [(a, pos) for a in gaps for pos in layouts]
    x = np.zeros((len(rows), c))
    t = np.empty(len(rows), dtype=np.int64)
    ref = {k: np.empty((len(rows), c)) for k in ("grad", "softmax", "log_softmax")}
    ref["loss_rows"] = np.empty(len(rows))
    for i, (a, pos) in enumerate(rows):
        k, e = len(pos), np.exp(-a)
        sm1 = (k - 1) + (c - k) * e            # s - 1, exact to rounding
        s = 1.0 + sm1
        x[i, list(pos)] = a
        t[i] = pos[0]
        is_max = x[i] == a
        ref["softmax"][i] = np.where(is_max, 1.0, e) / s
        ref["log_softmax"][i] = np.where(is_max, 0.0, -a) - np.log1p(sm1)
        ref["loss_rows"][i] = np.log1p(sm1)
        ref["grad"][i] = ref["softmax"][i]
        ref["grad"][i, t[i]] = -sm1 / s
    return x.astype(dtype), t, ref


def near_one_hot_rows(dtype, c: int, eps: float, seed: int = 0):
    """confident_rows' logits with probability targets t = 1 - eps at each row's first max
    and eps spread at random over the other classes (label smoothing on a confident row),
    rounded to ``dtype``; returns (x, t, grad_ref), grad_ref the float64 gradient of the
    summed loss, softmax(z) Σt - t, from closed forms in which nothing cancels: at a max
    position it is (Σ_{i≠c} t_i - t_c (s - 1)) / s, the sum taken exactly (math.fsum). A
    backend that forms Σt first and then subtracts t_c loses the ~eps result to Σt's
    rounding (6e-8 in float32, 2-8 % of the gradient at eps = 1e-6)."""
    import math
    x, first, _ = confident_rows(dtype, c)
    rng = np.random.default_rng(seed)
    t = rng.random(x.shape)
    t[np.arange(len(first)), first] = 0
    t *= eps / t.sum(axis=1, keepdims=True)
    t[np.arange(len(first)), first] = 1 - eps
    t = t.astype(dtype)
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    grad = np.empty_like(x64)
    for i in range(len(x64)):
        a = x64[i].max()
        at_max = x64[i] == a
        k, e = int(at_max.sum()), math.exp(-a)
        sm1 = (k - 1) + (c - k) * e
        tsum = math.fsum(t64[i])
        for j in range(c):
            if at_max[j]:
                others = math.fsum(np.delete(t64[i], j))
                grad[i, j] = (others - t64[i, j] * sm1) / (1 + sm1)
            else:
                grad[i, j] = e * tsum / (1 + sm1) - t64[i, j]
    return x, t, grad
