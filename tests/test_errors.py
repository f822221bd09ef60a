"""Bad input gets a clear ValueError/TypeError naming the argument, what it got and what
was expected — never a crash inside a kernel, never a silently wrong answer."""

import re
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest

import cugrad
import cugrad.functional as F
from cugrad import _backend, _checks, nn, optim

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


# -------------------------------- from a mutation probe of functional.py and _checks.py
# (session 13: 102 mutants; each test below fails on one that every other test let live)

# shape checks
@pytest.mark.parametrize("trans_a,trans_b,a_shape,b_shape,seen", [
    (False, False, (3, 5), (4, 2), "a is (3, 5) but b is (4, 2)"),     # K_a > K_b
    (True, False, (5, 3), (4, 2), "aᵀ is (3, 5) but b is (4, 2)"),
    (False, True, (3, 5), (2, 4), "a is (3, 5) but bᵀ is (4, 2)"),
])
def test_matmul_inner_dimension_larger_than_b_rows_is_a_clear_error(trans_a, trans_b, a_shape,
                                                                     b_shape, seen):
    """K of a larger than b's rows is refused by cugrad with the shapes named, not by the
    backend's own product (mutant F01: `k < k2`)."""
    with pytest.raises(ValueError) as info:
        F.matmul(a(*a_shape), a(*b_shape), trans_a=trans_a, trans_b=trans_b)
    message = str(info.value)
    assert message.startswith("matmul: inner dimensions do not match: ")
    assert seen in message and "expected b" in message and "to have 5 rows" in message


def test_matmul_backward_grad_c_of_the_transposed_shape_names_grad_c():
    """grad_c (2, 3) for c (3, 2): same size, wrong shape (mutant F03 compared sizes)."""
    with pytest.raises(ValueError) as info:
        F.matmul_backward(a(2, 3), a(3, 4), a(4, 2))
    assert str(info.value) == ("matmul_backward: argument 'grad_c' has shape (2, 3), expected "
                               "(3, 2) (the shape of op(a) @ op(b))")


@pytest.mark.parametrize("grad_shape", [(4,), (12,), (1, 3, 4)])
def test_accumulate_refuses_a_grad_of_another_ndim_instead_of_broadcasting(grad_shape):
    """total (3, 4) += grad (4,) would broadcast silently (mutant F31 skipped the shape check
    when the ranks differ); total must be unchanged."""
    total = a(3, 4)
    with pytest.raises(ValueError) as info:
        F.accumulate(total, np.full(grad_shape, 2.0, f32))
    assert str(info.value) == (f"accumulate: argument 'grad' has shape {grad_shape}, expected "
                               "(3, 4) (the shape of total)")
    assert np.array_equal(total, a(3, 4))


def test_mse_loss_refuses_a_0d_pred():
    """(mutant F18 dropped check_min_ndim for pred.)"""
    for op in (F.mse_loss, F.mse_loss_backward, F.mse_loss_with_grad):
        with pytest.raises(ValueError) as info:
            op(np.array(1.0, f32), np.array(2.0, f32))
        assert str(info.value) == (
            f"{op.__name__}: argument 'pred' must have at least 1 dimension(s), got "
            "numpy.ndarray of shape (), dtype float32, on cpu")


def test_cross_entropy_with_zero_classes_says_logits_is_empty():
    """(3, 0) logits with a (3, 0) probability target (mutant F27 checked only the rows)."""
    with pytest.raises(ValueError) as info:
        F.cross_entropy(a(3, 0), a(3, 0))
    assert str(info.value).startswith("cross_entropy: logits is empty (numpy.ndarray of shape "
                                      "(3, 0), dtype float32, on cpu)")


def test_boolean_target_of_the_wrong_shape_says_class_indices_must_be_1d():
    """A bool (N, 1) target is class indices of the wrong shape, as an int one is (mutant F19
    left bool out and it became a dtype TypeError)."""
    with pytest.raises(ValueError) as info:
        F.cross_entropy(a(3, 4), np.zeros((3, 1), bool))
    assert "an integer target holds class indices and must be 1-D" in str(info.value)
    assert "numpy.ndarray of shape (3, 1), dtype bool, on cpu" in str(info.value)


# messages

def test_mixed_dtype_message_blames_the_argument_that_differs():
    """(mutant C14 swapped the two names: "'a' has dtype float64 ... shape (4, 2)".)"""
    with pytest.raises(TypeError) as info:
        F.matmul(a(3, 4), a(4, 2, dtype=np.float64))
    assert str(info.value).startswith(
        "matmul: argument 'b' has dtype float64 (numpy.ndarray of shape (4, 2), dtype float64, "
        "on cpu) but 'a' has dtype float32;")


@pytest.mark.parametrize("kwargs,expected", [
    (dict(low_open=True), "> 0.0"),
    (dict(), ">= 0.0"),
    (dict(high=1.0, high_open=True), "in [0.0, 1.0)"),
    (dict(high=1.0), "in [0.0, 1.0]"),
    (dict(low_open=True, high=1.0), "in (0.0, 1.0]"),
])
def test_out_of_range_scalar_message_states_the_interval_exactly(kwargs, expected):
    """(mutants C36 and C37 swapped the open and closed bounds in the message.)"""
    with pytest.raises(ValueError) as info:
        _checks.check_scalar("op", "lr", -1.0, **kwargs)
    assert str(info.value) == f"op: lr=-1.0 is out of range; expected a finite number {expected}"


def test_adam_eps_and_beta_messages_state_open_bounds():
    p = [a(3) for _ in range(4)]
    with pytest.raises(ValueError, match=re.escape("eps=-1.0 is out of range; expected a finite "
                                                   "number > 0.0")):
        F.adam_step(*p, step=1, lr=0.1, eps=-1.0)
    with pytest.raises(ValueError, match=re.escape("beta1=2.0 is out of range; expected a finite "
                                                   "number in [0.0, 1.0)")):
        F.adam_step(*p, step=1, lr=0.1, beta1=2.0)


# flags and scalars

@pytest.mark.parametrize("call,op,flag", [
    (lambda v: F.matmul(a(4, 3), a(4, 2), trans_a=v), "matmul", "trans_a"),
    (lambda v: F.matmul(a(3, 4), a(2, 4), trans_b=v), "matmul", "trans_b"),
    (lambda v: F.matmul_backward(a(3, 2), a(4, 3), a(4, 2), trans_a=v), "matmul_backward",
     "trans_a"),
    (lambda v: F.matmul_backward(a(3, 2), a(3, 4), a(2, 4), trans_b=v), "matmul_backward",
     "trans_b"),
    (lambda v: F.linear_backward(a(3, 5), a(3, 4), a(5, 4), bias=v), "linear_backward", "bias"),
])
@pytest.mark.parametrize("value", [1, "yes", 1.0])
def test_flags_must_be_bools(call, op, flag, value):
    """A truthy non-bool is refused, not taken as True (mutant C18 accepted ints in
    check_flag; F49 and F54 dropped check_flag for matmul's trans_b and matmul_backward's
    trans_a)."""
    with pytest.raises(TypeError) as info:
        call(value)
    assert str(info.value) == (f"{op}: {flag} must be a bool, got {type(value).__name__} "
                               f"{value!r}")


@pytest.mark.parametrize("value", [True, False, np.bool_(True)])
def test_a_bool_hyperparameter_is_refused(value):
    """lr=True is not lr=1.0 (mutant C29 dropped the bool test of check_scalar)."""
    with pytest.raises(TypeError) as info:
        F.sgd_step(a(3), a(3), lr=value)
    assert str(info.value) == (f"sgd_step: lr must be a real number, got "
                               f"{type(value).__name__} {value!r}")


@pytest.mark.parametrize("value", [np.int64(1), np.int32(1), np.uint8(1), Fraction(1)])
def test_numpy_integer_hyperparameters_are_accepted(value):
    """(mutant C30 refused NumPy integers; a Fraction, a real number too, was refused as
    not one.)"""
    assert _checks.check_scalar("op", "lr", value) == 1.0
    p = np.full(3, 5.0, f32)
    F.sgd_step(p, np.full(3, 2.0, f32), lr=value)
    assert np.array_equal(p, np.full(3, 3.0, f32))


# in-place state

def test_read_only_state_is_refused_by_name_before_any_update():
    """(mutant F29 dropped the writable test: the backend then raised its own "output array
    is read-only", or updated param before failing on the moment buffer.)"""
    total = a(3)
    total.flags.writeable = False
    with pytest.raises(ValueError) as info:
        F.accumulate(total, a(3))
    assert str(info.value) == ("accumulate: argument 'total' is updated in place and must be a "
                               "writable C-contiguous array, but it is read-only: "
                               "numpy.ndarray of shape (3,), dtype float32, on cpu")
    p, m, v = a(3), np.zeros(3, f32), np.zeros(3, f32)
    v.flags.writeable = False
    with pytest.raises(ValueError, match="argument 'exp_avg_sq' is updated in place"):
        F.adam_step(p, a(3), m, v, step=1, lr=0.1)
    assert np.array_equal(p, a(3)) and np.array_equal(m, np.zeros(3, f32))


# Adam's step

def test_numpy_integer_step_is_a_step_number_not_a_counter():
    """step=np.int64(3) is t = 3, as step=3 (mutant F42 took it for a step counter)."""
    out = []
    for step in (3, np.int64(3)):
        p, m, v = np.full(3, 1.0, f32), np.zeros(3, f32), np.zeros(3, f32)
        F.adam_step(p, np.full(3, 0.5, f32), m, v, step=step, lr=0.1)
        out.append(p)
    assert np.array_equal(out[0], out[1])


def test_read_only_step_counter_is_refused_before_any_update():
    """(mutant F45 dropped the writable test: NumPy's own error came from the kernel.)"""
    counter = np.array(0, np.int64)
    counter.flags.writeable = False
    p = a(3)
    with pytest.raises(ValueError) as info:
        F.adam_step(p, a(3), np.zeros(3, f32), np.zeros(3, f32), step=counter, lr=0.1)
    assert str(info.value) == ("adam_step: the step counter is incremented in place and must be "
                               "a writable NumPy array, got numpy.ndarray of shape (), dtype "
                               "int64, on cpu")
    assert np.array_equal(p, a(3)) and int(counter) == 0


def test_an_empty_parameters_step_counter_still_counts():
    """(mutant F48 returned before the counter's increment for an empty parameter.)"""
    counter = np.array(4, np.int64)
    F.adam_step(a(0), a(0), a(0), a(0), step=counter, lr=0.1)
    assert int(counter) == 5


# the device overlap test, DLPack

def _device_array(ptr, shape, strides, itemsize=4):
    return SimpleNamespace(data=SimpleNamespace(ptr=ptr), shape=shape, strides=strides,
                           itemsize=itemsize, size=int(np.prod(shape)))


def test_device_extents_sharing_one_byte_overlap():
    """(mutant C40 needed two bytes in common.)"""
    a4 = _device_array(1000, (4,), (4,))                       # bytes [1000, 1016)
    last = _device_array(1015, (1,), (1,), itemsize=1)         # byte 1015
    assert _checks.shares_memory(a4, last) and _checks.shares_memory(last, a4)
    assert not _checks.shares_memory(a4, _device_array(1016, (1,), (1,), itemsize=1))


def test_empty_device_arrays_never_overlap():
    """CuPy gives zero-size arrays a null pointer, so an empty parameter's state arrays all
    start at 0; they hold nothing and must not be refused as sharing memory (mutant C42 kept
    empty arrays in the test, and a (5, 0) array's extent is not empty)."""
    arrays = {name: _device_array(0, (5, 0), (4, 4)) for name in ("param", "exp_avg")}
    _checks.check_no_overlap("adam_step", arrays)


class _BrokenDLPack:
    """Exports DLPack in name only: asking for its device fails."""

    def __init__(self):
        self._data = np.arange(3, dtype=f32)

    def __dlpack__(self, **kwargs):
        raise RuntimeError("no export")

    def __dlpack_device__(self):
        raise RuntimeError("no device")

    def __array__(self, dtype=None, copy=None):
        return self._data


def test_a_failing_dlpack_device_is_not_a_cuda_array():
    """(mutant C04 answered True, and to_numpy then raised the object's own error.)"""
    obj = _BrokenDLPack()
    assert _checks.is_cuda_dlpack(obj) is False
    assert np.array_equal(cugrad.to_numpy(obj), np.arange(3, dtype=f32))


def test_a_failing_dlpack_device_is_read_as_the_object_it_is():
    """An exporter that cannot say where its data lives is taken as any other object: through
    its ``__array__`` by asarray (it raised the object's RuntimeError), and, without one, a
    TypeError naming the argument from the ops (also the object's RuntimeError) and from
    to_numpy (which returned a 0-d object array holding it: silently not an array)."""
    obj = _BrokenDLPack()
    got = cugrad.asarray(obj)
    assert got.dtype == f32 and np.array_equal(got, np.arange(3, dtype=f32))
    bare = SimpleNamespace(__dlpack__=obj.__dlpack__, __dlpack_device__=obj.__dlpack_device__)
    with pytest.raises(TypeError, match=r"relu: argument 'x' must be a NumPy or CuPy array.*"
                                        r"SimpleNamespace object"):
        F.relu(bare)
    with pytest.raises(TypeError, match=r"asarray: argument 'x'.*SimpleNamespace"):
        cugrad.asarray(bare)
    for junk in (bare, None, object()):
        with pytest.raises(TypeError, match=r"to_numpy: argument 'x' must be array data"):
            cugrad.to_numpy(junk)
    assert cugrad.to_numpy([[1.5, 2]]).shape == (1, 2)     # lists and numbers still come in
    assert cugrad.to_numpy(3.0) == 3.0


# class indices of any integer dtype

@pytest.mark.parametrize("index_dtype", [np.int32, np.uint8, np.int16, np.uint64])
def test_class_indices_of_any_integer_dtype_match_int64(backend, index_dtype):
    """The CUDA kernels read int64 indices: other integer dtypes are converted first (mutant
    F25 dropped the conversion; the CUDA launch then refused an int32 array for an int64
    pointer). Same loss and gradient bits as int64 indices, on both backends."""
    logits = backend.put(np.arange(12, dtype=f32).reshape(3, 4) / 7)
    want = [backend.get(op(logits, backend.put(np.array([0, 3, 1], np.int64)), reduction="sum"))
            for op in (F.cross_entropy, F.cross_entropy_backward)]
    target = backend.put(np.array([0, 3, 1], index_dtype))
    got = [backend.get(op(logits, target, reduction="sum"))
           for op in (F.cross_entropy, F.cross_entropy_backward)]
    loss, grad = F.cross_entropy_with_grad(logits, target, reduction="sum")
    got += [backend.get(loss), backend.get(grad)]
    for g, w in zip(got, want + want):
        assert np.array_equal(g, w)


@pytest.mark.parametrize("classes", [100, 300, 70000])
@pytest.mark.parametrize("index_dtype", ["i1", "<i2", ">i4", "i8", "u1", ">u4", "u8"])
def test_class_indices_out_of_range_are_named_in_every_integer_dtype(backend, index_dtype,
                                                                     classes):
    """The range check reads a signed target as unsigned (one reduction: a negative index
    is then at least 2**(bits - 1)) and names the bad index from min/max only when that
    fails; a byte-swapped target takes min/max at once (read in native order, 2**24 would
    pass as 1), and so does a class count a negative index can hide under (int8's -1 reads
    255, int16's 65535). Both ends, every width."""
    dtype = np.dtype(index_dtype)
    logits = backend.put(np.zeros((3, classes), f32))
    ok = np.array([0, min(classes - 1, np.iinfo(dtype).max), 5], index_dtype)
    assert backend.get(F.cross_entropy(logits, backend.put(ok))).shape == ()
    bad = [np.iinfo(dtype).min, -1] if dtype.kind == "i" else []
    bad += [v for v in (classes, np.iinfo(dtype).max, 2**24) if classes <= v <= np.iinfo(dtype).max]
    for value in bad:   # 2**24: byte-swapped and read natively, it would look like 1
        target = np.array([0, value, 0], index_dtype)   # 0 reads 0 in either order
        with pytest.raises(ValueError, match=rf"class index {value}, out of range for {classes} "):
            F.cross_entropy(logits, backend.put(target))


@pytest.mark.parametrize("swapped", [">f4", ">f8"] if np.little_endian else ["<f4", "<f8"])
def test_byte_swapped_floats_are_refused_with_the_conversion_named(swapped):
    """Float32 from a big-endian file is float32 to its reader: the refusal says what is
    wrong with it and what converts it (the message said only 'expected float32')."""
    a = np.arange(6, dtype=swapped).reshape(2, 3)
    with pytest.raises(TypeError, match=rf"argument 'x' has dtype {swapped} .*expected float32 "
                                        r"or float64 in the machine's byte order .*byte-swapped"
                                        r".*cugrad\.asarray\(x\) converts it"):
        F.relu(a)
    np.testing.assert_array_equal(F.relu(cugrad.asarray(a)), a)


class _RefusingCPUExport:
    """A CPU DLPack producer that refuses to export, as PyTorch 2.13 does for a tensor that
    requires grad (BufferError) or whose dtype NumPy lacks (bfloat16: NumPy's RuntimeError
    'Unsupported dtype in DLTensor.')."""

    shape, ndim, dtype = (2, 3), 2, "torch.float32"

    def __init__(self, exc):
        self._exc = exc

    def __dlpack__(self, **kwargs):
        raise self._exc

    def __dlpack_device__(self):
        return (1, 0)


@pytest.mark.parametrize("exc, words", [
    (BufferError("Can't export tensors that require gradient, use tensor.detach()"),
     r"refuses to share its memory: Can't export tensors that require gradient"),
    (RuntimeError("Unsupported dtype in DLTensor."),
     r"cannot be read through DLPack \(RuntimeError: Unsupported dtype in DLTensor\.\); "
     r"expected float32 or float64"),
])
def test_a_cpu_export_that_fails_is_a_type_error_naming_the_argument(exc, words):
    """A PyTorch CPU tensor that requires grad reached the caller as PyTorch's bare
    BufferError (and through to_numpy as its RuntimeError), a bfloat16 one as NumPy's bare
    RuntimeError: now a TypeError naming the op, the argument and the array, with the
    exporter's words, from the ops, the layers, Parameter and the conversions."""
    obj = _RefusingCPUExport(exc)
    desc = r"\(\S+ of shape \(2, 3\), dtype torch\.float32, on cpu\) "
    calls = [("relu", "x", lambda: F.relu(obj)),
             ("linear", "weight", lambda: F.linear(np.ones((4, 3), f32), obj)),
             ("Parameter", "data", lambda: nn.Parameter(obj)),
             ("asarray", "x", lambda: cugrad.asarray(obj)),
             ("to_numpy", "x", lambda: cugrad.to_numpy(obj))]
    for op, name, call in calls:
        with pytest.raises(TypeError, match=rf"^{op}: argument '{name}' {desc}{words}") as info:
            call()
        assert info.value.__cause__ is exc


class _NegativeBitCPUTensor:
    """A PyTorch tensor with its negative bit set (``torch.conj(z).imag``): its values are
    minus its memory's, and ``__dlpack__`` (PyTorch 2.13) exports the memory as it is."""

    def __init__(self, memory):
        self._memory = memory
        self.shape, self.ndim, self.dtype = memory.shape, memory.ndim, memory.dtype

    def is_neg(self):
        return True

    def __dlpack__(self, **kwargs):
        return self._memory.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._memory.__dlpack_device__()


def test_a_lazily_negated_tensor_is_refused_not_read_with_the_wrong_sign():
    """Before, every op read such a tensor through DLPack with each element's sign flipped
    (checked with PyTorch 2.13.0: F.relu(torch.conj(z).imag) was relu(+z.imag)): silently
    wrong. Now refused before anything reads it, naming resolve_neg()."""
    obj = _NegativeBitCPUTensor(np.array([[1.0, -2.0, 3.0]], f32))
    for op, name, call in [("relu", "x", lambda: F.relu(obj)),
                           ("matmul", "b", lambda: F.matmul(np.ones((2, 1), f32), obj)),
                           ("Parameter", "data", lambda: nn.Parameter(obj)),
                           ("asarray", "x", lambda: cugrad.asarray(obj)),
                           ("to_numpy", "x", lambda: cugrad.to_numpy(obj))]:
        with pytest.raises(TypeError, match=rf"^{op}: argument '{name}' .* is a lazily negated "
                                            rf"view .*; pass {name}\.resolve_neg\(\)"):
            call()
    model = nn.Sequential(nn.Linear(3, 1, rng=0))
    with pytest.raises(TypeError, match=r"lazily negated"):
        model.load_state_dict({"0.weight": obj, "0.bias": np.zeros(1, f32)})
    obj.is_neg = lambda: False         # a tensor without the bit: read as it is
    assert np.array_equal(F.relu(obj), [[1.0, 0.0, 3.0]])


class _TorchLikeCPUTensor:
    """A CPU DLPack producer whose ``dtype`` NumPy cannot interpret, as a PyTorch tensor's
    ``torch.float32`` is not a NumPy dtype."""

    class _Dtype:
        def __repr__(self):
            return "torch.float32"

    def __init__(self, arr):
        self._arr, self.shape, self.ndim, self.dtype = arr, arr.shape, arr.ndim, self._Dtype()

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()


def test_a_linear_layer_takes_arrays_whose_dtype_numpy_cannot_interpret():
    """A PyTorch tensor into a Linear layer: the layer's own dtype check called
    np.dtype(x.dtype) before F.linear could take the tensor through DLPack, so the user got
    NumPy's 'Cannot interpret torch.float32'. The layer's words now come only once F has
    refused an input; the results are those of the NumPy arrays."""
    layer = nn.Linear(4, 3, rng=0, activation="relu")
    x, g = np.arange(8, dtype=f32).reshape(2, 4) / 7, np.full((2, 3), 0.5, f32)
    want_y, want_dx = layer(x), layer.backward(g)
    want_dw = layer.weight.grad.copy()
    layer.zero_grad()
    wrapped = _TorchLikeCPUTensor
    assert np.array_equal(layer(wrapped(x)), want_y)
    assert np.array_equal(layer.backward(wrapped(g)), want_dx)
    assert np.array_equal(layer.weight.grad, want_dw)
    with pytest.raises(ValueError, match=r"^Linear\.forward: argument 'x' has 5 features") as info:
        layer(wrapped(np.ones((2, 5), f32)))
    assert info.value.__cause__ is None and info.value.__suppress_context__
    layer(x)
    with pytest.raises(ValueError, match=r"^Linear\.backward: argument 'grad_out' is .*, "
                                         r"expected shape \(2, 3\)") as info:
        layer.backward(wrapped(np.ones((2, 2), f32)))
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_to_numpy_takes_a_cpu_dlpack_producer_without_array_protocols():
    """A CPU DLPack producer with no __array__ (a DLPack-only library's array) became a 0-d
    object array through np.asarray: silently wrong, and every caller of to_numpy (Module.save,
    gradcheck's outputs, a loaded step count) then failed on it."""
    a = np.arange(12, dtype=f32).reshape(3, 4)
    got = cugrad.to_numpy(_TorchLikeCPUTensor(a))
    assert got.shape == (3, 4) and got.dtype == f32 and np.shares_memory(got, a)
    assert np.array_equal(got, a)


def test_state_dicts_load_arrays_whose_dtype_numpy_cannot_interpret():
    """Loading a PyTorch state dict: every value read its dtype with np.dtype first."""
    wrapped = _TorchLikeCPUTensor
    layer = nn.Linear(4, 3, rng=0)
    w, b = np.full((3, 4), 0.5, f32), np.arange(3, dtype=f32)
    layer.load_state_dict({"weight": wrapped(w), "bias": wrapped(b)})
    assert np.array_equal(layer.weight.data, w) and np.array_equal(layer.bias.data, b)
    assert not np.shares_memory(layer.weight.data, w)          # an own copy, as from NumPy
    opt = optim.Adam(layer.parameters())
    opt.load_state_dict({"0.exp_avg": wrapped(w), "0.exp_avg_sq": wrapped(w),
                         "0.step": wrapped(np.array(3)), "1.exp_avg": wrapped(b),
                         "1.exp_avg_sq": wrapped(b), "1.step": 4})
    assert opt.state[id(layer.weight)]["step"] == 3 and opt.state[id(layer.bias)]["step"] == 4
    assert np.array_equal(opt.state[id(layer.weight)]["exp_avg"], w)


def test_gradcheck_and_jacobian_take_arrays_whose_dtype_numpy_cannot_interpret():
    """Inputs, fn's and backward's results and grad_output from another library: as the
    ops take them (np.dtype(x.dtype) raised 'Cannot interpret', or a DLPack-only result was
    'not an array of real numbers')."""
    wrapped = _TorchLikeCPUTensor
    x = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    assert np.array_equal(cugrad.jacobian(F.tanh, wrapped(x)), cugrad.jacobian(F.tanh, x))
    assert np.array_equal(cugrad.jacobian(lambda v: wrapped(F.tanh(v)), x),
                          cugrad.jacobian(F.tanh, x))
    assert cugrad.gradcheck(lambda v: wrapped(F.tanh(v)), wrapped(x),
                            backward=lambda g, v: wrapped(F.tanh_backward(g, F.tanh(v))),
                            grad_output=wrapped(np.full((2, 3), 0.5)))


class _ArrayOnly:
    """An array-like that NumPy takes through ``__array__`` alone (h5py, xarray, zarr)."""

    def __init__(self, a):
        self._a, self.shape, self.dtype = a, a.shape, a.dtype

    def __array__(self, dtype=None, copy=None):
        return self._a


def test_loads_and_parameters_still_take_numpy_scalars_and_array_only_objects():
    """Only arrays that need DLPack or the CUDA array interface are imported first (the
    import refused NumPy scalars and __array__-only objects, which loaded before)."""
    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(np.zeros((), f32))

    m = Scalar()
    m.load_state_dict({"w": np.float32(2.0)})
    assert m.w.data == 2.0
    opt = optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict({"0.momentum_buf": np.float32(1.0)})
    assert opt.state[id(m.w)]["momentum_buf"] == 1.0
    layer = nn.Linear(4, 3, rng=0)
    layer.load_state_dict({"weight": _ArrayOnly(np.ones((3, 4), f32)),
                           "bias": np.zeros(3, f32)})
    assert layer.weight.data.sum() == 12
    assert type(nn.Parameter(np.float32(1.0)).data) is np.float32


def test_a_parameter_of_another_librarys_array_is_an_array_over_its_memory(tmp_path):
    """Parameter(tensor) kept the tensor itself: its repr said dtype=torch.float32, the
    optimisers' zeros_like made 0-d object buffers, save wrote an object array."""
    wrapped = _TorchLikeCPUTensor
    a = np.ones((3, 4), f32)
    p = nn.Parameter(wrapped(a))
    assert type(p.data) is np.ndarray and np.shares_memory(p.data, a) and p.dtype == f32
    for opt in (optim.SGD([p], lr=0.5, momentum=0.9), optim.Adam([p], lr=0.5)):
        p.grad = np.ones((3, 4), f32)
        opt.step()
    assert (a < 1).all()                     # updated in the other library's memory
    p.grad = wrapped(np.ones((3, 4), f32))   # a .grad of its own: added to in place
    p.accumulate(np.ones((3, 4), f32))
    assert np.array_equal(cugrad.to_numpy(p.grad), np.full((3, 4), 2, f32))
    layer = nn.Linear(4, 3, rng=0)           # weights copied in later, the same way
    w = np.full((3, 4), 2, f32)
    layer.weight.data = wrapped(w)
    assert type(layer.weight.data) is np.ndarray and np.shares_memory(layer.weight.data, w)
    assert layer.to("cpu").weight.dtype == f32      # np.dtype(torch.float32) failed here
    layer.save(tmp_path / "w.npz")
    assert np.array_equal(np.load(tmp_path / "w.npz")["weight"], w)


class _CudaDLPackOnly:
    """A GPU array that offers only DLPack (no __cuda_array_interface__)."""

    shape, ndim, dtype = (2, 3), 2, np.dtype(f32)

    def __dlpack__(self, **kwargs):
        raise AssertionError("not read here")

    def __dlpack_device__(self):
        return (2, 0)


def test_a_dlpack_only_gpu_array_is_on_cuda():
    """device_of said "cpu" for a CUDA DLPack export without the CUDA array interface (the
    ops took it to the GPU all the same), so messages said 'a GPU array ... on cpu' and
    ranges took the host clock."""
    obj = _CudaDLPackOnly()
    assert _backend.device_of(obj) == "cuda" and _backend.is_gpu_array(obj)
    assert _checks.describe(obj).endswith("on cuda")


def test_cross_entropy_takes_targets_whose_dtype_numpy_cannot_interpret():
    """A probability target (or logits) from another library comes in through DLPack as it
    does for every other op: the same loss and gradient as from NumPy arrays, and an integer
    (N, 1) target gets the class-index message. Before, cross-entropy alone called
    np.dtype(target.dtype) first and failed with NumPy's 'Cannot interpret'."""
    z = np.arange(12, dtype=f32).reshape(3, 4) / 5
    t = np.full((3, 4), 0.25, f32)
    wrapped = _TorchLikeCPUTensor
    for op in (F.cross_entropy, F.cross_entropy_backward):
        assert np.array_equal(op(wrapped(z), wrapped(t)), op(z, t))
    loss, grad = F.cross_entropy_with_grad(z, wrapped(t))
    assert np.array_equal(loss, F.cross_entropy(z, t))
    assert np.array_equal(grad, F.cross_entropy_backward(z, t))
    with pytest.raises(ValueError, match=r"an integer target holds class indices and must be "
                                         r"1-D.*numpy\.ndarray of shape \(3, 1\), dtype int64"):
        F.cross_entropy(z, wrapped(np.zeros((3, 1), np.int64)))
