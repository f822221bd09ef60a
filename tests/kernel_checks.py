"""Shared by the CPU-harness kernel tests (test_kernels_cpu.py, test_harness_edges.py): the
CUDA backend's ops run on a CpuContext, aligned random data, the output check against float64
and the NumPy backend, and the float64 references (MATH.md §1-4)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import rel_err, tol

from cugrad._backend import _IMPLS, numpy_backend
from cugrad.backends.cuda.context import use_context

numpy_backend()   # registers the NumPy ops
NP = _IMPLS["numpy"]
CU = _IMPLS["cuda"]

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
DTYPES = [pytest.param(F32, id="f32"), pytest.param(F64, id="f64")]
ACTS = ["sigmoid", "tanh", "relu"]
LAYOUTS = {"NN": (False, False), "NT": (False, True), "TN": (True, False), "TT": (True, True)}
EPILOGUES = {"none": (False, None), "bias": (True, None),
             **{f"bias+{a}": (True, a) for a in ACTS}, **{a: (False, a) for a in ACTS}}


def on_cpu(ctx, op: str, *args):
    """Run the CUDA backend's op with its kernels on the CPU."""
    with use_context(ctx):
        return CU[op](*args)


def aligned_empty(shape, dtype, offset_elems: int = 0) -> np.ndarray:
    """An uninitialised C-contiguous array whose first element lies offset_elems elements past
    a 16-byte boundary (offset 1: the view np.empty(n + 1)[1:] of an aligned buffer). The
    launchers' vector path checks the address; the harness itself copies every argument into
    exact-size buffers."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty((n + offset_elems) * dtype.itemsize + 32, dtype=np.uint8)
    off = (-raw.__array_interface__["data"][0]) % 16 + offset_elems * dtype.itemsize
    return raw[off:off + n * dtype.itemsize].view(dtype).reshape(shape)


def data(rng, *shape, dtype=F32, scale=1.0, offset_elems=0):
    """Random non-zero data (an unwritten output must not pass), 16-byte aligned unless
    offset_elems says otherwise."""
    out = aligned_empty(shape, dtype, offset_elems)
    out[...] = rng.standard_normal(shape) * scale
    return out


def check(out, ref64, ref_np, dtype, kind="product"):
    """out against the float64 reference and the NumPy backend (same dtype); no NaN."""
    out = np.asarray(out)
    assert out.dtype == dtype, f"dtype {out.dtype}, expected {dtype}"
    assert not np.isnan(out).any(), ("NaN in the output: an element was not written (outputs "
                                     "are poisoned) or was computed from shared memory read "
                                     "before it was stored (shared memory is NaN-filled)")
    e64 = rel_err(out, ref64)
    assert e64 <= tol(dtype, kind), f"relative error vs float64 reference {e64:.3g} > {tol(dtype, kind):g}"
    enp = rel_err(out, np.asarray(ref_np, dtype=np.float64))
    assert enp <= 2 * tol(dtype, kind), f"relative error vs the NumPy backend {enp:.3g}"


def sgd_case(ctx, rng, shape, momentum, weight_decay, dtype):
    """Three SGD steps of the CUDA backend's launcher on ``ctx``, checked against the NumPy
    backend and float64 (parameter and momentum buffer)."""
    p = data(rng, *shape, dtype=dtype)
    buf = np.zeros(shape, dtype) if momentum else None
    p_np, buf_np = p.copy(), None if buf is None else buf.copy()
    p64, buf64 = p.astype(np.float64), None if buf is None else buf.astype(np.float64)
    for _ in range(3):
        g = data(rng, *shape, dtype=dtype)
        on_cpu(ctx, "sgd_step", p, g, buf, 0.1, momentum, weight_decay)
        NP["sgd_step"](p_np, g, buf_np, 0.1, momentum, weight_decay)
        NP["sgd_step"](p64, g.astype(np.float64), buf64, 0.1, momentum, weight_decay)
    check(p, p64, p_np, dtype, "elementwise")
    if buf is not None:
        check(buf, buf64, buf_np, dtype, "elementwise")


# ----------------------------------------------------------------------------- references

def act64(name, y):
    y = np.asarray(y, np.float64)
    if name is None:
        return y
    if name == "sigmoid":
        e = np.exp(-np.abs(y))
        return np.where(y >= 0, 1 / (1 + e), e / (1 + e))
    if name == "tanh":
        return np.tanh(y)
    return np.maximum(y, 0)


def act_bwd64(name, g, z):
    g, z = np.asarray(g, np.float64), np.asarray(z, np.float64)
    if name == "sigmoid":
        return g * z * (1 - z)
    if name == "tanh":     # (1 - z)(1 + z): 1 - z*z would cancel near |z| = 1 even in float64
        return g * ((1 - z) * (1 + z))
    return g * (z > 0)


def softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    s = x - x.max(axis=1, keepdims=True)
    return s - np.log(np.exp(s).sum(axis=1, keepdims=True))


def xent64(z, t, reduction):
    """(loss, grad) in float64: L_row = lse Σt − Σ_{t≠0} t z; dL/dz = (ŷ Σt − t) · scale."""
    z = np.asarray(z, np.float64)
    n, c = z.shape
    if t.ndim == 1:
        tt = np.zeros((n, c))
        tt[np.arange(n), t] = 1.0
    else:
        tt = np.asarray(t, np.float64)
    mx = z.max(1, keepdims=True)
    shifted = z - mx
    lse = np.log(np.exp(shifted).sum(1))
    tsum = tt.sum(1)
    rows = lse * tsum - np.where(tt != 0, tt * np.where(tt != 0, shifted, 0), 0).sum(1)
    scale = 1.0 / n if reduction == "mean" else 1.0
    return rows.sum() * scale, (softmax64(z) * tsum[:, None] - tt) * scale


def mse64(p, t, reduction):
    d = np.asarray(p, np.float64) - np.asarray(t, np.float64)
    scale = {"mean": 1.0 / d.size, "sum": 1.0, "half_sum": 0.5}[reduction]
    return (d * d).sum() * scale, 2 * scale * d


def targets(rng, kind, n, c, dtype):
    """Cross-entropy targets: class indices ("index") or probability rows ("probs")."""
    if kind == "index":
        return rng.integers(0, c, size=n).astype(np.int64)
    return softmax64(rng.standard_normal((n, c)) * 2).astype(dtype)
