"""Every op of cugrad.functional against a float64 reference, on every backend that works.

References are written out here in float64 NumPy from MATH.md, independently of the
NumPy backend, on random data at shapes that are multiples of no tile size.
"""

import itertools

import numpy as np
import pytest

import cugrad.functional as F
from cugrad import gradcheck, nn
from conftest import (ODD, confident_rows, elementwise_rel_err, near_one_hot_rows, randn,
                      rel_err, row_rel_err, tol)

LAYOUTS = list(itertools.product([False, True], repeat=2))      # NN, NT, TN, TT
LAYOUT_IDS = ["NN", "NT", "TN", "TT"]
GEMM_SHAPES = [(1, 1, 1), (7, 33, 5), (33, 1, 127), (65, 17, 129), (127, 7, 1), (1, 300, 33)]


def sigmoid64(y):
    y = np.asarray(y, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -y))          # 1/(1+e^{-y}) without overflow


ACT64 = {None: lambda y: y, "sigmoid": sigmoid64, "tanh": np.tanh,
         "relu": lambda y: np.maximum(y, 0.0)}


def operands(rng, m, k, n, ta, tb, dtype):
    a = randn(rng, *((k, m) if ta else (m, k)), dtype=dtype)
    b = randn(rng, *((n, k) if tb else (k, n)), dtype=dtype)
    return a, b


def op64(x, t):
    x = np.asarray(x, dtype=np.float64)
    return x.T if t else x


# ----------------------------------------------------------------------------- products

@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("m,k,n", GEMM_SHAPES)
def test_matmul_layouts(backend, dtype, rng, m, k, n, ta, tb):
    a, b = operands(rng, m, k, n, ta, tb, dtype)
    out = F.matmul(backend.put(a), backend.put(b), trans_a=ta, trans_b=tb)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, op64(a, ta) @ op64(b, tb)) < tol(dtype)


@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (7, 33, 5), (65, 17, 129)])
def test_matmul_backward(backend, dtype, rng, m, k, n, ta, tb):
    a, b = operands(rng, m, k, n, ta, tb, dtype)
    g = randn(rng, m, n, dtype=dtype)
    ga, gb = F.matmul_backward(backend.put(g), backend.put(a), backend.put(b),
                               trans_a=ta, trans_b=tb)
    g64 = g.astype(np.float64)
    dopa = g64 @ op64(b, tb).T                   # d op(a)
    dopb = op64(a, ta).T @ g64                   # d op(b)
    assert ga.shape == a.shape and gb.shape == b.shape
    assert rel_err(ga, dopa.T if ta else dopa) < tol(dtype)
    assert rel_err(gb, dopb.T if tb else dopb) < tol(dtype)


@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=LAYOUT_IDS)
def test_matmul_gradcheck(backend, rng, ta, tb):
    a, b = operands(rng, 3, 4, 5, ta, tb, np.float64)
    gradcheck(lambda a, b: F.matmul(a, b, trans_a=ta, trans_b=tb),
              backend.put(a), backend.put(b),
              backward=lambda g, a, b: F.matmul_backward(g, a, b, trans_a=ta, trans_b=tb))


def test_matmul_reads_views_in_place(backend, rng):
    """Non-contiguous operands (slices, .T of a C array), made on the backend's own device,
    give the same product."""
    full, b_rows = randn(rng, 40, 66), randn(rng, 5, 33)
    a = backend.put(full)[:, ::2]            # (40, 33), strided
    b = backend.put(b_rows).T                # (33, 5), Fortran order
    assert not a.flags.c_contiguous and b.flags.f_contiguous and not b.flags.c_contiguous
    out = F.matmul(a, b)
    assert rel_err(out, full[:, ::2].astype(np.float64) @ b_rows.T) < 1e-4


@pytest.mark.parametrize("m,k,n", [(0, 5, 3), (4, 5, 0), (4, 0, 3)])
def test_matmul_empty_dimensions(backend, m, k, n):
    a = backend.put(np.ones((m, k), np.float32))
    b = backend.put(np.ones((k, n), np.float32))
    out = backend.get(F.matmul(a, b))
    assert out.shape == (m, n)
    assert np.array_equal(out, np.zeros((m, n), np.float32))     # K = 0: the empty sum


# --------------------------------------------------------------------------------- linear

@pytest.mark.parametrize("activation", [None, "sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,d_in,d_out", [(1, 1, 1), (7, 33, 5), (127, 65, 33)])
def test_linear(backend, dtype, rng, n, d_in, d_out, activation, with_bias):
    x, w, b = randn(rng, n, d_in, dtype=dtype), randn(rng, d_out, d_in, dtype=dtype), \
        randn(rng, d_out, dtype=dtype)
    out = F.linear(backend.put(x), backend.put(w), backend.put(b) if with_bias else None,
                   activation=activation)
    pre = x.astype(np.float64) @ w.astype(np.float64).T + (b if with_bias else 0.0)
    assert rel_err(out, ACT64[activation](pre)) < tol(dtype)


@pytest.mark.parametrize("activation", [None, "sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("n,d_in,d_out", [(1, 1, 1), (7, 33, 5), (127, 65, 33)])
def test_linear_backward(backend, dtype, rng, n, d_in, d_out, activation, with_bias):
    x, w, b = randn(rng, n, d_in, dtype=dtype), randn(rng, d_out, d_in, dtype=dtype), \
        randn(rng, d_out, dtype=dtype)
    gy = randn(rng, n, d_out, dtype=dtype)
    y = F.linear(backend.put(x), backend.put(w), backend.put(b) if with_bias else None,
                 activation=activation)
    gx, gw, gb = F.linear_backward(backend.put(gy), backend.put(x), backend.put(w),
                                   bias=with_bias, activation=activation,
                                   out=y if activation else None)
    # float64 reference of MATH.md §2–3
    pre = x.astype(np.float64) @ w.astype(np.float64).T + (b if with_bias else 0.0)
    z = ACT64[activation](pre)
    dpre = gy.astype(np.float64) * {None: 1.0, "sigmoid": z * (1 - z), "tanh": 1 - z * z,
                                    "relu": (pre > 0).astype(np.float64)}[activation]
    assert rel_err(gx, dpre @ w.astype(np.float64)) < tol(dtype)
    assert rel_err(gw, dpre.T @ x.astype(np.float64)) < tol(dtype)
    if with_bias:
        assert rel_err(gb, dpre.sum(axis=0)) < tol(dtype)
    else:
        assert gb is None


@pytest.mark.parametrize("activation", [None, "sigmoid", "tanh", "relu"])
def test_linear_gradcheck(backend, rng, activation):
    x, w, b = randn(rng, 4, 3, dtype=np.float64), randn(rng, 5, 3, dtype=np.float64), \
        randn(rng, 5, dtype=np.float64)
    if activation == "relu":     # keep pre-activations away from the kink at 0
        b += np.sign(b) * 0.5

    def backward(g, x, w, b):
        y = F.linear(x, w, b, activation=activation)
        return F.linear_backward(g, x, w, bias=True, activation=activation,
                                 out=y if activation else None)

    gradcheck(lambda x, w, b: F.linear(x, w, b, activation=activation),
              backend.put(x), backend.put(w), backend.put(b), backward=backward)


@pytest.mark.parametrize("m,n", [(1, 1), (300, 7), (1000, 33), (7, 1000), (129, 65)])
def test_bias_grad(backend, dtype, rng, m, n):
    g = randn(rng, m, n, dtype=dtype)
    out = F.bias_grad(backend.put(g))
    assert out.shape == (n,) and out.dtype == dtype
    assert rel_err(out, g.astype(np.float64).sum(axis=0)) < tol(dtype)


def test_bias_grad_of_a_tall_batch_keeps_the_bound(backend):
    """float32 column sums over 2^18 + 5 rows of same-sign data (1 + 0.01 U): NumPy's
    g.sum(axis=0) added one row after another (8.8e-4 off float64 here, MATH.md §7 allows
    1e-4); the NumPy backend now adds blocks of rows, as the kernel adds chunks. Also through
    linear_backward's bias gradient, alone and fused with relu's backward."""
    m, n = 2**18 + 5, 3
    g = (1 + 0.01 * np.random.default_rng(4).random((m, n))).astype(np.float32)
    want = g.astype(np.float64).sum(axis=0)
    assert rel_err(F.bias_grad(backend.put(g)), want) < tol(np.float32)
    x, w = np.ones((m, 1), np.float32), np.ones((n, 1), np.float32)
    for act, out in ((None, None), ("relu", np.ones((m, n), np.float32))):
        _, _, gb = F.linear_backward(backend.put(g), backend.put(x), backend.put(w), bias=True,
                                     activation=act, out=None if out is None else backend.put(out))
        assert rel_err(gb, want) < tol(np.float32), act


def test_row_ops_on_strided_rows_keep_the_bound(backend):
    """Logits whose rows are strided in memory (the rows of z.T, z of shape (C, N)), near
    uniform as at initialisation, so every term of a row's sum is close to 1: NumPy
    summed such a row one term after another (softmax 7.8e-5 off float64 at C = 65536, past
    1e-5; cross-entropy's loss 2.9e-4 at C = 2^20, past 1e-4), where a contiguous row is
    summed pairwise. The NumPy backend lays the rows out first, as the CUDA backend does."""
    c, n = 65536, 3
    rng = np.random.default_rng(5)
    z = (0.01 * rng.random((c, n))).astype(np.float32)     # near-uniform rows (at init)
    t = rng.random((c, n)).astype(np.float32)
    t /= t.sum(axis=0)                                       # probabilities: t.T
    z64, t64 = z.T.astype(np.float64), t.T.astype(np.float64)
    e = np.exp(z64 - z64.max(axis=1, keepdims=True))
    p64 = e / e.sum(axis=1, keepdims=True)
    lse = np.log(e.sum(axis=1)) + z64.max(axis=1)
    zt, tt = backend.put(z).T, backend.put(t).T
    assert rel_err(F.softmax(zt), p64) < tol(np.float32, "elementwise")
    assert rel_err(F.log_softmax(zt), np.log(p64)) < tol(np.float32, "elementwise")
    want_loss = float(np.mean(lse * t64.sum(axis=1) - (t64 * z64).sum(axis=1)))
    assert rel_err(F.cross_entropy(zt, tt), want_loss) < tol(np.float32)
    want_grad = (p64 * t64.sum(axis=1, keepdims=True) - t64) / n
    assert rel_err(F.cross_entropy_backward(zt, tt), want_grad) < tol(np.float32, "elementwise")


def test_a_vector_product_with_a_long_k_keeps_the_bound():
    """A (1, K) @ (K, 1) float32 product goes to BLAS's dot, one float32 sum per lane over
    the whole K: 1.5e-4 off float64 at K = 2^25 (MATH.md §7 allows 1e-4). The NumPy backend
    takes K in ranges of 2^17, as the CUDA GEMM does. NumPy only: the GPU's split is
    test_long_k_float32_products_stay_inside_the_bound."""
    k = 2**25 + 3
    rng = np.random.default_rng(6)
    a = rng.random((1, k), dtype=np.float32)
    b = rng.random((k, 1), dtype=np.float32)
    want = sum(float(a[0, i:i + 2**20].astype(np.float64) @ b[i:i + 2**20, 0].astype(np.float64))
               for i in range(0, k, 2**20))
    assert rel_err(F.matmul(a, b), [[want]]) < tol(np.float32)
    assert rel_err(F.linear(a, b.T), [[want]]) < tol(np.float32)


# -------------------------------------------------------------------------- activations

ACT_OPS = {"sigmoid": (F.sigmoid, F.sigmoid_backward), "tanh": (F.tanh, F.tanh_backward),
           "relu": (F.relu, F.relu_backward)}


@pytest.mark.parametrize("name", list(ACT_OPS))
@pytest.mark.parametrize("shape", [(1,), (7, 33), (127, 65), (3, 5, 7)])
def test_activation_forward_backward(backend, dtype, rng, name, shape):
    fwd, bwd = ACT_OPS[name]
    x = randn(rng, *shape, dtype=dtype, scale=3.0)
    g = randn(rng, *shape, dtype=dtype)
    z = fwd(backend.put(x))
    z64 = ACT64[name](x)
    assert z.shape == x.shape and z.dtype == dtype
    assert rel_err(z, z64) < tol(dtype, "elementwise")
    # f' from the SAVED output the op returned (MATH.md §3): near |z| = 1, 1 − z² amplifies
    # the rounding of z itself, which is no error of the backward.
    zs = backend.get(z).astype(np.float64)
    deriv = {"sigmoid": zs * (1 - zs), "tanh": 1 - zs * zs,
             "relu": (x > 0).astype(np.float64)}[name]
    saved = z if name != "relu" else backend.put(x)      # relu accepts the input too
    assert rel_err(bwd(backend.put(g), saved), g * deriv) < tol(dtype, "elementwise")
    if name == "relu":
        assert rel_err(bwd(backend.put(g), z), g * deriv) < tol(dtype, "elementwise")


def test_relu_backward_is_a_select_not_a_product(backend, dtype):
    """dZ where z > 0 else 0 (PyTorch's threshold_backward): an infinite or NaN dZ under the
    mask gives 0, not inf·0 = NaN; a NaN z gives 0; dZ passes unchanged where z > 0. Fails if
    a backend multiplies by the mask without care for non-finite values."""
    inf, nan = np.inf, np.nan
    z = np.array([[-1.0, 0.0, nan, 2.0, 3.0, 4.0, -5.0, 0.5]], dtype)
    g = np.array([[inf, nan, 7.0, inf, nan, -2.0, -inf, 1.5]], dtype)
    want = np.array([[0.0, 0.0, 0.0, inf, nan, -2.0, 0.0, 1.5]], dtype)
    out = backend.get(F.relu_backward(backend.put(g), backend.put(z)))
    assert np.array_equal(out, want, equal_nan=True), out
    finite = np.array([[1.0, -1.0, 0.0, nan]], dtype)       # fast path: finite product
    out = backend.get(F.relu_backward(backend.put(np.full_like(finite, 3.0)), backend.put(finite)))
    assert np.array_equal(out, np.array([[3.0, 0.0, 0.0, 0.0]], dtype)), out


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_linear_backward_relu_select_in_the_fused_pass(backend, dtype):
    """The fused activation backward + bias gradient keeps the select: a non-finite dY under
    the mask contributes 0 to dW and db (the NumPy backend finds such a column through its
    non-finite sum); a column whose finite terms overflow keeps its terms and sums to inf."""
    inf, nan, big = np.inf, np.nan, np.finfo(dtype).max
    out = np.array([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 1.0, 1.0]], dtype)   # saved relu output
    g = np.array([[inf, nan, 1.0, big], [2.0, -inf, 3.0, big]], dtype)
    x = np.array([[1.0, 2.0], [3.0, 4.0]], dtype)
    w = np.ones((4, 2), dtype)
    sel = np.where(out > 0, g, 0).astype(np.float64)    # [[0, nan, 1, 0], [2, 0, 3, big]]
    gx, gw, gb = (backend.get(a) for a in F.linear_backward(
        backend.put(g), backend.put(x), backend.put(w), activation="relu", out=backend.put(out)))
    assert np.array_equal(gb, sel.sum(axis=0).astype(dtype), equal_nan=True), gb
    assert np.array_equal(gw, (sel.T @ x).astype(dtype), equal_nan=True), gw
    g2 = np.array([[big, 1.0, 1.0, 1.0], [big, 1.0, 1.0, 1.0]], dtype)
    ones = np.ones((2, 4), dtype)
    gx, gw, gb = (backend.get(a) for a in F.linear_backward(
        backend.put(g2), backend.put(x), backend.put(w), activation="relu",
        out=backend.put(ones)))
    assert np.array_equal(gb, np.array([inf, 2.0, 2.0, 2.0], dtype)), gb
    assert np.isinf(gw[0]).all() and np.array_equal(gw[1:], np.tile([4.0, 6.0], (3, 1))), gw


@pytest.mark.parametrize("name", list(ACT_OPS))
def test_activation_gradcheck(backend, rng, name):
    fwd, bwd = ACT_OPS[name]
    x = randn(rng, 3, 4, dtype=np.float64, scale=2.0)
    x[np.abs(x) < 0.1] = 0.5          # relu: stay away from the kink
    gradcheck(fwd, backend.put(x), backward=lambda g, x: bwd(g, fwd(x)))


def test_sigmoid_and_softmax_do_not_overflow(backend, dtype):
    x = np.array([[1e4, -1e4, 0.0, 88.8, -88.8, 1e-4]], dtype=dtype)
    s = backend.get(F.sigmoid(backend.put(x)))
    assert np.all(np.isfinite(s))
    assert rel_err(s, sigmoid64(x)) < tol(dtype, "elementwise")
    for op, ref in ((F.softmax, lambda v: np.exp(v - v.max()) / np.exp(v - v.max()).sum()),
                    (F.log_softmax, lambda v: v - v.max() - np.log(np.exp(v - v.max()).sum()))):
        out = backend.get(op(backend.put(x)))
        assert np.all(np.isfinite(out)), op.__name__
        assert rel_err(out, ref(x.astype(np.float64))) < tol(dtype, "elementwise")


def test_a_nan_row_leaves_a_tied_row_of_the_batch_alone(backend, dtype):
    """Rows are independent: a NaN row (no term equal to 1) beside a row with a tied max (two
    terms equal to 1) must not cancel that row's tie correction (a batch-wide count of ones
    would: softmax [0.95, 0.95, 0.05] for [3, 3, 0])."""
    x = np.array([[np.nan, 1, 2], [3, 3, 0], [0.5, -1, 2]], dtype)
    x64 = x[1:].astype(np.float64)
    e = np.exp(x64 - x64.max(axis=1, keepdims=True))
    sm = e / e.sum(axis=1, keepdims=True)
    t = np.array([0, 2, 1])
    onehot = np.eye(3)[t[1:]]
    with np.errstate(invalid="ignore"):
        got_sm = backend.get(F.softmax(backend.put(x)))
        got_lsm = backend.get(F.log_softmax(backend.put(x)))
        got_g = backend.get(F.cross_entropy_backward(backend.put(x), backend.put(t),
                                                     reduction="sum"))
    assert np.isnan(got_sm[0]).all() and np.isnan(got_g[0]).all()
    assert rel_err(got_sm[1:], sm) < tol(dtype, "elementwise")
    assert rel_err(got_lsm[1:], np.log(sm)) < tol(dtype, "elementwise")
    assert rel_err(got_g[1:], sm - onehot) < tol(dtype, "elementwise")


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (33, 1000), (5,), (2, 3, 7)])
def test_softmax_log_softmax(backend, dtype, rng, shape):
    x = randn(rng, *shape, dtype=dtype, scale=4.0)
    x64 = x.astype(np.float64)
    lse = np.log(np.exp(x64 - x64.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        + x64.max(-1, keepdims=True)
    assert rel_err(F.softmax(backend.put(x)), np.exp(x64 - lse)) < tol(dtype, "elementwise")
    assert rel_err(F.log_softmax(backend.put(x)), x64 - lse) < tol(dtype, "elementwise")


# ------------------------------------------------------------------------------- losses

MSE_REF = {"mean": lambda d: ((d * d).sum() / d.size, 2 * d / d.size),
           "sum": lambda d: ((d * d).sum(), 2 * d),
           "half_sum": lambda d: ((d * d).sum() / 2, d)}


@pytest.mark.parametrize("reduction", list(MSE_REF))
@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (1000, 3), (17,)])
def test_mse_loss(backend, dtype, rng, reduction, shape):
    p, t = randn(rng, *shape, dtype=dtype), randn(rng, *shape, dtype=dtype)
    loss = F.mse_loss(backend.put(p), backend.put(t), reduction=reduction)
    grad = F.mse_loss_backward(backend.put(p), backend.put(t), reduction=reduction)
    ref_loss, ref_grad = MSE_REF[reduction](p.astype(np.float64) - t)
    assert loss.shape == () and loss.dtype == dtype
    assert rel_err(loss, ref_loss) < tol(dtype)
    assert rel_err(grad, ref_grad) < tol(dtype, "elementwise")


@pytest.mark.parametrize("reduction", list(MSE_REF))
@pytest.mark.parametrize("shape", [(1,), (7, 33), (300, 70), (2, 3, 5)],
                         ids=lambda s: "x".join(map(str, s)))
def test_mse_loss_with_grad_is_the_two_ops_bit_for_bit(backend, dtype, rng, reduction, shape):
    """One pass (one kernel and the partial sums' pass on the GPU; (300, 70) has more than
    one block), the same bits as mse_loss and mse_loss_backward, pred's shape kept; the
    same checks, naming itself."""
    p, t = randn(rng, *shape, dtype=dtype), randn(rng, *shape, dtype=dtype)
    pp, tt = backend.put(p), backend.put(t)
    loss, grad = F.mse_loss_with_grad(pp, tt, reduction=reduction)
    assert loss.shape == () and grad.shape == p.shape and grad.dtype == dtype
    np.testing.assert_array_equal(backend.get(loss),
                                  backend.get(F.mse_loss(pp, tt, reduction=reduction)))
    np.testing.assert_array_equal(backend.get(grad),
                                  backend.get(F.mse_loss_backward(pp, tt, reduction=reduction)))
    with pytest.raises(ValueError, match="mse_loss_with_grad: argument 'target'"):
        F.mse_loss_with_grad(pp, backend.put(np.zeros((4,), dtype)), reduction=reduction)
    with pytest.raises(ValueError, match="mse_loss_with_grad.*reduction"):
        F.mse_loss_with_grad(pp, tt, reduction="max")


def test_mse_layer_takes_its_gradient_from_the_forward_pass(backend, rng):
    """MSELoss's forward computes the gradient too (as CrossEntropyLoss does): changing pred
    in place after the forward does not change what backward returns."""
    p, t = randn(rng, 6, 4), randn(rng, 6, 4)
    crit = nn.MSELoss(reduction="sum")
    pp = backend.put(p.copy())
    loss = crit(pp, backend.put(t))
    pp *= 0
    np.testing.assert_allclose(backend.get(crit.backward()), 2 * (p - t), rtol=1e-6)
    assert float(loss) == pytest.approx(float(((p.astype(np.float64) - t) ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("reduction", list(MSE_REF))
def test_mse_gradcheck(backend, rng, reduction):
    p, t = randn(rng, 3, 5, dtype=np.float64), randn(rng, 3, 5, dtype=np.float64)
    tt = backend.put(t)
    gradcheck(lambda p: F.mse_loss(p, tt, reduction=reduction), backend.put(p),
              backward=lambda g, p: g * F.mse_loss_backward(p, tt, reduction=reduction))


def xent_ref(z, t, reduction):
    # In long double (x86: 64-bit significand): softmax − 1 at a confident target cancels
    # (p = 0.99996 leaves 1e-16 / 4e-5 = 3e-12 relative in float64, past the 1e-12 bound,
    # where the ops form −(s − 1)/s exactly). Results in float64.
    z = z.astype(np.longdouble)
    n, c = z.shape
    m = z.max(axis=1, keepdims=True)
    lse = (np.log(np.exp(z - m).sum(axis=1, keepdims=True)) + m)[:, 0]
    tp = (np.eye(c)[t] if t.ndim == 1 else t).astype(np.longdouble)
    rows = lse * tp.sum(axis=1) - (tp * z).sum(axis=1)
    soft = np.exp(z - lse[:, None])
    grad = soft * tp.sum(axis=1, keepdims=True) - tp
    scale = 1.0 / n if reduction == "mean" else 1.0
    return float(rows.sum() * scale), (grad * scale).astype(np.float64)


def xent_targets(rng, n, c, kind, dtype):
    if kind == "index":
        return rng.integers(0, c, size=n)
    p = rng.random((n, c)) + 0.01
    return (p / p.sum(axis=1, keepdims=True)).astype(dtype)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,c", [(1, 1), (7, 1000), (33, 10), (127, 3), (1, 1000)])
def test_cross_entropy(backend, dtype, rng, n, c, reduction, kind):
    z = randn(rng, n, c, dtype=dtype, scale=3.0)
    t = xent_targets(rng, n, c, kind, dtype)
    ref_loss, ref_grad = xent_ref(z, t, reduction)
    zz, tt = backend.put(z), backend.put(t)
    loss = F.cross_entropy(zz, tt, reduction=reduction)
    grad = F.cross_entropy_backward(zz, tt, reduction=reduction)
    loss2, grad2 = F.cross_entropy_with_grad(zz, tt, reduction=reduction)
    assert loss.shape == () and loss.dtype == dtype and grad.dtype == dtype
    # a single class has loss exactly 0: compare absolutely there
    assert abs(float(loss) - ref_loss) <= tol(dtype) * max(1.0, abs(ref_loss))
    assert rel_err(grad, ref_grad) < tol(dtype, "elementwise")
    assert float(loss2) == float(loss)
    assert np.array_equal(backend.get(grad2), backend.get(grad))


def test_cross_entropy_large_logits(backend, dtype):
    z = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4 + 1, 3.0]], dtype=dtype)
    t = np.array([1, 0])
    loss, grad = F.cross_entropy_with_grad(backend.put(z), backend.put(t), reduction="sum")
    ref_loss, ref_grad = xent_ref(z, t, "sum")
    assert np.isfinite(float(loss)) and np.all(np.isfinite(backend.get(grad)))
    assert rel_err(loss, ref_loss) < tol(dtype, "elementwise")
    assert rel_err(grad, ref_grad) < tol(dtype, "elementwise")


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_gradcheck(backend, rng, kind, reduction):
    z = randn(rng, 4, 5, dtype=np.float64)
    # probability rows that do not sum to 1: the gradient is softmax·Σt − t
    t = rng.integers(0, 5, size=4) if kind == "index" else rng.random((4, 5))
    tt = backend.put(t)
    gradcheck(lambda z: F.cross_entropy(z, tt, reduction=reduction), backend.put(z),
              backward=lambda g, z: g * F.cross_entropy_backward(z, tt, reduction=reduction))


def test_integer_target_dtypes(backend, rng):
    z = randn(rng, 5, 4)
    for int_dtype in (np.int32, np.int64, np.uint8):
        t = rng.integers(0, 4, size=5).astype(int_dtype)
        ref, _ = xent_ref(z, t.astype(np.int64), "mean")
        assert rel_err(F.cross_entropy(backend.put(z), backend.put(t)), ref) < 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("c", [1, 3, 37, 1000])
def test_confident_rows_keep_their_small_loss(backend, dtype, c, reduction):
    """A nearly one-hot softmax: loss ~ s - 1 (4e-9 in float32) and the target's gradient
    -(s - 1)/s, where ln s and softmax - 1 round to 0. Every element to its own relative
    tolerance (a normwise error would let the tiny entries go), for class indices and the
    same targets as probability rows."""
    x, t, ref = confident_rows(dtype, c)
    n = len(t)
    scale = 1.0 / n if reduction == "mean" else 1.0
    ref_loss = ref["loss_rows"].sum() * scale
    xx = backend.put(x)
    tol_e = tol(dtype, "elementwise")
    for targets in (t, np.eye(c, dtype=dtype)[t]):
        tt = backend.put(targets)
        loss, grad = F.cross_entropy_with_grad(xx, tt, reduction=reduction)
        if c == 1:   # one class: loss and gradient exactly 0
            assert float(loss) == 0 and not np.any(backend.get(grad))
            continue
        assert abs(float(loss) - ref_loss) <= tol_e * ref_loss, (float(loss), ref_loss)
        assert float(F.cross_entropy(xx, tt, reduction=reduction)) == float(loss)
        assert elementwise_rel_err(backend.get(grad), ref["grad"] * scale) <= tol_e
        assert np.array_equal(backend.get(F.cross_entropy_backward(xx, tt, reduction=reduction)),
                              backend.get(grad))
    if c > 1:
        assert elementwise_rel_err(backend.get(F.softmax(xx)), ref["softmax"]) <= tol_e
        assert elementwise_rel_err(backend.get(F.log_softmax(xx)), ref["log_softmax"]) <= tol_e


@pytest.mark.parametrize("c", [2, 3, 40, 1000])
def test_near_one_hot_probability_rows_keep_their_gradient(backend, dtype, c):
    """Label smoothing on a confident row (t = 1 - eps at the max): the gradient there is
    about eps, and forming it from a rounded Σt cost 2-8 % in float32 (eps = 1e-6) and up
    to 1e-2 in float64 (eps = 1e-14), on both backends. MATH.md §7's bound for every row now, eps from
    the smallest to a usual label-smoothing size."""
    for eps in ((1e-6, 1e-3) if dtype == np.float32 else (1e-14, 1e-9)):
        x, t, grad_ref = near_one_hot_rows(dtype, c, eps)
        xx, tt = backend.put(x), backend.put(t)
        _, grad = F.cross_entropy_with_grad(xx, tt, reduction="sum")
        assert row_rel_err(backend.get(grad), grad_ref) <= tol(dtype, "elementwise"), eps
        assert np.array_equal(backend.get(F.cross_entropy_backward(xx, tt, reduction="sum")),
                              backend.get(grad))


def test_mse_loss_sum_of_many_float32_terms_stays_accurate():
    """The NumPy backend sums the squares pairwise (a BLAS float32 dot accumulated in float32:
    6e-6 relative error at 4e6 elements, 2e-4 at 5e7, past MATH.md's 1e-4 for loss values);
    pairwise stays near 1e-7 here."""
    p = np.random.default_rng(13).random(4 * 10**6, dtype=np.float32)
    ref = float((p.astype(np.float64) ** 2).sum())
    got = float(F.mse_loss(p, np.zeros_like(p), reduction="sum"))
    assert abs(got - ref) / ref < 5e-7
