"""The one table of kernel tunables and launch configurations, and the kernel names.

Everything the CUDA backend launches is named here: ``instantiations()`` lists, per
compiled module (a kernel file plus its compile options), every template instantiation
the launchers can ask for. The loader compiles exactly these; the nvcc check in
``tests/test_cuda_compile.py`` compiles exactly these; the launchers build their names
with the ``*_name`` functions below, so a launcher cannot ask for a kernel that is not
compiled. Benchmarks sweep the tunables by editing (or monkeypatching) this table.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

# Common NVRTC/nvcc options for every module. No fast-math (no approximate division, square
# root or exp): accuracy is the contract. -ftz=true is CuPy's, not a choice of ours: CuPy
# appends it to every RawModule/RawKernel compile after the caller's options, and the last
# -ftz wins, so float32 subnormals are flushed to zero on the GPU (inputs and results of
# float32 arithmetic; float64 is unaffected). It is named here so that every other build of
# these modules (the nvcc check, `cugrad compile`, sass_report.py) compiles what runs.
BASE_OPTIONS: tuple[str, ...] = ("-std=c++17", "-ftz=true")

# C++ scalar type per dtype name.
CTYPES = {"float32": "float", "float64": "double"}
DTYPES = tuple(CTYPES)

# Activation codes, as CUGRAD_ACT_* in kernels/common.cuh.
ACTIVATIONS = {None: 0, "sigmoid": 1, "tanh": 2, "relu": 3}
EPI_BIAS = 4   # CUGRAD_EPI_BIAS in kernels/gemm.cu


@dataclass(frozen=True)
class GemmTiles:
    """gemm_tiled's block tile BM x BN, depth BK, per-thread tile TM x TN; min_blocks is the
    resident blocks per SM its 16-byte-vector variants ask of the compiler
    (``__launch_bounds__``), which caps their registers at 65536 / (threads * min_blocks).
    The kernel takes them as its ``GemmTile<...>`` template argument."""
    bm: int
    bn: int
    bk: int
    tm: int
    tn: int
    min_blocks: int = 1

    @property
    def threads(self) -> int:
        return (self.bm // self.tm) * (self.bn // self.tn)

    @property
    def template(self) -> str:
        return (f"GemmTile<{self.bm}, {self.bn}, {self.bk}, {self.tm}, {self.tn}, "
                f"{self.min_blocks}>")


# Per dtype, largest first (gemm_plan takes the first that fills the GPU). Doubles take half
# the register tile (an 8x8 double tile needs ~216 registers).
GEMM_TILES = {
    "float32": (
        # 2 blocks an SM caps the vector variants at 128 registers, without spills (ptxas -v, sm_90)
        GemmTiles(bm=128, bn=128, bk=8, tm=8, tn=8, min_blocks=2),   # 256 threads
        GemmTiles(bm=64, bn=64, bk=8, tm=4, tn=4),                   # 256 threads
    ),
    "float64": (
        GemmTiles(bm=64, bn=64, bk=8, tm=4, tn=4),                   # 256 threads
    ),
}
# Split-K (gemm_plan): at most K // GEMM_SPLIT_MIN_K splits (so a split is about this deep or
# more; the last one, the remainder after whole k-tile ranges, may be shallower) and at most
# GEMM_MAX_SPLITS.
GEMM_SPLIT_MIN_K = 64
GEMM_MAX_SPLITS = 16
# Accuracy: no thread sums more than this many products in its register, whatever the
# output's size; a longer K is split (the partial products are then added in order). A
# float32 running sum of same-sign terms loses the small ones once it is large: products of
# U[0, 1) data are 1.4e-4 off at K = 2^20 (MATH.md §7 allows 1e-4), 6e-6 at 2^17. A multiple
# of every tile's depth; splits past GEMM_MAX_SPLITS are taken for it (at most 2^14, K < 2^31).
GEMM_MAX_K_PER_SPLIT = 2**17
GEMM_REF_TILE = 16          # gemm_reference: REF_TILE x REF_TILE threads, one output each
VEC_BYTES = 16              # gemm_tiled VEC=1 reads 16-byte vectors

ELEMENTWISE_THREADS = 256   # activations, mse_grad, optimisers (grid-stride loops)
ELEMENTWISE_MAX_BLOCKS = 8192

ROW_WARPS = 8               # softmax / cross-entropy: one warp per row, 8 rows a block
ROW_MAX_BLOCKS = 65535

COLSUM_COLS = 32            # bias_grad_colsum block (COLSUM_COLS, COLSUM_LANES)
COLSUM_LANES = 8
COLSUM_ROWS_PER_CHUNK = 512  # split-M: rows summed by one block before the second pass

REDUCE_THREADS = 256        # sum_reduce block
REDUCE_MIN_PER_BLOCK = 8192  # elements per block at least; a single block below 2x this
REDUCE_MAX_BLOCKS = 1024    # partials summed by the second pass

MAX_GRID_YZ = 65535
INT32_MAX = 2**31 - 1

# ------------------------------------------------------------------------ module table


def module_options(file: str, reference: bool = False) -> list[str]:
    """Compile options of the modules of ``file`` (gemm.cu's reference module: ``reference``)."""
    opts = list(BASE_OPTIONS)
    if file == "gemm.cu" and reference:
        opts.append(f"-DGEMM_REF_TILE={GEMM_REF_TILE}")
    elif file == "bias_grad.cu":
        opts += [f"-DCOLSUM_COLS={COLSUM_COLS}", f"-DCOLSUM_LANES={COLSUM_LANES}"]
    elif file == "losses.cu":
        opts += [f"-DROW_WARPS={ROW_WARPS}", f"-DREDUCE_THREADS={REDUCE_THREADS}"]
    return opts


def gemm_epilogue(has_bias: bool, activation: str | None) -> int:
    return ACTIVATIONS[activation] | (EPI_BIAS if has_bias else 0)


def gemm_tiled_name(dtype: str, tiles: GemmTiles, ta: bool, tb: bool, epi: int, vec: bool) -> str:
    return f"gemm_tiled<{CTYPES[dtype]}, {tiles.template}, {int(ta)}, {int(tb)}, {epi}, {int(vec)}>"


def gemm_split_sum_name(dtype: str, epi: int) -> str:
    return f"gemm_split_sum<{CTYPES[dtype]}, {epi}>"


@dataclass(frozen=True)
class GemmPlan:
    """How one product is launched: its tile, and K cut into ``splits`` ranges of
    ``k_split`` (a multiple of the tile's depth; ``splits == 1`` and ``k_split == K``
    without split-K)."""
    tiles: GemmTiles
    splits: int
    k_split: int

    @classmethod
    def split_k(cls, tiles: GemmTiles, k: int, splits: int) -> "GemmPlan":
        """K cut into ``splits`` ranges, each rounded up to whole k-tiles (so there may be
        fewer); one range of K when that leaves a single one."""
        k_split = -(-(-(-k // max(splits, 1))) // tiles.bk) * tiles.bk
        if splits <= 1 or k_split >= k:
            return cls(tiles, 1, k)
        return cls(tiles, -(-k // k_split), k_split)


def gemm_plan(m: int, n: int, k: int, dtype: str, sm_count: int) -> GemmPlan:
    """The tile and K split for an (M x K) (K x N) product on a GPU of ``sm_count`` SMs.

    The largest tile whose grid has at least one block per SM; else the smallest tile, with
    K split so that the grid covers the SMs, into at most K // GEMM_SPLIT_MIN_K splits
    (small outputs with a long K, as in a small batch's dW). A first heuristic (wave
    counting), to be tuned by measurement: profiling/NOTES.md. Either way K is cut into
    ranges of at most GEMM_MAX_K_PER_SPLIT (accuracy, not speed)."""
    table = GEMM_TILES[dtype]
    deep = -(-k // GEMM_MAX_K_PER_SPLIT)        # the splits accuracy asks for (1 up to the cap)
    for tiles in table:
        blocks = -(-m // tiles.bm) * -(-n // tiles.bn)
        if blocks >= sm_count:
            return GemmPlan.split_k(tiles, k, deep)
    tiles = table[-1]
    blocks = -(-m // tiles.bm) * -(-n // tiles.bn)
    splits = min(-(-sm_count // blocks), k // GEMM_SPLIT_MIN_K, GEMM_MAX_SPLITS)
    return GemmPlan.split_k(tiles, k, max(splits, deep))


def gemm_reference_name(dtype: str, ta: bool, tb: bool, epi: int) -> str:
    return f"gemm_reference<{CTYPES[dtype]}, {int(ta)}, {int(tb)}, {epi}>"


def activation_name(direction: str, dtype: str, activation: str) -> str:
    return f"activation_{direction}<{CTYPES[dtype]}, {ACTIVATIONS[activation]}>"


def colsum_name(dtype: str, activation: str | None = None) -> str:
    return f"bias_grad_colsum<{CTYPES[dtype]}, {ACTIVATIONS[activation]}>"


def softmax_name(dtype: str, log: bool) -> str:
    return f"softmax_rows<{CTYPES[dtype]}, {int(log)}>"


def xent_name(dtype: str, class_index: bool, grad: bool) -> str:
    target = "long long" if class_index else CTYPES[dtype]
    return f"softmax_xent_fwd_bwd<{CTYPES[dtype]}, {target}, {int(grad)}>"


def sum_reduce_name(dtype: str, sqdiff: bool) -> str:
    return f"sum_reduce<{CTYPES[dtype]}, {int(sqdiff)}>"


def mse_grad_name(dtype: str) -> str:
    return f"mse_grad<{CTYPES[dtype]}>"


def mse_fwd_bwd_name(dtype: str) -> str:
    return f"mse_fwd_bwd<{CTYPES[dtype]}>"


def sgd_name(dtype: str, momentum: bool) -> str:
    return f"sgd_step<{CTYPES[dtype]}, {int(momentum)}>"


def adam_name(dtype: str) -> str:
    return f"adam_step<{CTYPES[dtype]}>"


def adam_counted_name(dtype: str) -> str:
    return f"adam_step_counted<{CTYPES[dtype]}>"


COUNTER_INCREMENT = "counter_increment<long long>"


def accumulate_name(dtype: str) -> str:
    return f"accumulate<{CTYPES[dtype]}>"


_EPILOGUES = [gemm_epilogue(bias, act) for bias in (False, True) for act in ACTIVATIONS]
_BOOLS = (False, True)


def instantiations() -> list[tuple[str, list[str], list[str]]]:
    """[(file, compile options, [every name expression the backend can launch from it])]."""
    table: list[tuple[str, list[str], list[str]]] = []
    for dt in DTYPES:
        for tiles in GEMM_TILES[dt]:        # one module per tile: compiled when first used
            table.append(("gemm.cu", module_options("gemm.cu"), [
                gemm_tiled_name(dt, tiles, ta, tb, epi, vec)
                for ta, tb, epi, vec in itertools.product(_BOOLS, _BOOLS, _EPILOGUES, _BOOLS)]))
    table.append(("gemm.cu", module_options("gemm.cu"), [
        gemm_split_sum_name(dt, epi) for dt, epi in itertools.product(DTYPES, _EPILOGUES)]))
    table.append(("gemm.cu", module_options("gemm.cu", reference=True), [
        gemm_reference_name(dt, ta, tb, epi)
        for dt, ta, tb, epi in itertools.product(DTYPES, _BOOLS, _BOOLS, _EPILOGUES)]))
    table.append(("bias_grad.cu", module_options("bias_grad.cu"),
                  [colsum_name(dt, act) for dt, act in itertools.product(DTYPES, ACTIVATIONS)]))
    acts = [a for a in ACTIVATIONS if a is not None]
    table.append(("activations.cu", module_options("activations.cu"), [
        activation_name(d, dt, a) for d, dt, a in itertools.product(("fwd", "bwd"), DTYPES, acts)]))
    table.append(("losses.cu", module_options("losses.cu"), [
        *(softmax_name(dt, log) for dt, log in itertools.product(DTYPES, _BOOLS)),
        *(xent_name(dt, ci, g) for dt, ci, g in itertools.product(DTYPES, _BOOLS, _BOOLS)),
        *(sum_reduce_name(dt, sq) for dt, sq in itertools.product(DTYPES, _BOOLS)),
        *(mse_grad_name(dt) for dt in DTYPES),
        *(mse_fwd_bwd_name(dt) for dt in DTYPES)]))
    table.append(("optim.cu", module_options("optim.cu"), [
        *(sgd_name(dt, mom) for dt, mom in itertools.product(DTYPES, _BOOLS)),
        *(adam_name(dt) for dt in DTYPES),
        *(adam_counted_name(dt) for dt in DTYPES),
        COUNTER_INCREMENT,
        *(accumulate_name(dt) for dt in DTYPES)]))
    return table


def module_of(file: str, name_expression: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compile options, name expressions) of the module of ``instantiations()`` holding this
    kernel; KeyError if none does."""
    return _module_index()[(file, name_expression)]


_INDEX: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] | None = None


def _module_index() -> dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]]:
    global _INDEX
    if _INDEX is None:
        index: dict[tuple[str, str], tuple[tuple[str, ...], tuple[str, ...]]] = {}
        for file, options, names in instantiations():
            for name in names:
                if (file, name) in index:
                    raise RuntimeError(f"cugrad: {file}: {name} is listed in two modules")
                index[(file, name)] = (tuple(options), tuple(names))
        _INDEX = index
    return _INDEX


def scalar(dtype, value):
    """A kernel scalar argument of the array dtype (numpy.float32 / numpy.float64)."""
    return np.dtype(dtype).type(value)
