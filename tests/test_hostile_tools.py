"""Hostile inputs to the tools around the ops: gradcheck / jacobian, cugrad.profile() and
cugrad.asarray. Each test fails if a bad argument passes silently (a wrong backward judged
right, an array quietly losing data) or fails deep inside NumPy instead of a clear error."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest

import cugrad
import cugrad.functional as F
from cugrad import GradcheckError, gradcheck, jacobian
from cugrad._trace import op_range

gradcheck_module = sys.modules["cugrad.gradcheck"]   # cugrad.gradcheck is the function


def _x():
    return np.random.default_rng(0).standard_normal((2, 3))


def double(a):
    return a * 2


def right(g, a):
    return 2 * g


def wrong(g, a):
    return 100 * g          # the true gradient of a * 2 is 2 * g


# ------------------------------------------------------------------ gradcheck: eps, tolerances

@pytest.mark.parametrize("eps", [0, 0.0, -1e-6, 1e-400, float("nan"), float("inf")])
def test_gradcheck_rejects_an_eps_that_is_not_positive_and_finite(eps):
    with pytest.raises(ValueError, match=r"gradcheck: eps="):
        gradcheck(double, _x(), backward=wrong, eps=eps)
    with pytest.raises(ValueError, match=r"jacobian: eps="):
        jacobian(double, _x(), eps=eps)


def test_gradcheck_rejects_an_eps_too_small_to_move_the_input():
    x = np.array([[1.0, 2.0], [3.0, 1e10]])
    with pytest.raises(ValueError, match=r"eps=1e-30 does not change input 0, element \(0, 0\)"):
        gradcheck(double, x, backward=right, eps=1e-30)
    # 1e-7 moves 1.0 but not 1e10: the message names that element
    with pytest.raises(ValueError, match=r"element \(1, 1\) \(value 10000000000.0\)"):
        gradcheck(double, x, backward=right, eps=1e-7)
    with pytest.raises(ValueError, match="does not change"):
        jacobian(double, x, eps=1e-30)


def test_gradcheck_rejects_eps_of_the_wrong_type():
    with pytest.raises(TypeError, match="eps must be a real number"):
        gradcheck(double, _x(), backward=right, eps="1e-6")


@pytest.mark.parametrize("name", ["atol", "rtol"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-5])
def test_gradcheck_rejects_non_finite_or_negative_tolerances(name, value):
    with pytest.raises(ValueError, match=rf"gradcheck: {name}="):
        gradcheck(double, _x(), backward=wrong, **{name: value})


def test_gradcheck_still_catches_the_wrong_backward_with_valid_settings():
    assert gradcheck(double, _x(), backward=right, eps=1e-3, atol=0.0, rtol=1e-6)
    with pytest.raises(GradcheckError, match="analytic"):
        gradcheck(double, _x(), backward=wrong, eps=1e-3, atol=0.0, rtol=1e-6)


# ---------------------------------------------------------- gradcheck: non-finite gradients

def test_an_infinite_output_is_a_gradcheck_error_not_a_pass():
    x = _x()
    with pytest.raises(GradcheckError, match=r"output is inf at element \(0, 0\)"):
        gradcheck(lambda a: np.where(a > 0, np.inf, a), x, backward=wrong)


def test_a_nan_numeric_gradient_is_a_gradcheck_error_naming_the_element():
    # finite at x, NaN just above x[0, 1] = 1: the numeric derivative there is NaN
    x = np.array([[0.5, 1.0, 1.5]])
    fn = lambda a: np.where((a > 1.0) & (a < 1.25), np.nan, a)   # noqa: E731
    with pytest.raises(GradcheckError, match=r"element \(0, 1\): the numeric gradient is "
                                             r"nan.*not differentiable.*eps"):
        gradcheck(fn, x, backward=wrong)


def test_a_non_finite_analytic_gradient_is_a_gradcheck_error():
    with pytest.raises(GradcheckError, match=r"element \(0, 0\): the analytic gradient is nan"):
        gradcheck(double, _x(), backward=lambda g, a: g * np.nan)
    with pytest.raises(GradcheckError, match="analytic gradient is inf"):
        gradcheck(double, _x(), backward=lambda g, a: np.where(a > 0, np.inf, 2 * g))


def test_non_finite_inputs_and_grad_output_are_value_errors():
    x = _x()
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="input 0 holds NaN or infinity"):
        gradcheck(double, x, backward=right)
    with pytest.raises(ValueError, match="grad_output holds NaN"):
        gradcheck(double, _x(), backward=right, grad_output=np.full((2, 3), np.inf))


# ------------------------------------------------------ gradcheck: layouts and scalar inputs

def test_a_fortran_ordered_input_is_perturbed():
    """The float64 copy must be C-ordered: perturbing a flat copy instead of a view gave
    a numeric gradient of 0, so a right backward failed and a zero one passed."""
    xt = np.random.default_rng(1).standard_normal((3, 2)).T
    assert gradcheck(double, xt, backward=right)
    with pytest.raises(GradcheckError):
        gradcheck(double, xt, backward=lambda g, a: 0 * g)
    np.testing.assert_allclose(jacobian(double, xt).reshape(6, 6), 2 * np.eye(6), atol=1e-8)


def test_a_numpy_scalar_input_is_perturbed():
    assert gradcheck(double, np.float64(1.5), backward=right)
    with pytest.raises(GradcheckError):
        gradcheck(double, np.float64(1.5), backward=lambda g, a: 0 * g)


# --------------------------------------------- gradcheck: scalar outputs, what fn returns

def test_a_scalar_valued_fn_is_checked_on_its_own_device(backend):
    x = backend.put(_x(), dtype=np.float64)
    assert gradcheck(lambda a: (a ** 2).sum(), x, backward=lambda g, a: 2 * a * g)
    with pytest.raises(GradcheckError):
        gradcheck(lambda a: (a ** 2).sum(), x, backward=lambda g, a: 3 * a * g)


def test_a_zero_d_input_and_python_number_outputs_work_on_the_cpu():
    assert gradcheck(double, np.array(1.0), backward=right)
    with pytest.raises(GradcheckError):
        gradcheck(double, np.array(1.0), backward=wrong)
    assert gradcheck(lambda a: float((a ** 2).sum()), _x(), backward=lambda g, a: 2 * a * g)
    assert gradcheck(lambda a: np.float64((a ** 3).sum()), _x(),
                     backward=lambda g, a: 3 * a ** 2 * g)


@pytest.mark.parametrize("result", [None, "list", "str", "complex"])
def test_fn_must_return_a_real_array_or_number(result):
    fns = {None: lambda a: None, "list": lambda a: [a, a], "str": lambda a: "y",
           "complex": lambda a: a * 1j}
    with pytest.raises(TypeError, match="gradcheck: fn must return a"):
        gradcheck(fns[result], _x(), backward=right)


def test_grad_output_must_have_the_output_shape():
    with pytest.raises(ValueError, match=r"grad_output has shape \(3,\), expected \(2, 3\)"):
        gradcheck(double, _x(), backward=right, grad_output=np.ones(3))
    with pytest.raises(ValueError, match=r"grad_output has shape \(1, 3\)"):
        gradcheck(double, _x(), backward=right, grad_output=np.ones((1, 3)))
    with pytest.raises(TypeError, match="grad_output must be an array of real numbers"):
        gradcheck(double, _x(), backward=right, grad_output=np.full((2, 3), 1j))
    assert gradcheck(double, _x(), backward=right, grad_output=np.ones((2, 3)).tolist())


def test_a_backward_that_checks_nothing_is_a_value_error():
    with pytest.raises(ValueError, match="None for every input: nothing to check"):
        gradcheck(double, _x(), backward=lambda g, a: None)
    with pytest.raises(ValueError, match="nothing to check"):
        gradcheck(lambda a, b: a * b, _x(), _x(), backward=lambda g, a, b: (None, None))
    # one None among checked gradients is still fine
    assert gradcheck(lambda a, b: a * b, _x(), _x() + 1,
                     backward=lambda g, a, b: (g * b, None))


class _FakeGpuArray:
    __cuda_array_interface__ = {}
    shape, dtype = (2, 3), np.dtype(np.float64)


def test_grad_output_goes_to_the_device_of_the_output(monkeypatch):
    """Host results (ndarray, NumPy scalar, 0-d, Python number) keep a host grad_output (a
    copy, for backward to do with as it likes); only a GPU array sends it to "cuda" (through
    cugrad.asarray)."""
    host = np.ones((2, 3))
    for y in (np.ones((2, 3)), np.float64(1.0), np.array(1.0), 1.0):
        got = gradcheck_module._like(y, host)
        assert type(got) is np.ndarray and got is not host and np.array_equal(got, host)
    calls = []
    monkeypatch.setattr("cugrad._arrays.asarray",
                        lambda h, device=None, dtype=None: calls.append((device, dtype)) or h)
    gradcheck_module._like(_FakeGpuArray(), host)
    assert calls == [("cuda", np.float64)]


# --------------------------------------------------------------------------- profile()

def _small_profile():
    with cugrad.profile() as prof:
        for name in ("a", "bb", "ccc"):
            with op_range(name, "cpu"):
                pass
    return prof


def test_row_limit_zero_is_the_header_and_footer():
    prof = _small_profile()
    lines = prof.table(row_limit=0).splitlines()
    assert lines[0].split()[:2] == ["op", "calls"]
    assert set(lines[1]) == {"-"} and set(lines[2]) == {"-"}
    assert lines[3].startswith("profiled host time") and len(lines) == 5
    assert len(prof.table(row_limit=np.int64(2)).splitlines()) == 2 + 2 + 3
    assert len(prof.table(row_limit=10).splitlines()) == 2 + 3 + 3


@pytest.mark.parametrize("limit, exc", [(-1, ValueError), (-5, ValueError), ("3", TypeError),
                                        (2.0, TypeError), (True, TypeError)])
def test_bad_row_limits_are_clear_errors(limit, exc):
    with pytest.raises(exc, match="Profile.table: row_limit"):
        _small_profile().table(row_limit=limit)


def test_bad_sort_by_and_device_are_value_errors():
    prof = _small_profile()
    for bad in (["total"], "", "speed", 3):
        with pytest.raises(ValueError, match="sort_by must be one of"):
            prof.table(sort_by=bad)
    with pytest.raises(ValueError, match="sort_by must be one of"):
        cugrad.profile(sort_by=["total"])
    with pytest.raises(ValueError, match=r"Profile.stats: device must be"):
        prof.stats(device="gpu")
    with pytest.raises(ValueError, match=r"Profile.profiled_ns: device must be"):
        prof.profiled_ns("gpu")
    names = [ln.split()[0] for ln in prof.table(sort_by="name").splitlines()[2:5]]
    assert names == ["a", "bb", "ccc"]
    assert prof.sort_by == "total"            # table(sort_by=...) leaves the profile's own


def test_exit_without_enter_is_a_runtime_error():
    prof = cugrad.profile()
    with pytest.raises(RuntimeError, match="not recording"):
        prof.__exit__(None, None, None)
    with prof:                                # still usable
        with op_range("x", "cpu"):
            pass
    assert prof["x"].calls == 1
    with pytest.raises(RuntimeError, match="not recording"):
        prof.__exit__(None, None, None)       # a second exit


# ---------------------------------------------------------------------------- asarray()

@pytest.mark.parametrize("bad", [None, "abc", ["1", "2"], [1.0, None], {}, object(),
                                 np.array(["a", 1], dtype=object), np.datetime64("2020-01-01")],
                         ids=["None", "str", "str_list", "list_with_None", "dict", "object",
                              "object_array", "datetime"])
def test_asarray_refuses_what_is_not_real_numbers(bad):
    with pytest.raises(TypeError, match="asarray: argument 'x' must hold real numbers"):
        cugrad.asarray(bad)


def test_asarray_refuses_complex_unless_asked_for_complex():
    for bad in (np.array([1 + 2j]), [1 + 2j], 1j):
        with pytest.raises(TypeError, match=r"asarray: argument 'x' is complex.*x\.real"):
            cugrad.asarray(bad)
        with pytest.raises(TypeError, match="is complex"):
            cugrad.asarray(bad, dtype=np.float64)
    z = cugrad.asarray(np.array([1 + 2j]), dtype=np.complex64)   # explicit: kept
    assert z.dtype == np.complex64 and z[0] == 1 + 2j


def test_asarray_converts_an_object_array_of_numbers():
    out = cugrad.asarray(np.array([1, 2.5], dtype=object))
    assert out.dtype == np.float64 and out.tolist() == [1.0, 2.5]


def test_asarray_refuses_a_masked_array():
    m = np.ma.masked_array([1.0, 2.0], mask=[False, True])
    with pytest.raises(TypeError, match=r"'x' is a masked array.*filled"):
        cugrad.asarray(m)
    assert cugrad.asarray(m.filled(0.0)).tolist() == [1.0, 0.0]


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")
def test_asarray_of_a_matrix_is_a_plain_2d_array_without_a_copy():
    m = np.matrix([[1.0, 2.0], [3.0, 4.0]])
    out = cugrad.asarray(m)
    assert type(out) is np.ndarray and out.shape == (2, 2) and np.shares_memory(out, m)
    assert (out * out).tolist() == [[1.0, 4.0], [9.0, 16.0]]    # element-wise, not m @ m


@pytest.mark.parametrize("src, expected", [
    (np.float16, np.float32), (">f4", np.float32), (">f8", np.float64),
    (np.longdouble, np.float64), ("<f4", np.float32), (np.int16, np.float32),
    (np.bool_, np.float32)])
def test_asarray_default_dtype_is_one_the_ops_accept(src, expected):
    x = np.array([[-1.5, 2.0], [0.25, 3.0]]).astype(src)
    out = cugrad.asarray(x)
    assert out.dtype == np.dtype(expected) and out.dtype.isnative
    np.testing.assert_array_equal(out, x.astype(np.float64))
    assert F.relu(out).dtype == out.dtype                  # the promise: ops accept it


def test_asarray_keeps_an_explicit_numeric_dtype_and_rejects_others():
    assert cugrad.asarray([0, 2, 1], dtype=np.int64).dtype == np.int64     # class indices
    assert cugrad.asarray(np.ones(2, np.float32), dtype=np.float16).dtype == np.float16
    with pytest.raises(TypeError, match="asarray: dtype=object is not numeric"):
        cugrad.asarray([1.0], dtype=object)
    with pytest.raises(TypeError, match=re.escape("asarray: dtype='foo' is not a NumPy dtype")):
        cugrad.asarray([1.0], dtype="foo")
    y = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert cugrad.asarray(y) is y and cugrad.asarray(y, dtype=np.float64) is y


def test_asarray_of_a_ragged_list_is_a_value_error_naming_x():
    with pytest.raises(ValueError, match="asarray: argument 'x'.*not a rectangular array"):
        cugrad.asarray([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize("x, dtype, says", [
    (np.array([-1, 300]), np.uint8, r"-1, outside its range \[0, 255\]"),
    (np.array([3, 200]), np.int8, r"200, outside its range \[-128, 127\]"),
    ([0.0, np.nan], np.int64, "NaN or infinity"),
    ([1.7, -2.5], np.int64, "a fraction"),
    ([2.0 ** 63], np.int64, r"9.22.*e\+18, outside its range"),
    (np.array([2 ** 63], np.uint64), np.int64, r"9223372036854775808, outside"),
    (np.array([1e300, 1.0]), np.float32, "a finite value too large for it"),
], ids=["-1 to uint8", "200 to int8", "nan to int", "fraction to int", "2^63 to int64",
        "uint64 to int64", "1e300 to float32"])
def test_asarray_refuses_a_value_its_dtype_cannot_hold(backend, x, dtype, says):
    """An explicit dtype converts values, never wraps or truncates them: a label -1 cast to
    uint8 was the valid class 255, NaN became INT64_MIN, 1e300 became inf."""
    src = backend.put(np.asarray(x))
    with pytest.raises(ValueError, match=rf"^asarray: argument 'x' \(.*\) cannot be converted "
                                         rf"to {np.dtype(dtype)}: it holds {says}"):
        cugrad.asarray(src, dtype=dtype)


@pytest.mark.parametrize("x, dtype", [
    ([1.0, -2.0, 0.0], np.int64), (np.array([3, -4], np.int64), np.int8),
    ([np.inf, -np.inf, np.nan, 1e30], np.float32), (np.array([255, 0]), np.uint8),
    (np.array([1, 2], np.int32), np.int64)], ids=repr)
def test_asarray_converts_what_its_dtype_can_hold(x, dtype):
    got = cugrad.asarray(x, dtype=dtype)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.asarray(x).astype(dtype))


def test_asarray_of_ints_too_large_for_a_narrower_float_is_a_value_error():
    """70000 in float16 (largest finite 65504) became inf with a RuntimeWarning; a float
    source was already refused."""
    for src in (np.array([1, 70000]), np.array([-70000, 3], np.int32)):
        with pytest.raises(ValueError, match=r"^asarray: argument 'x' .* cannot be converted to "
                                             r"float16: it holds -?70000, too large for it"):
            cugrad.asarray(src, dtype="float16")
    assert cugrad.asarray(np.array([65504]), dtype="float16")[0] == 65504


def test_asarray_of_an_int_beyond_float64_is_a_value_error():
    with pytest.raises(ValueError, match=r"^asarray: argument 'x' holds a number beyond "
                                         r"float64's range"):
        cugrad.asarray([10 ** 400])


@pytest.mark.parametrize("kwargs, error, says", [
    (dict(seed="a"), TypeError, r"seed must be a non-negative int.*got str 'a'"),
    (dict(seed=-1), ValueError, r"seed must be a non-negative int.*got -1"),
    (dict(seed=True), TypeError, r"seed must be a non-negative int"),
    (dict(backward=None), TypeError, r"backward must be a function.*got NoneType None"),
], ids=["str seed", "negative seed", "bool seed", "no backward"])
def test_gradcheck_names_a_bad_seed_or_backward(kwargs, error, says):
    args = dict(backward=lambda g, x: g * 2.0)
    args.update(kwargs)
    with pytest.raises(error, match=rf"^gradcheck: {says}"):
        gradcheck(lambda x: x * 2.0, np.ones(3), **args)


def test_gradcheck_gives_backward_its_own_grad_output_and_inputs():
    """A backward that scales grad_output (or an input) in place must not move the reference
    it is checked against: gradcheck passed a wrong backward (g *= 5 for the identity) and
    failed a right one (g *= 2 for 2x) when backward got gradcheck's own grad_output."""
    def scales_g(factor):
        def backward(g, x):
            g *= factor
            x *= 0.0          # and spoils its input: the numeric side must not see it
            return g
        return backward

    x = np.array([0.3, -1.2, 2.0])
    assert gradcheck(lambda v: v * 2.0, x, backward=scales_g(2.0))
    with pytest.raises(GradcheckError, match="analytic"):
        gradcheck(lambda v: v * 1.0, x, backward=scales_g(5.0))
    with pytest.raises(TypeError, match=r"^gradcheck: input 0 must be a float array .*got "
                                        r"numpy.ndarray of shape \(3,\), dtype int64"):
        gradcheck(lambda v: v, np.arange(3), backward=lambda g, v: g)


@pytest.mark.parametrize("how, says", [
    ("read-only", "but it is read-only"),
    ("fortran", r"but it is not C-contiguous \(strides \(4, 12\)\)"),
    ("reversed", r"but it is not C-contiguous \(strides \(-4,\)\)"),
], ids=str)
def test_an_in_place_target_says_which_rule_it_breaks(how, says):
    p = {"read-only": np.ones((3, 4), np.float32), "fortran": np.ones((3, 4), np.float32, order="F"),
         "reversed": np.ones(5, np.float32)[::-1]}[how]
    if how == "read-only":
        p.flags.writeable = False
    with pytest.raises(ValueError, match=rf"^sgd_step: argument 'param' is updated in place and "
                                         rf"must be a writable C-contiguous array, {says}"):
        F.sgd_step(p, np.ones(p.shape, np.float32), lr=0.1)
