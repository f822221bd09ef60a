"""Property tests (hypothesis): random shapes, layouts, activations, reductions and dtypes
against float64 references, on every backend that works.

Profiles: "ci" (default; the whole module in about a minute or two on 2 cores) and
"thorough" (CUGRAD_HYPOTHESIS_PROFILE=thorough, for a GPU session: thousands of examples).
"""

import contextlib
import os
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cugrad.functional as F
from cugrad._arrays import to_numpy
from conftest import rel_err, tol
from test_functional import ACT64, MSE_REF, op64, xent_ref
from test_optim import adam_reference, sgd_reference

settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                 HealthCheck.too_slow])
settings.load_profile(os.environ.get("CUGRAD_HYPOTHESIS_PROFILE", "ci"))

# Primes and sizes on either side of every power-of-two tile are favoured.
FAVOURED = [1, 2, 3, 5, 7, 13, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257]
dims = st.one_of(st.sampled_from(FAVOURED), st.integers(1, 300))
dtypes = st.sampled_from([np.float32, np.float64])
seeds = st.integers(0, 2 ** 32 - 1)


def data(seed, *shape, dtype):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# The GEMM's tile and K split depend on the SM count (config.gemm_plan): at 132 SMs, shapes
# up to 300 never fill the grid with the 128x128 tile, so its plans are drawn too.
sm_counts = st.sampled_from([None, 1, 2, 3, 9])


def sm_count(backend, sms):
    """On the CUDA backend, plans made for a GPU of ``sms`` SMs (None: the device's own)."""
    if backend.name != "cuda" or sms is None:
        return contextlib.nullcontext()
    from cugrad.backends.cuda.context import current_context
    return mock.patch.object(type(current_context()), "sm_count", sms)


def product_err(out, a, b) -> float:
    """‖out − AB‖ / ‖|A||B|‖: the standard bound of a float product, which is MATH.md §7's
    ‖out − ref‖ / ‖ref‖ where no terms cancel and stays fair where they do (dW of one
    column whose 144 products sum to 1/63,000 of their magnitudes: float32's rounding of
    the inputs alone is then 6e-4 of the result)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    out = np.asarray(to_numpy(out), np.float64)
    scale = np.linalg.norm(np.abs(a) @ np.abs(b))
    diff = np.linalg.norm(out - a @ b)
    return float(diff / scale) if scale > 0 else float(diff)


def update_err(out, ref, p0, lr, grads) -> float:
    """An in-place update's error against the size of its terms, ‖p0‖ + lr Σ‖g‖: a result
    that cancels (p0 − g1 − g2 − g3 = −1e-3 from terms of 1) carries an ulp of the terms."""
    scale = np.linalg.norm(p0.astype(np.float64)) + lr * sum(
        np.linalg.norm(g.astype(np.float64)) for g in grads)
    diff = np.linalg.norm(np.asarray(to_numpy(out), np.float64) - ref)
    return float(diff / max(scale, np.linalg.norm(ref)))


@given(m=dims, k=dims, n=dims, ta=st.booleans(), tb=st.booleans(), dtype=dtypes, seed=seeds,
       sms=sm_counts)
def test_matmul_property(backend, m, k, n, ta, tb, dtype, seed, sms):
    a = data(seed, *((k, m) if ta else (m, k)), dtype=dtype)
    b = data(seed + 1, *((n, k) if tb else (k, n)), dtype=dtype)
    with sm_count(backend, sms):
        out = F.matmul(backend.put(a), backend.put(b), trans_a=ta, trans_b=tb)
    assert rel_err(out, op64(a, ta) @ op64(b, tb)) < tol(dtype)


@given(n=dims, d_in=dims, d_out=dims, act=st.sampled_from([None, "sigmoid", "tanh", "relu"]),
       with_bias=st.booleans(), dtype=dtypes, seed=seeds, sms=sm_counts)
def test_linear_forward_backward_property(backend, n, d_in, d_out, act, with_bias, dtype, seed,
                                          sms):
    x, w = data(seed, n, d_in, dtype=dtype), data(seed + 1, d_out, d_in, dtype=dtype)
    b = data(seed + 2, d_out, dtype=dtype)
    gy = data(seed + 3, n, d_out, dtype=dtype)
    with sm_count(backend, sms):
        y = F.linear(backend.put(x), backend.put(w), backend.put(b) if with_bias else None,
                     activation=act)
    pre = x.astype(np.float64) @ w.astype(np.float64).T + (b if with_bias else 0.0)
    z = ACT64[act](pre)
    assert rel_err(y, z) < tol(dtype)
    with sm_count(backend, sms):
        gx, gw, gb = F.linear_backward(backend.put(gy), backend.put(x), backend.put(w),
                                       bias=with_bias, activation=act, out=y if act else None)
    # The backward's contract is f' from the SAVED output (MATH.md §3): near saturation
    # 1 − z² cancels, so the reference takes f' from the output the op returned.
    zs = backend.get(y).astype(np.float64)
    dpre = gy * {None: 1.0, "sigmoid": zs * (1 - zs), "tanh": (1 - zs) * (1 + zs),
                 "relu": (zs > 0).astype(np.float64)}[act]
    assert product_err(gx, dpre, w) < tol(dtype)
    assert product_err(gw, dpre.T, x) < tol(dtype)
    if with_bias:
        assert product_err(gb[None, :], np.ones((1, n)), dpre) < tol(dtype)


@given(m=dims, n=dims, dtype=dtypes, seed=seeds)
def test_bias_grad_property(backend, m, n, dtype, seed):
    g = data(seed, m, n, dtype=dtype)
    assert rel_err(F.bias_grad(backend.put(g)), g.astype(np.float64).sum(axis=0)) < tol(dtype)


@given(m=dims, n=dims, dtype=dtypes, seed=seeds, scale=st.sampled_from([1.0, 30.0, 1e4]))
def test_softmax_property(backend, m, n, dtype, seed, scale):
    x = data(seed, m, n, dtype=dtype) * dtype(scale)
    x64 = x.astype(np.float64)
    mx = x64.max(axis=1, keepdims=True)
    lse = np.log(np.exp(x64 - mx).sum(axis=1, keepdims=True)) + mx
    assert rel_err(F.softmax(backend.put(x)), np.exp(x64 - lse)) < tol(dtype, "elementwise")
    assert rel_err(F.log_softmax(backend.put(x)), x64 - lse) < tol(dtype, "elementwise")


@given(m=dims, n=dims, reduction=st.sampled_from(list(MSE_REF)), dtype=dtypes, seed=seeds)
def test_mse_property(backend, m, n, reduction, dtype, seed):
    p, t = data(seed, m, n, dtype=dtype), data(seed + 1, m, n, dtype=dtype)
    ref_loss, ref_grad = MSE_REF[reduction](p.astype(np.float64) - t)
    assert rel_err(F.mse_loss(backend.put(p), backend.put(t), reduction=reduction),
                   ref_loss) < tol(dtype)
    assert rel_err(F.mse_loss_backward(backend.put(p), backend.put(t), reduction=reduction),
                   ref_grad) < tol(dtype, "elementwise")


@given(n=dims, c=st.one_of(st.sampled_from([1, 2, 10, 1000]), dims),
       reduction=st.sampled_from(["mean", "sum"]), kind=st.sampled_from(["index", "prob"]),
       dtype=dtypes, seed=seeds)
def test_cross_entropy_property(backend, n, c, reduction, kind, dtype, seed):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((n, c)) * 3).astype(dtype)
    if kind == "index":
        t = rng.integers(0, c, size=n)
    else:
        t = rng.random((n, c)).astype(dtype) + dtype(0.01)
        t /= t.sum(axis=1, keepdims=True)
    ref_loss, ref_grad = xent_ref(z, t, reduction)
    loss, grad = F.cross_entropy_with_grad(backend.put(z), backend.put(t), reduction=reduction)
    assert abs(float(loss) - ref_loss) <= tol(dtype) * max(1.0, abs(ref_loss))
    assert rel_err(grad, ref_grad) < tol(dtype, "elementwise")


@given(shape=st.tuples(dims, dims), name=st.sampled_from(["sigmoid", "tanh", "relu"]),
       dtype=dtypes, seed=seeds)
def test_activation_property(backend, shape, name, dtype, seed):
    x = data(seed, *shape, dtype=dtype) * dtype(4)
    g = data(seed + 1, *shape, dtype=dtype)
    fwd = getattr(F, name)
    bwd = getattr(F, f"{name}_backward")
    z = fwd(backend.put(x))
    z64 = ACT64[name](x)
    assert rel_err(z, z64) < tol(dtype, "elementwise")
    zs = backend.get(z).astype(np.float64)        # f' from the saved output (MATH.md §3)
    deriv = {"sigmoid": zs * (1 - zs), "tanh": (1 - zs) * (1 + zs),   # 1 − z² cancels
             "relu": (x > 0).astype(np.float64)}[name]
    assert rel_err(bwd(backend.put(g), z), g * deriv) < tol(dtype, "elementwise")


# In-place updates: random sizes (1-D and 2-D, so elementwise grid-stride loops see every
# tail), hyperparameters drawn from their valid ranges, three steps against float64.
shapes = st.one_of(st.tuples(dims), st.tuples(dims, dims))


@given(shape=shapes, dtype=dtypes, seed=seeds)
def test_accumulate_property(backend, shape, dtype, seed):
    total = data(seed, *shape, dtype=dtype)
    grads = [data(seed + i, *shape, dtype=dtype) for i in (1, 2, 3)]
    t = backend.put(total.copy())
    expected = total.copy()
    for g in grads:
        F.accumulate(t, backend.put(g))
        expected = expected + g          # one rounding per element, in the array dtype
    assert np.array_equal(backend.get(t), expected)


@given(shape=shapes, dtype=dtypes, seed=seeds, lr=st.floats(1e-4, 1.0),
       momentum=st.sampled_from([0.0, 0.5, 0.9]), wd=st.sampled_from([0.0, 1e-4, 0.1]))
def test_sgd_step_property(backend, shape, dtype, seed, lr, momentum, wd):
    p0 = data(seed, *shape, dtype=dtype)
    grads = [data(seed + i, *shape, dtype=dtype) for i in (1, 2, 3)]
    p, buf = backend.put(p0.copy()), backend.put(np.zeros(shape, dtype)) if momentum else None
    for g in grads:
        F.sgd_step(p, backend.put(g), buf, lr=lr, momentum=momentum, weight_decay=wd)
    ref = sgd_reference(p0, grads, lr, momentum, wd)
    assert update_err(p, ref, p0, lr, grads) < tol(dtype, "elementwise")


@given(shape=shapes, dtype=dtypes, seed=seeds, lr=st.floats(1e-4, 0.1),
       b1=st.sampled_from([0.0, 0.8, 0.9]), b2=st.sampled_from([0.9, 0.99, 0.999]),
       wd=st.sampled_from([0.0, 0.05]))
def test_adam_step_property(backend, shape, dtype, seed, lr, b1, b2, wd):
    p0 = data(seed, *shape, dtype=dtype)
    grads = [data(seed + i, *shape, dtype=dtype) for i in (1, 2, 3)]
    p = backend.put(p0.copy())
    m, v = (backend.put(np.zeros(shape, dtype)) for _ in range(2))
    for step, g in enumerate(grads, start=1):
        F.adam_step(p, backend.put(g), m, v, step=step, lr=lr, beta1=b1, beta2=b2, eps=1e-8,
                    weight_decay=wd)
    ref = adam_reference(p0, grads, lr, b1, b2, 1e-8, wd)
    # Adam's step is about lr per element whatever g is: the terms are p0 and 3 lr
    assert update_err(p, ref, p0, lr, [np.ones_like(p0)] * 3) < tol(dtype, "elementwise")
