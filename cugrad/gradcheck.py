"""Gradient tools (MATH.md §6): finite-difference checks of hand-written backwards.

cugrad has no autograd: every op comes with its backward. ``gradcheck`` compares such a
backward with central differences in float64; ``jacobian`` builds the explicit Jacobian,
the (out, in) tensor that MATH.md §6 contracts into an outer product.
"""

from __future__ import annotations

import numpy as np

from . import _backend
from ._arrays import to_numpy
from ._checks import check_scalar, describe, import_foreign, numpy_dtype, unwrap_parameter

__all__ = ["GradcheckError", "gradcheck", "jacobian"]


class GradcheckError(AssertionError):
    """A backward disagrees with finite differences."""


def _float64_copies(op, inputs):
    """Fresh C-contiguous float64 copies of the inputs, each on its own device."""
    out = []
    for i, x in enumerate(inputs):
        x = _foreign_in(op, f"input {i}", unwrap_parameter(x))    # a Parameter: its data
        if not hasattr(x, "dtype") or getattr(numpy_dtype(x), "kind", None) != "f":
            raise TypeError(f"{op}: input {i} must be a float array (float32 or float64; "
                            f"it is copied to float64), got {describe(x)}")
        if isinstance(x, (np.ndarray, np.generic)):
            x = np.array(x, dtype=np.float64, order="C", copy=True)   # 0-d for a scalar
        else:
            x = x.astype(np.float64, order="C", copy=True)
        # C order: _central_differences writes through a flat view of x.
        if not _all_finite(x):
            raise ValueError(f"{op}: input {i} holds NaN or infinity ({describe(x)}); finite "
                             "differences need a finite point")
        out.append(x)
    return out


def _foreign_in(op, what, x):
    """Another library's array (a PyTorch tensor) as a NumPy or CuPy array, taken through
    DLPack / the CUDA array interface as the ops take it; anything else as it is (one the
    ops refuse gets the caller's message)."""
    try:
        return import_foreign(op, what, x)
    except TypeError:
        return x


def _all_finite(a) -> bool:
    return bool((abs(a) < np.inf).all())     # NumPy or CuPy; False for NaN


def _check_eps(op, eps) -> float:
    return check_scalar(op, "eps", eps, low=0.0, low_open=True)


def _central_differences(op, values, x, eps, i=0):
    """(values() at x + eps·e_j − values() at x − eps·e_j) / step for every element j of x,
    perturbing x in place (a fresh C-contiguous float64 copy); step is the distance between
    the two points as float64 holds them (2eps up to rounding). An array of shape
    values().shape + x.shape. ValueError when eps does not move an element."""
    flat = x.reshape(-1)                    # a view: x is a fresh C-contiguous copy
    columns = []
    for j in range(flat.size):
        orig = float(flat[j])
        hi, lo = orig + eps, orig - eps
        if hi == orig or lo == orig:
            where = tuple(int(v) for v in np.unravel_index(j, x.shape))
            raise ValueError(f"{op}: eps={eps!r} does not change input {i}, element {where} "
                             f"(value {orig!r}) in float64; use a larger eps")
        flat[j] = hi
        plus = values()
        flat[j] = lo
        minus = values()
        flat[j] = orig
        columns.append((plus - minus) / (hi - lo))
    if not columns:                         # an empty x
        return np.empty(np.shape(values()) + tuple(x.shape))
    return np.stack(columns, axis=-1).reshape(np.shape(columns[0]) + tuple(x.shape))


def _output(op, y):
    """``fn``'s result checked: a real array (NumPy, CuPy or another library's) or number."""
    y = _foreign_in(op, "fn's result", y)
    if _backend.is_gpu_array(y):
        kind = getattr(numpy_dtype(y), "kind", None)
    elif isinstance(y, (np.ndarray, np.generic)):
        kind = y.dtype.kind
    elif isinstance(y, (int, float)) and not isinstance(y, bool):
        return y
    else:
        raise TypeError(f"{op}: fn must return an array or a number, got {describe(y)}")
    if kind not in "fiu":
        raise TypeError(f"{op}: fn must return a real array, got {describe(y)}")
    return y


def _host_float64(op, what, value):
    """``value`` (NumPy, CuPy, list, number) as a host float64 array; TypeError naming
    ``what`` unless it holds real numbers."""
    try:
        arr = np.asarray(to_numpy(value))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{op}: {what} must be an array of real numbers, got "
                        f"{describe(value)} ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"{op}: {what} must be an array of real numbers, got "
                        f"{describe(value)}")
    return arr.astype(np.float64)


def _first(mask):
    """Index tuple of the first True element of a boolean array."""
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(mask)), mask.shape))


def gradcheck(fn, *inputs, backward, grad_output=None, eps=1e-6, atol=1e-5, rtol=1e-4,
              seed=0):
    """Check ``backward`` against central differences of ``fn`` in float64.

    ``fn(*inputs)`` returns an array y (or a number); ``backward(grad_output, *inputs)``
    returns the gradients of ``sum(grad_output * y)`` with respect to each input (a tuple
    with one entry per input, None to skip one, not all; a single array when there is one
    input). ``grad_output`` has y's shape; it defaults to a seeded random array. Inputs are
    copied to float64 on their own device; ``fn`` and ``backward`` get fresh copies at
    each call (they may change them in place). ``eps`` > 0 must move every input element;
    ``atol``, ``rtol`` are finite and >= 0. Returns True, or raises GradcheckError naming
    the worst element, its analytic and numeric values and the error, or the first element
    where either gradient is not finite.
    """
    op = "gradcheck"
    eps = _check_eps(op, eps)
    atol = check_scalar(op, "atol", atol)
    rtol = check_scalar(op, "rtol", rtol)
    if not callable(fn):
        raise TypeError(f"{op}: fn must be a function of the inputs, got "
                        f"{type(fn).__name__} {fn!r}")
    if not callable(backward):
        raise TypeError(f"{op}: backward must be a function (grad_output, *inputs) -> "
                        f"gradients, got {type(backward).__name__} {backward!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{op}: seed must be a non-negative int (it seeds the default "
                        f"grad_output), got {type(seed).__name__} {seed!r}")
    if seed < 0:
        raise ValueError(f"{op}: seed must be a non-negative int (it seeds the default "
                         f"grad_output), got {seed!r}")
    xs = _float64_copies(op, inputs)
    # fn, as backward, gets its own copies at every call: one that changes an input in
    # place (an optimiser step, F.accumulate) would otherwise move the point the
    # differences are taken at, and the check would blame a correct backward.
    y = _output(op, fn(*(x.copy() for x in xs)))
    y_host = np.asarray(to_numpy(y), dtype=np.float64)
    y_shape = y_host.shape
    if not np.all(np.isfinite(y_host)):
        j = _first(~np.isfinite(y_host))
        raise GradcheckError(f"{op}: fn's output is {y_host[j]} at element {j}, so the "
                             "numeric gradient is not finite: finite differences need a "
                             "finite output")
    if grad_output is None:
        go_host = np.random.default_rng(seed).standard_normal(y_shape)
    else:
        go_host = _host_float64(op, "grad_output", grad_output)
        if go_host.shape != y_shape:
            raise ValueError(f"{op}: grad_output has shape {go_host.shape}, expected "
                             f"{y_shape} (the shape of fn's output)")
        if not np.all(np.isfinite(go_host)):
            raise ValueError(f"{op}: grad_output holds NaN or infinity")
    # backward gets its own copies: one that changed grad_output or an input in place would
    # otherwise move the reference it is checked against (the numeric side reads both).
    go = _like(y, go_host)
    analytic = backward(go, *(x.copy() for x in xs))
    if not isinstance(analytic, (tuple, list)):
        analytic = (analytic,)
    if len(analytic) != len(xs):
        raise ValueError(f"{op}: backward returned {len(analytic)} gradients for "
                         f"{len(xs)} inputs")
    if all(a is None for a in analytic):
        raise ValueError(f"{op}: backward returned None for every input: nothing to check")

    def scalar():
        return np.float64(np.sum(go_host * to_numpy(fn(*(x.copy() for x in xs)))))

    for i, (x, a) in enumerate(zip(xs, analytic)):
        if a is None:
            continue
        a = _host_float64(op, f"gradient {i} returned by backward", a)
        if a.shape != tuple(x.shape):
            raise GradcheckError(f"{op}: gradient {i} has shape {a.shape}, expected "
                                 f"{tuple(x.shape)} (the input's shape)")
        if not np.all(np.isfinite(a)):
            j = _first(~np.isfinite(a))
            raise GradcheckError(f"{op}: input {i}, element {j}: the analytic gradient is "
                                 f"{a[j]}")
        numeric = _central_differences(op, scalar, x, eps, i)
        if not np.all(np.isfinite(numeric)):
            j = _first(~np.isfinite(numeric))
            raise GradcheckError(
                f"{op}: input {i}, element {j}: the numeric gradient is {numeric[j]} "
                f"(analytic {a[j]:.10g}): fn is not differentiable there or not finite "
                f"within eps={eps!r} of it, or eps is too large")
        err = np.abs(a - numeric)
        excess = err - (atol + rtol * np.abs(numeric))
        if np.any(excess > 0) or not np.all(np.isfinite(excess)):
            j = np.unravel_index(int(np.argmax(np.where(np.isfinite(excess), excess, np.inf))),
                                 a.shape)
            raise GradcheckError(
                f"{op}: input {i}, element {tuple(int(v) for v in j)}: analytic "
                f"{a[j]:.10g}, numeric {numeric[j]:.10g}, |error| {err[j]:.3g} > atol {atol} "
                f"+ rtol {rtol} * |numeric|")
    return True


def _like(y, host):
    """A copy of ``host`` on y's device (NumPy unless y is a GPU array)."""
    if _backend.device_of(y) == "cpu":
        return host.copy()
    from ._arrays import asarray
    return asarray(host, device="cuda", dtype=np.float64)


def jacobian(fn, x, *, eps=1e-6):
    """The explicit Jacobian of ``fn`` at ``x`` by central differences in float64: a NumPy
    array of shape ``fn(x).shape + x.shape``, J[i..., j...] = d fn(x)[i...] / d x[j...].
    ``eps`` > 0 must move every element of x."""
    eps = _check_eps("jacobian", eps)
    x = _float64_copies("jacobian", [x])[0]
    # fn gets a copy of x at every call (one that changes its input in place would move
    # the point), and a copy is kept of each output: fn may return x itself or a view of it
    # (the identity, a transpose), which the next perturbation of x would change.
    return _central_differences(
        "jacobian",
        lambda: np.array(to_numpy(_output("jacobian", fn(x.copy()))), dtype=np.float64),
        x, eps)
