"""The CUDA backend's ops: typed launchers around the kernels of ``kernels/*.cu``.

Each op takes the validated arguments of ``cugrad._backend.OPS``, makes its inputs
C-contiguous (a Fortran-ordered matmul operand is read in place by flipping its layout
flag instead), allocates outputs with ``ctx.empty`` and launches our kernels; all arithmetic
is in the kernels. Op bodies use only ``ctx.xp`` (shape and layout logic), ``ctx.empty`` and
``ctx.function``, so the same code runs on CuPy arrays (the GPU) and on NumPy arrays (the
CPU harness). Kernel scalars are NumPy scalars of an explicit C type; names come from
``config``, which also lists them for the compiler.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..._backend import implements
from . import config
from .config import scalar
from .context import current_context

BACKEND = "cuda"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_int32(what: str, value: int) -> None:
    if value > config.INT32_MAX:
        raise ValueError(f"cugrad: {what} = {value} exceeds 2^31 - 1, the largest size the CUDA "
                         "kernels index with 32-bit dimensions")


def _address(x) -> int:
    data = x.data
    return data.ptr if hasattr(data, "ptr") else x.__array_interface__["data"][0]


def _launch_elementwise(ctx, file: str, name: str, n: int, args: tuple) -> None:
    """One launcher for the grid-stride kernels over n elements (64-bit n)."""
    if n == 0:
        return
    blocks = min(_cdiv(n, config.ELEMENTWISE_THREADS), config.ELEMENTWISE_MAX_BLOCKS)
    ctx.function(file, name)((blocks, 1, 1), (config.ELEMENTWISE_THREADS, 1, 1), args)


# ----------------------------------------------------------------------------- products

def _gemm_operand(xp, x, trans: bool):
    """(array to pass, layout flag): x is read in place when C-contiguous, or through its
    C-contiguous transpose with the flag flipped when Fortran-contiguous."""
    if x.flags.c_contiguous:
        return x, trans
    if x.flags.f_contiguous:
        return x.T, not trans
    return xp.ascontiguousarray(x), trans


def _gemm(a, b, trans_a, trans_b, bias, activation, kernel: str):
    ctx = current_context()
    xp = ctx.xp
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    for what, size in (("M", m), ("N", n), ("K", k)):
        _check_int32(f"matmul size {what}", size)
    out = ctx.empty((m, n), a.dtype)
    if m == 0 or n == 0:
        return out
    width = _gemm_max_width(kernel, a.dtype.name)
    if n > width:
        # More column tiles than grid y holds (65535): the product a column band at a time,
        # each band a launch of its own (op(b)'s columns are b's rows when trans_b, a view).
        for j in range(0, n, width):
            cols = slice(j, min(j + width, n))
            band = _gemm(a, b[cols] if trans_b else b[:, cols], trans_a, trans_b,
                         None if bias is None else bias[cols], activation, kernel)
            out[:, cols] = band
        return out
    A, ta = _gemm_operand(xp, a, trans_a)
    B, tb = _gemm_operand(xp, b, trans_b)
    dtype = a.dtype.name
    epi = config.gemm_epilogue(bias is not None, activation)
    bias_arg = xp.ascontiguousarray(bias) if bias is not None else out   # never read without bias
    sizes = (np.int32(m), np.int32(n), np.int32(k))
    if kernel == "reference":
        tile = config.GEMM_REF_TILE
        grid = _gemm_grid(m, n, tile, tile)
        ctx.function("gemm.cu", config.gemm_reference_name(dtype, ta, tb, epi))(
            grid, (tile, tile, 1), (A, B, bias_arg, out, *sizes))
        return out
    plan = config.gemm_plan(m, n, k, dtype, ctx.sm_count)
    tiles = plan.tiles
    width = config.VEC_BYTES // a.dtype.itemsize
    # 16-byte vectors: both operands aligned, and each stored row a whole number of vectors.
    vec = all(_address(x) % config.VEC_BYTES == 0 and x.shape[1] % width == 0 for x in (A, B))
    grid = _gemm_grid(m, n, tiles.bm, tiles.bn, plan.splits)
    # Split-K: the K ranges' partial products without the epilogue, then their sum in order
    # with it.
    split = plan.splits > 1
    target = ctx.empty((plan.splits, m, n), a.dtype) if split else out
    ctx.function("gemm.cu", config.gemm_tiled_name(dtype, tiles, ta, tb, 0 if split else epi, vec))(
        grid, (tiles.threads, 1, 1), (A, B, bias_arg, target, *sizes, np.int32(plan.k_split)))
    if split:
        _launch_elementwise(ctx, "gemm.cu", config.gemm_split_sum_name(dtype, epi), m * n,
                            (target, bias_arg, out, np.int64(m * n), np.int32(n),
                             np.int32(plan.splits)))
    return out


def _gemm_max_width(kernel: str, dtype: str) -> int:
    """The widest output one launch of ``kernel`` covers whatever tile the plan picks:
    grid y holds the column tiles."""
    narrowest = (config.GEMM_REF_TILE if kernel == "reference"
                 else min(t.bn for t in config.GEMM_TILES[dtype]))
    return config.MAX_GRID_YZ * narrowest


def _gemm_grid(m: int, n: int, tile_m: int, tile_n: int, splits: int = 1) -> tuple[int, int, int]:
    grid = (_cdiv(m, tile_m), _cdiv(n, tile_n), splits)
    if grid[1] > config.MAX_GRID_YZ:
        raise ValueError(f"cugrad: matmul output width N = {n} needs {grid[1]} column tiles; "
                         f"the grid allows {config.MAX_GRID_YZ}")
    return grid


@implements(BACKEND, "gemm")
def gemm(a, b, trans_a, trans_b, bias, activation):
    return _gemm(a, b, trans_a, trans_b, bias, activation, kernel="tiled")


def gemm_reference(a, b, trans_a, trans_b, bias, activation):
    """The same product through gemm_reference, the simple kernel kept as GPU reference."""
    return _gemm(a, b, trans_a, trans_b, bias, activation, kernel="reference")


@implements(BACKEND, "bias_grad")
def bias_grad(grad):
    ctx = current_context()
    _check_int32("bias_grad width N", grad.shape[1])    # before any copy or allocation
    return _colsum(ctx, ctx.xp.ascontiguousarray(grad))


@implements(BACKEND, "activation_backward_bias_grad")
def activation_backward_bias_grad(name, grad_out, saved):
    ctx = current_context()
    _check_int32("bias_grad width N", grad_out.shape[1])    # before any copy or allocation
    g = ctx.xp.ascontiguousarray(grad_out)
    z = ctx.xp.ascontiguousarray(saved)
    grad_in = ctx.empty(g.shape, g.dtype)
    return grad_in, _colsum(ctx, g, name, z, grad_in)


def _colsum(ctx, g, activation=None, z=None, grad_in=None):
    """Column sums of g (M, N) -> (N,); with ``activation``, of grad_in = g ⊙ f'(z), which
    the first pass also writes."""
    m, n = g.shape
    _check_int32("bias_grad width N", n)
    out = ctx.empty((n,), g.dtype)
    if n == 0:
        return out
    dtype = g.dtype.name
    first = ctx.function("bias_grad.cu", config.colsum_name(dtype, activation))
    fused = (z, grad_in) if activation is not None else (g, g)     # unused without activation
    block = (config.COLSUM_COLS, config.COLSUM_LANES, 1)
    col_blocks = _cdiv(n, config.COLSUM_COLS)
    # Split M into chunks (a fixed function of M: deterministic), then sum the partials.
    rows_per_chunk = max(config.COLSUM_ROWS_PER_CHUNK, _cdiv(m, config.MAX_GRID_YZ))
    chunks = max(1, _cdiv(m, rows_per_chunk))
    if chunks == 1:
        first((col_blocks, 1, 1), block, (g, *fused, out, np.int64(m), np.int32(n), np.int64(max(m, 1))))
        return out
    partial = ctx.empty((chunks, n), g.dtype)
    first((col_blocks, chunks, 1), block,
          (g, *fused, partial, np.int64(m), np.int32(n), np.int64(rows_per_chunk)))
    ctx.function("bias_grad.cu", config.colsum_name(dtype))(
        (col_blocks, 1, 1), block,
        (partial, partial, partial, out, np.int64(chunks), np.int32(n), np.int64(chunks)))
    return out


# -------------------------------------------------------------------------- activations

@implements(BACKEND, "activation")
def activation(name, x):
    ctx = current_context()
    x = ctx.xp.ascontiguousarray(x)
    out = ctx.empty(x.shape, x.dtype)
    _launch_elementwise(ctx, "activations.cu", config.activation_name("fwd", x.dtype.name, name),
                        x.size, (x, out, np.int64(x.size)))
    return out


@implements(BACKEND, "activation_backward")
def activation_backward(name, grad_out, saved):
    ctx = current_context()
    g = ctx.xp.ascontiguousarray(grad_out)
    z = ctx.xp.ascontiguousarray(saved)
    out = ctx.empty(g.shape, g.dtype)
    _launch_elementwise(ctx, "activations.cu", config.activation_name("bwd", g.dtype.name, name),
                        g.size, (g, z, out, np.int64(g.size)))
    return out


# ------------------------------------------------------------------- row-wise and losses

def _row_launch(ctx, name: str, rows: int, cols: int, args: tuple) -> None:
    """One warp per row, ROW_WARPS rows a block, grid-stride over rows."""
    if cols == 0:
        raise ValueError("cugrad: a row-wise op needs at least one column")
    _check_int32("row length C", cols)
    blocks = min(_cdiv(rows, config.ROW_WARPS), config.ROW_MAX_BLOCKS)
    ctx.function("losses.cu", name)((blocks, 1, 1), (32 * config.ROW_WARPS, 1, 1), args)


def _softmax(x, log: bool):
    ctx = current_context()
    _check_int32("row length C", x.shape[1])     # before any copy or allocation
    x = ctx.xp.ascontiguousarray(x)
    rows, cols = x.shape
    out = ctx.empty(x.shape, x.dtype)
    if rows:
        _row_launch(ctx, config.softmax_name(x.dtype.name, log), rows, cols,
                    (x, out, np.int64(rows), np.int32(cols)))
    return out


@implements(BACKEND, "softmax")
def softmax(x):
    return _softmax(x, log=False)


@implements(BACKEND, "log_softmax")
def log_softmax(x):
    return _softmax(x, log=True)


def _sum(ctx, a, b, n: int, scale: float):
    """0-d array: scale * Σ a_i, or scale * Σ (a_i - b_i)² when b is given; deterministic
    (the split into blocks depends on n only, each block and the final pass sum in a fixed
    order)."""
    second_arg = b if b is not None else a      # never read when summing a alone
    first = ctx.function("losses.cu", config.sum_reduce_name(a.dtype.name, b is not None))
    return _block_sums(ctx, first, (a, second_arg), (), n, a.dtype, scale)


def _block_sums(ctx, first, inputs: tuple, extra: tuple, n: int, dtype, scale: float):
    """Launch ``first`` (sum_reduce's shape: (*inputs, out, n, per_block, scale, *extra)) over
    n elements and sum its per-block partials: one block when n is small, else at most
    REDUCE_MAX_BLOCKS partials (the split a function of n only) summed by sum_reduce."""
    out = ctx.empty((), dtype)
    block = (config.REDUCE_THREADS, 1, 1)
    if n <= 2 * config.REDUCE_MIN_PER_BLOCK:
        first((1, 1, 1), block, (*inputs, out, np.int64(n), np.int64(max(n, 1)),
                                 scalar(dtype, scale), *extra))
        return out
    per_block = max(config.REDUCE_MIN_PER_BLOCK, _cdiv(n, config.REDUCE_MAX_BLOCKS))
    blocks = _cdiv(n, per_block)
    partial = ctx.empty((blocks,), dtype)
    first((blocks, 1, 1), block, (*inputs, partial, np.int64(n), np.int64(per_block),
                                  scalar(dtype, 1.0), *extra))
    final = ctx.function("losses.cu", config.sum_reduce_name(dtype.name, False))
    final((1, 1, 1), block, (partial, partial, out, np.int64(blocks), np.int64(blocks), scalar(dtype, scale)))
    return out


def _xent(logits, target, reduction, want_loss: bool, want_grad: bool):
    ctx = current_context()
    xp = ctx.xp
    _check_int32("row length C", logits.shape[1])     # before any copy or allocation
    z = xp.ascontiguousarray(logits)
    t = xp.ascontiguousarray(target)
    rows, cols = z.shape
    dtype = z.dtype
    scale = 1.0 / rows if (reduction == "mean" and rows) else 1.0
    row_loss = ctx.empty((rows,), dtype)
    grad = ctx.empty((rows, cols), dtype) if want_grad else row_loss   # never written without grad
    if rows:
        name = config.xent_name(dtype.name, class_index=(t.ndim == 1), grad=want_grad)
        _row_launch(ctx, name, rows, cols, (z, t, row_loss, grad, np.int64(rows), np.int32(cols),
                                            scalar(dtype, scale)))
    loss = _sum(ctx, row_loss, None, rows, scale) if want_loss else None
    return loss, (grad if want_grad else None)


@implements(BACKEND, "cross_entropy")
def cross_entropy(logits, target, reduction):
    return _xent(logits, target, reduction, want_loss=True, want_grad=False)[0]


@implements(BACKEND, "cross_entropy_backward")
def cross_entropy_backward(logits, target, reduction):
    return _xent(logits, target, reduction, want_loss=False, want_grad=True)[1]


@implements(BACKEND, "cross_entropy_fwd_bwd")
def cross_entropy_fwd_bwd(logits, target, reduction):
    return _xent(logits, target, reduction, want_loss=True, want_grad=True)


_MSE_SCALE = {"sum": 1.0, "half_sum": 0.5}


def _mse_scale(reduction: str, n: int) -> float:
    if reduction == "mean":
        return 1.0 / n if n else math.nan
    return _MSE_SCALE[reduction]


@implements(BACKEND, "mse_loss")
def mse_loss(pred, target, reduction):
    ctx = current_context()
    p = ctx.xp.ascontiguousarray(pred)
    t = ctx.xp.ascontiguousarray(target)
    return _sum(ctx, p, t, p.size, _mse_scale(reduction, p.size))


@implements(BACKEND, "mse_loss_backward")
def mse_loss_backward(pred, target, reduction):
    ctx = current_context()
    p = ctx.xp.ascontiguousarray(pred)
    t = ctx.xp.ascontiguousarray(target)
    out = ctx.empty(p.shape, p.dtype)
    scale2 = 2.0 * _mse_scale(reduction, p.size)
    _launch_elementwise(ctx, "losses.cu", config.mse_grad_name(p.dtype.name), p.size,
                        (p, t, out, np.int64(p.size), scalar(p.dtype, scale2)))
    return out


@implements(BACKEND, "mse_fwd_bwd")
def mse_fwd_bwd(pred, target, reduction):
    """(mse_loss, mse_loss_backward) in one pass over pred and target, bit for bit."""
    ctx = current_context()
    p = ctx.xp.ascontiguousarray(pred)
    t = ctx.xp.ascontiguousarray(target)
    grad = ctx.empty(p.shape, p.dtype)
    scale = _mse_scale(reduction, p.size)
    first = ctx.function("losses.cu", config.mse_fwd_bwd_name(p.dtype.name))
    # The kernel's arguments (pred, target, grad, out, n, per_block, scale, scale2): grad
    # among _block_sums' inputs, scale2 its one extra argument.
    loss = _block_sums(ctx, first, (p, t, grad), (scalar(p.dtype, 2.0 * scale),), p.size,
                       p.dtype, scale)
    return loss, grad


# --------------------------------------------------------------------------- optimisers

def _check_in_place(**arrays) -> None:
    for what, x in arrays.items():
        if x is not None and not x.flags.c_contiguous:
            raise ValueError(f"cugrad: the optimiser updates {what} in place; it must be C-contiguous")


@implements(BACKEND, "accumulate")
def accumulate(total, grad):
    ctx = current_context()
    _check_in_place(total=total)
    _launch_elementwise(ctx, "optim.cu", config.accumulate_name(total.dtype.name), total.size,
                        (total, ctx.xp.ascontiguousarray(grad), np.int64(total.size)))


@implements(BACKEND, "sgd_step")
def sgd_step(param, grad, momentum_buf, lr, momentum, weight_decay):
    ctx = current_context()
    _check_in_place(param=param, momentum_buf=momentum_buf)
    g = ctx.xp.ascontiguousarray(grad)
    dt = param.dtype
    buf = momentum_buf if momentum_buf is not None else param   # never touched without momentum
    _launch_elementwise(ctx, "optim.cu", config.sgd_name(dt.name, momentum_buf is not None), param.size,
                        (param, g, buf, np.int64(param.size), scalar(dt, lr), scalar(dt, momentum),
                         scalar(dt, weight_decay)))


@implements(BACKEND, "adam_step")
def adam_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay):
    ctx = current_context()
    _check_in_place(param=param, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    g = ctx.xp.ascontiguousarray(grad)
    dt = param.dtype
    arrays = (param, g, exp_avg, exp_avg_sq, np.int64(param.size))
    moments = (scalar(dt, beta1), scalar(dt, 1.0 - float(beta1)), scalar(dt, beta2),
               scalar(dt, 1.0 - float(beta2)), scalar(dt, eps), scalar(dt, weight_decay))
    if not isinstance(step, numbers.Integral):
        # A step counter in device memory (0-d int64): counted and read on the device, so a
        # CUDA graph's replays advance t. Two launches, in stream order.
        ctx.function("optim.cu", config.COUNTER_INCREMENT)((1, 1, 1), (1, 1, 1), (step,))
        _launch_elementwise(ctx, "optim.cu", config.adam_counted_name(dt.name), param.size,
                            (*arrays, step, np.float64(lr), np.float64(beta1), np.float64(beta2),
                             *moments))
        return
    # Bias corrections on the host, in float64 (PyTorch's formulation).
    step_size = float(lr) / (1.0 - float(beta1) ** int(step))
    bc2_sqrt = math.sqrt(1.0 - float(beta2) ** int(step))
    _launch_elementwise(ctx, "optim.cu", config.adam_name(dt.name), param.size,
                        (*arrays, scalar(dt, step_size), *moments, scalar(dt, bc2_sqrt)))
