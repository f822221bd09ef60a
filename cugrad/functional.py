"""cugrad.functional (import as ``F``): every op with its backward, on either backend.

Each op validates its arguments (shapes per MATH.md, one float dtype, one device), opens
its NVTX range, and calls one backend implementation: NumPy arrays run on the NumPy
backend, CuPy (and other CUDA) arrays on the CUDA backend. The arithmetic of each op is
the function of the same name in ``backends/numpy_backend.py`` (the specification) and its
launcher in ``backends/cuda/ops.py`` (the kernels of ``kernels/*.cu``); this module holds
the argument checks and the contracts.

Shapes (MATH.md §1–4): ``matmul`` computes ``op(a) @ op(b)`` with ``op(x) = x.T`` when the
``trans_*`` flag is set, reading the operands in place; ``linear`` uses PyTorch's weight
layout ``(out_features, in_features)``.
"""

from __future__ import annotations

import contextvars
import functools
import numbers
import warnings

import numpy as np

from . import _backend, _trace
from ._checks import (_to_backend_array, check_choice, check_class_indices, check_flag,
                      check_min_ndim, check_ndim, check_no_nan, check_no_overlap, check_scalar,
                      check_shape, describe, exported_read_only, plain_numpy_update,
                      prepare, shares_memory)
from ._trace import op_range

ACTIVATIONS = ("sigmoid", "tanh", "relu")
MSE_REDUCTIONS = ("mean", "sum", "half_sum")
XENT_REDUCTIONS = ("mean", "sum")

__all__ = [
    "matmul", "matmul_backward", "linear", "linear_backward", "bias_grad",
    "sigmoid", "sigmoid_backward", "tanh", "tanh_backward", "relu", "relu_backward",
    "softmax", "log_softmax", "mse_loss", "mse_loss_backward", "mse_loss_with_grad",
    "cross_entropy",
    "cross_entropy_backward", "cross_entropy_with_grad", "accumulate", "sgd_step", "adam_step",
]


def _op(name: str):
    """Run the decorated op inside its NVTX range, on the clock of its data's device (its
    first argument, or any array passed by keyword)."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _trace._quiet:      # nothing listens (the usual case): no range to open
                return fn(*args, **kwargs)
            with op_range(name, _op_device(args, kwargs)):
                return fn(*args, **kwargs)
        return wrapper
    return decorate


def _op_device(args, kwargs) -> str:
    """The device an op's range is timed on: its first positional argument's, else "cuda"
    when any keyword argument is a GPU array (the op itself refuses mixed devices)."""
    if args:
        return _backend.device_of(args[0])
    return "cuda" if any(_backend.is_gpu_array(v) for v in kwargs.values()) else "cpu"


# ----------------------------------------------------------------------------- products

def _product_shape(op, a, b, trans_a, trans_b, a_name="a", b_name="b"):
    """(M, K, N) of op(a) @ op(b), with a clear error on a mismatched inner dimension."""
    check_ndim(op, a_name, a, 2, "(a matrix)")
    check_ndim(op, b_name, b, 2, "(a matrix)")
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != k2:
        raise ValueError(
            f"{op}: inner dimensions do not match: {a_name}{'ᵀ' if trans_a else ''} is "
            f"({m}, {k}) but {b_name}{'ᵀ' if trans_b else ''} is ({k2}, {n}) "
            f"({a_name}: {describe(a)}; {b_name}: {describe(b)}); expected "
            f"{b_name}{'ᵀ' if trans_b else ''} to have {k} rows")
    return m, k, n


def _gemm(backend, a, b, trans_a, trans_b, bias=None, activation=None):
    """act(op(a) @ op(b) + bias) on ``backend``; an empty result launches nothing."""
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    if m == 0 or n == 0:
        return backend.xp.empty((m, n), dtype=a.dtype)
    return backend.ops.gemm(a, b, trans_a, trans_b, bias, activation)


@_op("matmul")
def matmul(a, b, *, trans_a=False, trans_b=False):
    """``op(a) @ op(b)``: a (M, K) or, with ``trans_a``, (K, M); b (K, N) or, with
    ``trans_b``, (N, K). Returns (M, N). Layouts NN, NT, TN and TT read a and b in place."""
    trans_a = check_flag("matmul", "trans_a", trans_a)
    trans_b = check_flag("matmul", "trans_b", trans_b)
    backend, arr = prepare("matmul", {"a": a, "b": b})
    a, b = arr["a"], arr["b"]
    _product_shape("matmul", a, b, trans_a, trans_b)
    return _gemm(backend, a, b, trans_a, trans_b)


@_op("matmul.backward")
def matmul_backward(grad_c, a, b, *, trans_a=False, trans_b=False):
    """Gradients of ``c = op(a) @ op(b)``: returns ``(grad_a, grad_b)`` with a's and b's
    shapes. Each is one product, read in place: NN, NT or TN, and TT when both operands
    are transposed (MATH.md §1)."""
    trans_a = check_flag("matmul_backward", "trans_a", trans_a)
    trans_b = check_flag("matmul_backward", "trans_b", trans_b)
    backend, arr = prepare("matmul_backward", {"grad_c": grad_c, "a": a, "b": b})
    g, a, b = arr["grad_c"], arr["a"], arr["b"]
    m, _, n = _product_shape("matmul_backward", a, b, trans_a, trans_b)
    check_ndim("matmul_backward", "grad_c", g, 2)
    check_shape("matmul_backward", "grad_c", g, (m, n), "the shape of op(a) @ op(b)")
    # d op(a) = G op(b)ᵀ and d op(b) = op(a)ᵀ G, transposed back where the operand was.
    grad_a = (_gemm(backend, b, g, trans_b, True) if trans_a
              else _gemm(backend, g, b, False, not trans_b))
    grad_b = (_gemm(backend, g, a, True, trans_a) if trans_b
              else _gemm(backend, a, g, not trans_a, False))
    return grad_a, grad_b


def _check_activation(op, activation):
    if activation is not None:
        check_choice(op, "activation", activation, (None,) + ACTIVATIONS)


def _linear_shapes(op, x, weight, bias):
    check_ndim(op, "x", x, 2, "(batch, in_features)")
    check_ndim(op, "weight", weight, 2, "(out_features, in_features)")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x has {x.shape[1]} features ({describe(x)}) but weight expects "
            f"{weight.shape[1]} ({describe(weight)}); weight must be (out_features, "
            f"in_features) = (*, {x.shape[1]})")
    if bias is not None:
        check_shape(op, "bias", bias, (weight.shape[0],), "(out_features,) of weight")


@_op("linear.forward")
def linear(x, weight, bias=None, *, activation=None):
    """``act(x @ weight.T + bias)``: x (N, in), weight (out, in), bias (out,) or None,
    activation None | "sigmoid" | "tanh" | "relu". One fused product on the GPU."""
    _check_activation("linear", activation)
    backend, arr = prepare("linear", {"x": x, "weight": weight, "bias": bias},
                           optional=("bias",))
    x, weight, bias = arr["x"], arr["weight"], arr["bias"]
    _linear_shapes("linear", x, weight, bias)
    return _gemm(backend, x, weight, False, True, bias, activation)


@_op("linear.backward")
def linear_backward(grad_y, x, weight, *, bias=True, activation=None, out=None,
                    input_grad=True):
    """Gradients of ``y = act(x @ weight.T + b)`` (MATH.md §2-3): with G = grad_y ⊙ act'(y)
    (G = grad_y without an activation), dX = G W (NN), dW = Gᵀ X (TN), db = Σ_rows G.

    Returns ``(grad_x, grad_weight, grad_bias)`` (``grad_bias`` None when ``bias`` is False,
    ``grad_x`` None when ``input_grad`` is False: the first layer of a network needs no
    gradient for its input, and skipping it saves the largest product of that layer's
    backward). With ``activation``, ``grad_y`` is the gradient of the activated output and
    ``out`` the saved forward output, from which act' is taken."""
    op = "linear_backward"
    _check_activation(op, activation)
    bias = check_flag(op, "bias", bias)
    input_grad = check_flag(op, "input_grad", input_grad)
    if activation is not None and out is None:
        raise ValueError(f"{op}: activation={activation!r} needs out=, the saved forward "
                         "output of linear(..., activation=...)")
    if activation is None and out is not None:
        raise ValueError(f"{op}: out= is the saved output of an activation and is used only "
                         "with activation=; got out= without it (did the forward have an "
                         "activation?)")
    backend, arr = prepare(op, {"grad_y": grad_y, "x": x, "weight": weight, "out": out},
                           optional=("out",))    # out is None exactly without an activation
    g, x, weight = arr["grad_y"], arr["x"], arr["weight"]
    _linear_shapes(op, x, weight, None)
    check_ndim(op, "grad_y", g, 2, "(batch, out_features)")
    expected = (x.shape[0], weight.shape[0])
    check_shape(op, "grad_y", g, expected, "(batch of x, out_features of weight)")
    device = backend.device
    grad_b = None
    if activation is not None:
        check_shape(op, "out", arr["out"], expected, "the forward output's shape")
        if bias and g.size:     # one pass: the activation's backward and its column sum
            with op_range("linear.backward.act_db", device):
                g, grad_b = backend.ops.activation_backward_bias_grad(activation, g, arr["out"])
        else:
            with op_range("linear.backward.act", device):
                g = _activation_backward_2d(backend, activation, g, arr["out"])
    grad_x = None
    if input_grad:
        with op_range("linear.backward.dX", device):
            grad_x = _gemm(backend, g, weight, False, False)
    with op_range("linear.backward.dW", device):
        grad_w = _gemm(backend, g, x, True, False)
    if bias and grad_b is None:
        with op_range("linear.backward.db", device):
            grad_b = _bias_grad(backend, g)
    return grad_x, grad_w, grad_b


def _bias_grad(backend, g):
    if g.shape[0] == 0 or g.shape[1] == 0:
        return backend.xp.zeros((g.shape[1],), dtype=g.dtype)
    return backend.ops.bias_grad(g)


@_op("bias_grad")
def bias_grad(grad_y):
    """Column sum of a 2-D gradient (M, N) -> (N,): the gradient of a bias added to rows."""
    backend, arr = prepare("bias_grad", {"grad_y": grad_y})
    g = arr["grad_y"]
    check_ndim("bias_grad", "grad_y", g, 2, "(batch, features)")
    return _bias_grad(backend, g)


# -------------------------------------------------------------------------- activations
# Element-wise ops take any shape; backends see 2-D arrays (rows of the last axis).

def _as_rows(x):
    if x.ndim == 2:
        return x
    return x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])


def _activation_backward_2d(backend, name, grad_out, saved):
    if grad_out.size == 0:
        return backend.xp.empty(grad_out.shape, dtype=grad_out.dtype)
    return backend.ops.activation_backward(name, grad_out, saved)


def _activation(name, x):
    backend, arr = prepare(name, {"x": x})
    x = arr["x"]
    if x.size == 0:
        return backend.xp.empty(x.shape, dtype=x.dtype)
    return backend.ops.activation(name, _as_rows(x)).reshape(x.shape)


def _activation_backward(name, saved_name, grad_out, saved):
    op = f"{name}_backward"
    backend, arr = prepare(op, {"grad_out": grad_out, saved_name: saved})
    g, s = arr["grad_out"], arr[saved_name]
    check_shape(op, saved_name, s, g.shape, "the shape of grad_out")
    return _activation_backward_2d(backend, name, _as_rows(g), _as_rows(s)).reshape(g.shape)


@_op("sigmoid")
def sigmoid(x):
    """``1 / (1 + exp(-x))``, element-wise, without overflow for any finite x."""
    return _activation("sigmoid", x)


@_op("sigmoid.backward")
def sigmoid_backward(grad_out, out):
    """``grad_out * out * (1 - out)`` with ``out = sigmoid(x)`` (MATH.md §3)."""
    return _activation_backward("sigmoid", "out", grad_out, out)


@_op("tanh")
def tanh(x):
    """``tanh(x)``, element-wise."""
    return _activation("tanh", x)


@_op("tanh.backward")
def tanh_backward(grad_out, out):
    """``grad_out * (1 - out)(1 + out)`` with ``out = tanh(x)``: 1 − out², formed without
    the cancellation near |out| = 1 (MATH.md §3)."""
    return _activation_backward("tanh", "out", grad_out, out)


@_op("relu")
def relu(x):
    """``max(x, 0)``, element-wise."""
    return _activation("relu", x)


@_op("relu.backward")
def relu_backward(grad_out, out_or_x):
    """``grad_out`` where ``x > 0``, else 0: a select, so an infinite or NaN ``grad_out``
    where ``x <= 0`` gives 0 (MATH.md §3), as PyTorch's; where ``x`` is NaN it gives 0 too
    (PyTorch's passes ``grad_out`` there, since NaN <= 0 is false). ``relu(x) > 0`` exactly
    where ``x > 0``, so the saved output or the input may be passed."""
    return _activation_backward("relu", "out_or_x", grad_out, out_or_x)


def _softmax(op, x):
    backend, arr = prepare(op, {"x": x})
    x = arr["x"]
    check_min_ndim(op, "x", x, 1)
    if x.size == 0:
        return backend.xp.empty(x.shape, dtype=x.dtype)
    return getattr(backend.ops, op)(_as_rows(x)).reshape(x.shape)


@_op("softmax")
def softmax(x):
    """Softmax over the last axis, shifted by the row maximum (no overflow)."""
    return _softmax("softmax", x)


@_op("log_softmax")
def log_softmax(x):
    """``x - logsumexp(x)`` over the last axis, shifted by the row maximum."""
    return _softmax("log_softmax", x)


# ------------------------------------------------------------------------------- losses

def _mse_args(op, pred, target, reduction):
    check_choice(op, "reduction", reduction, MSE_REDUCTIONS)
    backend, arr = prepare(op, {"pred": pred, "target": target})
    pred, target = arr["pred"], arr["target"]
    check_min_ndim(op, "pred", pred, 1)
    check_shape(op, "target", target, pred.shape, "the shape of pred")
    if pred.size == 0:
        raise ValueError(f"{op}: pred is empty ({describe(pred)}); a loss needs at least one "
                         "element")
    check_no_nan(op, "target", target, backend.xp)
    return backend, _as_rows(pred), _as_rows(target)


@_op("mse_loss")
def mse_loss(pred, target, *, reduction="mean"):
    """Mean squared error. reduction "mean": Σ(pred−target)²/n; "sum": Σ(pred−target)²;
    "half_sum": Σ(pred−target)²/2 (MATH.md §4). Returns a 0-d array of pred's dtype."""
    backend, p, t = _mse_args("mse_loss", pred, target, reduction)
    return backend.ops.mse_loss(p, t, reduction)


@_op("mse_loss.backward")
def mse_loss_backward(pred, target, *, reduction="mean"):
    """d mse_loss / d pred, same arguments: 2(pred−target)/n, 2(pred−target) or
    (pred−target) for "mean", "sum", "half_sum". Shape of pred."""
    backend, p, t = _mse_args("mse_loss_backward", pred, target, reduction)
    return backend.ops.mse_loss_backward(p, t, reduction).reshape(pred.shape)


@_op("mse_loss")
def mse_loss_with_grad(pred, target, *, reduction="mean"):
    """``(mse_loss(...), mse_loss_backward(...))`` from one pass over pred and target (one
    kernel on the GPU, and the pass that sums its partial sums), the same values bit for
    bit."""
    backend, p, t = _mse_args("mse_loss_with_grad", pred, target, reduction)
    loss, grad = backend.ops.mse_fwd_bwd(p, t, reduction)
    return loss, grad.reshape(pred.shape)


def _xent_args(op, logits, target, reduction):
    check_choice(op, "reduction", reduction, XENT_REDUCTIONS)
    # Another library's array (a PyTorch tensor, through DLPack) comes in first, so that the
    # target's dtype below is NumPy's or CuPy's (np.dtype(torch.float32) is an error).
    logits, target = (None if x is None else _to_backend_array(op, name, x)
                      for name, x in (("logits", logits), ("target", target)))
    target_is_index = (getattr(target, "ndim", None) == 1)
    target_dtype = getattr(target, "dtype", None)
    if (not target_is_index and target_dtype is not None and np.dtype(target_dtype).kind in "iub"
            and tuple(target.shape) != tuple(getattr(logits, "shape", ()))):
        # (N, 1), 0-d, 3-D: class indices of the wrong shape (an integer array of the logits'
        # shape is a probability target of the wrong dtype: prepare says so below)
        raise ValueError(f"{op}: an integer target holds class indices and must be 1-D, one "
                         f"per row of logits (N,); got {describe(target)} (probability "
                         "targets are float arrays of the logits' shape)")
    backend, arr = prepare(op, {"logits": logits, "target": target},
                           ints=("target",) if target_is_index else ())
    logits, target = arr["logits"], arr["target"]
    check_ndim(op, "logits", logits, 2, "(batch, classes)")
    n, c = logits.shape
    if n == 0 or c == 0:
        raise ValueError(f"{op}: logits is empty ({describe(logits)}); cross-entropy needs at "
                         "least one row and one class")
    if target.ndim == 1:
        if target.dtype.kind not in "iu":
            hint = ("; cugrad.asarray makes float32 of integer data unless told its dtype: "
                    "cugrad.asarray(y, dtype='int64')") if target.dtype.kind == "f" else ""
            raise TypeError(f"{op}: class-index target must be an integer array of shape "
                            f"({n},), got {describe(target)}{hint}")
        check_shape(op, "target", target, (n,), "one class index per row of logits")
        check_class_indices(op, "target", target, c)
        target = backend.xp.ascontiguousarray(target, dtype=np.int64)
    elif target.ndim == 2:
        check_shape(op, "target", target, (n, c),
                    "probabilities of the shape of logits, or class indices of shape (N,)")
        check_no_nan(op, "target", target, backend.xp)
    else:
        raise ValueError(f"{op}: target must be class indices ({n},) or probabilities "
                         f"({n}, {c}), got {describe(target)}")
    return backend, logits, target


@_op("cross_entropy")
def cross_entropy(logits, target, *, reduction="mean"):
    """Softmax cross-entropy of logits (N, C) against class indices (N,) or probabilities
    (N, C): Σ_rows [logsumexp(z)·Σ_i t_i − Σ_i t_i z_i] (Σ_i t_i = 1 for class indices and
    for probability rows that sum to 1), divided by N for "mean" (MATH.md §4)."""
    backend, z, t = _xent_args("cross_entropy", logits, target, reduction)
    return backend.ops.cross_entropy(z, t, reduction)


@_op("cross_entropy.backward")
def cross_entropy_backward(logits, target, *, reduction="mean"):
    """d cross_entropy / d logits, same arguments: softmax(z) − t, divided by N for
    "mean" (for probability rows that do not sum to 1: softmax(z)·Σt − t)."""
    backend, z, t = _xent_args("cross_entropy_backward", logits, target, reduction)
    return backend.ops.cross_entropy_backward(z, t, reduction)


@_op("cross_entropy")
def cross_entropy_with_grad(logits, target, *, reduction="mean"):
    """``(cross_entropy(...), cross_entropy_backward(...))`` from one pass over the logits."""
    backend, z, t = _xent_args("cross_entropy_with_grad", logits, target, reduction)
    return backend.ops.cross_entropy_fwd_bwd(z, t, reduction)


# --------------------------------------------------------------------------- optimisers

def _inplace_args(op, arrays, optional=()):
    """Validate the arrays of an in-place update: every one has the shape of the first
    (``param``, ``total``), every one but ``grad`` is written and so must be a writable
    C-contiguous array, and none overlaps another. Only those named in ``optional`` may be
    None."""
    if plain_numpy_update(arrays, optional):      # an optimiser's every step: checked at once
        return _backend.numpy_backend(), arrays
    return _checked_inplace_args(op, arrays, optional)


def _checked_inplace_args(op, arrays, optional):
    """``_inplace_args``'s checks one by one, with the error each failure deserves."""
    for name, a in arrays.items():       # before CuPy wraps it and forgets the flag
        if name != "grad" and exported_read_only(a):
            _not_updatable(op, name, a, "its __cuda_array_interface__ marks it read-only")
    backend, arr = prepare(op, arrays, optional=optional)
    ref_name = next(iter(arr))
    ref = arr[ref_name]
    for name, a in arr.items():
        if a is None:
            continue
        check_shape(op, name, a, ref.shape, f"the shape of {ref_name}")
        # CuPy's flags have no "writeable": device arrays are always writable.
        if name != "grad" and not (a.flags.c_contiguous and getattr(a.flags, "writeable", True)):
            _not_updatable(op, name, a,
                           "it is read-only" if not getattr(a.flags, "writeable", True)
                           else f"it is not C-contiguous (strides {tuple(a.strides)})")
    check_no_overlap(op, arr)
    return backend, arr


def _not_updatable(op, name, a, why):
    raise ValueError(f"{op}: argument {name!r} is updated in place and must be a writable "
                     f"C-contiguous array, but {why}: {describe(a)}")


@_op("accumulate")
def accumulate(total, grad):
    """In place, ``total += grad``, with the backend's own kernel: gradient accumulation
    (``Parameter.accumulate``, when a second backward runs before ``zero_grad``). Same shape,
    dtype and device; ``total`` a writable C-contiguous array, ``grad`` any layout, the two
    not overlapping."""
    backend, arr = _inplace_args("accumulate", {"total": total, "grad": grad})
    if arr["total"].size:
        _deferred_update(backend, "accumulate", (arr["total"], arr["grad"]))()


@_op("sgd_step")
def sgd_step(param, grad, momentum_buf=None, *, lr, momentum=0.0, weight_decay=0.0):
    """In place, PyTorch's SGD: g = grad + wd·param; with momentum, buf = momentum·buf + g
    (buf starts at zero) and g = buf; param -= lr·g. ``momentum_buf`` is required exactly
    when momentum > 0."""
    _checked_sgd_step(param, grad, momentum_buf, lr=lr, momentum=momentum,
                      weight_decay=weight_decay)()


def _checked_sgd_step(param, grad, momentum_buf=None, *, lr, momentum=0.0, weight_decay=0.0):
    """``sgd_step``'s validation alone: raises as ``sgd_step`` would, else returns the update
    as a function of no arguments (no range of its own). An optimiser checks every
    parameter this way before it updates any."""
    op = "sgd_step"
    lr = check_scalar(op, "lr", lr)
    momentum = check_scalar(op, "momentum", momentum)
    weight_decay = check_scalar(op, "weight_decay", weight_decay)
    if (momentum_buf is None) != (momentum == 0.0):
        raise ValueError(f"{op}: momentum_buf must be given exactly when momentum > 0 "
                         f"(momentum={momentum}, momentum_buf is "
                         f"{'None' if momentum_buf is None else 'given'})")
    backend, arr = _inplace_args(op, {"param": param, "grad": grad,
                                      "momentum_buf": momentum_buf},
                                 optional=("momentum_buf",))
    _check_scalars_fit(op, arr["param"], lr=lr, momentum=momentum, weight_decay=weight_decay)
    if not arr["param"].size:
        return _nothing
    return _deferred_update(backend, "sgd_step", (arr["param"], arr["grad"],
                                                  arr["momentum_buf"], lr, momentum,
                                                  weight_decay))


def _nothing():
    pass


_RAISING = frozenset({"raise", "call"})     # np.seterr modes that can stop an update midway

# Set while a caller that puts back everything itself (an optimiser's step under a raising
# NumPy) runs updates: _deferred_update's own copies would be a second, redundant snapshot.
_RESTORED_BY_CALLER = contextvars.ContextVar("cugrad_restored_by_caller", default=False)


def _numpy_may_raise() -> bool:
    """Whether a floating-point error in NumPy may raise, so that an in-place update could
    stop half written: NumPy set to raise (np.errstate(all="raise")) or to call a callback
    (which may raise), or set to warn while a warnings filter turns RuntimeWarning into an
    error (warnings.simplefilter("error"), python -W error, pytest -W error). NumPy raises
    after it has written the output."""
    modes = set(np.geterr().values())
    if not _RAISING.isdisjoint(modes):
        return True
    return "warn" in modes and _runtime_warnings_may_raise()


def _runtime_warnings_may_raise() -> bool:
    """Whether the warnings filters may turn NumPy's RuntimeWarning into an exception. They
    are read in order, as warnings.warn reads them: the first filter for all RuntimeWarnings
    (no message, module or line pattern) decides; one with a pattern that says "error" may
    apply, so it counts as yes (when in doubt, the update runs on copies); with none that
    decides, Python's default shows the warning."""
    for action, message, category, module, lineno in warnings.filters:
        if not issubclass(RuntimeWarning, category):
            continue
        if action == "error":
            return True
        if message is None and module is None and not lineno:
            return False
    return False


def _deferred_update(backend, name, args):
    """The backend's in-place op ``name`` on ``args`` (the written arrays first, then
    ``grad``, then the rest) as a function of no arguments. On NumPy, where a floating-point
    error may raise (``_numpy_may_raise``: np.errstate(all="raise"), warnings as errors),
    it runs on copies first: NumPy reports an error after it has written the output, and a
    call that raises must change nothing. Only a clean run is copied back."""
    op = getattr(backend.ops, name)
    if backend is not _backend.numpy_backend():
        return functools.partial(op, *args)

    def update():
        if not _numpy_may_raise() or _RESTORED_BY_CALLER.get():
            return op(*args)
        trial = [a.copy() if isinstance(a, np.ndarray) and i != 1 else a
                 for i, a in enumerate(args)]
        op(*trial)                  # may raise: nothing of the caller's is written yet
        for a, t in zip(args, trial):
            if t is not a:
                np.copyto(a, t)
    return update


_NORMAL_RANGE = {np.dtype(t): (float(np.finfo(t).tiny), float(np.finfo(t).max))
                 for t in (np.float32, np.float64)}


def _check_scalars_fit(op, param, **scalars):
    """Every non-zero hyperparameter is a normal number of the parameters' dtype. The update
    runs in that dtype: 1e-50 becomes 0 in float32 (so does a subnormal on the GPU, which
    flushes them), 1e39 becomes inf, and a weight decay, momentum or eps that silently turned
    0 changes the update (eps = 0: 0/0 at a zero gradient) or how NaN/Inf propagate."""
    tiny, huge = _NORMAL_RANGE[param.dtype]
    for name, value in scalars.items():
        if value and not tiny <= abs(value) <= huge:
            raise ValueError(
                f"{op}: {name}={value!r} is not representable as a normal {param.dtype} number "
                f"(the parameters' dtype: param is {describe(param)}); expected 0 or a "
                f"magnitude in [{tiny:.4g}, {huge:.4g}]")


@_op("adam_step")
def adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999,
              eps=1e-8, weight_decay=0.0):
    """In place, PyTorch's Adam (L2 weight decay added to the gradient): g = grad + wd·param,
    m = β₁m + (1 − β₁)g, v = β₂v + (1 − β₂)g², param -= lr/(1 − β₁ᵗ) · m / (√v/√(1 − β₂ᵗ) + eps)
    (MATH.md §5). ``step`` is the step number t (an integer, counting from 1) that sets the
    bias corrections 1 − β^t, or a step counter: a 0-d int64 array on the parameters'
    device holding the steps taken so far, which the op increments in place and then uses
    as t; it stops at 2**63 - 1, the largest int64, where both bias corrections are 1 in
    float64 whatever the betas. A counter is read on the device, so a CUDA graph's replays
    advance it (``optim.Adam(capturable=True)``); its value is not checked on the GPU (that
    would wait for the device): it must be >= 0."""
    _checked_adam_step(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=weight_decay)()


def _checked_adam_step(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1=0.9, beta2=0.999,
                       eps=1e-8, weight_decay=0.0):
    """``adam_step``'s validation alone, as ``_checked_sgd_step``: the update (and a
    counter's increment) happens only when the returned function is called."""
    op = "adam_step"
    counter = not isinstance(step, numbers.Integral) and hasattr(step, "dtype")
    if not counter and (isinstance(step, bool) or not isinstance(step, numbers.Integral)
                        or not 1 <= step <= _STEP_MAX):
        raise ValueError(f"{op}: step must be an integer in [1, 2**63 - 1] or a 0-d int64 "
                         f"step counter array, got {step!r}")
    lr = check_scalar(op, "lr", lr)
    beta1 = check_scalar(op, "beta1", beta1, high=1.0, high_open=True)
    beta2 = check_scalar(op, "beta2", beta2, high=1.0, high_open=True)
    eps = check_scalar(op, "eps", eps, low_open=True)   # eps = 0: 0/0 at a zero gradient
    weight_decay = check_scalar(op, "weight_decay", weight_decay)
    backend, arr = _inplace_args(op, {"param": param, "grad": grad, "exp_avg": exp_avg,
                                      "exp_avg_sq": exp_avg_sq})
    _check_scalars_fit(op, arr["param"], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                       weight_decay=weight_decay)
    if counter:
        step = _step_counter(op, step, arr)
    if not (arr["param"].size or counter):   # an empty parameter's counter still counts
        return _nothing
    return _deferred_update(backend, "adam_step",
                            (arr["param"], arr["grad"], arr["exp_avg"], arr["exp_avg_sq"],
                             step if counter else int(step), lr, beta1, beta2, eps,
                             weight_decay))


_STEP_MAX = 2**63 - 1       # the largest count an int64 step counter holds


def _step_counter(op, step, arrays):
    """``step`` as a step counter of the update of ``arrays`` (param first, checked): a 0-d
    int64 array on their device, sharing memory with none of them (writable; NumPy counters
    are also checked to hold a count >= 0)."""
    param = arrays["param"]
    device = _backend.device_of(param)
    if (_backend.device_of(step) != device or getattr(step, "shape", None) != ()
            or step.dtype != np.int64):
        raise ValueError(f"{op}: a step counter must be a 0-d int64 array on {device}, like "
                         f"param ({describe(param)}); got {describe(step)}")
    if device == "cpu":
        if not isinstance(step, np.ndarray) or not step.flags.writeable:
            raise ValueError(f"{op}: the step counter is incremented in place and must be a "
                             f"writable NumPy array, got {describe(step)}")
        if int(step) < 0:
            raise ValueError(f"{op}: the step counter holds {int(step)}, expected the number "
                             "of steps taken so far, >= 0")
    # Incremented in place, and read: its own array. Its own loop, not check_no_overlap
    # (which would check the other pairs again, and which the optimiser's fast path skips).
    for name, a in arrays.items():
        if a.size and shares_memory(step, a):
            raise ValueError(f"{op}: the step counter ({describe(step)}) shares memory with "
                             f"argument {name!r} ({describe(a)}); it is incremented in place "
                             "and must be its own array")
    return step
