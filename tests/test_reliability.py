"""Reliability (issue 7): determinism, concurrency, soak, sizes past 2^31, hostile inputs.

* Determinism: every op of ``cugrad.functional`` called 100 times with the same inputs
  gives bitwise-identical outputs (bytes compared, so NaN positions count), on each
  backend; the first call is also checked against a float64 reference.
* Layouts: Fortran-ordered, reversed (negative strides) and strided inputs give the
  float64 reference's results on each backend; in-place state that is not C-contiguous,
  float16 / integer / bool / complex arrays, mixed devices and bad hyperparameters are clear
  errors naming the argument.
* NaN and ±inf propagate through every CUDA kernel exactly as through the NumPy backend
  (same NaN and ±inf positions, finite values equal to the float64 reference): on the GPU,
  and on the CPU through the kernel harness of tests/cuda_harness/.
* Concurrency: 8 threads released by one barrier make the first calls of a fresh CUDA
  context at once: results are right and every module is compiled exactly once
  (``CupyContext.compile_count``; also checked on the CPU with a stand-in for CuPy); the
  NumPy backend gives right results under threads; ops on a non-blocking CuPy stream are
  ordered on that stream (a kernel sent to another stream would read unfinished input).
* Soak: 10,000 SGD steps of a 64-128-10 MLP on the GPU (marks gpu, slow) and 1,000 on the
  CPU: the loss stays finite and falls, and memory in use does not grow after warm-up.
* Past 2^31 elements (marks gpu, slow): element-wise, row-wise, column-sum (also fused with
  an activation's backward, and past 2^32 rows), reduction, optimiser and product kernels
  give exact or float64-close values at indices past 2^31 (spot-checked on host slices,
  never copying the whole array); sizes a kernel cannot index (a matrix
  dimension of 2^31 or more, an output wider than the grid allows) are refused before any
  launch with a clear error.

GPU tests are marked ``gpu`` and skipped, with the reason, where no CUDA device works.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import tempfile
import threading
import time
import tracemalloc
import types
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import cugrad
import cugrad.functional as F
from cugrad import nn, optim
from cugrad._arrays import to_numpy
from cugrad._backend import _IMPLS, numpy_backend
from cugrad.backends.cuda import config  # (importing the package registers the CUDA ops; no CuPy)
from cugrad.backends.cuda.context import POISON_ENV, CupyContext, use_context

from conftest import randn, rel_err, require_gpu, tol

numpy_backend()                  # registers the NumPy ops
NP = _IMPLS["numpy"]
CU = _IMPLS["cuda"]

TOL = 1e-4                       # float32 against float64 (MATH.md §7: products and sums)
M, K, N = 257, 129, 65           # multiples of no tile size (128, 64, 32, 16, 8)
LAYOUTS = {"NN": (False, False), "NT": (False, True), "TN": (True, False), "TT": (True, True)}
ACTS = [None, "sigmoid", "tanh", "relu"]
REPEATS = 100


# ------------------------------------------------------------------------------ helpers

def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def _put64(h):
    """The float64 reference's `put`: host float64 copies (integer arrays unchanged)."""
    return h.astype(np.float64) if h.dtype.kind == "f" else h.copy()


def _raw(x) -> tuple:
    """Everything that makes two outputs the same: dtype, shape and every byte."""
    a = to_numpy(x)
    return a.dtype.str, a.shape, np.ascontiguousarray(a).tobytes()


def _probs(rng, n, c):
    """Probability rows, every entry > 0."""
    p = rng.random((n, c)) + 0.05
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _saved_output(x, w, b, act):
    """The forward output ``act(x wᵀ + b)`` in float64 on the host, rounded to float32: the
    `out=` a backward receives (the same values on every backend and in the reference)."""
    y = x.astype(np.float64) @ w.astype(np.float64).T + b
    return np.asarray(NP["activation"](act, y) if act else y, dtype=np.float32)


def _activation_output(name, x):
    return np.asarray(NP["activation"](name, x.astype(np.float64)), dtype=np.float32)


def _tols(name, n):
    """MATH.md §7's float32 bound for each of the n outputs of the case (or thread op) ``name``:
    1e-4 for products and sums, loss values included (the even outputs of a loss case: value,
    gradient, value, gradient), 1e-5 for element-wise results (activations, softmax, loss
    gradients, optimiser updates)."""
    if name.startswith(("matmul", "linear", "gemm", "bias_grad")):
        kinds = ["product"] * n
    elif name.startswith(("mse", "cross_entropy", "losses")):
        kinds = ["product" if i % 2 == 0 else "elementwise" for i in range(n)]
    else:
        kinds = ["elementwise"] * n
    return [tol(np.float32, kind) for kind in kinds]


def _check_outputs(outs, refs, name, what):
    """Each output of the case ``name`` within its MATH.md §7 bound of the float64 reference."""
    outs, refs = list(outs), list(refs)
    assert len(outs) == len(refs), f"{what}: {len(outs)} outputs, reference has {len(refs)}"
    for i, (o, r, bound) in enumerate(zip(outs, refs, _tols(name, len(refs)))):
        if r is None:
            assert o is None, f"{what}: output {i} should be None"
            continue
        err = rel_err(o, to_numpy(r))
        assert err < bound, f"{what}: output {i} relative error {err:.3g} vs float64 >= {bound}"


# --------------------------------------------------------------- one case per op variant
# A case builder takes put (host array -> backend array, read-only input), state (host
# array -> fresh backend array, called at every run for in-place state) and a Generator,
# and returns a thunk: each call runs the op(s) once and returns a tuple of outputs.
# Built with put = state = _put64 and the same seed, it gives the float64 reference.

def _c_matmul(layout):
    ta, tb = LAYOUTS[layout]

    def build(put, state, rng):
        a = put(randn(rng, *((K, M) if ta else (M, K))))
        b = put(randn(rng, *((N, K) if tb else (K, N))))
        return lambda: (F.matmul(a, b, trans_a=ta, trans_b=tb),)
    return build


def _c_matmul_backward(layout):
    ta, tb = LAYOUTS[layout]

    def build(put, state, rng):
        a = put(randn(rng, *((K, M) if ta else (M, K))))
        b = put(randn(rng, *((N, K) if tb else (K, N))))
        g = put(randn(rng, M, N))
        return lambda: F.matmul_backward(g, a, b, trans_a=ta, trans_b=tb)
    return build


def _c_linear(act, bias=True):
    def build(put, state, rng):
        x, w, b = put(randn(rng, M, K)), put(randn(rng, N, K)), put(randn(rng, N))
        return lambda: (F.linear(x, w, b if bias else None, activation=act),)
    return build


def _c_linear_backward(act):
    def build(put, state, rng):
        xh, wh, bh = randn(rng, M, K), randn(rng, N, K), randn(rng, N)
        x, w, g = put(xh), put(wh), put(randn(rng, M, N))
        out = put(_saved_output(xh, wh, bh, act)) if act else None
        return lambda: F.linear_backward(g, x, w, bias=True, activation=act, out=out)
    return build


def _c_bias_grad(m, n):
    def build(put, state, rng):
        g = put(randn(rng, m, n))
        return lambda: (F.bias_grad(g),)
    return build


def _c_unary(name):
    """F.<name>(x) on one matrix: the activations, softmax and log_softmax."""
    def build(put, state, rng):
        x = put(randn(rng, M, K, scale=3.0))
        fn = getattr(F, name)
        return lambda: (fn(x),)
    return build


def _c_activation_backward(name):
    def build(put, state, rng):
        g = put(randn(rng, M, K))
        z = put(_activation_output(name, randn(rng, M, K, scale=3.0)))
        fn = getattr(F, f"{name}_backward")
        return lambda: (fn(g, z),)
    return build


def _c_mse(reduction, shape=(M, K)):
    def build(put, state, rng):
        p, t = put(randn(rng, *shape)), put(randn(rng, *shape))
        return lambda: (F.mse_loss(p, t, reduction=reduction),
                        F.mse_loss_backward(p, t, reduction=reduction))
    return build


def _c_xent(kind, reduction, shape=(M, N)):
    def build(put, state, rng):
        n, c = shape
        z = put(randn(rng, n, c, scale=2.0))
        t = put(rng.integers(0, c, n).astype(np.int64) if kind == "index" else _probs(rng, n, c))

        def run():
            loss, grad = F.cross_entropy_with_grad(z, t, reduction=reduction)
            return (F.cross_entropy(z, t, reduction=reduction),
                    F.cross_entropy_backward(z, t, reduction=reduction), loss, grad)
        return run
    return build


def _c_sgd(momentum, weight_decay):
    def build(put, state, rng):
        p0, g = randn(rng, M, K), put(randn(rng, M, K))
        buf0 = randn(rng, M, K, scale=0.1)

        def run():
            p = state(p0)
            buf = state(buf0) if momentum else None
            F.sgd_step(p, g, buf, lr=0.1, momentum=momentum, weight_decay=weight_decay)
            return (p, buf) if momentum else (p,)
        return run
    return build


def _c_adam():
    def build(put, state, rng):
        p0, g = randn(rng, M, K), put(randn(rng, M, K))
        m0 = randn(rng, M, K, scale=0.1)
        v0 = np.abs(randn(rng, M, K, scale=0.1))

        def run():
            p, m, v = state(p0), state(m0), state(v0)
            F.adam_step(p, g, m, v, step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.01)
            return p, m, v
        return run
    return build


CASES = {
    **{f"matmul_{lay}": _c_matmul(lay) for lay in LAYOUTS},
    **{f"matmul_backward_{lay}": _c_matmul_backward(lay) for lay in ("NN", "NT", "TN")},
    **{f"linear_bias_{act}": _c_linear(act) for act in ACTS},
    "linear_nobias_relu": _c_linear("relu", bias=False),
    **{f"linear_backward_{act}": _c_linear_backward(act) for act in ACTS},
    "bias_grad_257x129": _c_bias_grad(M, K),
    "bias_grad_4099x33": _c_bias_grad(4099, 33),        # split-M: two passes
    "bias_grad_70001x33": _c_bias_grad(70001, 33),
    **{name: _c_unary(name) for name in ("sigmoid", "tanh", "relu")},
    **{f"{name}_backward": _c_activation_backward(name) for name in ("sigmoid", "tanh", "relu")},
    "softmax": _c_unary("softmax"),
    "log_softmax": _c_unary("log_softmax"),
    **{f"mse_{red}": _c_mse(red) for red in ("mean", "sum", "half_sum")},
    "mse_sum_1001x999": _c_mse("sum", (1001, 999)),      # 123 partial sums
    **{f"cross_entropy_{kind}_{red}": _c_xent(kind, red)
       for kind in ("index", "prob") for red in ("mean", "sum")},
    "cross_entropy_index_sum_20001x7": _c_xent("index", "sum", (20001, 7)),
    "sgd_plain": _c_sgd(0.0, 0.0),
    "sgd_momentum_wd": _c_sgd(0.9, 0.01),
    "adam": _c_adam(),
}


def _reference(case):
    """The case run by the NumPy backend in float64: an independent reference for the CUDA
    backend and the harness, not for the NumPy backend itself (whose float32 run it shares
    code with; its accuracy is tests/test_functional.py's and tests/test_optim.py's, against
    references written out in the tests)."""
    return CASES[case](_put64, _put64, np.random.default_rng(_seed(case)))()


# ---------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("case", sorted(CASES))
def test_100_calls_are_bitwise_identical(backend, case):
    """Fails if any of 100 calls with the same inputs differs from the first in one byte of
    one output (NaN positions included), or if the first call is not within MATH.md §7's
    bound of the float64 reference (a deterministic but wrong kernel; on the NumPy backend that reference is
    the same code in float64, see _reference)."""
    run = CASES[case](backend.put, lambda h: backend.put(h.copy()),
                      np.random.default_rng(_seed(case)))
    outs = run()
    _check_outputs(outs, _reference(case), case, f"{case} on {backend.name}")
    first = [_raw(o) for o in outs if o is not None]
    for call in range(1, REPEATS):
        again = [_raw(o) for o in run() if o is not None]
        for i, (a, b) in enumerate(zip(first, again)):
            assert a == b, f"{case} on {backend.name}: call {call + 1} output {i} differs from call 1"


# ----------------------------------------------------------------------- layouts of inputs

def _xp(backend):
    if backend.name == "numpy":
        return np
    import cupy
    return cupy


def _layout_put(backend, layout):
    """put giving each input in ``layout`` ("fortran", "reversed", "strided"), same values."""
    xp = _xp(backend)

    def put(h):
        if layout == "fortran":
            if h.ndim < 2:
                return backend.put(h)
            x = xp.asfortranarray(backend.put(h))
            assert x.flags.f_contiguous and not x.flags.c_contiguous
        elif layout == "reversed":
            x = backend.put(np.ascontiguousarray(h[::-1]))[::-1]
            assert x.strides[0] < 0
        else:
            x = backend.put(np.repeat(h, 2, axis=-1))[..., ::2]
            assert not x.flags.c_contiguous
        assert np.array_equal(to_numpy(x), h)
        return x
    return put


@pytest.mark.parametrize("layout", ["fortran", "reversed", "strided"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_non_c_contiguous_inputs_give_the_reference_results(backend, case, layout):
    """Every read-only input in Fortran order, with negative strides, or strided: fails if
    any output is outside MATH.md §7's bound of the float64 reference (a kernel reading a view as if
    it were C-contiguous), or if the op refuses the layout."""
    put = _layout_put(backend, layout)
    run = CASES[case](put, lambda h: backend.put(h.copy()), np.random.default_rng(_seed(case)))
    _check_outputs(run(), _reference(case), case, f"{case}, {layout} inputs on {backend.name}")


def test_in_place_state_that_is_not_c_contiguous_is_refused(backend):
    """Fails unless a Fortran-ordered param / exp_avg (an optimiser updates them in place and
    cannot write through a copy) is a ValueError naming the argument."""
    xp = _xp(backend)
    h = randn(np.random.default_rng(0), 5, 3)
    fort = lambda: xp.asfortranarray(backend.put(h))  # noqa: E731
    c = lambda: backend.put(h.copy())                  # noqa: E731
    with pytest.raises(ValueError, match="'param'.*C-contiguous"):
        F.sgd_step(fort(), c(), lr=0.1)
    with pytest.raises(ValueError, match="'momentum_buf'.*C-contiguous"):
        F.sgd_step(c(), c(), fort(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="'exp_avg'.*C-contiguous"):
        F.adam_step(c(), c(), fort(), c(), step=1, lr=0.1)


def test_byte_swapped_input_is_correct_or_a_clear_error():
    """A big-endian float32 array: fails unless the result equals the native one or the
    error is a TypeError naming the argument and its dtype (>f4)."""
    x = randn(np.random.default_rng(1), 4, 5)
    swapped = x.astype(">f4")
    try:
        out = F.relu(swapped)
    except TypeError as exc:
        assert "'x'" in str(exc) and ">f4" in str(exc), str(exc)
    else:
        assert np.array_equal(np.asarray(out, np.float32), np.maximum(x, 0))


# ------------------------------------------------------------------------ bad dtypes

def _bad_dtype_cases():
    """id -> (argument named in the error, its dtype, call(P)); P(shape, dtype) makes a
    backend array of non-zero values (1, 2, 3, ...) of that dtype."""
    f16, i32, i64 = np.float16, np.int32, np.int64
    return {
        "matmul_a_float16": ("a", f16, lambda P: F.matmul(P((3, 4), f16), P((4, 2)))),
        "matmul_b_int32": ("b", i32, lambda P: F.matmul(P((3, 4)), P((4, 2), i32))),
        "linear_weight_float16": ("weight", f16, lambda P: F.linear(P((3, 4)), P((5, 4), f16), P((5,)))),
        "linear_bias_int64": ("bias", i64, lambda P: F.linear(P((3, 4)), P((5, 4)), P((5,), i64))),
        "linear_backward_grad_y_float16": ("grad_y", f16, lambda P: F.linear_backward(
            P((3, 5), f16), P((3, 4)), P((5, 4)))),
        "bias_grad_float16": ("grad_y", f16, lambda P: F.bias_grad(P((5, 3), f16))),
        "relu_int32": ("x", i32, lambda P: F.relu(P((3, 4), i32))),
        "sigmoid_complex64": ("x", np.complex64, lambda P: F.sigmoid(P((3, 4), np.complex64))),
        "tanh_backward_out_float16": ("out", f16, lambda P: F.tanh_backward(P((3, 4)), P((3, 4), f16))),
        "softmax_int64": ("x", i64, lambda P: F.softmax(P((3, 4), i64))),
        "log_softmax_bool": ("x", np.bool_, lambda P: F.log_softmax(P((3, 4), np.bool_))),
        "mse_pred_int32": ("pred", i32, lambda P: F.mse_loss(P((3, 4), i32), P((3, 4)))),
        "mse_target_float16": ("target", f16, lambda P: F.mse_loss_backward(P((3, 4)), P((3, 4), f16))),
        "cross_entropy_logits_float16": ("logits", f16, lambda P: F.cross_entropy(
            P((3, 4), f16), P((3,), i64))),
        "cross_entropy_probability_target_int32": ("target", i32, lambda P: F.cross_entropy(
            P((3, 4)), P((3, 4), i32))),
        "sgd_param_int32": ("param", i32, lambda P: F.sgd_step(P((6,), i32), P((6,)), lr=0.1)),
        "sgd_grad_float16": ("grad", f16, lambda P: F.sgd_step(P((6,)), P((6,), f16), lr=0.1)),
        "adam_exp_avg_sq_float16": ("exp_avg_sq", f16, lambda P: F.adam_step(
            P((6,)), P((6,)), P((6,)), P((6,), f16), step=1, lr=0.1)),
    }


BAD_DTYPES = _bad_dtype_cases()


@pytest.mark.parametrize("case", sorted(BAD_DTYPES))
def test_unsupported_dtypes_are_a_type_error_naming_argument_dtype_and_device(backend, case):
    """Fails unless the call raises TypeError whose message names the argument, its dtype and
    the device it is on (float16 and integer arrays included, on the CUDA backend too)."""
    name, bad, call = BAD_DTYPES[case]

    def P(shape, dtype=np.float32):
        host = (np.arange(int(np.prod(shape))) % 3 + 1).reshape(shape).astype(dtype)
        return backend.put(host, dtype=dtype)

    with pytest.raises(TypeError) as info:
        call(P)
    msg = str(info.value)
    for piece in (f"'{name}'", str(np.dtype(bad)), f"on {backend.device}"):
        assert piece in msg, f"{piece!r} not in {msg!r}"


def test_boolean_class_indices_are_a_type_error(backend):
    """Fails unless a boolean class-index target is refused (it would pass as classes 0/1)."""
    z = backend.put(randn(np.random.default_rng(2), 3, 4))
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(z, backend.put(np.array([True, False, True])))


# ------------------------------------------------------------------- mixed devices (GPU)

@pytest.mark.gpu
def test_numpy_input_to_a_gpu_linear_names_both_devices(gpu):
    """Fails unless a host array fed to a GPU layer (forward, then a host gradient to its
    backward) is a ValueError naming both arguments and both devices."""
    layer = nn.Linear(5, 3, rng=0, device="cuda")
    x = np.ones((2, 5), np.float32)
    with pytest.raises(ValueError) as info:
        layer(x)
    msg = str(info.value)
    assert "'weight' is on cuda" in msg and "'x' is on cpu" in msg, msg
    layer(gpu.asarray(x))
    with pytest.raises(ValueError) as info:
        layer.backward(np.ones((2, 3), np.float32))
    msg = str(info.value)
    assert "on cuda" in msg and "'grad_y' is on cpu" in msg, msg


@pytest.mark.gpu
def test_gpu_input_to_a_cpu_linear_names_both_devices(gpu):
    """Fails unless a CuPy array fed to a CPU layer is a ValueError naming both devices."""
    layer = nn.Linear(5, 3, rng=0)
    with pytest.raises(ValueError) as info:
        layer(gpu.ones((2, 5), gpu.float32))
    msg = str(info.value)
    assert "'weight' is on cpu" in msg and "'x' is on cuda" in msg, msg


@pytest.mark.gpu
def test_loss_and_optimizer_with_a_host_array_name_the_device(gpu):
    """Fails unless a host target for GPU logits, and a host gradient for a GPU parameter,
    are ValueErrors naming the argument on the wrong device."""
    with pytest.raises(ValueError, match="'target' is on cpu"):
        nn.CrossEntropyLoss()(gpu.ones((3, 4), gpu.float32), np.array([0, 1, 2]))
    layer = nn.Linear(4, 2, rng=0, device="cuda")
    opt = optim.SGD(layer.parameters(), lr=0.1)
    layer.weight.grad = np.ones((2, 4), np.float32)
    with pytest.raises(ValueError, match="'grad' is on cpu"):
        opt.step()


# ---------------------------------------------------------------------- hyperparameters

def _params():
    return nn.Linear(2, 2, rng=0).parameters()


def _vec():
    return np.ones(3, np.float32)


nan, inf = float("nan"), float("inf")
BAD_HYPER = {
    "SGD_lr_inf": ("lr", lambda: optim.SGD(_params(), lr=inf)),
    "SGD_lr_-inf": ("lr", lambda: optim.SGD(_params(), lr=-inf)),
    "SGD_lr_float32_nan": ("lr", lambda: optim.SGD(_params(), lr=np.float32("nan"))),
    "SGD_momentum_nan": ("momentum", lambda: optim.SGD(_params(), lr=0.1, momentum=nan)),
    "SGD_momentum_inf": ("momentum", lambda: optim.SGD(_params(), lr=0.1, momentum=inf)),
    "SGD_weight_decay_-0.1": ("weight_decay", lambda: optim.SGD(_params(), lr=0.1, weight_decay=-0.1)),
    "SGD_weight_decay_nan": ("weight_decay", lambda: optim.SGD(_params(), lr=0.1, weight_decay=nan)),
    "Adam_lr_inf": ("lr", lambda: optim.Adam(_params(), lr=inf)),
    "Adam_lr_-1e-3": ("lr", lambda: optim.Adam(_params(), lr=-1e-3)),
    "Adam_beta1_-0.1": ("betas[0]", lambda: optim.Adam(_params(), betas=(-0.1, 0.999))),
    "Adam_beta1_inf": ("betas[0]", lambda: optim.Adam(_params(), betas=(inf, 0.999))),
    "Adam_beta2_1.0": ("betas[1]", lambda: optim.Adam(_params(), betas=(0.9, 1.0))),
    "Adam_beta2_1.5": ("betas[1]", lambda: optim.Adam(_params(), betas=(0.9, 1.5))),
    "Adam_eps_nan": ("eps", lambda: optim.Adam(_params(), eps=nan)),
    "Adam_eps_inf": ("eps", lambda: optim.Adam(_params(), eps=inf)),
    "Adam_eps_-1": ("eps", lambda: optim.Adam(_params(), eps=-1.0)),
    "Adam_weight_decay_-0.1": ("weight_decay", lambda: optim.Adam(_params(), weight_decay=-0.1)),
    "sgd_step_lr_inf": ("lr", lambda: F.sgd_step(_vec(), _vec(), lr=inf)),
    "sgd_step_lr_-inf": ("lr", lambda: F.sgd_step(_vec(), _vec(), lr=-inf)),
    "sgd_step_momentum_nan": ("momentum", lambda: F.sgd_step(_vec(), _vec(), _vec(), lr=0.1, momentum=nan)),
    "sgd_step_weight_decay_inf": ("weight_decay", lambda: F.sgd_step(_vec(), _vec(), lr=0.1, weight_decay=inf)),
    "adam_step_lr_nan": ("lr", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=nan)),
    "adam_step_lr_inf": ("lr", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=inf)),
    "adam_step_lr_-1": ("lr", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=-1.0)),
    "adam_step_beta1_1.0": ("beta1", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=0.1, beta1=1.0)),
    "adam_step_beta1_-0.1": ("beta1", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=0.1, beta1=-0.1)),
    "adam_step_beta2_1.0": ("beta2", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=0.1, beta2=1.0)),
    "adam_step_beta2_nan": ("beta2", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=0.1, beta2=nan)),
    "adam_step_eps_-1e-8": ("eps", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=0.1, eps=-1e-8)),
    "adam_step_eps_nan": ("eps", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=0.1, eps=nan)),
    "adam_step_eps_inf": ("eps", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1, lr=0.1, eps=inf)),
    "adam_step_weight_decay_nan": ("weight_decay", lambda: F.adam_step(
        _vec(), _vec(), _vec(), _vec(), step=1, lr=0.1, weight_decay=nan)),
    "adam_step_step_1.5": ("step", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=1.5, lr=0.1)),
    "adam_step_step_True": ("step", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=True, lr=0.1)),
    "adam_step_step_-1": ("step", lambda: F.adam_step(_vec(), _vec(), _vec(), _vec(), step=-1, lr=0.1)),
}


@pytest.mark.parametrize("case", sorted(BAD_HYPER))
def test_bad_hyperparameters_are_a_value_error_naming_the_argument(case):
    """NaN, infinite or negative learning rates, betas outside [0, 1), negative / NaN /
    infinite eps, bad weight decay and step: fails unless ValueError names the argument."""
    name, call = BAD_HYPER[case]
    with pytest.raises(ValueError) as info:
        call()
    assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"


@pytest.mark.parametrize("where", ["Adam", "adam_step"])
def test_zero_eps_is_a_value_error(where):
    """Adam's eps must be > 0: with eps = 0 and a zero gradient the update is 0/0. Fails if
    eps = 0 is accepted."""
    with pytest.raises(ValueError, match="eps"):
        if where == "Adam":
            optim.Adam(_params(), eps=0.0)
        else:
            F.adam_step(_vec(), np.zeros(3, np.float32), np.zeros(3, np.float32),
                        np.zeros(3, np.float32), step=1, lr=0.1, eps=0.0)


# ----------------------------------------------------------- NaN and inf through kernels

@pytest.fixture(scope="module")
def harness_context():
    """The CPU harness (tests/cuda_harness/): the real kernels/*.cu compiled by g++."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cuda_harness as ch
    if ch.compiler() is None:
        pytest.skip("no host C++ compiler (g++): the CPU kernel harness cannot build kernels/*.cu")
    return ch.CpuContext()


class _Engine:
    """Runs a CUDA-backend op (ops-level signature) on the GPU or on the CPU harness."""

    def __init__(self, name, put, get, context):
        self.name, self.put, self.get, self.context = name, put, get, context

    def run(self, op, args, inplace=()):
        dev = [self.put(a) if isinstance(a, np.ndarray) else a for a in args]
        with self.context():
            ret = CU[op](*dev)
        outs = [dev[i] for i in inplace] if inplace else (list(ret) if isinstance(ret, tuple) else [ret])
        return [self.get(o) for o in outs]


@pytest.fixture(params=["harness", pytest.param("gpu", marks=pytest.mark.gpu)])
def engine(request, monkeypatch):
    if request.param == "gpu":
        require_gpu()
        monkeypatch.setenv(POISON_ENV, "1")
        import cupy
        return _Engine("gpu", cupy.asarray, lambda a: np.asarray(a.get()), contextlib.nullcontext)
    ctx = request.getfixturevalue("harness_context")
    return _Engine("harness", lambda h: np.array(h, copy=True), np.asarray,
                   lambda: use_context(ctx))


def _nonfinite_x(kind, rng):
    """(37, 33) float32 logits/inputs with NaN and ±inf planted: "nan" (also a row of
    -inf), "inf" (+inf and -inf, no NaN), "neginf" (only -inf, one at a class target)."""
    x = randn(rng, 37, 33)
    if kind in ("nan", "inf"):
        x[5, 0], x[7, 10], x[11, 2], x[11, 4] = np.inf, -np.inf, np.inf, -np.inf
    if kind == "nan":
        x[1, 3], x[20, 32] = np.nan, np.nan
        x[9, :] = -np.inf
    if kind == "neginf":
        x[7, 10], x[8, 0], x[12, 32] = -np.inf, -np.inf, -np.inf
    return x


def _nonfinite_cases(kind):
    """name -> (op, args, indices of in-place outputs) with the planted input x."""
    rng = np.random.default_rng(_seed(kind))
    x = _nonfinite_x(kind, rng)
    w, b, c, g = randn(rng, 29, 33), randn(rng, 29), randn(rng, 37, 5), randn(rng, 37, 33)
    idx = rng.integers(0, 33, 37).astype(np.int64)
    idx[7] = 10                                  # the target class is a -inf logit
    probs = _probs(rng, 37, 33)
    p, buf, m = randn(rng, 37, 33), randn(rng, 37, 33, scale=0.1), randn(rng, 37, 33, scale=0.1)
    v = np.abs(randn(rng, 37, 33, scale=0.1))
    clean = randn(rng, 37, 33)
    cases = {
        **{f"linear_{act}": ("gemm", (x, w, False, True, b, act), ()) for act in ACTS},
        "gemm_B_operand_NT": ("gemm", (w, x, False, True, None, None), ()),
        "gemm_TN": ("gemm", (x, c, True, False, None, None), ()),
        "bias_grad": ("bias_grad", (x,), ()),
        "softmax": ("softmax", (x,), ()),
        "log_softmax": ("log_softmax", (x,), ()),
        **{f"mse_{red}": ("mse_loss", (x, g, red), ()) for red in ("mean", "sum", "half_sum")},
        "mse_backward_mean": ("mse_loss_backward", (x, g, "mean"), ()),
        "sgd_momentum_wd": ("sgd_step", (p, x, buf, 0.1, 0.9, 0.01), (0, 2)),
        "sgd_plain": ("sgd_step", (p, x, None, 0.1, 0.0, 0.0), (0,)),
        "adam": ("adam_step", (p, x, m, v, 2, 1e-3, 0.9, 0.999, 1e-8, 0.01), (0, 2, 3)),
    }
    for name in ("sigmoid", "tanh", "relu"):
        cases[f"{name}_forward"] = ("activation", (name, x), ())
        cases[f"{name}_backward_grad"] = ("activation_backward", (name, x, _activation_output(name, clean)), ())
        cases[f"{name}_backward_saved"] = ("activation_backward", (name, g, np.asarray(NP["activation"](name, x))), ())
    for tname, t in (("index", idx), ("prob", probs)):
        cases[f"cross_entropy_{tname}"] = ("cross_entropy", (x, t, "mean"), ())
        cases[f"cross_entropy_backward_{tname}"] = ("cross_entropy_backward", (x, t, "mean"), ())
        cases[f"cross_entropy_fwd_bwd_{tname}_sum"] = ("cross_entropy_fwd_bwd", (x, t, "sum"), ())
    return cases


NONFINITE = [(kind, name) for kind in ("nan", "inf", "neginf") for name in sorted(_nonfinite_cases(kind))]


def _assert_same_nonfinite(out, ref, what):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape, f"{what}: shape {out.shape} != {ref.shape}"
    for test, label in ((np.isnan, "NaN"), (np.isposinf, "+inf"), (np.isneginf, "-inf")):
        o, r = test(out), test(ref)
        assert np.array_equal(o, r), (f"{what}: {label} at {np.argwhere(o & ~r)[:5].tolist()} "
                                      f"(not in the reference), missing at {np.argwhere(r & ~o)[:5].tolist()}")
    fin = np.isfinite(ref)
    if fin.any():
        err = rel_err(out[fin], ref[fin])
        assert err < TOL, f"{what}: finite values off by {err:.3g} relative"


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning", "ignore:overflow:RuntimeWarning")
@pytest.mark.parametrize("kind,case", NONFINITE, ids=[f"{k}-{c}" for k, c in NONFINITE])
def test_nan_and_inf_propagate_like_the_reference(engine, kind, case):
    """NaN and ±inf inputs through each CUDA kernel: fails if a NaN or ±inf appears, vanishes
    or changes sign anywhere compared with the NumPy backend on float64 (a masked NaN, a
    fast-math max, an accumulator reset), or if the finite values are off by > 1e-4."""
    op, args, inplace = _nonfinite_cases(kind)[case]
    out = engine.run(op, args, inplace)
    ref_args = [_put64(a) if isinstance(a, np.ndarray) else a for a in args]
    ret = NP[op](*ref_args)
    ref = [ref_args[i] for i in inplace] if inplace else (list(ret) if isinstance(ret, tuple) else [ret])
    assert len(out) == len(ref)
    for i, (o, r) in enumerate(zip(out, ref)):
        _assert_same_nonfinite(o, r, f"{case} ({kind}) on {engine.name}, output {i}")


def _xent_reference_skipping_zero_targets(z, t):
    """float64 loss (sum) and gradient with the convention 0 · (-inf) = 0 (a class with
    probability 0 contributes nothing, whatever its logit)."""
    z, t = z.astype(np.float64), t.astype(np.float64)
    loss, grad = 0.0, np.empty_like(z)
    for r in range(z.shape[0]):
        mx = z[r].max()
        e = np.exp(z[r] - mx)
        lse = mx + np.log(e.sum())
        used = t[r] != 0
        loss += lse * t[r].sum() - (t[r][used] * z[r][used]).sum()
        grad[r] = e / e.sum() * t[r].sum() - t[r]
    return loss, grad


@pytest.mark.parametrize("engine_kind", ["numpy", "harness", pytest.param("gpu", marks=pytest.mark.gpu)])
def test_cross_entropy_zero_probability_on_a_minus_inf_logit_is_finite(engine_kind, request, monkeypatch):
    """A class with logit -inf and target probability 0 contributes 0 to the loss (0·log 0):
    fails if the loss or gradient is not finite, or the loss is more than 1e-4 and the gradient
    more than 1e-5 from the float64 reference (MATH.md §7).
    (The NumPy backend once formed 0 * -inf = NaN here.)"""
    if engine_kind == "numpy":
        eng = _Engine("numpy", lambda h: np.array(h, copy=True), np.asarray, contextlib.nullcontext)
        run = lambda op, args: [np.asarray(o) for o in NP[op](*args)]  # noqa: E731
    else:
        if engine_kind == "gpu":
            require_gpu()
            monkeypatch.setenv(POISON_ENV, "1")
            import cupy
            eng = _Engine("gpu", cupy.asarray, lambda a: np.asarray(a.get()), contextlib.nullcontext)
        else:
            ctx = request.getfixturevalue("harness_context")
            eng = _Engine("harness", lambda h: np.array(h, copy=True), np.asarray, lambda: use_context(ctx))
        run = lambda op, args: eng.run(op, args)  # noqa: E731
    z = np.array([[-np.inf, 1.0, 2.0, 0.5], [0.3, -np.inf, -np.inf, 1.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    t = np.array([[0.0, 0.5, 0.5, 0.0], [0.25, 0.0, 0.0, 0.75], [0.1, 0.2, 0.3, 0.4]], np.float32)
    ref_loss, ref_grad = _xent_reference_skipping_zero_targets(z, t)
    loss, grad = run("cross_entropy_fwd_bwd", (z, t, "sum"))
    assert np.isfinite(loss) and abs(float(loss) - ref_loss) <= TOL * abs(ref_loss), (eng.name, loss, ref_loss)
    assert np.isfinite(grad).all() and rel_err(grad, ref_grad) < tol(np.float32, "elementwise"), (eng.name, grad, ref_grad)


# ---------------------------------------------------------------------------- concurrency

THREADS = 8
THREAD_CASES = ["matmul_NT", "linear_bias_relu", "linear_backward_tanh", "bias_grad_4099x33",
                "softmax", "log_softmax", "mse_mean", "cross_entropy_index_mean",
                "cross_entropy_prob_sum", "sgd_momentum_wd", "adam"]


def _run_threads(worker, n=THREADS):
    """Run worker(tid, barrier) in n threads released together; re-raise the first error."""
    barrier = threading.Barrier(n)
    errors, results = [], [None] * n

    def target(tid):
        try:
            results[tid] = worker(tid, barrier)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish within 300 s"
    if errors:
        raise errors[0]
    return results


def test_numpy_backend_under_threads_matches_float64():
    """8 threads, released together, each run 11 ops (their own data, 3 times each): fails
    if any result is outside MATH.md §7's bound of its float64 reference (shared scratch state)."""
    seeds = {(tid, case): _seed(f"{case}/{tid}") for tid in range(THREADS) for case in THREAD_CASES}
    put = lambda h: np.array(h, copy=True)  # noqa: E731

    def worker(tid, barrier):
        runs = {case: CASES[case](put, put, np.random.default_rng(seeds[tid, case]))
                for case in THREAD_CASES}
        barrier.wait(timeout=60)
        return {case: [run() for _ in range(3)] for case, run in runs.items()}

    results = _run_threads(worker)
    for tid, per_case in enumerate(results):
        for case, outs in per_case.items():
            ref = CASES[case](_put64, _put64, np.random.default_rng(seeds[tid, case]))()
            for k, o in enumerate(outs):
                _check_outputs(o, ref, case, f"thread {tid}, {case}, run {k}")


def _fake_cupy(compiles: Counter, delay_s: float):
    """A stand-in for CuPy with what CupyContext.function() uses: RawModule.compile sleeps
    (a wide race window) and counts."""
    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.key = (zlib.crc32(code.encode()), tuple(options), tuple(name_expressions))

        def compile(self):
            time.sleep(delay_s)
            compiles[self.key] += 1

        def get_function(self, name):
            return ("function", name)

    device = types.SimpleNamespace(id=0)
    return types.SimpleNamespace(RawModule=RawModule, ndarray=np.ndarray,
                                 cuda=types.SimpleNamespace(Device=lambda: device))


def _first_kernel_of_each_module():
    """(file, name expression) of one kernel in each module of config.instantiations()."""
    return [(file, names[0]) for file, _, names in config.instantiations()]


def test_cupy_context_compiles_each_module_once_under_threads(monkeypatch):
    """CupyContext with a stand-in for CuPy (no GPU needed): 8 threads ask for every module's
    kernels at the same moment, each in a different order. Fails if any module is compiled
    more than once (by the stand-in's count or by CupyContext.compile_count)."""
    compiles = Counter()
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(compiles, delay_s=0.05))
    ctx = CupyContext()
    wanted = _first_kernel_of_each_module()

    def worker(tid, barrier):
        order = wanted[tid % len(wanted):] + wanted[:tid % len(wanted)]
        barrier.wait(timeout=60)
        return [ctx.function(file, name)._fn for file, name in order]

    results = _run_threads(worker)
    assert all(sorted(r) == sorted(results[0]) for r in results)
    assert len(compiles) == len(wanted) and set(compiles.values()) == {1}, compiles
    assert len(ctx.compile_count) == len(wanted) and set(ctx.compile_count.values()) == {1}, ctx.compile_count


def test_cupy_context_compiles_different_modules_at_the_same_time(monkeypatch):
    """Two threads compile two different modules: each compile waits (up to 10 s) until the
    other has started. A context that held one lock over every compile (as it did) runs
    them one after the other, and the first waits in vain."""
    started = {"gemm.cu": threading.Event(), "optim.cu": threading.Event()}
    waited = {}

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.file = "gemm.cu" if "gemm" in "".join(name_expressions) else "optim.cu"

        def compile(self):
            started[self.file].set()
            other = "optim.cu" if self.file == "gemm.cu" else "gemm.cu"
            waited[self.file] = started[other].wait(timeout=10)

        def get_function(self, name):
            return ("function", name)

    device = types.SimpleNamespace(id=0)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(
        RawModule=RawModule, ndarray=np.ndarray, cuda=types.SimpleNamespace(Device=lambda: device)))
    ctx = CupyContext()
    first = dict(_first_kernel_of_each_module())
    pick = {"gemm.cu": first["gemm.cu"], "optim.cu": first["optim.cu"]}

    def worker(tid, barrier):
        file = ("gemm.cu", "optim.cu")[tid]
        barrier.wait(timeout=60)
        return ctx.function(file, pick[file])._fn

    _run_threads(worker, n=2)
    assert waited == {"gemm.cu": True, "optim.cu": True}, waited


def _gpu_thread_ops(put, rng):
    """Five ops, one per kernel module: (name, thunk) with float32 inputs on ``put``."""
    x, w, b = put(randn(rng, 70, 40)), put(randn(rng, 33, 40)), put(randn(rng, 33))
    g = put(randn(rng, 1030, 17))
    s = put(randn(rng, 9, 31, scale=3.0))
    z, t = put(randn(rng, 45, 11)), put(rng.integers(0, 11, 45).astype(np.int64))
    p0, gp = randn(rng, 300), put(randn(rng, 300))

    def sgd():
        p = put(p0.copy())
        F.sgd_step(p, gp, lr=0.1)
        return (p,)
    return [("gemm", lambda: (F.linear(x, w, b, activation="relu"),)),
            ("bias_grad", lambda: (F.bias_grad(g),)),
            ("activations", lambda: (F.sigmoid(s),)),
            ("losses", lambda: F.cross_entropy_with_grad(z, t)),
            ("optim", sgd)]


@pytest.mark.gpu
def test_first_calls_from_8_threads_compile_each_module_once_and_are_correct(gpu):
    """A fresh CupyContext; 8 threads, released by one barrier, each make the first call of
    five ops (one per kernel module), in rotated orders. Fails if any result is outside
    MATH.md §7's bound of float64, or if any module was compiled more than once, or if the compiled
    modules are not exactly the five used."""
    ctx = CupyContext()

    def worker(tid, barrier):
        ops = _gpu_thread_ops(gpu.asarray, np.random.default_rng(1000 + tid))
        ops = ops[tid % 5:] + ops[:tid % 5]
        with use_context(ctx):
            barrier.wait(timeout=120)
            outs = {name: [to_numpy(o) for o in thunk()] for name, thunk in ops}
        return outs

    results = _run_threads(worker)
    for tid, outs in enumerate(results):
        refs = dict(_gpu_thread_ops(_put64, np.random.default_rng(1000 + tid)))
        for name, got in outs.items():
            _check_outputs(got, refs[name](), name, f"thread {tid}, {name}")
    files = sorted(key[0] for key in ctx.compile_count)
    assert files == sorted(["gemm.cu", "bias_grad.cu", "activations.cu", "losses.cu", "optim.cu"]), ctx.compile_count
    assert set(ctx.compile_count.values()) == {1}, f"modules compiled more than once: {ctx.compile_count}"


_SPIN_SRC = r"""
extern "C" __global__ void spin_then_copy(const float* src, float* dst, long long n, long long cycles) {
    // One block: thread 0 spins for `cycles` SM clocks, then the block copies src -> dst.
    if (threadIdx.x == 0) {
        const long long start = clock64();
        while (clock64() - start < cycles) { }
    }
    __syncthreads();
    for (long long i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}
"""
SPIN_CYCLES = 10**9          # 0.5 to 1 s at 1-2 GHz


@pytest.mark.gpu
def test_ops_on_a_non_blocking_stream_are_ordered_on_that_stream(gpu):
    """On a non-blocking stream S: a kernel that spins ~0.5 s and then writes the inputs, then
    matmul, linear, bias_grad, relu, softmax and sgd_step. The inputs hold NaN until the spin
    ends, so an op launched on any stream but S (which does not wait for S) reads NaN or is
    overwritten: fails if any result differs from float64 after S's event, or if the ops
    synchronised the host with S (S finished before they were all enqueued)."""
    cp = gpu
    rng = np.random.default_rng(7)
    shapes = {"a": (300, 70), "b": (70, 45), "x": (64, 70), "w": (33, 70), "bias": (33,),
              "g": (1500, 37), "y": (40, 50), "p": (2000,), "gp": (2000,)}
    host = {k: randn(rng, *s) for k, s in shapes.items()}
    offsets, total = {}, 0
    for k, s in shapes.items():
        offsets[k] = total
        total += int(np.prod(s))
    src = cp.asarray(np.concatenate([host[k].ravel() for k in shapes]))
    module = cp.RawModule(code=_SPIN_SRC)
    spin = module.get_function("spin_then_copy")
    stream = cp.cuda.Stream(non_blocking=True)

    def run_ops(dst):
        v = {k: dst[offsets[k]:offsets[k] + int(np.prod(s))].reshape(s) for k, s in shapes.items()}
        outs = {"matmul": F.matmul(v["a"], v["b"]),
                "linear": F.linear(v["x"], v["w"], v["bias"], activation="tanh"),
                "bias_grad": F.bias_grad(v["g"]),
                "relu": F.relu(v["y"]),
                "softmax": F.softmax(v["y"])}
        F.sgd_step(v["p"], v["gp"], lr=0.5)
        outs["sgd"] = v["p"]
        return outs

    with stream:                 # warm-up: compile, and fill the pool's cache for stream S
        dst = cp.full(total, cp.nan, dtype=cp.float32)
        spin((1,), (256,), (src, dst, np.int64(total), np.int64(1)))
        run_ops(dst)             # outputs freed: the pool keeps their blocks for stream S
        stream.synchronize()
        dst.fill(cp.nan)
        stream.synchronize()
        t0 = time.perf_counter()
        spin((1,), (256,), (src, dst, np.int64(total), np.int64(SPIN_CYCLES)))
        outs = run_ops(dst)
        still_spinning = not stream.done
        enqueue_s = time.perf_counter() - t0
        done = stream.record()
    done.synchronize()
    assert still_spinning, (f"stream S finished while the ops were being enqueued ({enqueue_s:.3f} s): "
                            "an op synchronised the host, so the ordering check proves nothing")
    h64 = {k: v.astype(np.float64) for k, v in host.items()}
    refs = {"matmul": h64["a"] @ h64["b"],
            "linear": np.tanh(h64["x"] @ h64["w"].T + h64["bias"]),
            "bias_grad": h64["g"].sum(axis=0),
            "relu": np.maximum(h64["y"], 0),
            "softmax": np.exp(h64["y"]) / np.exp(h64["y"]).sum(axis=1, keepdims=True),
            "sgd": h64["p"] - 0.5 * h64["gp"]}
    for name, ref in refs.items():
        out = outs[name].get()
        assert not np.isnan(out).any(), f"{name}: NaN, it read its input before stream S wrote it"
        assert rel_err(out, ref) < TOL, f"{name}: wrong result (not ordered on stream S?)"


# ----------------------------------------------------------------------------------- soak

def _separable_data(rng, n=2048, d=64, classes=10):
    centers = rng.standard_normal((classes, d))
    labels = rng.integers(0, classes, n)
    x = centers[labels] + rng.standard_normal((n, d))
    return x.astype(np.float32), labels.astype(np.int64)


def _train(device, steps, warmup, used_bytes):
    """SGD (momentum 0.9) on a 64-128-10 MLP, batches of 64 cycling over fixed data; returns
    (losses as float64, memory in use after ``warmup`` steps, after the last)."""
    xh, yh = _separable_data(np.random.default_rng(3))
    x, y = cugrad.asarray(xh, device=device), cugrad.asarray(yh, device=device, dtype=np.int64)
    model = nn.Sequential(nn.Linear(64, 128, rng=0, activation="relu"),
                          nn.Linear(128, 10, rng=1)).to(device)
    crit = nn.CrossEntropyLoss()
    opt = optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    xp = np if device == "cpu" else importlib.import_module("cupy")
    losses = xp.empty(steps, dtype=np.float32)
    batches = len(xh) // 64
    used_warm = None
    for step in range(steps):
        lo = (step % batches) * 64
        opt.zero_grad()
        loss = crit(model(x[lo:lo + 64]), y[lo:lo + 64])
        model.backward(crit.backward())
        opt.step()
        losses[step] = loss
        if step == warmup - 1:
            used_warm = used_bytes()
    used_end = used_bytes()
    return to_numpy(losses).astype(np.float64), used_warm, used_end


def _check_training(losses, window):
    assert np.isfinite(losses).all(), f"non-finite loss at step {int(np.argmin(np.isfinite(losses)))}"
    first, last = losses[:window].mean(), losses[-window:].mean()
    assert last < 0.25 * first and last < 0.05, (
        f"the loss did not fall: mean of the first {window} steps {first:.4g}, last {last:.4g}")


def test_cpu_soak_1000_steps_loss_falls_and_memory_is_flat():
    """1,000 SGD steps on the NumPy backend: fails if a loss is not finite, if the mean loss of
    the last 100 steps is not below a quarter of the first 100's (and below 0.05), or if
    traced host memory grows by more than 16 KiB between step 100 and step 1,000 (a leak of
    even one small object per step)."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        losses, warm, end = _train("cpu", 1000, 100, lambda: tracemalloc.get_traced_memory()[0])
    finally:
        if started:
            tracemalloc.stop()
    _check_training(losses, 100)
    assert end - warm <= 16 * 1024, f"host memory grew by {end - warm} bytes over 900 steps"


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_soak_10000_steps_loss_falls_and_memory_is_flat(gpu):
    """10,000 SGD steps on the GPU (about 30 small launches a step, half of them the test
    suite's NaN poisoning of fresh outputs, and two 8-byte host reads for the class-index range
    check: about a millisecond a step, 10-20 s in all). Fails if a loss is not finite, if the mean
    loss of the last 500 steps is not below a quarter of the first 500's (and below 0.05), or
    if the CuPy pool's bytes in use after step 10,000 exceed those after step 100."""
    pool = gpu.get_default_memory_pool()
    losses, warm, end = _train("cuda", 10_000, 100, pool.used_bytes)
    _check_training(losses, 500)
    assert end <= warm, f"GPU memory in use grew from {warm} to {end} bytes after warm-up"


# ------------------------------------------------------------------ past 2^31 elements

TWO31 = 2**31

_BIG_SRC = r"""
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// x[i] = k / 2^23 - 1 with k the top 24 bits of mix64(i): exact, in [-1, 1), never 0.
extern "C" __global__ void fill_pattern(float* x, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = (float)(mix64((unsigned long long)i) >> 40) * (1.0f / 8388608.0f) - 1.0f;
        x[i] = v == 0.0f ? 0.5f : v;
    }
}

// x[m * cols + c] = s(m) * (c % 7 + 1), s(m) in {-2, -1, 1, 2} from the top 2 bits of mix64(m).
template <typename T>
__device__ void fill_rows_of(T* x, long long rows, int cols) {
    const long long n = rows * cols;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const long long m = i / cols;
        const int c = (int)(i - m * cols);
        const int k = (int)(mix64((unsigned long long)m) >> 62);
        const T s = k == 0 ? T(-2) : k == 1 ? T(-1) : k == 2 ? T(1) : T(2);
        x[i] = s * (T)(c % 7 + 1);
    }
}
extern "C" __global__ void fill_rows(float* x, long long rows, int cols) { fill_rows_of(x, rows, cols); }
extern "C" __global__ void fill_rows_f64(double* x, long long rows, int cols) { fill_rows_of(x, rows, cols); }

// x[i] = lo for i < split, hi from split on.
extern "C" __global__ void fill_step(float* x, long long n, long long split, float lo, float hi) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        x[i] = i < split ? lo : hi;
}
"""

_U64 = np.uint64


def _mix64(i):
    z = np.asarray(i, dtype=np.uint64) + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _pattern(idx):
    """Host copy of fill_pattern at the flat indices ``idx``."""
    v = (_mix64(idx) >> _U64(40)).astype(np.float32) * np.float32(1.0 / 8388608.0) - np.float32(1.0)
    return np.where(v == 0, np.float32(0.5), v).astype(np.float32)


def _row_sign(m):
    return np.array([-2.0, -1.0, 1.0, 2.0], np.float32)[(_mix64(m) >> _U64(62)).astype(np.int64)]


def _rows_value(flat, cols):
    """Host copy of fill_rows at the flat indices ``flat``."""
    flat = np.asarray(flat, dtype=np.int64)
    return _row_sign(flat // cols) * ((flat % cols) % 7 + 1).astype(np.float32)


class _Big:
    """Large device arrays of one test, freed (with the pool's cached blocks) at the end."""

    def __init__(self, cp):
        self.cp, self.arrays = cp, {}
        self.module = cp.RawModule(code=_BIG_SRC)

    def need(self, nbytes, what):
        self.cp.get_default_memory_pool().free_all_blocks()
        free, total = self.cp.cuda.Device().mem_info
        if free < nbytes:
            pytest.skip(f"{what} needs {nbytes / 2**30:.1f} GiB of free GPU memory; "
                        f"{free / 2**30:.1f} GiB of {total / 2**30:.1f} GiB free")

    def launch(self, name, *args):
        self.module.get_function(name)((4096,), (256,), args)

    def free(self):
        self.arrays.clear()
        self.cp.cuda.Device().synchronize()
        self.cp.get_default_memory_pool().free_all_blocks()


@pytest.fixture
def big(gpu):
    """One large-array test at a time on this machine (pytest-xdist workers share the GPU):
    an exclusive lock on a file, then the free-memory check, then the arrays."""
    import fcntl
    lock_path = Path(tempfile.gettempdir()) / "cugrad-tests-large-gpu-arrays.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        b = _Big(gpu)
        try:
            yield b
        finally:
            b.free()
            fcntl.flock(lock, fcntl.LOCK_UN)


def _host(cp_array, lo, hi):
    return cp_array[lo:hi].get()


@pytest.mark.gpu
@pytest.mark.slow
def test_elementwise_past_2_31_relu_relu_backward_sgd(big):
    """relu, relu_backward and sgd_step on 2^31 + 17 float32 elements (8.6 GB each): fails if
    any element of slices at the start, around 2^30, around 2^31 and at the end differs from
    the exact host value (a 32-bit index wraps, or the grid-stride loop stops early)."""
    n = TWO31 + 17
    big.need(3 * 4 * n + 2**31, "relu on 2^31 + 17 float32 elements")
    a = big.arrays
    a["x"] = big.cp.empty(n, dtype=big.cp.float32)
    big.launch("fill_pattern", a["x"], np.int64(n))
    a["out"] = F.relu(a["x"])
    a["grad"] = F.relu_backward(a["x"], a["out"])
    spans = [(0, 64), (TWO31 // 2 - 5, TWO31 // 2 + 59), (TWO31 - 40, n)]
    for lo, hi in spans:
        x = _pattern(np.arange(lo, hi))
        assert np.array_equal(_host(a["x"], lo, hi), x), f"fill_pattern itself is wrong at [{lo}, {hi})"
        assert np.array_equal(_host(a["out"], lo, hi), np.maximum(x, 0)), f"relu wrong in [{lo}, {hi})"
        assert np.array_equal(_host(a["grad"], lo, hi), np.where(x > 0, x, 0)), \
            f"relu_backward wrong in [{lo}, {hi})"
    del a["grad"]
    F.sgd_step(a["out"], a["x"], lr=0.5)
    for lo, hi in spans:
        x = _pattern(np.arange(lo, hi))
        assert np.array_equal(_host(a["out"], lo, hi), np.maximum(x, 0) - np.float32(0.5) * x), \
            f"sgd_step wrong in [{lo}, {hi})"


def _rows_matrix(big, rows, cols, dtype=np.float32):
    g = big.cp.empty((rows, cols), dtype=dtype)
    big.launch("fill_rows" if g.dtype == np.float32 else "fill_rows_f64", g, np.int64(rows),
               np.int32(cols))
    return g


TALL = TWO31 // 64 + 3       # (TALL, 64): 2^31 + 192 elements


@pytest.mark.gpu
@pytest.mark.slow
def test_bias_grad_past_2_31_elements_is_exact(big):
    """bias_grad of a (2^31/64 + 3, 64) float32 matrix of small integers (every partial sum
    exact in float32): fails unless every column sum equals the exact host sum (a wrapped
    row offset, a lost chunk of the split-M reduction)."""
    big.need(4 * 64 * TALL + 2**31, "bias_grad on 2^31 + 192 float32 elements")
    a = big.arrays               # no local names for big arrays: a failure's traceback keeps them
    a["g"] = _rows_matrix(big, TALL, 64)
    last = TALL - 1
    assert np.array_equal(a["g"][last].get(), _rows_value(np.arange(last * 64, TALL * 64), 64))
    sign_sum = 0.0
    for lo in range(0, TALL, 1 << 22):
        sign_sum += float(_row_sign(np.arange(lo, min(TALL, lo + (1 << 22)))).astype(np.float64).sum())
    expected = sign_sum * (np.arange(64) % 7 + 1)
    got = F.bias_grad(a["g"]).get().astype(np.float64)
    assert np.array_equal(got, expected), f"column sums differ at {np.flatnonzero(got != expected)[:8]}"


@pytest.mark.gpu
@pytest.mark.slow
def test_accumulate_and_adam_past_2_31_elements(big):
    """accumulate, then adam_step with a step number (step 1, kernel adam_step) and with a
    device step counter (step 2, adam_step_counted), on 2^31 + 17 float32 elements (four
    8.6 GB arrays). Fails if, in slices at the start, around 2^30 and on both sides of 2^31,
    the sum is not exact or a parameter or moment is not the float64 formula's to 1e-5 (a
    32-bit index in either loop wraps: mutants that no other test killed)."""
    n = TWO31 + 17
    big.need(4 * 4 * n + 2**31, "accumulate and Adam on 2^31 + 17 float32 elements")
    cp, a = big.cp, big.arrays
    for name in ("p", "g"):
        a[name] = cp.empty(n, dtype=cp.float32)
        big.launch("fill_pattern", a[name], np.int64(n))
    F.accumulate(a["g"], a["p"])                          # g = 2x, exact
    spans = [(0, 64), (TWO31 // 2 - 5, TWO31 // 2 + 59), (TWO31 - 40, n)]
    ref = {}
    for lo, hi in spans:
        x = _pattern(np.arange(lo, hi))
        assert np.array_equal(_host(a["g"], lo, hi), 2 * x), f"accumulate wrong in [{lo}, {hi})"
        ref[lo, hi] = [x.astype(np.float64), 2.0 * x, np.zeros(hi - lo), np.zeros(hi - lo)]  # p g m v
    a["m"] = cp.zeros(n, dtype=cp.float32)
    a["v"] = cp.zeros(n, dtype=cp.float32)
    lr, beta1, beta2, eps = 0.01, 0.9, 0.999, 1e-8
    counter = cp.ones((), dtype=cp.int64)                 # one step taken: the next is 2
    for step in (1, counter):
        F.adam_step(a["p"], a["g"], a["m"], a["v"], step=step, lr=lr, beta1=beta1,
                    beta2=beta2, eps=eps)
        t = 1 if step is not counter else 2
        for (lo, hi), (p, g, m, v) in ref.items():
            m[:] = beta1 * m + (1 - beta1) * g
            v[:] = beta2 * v + (1 - beta2) * g * g
            p -= lr / (1 - beta1**t) * m / (np.sqrt(v / (1 - beta2**t)) + eps)
            for name, want in (("p", p), ("m", m), ("v", v)):
                assert rel_err(_host(a[name], lo, hi), want) < 1e-5, \
                    f"adam step {t}: {name} wrong in [{lo}, {hi})"
    assert int(counter) == 2, f"the step counter holds {int(counter)} after one counted step"


@pytest.mark.gpu
@pytest.mark.slow
def test_fused_activation_backward_and_bias_grad_past_2_31_elements_are_exact(big):
    """linear_backward with each activation, whose dZ = dY * f'(out) and db (dZ's column
    sums) come from one kernel (bias_grad_colsum with ACT 1-3), on float64 dY = out =
    fill_rows values ((2^31/64 + 3, 64): 2^31 + 192 elements; integers, so every product and
    sum is exact in float64 in any order), x = ones (rows, 1) and weight = ones (64, 1): db
    and dW are dZ's column sums, dX its row sums. Fails unless db and dW equal the exact
    host sums and dX the exact row sums at rows on both sides of element 2^31 (a 32-bit
    index in the fused kernel's reads of out or writes of dZ: mutants no other test killed)."""
    big.need(2 * 8 * 64 * TALL + 2**31, "fused backward on 2^31 + 192 float64 elements")
    cp, a = big.cp, big.arrays
    a["g"] = _rows_matrix(big, TALL, 64, np.float64)
    a["x"] = cp.ones((TALL, 1), dtype=cp.float64)
    w = cp.ones((64, 1), dtype=cp.float64)
    signs = np.array([-2.0, -1.0, 1.0, 2.0])               # _row_sign's values, by top bits
    counts = np.zeros(4, np.int64)
    for lo in range(0, TALL, 1 << 22):
        top = _mix64(np.arange(lo, min(TALL, lo + (1 << 22)))) >> _U64(62)
        counts += np.bincount(top.astype(np.int64), minlength=4)
    cols = (np.arange(64) % 7 + 1).astype(np.float64)
    derivative = {"relu": lambda g, y: g * (y > 0), "sigmoid": lambda g, y: g * y * (1 - y),
                  "tanh": lambda g, y: g * (1 - y) * (1 + y)}
    rows = _spot_rows()
    for activation, f in derivative.items():
        dz = f(np.outer(signs, cols), np.outer(signs, cols))      # dZ of a row, by its sign
        a["dx"], a["dw"], a["db"] = F.linear_backward(a["g"], a["x"], w, activation=activation,
                                                      out=a["g"])
        expected = counts.astype(np.float64) @ dz
        assert np.array_equal(a["db"].get(), expected), f"{activation}: db wrong"
        assert np.array_equal(a["dw"].get()[:, 0], expected), f"{activation}: dW wrong"
        sign_of = np.searchsorted(signs, _row_sign(np.array(rows)))
        got = a["dx"][cp.asarray(rows)].get()[:, 0]
        assert np.array_equal(got, dz.sum(axis=1)[sign_of]), f"{activation}: dX rows {rows}"
        del a["dx"], a["dw"], a["db"]


@pytest.mark.gpu
@pytest.mark.slow
def test_bias_grad_past_2_32_rows(big):
    """bias_grad of a (2^32 + 5, 1) float32 column, zero but for 4 at row 5, 1 at row
    2^31 + 7 and 2 at row 2^32 + 3 (the chunks of the split-M reduction then start past 2^31
    and past 2^32 rows): fails unless the sum is exactly 7 (a 32-bit signed or unsigned row
    offset loses a marked row: mutants that the (2^31/64 + 3)-row test cannot reach)."""
    m = 2 * TWO31 + 5
    big.need(4 * m + 2**31, "bias_grad on 2^32 + 5 rows")
    a = big.arrays
    a["g"] = big.cp.zeros((m, 1), dtype=big.cp.float32)
    for row, value in ((5, 4.0), (TWO31 + 7, 1.0), (2 * TWO31 + 3, 2.0)):
        a["g"][row, 0] = value
    got = F.bias_grad(a["g"]).get()
    assert got.shape == (1,) and got[0] == 7.0, f"column sum {got}, expected [7.]"


def _spot_rows():
    return [0, 1, TWO31 // 64 - 2, TWO31 // 64 - 1, TWO31 // 64, TWO31 // 64 + 1, TALL - 1]


@pytest.mark.gpu
@pytest.mark.slow
def test_products_past_2_31_elements_are_exact(big):
    """matmul NN and linear NT with bias and relu (16-byte loads), and matmul TN reading a
    (64, 2^31/64 + 3) operand transposed (scalar loads: its rows are not whole vectors), all
    on 2^31 + 192 small-integer elements (every sum exact in float32): fails unless rows on
    both sides of element 2^31 are exact."""
    big.need(4 * 64 * TALL + 2**31, "products on 2^31 + 192 float32 elements")
    cp, a = big.cp, big.arrays
    a["g"] = _rows_matrix(big, TALL, 64)
    rng = np.random.default_rng(11)
    ints = lambda *s: rng.choice(np.array([-3, -2, -1, 1, 2, 3], np.float32), size=s)  # noqa: E731
    b_nn, w_nt, bias, b_tn = ints(64, 4), ints(3, 64), ints(3), ints(64, 3)
    rows = _spot_rows()
    a["nn"] = F.matmul(a["g"], cp.asarray(b_nn))
    a["nt"] = F.linear(a["g"], cp.asarray(w_nt), cp.asarray(bias), activation="relu")
    a["tn"] = F.matmul(a["g"].reshape(64, TALL), cp.asarray(b_tn), trans_a=True)
    for r in rows:
        g_row = _rows_value(np.arange(r * 64, r * 64 + 64), 64).astype(np.float64)
        assert np.array_equal(a["nn"][r].get(), g_row @ b_nn), f"matmul NN row {r}"
        assert np.array_equal(a["nt"][r].get(), np.maximum(g_row @ w_nt.T + bias, 0)), \
            f"linear NT row {r}"
        col = _rows_value(np.arange(64, dtype=np.int64) * TALL + r, 64).astype(np.float64)  # (64,)
        assert np.array_equal(a["tn"][r].get(), col @ b_tn), f"matmul TN row {r}"


@pytest.mark.gpu
@pytest.mark.slow
def test_product_output_and_split_k_partials_past_2_31_elements(big, monkeypatch):
    """An output of 2^31 + 3·2^15 float32 elements ((2^16 + 3) x 2^15, K = 24, small integers:
    every sum exact), unsplit, then split with GEMM_MAX_K_PER_SPLIT shrunk to 8 (3 partials:
    partial z starts at z·M·N, past 2^31 for z = 1 and past 2^32 for z = 2). Fails unless rows
    on both sides of output element 2^31 are exact (a 32-bit output index, partial offset or
    split-sum index wraps: mutants no other test kills, the test above has outputs of 10^8
    elements). Written in session 12 without a GPU; its plan and host logic were checked at
    300 x 200 x 24 on the CPU harness only."""
    m, n, k = 2**16 + 3, 2**15, 24
    big.need(4 * 4 * m * n + 2**31, "a 2^31-element product split 3 ways")
    cp, a = big.cp, big.arrays
    rng = np.random.default_rng(12)
    ints = lambda *s: rng.choice(np.array([-3, -2, -1, 1, 2, 3], np.float32), size=s)  # noqa: E731
    a_h, b_h = ints(m, k), ints(k, n)
    a["a"], a["b"] = cp.asarray(a_h), cp.asarray(b_h)
    rows = [0, 1, 2**16 - 1, 2**16, 2**16 + 1, m - 1]
    for cap in (config.GEMM_MAX_K_PER_SPLIT, 8):
        monkeypatch.setattr(config, "GEMM_MAX_K_PER_SPLIT", cap)
        a["c"] = F.matmul(a["a"], a["b"])
        for r in rows:
            assert np.array_equal(a["c"][r].get(), a_h[r].astype(np.float64) @ b_h), \
                f"cap {cap}: row {r}"
        del a["c"]


@pytest.mark.gpu
@pytest.mark.slow
def test_row_kernels_past_2_31_elements(big):
    """log_softmax and cross_entropy_backward on (2^31/33 + 2, 33) float32 logits: fails if
    rows at the start and on both sides of element 2^31 differ from float64 by > 1e-5."""
    rows = TWO31 // 33 + 2
    big.need(3 * 4 * 33 * rows + 8 * rows + 2**31, "row kernels on 2^31 + 64 float32 elements")
    cp = big.cp
    a = big.arrays
    a["x"] = cp.empty((rows, 33), dtype=cp.float32)
    big.launch("fill_pattern", a["x"], np.int64(rows * 33))
    a["t"] = (cp.arange(rows, dtype=cp.int64) * 7) % 33
    a["ls"] = F.log_softmax(a["x"])
    a["dz"] = F.cross_entropy_backward(a["x"], a["t"], reduction="sum")
    for r in [0, 1, TWO31 // 33 - 1, TWO31 // 33, rows - 1]:
        z = _pattern(np.arange(r * 33, r * 33 + 33)).astype(np.float64)
        e = np.exp(z - z.max())
        sm = e / e.sum()
        onehot = np.eye(33)[(r * 7) % 33]
        assert rel_err(a["ls"][r].get(), z - z.max() - np.log(e.sum())) < 1e-5, f"log_softmax row {r}"
        assert rel_err(a["dz"][r].get(), sm - onehot) < 1e-5, f"cross_entropy_backward row {r}"


@pytest.mark.gpu
@pytest.mark.slow
def test_mse_sum_past_2_31_elements(big):
    """mse_loss(reduction="sum") over 2^31 + 4097 elements: d = 1 before index 2^31 and 1024
    from there (the tail holds two thirds of the sum). Fails unless the loss is within 1e-5
    of 2^31 + 4097 * 2^20 (a reduction that drops or wraps the tail)."""
    n = TWO31 + 4097
    big.need(2 * 4 * n + 2**32, "mse_loss on 2^31 + 4097 float32 elements")
    cp = big.cp
    a = big.arrays
    a["p"] = cp.empty(n, dtype=cp.float32)
    big.launch("fill_step", a["p"], np.int64(n), np.int64(TWO31), np.float32(1.0), np.float32(1024.0))
    a["t"] = cp.zeros(n, dtype=cp.float32)
    expected = float(TWO31) + 4097.0 * 2.0**20
    got = float(F.mse_loss(a["p"], a["t"], reduction="sum"))
    assert abs(got - expected) <= 1e-5 * expected, f"sum {got!r}, expected {expected!r}"


@pytest.mark.gpu
def test_matrix_dimensions_past_32_bits_are_refused_before_launch(gpu):
    """M, K or N of 2^31 (zero-stride views: no memory) must be a ValueError naming the size
    and 2^31 before anything is allocated or launched, and so must rows of 2^31 classes in
    the row-wise ops; an output wider than the grid's column tiles (N > 65535 * 128) is
    computed in column bands and must be correct. Fails on any other outcome."""
    cp = gpu
    one = cp.ones((1, 1), cp.float32)
    big_cols, big_rows = cp.broadcast_to(one, (1, TWO31)), cp.broadcast_to(one, (TWO31, 1))
    target = cp.zeros(1, cp.int64)
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    for what, call in (("K", lambda: F.matmul(big_cols, big_rows)),
                       ("M", lambda: F.matmul(big_rows, one)),
                       ("N", lambda: F.matmul(one, big_cols))):
        with pytest.raises(ValueError) as info:
            call()
        assert f"size {what} = {TWO31}" in str(info.value) and "2^31" in str(info.value), str(info.value)
    for what, call in (("softmax", lambda: F.softmax(big_cols)),
                       ("log_softmax", lambda: F.log_softmax(big_cols)),
                       ("cross_entropy", lambda: F.cross_entropy(big_cols, target)),
                       ("cross_entropy_backward", lambda: F.cross_entropy_backward(big_cols, target))):
        with pytest.raises(ValueError, match=rf"row length C = {TWO31} exceeds 2\^31 - 1"):
            call()
    assert pool.used_bytes() == before, "memory was allocated before the refusal"
    wide = 65535 * 128 + 1
    rng = np.random.default_rng(5)
    a, b = randn(rng, 2, 3), randn(rng, 3, wide)
    out = F.matmul(cp.asarray(a), cp.asarray(b))
    assert rel_err(out, a.astype(np.float64) @ b) < TOL
