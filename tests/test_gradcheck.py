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
