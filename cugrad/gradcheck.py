"""Gradient tools (seed 004): finite-difference checks of hand-written backwards.

cugrad has no autograd: every op comes with its backward. ``gradcheck`` compares such a
backward with central differences in float64; ``jacobian`` builds the explicit Jacobian,
the (out, in) tensor that MATH.md §6 contracts into an outer product.
"""

from __future__ import annotations

import numpy as np

from ._arrays import to_numpy

__all__ = ["GradcheckError", "gradcheck", "jacobian"]


class GradcheckError(AssertionError):
    """A backward disagrees with finite differences."""


def _float64_copies(inputs):
    out = []
    for i, x in enumerate(inputs):
        if not hasattr(x, "dtype") or np.dtype(x.dtype).kind != "f":
            raise TypeError(f"gradcheck: input {i} must be a float array, got "
                            f"{type(x).__name__}")
        out.append(x.astype(np.float64, copy=True))   # stays on its device
    return out


def _central_differences(values, x, eps):
    """(values() at x + eps·e_j − values() at x − eps·e_j) / 2eps for every element j of x,
    perturbing x in place (a fresh float64 copy): an array of shape values().shape + x.shape."""
    flat = x.reshape(-1)                    # a view: x is a fresh C-contiguous copy
    columns = []
    for j in range(flat.size):
        orig = float(flat[j])
        flat[j] = orig + eps
        plus = values()
        flat[j] = orig - eps
        minus = values()
        flat[j] = orig
        columns.append((plus - minus) / (2.0 * eps))
    if not columns:                         # an empty x
        return np.empty(np.shape(values()) + tuple(x.shape))
    return np.stack(columns, axis=-1).reshape(np.shape(columns[0]) + tuple(x.shape))


def gradcheck(fn, *inputs, backward, grad_output=None, eps=1e-6, atol=1e-5, rtol=1e-4,
              seed=0):
    """Check ``backward`` against central differences of ``fn`` in float64.

    ``fn(*inputs)`` returns an array y; ``backward(grad_output, *inputs)`` returns the
    gradients of ``sum(grad_output * y)`` with respect to each input (a tuple with one entry
    per input, None to skip one; a single array when there is one input). ``grad_output``
    defaults to a seeded random array of y's shape. Inputs are copied to float64 on their
    own device. Returns True, or raises GradcheckError naming the worst element, its
    analytic and numeric values and the error.
    """
    xs = _float64_copies(inputs)
    y = fn(*xs)
    if grad_output is None:
        grad_output = np.random.default_rng(seed).standard_normal(np.shape(y))
    go_host = np.asarray(to_numpy(grad_output), dtype=np.float64)
    go = _like(y, go_host)
    analytic = backward(go, *xs)
    if not isinstance(analytic, (tuple, list)):
        analytic = (analytic,)
    if len(analytic) != len(xs):
        raise ValueError(f"gradcheck: backward returned {len(analytic)} gradients for "
                         f"{len(xs)} inputs")

    def scalar():
        return np.float64(np.sum(go_host * to_numpy(fn(*xs))))

    for i, (x, a) in enumerate(zip(xs, analytic)):
        if a is None:
            continue
        a = np.asarray(to_numpy(a), dtype=np.float64)
        if a.shape != tuple(x.shape):
            raise GradcheckError(f"gradcheck: gradient {i} has shape {a.shape}, expected "
                                 f"{tuple(x.shape)} (the input's shape)")
        numeric = _central_differences(scalar, x, eps)
        err = np.abs(a - numeric)
        excess = err - (atol + rtol * np.abs(numeric))
        if not np.all(np.isfinite(a)) or np.any(excess > 0):
            j = np.unravel_index(int(np.nanargmax(np.where(np.isfinite(a), excess, np.inf))),
                                 a.shape)
            raise GradcheckError(
                f"gradcheck: input {i}, element {tuple(int(v) for v in j)}: analytic "
                f"{a[j]:.10g}, numeric {numeric[j]:.10g}, |error| {err[j]:.3g} > atol {atol} "
                f"+ rtol {rtol} * |numeric|")
    return True


def _like(y, host):
    """``host`` as an array on y's device."""
    if isinstance(y, np.ndarray):
        return host
    from ._arrays import asarray
    return asarray(host, device="cuda", dtype=np.float64)


def jacobian(fn, x, *, eps=1e-6):
    """The explicit Jacobian of ``fn`` at ``x`` by central differences in float64: a NumPy
    array of shape ``fn(x).shape + x.shape``, J[i..., j...] = d fn(x)[i...] / d x[j...]."""
    x = _float64_copies([x])[0]
    return _central_differences(lambda: np.asarray(to_numpy(fn(x)), dtype=np.float64), x, eps)
