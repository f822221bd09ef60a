"""MATH.md §6: the Jacobian of y = σ(Wx + b) with respect to W, its contraction
to an outer product, the Kronecker form, the worked example, and gradcheck itself."""

import numpy as np
import pytest

import cugrad
import cugrad.functional as F
from cugrad import GradcheckError, gradcheck, jacobian


def layer_output(x, b):
    """y(W) = σ(W x + b) for one sample, W (m, n) — through cugrad's own linear op."""
    return lambda w: F.sigmoid(F.linear(x[None, :], w, b))[0]


def test_dy_dw_is_the_m_m_n_tensor(rng):
    m, n = 3, 4
    w, x, b = rng.standard_normal((m, n)), rng.standard_normal(n), rng.standard_normal(m)
    jac = jacobian(layer_output(x, b), w)
    assert jac.shape == (m, m, n)
    z = w @ x + b
    s = 1 / (1 + np.exp(-z))
    expected = np.einsum("i,ij,k->ijk", s * (1 - s), np.eye(m), x)   # σ'(z_i) δ_ij x_k
    np.testing.assert_allclose(jac, expected, rtol=1e-7, atol=1e-10)
    off_diagonal = jac[~np.eye(m, dtype=bool)]
    assert np.all(off_diagonal == 0.0)          # y_i does not depend on row j ≠ i of W


def test_contraction_is_the_outer_product(rng):
    m, n = 3, 4
    w, x, b = rng.standard_normal((m, n)), rng.standard_normal(n), rng.standard_normal(m)
    upstream = rng.standard_normal(m)                      # ∂L/∂y
    jac = jacobian(layer_output(x, b), w)
    contracted = np.einsum("i,ijk->jk", upstream, jac)     # Σ_i ∂L/∂y_i ∂y_i/∂W_jk
    z = w @ x + b
    delta = upstream * (1 / (1 + np.exp(-z))) * (1 - 1 / (1 + np.exp(-z)))
    np.testing.assert_allclose(contracted, np.outer(delta, x), rtol=1e-7, atol=1e-10)
    # ... and cugrad's backward gives the same: dW = δᵀ x over a batch of one
    _, dw, _ = F.linear_backward(upstream[None, :], x[None, :], w, activation="sigmoid",
                                 out=F.linear(x[None, :], w, b, activation="sigmoid"))
    np.testing.assert_allclose(dw, np.outer(delta, x), rtol=1e-12)


def test_kronecker_form(rng):
    """vec(z) = (xᵀ ⊗ I_m) vec(W) with column-stacking vec, so ∂z/∂vec(W) = xᵀ ⊗ I_m."""
    m, n = 2, 3
    w, x = rng.standard_normal((m, n)), rng.standard_normal(n)
    jac = jacobian(lambda w: F.matmul(w, x[:, None])[:, 0], w)           # (m, m, n)
    dz_dvecw = jac.transpose(0, 2, 1).reshape(m, m * n)                  # columns k·m + j
    np.testing.assert_allclose(dz_dvecw, np.kron(x[None, :], np.eye(m)), atol=1e-9)
    # and ∂L/∂vec(W) un-vecs to (∂L/∂z) xᵀ
    dl_dz = rng.standard_normal(m)
    np.testing.assert_allclose((dl_dz @ dz_dvecw).reshape(n, m).T, np.outer(dl_dz, x),
                               atol=1e-9)


def test_worked_example_of_seed_004():
    """m = 2, n = 3, x = [1, 2, 3], z = [0.1, −1.0], ∂L/∂y = [1, 1]."""
    x = np.array([1.0, 2.0, 3.0])
    w = np.zeros((2, 3))
    b = np.array([0.1, -1.0])                     # z = W x + b = [0.1, −1.0]
    jac = jacobian(layer_output(x, b), w)
    collapsed = jac.sum(axis=0)
    expected = np.array([[0.249376, 0.498752, 0.748128],
                         [0.196612, 0.393224, 0.589836]])
    np.testing.assert_allclose(collapsed, expected, atol=5e-7)
    s = 1 / (1 + np.exp(-b))
    assert s[0] * (1 - s[0]) == pytest.approx(0.249376, abs=5e-7)
    assert s[1] * (1 - s[1]) == pytest.approx(0.196612, abs=5e-7)


def test_gradcheck_catches_a_wrong_backward(rng):
    x = rng.standard_normal((3, 4))
    assert gradcheck(F.tanh, x, backward=lambda g, x: F.tanh_backward(g, F.tanh(x)))
    with pytest.raises(GradcheckError, match=r"input 0, element \(\d+, \d+\): analytic"):
        # a classic slip: σ(Z)(1 − σ(Z)) applied to the output Z again
        gradcheck(F.sigmoid, x,
                  backward=lambda g, x: F.sigmoid_backward(g, F.sigmoid(F.sigmoid(x))))
    with pytest.raises(GradcheckError, match="shape"):
        gradcheck(F.tanh, x, backward=lambda g, x: g[:1])


def test_gradcheck_works_in_float64_from_float32_inputs(rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    assert cugrad.gradcheck(F.relu, x + np.sign(x) * 0.1,
                            backward=lambda g, x: F.relu_backward(g, x))


# ---------------------------- from a mutation probe of gradcheck.py (session 13)
# Each test below fails on a mutant that every other test let live.


def _identity(v):
    return v + 0.0          # a fresh array: v itself is perturbed in place


def test_jacobian_divides_by_the_step_float64_holds_not_2eps():
    """At 1e8 the float64 spacing is 1.5e-8, so x ± 1e-6 lie (2e-6 up to rounding) apart;
    the difference quotient of the identity is exactly 1 only over that distance."""
    jac = jacobian(_identity, np.array([1e8, -3e7]), eps=1e-6)
    assert jac.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_jacobian_refuses_an_eps_that_moves_only_one_side():
    """Just below 1.0 the float64 spacing is half that above it: eps=7e-17 moves 1.0 down
    but not up, which would be a one-sided difference."""
    with pytest.raises(ValueError, match=r"^jacobian: eps=7e-17 does not change input 0, "
                                         r"element \(1,\) \(value 1.0\) in float64"):
        jacobian(_identity, np.array([0.5, 1.0]), eps=7e-17)


def test_jacobian_refuses_eps_zero_by_name():
    with pytest.raises(ValueError, match=r"^jacobian: eps=0.0 is out of range; expected a "
                                         r"finite number > 0"):
        jacobian(_identity, np.array([1.0]), eps=0.0)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_jacobian_refuses_an_infinite_or_nan_point(bad):
    with pytest.raises(ValueError, match=r"^jacobian: input 0 holds NaN or infinity \(numpy."
                                         r"ndarray of shape \(2,\), dtype float64, on cpu\)"):
        jacobian(_identity, np.array([1.0, bad]))


def test_jacobian_of_an_empty_input_has_shape_out_plus_in():
    jac = jacobian(lambda v: np.ones(3), np.zeros((0, 2)))
    assert jac.shape == (3, 0, 2)


def test_jacobian_perturbs_a_copy_not_the_callers_array():
    """fn closing over the caller's array sees it unchanged: d(v + a)/dv is I, not 2I."""
    a = np.array([1.0, 2.0, 3.0])
    jac = jacobian(lambda v: v + a, a)
    np.testing.assert_allclose(jac, np.eye(3), rtol=1e-9, atol=0)
    assert a.tolist() == [1.0, 2.0, 3.0]


def test_gradcheck_passes_an_exact_match_with_zero_tolerances():
    """atol = rtol = 0 are allowed: a gradient equal to the numeric one passes."""
    assert gradcheck(_identity, np.array([0.75]), backward=lambda g, x: g,
                     grad_output=np.array([1.0]), atol=0.0, rtol=0.0) is True


def test_gradcheck_scales_rtol_by_the_numeric_gradient():
    """analytic 1.5 against numeric 1.0: |error| 0.5 > 0.4 * |numeric| (it would pass
    against 0.4 * |analytic| = 0.6)."""
    with pytest.raises(GradcheckError, match=r"^gradcheck: input 0, element \(0,\): analytic "
                                             r"1.5, numeric 1(\.0+)?\b"):
        gradcheck(_identity, np.array([0.25]), backward=lambda g, x: 1.5 * g,
                  grad_output=np.array([1.0]), atol=0.0, rtol=0.4)


def test_gradcheck_names_the_worst_element():
    x = np.array([0.1, 0.2, 0.3, 0.4])
    wrong = np.array([0.0, 1e-3, 0.5, 0.0])         # element 2 is the worst

    with pytest.raises(GradcheckError, match=r"^gradcheck: input 0, element \(2,\): analytic "
                                             r"1.5, numeric 1"):
        gradcheck(_identity, x, backward=lambda g, x: g + wrong, grad_output=np.ones(4))


def test_gradcheck_gives_backward_copies_a_nonlinear_fn_is_checked_at_the_point():
    """A backward that overwrites its input must not move the point the numeric gradient of a
    nonlinear fn is taken at."""
    def backward(g, x):
        grad = 2.0 * x * g
        x[...] = 100.0
        return grad

    x = np.array([0.3, -1.2, 2.0])
    assert gradcheck(lambda v: v * v, x, backward=backward) is True


def test_gradcheck_refuses_too_few_gradients():
    with pytest.raises(ValueError, match=r"^gradcheck: backward returned 1 gradients for 2 "
                                         r"inputs$"):
        gradcheck(lambda a, b: a * b, np.array([1.0, 2.0]), np.array([3.0, 4.0]),
                  backward=lambda g, a, b: (g * b,))


def test_gradcheck_refuses_a_gradient_of_another_shape_but_the_same_size():
    with pytest.raises(GradcheckError, match=r"^gradcheck: gradient 0 has shape \(1, 3\), "
                                             r"expected \(3,\) \(the input's shape\)$"):
        gradcheck(_identity, np.array([1.0, 2.0, 3.0]), backward=lambda g, x: g[None, :])


def test_gradcheck_refuses_a_grad_output_of_another_shape_but_the_same_size():
    with pytest.raises(ValueError, match=r"^gradcheck: grad_output has shape \(1, 3\), "
                                         r"expected \(3,\) \(the shape of fn's output\)$"):
        gradcheck(_identity, np.array([1.0, 2.0, 3.0]), backward=lambda g, x: g,
                  grad_output=np.ones((1, 3)))


@pytest.mark.parametrize("fn, got", [
    (lambda v: bool(v.sum() > 0), r"fn must return an array or a number, got "
                                  r"builtins.bool object"),
    (lambda v: v > 0, r"fn must return a real array, got numpy.ndarray of shape \(2,\), "
                      r"dtype bool, on cpu"),
], ids=["bool", "bool-array"])
def test_gradcheck_refuses_a_boolean_output(fn, got):
    with pytest.raises(TypeError, match="^gradcheck: " + got):
        gradcheck(fn, np.array([1.0, -2.0]), backward=lambda g, x: g)


@pytest.mark.parametrize("fn, want", [
    (lambda v: v, np.eye(2).reshape(2, 2)),                       # x itself
    (lambda v: v[::-1], np.eye(2)[::-1]),                         # a view of x
], ids=["identity", "reversed-view"])
def test_jacobian_of_a_function_returning_its_input_or_a_view_of_it(fn, want):
    """fn may hand back x itself or a view of it: each output is copied before x is moved
    again. Before, the two sides of the difference were one array and the Jacobian was 0."""
    np.testing.assert_array_equal(jacobian(fn, np.array([1.0, 2.0])), want)
    j = jacobian(lambda v: v.T, np.array([[1.0, 2.0, 3.0]]))       # (3, 1) of (1, 3)
    np.testing.assert_array_equal(j.reshape(3, 3), np.eye(3))


def test_fn_that_changes_its_input_in_place_is_checked_at_the_point():
    """fn got the very arrays the differences perturb: an in-place op in it (an optimiser
    step, F.accumulate) piled up across the evaluations; jacobian returned entries of 5e3
    for the identity, gradcheck blamed a correct backward (numeric -1.5e5)."""
    rng = np.random.default_rng(0)
    g = rng.standard_normal(3)

    def sgd(p):
        F.sgd_step(p, g, lr=0.1)
        return p
    np.testing.assert_allclose(cugrad.jacobian(sgd, rng.standard_normal(3)), np.eye(3),
                               atol=1e-8)

    def add(t, u):
        F.accumulate(t, u)
        return t
    t, u = rng.standard_normal(3), rng.standard_normal(3)
    t0 = t.copy()
    assert cugrad.gradcheck(add, t, u, backward=lambda go, t, u: (go, go))
    assert np.array_equal(t, t0)                       # the caller's input is never touched
