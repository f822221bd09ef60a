"""The NumPy backend: the CPU fallback and the specification every backend must match.

Plain, vectorised NumPy, one function per op of ``cugrad._backend.OPS``. Arguments arrive
validated (see ``_backend``). Temporaries are reused in place where the math allows, so a
training step costs little more than the same step written directly in NumPy.
"""

from __future__ import annotations

import numpy as np

from .._backend import implements

BACKEND = "numpy"


# ------------------------------------------------------------------ element-wise helpers

def _sigmoid_inplace(y: np.ndarray) -> np.ndarray:
    """y <- 1 / (1 + exp(-y)) without overflow: with e = exp(-|y|) <= 1,
    sigmoid(y) = 1/(1+e) for y >= 0 and e/(1+e) for y < 0."""
    e = np.abs(y)
    np.negative(e, out=e)
    np.exp(e, out=e)
    np.divide(np.where(y >= 0, 1.0, e).astype(y.dtype, copy=False), 1.0 + e, out=y)
    return y


def _apply_activation_inplace(name: str | None, y: np.ndarray) -> np.ndarray:
    if name is None:
        return y
    if name == "sigmoid":
        return _sigmoid_inplace(y)
    if name == "tanh":
        return np.tanh(y, out=y)
    if name == "relu":
        return np.maximum(y, 0, out=y)
    raise ValueError(f"unknown activation {name!r}")  # unreachable: functional validates


# ----------------------------------------------------------------------------- products

# A float32 product takes K in ranges of at most this many terms, each range's products added
# to the running total in order: a vector-shaped product goes to BLAS's dot or gemv, which
# keep one float32 sum per lane for the whole K (1.5e-4 off float64 at K = 2^25, past
# MATH.md §7's 1e-4). The CUDA GEMM splits at the same depth (config.GEMM_MAX_K_PER_SPLIT).
_MAX_K_PER_RANGE = 2**17


@implements(BACKEND, "gemm")
def gemm(a, b, trans_a, trans_b, bias, activation):
    # .T is a view: NumPy hands BLAS the transposed layout, no copy is made.
    a, b = (a.T if trans_a else a), (b.T if trans_b else b)
    k = a.shape[1]
    if a.dtype == np.float32 and k > _MAX_K_PER_RANGE:
        out = np.matmul(a[:, :_MAX_K_PER_RANGE], b[:_MAX_K_PER_RANGE])
        for start in range(_MAX_K_PER_RANGE, k, _MAX_K_PER_RANGE):
            stop = start + _MAX_K_PER_RANGE
            out += np.matmul(a[:, start:stop], b[start:stop])
    else:
        out = np.matmul(a, b)
    if bias is not None:
        out += bias
    return _apply_activation_inplace(activation, out)


# Column sums add _COLUMN_BLOCK rows at a time, then the blocks' sums the same way.
_COLUMN_BLOCK = 128


def _column_sum(g: np.ndarray) -> np.ndarray:
    """Σ over the rows of an (M, N) array, laid out in C order first. NumPy's ``g.sum(axis=0)`` adds one
    row after another into N running sums, so its error grows with M (float32, same-sign
    data: 8.7e-5 at M = 65536, 3.9e-3 at 2^20; MATH.md §7 allows 1e-4); in blocks of 128
    rows, then the blocks' sums in blocks, it grows with 128 × log_128(M) (3.5e-7 at 2^16,
    1.3e-7 at 2^20) at the same speed. The CUDA kernel also sums in chunks of rows."""
    g = np.ascontiguousarray(g)            # so that the blocks below are views
    while g.shape[0] > _COLUMN_BLOCK:
        whole = g.shape[0] // _COLUMN_BLOCK * _COLUMN_BLOCK
        sums = g[:whole].reshape(-1, _COLUMN_BLOCK, g.shape[1]).sum(axis=1)
        if whole < g.shape[0]:
            sums = np.concatenate([sums, g[whole:].sum(axis=0, keepdims=True)])
        g = sums
    return g.sum(axis=0)


@implements(BACKEND, "bias_grad")
def bias_grad(grad):
    return _column_sum(grad)


# -------------------------------------------------------------------------- activations

@implements(BACKEND, "activation_backward_bias_grad")
def activation_backward_bias_grad(name, grad_out, saved):
    if name == "relu":
        # The column sums say whether every masked product is finite (an infinite or NaN
        # term makes its column's sum non-finite), so the select's fallback needs no pass of
        # its own; a sum that overflows from finite terms only takes the fallback needlessly.
        grad_in = _relu_mask_product(grad_out, saved)
        grad_b = _column_sum(grad_in)
        if not np.isfinite(grad_b).all():
            grad_in = _relu_select(grad_out, saved)
            grad_b = _column_sum(grad_in)
        return grad_in, grad_b
    grad_in = activation_backward(name, grad_out, saved)
    return grad_in, _column_sum(grad_in)


@implements(BACKEND, "activation")
def activation(name, x):
    return _apply_activation_inplace(name, np.array(x, copy=True))


@implements(BACKEND, "activation_backward")
def activation_backward(name, grad_out, saved):
    if name == "sigmoid":          # dZ * z * (1 - z)
        out = 1.0 - saved
        out *= saved
    elif name == "tanh":           # dZ * (1 - z)(1 + z): no cancellation near |z| = 1
        out = 1.0 - saved
        out *= 1.0 + saved
    elif name == "relu":           # dZ * [z > 0]  (z > 0 exactly where y > 0)
        return _relu_backward(grad_out, saved)
    else:
        raise ValueError(f"unknown activation {name!r}")  # unreachable
    out *= grad_out
    return out


def _relu_backward(grad_out, saved):
    """The select ``dZ where z > 0 else 0`` (an infinite or NaN dZ under the mask gives 0,
    as the kernels' select does). Multiplying by the 0/1 mask is 3-10x faster than
    ``np.where`` and equal to the select whenever the product is finite (a NaN z gives mask
    0), up to the sign of a zero: a negative dZ under the mask gives -0.0 here, +0.0 from the
    select and the kernels (equal numbers). A non-finite product, rare, falls back to the
    select itself."""
    out = _relu_mask_product(grad_out, saved)
    if not np.isfinite(out).all():
        return _relu_select(grad_out, saved)
    return out


def _relu_mask_product(grad_out, saved):
    """``dZ * [z > 0]``: the select wherever the product is finite (-0.0 for a negative dZ
    under the mask)."""
    out = np.empty_like(grad_out)
    np.greater(saved, 0, out=out)
    with np.errstate(invalid="ignore"):      # inf * 0: the caller falls back to the select
        out *= grad_out
    return out


def _relu_select(grad_out, saved):
    return np.where(saved > 0, grad_out, np.zeros((), grad_out.dtype))


def _shift_exp_sm1(x):
    """Over the last axis: the shifted logits ``x - max``, their exponentials, and
    ``s - 1`` with ``s = Σ exp(x - max)`` (keepdims). The terms equal to 1 (the max and any
    tie) are counted rather than added, so ``s - 1`` keeps the small terms that ``s`` itself
    would round away in a confident row: ``ln s = log1p(s - 1)`` (losses.cu does the same).
    A NaN term is not equal to 1, so it is added and propagates. The rows are laid out in C
    order first: NumPy sums a contiguous row pairwise, a strided one (the rows of ``z.T``)
    one term after another (7.8e-5 off at C = 65536 in float32, against 5.7e-8)."""
    x = np.ascontiguousarray(x)
    shifted = x - x.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    ones = exp == 1
    sm1 = np.subtract(exp, ones, dtype=x.dtype).sum(axis=-1, keepdims=True)
    # Each row's count of ones, less 1, is added; it is 0 when every row has one 1: as many
    # ones as rows and no NaN row (only a row holding NaN or ±inf has no 1, and its s - 1 is
    # NaN), which two whole-array tests tell without a per-row count.
    if np.count_nonzero(ones) != sm1.size or not np.isfinite(sm1).all():
        sm1 += (ones.sum(axis=-1, keepdims=True) - 1).astype(x.dtype)
    return shifted, exp, sm1


@implements(BACKEND, "softmax")
def softmax(x):
    _, out, sm1 = _shift_exp_sm1(x)
    out /= 1 + sm1
    return out


@implements(BACKEND, "log_softmax")
def log_softmax(x):
    out, _, sm1 = _shift_exp_sm1(x)
    out -= np.log1p(sm1)
    return out


# ------------------------------------------------------------------------------- losses

_MSE_SCALE = {"sum": 1.0, "half_sum": 0.5}


def _mse_scale(reduction: str, n: int) -> float:
    return 1.0 / n if reduction == "mean" else _MSE_SCALE[reduction]


@implements(BACKEND, "mse_loss")
def mse_loss(pred, target, reduction):
    # NumPy's pairwise sum, not np.dot: BLAS dots accumulate float32 in float32 (relative
    # error ~2e-4 at 5e7 elements, against ~3e-8 for the pairwise sum).
    d = (pred - target).ravel()
    np.multiply(d, d, out=d)
    return np.asarray(d.sum() * _mse_scale(reduction, d.size), dtype=pred.dtype)


@implements(BACKEND, "mse_fwd_bwd")
def mse_fwd_bwd(pred, target, reduction):
    # (mse_loss, mse_loss_backward) with one difference pred - target, the same bits as the two.
    d = pred - target
    scale = _mse_scale(reduction, d.size)
    sq = np.multiply(d, d).ravel()
    loss = np.asarray(sq.sum() * scale, dtype=pred.dtype)
    d *= 2.0 * scale
    return loss, d


@implements(BACKEND, "mse_loss_backward")
def mse_loss_backward(pred, target, reduction):
    # d/dpred of scale * sum(d^2) = 2 * scale * d
    out = pred - target
    out *= 2.0 * _mse_scale(reduction, out.size)
    return out


def _xent_parts(logits, target, reduction):
    """Shared pass: shifted logits, their exponentials, s - 1 per row (``_shift_exp_sm1``),
    the reduction's scale, and the target (probabilities in C order, so that their row sums
    are pairwise, as the logits' are)."""
    n = logits.shape[0]
    shifted, exp, sm1 = _shift_exp_sm1(logits)
    scale = 1.0 / n if reduction == "mean" else 1.0
    return shifted, exp, sm1, scale, np.ascontiguousarray(target)


def _xent_loss(shifted, sm1, target, scale, dtype, rows=None):
    # L_row = logsumexp(z) - sum_i t_i z_i = log1p(s - 1) sum_i t_i - sum_i t_i (z_i - max)
    lse = np.log1p(sm1[:, 0])
    if target.ndim == 1:
        rows = np.arange(len(target)) if rows is None else rows
        lse -= shifted[rows, target]
    else:
        # A class of probability 0 contributes nothing, even at a logit of -inf (0·log 0 = 0,
        # as the kernel's skip of t = 0 terms gives): mask it before the product.
        picked = np.einsum("ij,ij->i", target, np.where(target != 0, shifted, 0))
        lse *= target.sum(axis=1)
        lse -= picked
    return np.asarray(lse.sum() * scale, dtype=dtype)


def _xent_grad(exp, sm1, target, scale, rows=None, shifted=None):
    # dL/dz = (softmax(z) * sum_i t_i - t) * scale = ((e sum_i t_i - t) - t (s - 1)) / s * scale
    # (sum_i t_i = 1 for class indices and proper probability rows: softmax - t). Taking t s
    # as t + t (s - 1) keeps the target at the max exact: -(s - 1) / s, where softmax - 1
    # rounds to 0 in a confident row. exp is reused as the output buffer.
    grad = exp
    if target.ndim == 1:
        rows = np.arange(grad.shape[0]) if rows is None else rows
        grad[rows, target] = (grad[rows, target] - 1) - sm1[:, 0]
    else:
        # At the max (e = 1), e sum_i t_i - t_c is sum_{i != c} t_i: formed as (the targets
        # at the max less t_c) + (the rest), not as a rounded sum_i t_i less t_c, which
        # cancels for a near-one-hot row (t_c = 1 - 1e-6: a 6e-8 rounding of the sum against
        # a difference of 1e-6). The kernel forms it the same way.
        at_max = shifted == 0
        t_max = np.where(at_max, target, 0).sum(axis=1, keepdims=True)
        t_rest = np.where(at_max, 0, target).sum(axis=1, keepdims=True)
        grad *= t_max + t_rest
        grad -= target
        np.copyto(grad, (t_max - target) + t_rest, where=at_max)
        grad -= target * sm1
    grad /= 1 + sm1
    if scale != 1.0:
        grad *= scale
    return grad


@implements(BACKEND, "cross_entropy")
def cross_entropy(logits, target, reduction):
    shifted, _, sm1, scale, target = _xent_parts(logits, target, reduction)
    return _xent_loss(shifted, sm1, target, scale, logits.dtype)


@implements(BACKEND, "cross_entropy_backward")
def cross_entropy_backward(logits, target, reduction):
    shifted, exp, sm1, scale, target = _xent_parts(logits, target, reduction)
    return _xent_grad(exp, sm1, target, scale, shifted=shifted)


@implements(BACKEND, "cross_entropy_fwd_bwd")
def cross_entropy_fwd_bwd(logits, target, reduction):
    shifted, exp, sm1, scale, target = _xent_parts(logits, target, reduction)
    rows = np.arange(len(target)) if target.ndim == 1 else None
    loss = _xent_loss(shifted, sm1, target, scale, logits.dtype, rows)
    return loss, _xent_grad(exp, sm1, target, scale, rows, shifted)


# --------------------------------------------------------------------------- optimisers

@implements(BACKEND, "accumulate")
def accumulate(total, grad):
    np.add(total, grad, out=total)


@implements(BACKEND, "sgd_step")
def sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay):
    g = grad
    if weight_decay != 0.0:
        g = grad + weight_decay * param
    if momentum_buf is not None:
        # buf starts at zero, so the first step gives buf = g, as PyTorch's clone does.
        momentum_buf *= momentum
        momentum_buf += g
        g = momentum_buf
    param -= lr * g


@implements(BACKEND, "adam_step")
def adam_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    if isinstance(step, np.ndarray):   # a step counter (0-d int64): count this step, use it
        if step < np.iinfo(np.int64).max:   # it stops there, as the kernel's does
            step += 1
        step = int(step)
    g = grad
    if weight_decay != 0.0:
        g = grad + weight_decay * param
    exp_avg *= beta1
    exp_avg += (1.0 - beta1) * g
    exp_avg_sq *= beta2
    exp_avg_sq += ((1.0 - beta2) * g) * g   # PyTorch's order: g² may overflow where v fits
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = (1.0 - beta2 ** step) ** 0.5
    denom = np.sqrt(exp_avg_sq)
    denom /= bias_correction2_sqrt
    denom += eps
    param -= (lr / bias_correction1) * (exp_avg / denom)
