"""Bad input gets a clear ValueError/TypeError naming the argument, what it got and what
was expected — never a crash inside a kernel, never a silently wrong answer."""

import numpy as np
import pytest

import cugrad.functional as F
from cugrad import nn

f32 = np.float32


def a(*shape, dtype=f32):
    return np.ones(shape, dtype=dtype)


def _overlapping_accumulate():
    buf = a(8)
    F.accumulate(buf[:6], buf[2:])


CASES = [
    # (call, exception, pieces the message must contain)
    (lambda: F.matmul(a(3, 4), a(5, 2)), ValueError, ["inner dimensions", "(3, 4)", "(5, 2)"]),
    (lambda: F.matmul(a(3, 4), a(5, 4), trans_b=False), ValueError, ["b", "4 rows"]),
    (lambda: F.matmul(a(3, 4), a(4, 2, dtype=np.float64)), TypeError, ["'b'", "float64", "float32"]),
    (lambda: F.matmul(a(3, 4, dtype=np.int32), a(4, 2)), TypeError, ["'a'", "int32", "float32 or float64"]),
    (lambda: F.matmul(a(3, 4, dtype=np.float16), a(4, 2)), TypeError, ["'a'", "float16"]),
    (lambda: F.matmul(a(4), a(4, 2)), ValueError, ["'a'", "2-D", "(4,)"]),
    (lambda: F.matmul(a(2, 3, 4), a(4, 2)), ValueError, ["'a'", "2-D", "(2, 3, 4)"]),
    (lambda: F.matmul(a(3, 4), [[1.0]] * 4), TypeError, ["'b'", "NumPy or CuPy array", "list"]),
    (lambda: F.matmul(a(3, 4), a(4, 2), trans_a="yes"), TypeError, ["trans_a", "bool"]),
    (lambda: F.linear(a(3, 4), a(5, 3)), ValueError, ["x has 4 features", "(out_features, in_features)"]),
    (lambda: F.linear(a(3, 4), a(5, 4), a(4)), ValueError, ["'bias'", "(4,)", "(5,)"]),
    (lambda: F.linear(a(3, 4), a(5, 4), activation="gelu"), ValueError, ["activation='gelu'", "'relu'"]),
    (lambda: F.linear(a(4), a(5, 4)), ValueError, ["'x'", "2-D", "(batch, in_features)"]),
    (lambda: F.linear_backward(a(3, 5), a(3, 4), a(5, 4), activation="relu"), ValueError, ["out="]),
    (lambda: F.linear_backward(a(3, 6), a(3, 4), a(5, 4)), ValueError, ["'grad_y'", "(3, 6)", "(3, 5)"]),
    (lambda: F.linear_backward(a(3, 5), a(3, 4), a(5, 4), activation="tanh", out=a(3, 4)), ValueError, ["'out'", "(3, 4)"]),
    (lambda: F.matmul_backward(a(3, 3), a(3, 4), a(4, 2)), ValueError, ["'grad_c'", "(3, 3)", "(3, 2)"]),
    (lambda: F.bias_grad(a(5)), ValueError, ["'grad_y'", "2-D"]),
    (lambda: F.sigmoid_backward(a(3, 4), a(4, 3)), ValueError, ["'out'", "(4, 3)", "(3, 4)"]),
    (lambda: F.relu(a(3, dtype=np.int64)), TypeError, ["'x'", "int64"]),
    (lambda: F.softmax(np.ones((), f32)), ValueError, ["'x'", "at least 1"]),
    (lambda: F.mse_loss(a(3, 4), a(4, 3)), ValueError, ["'target'", "(4, 3)", "(3, 4)"]),
    (lambda: F.mse_loss(a(3, 4), a(3, 4), reduction="avg"), ValueError, ["reduction='avg'", "'half_sum'"]),
    (lambda: F.mse_loss(a(3), np.array([1.0, np.nan, 2.0], f32)), ValueError, ["'target'", "NaN"]),
    (lambda: F.mse_loss(a(0, 3), a(0, 3)), ValueError, ["empty"]),
    (lambda: F.cross_entropy(a(3, 4), np.array([0, 4, 1])), ValueError, ["class index 4", "[0, 3]"]),
    (lambda: F.cross_entropy(a(3, 4), np.array([0, -1, 1])), ValueError, ["class index -1"]),
    (lambda: F.cross_entropy(a(3, 4), np.array([0, 1])), ValueError, ["'target'", "(2,)", "(3,)"]),
    (lambda: F.cross_entropy(a(3, 4), np.array([0.0, 1.0, 2.0], f32)), TypeError, ["integer", "float32"]),
    (lambda: F.cross_entropy(a(3, 4), a(3, 5)), ValueError, ["'target'", "(3, 5)", "(3, 4)"]),
    (lambda: F.cross_entropy(a(3, 4), np.full((3, 4), np.nan, f32)), ValueError, ["'target'", "NaN"]),
    (lambda: F.cross_entropy(a(3, 4), a(3, 4, 1)), ValueError, ["target", "(3, 4, 1)"]),
    (lambda: F.cross_entropy(a(4), np.array([0])), ValueError, ["'logits'", "2-D"]),
    (lambda: F.cross_entropy(a(3, 4), np.array([0, 1, 2]), reduction="half_sum"), ValueError, ["reduction"]),
    (lambda: F.sgd_step(a(3), a(3), lr=float("nan")), ValueError, ["lr=nan"]),
    (lambda: F.sgd_step(a(3), a(3), lr=-0.1), ValueError, ["lr=-0.1"]),
    (lambda: F.adam_step(a(3), a(3), a(3), a(3), step=1, lr=0.1, beta1=1.5), ValueError, ["beta1=1.5"]),
    (lambda: F.adam_step(a(3), a(3), a(3), a(3), step=1, lr=0.1, beta2=-0.5), ValueError, ["beta2=-0.5"]),
    (lambda: F.accumulate(a(3, 4), a(1, 4)), ValueError, ["accumulate", "'grad'", "(1, 4)", "shape of total", "(3, 4)"]),
    (lambda: F.accumulate(a(3, 4), a(3, 4, dtype=np.float64)), TypeError, ["'grad'", "float64", "float32"]),
    (lambda: F.accumulate(a(4, 3).T, a(3, 4)), ValueError, ["'total'", "C-contiguous"]),
    (lambda: _overlapping_accumulate(), ValueError, ["'total'", "'grad'", "share memory"]),
    (lambda: nn.Parameter(a(3, 4)).accumulate(a(4)), ValueError, ["Parameter.accumulate", "'grad'", "(4,)", "(3, 4)"]),
    (lambda: nn.Parameter(a(3, 4)).accumulate(a(3, 4, dtype=np.float64)), TypeError, ["Parameter.accumulate", "float64"]),
    (lambda: nn.Parameter(a(3, 4)).accumulate([[0.0] * 4] * 3), TypeError, ["'grad'", "list"]),
    (lambda: nn.Linear(0, 3), ValueError, ["in_features", "positive"]),
    (lambda: nn.Linear(3, 2, dtype="float16"), TypeError, ["float16"]),
    (lambda: nn.Linear(3, 2)(a(4, 5)), ValueError, ["Linear.forward", "'x' has 5 features", "takes 3", "(batch, 3)"]),
    (lambda: nn.Sequential(nn.Linear(3, 2), "relu"), TypeError, ["argument 1", "str"]),
]


@pytest.mark.parametrize("call,exc,pieces", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_bad_input_is_a_clear_error(call, exc, pieces):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for piece in pieces:
        assert piece in message, f"{piece!r} not in {message!r}"


def test_messages_describe_the_array():
    with pytest.raises(TypeError) as info:
        F.matmul(a(3, 4), a(4, 2, dtype=np.float64))
    assert "numpy.ndarray of shape (4, 2), dtype float64, on cpu" in str(info.value)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_nan_and_inf_inputs_propagate_like_the_reference():
    """(inf·0 in the product is NaN, and NumPy says so: the warning is expected.)"""
    x = np.array([[np.nan, np.inf, -np.inf, 1.0]], f32)
    w = np.eye(4, dtype=f32)
    out = F.matmul(x, w)
    ref = x.astype(np.float64) @ w
    assert np.array_equal(np.isnan(out), np.isnan(ref))
    s = F.sigmoid(x)
    assert np.isnan(s[0, 0]) and s[0, 1] == 1.0 and s[0, 2] == 0.0
    assert np.isnan(F.mse_loss(x[:, :1], a(1, 1)))
