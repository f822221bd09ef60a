"""Edge cases of the CUDA kernels and their launchers, on the CPU harness (tests/cuda_harness).

tests/test_kernels_cpu.py runs every instantiation at small odd shapes; this file goes to the
edges where kernels and launchers usually break: K = 0 and K = 1 products, one-row and
one-column outputs, K at and around the split-K thresholds of config.gemm_plan, M and N at
the tile sizes ±1, the 16-byte vector path against misaligned operands and leading
dimensions that are not whole vectors, column sums around the split-M chunk, row-wise ops
around the warp width, reductions around the one-block / multi-block thresholds, element-wise
kernels around the block size and with NaN/±Inf inputs, optimiser steps around the block size,
and bitwise determinism of the reductions under other thread schedules.

Every op runs through the CUDA backend's own launcher (cugrad/backends/cuda/ops.py) on a
CpuContext: outputs are NaN-poisoned, shared memory is NaN-filled, AddressSanitizer reports
any out-of-bounds access as KernelFault. Results are compared with float64 references and the
NumPy backend (the specification) with the tolerances of tests/conftest.py (MATH.md §7).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_harness as ch  # noqa: E402

if ch.unavailable():
    pytest.skip(ch.unavailable(), allow_module_level=True)

from conftest import (confident_rows, elementwise_rel_err, near_one_hot_rows,  # noqa: E402
                      rel_err, row_rel_err, tol)
from kernel_checks import (ACTS, CU, DTYPES, EPILOGUES, F32, F64, LAYOUTS, NP,  # noqa: E402
                           act64, act_bwd64, check, data, log_softmax64, mse64, on_cpu, sgd_case,
                           softmax64, targets, xent64)

from cugrad.backends.cuda import config, gemm_reference  # noqa: E402
from cugrad.backends.cuda.context import use_context  # noqa: E402

# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def cpu() -> ch.CpuContext:
    ctx = ch.CpuContext()
    ctx.prebuild()
    return ctx


@pytest.fixture
def rng():
    return np.random.default_rng(20261125)


@contextlib.contextmanager
def case(label: str):
    """Names the sub-case of a looped check in its failure (the cheap parameters are looped
    inside a test to keep the case count small)."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"[{label}] {exc}") from exc
    except Exception as exc:
        if hasattr(exc, "add_note"):
            exc.add_note(f"[{label}]")
        raise


def launched(ctx, first: int) -> list[str]:
    return [name for _, name in ctx.calls[first:]]


def check_scalar(out, ref64, dtype, kind="product"):
    """A 0-d loss against its float64 value, |out - ref| <= tol * |ref| (no squared norm:
    losses near 1e300 would overflow rel_err's)."""
    out = np.asarray(out)
    assert out.shape == () and out.dtype == dtype, (out.shape, out.dtype)
    assert np.isfinite(out), f"loss {out}"
    err = abs(float(out) - ref64)
    assert err <= tol(dtype, kind) * abs(ref64) or (ref64 == 0 and err <= tol(dtype, kind)), \
        f"loss {float(out)!r}, float64 reference {ref64!r}"


def same_as_numpy(out, ref_np, kind="elementwise"):
    """Agreement with the NumPy backend where inputs hold NaN/±Inf: NaN exactly where NumPy
    has NaN, the same infinities at the same places, and the finite values within twice the
    dtype's tolerance (MATH.md §7, ‖out − ref‖/‖ref‖ over the finite entries)."""
    out, ref_np = np.asarray(out), np.asarray(ref_np)
    assert out.dtype == ref_np.dtype and out.shape == ref_np.shape, (out.dtype, out.shape, ref_np.dtype)
    nan_out, nan_ref = np.isnan(out), np.isnan(ref_np)
    assert np.array_equal(nan_out, nan_ref), (
        f"NaN positions differ from the NumPy backend: kernel-only NaN at "
        f"{np.argwhere(nan_out & ~nan_ref)[:5].tolist()}, "
        f"NumPy-only NaN at {np.argwhere(nan_ref & ~nan_out)[:5].tolist()}")
    inf_out, inf_ref = np.isinf(out), np.isinf(ref_np)
    assert np.array_equal(inf_out, inf_ref) and np.array_equal(out[inf_out], ref_np[inf_ref]), (
        "infinities differ from the NumPy backend", out[inf_out | inf_ref], ref_np[inf_out | inf_ref])
    fin = np.isfinite(ref_np)
    if fin.any():
        err = rel_err(out[fin], ref_np[fin])
        assert err <= 2 * tol(out.dtype, kind), f"finite entries: relative error vs NumPy {err:.3g}"


# ----------------------------------------------------------------------------- GEMM

def gemm_operands(rng, m, n, k, ta, tb, dtype, has_bias, a_offset=0, b_offset=0):
    a = data(rng, *((k, m) if ta else (m, k)), dtype=dtype, offset_elems=a_offset)
    b = data(rng, *((n, k) if tb else (k, n)), dtype=dtype, offset_elems=b_offset)
    bias = data(rng, n, dtype=dtype) if has_bias else None
    return a, b, bias


def gemm64(a, b, ta, tb, bias, act):
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ref = (a64.T if ta else a64) @ (b64.T if tb else b64)
    if bias is not None:
        ref = ref + np.asarray(bias, np.float64)
    return act64(act, ref)


def run_gemm(cpu, a, b, ta, tb, bias, act, dtype, m, n, k):
    """The launcher's product, checked against float64 and NumPy; returns the launched names.
    The launch must follow config.gemm_plan for the context's SM count."""
    first = len(cpu.calls)
    out = on_cpu(cpu, "gemm", a, b, ta, tb, bias, act)
    names = launched(cpu, first)
    assert out.shape == (m, n)
    check(out, gemm64(a, b, ta, tb, bias, act), NP["gemm"](a, b, ta, tb, bias, act), dtype)
    plan = config.gemm_plan(m, n, k, dtype.name, cpu.sm_count)
    assert names and names[0].startswith("gemm_tiled<") and plan.tiles.template in names[0], names
    if plan.splits > 1:
        epi = config.gemm_epilogue(bias is not None, act)
        assert names[1:] == [config.gemm_split_sum_name(dtype.name, epi)], names
    else:
        assert len(names) == 1, names
    return names, plan


def _assert_plan_sound(plan, k):
    """Split-K: whole k-tiles, at least GEMM_SPLIT_MIN_K deep, at most GEMM_MAX_SPLITS (or as
    many as GEMM_MAX_K_PER_SPLIT asks for), no empty split, the splits cover K exactly, and no
    split is deeper than GEMM_MAX_K_PER_SPLIT."""
    cap = config.GEMM_MAX_K_PER_SPLIT
    assert plan.k_split <= cap, plan
    if plan.splits == 1:
        assert plan.k_split == k
        return
    assert 1 < plan.splits <= max(config.GEMM_MAX_SPLITS, -(-k // cap)), plan
    assert plan.k_split % plan.tiles.bk == 0 and plan.k_split >= min(config.GEMM_SPLIT_MIN_K, cap), plan
    assert (plan.splits - 1) * plan.k_split < k <= plan.splits * plan.k_split, plan


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gemm_k0_is_the_epilogue_of_zero(cpu, layout, dtype):
    """K = 0: op(A) op(B) is the zero matrix, so the result is act(bias) (or act(0)) in every
    row, never NaN or stale: the kernel must write every output without reading A or B (both
    0-byte arrays, so any read is an ASan report)."""
    m, n = 67, 5
    ta, tb = LAYOUTS[layout]
    a = np.empty((0, m) if ta else (m, 0), dtype)
    b = np.empty((n, 0) if tb else (0, n), dtype)
    for epi in ["none", "bias", "bias+sigmoid", "tanh", "bias+relu"]:
        has_bias, act = EPILOGUES[epi]
        bias = np.linspace(-3, 3, n).astype(dtype) if has_bias else None
        for kernel in ("tiled", "reference"):
            with case(f"{epi}, gemm_{kernel}"), use_context(cpu):
                out = (CU["gemm"] if kernel == "tiled" else gemm_reference)(a, b, ta, tb, bias, act)
                want = act64(act, np.broadcast_to(bias if has_bias else np.zeros(n), (m, n)))
                assert not np.isnan(out).any(), "NaN in a K = 0 product"
                np.testing.assert_allclose(out, want, rtol=tol(dtype, "elementwise"), atol=0)
                np.testing.assert_allclose(out, NP["gemm"](a, b, ta, tb, bias, act),
                                           rtol=tol(dtype, "elementwise"), atol=0)


THIN = {  # (M, N, K, epilogue)
    "M1": (1, 130, 9, "bias+tanh"),      # one row over three column tiles
    "N1": (130, 1, 9, "bias+sigmoid"),   # one column over three row tiles
    "K1": (63, 65, 1, "bias+relu"),      # one k, a partial k-tile
    "1x1xK": (1, 1, 2049, "bias"),       # a dot product: the longest split-K (16 splits)
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(THIN))
def test_gemm_thin(cpu, rng, shape, dtype):
    """Each layout (looped)."""
    m, n, k, epi = THIN[shape]
    has_bias, act = EPILOGUES[epi]
    for layout, (ta, tb) in LAYOUTS.items():
        with case(layout):
            a, b, bias = gemm_operands(rng, m, n, k, ta, tb, dtype, has_bias)
            _, plan = run_gemm(cpu, a, b, ta, tb, bias, act, dtype, m, n, k)
            _assert_plan_sound(plan, k)


# K at and around each split-K threshold: one k-tile (8), GEMM_SPLIT_MIN_K (64: a split needs
# k // 64 >= 2), 2 * 64, GEMM_MAX_SPLITS * 64 = 1024 (the most splits of the minimum depth),
# 2 * 1024 (16 splits of 128) and a K that rounds its splits up to whole k-tiles.
SPLIT_K = [7, 8, 9, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025, 2048, 2049, 1000]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", SPLIT_K)
def test_gemm_split_k_thresholds(cpu, rng, k, dtype):
    """A 9 x 13 output (one block) with the default 132 SMs: gemm_plan splits K as soon as
    K // 64 >= 2; every split's partial product and the ordered sum with the epilogue must
    give the float64 product, whatever the split count and the last split's length."""
    m, n = 9, 13
    ta, tb = list(LAYOUTS.values())[k % 4]
    a, b, bias = gemm_operands(rng, m, n, k, ta, tb, dtype, True)
    names, plan = run_gemm(cpu, a, b, ta, tb, bias, "tanh", dtype, m, n, k)
    _assert_plan_sound(plan, k)
    assert (plan.splits > 1) == (k // config.GEMM_SPLIT_MIN_K >= 2), plan


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sms", [1, 10_000], ids=["largest-tile", "smallest-tile"])
def test_gemm_long_k_is_split_for_accuracy_whatever_the_output(cpu, rng, monkeypatch, sms, dtype):
    """No thread sums more than GEMM_MAX_K_PER_SPLIT products (2^17; a float32 running sum of
    2^20 same-sign products is 1.4e-4 off, past MATH.md §7): a longer K is split even where the
    output alone fills the GPU. The cap shrunk to 64 so the harness can run it: K = 3001 is 47
    splits of 64 (more than GEMM_MAX_SPLITS), for the largest tile (1 SM) and the smallest."""
    monkeypatch.setattr(config, "GEMM_MAX_K_PER_SPLIT", 64)
    monkeypatch.setattr(cpu, "sm_count", sms)
    m, n, k = 130, 20, 3001
    tiles = config.GEMM_TILES[dtype.name]
    for layout, (ta, tb) in LAYOUTS.items():
        with case(layout):
            a, b, bias = gemm_operands(rng, m, n, k, ta, tb, dtype, True)
            _, plan = run_gemm(cpu, a, b, ta, tb, bias, "tanh", dtype, m, n, k)
            _assert_plan_sound(plan, k)
            assert plan.tiles == (tiles[0] if sms == 1 else tiles[-1])
            assert plan.splits == 47 and plan.k_split == 64, plan


@pytest.mark.parametrize("sms", [1, 10_000], ids=["largest-tile", "smallest-tile"])
def test_gemm_split_k_partials_each_cover_their_own_k_range(cpu, rng, monkeypatch, sms):
    """Split-K's first pass: partial z is the product over its own range of K,
    [z k_split, min(K, (z + 1) k_split)). The whole K in partial 0 and zeros in the others
    (K passed as k_split) sums to the same product, so the result alone cannot tell; but then
    one thread adds the whole K in its register, what GEMM_MAX_K_PER_SPLIT forbids. The cap
    shrunk to 64: K = 200 is 4 ranges of 56 (the last 32 deep). Each partial is read back from
    the first launch's output and checked against float64 over its range."""
    monkeypatch.setattr(config, "GEMM_MAX_K_PER_SPLIT", 64)
    monkeypatch.setattr(cpu, "sm_count", sms)
    firsts = []
    real_function = cpu.function

    def function(file, name):
        kern = real_function(file, name)

        def launch(grid, block, args, shared_mem=0):
            result = kern(grid, block, args, shared_mem)
            if name.startswith("gemm_tiled<"):     # args: A, B, bias, target, M, N, K, k_split
                firsts.append((grid[2], np.array(args[3], copy=True), int(args[7])))
            return result
        return launch

    monkeypatch.setattr(cpu, "function", function)
    m, n, k = 9, 13, 200
    for layout, (ta, tb) in LAYOUTS.items():
        with case(layout):
            firsts.clear()
            a, b, bias = gemm_operands(rng, m, n, k, ta, tb, F32, True)
            _, plan = run_gemm(cpu, a, b, ta, tb, bias, "tanh", F32, m, n, k)
            assert plan.splits == 4 and plan.k_split == 56, plan
            (splits, partials, k_split), = firsts
            assert (splits, k_split) == (plan.splits, plan.k_split), (splits, k_split, plan)
            assert partials.shape == (splits, m, n)
            a64 = np.asarray(a.T if ta else a, np.float64)
            b64 = np.asarray(b.T if tb else b, np.float64)
            for z in range(splits):
                r = slice(z * k_split, min(k, (z + 1) * k_split))
                err = rel_err(partials[z], a64[:, r] @ b64[r])
                assert err <= tol(F32), f"partial {z}, k in [{r.start}, {r.stop}): error {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_split_sum_adds_the_partials_in_order(cpu, dtype):
    """gemm_split_sum adds partials 0, 1, ..., splits - 1 in that order (gemm.cu), so a split-K
    product's bits are a function of its plan alone. Partials 1, 2^p, -2^p (p the significand's
    width, 24 or 53): in order 1 + 2^p rounds to 2^p and the sum is 0; added backwards it is 1.
    Launched directly (no product has partials that cancel so exactly), 300 outputs on 2 blocks
    of 64 threads (grid-stride), with the bias epilogue."""
    p = 2.0 ** (24 if dtype == F32 else 53)
    m, n = 20, 15
    parts = np.stack([np.ones((m, n)), np.full((m, n), p), np.full((m, n), -p)]).astype(dtype)
    bias = np.arange(n, dtype=dtype)
    out = cpu.empty((m, n), dtype)
    name = config.gemm_split_sum_name(dtype.name, config.gemm_epilogue(True, None))
    cpu.function("gemm.cu", name)((2, 1, 1), (64, 1, 1),
                                  (parts, bias, out, np.int64(m * n), np.int32(n), np.int32(3)))
    np.testing.assert_array_equal(out, np.broadcast_to(bias, (m, n)))


TILE_MN = [(63, 65), (64, 64), (65, 63), (127, 129), (128, 128), (129, 127)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sms", [1, 10_000], ids=["largest-tile", "smallest-tile-splitK"])
@pytest.mark.parametrize("mn", TILE_MN, ids=lambda s: "x".join(map(str, s)))
def test_gemm_tile_edges(cpu, rng, monkeypatch, mn, sms, dtype):
    """M and N at each tile size ±1. One SM: gemm_plan takes the largest tile, unsplit; a GPU
    of 10000 SMs: the smallest tile, K = 136 (17 k-tiles) cut into two 72-deep splits."""
    m, n = mn
    k = 136
    monkeypatch.setattr(cpu, "sm_count", sms)
    ta, tb = list(LAYOUTS.values())[(m + n + sms) % 4]
    a, b, _ = gemm_operands(rng, m, n, k, ta, tb, dtype, False)
    bias = data(rng, 2 * n, dtype=dtype)[::2]    # a strided view: the launcher copies it
    _, plan = run_gemm(cpu, a, b, ta, tb, bias, "sigmoid", dtype, m, n, k)
    tiles = config.GEMM_TILES[dtype.name]
    if sms == 1:
        assert plan.tiles == tiles[0] and plan.splits == 1
    else:
        assert plan.tiles == tiles[-1] and plan.splits == 2 and plan.k_split == 72


VEC_CASES = {  # (M, N, K, a offset, b offset, Fortran-ordered operands)
    "aligned": (68, 20, 36, 0, 0, False),
    "a-misaligned": (68, 20, 36, 1, 0, False),
    "b-misaligned": (68, 20, 36, 0, 1, False),
    "ld-not-vector": (66, 22, 34, 0, 0, False),      # f32: rows of 66, 22, 34 floats
    "k-partial-tile": (68, 20, 35, 0, 0, False),     # vectors only where K is not the stored row (TN)
    "aligned-splitK": (68, 20, 264, 0, 0, False),    # 4 splits of 72 with 16-byte loads
    "fortran-order": (68, 20, 36, 0, 0, True),
    "fortran-misaligned": (68, 20, 36, 0, 1, True),  # b: the transpose of a misaligned view
    "fortran-ld-not-vector": (66, 20, 36, 0, 0, True),  # f32: a's rows 36 floats as given, 66 stored (NN)
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("variant", list(VEC_CASES))
def test_gemm_vector_path_choice(cpu, rng, variant, layout):
    """The launcher takes the 16-byte vector kernel (VEC = 1) only when both operands start on
    a 16-byte boundary and every stored row is a whole number of vectors. The harness copies
    each argument into an aligned buffer, so a wrong choice for a misaligned view would not
    fault here: the launched name is checked. A Fortran-ordered operand is read in place as
    its transpose (the layout flag flipped), so its stored rows are its columns."""
    for dtype in (F32, F64):
        with case(dtype.name):
            _vector_path_case(cpu, rng, variant, layout, dtype)


def _vector_path_case(cpu, rng, variant, layout, dtype):
    m, n, k, a_off, b_off, fortran = VEC_CASES[variant]
    ta, tb = LAYOUTS[layout]
    if fortran:   # stored as the C-contiguous transpose (possibly misaligned), passed as .T
        at, bt, bias = gemm_operands(rng, m, n, k, not ta, not tb, dtype, True, a_off, b_off)
        a, b = at.T, bt.T
        assert a.flags.f_contiguous and not a.flags.c_contiguous and b.flags.f_contiguous
    else:
        a, b, bias = gemm_operands(rng, m, n, k, ta, tb, dtype, True, a_off, b_off)
    names, plan = run_gemm(cpu, a, b, ta, tb, bias, "relu", dtype, m, n, k)
    assert (plan.splits > 1) == (variant == "aligned-splitK"), plan
    width = config.VEC_BYTES // dtype.itemsize
    stored_a = (a.T if fortran else a).shape[1]
    stored_b = (b.T if fortran else b).shape[1]
    want_vec = a_off == 0 and b_off == 0 and stored_a % width == 0 and stored_b % width == 0
    if variant in ("aligned", "aligned-splitK", "fortran-order"):
        assert want_vec
    elif variant == "k-partial-tile":
        assert want_vec == (layout == "TN")
    elif variant.endswith("misaligned"):
        assert not want_vec
    elif variant == "fortran-ld-not-vector":   # a's own rows are whole vectors; stored, not in NN/NT
        assert want_vec == (ta or dtype == F64)
    assert names[0].endswith(f", {int(want_vec)}>"), (want_vec, names[0])
    flip_a, flip_b = (ta != fortran), (tb != fortran)      # the layout the kernel reads
    assert f", {int(flip_a)}, {int(flip_b)}, " in names[0], names[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [9, 1025], ids=["K9", "K1025-splitK"])
def test_gemm_nan_inf_propagate_like_numpy(cpu, k, dtype):
    """A NaN in A poisons its output row, an Inf in B its output column (±Inf, or NaN where it
    meets a zero), exactly as in the NumPy backend: the zero padding of partial tiles and the
    split-K partial sums must not create or hide a NaN. With a tanh epilogue (±Inf become ±1)
    and without one (the infinities themselves must come out, with their signs)."""
    m, n = 37, 70
    rng = np.random.default_rng(k)
    a, b, bias = gemm_operands(rng, m, n, k, False, True, dtype, True)
    a[3, k // 2] = np.nan
    b[5, k - 1] = np.inf            # B is (N, K) (NT): column 5 of op(B) . . .
    a[7, k - 1] = 0.0               # . . . meets a zero in row 7: NaN at (7, 5)
    b[9, 0] = -np.inf
    for act in ("tanh", None):
        with case(f"activation={act}"):
            with np.errstate(invalid="ignore"):
                ref = NP["gemm"](a, b, False, True, bias, act)
            assert np.isnan(ref[3]).all() and np.isnan(ref[7, 5]) and not np.isnan(ref[8]).any()
            if act is None:
                assert np.isinf(ref[:, 5]).sum() > 30 and np.isinf(ref[:, 9]).sum() > 30
            same_as_numpy(on_cpu(cpu, "gemm", a, b, False, True, bias, act), ref, "product")


def test_gemm_same_array_as_both_operands(cpu, rng):
    """X Xᵀ (NT) and Xᵀ X (TN) with one array passed as A and B (one buffer, read twice),
    through the largest tile and through split-K."""
    x = data(rng, 70, 260)
    for ta, tb in ((False, True), (True, False)):
        with case(f"ta={ta} tb={tb}"):
            m = x.shape[1] if ta else x.shape[0]
            run_gemm(cpu, x, x, ta, tb, None, None, F32, m, m, x.shape[0] if ta else x.shape[1])


def test_gemm_empty_output_without_a_launch(cpu):
    """M = 0 or N = 0: an empty result without a launch."""
    first = len(cpu.calls)
    for m, n in ((0, 5), (5, 0)):
        out = on_cpu(cpu, "gemm", np.ones((m, 3), np.float32), np.ones((3, n), np.float32), False, False, None, None)
        assert out.shape == (m, n)
    assert launched(cpu, first) == []


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_wider_than_the_grid_runs_in_column_bands(cpu, rng, monkeypatch, layout, dtype):
    """N beyond MAX_GRID_YZ column tiles (65535: 8.4M float32 columns, 4.2M float64; shrunk
    to 1 here): the launcher computes the product a band of columns at a time, each launch
    within the limit, bias and activation applied per band, through both kernels."""
    rec = _Recorder(cpu)
    monkeypatch.setattr(cpu, "function", rec.function)
    monkeypatch.setattr(config, "MAX_GRID_YZ", 1)
    ta, tb = LAYOUTS[layout]
    m, n, k = 5, 150, 7
    a = data(rng, *((k, m) if ta else (m, k)), dtype=dtype)
    b = data(rng, *((n, k) if tb else (k, n)), dtype=dtype)
    bias = data(rng, n, dtype=dtype)
    for kernel in ("tiled", "reference"):
        rec.launches.clear()
        with case(f"gemm_{kernel}"), use_context(cpu):
            out = (CU["gemm"] if kernel == "tiled" else gemm_reference)(a, b, ta, tb, bias, "tanh")
        check(out, gemm64(a, b, ta, tb, bias, "tanh"), NP["gemm"](a, b, ta, tb, bias, "tanh"), dtype)
        gemms = [g for name, g, _ in rec.launches if name.startswith("gemm_")]
        assert len(gemms) >= 3 and all(g[1] <= 1 for g in gemms), rec.launches


# ----------------------------------------------------------------------------- bias_grad

CHUNK = config.COLSUM_ROWS_PER_CHUNK
COLSUM_M = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1, 5000]


@pytest.mark.parametrize("n", [1, 33])
@pytest.mark.parametrize("m", COLSUM_M)
def test_bias_grad_split_m(cpu, rng, m, n):
    """Column sums at M around COLSUM_ROWS_PER_CHUNK multiples (one launch up to one chunk,
    then partial sums per chunk and a second pass), N = 1 and N = 33 (a partial column block).
    M = 0 (the launcher's own handling) gives zeros. Both dtypes (looped)."""
    for dtype in (F32, F64):
        with case(dtype.name):
            g = data(rng, m, n, dtype=dtype)
            first = len(cpu.calls)
            out = on_cpu(cpu, "bias_grad", g)
            names = launched(cpu, first)
            chunks = max(1, -(-m // CHUNK))
            assert len(names) == (1 if chunks == 1 else 2), names
            if m == 0:
                np.testing.assert_array_equal(out, np.zeros(n, dtype))
            else:
                check(out, g.astype(np.float64).sum(axis=0), NP["bias_grad"](g), dtype)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("mn", [(CHUNK, 1), (CHUNK + 1, 33), (2 * CHUNK + 1, 1), (5000, 33)],
                         ids=lambda s: "x".join(map(str, s)))
def test_activation_backward_bias_grad_split_m(cpu, rng, mn, act):
    """The fused pass across the split-M chunks: G written for every row (poisoned output),
    db its column sums, both bitwise equal to the separate kernels."""
    dtype = F32 if act != "tanh" else F64
    dz = data(rng, *mn, dtype=dtype)
    z = NP["activation"](act, data(rng, *mn, dtype=dtype))
    g, db = on_cpu(cpu, "activation_backward_bias_grad", act, dz, z)
    g64 = NP["activation_backward"](act, dz.astype(np.float64), z.astype(np.float64))
    check(g, g64, NP["activation_backward"](act, dz, z), dtype, "elementwise")
    check(db, g64.sum(axis=0), NP["bias_grad"](g64).astype(dtype), dtype, "product")
    g_sep = on_cpu(cpu, "activation_backward", act, dz, z)
    np.testing.assert_array_equal(g, g_sep)
    np.testing.assert_array_equal(db, on_cpu(cpu, "bias_grad", g_sep))


# ----------------------------------------------------------------------------- softmax

ROW_C = [1, 31, 32, 33, 64, 65, 1000]


@pytest.mark.parametrize("c", ROW_C)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_row_lengths(cpu, rng, op, c):
    """Rows of 1 class, around the warp width and its multiples, and 1000 (32 iterations per
    lane); 17 rows: three blocks of ROW_WARPS warps, the last with one row. Both dtypes."""
    for dtype in (F32, F64):
        with case(dtype.name):
            x = data(rng, 17, c, dtype=dtype, scale=4.0)
            out = on_cpu(cpu, op, x)
            ref = softmax64(x) if op == "softmax" else log_softmax64(x)
            check(out, ref, NP[op](x), dtype, "elementwise")


def _special_rows(dtype, big):
    """Rows where the math is defined: -inf entries (probability 0), huge logits of both signs,
    a huge row max with the rest far below, and a row of equal huge values."""
    ninf = -np.inf
    rows = [
        [0.5, ninf, 2.0, ninf, -1.0],
        [ninf, ninf, ninf, ninf, 3.0],
        [big, -big, 0.0, big / 2, -1.0],
        [-big, -big, -big, -big, -big / 2],
        [big, big, big, big, big],
        [1.0, 2.0, 3.0, 4.0, 5.0],
    ]
    return np.asarray(rows, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_special_values(cpu, dtype):
    """softmax with -inf logits and huge logits (±1e30 in float32, ±1e300 in float64): the
    max is subtracted first, so nothing overflows; -inf gives exactly 0."""
    x = _special_rows(dtype, 1e30 if dtype == F32 else 1e300)
    out = on_cpu(cpu, "softmax", x)
    check(out, softmax64(x), NP["softmax"](x), dtype, "elementwise")
    assert (out[np.isneginf(x)] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_softmax_special_values_moderate(cpu, dtype):
    """log_softmax with -inf logits (giving -inf) and moderate logits: the finite entries
    against float64, the -inf entries exactly -inf."""
    x = _special_rows(dtype, 30.0)
    out = on_cpu(cpu, "log_softmax", x)
    ref = log_softmax64(x)
    fin = np.isfinite(ref)
    assert np.array_equal(np.isneginf(out), np.isneginf(ref)), out
    assert not np.isnan(out).any()
    assert rel_err(out[fin], ref[fin]) <= tol(dtype, "elementwise")


def _large_logit_rows(rows, dtype):
    if rows == "equal-huge":        # [big] * 5: the answer is -log 5 in every entry
        big = 1e30 if dtype == F32 else 1e300
        return np.full((2, 5), big, dtype) * np.asarray([[1], [-1]], dtype)
    shift = 1e4 if dtype == F32 else 1e6   # moderate logits, a spread of a few units
    return (shift + np.asarray([[0.0, 1.0, 0.0, -2.0, 0.5], [3.0, -1.0, 0.25, 0.0, 2.0]])).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ["equal-huge", "moderate-large"])
def test_log_softmax_large_row_max(cpu, rows, dtype):
    """log_softmax formed as (x - max) - log s: it was x - (max + log s), which rounds log s
    away at a large row max (1e30: every entry 0 instead of -log 5)."""
    x = _large_logit_rows(rows, dtype)
    out = on_cpu(cpu, "log_softmax", x)
    assert not np.isnan(out).any()
    check(out, log_softmax64(x), NP["log_softmax"](x), dtype, "elementwise")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", ["equal-huge", "moderate-large"])
def test_softmax_and_cross_entropy_large_row_max(cpu, rng, rows, dtype):
    """The rows of the log_softmax test above through softmax and cross-entropy, which shift
    by the max first (that test's bug, fixed in session 4, was log_softmax's alone)."""
    x = _large_logit_rows(rows, dtype)
    check(on_cpu(cpu, "softmax", x), softmax64(x), NP["softmax"](x), dtype, "elementwise")
    t = targets(rng, "probs", *x.shape, dtype)
    loss_ref, grad_ref = xent64(x, t, "sum")
    loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", x, t, "sum")
    check_scalar(loss, loss_ref, dtype)
    check(grad, grad_ref, NP["cross_entropy_backward"](x, t, "sum"), dtype, "elementwise")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [2, 31, 32, 33, 1000])
def test_confident_rows_through_the_row_kernels(cpu, dtype, c):
    """softmax_rows and softmax_xent_fwd_bwd keep s - 1 (the terms equal to 1 counted, not
    added): a confident row's loss log1p(s - 1) and target gradient -(s - 1)/s, each element
    to its relative tolerance, with the max in every lane position the layouts give (first,
    middle, last column, a tie) and rows around the warp width. Bitwise equal to the kernel
    run without the gradient."""
    x, t, ref = confident_rows(dtype, c)
    tol_e = tol(dtype, "elementwise")
    assert elementwise_rel_err(on_cpu(cpu, "softmax", x), ref["softmax"]) <= tol_e
    assert elementwise_rel_err(on_cpu(cpu, "log_softmax", x), ref["log_softmax"]) <= tol_e
    for targets_ in (t, np.eye(c, dtype=dtype)[t]):
        loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", x, targets_, "sum")
        assert elementwise_rel_err(loss, ref["loss_rows"].sum()) <= tol_e
        assert elementwise_rel_err(grad, ref["grad"]) <= tol_e
        np.testing.assert_array_equal(np.asarray(on_cpu(cpu, "cross_entropy", x, targets_, "sum")),
                                      np.asarray(loss))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [2, 33, 1000])
def test_near_one_hot_probability_rows_through_the_row_kernel(cpu, dtype, c):
    """softmax_xent_fwd_bwd forms Σ_{i≠c} t_i at the max as (targets at the max - t_c) +
    the rest, not as a rounded Σt - t_c (a 6e-8 rounding against a 1e-6 gradient in
    float32): MATH.md §7's bound, row by row, against closed forms, max in every lane position and a
    tie, and the NumPy backend within twice that."""
    eps = 1e-6 if dtype == F32 else 1e-14
    x, t, grad_ref = near_one_hot_rows(dtype, c, eps)
    _, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", x, t, "sum")
    assert row_rel_err(grad, grad_ref) <= tol(dtype, "elementwise")
    _, grad_np = NP["cross_entropy_fwd_bwd"](x, t, "sum")
    assert row_rel_err(grad, grad_np) <= 2 * tol(dtype, "elementwise")


def _recorded_allocations(cpu, monkeypatch) -> list:
    """The shapes of the outputs ``cpu.empty`` allocates from now on (a list it appends to)."""
    allocs = []
    real_empty = cpu.empty
    monkeypatch.setattr(cpu, "empty", lambda shape, dtype: (allocs.append(shape),
                                                            real_empty(shape, dtype))[1])
    return allocs


@pytest.mark.parametrize("op", ["bias_grad", "activation_backward_bias_grad", "softmax", "gemm"])
def test_a_width_past_int32_is_refused_before_anything_is_allocated(cpu, monkeypatch, op):
    """config.INT32_MAX shrunk to 15, so N = 16 stands for N = 2^31: refused with a
    ValueError before any output or copy is allocated (bias_grad allocated its output, and
    the fused activation-backward its (M, N) gradient, first: out of memory on a full card
    instead of the clear error; found by a probe)."""
    monkeypatch.setattr(config, "INT32_MAX", 15)
    allocs = _recorded_allocations(cpu, monkeypatch)

    def call(g):
        return {"bias_grad": lambda: on_cpu(cpu, "bias_grad", g),
                "activation_backward_bias_grad": lambda: on_cpu(
                    cpu, "activation_backward_bias_grad", "relu", g, g),
                "softmax": lambda: on_cpu(cpu, "softmax", g),
                "gemm": lambda: on_cpu(cpu, "gemm", np.ones((4, 4), np.float32), g, False, False,
                                       None, None)}[op]()      # N = g's width
    with pytest.raises(ValueError, match=r"exceeds 2\^31 - 1"):
        call(np.ones((4, 16), np.float32))
    assert allocs == []
    call(np.ones((4, 15), np.float32))      # 2^31 - 1 itself is in range: it runs


@pytest.mark.parametrize("dim", ["M", "K"])
def test_gemm_m_or_k_past_int32_is_refused_before_anything_is_allocated(cpu, monkeypatch, dim):
    """The kernels take M, N and K as 32-bit ints: an M or a K past 2^31 - 1 is refused like N
    (the test above), a ValueError naming it before the output is allocated (config.INT32_MAX
    shrunk to 15: 16 stands for 2^31), in every layout. Unchecked, M = 2^31 would allocate its
    output first and then fail in numpy.int32(m) with an OverflowError."""
    monkeypatch.setattr(config, "INT32_MAX", 15)
    allocs = _recorded_allocations(cpu, monkeypatch)
    m, k = (16, 4) if dim == "M" else (4, 16)
    for layout, (ta, tb) in LAYOUTS.items():
        with case(layout):
            a = np.ones((k, m) if ta else (m, k), np.float32)
            b = np.ones((3, k) if tb else (k, 3), np.float32)
            with pytest.raises(ValueError, match=rf"matmul size {dim} = 16 exceeds 2\^31 - 1"):
                on_cpu(cpu, "gemm", a, b, ta, tb, None, None)
    assert allocs == []
    out = on_cpu(cpu, "gemm", np.ones((15, 15), np.float32), np.ones((15, 15), np.float32),
                 False, False, None, None)     # 2^31 - 1 itself is in range: it runs
    np.testing.assert_array_equal(out, np.full((15, 15), 15, np.float32))


def test_a_long_float32_row_keeps_its_accuracy(cpu):
    """One row of 2^24 + 5 float32 logits in [-1, 1) with ties at the max: each lane sums
    half a million terms of s - 1, which a plain running sum rounded to 2.5e-5 relative
    error (past MATH.md §7's 1e-5; found by a probe). Compensated lane sums: softmax,
    log_softmax and cross-entropy (class index and probability row) within the bound."""
    skip_large_under_tsan()
    rng = np.random.default_rng(7)
    c = 2**24 + 5
    x = rng.uniform(-1, 1, (1, c)).astype(np.float32)
    x[0, [3, c // 2, c - 1]] = 1.0                        # ties at the max: counted
    x64 = x.astype(np.float64)
    tol_e = tol(F32, "elementwise")
    assert rel_err(on_cpu(cpu, "softmax", x), softmax64(x64)) <= tol_e
    assert rel_err(on_cpu(cpu, "log_softmax", x), log_softmax64(x64)) <= tol_e
    probs = rng.random((1, c)).astype(np.float32)
    probs /= probs.sum(dtype=np.float64)
    for target in (np.array([c // 3]), probs):
        loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", x, target, "sum")
        loss_ref, grad_ref = xent64(x64, target, "sum")
        assert rel_err(np.asarray(loss), loss_ref) <= tol_e
        assert rel_err(grad, grad_ref) <= tol_e


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_nan_and_inf_rows_match_numpy(cpu, dtype, op):
    """Rows holding NaN, +inf, or only -inf (undefined): NaN exactly where the NumPy backend
    has it (the whole row), the other rows unharmed."""
    x = np.asarray([[1.0, np.nan, 2.0], [np.nan, 1.0, 2.0], [np.inf, 1.0, -np.inf],
                    [-np.inf, -np.inf, -np.inf], [1.0, 2.0, 3.0]], dtype)
    with np.errstate(invalid="ignore"):
        ref = NP[op](x)
    same_as_numpy(on_cpu(cpu, op, x), ref)


# ----------------------------------------------------------------------------- cross-entropy

XENT_CASES = [(17, c, t, r, dt) for c in (1, 31, 33, 65, 1000) for t in ("index", "probs")
              for r, dt in (("mean", F32), ("sum", F64))]
# more rows than one block of the loss's sum: the row losses summed in two passes
XENT_CASES += [(2 * config.REDUCE_MIN_PER_BLOCK + 1, 3, "index", "mean", F32),
               (2 * config.REDUCE_MIN_PER_BLOCK + 1, 3, "probs", "sum", F64)]


@pytest.mark.parametrize("n,c,target,reduction,dtype",
                         [pytest.param(*cs, id=f"{cs[0]}x{cs[1]}-{cs[2]}-{cs[3]}-{cs[4].name}") for cs in XENT_CASES])
def test_cross_entropy_shapes(cpu, rng, n, c, target, reduction, dtype):
    """Rows of 1 class to 1000 (17 rows: three blocks of ROW_WARPS warps), and 16385 rows."""
    z = data(rng, n, c, dtype=dtype, scale=3.0)
    t = targets(rng, target, n, c, dtype)
    loss_ref, grad_ref = xent64(z, t, reduction)
    loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", z, t, reduction)
    check(np.asarray(loss), loss_ref, NP["cross_entropy"](z, t, reduction), dtype, "product")
    check(grad, grad_ref, NP["cross_entropy_backward"](z, t, reduction), dtype, "elementwise")
    if n < 1000:   # the loss-only and gradient-only launches give the same bits
        np.testing.assert_array_equal(np.asarray(on_cpu(cpu, "cross_entropy", z, t, reduction)), loss)
        np.testing.assert_array_equal(on_cpu(cpu, "cross_entropy_backward", z, t, reduction), grad)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_special_values(cpu, rng, dtype, reduction):
    """Probability targets with a -inf logit where the probability is 0 (0·log 0 = 0), a row
    of all-zero probabilities (loss 0, gradient 0), huge logits (±1e30 / ±1e300); class
    indices on the same logits, never pointing at a -inf logit."""
    big = 1e30 if dtype == F32 else 1e300
    z = _special_rows(dtype, big)
    n, c = z.shape
    probs = softmax64(rng.standard_normal((n, c)))
    probs[np.isneginf(z)] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    probs[3] = 0.0                                   # an all-zero probability row
    probs = probs.astype(dtype)
    index = np.asarray([0, 4, 1, 2, 3, 4], np.int64)
    for t in (probs, index):
        loss_ref, grad_ref = xent64(z, t, reduction)
        assert np.isfinite(loss_ref) and np.isfinite(grad_ref).all()
        loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", z, t, reduction)
        with np.errstate(invalid="ignore", over="ignore"):
            ref_np_loss = NP["cross_entropy"](z, t, reduction)
            ref_np_grad = NP["cross_entropy_backward"](z, t, reduction)
        # the loss: its row terms reach 1e30 / 1e300 (a squared norm would overflow)
        check_scalar(loss, loss_ref, dtype)
        check_scalar(ref_np_loss, loss_ref, dtype)
        check(grad, grad_ref, ref_np_grad, dtype, "elementwise")
        if t.ndim == 2:
            assert (grad[3] == 0).all(), grad[3]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_probability_rows_that_do_not_sum_to_one(cpu, dtype, reduction):
    """Target rows summing to 1.5, 0.5 and 0 on ordinary logits: the loss is
    Σt·logsumexp(z) − Σt·z and the gradient softmax·Σt − t (MATH.md). Fails if the kernel
    assumes Σt = 1 (log1p(s−1) − Σt·z, or e − t off the max: found surviving by a mutation
    probe, the special-values test's zero row sits where both forms give 0)."""
    z = np.asarray([[0.0, 1.0, 2.0, -0.5], [0.5, -1.0, 3.0, 0.25], [1.0, 0.0, -2.0, 0.5],
                    [0.3, 0.3, -0.7, 1.1]], dtype)
    t = np.asarray([[0.5, 0.5, 0.5, 0.0], [0.1, 0.1, 0.2, 0.1], [0.0, 0.0, 0.0, 0.0],
                    [0.25, 0.25, 0.25, 0.25]], dtype)
    loss_ref, grad_ref = xent64(z.astype(np.float64), t.astype(np.float64), reduction)
    loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", z, t, reduction)
    check_scalar(loss, loss_ref, dtype)
    check(grad, grad_ref, NP["cross_entropy_backward"](z, t, reduction), dtype, "elementwise")
    assert (grad[2] == 0).all(), grad[2]


def test_a_long_row_with_a_constant_probability_target_keeps_its_accuracy(cpu):
    """One float32 row of 1,000,003 logits and the constant target 1/C: a constant target
    makes each lane's plain running sums of t and t·z err in one direction (1.4e-4 loss,
    3.2e-4 gradient relative error without the compensation, 2e-4 with its sign flipped;
    a random target hides both). Fails unless loss and gradient are within MATH.md §7."""
    skip_large_under_tsan()
    c = 1_000_003
    z = np.random.default_rng(1).uniform(-1, 1, (1, c)).astype(np.float32)
    t = np.full((1, c), 1.0 / c, np.float32)
    loss_ref, grad_ref = xent64(z.astype(np.float64), t.astype(np.float64), "sum")
    loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", z, t, "sum")
    assert rel_err(np.asarray(loss), loss_ref) <= tol(F32, "product")
    assert rel_err(grad, grad_ref) <= tol(F32, "elementwise")


@pytest.mark.parametrize("target", ["index", "probs"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_nonfinite_like_numpy(cpu, dtype, target):
    """A -inf logit at the target class (loss +inf, gradient finite), a NaN logit, a +inf
    logit: loss and gradient NaN/±Inf exactly where the NumPy backend has them, row by row."""
    base = np.asarray([[0.5, 1.0, -1.0, 2.0]] * 3, dtype)
    specials = {"-inf at target": (0, -np.inf), "nan": (2, np.nan), "+inf": (1, np.inf)}
    for what, (col, value) in specials.items():
        z = base.copy()
        z[1, col] = value
        t = (np.asarray([3, 0, 2], np.int64) if target == "index"
             else np.asarray([[0.1, 0.2, 0.3, 0.4], [1.0, 0, 0, 0], [0, 0, 0.5, 0.5]], dtype))
        with np.errstate(invalid="ignore", divide="ignore"):
            ref_loss = NP["cross_entropy"](z, t, "sum")
            ref_grad = NP["cross_entropy_backward"](z, t, "sum")
        loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", z, t, "sum")
        same_as_numpy(np.asarray(loss).reshape(1), np.asarray(ref_loss).reshape(1), "product")
        same_as_numpy(grad, ref_grad)
        if what == "-inf at target":
            assert np.isposinf(loss) and np.isfinite(grad).all(), (what, loss, grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_out_of_range_class_is_nan_not_a_stray_read(cpu, rng, dtype):
    """The kernel's contract for a class index outside [0, C) (functional rejects them first):
    that row's loss and gradient are NaN, with no read outside the logits (ASan), and the
    other rows are untouched."""
    z = data(rng, 4, 33, dtype=dtype)
    t = np.asarray([0, -1, 33, 32], np.int64)
    loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", z, t, "sum")
    assert np.isnan(loss)
    assert np.isnan(grad[1:3]).all() and not np.isnan(grad[[0, 3]]).any()
    ok = np.asarray([0, 3])
    _, grad_ref = xent64(z[ok], t[ok], "sum")
    check(grad[ok], grad_ref, grad_ref, dtype, "elementwise")


# ----------------------------------------------------------------------------- MSE

TWO_BLOCKS = 2 * config.REDUCE_MIN_PER_BLOCK
MSE_N = [1, config.REDUCE_THREADS - 1, config.REDUCE_THREADS, config.REDUCE_THREADS + 1,
         2 * config.REDUCE_THREADS + 1, config.REDUCE_MIN_PER_BLOCK + 1, TWO_BLOCKS - 1, TWO_BLOCKS, TWO_BLOCKS + 1,
         3 * config.REDUCE_MIN_PER_BLOCK + 1,                                 # a last block of 1
         4 * config.REDUCE_MIN_PER_BLOCK,                                     # whole blocks only
         config.REDUCE_MIN_PER_BLOCK * config.REDUCE_MAX_BLOCKS + 1]          # per_block > minimum


def skip_large_under_tsan():
    """A launch of millions of threads, there for its configuration, not its blocks (each
    block runs the code the small cases run): checked in the ASan build; ThreadSanitizer
    (make race-test) would spend ~35 s on it for no new block."""
    if ch.sanitizer() == "thread":
        pytest.skip("large launch: its configuration is checked in the ASan build; under "
                    "ThreadSanitizer its blocks are the small cases' blocks")


@pytest.mark.parametrize("n", MSE_N)
def test_mse_reduce_thresholds(cpu, rng, n):
    """The loss: one block up to 2 * REDUCE_MIN_PER_BLOCK elements, then per-block partials
    (the last block possibly one element) and an ordered final pass; the gradient over the
    same n (a grid-stride kernel). float32 with each reduction and float64 'mean' (looped);
    the 8M-element case (per_block above the minimum) once, float32 'sum'."""
    if n > 10**6:
        skip_large_under_tsan()
    combos = [(F32, "sum")] if n > 10**6 else [(F32, "mean"), (F32, "sum"), (F32, "half_sum"), (F64, "mean")]
    for dtype, reduction in combos:
        with case(f"{dtype.name} {reduction}"):
            _mse_case(cpu, rng, n, dtype, reduction)


def _mse_case(cpu, rng, n, dtype, reduction):
    p = data(rng, n, dtype=dtype)
    t = data(rng, n, dtype=dtype)
    loss_ref, grad_ref = mse64(p, t, reduction)
    first = len(cpu.calls)
    loss = on_cpu(cpu, "mse_loss", p, t, reduction)
    names = launched(cpu, first)
    assert len(names) == (1 if n <= TWO_BLOCKS else 2), names
    check(np.asarray(loss), loss_ref, NP["mse_loss"](p, t, reduction), dtype, "product")
    grad = on_cpu(cpu, "mse_loss_backward", p, t, reduction)
    check(grad, grad_ref, NP["mse_loss_backward"](p, t, reduction), dtype, "elementwise")
    first = len(cpu.calls)
    loss2, grad2 = on_cpu(cpu, "mse_fwd_bwd", p, t, reduction)     # the fused pass
    names = launched(cpu, first)
    assert len(names) == (1 if n <= TWO_BLOCKS else 2), names
    np.testing.assert_array_equal(np.asarray(loss2), np.asarray(loss))
    np.testing.assert_array_equal(grad2, grad)


# ----------------------------------------------------------------------------- optimisers

OPT_N = [1, 255, 256, 257]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", OPT_N)
def test_sgd_step_sizes(cpu, rng, n, dtype):
    """Three SGD steps, with and without momentum and weight decay (looped)."""
    for momentum, weight_decay in [(0.0, 0.0), (0.0, 0.01), (0.9, 0.0), (0.9, 0.01)]:
        with case(f"momentum={momentum} weight_decay={weight_decay}"):
            sgd_case(cpu, rng, (n,), momentum, weight_decay, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", ["host", "counter", "counter-from-10000"])
@pytest.mark.parametrize("n", OPT_N)
def test_adam_step_sizes_and_counters(cpu, rng, n, count, dtype):
    """Adam at sizes around the block, with weight decay, its step counted on the host or in a
    device counter (0-d int64 incremented by counter_increment): from 0, and from 10000 (both
    bias corrections ~1, beta2^t not yet 0)."""
    start = 10_000 if count == "counter-from-10000" else 0
    p = data(rng, n, dtype=dtype)
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    p_np, m_np, v_np = p.copy(), m.copy(), v.copy()
    p64, m64, v64 = (x.astype(np.float64) for x in (p, m, v))
    counter = np.asarray(start, np.int64)
    for step in range(start + 1, start + 4):
        g = data(rng, n, dtype=dtype)
        args = (1e-2, 0.9, 0.999, 1e-8, 0.01)
        on_cpu(cpu, "adam_step", p, g, m, v, step if count == "host" else counter, *args)
        NP["adam_step"](p_np, g, m_np, v_np, step, *args)
        NP["adam_step"](p64, g.astype(np.float64), m64, v64, step, *args)
        if count != "host":
            assert int(counter) == step
    for out, ref64, ref_np in ((p, p64, p_np), (m, m64, m_np), (v, v64, v_np)):
        check(out, ref64, ref_np, dtype, "elementwise")


# ----------------------------------------------------------------------------- activations

ELEM_N = [1, config.ELEMENTWISE_THREADS - 1, config.ELEMENTWISE_THREADS, config.ELEMENTWISE_THREADS + 1]
SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e30, -1e30]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", ELEM_N)
@pytest.mark.parametrize("name", ACTS)
def test_activation_nan_inf_like_numpy(cpu, rng, name, n, dtype):
    """Forward and backward at n = 1 and the block size ±1, with NaN, ±Inf, ±0 and huge values
    among the inputs: NaN exactly where the NumPy backend (the specification) has it."""
    x = data(rng, 1, n, dtype=dtype, scale=3.0)
    x.flat[: min(n, len(SPECIALS))] = SPECIALS[: min(n, len(SPECIALS))]
    if n > len(SPECIALS):
        x.flat[-len(SPECIALS):] = SPECIALS
    z = on_cpu(cpu, "activation", name, x)
    ref_z = NP["activation"](name, x)
    same_as_numpy(z, ref_z)
    zero = ref_z == 0                              # relu(-0.0) is +0.0, tanh(-0.0) is -0.0
    assert np.array_equal(np.signbit(z[zero]), np.signbit(ref_z[zero])), (x[zero], z[zero])
    g = data(rng, 1, n, dtype=dtype)
    g.flat[::3] = SPECIALS[: len(g.flat[::3])] if n < 3 * len(SPECIALS) else np.resize(SPECIALS, len(g.flat[::3]))
    saved = np.roll(NP["activation"](name, x), 1)   # NaN/Inf saved values meet finite gradients too
    with np.errstate(invalid="ignore"):
        ref = NP["activation_backward"](name, g, saved)
    same_as_numpy(on_cpu(cpu, "activation_backward", name, g, saved), ref)


# Saved outputs z near saturation for each activation's derivative test below: the top of
# y's range per dtype, where z is still inside its open range (checked), and f'(z) in float64.
SATURATION = {
    "tanh": ({F32: 8.0, F64: 18.0}, lambda z: np.abs(z) < 1, lambda z: (1 - z) * (1 + z)),
    "sigmoid": ({F32: 15.0, F64: 35.0}, lambda z: (z > 0) & (z < 1), lambda z: z * (1 - z)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SATURATION))
def test_activation_backward_near_saturation_element_by_element(cpu, name, dtype):
    """f'(z) at saved outputs close to saturation (y from 3 up, both signs), element by
    element against float64 of the same z, which a norm over random data (most z well inside
    the range, the rest exactly saturated) does not see.
    tanh' = (1 - z)(1 + z) near ±1 (y to 8 in float32, 18 in float64, |z| < 1 all the same):
    1 - z*z cancels there (float32 y = 5: 4.5e-5 off, past the 1e-5 bound).
    sigmoid' = z (1 - z) near 1 and 0 (y to 15 in float32, 35 in float64, z < 1 all the
    same): 1 - z is exact there, but the textbook z - z*z cancels (float32 y = 9: 1.2e-4 off).
    Both kernels that form it: activation_backward and the fused activation-backward +
    bias-gradient."""
    tops, inside, derivative = SATURATION[name]
    y = np.linspace(3.0, tops[dtype], 64)
    y = np.concatenate([y, -y]).astype(dtype).reshape(2, 64)
    z = NP["activation"](name, y)
    assert inside(z).all()
    g = np.ones_like(z)
    want = derivative(z.astype(np.float64))
    bound = tol(dtype, "elementwise")
    dx = on_cpu(cpu, "activation_backward", name, g, z)
    dx_fused, db = on_cpu(cpu, "activation_backward_bias_grad", name, g, z)
    for got in (dx, dx_fused, NP["activation_backward"](name, g, z)):
        worst = float(np.max(np.abs(got.astype(np.float64) - want) / want))
        assert worst <= bound, f"worst element off by {worst:.3g} (bound {bound})"
    assert rel_err(db, want.sum(axis=0)) <= tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_without_weight_decay_leaves_non_finite_parameters_alone(cpu, rng, momentum, dtype):
    """weight_decay = 0 adds nothing, not 0 * p: an infinite parameter stays infinite (0 * inf
    would be NaN) and the momentum buffer stays finite, as in the NumPy backend and PyTorch."""
    n = 9
    p = data(rng, n, dtype=dtype)
    p[:3] = [np.inf, -np.inf, np.nan]
    buf = np.zeros(n, dtype) if momentum else None
    p_np, buf_np = p.copy(), None if buf is None else buf.copy()
    for _ in range(2):
        g = data(rng, n, dtype=dtype)
        on_cpu(cpu, "sgd_step", p, g, buf, 0.1, momentum, 0.0)
        NP["sgd_step"](p_np, g, buf_np, 0.1, momentum, 0.0)
    same_as_numpy(p, p_np)
    assert np.isinf(p[:2]).all() and np.isnan(p[2])
    if buf is not None:
        assert np.isfinite(buf).all()
        same_as_numpy(buf, buf_np)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", ["host", "counter"])
def test_adam_without_weight_decay_keeps_its_moments_finite(cpu, rng, count, dtype):
    """weight_decay = 0 adds nothing, not 0 * p: the moments of an infinite or NaN parameter
    stay finite (0 * inf would poison them for good) and p stays what NumPy gives."""
    n = 9
    p = data(rng, n, dtype=dtype)
    p[:3] = [np.inf, -np.inf, np.nan]
    m, v = np.zeros(n, dtype), np.zeros(n, dtype)
    p_np, m_np, v_np = p.copy(), m.copy(), v.copy()
    counter = np.zeros((), np.int64)
    for step in (1, 2):
        g = data(rng, n, dtype=dtype)
        args = (1e-2, 0.9, 0.999, 1e-8, 0.0)
        on_cpu(cpu, "adam_step", p, g, m, v, step if count == "host" else counter, *args)
        NP["adam_step"](p_np, g, m_np, v_np, step, *args)
    assert np.isfinite(m).all() and np.isfinite(v).all()
    for out, ref in ((p, p_np), (m, m_np), (v, v_np)):
        same_as_numpy(out, ref)


def test_elementwise_launch_past_max_blocks(cpu, rng):
    """n = ELEMENTWISE_THREADS * ELEMENTWISE_MAX_BLOCKS + 1: the launcher caps the grid and the
    grid-stride loop covers the last element (poisoned output)."""
    skip_large_under_tsan()
    n = config.ELEMENTWISE_THREADS * config.ELEMENTWISE_MAX_BLOCKS + 1
    x = data(rng, n, dtype=F32)
    out = on_cpu(cpu, "activation", "tanh", x)
    assert not np.isnan(out).any()
    assert rel_err(out, np.tanh(x.astype(np.float64))) <= tol(F32, "elementwise")


# ----------------------------------------------------------------------------- launch limits

class _Recorder:
    """Wraps a context's function(): records (name, grid, block) of every launch."""

    def __init__(self, ctx):
        self.ctx, self.launches = ctx, []
        self._function = ctx.function

    def function(self, file, name):
        kern = self._function(file, name)

        def launch(grid, block, args, shared_mem=0):
            self.launches.append((name, tuple(grid), tuple(block)))
            return kern(grid, block, args, shared_mem)
        return launch


def test_launchers_respect_shrunk_grid_limits(cpu, rng, monkeypatch):
    """The launchers' large-size paths at small sizes, by shrinking the launch-side limits
    (they are not compiled into the kernels): the split-M column sum under a grid-y limit of 3
    (5000 rows -> 3 chunks of 1667), row ops on 1 block (17 rows, grid-stride), element-wise
    kernels (activation, MSE gradient, optimisers, split-K sum) on 1 block, and the MSE sum
    with at most 3 blocks (40000 elements -> 3 of 13334). Every grid must stay within the
    shrunk limit and every result must be right."""
    rec = _Recorder(cpu)
    monkeypatch.setattr(cpu, "function", rec.function)
    monkeypatch.setattr(config, "MAX_GRID_YZ", 3)
    monkeypatch.setattr(config, "ROW_MAX_BLOCKS", 1)
    monkeypatch.setattr(config, "ELEMENTWISE_MAX_BLOCKS", 1)
    monkeypatch.setattr(config, "REDUCE_MAX_BLOCKS", 3)

    g = data(rng, 5000, 3)
    check(on_cpu(cpu, "bias_grad", g), g.astype(np.float64).sum(0), NP["bias_grad"](g), F32)
    z = NP["activation"]("relu", data(rng, 5000, 3))
    gi, db = on_cpu(cpu, "activation_backward_bias_grad", "relu", g, z)
    g64 = NP["activation_backward"]("relu", g.astype(np.float64), z)
    check(gi, g64, g64, F32, "elementwise")
    check(db, g64.sum(0), g64.sum(0), F32)
    x = data(rng, 17, 45, dtype=F64)
    check(on_cpu(cpu, "log_softmax", x), log_softmax64(x), NP["log_softmax"](x), F64, "elementwise")
    t = rng.integers(0, 45, size=17).astype(np.int64)
    loss, grad = on_cpu(cpu, "cross_entropy_fwd_bwd", x, t, "mean")
    loss_ref, grad_ref = xent64(x, t, "mean")
    check_scalar(loss, loss_ref, F64)
    check(grad, grad_ref, grad_ref, F64, "elementwise")
    v = data(rng, 1000)
    check(on_cpu(cpu, "activation", "sigmoid", v), act64("sigmoid", v), NP["activation"]("sigmoid", v),
          F32, "elementwise")
    p, q = data(rng, 40_000), data(rng, 40_000)
    check_scalar(on_cpu(cpu, "mse_loss", p, q, "mean"), float(((p.astype(np.float64) - q) ** 2).mean()), F32)
    check(on_cpu(cpu, "mse_loss_backward", p, q, "sum"), 2 * (p.astype(np.float64) - q),
          NP["mse_loss_backward"](p, q, "sum"), F32, "elementwise")
    w = data(rng, 1000)
    w64 = w.astype(np.float64)
    buf, buf64 = np.zeros(1000, np.float32), np.zeros(1000)
    dw = data(rng, 1000)
    on_cpu(cpu, "sgd_step", w, dw, buf, 0.1, 0.9, 0.01)
    NP["sgd_step"](w64, dw.astype(np.float64), buf64, 0.1, 0.9, 0.01)
    check(w, w64, w64, F32, "elementwise")
    m_, v_, w2 = np.zeros(1000, np.float32), np.zeros(1000, np.float32), data(rng, 1000)
    m64, v64, w264 = np.zeros(1000), np.zeros(1000), w2.astype(np.float64)
    on_cpu(cpu, "adam_step", w2, dw, m_, v_, np.zeros((), np.int64), 1e-2, 0.9, 0.999, 1e-8, 0.0)
    NP["adam_step"](w264, dw.astype(np.float64), m64, v64, 1, 1e-2, 0.9, 0.999, 1e-8, 0.0)
    check(w2, w264, w264, F32, "elementwise")
    a, b = data(rng, 20, 1030), data(rng, 1030, 50)
    check(on_cpu(cpu, "gemm", a, b, False, False, None, None), a.astype(np.float64) @ b,
          NP["gemm"](a, b, False, False, None, None), F32)

    names = {name for name, _, _ in rec.launches}
    assert any(nm.startswith("gemm_split_sum") for nm in names), names
    for name, grid, block in rec.launches:
        assert grid[1] <= 3 and grid[2] <= 3 or name.startswith("gemm_tiled"), (name, grid)
        if name.startswith(("softmax_rows", "softmax_xent")):
            assert grid == (1, 1, 1), (name, grid)
        if name.startswith(("activation_", "mse_grad", "sgd_step", "adam_step", "gemm_split_sum")):
            assert grid == (1, 1, 1), (name, grid)
        if name.startswith("sum_reduce"):
            assert grid[0] <= 3, (name, grid)
        if name.startswith("bias_grad_colsum"):
            assert grid[1] <= 3, (name, grid)
    colsum_block = (config.COLSUM_COLS, config.COLSUM_LANES, 1)      # tunables, not literals
    assert ("bias_grad_colsum<float, 0>", (1, 3, 1), colsum_block) in rec.launches, rec.launches
    assert ("sum_reduce<float, 1>", (3, 1, 1), (256, 1, 1)) in rec.launches, rec.launches


# ----------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("schedule", ["same", "forward", "reverse", "random-7"])
def test_reductions_are_bitwise_reproducible(cpu, rng, schedule):
    """Every reduction at its multi-pass sizes: twice on the same context, or on a context
    running the threads in another order, gives the same bits, and finite ones."""
    g = data(rng, 2 * CHUNK + 1, 33)
    z = data(rng, 2 * CHUNK + 1, 33)
    p, t = data(rng, 3 * config.REDUCE_MIN_PER_BLOCK + 1), data(rng, 3 * config.REDUCE_MIN_PER_BLOCK + 1)
    logits = data(rng, 19, 1000, dtype=F64)
    cls = rng.integers(0, 1000, size=19).astype(np.int64)
    a, b = data(rng, 9, 1025), data(rng, 13, 1025)

    def outputs(ctx):
        return [on_cpu(ctx, "bias_grad", g), *on_cpu(ctx, "activation_backward_bias_grad", "tanh", g, np.tanh(z)),
                on_cpu(ctx, "mse_loss", p, t, "mean"), *on_cpu(ctx, "cross_entropy_fwd_bwd", logits, cls, "mean"),
                on_cpu(ctx, "log_softmax", logits), on_cpu(ctx, "gemm", a, b, False, True, None, "tanh")]

    mine = outputs(cpu)
    if schedule == "same":
        other = cpu
    else:
        kind, _, seed = schedule.partition("-")
        other = ch.CpuContext(cpu.instantiations, schedule=kind, seed=int(seed or 0))
        other.build_failures = cpu.build_failures
    for i, (x, y) in enumerate(zip(mine, outputs(other))):
        assert np.isfinite(np.asarray(x)).all() and np.isfinite(np.asarray(y)).all(), f"output {i} not finite"
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"output {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_elementwise_launcher_covers_n_with_one_block(cpu, rng, monkeypatch, dtype):
    """ELEMENTWISE_MAX_BLOCKS = 1: every kernel _launch_elementwise runs must cover n = 1000
    elements with one block of 256 threads (four trips round its grid-stride loop), not only
    the ones test_launchers_respect_shrunk_grid_limits happens to call: activation forward
    and backward (each activation), accumulate, SGD with and without momentum, Adam counted
    on the host and on the device. A stride that skips elements (2 * gridDim * blockDim) in
    activation_bwd or accumulate passed every other test: their launches never made a thread
    go round its loop twice. Outputs poisoned; references float64 and the NumPy backend."""
    rec = _Recorder(cpu)
    monkeypatch.setattr(cpu, "function", rec.function)
    monkeypatch.setattr(config, "ELEMENTWISE_MAX_BLOCKS", 1)
    n = 1000
    for name in ACTS:
        with case(name):
            x = data(rng, 1, n, dtype=dtype, scale=3.0)
            check(on_cpu(cpu, "activation", name, x), act64(name, x), NP["activation"](name, x),
                  dtype, "elementwise")
            g, saved = data(rng, 1, n, dtype=dtype), NP["activation"](name, x)
            check(on_cpu(cpu, "activation_backward", name, g, saved), act_bwd64(name, g, saved),
                  NP["activation_backward"](name, g, saved), dtype, "elementwise")
    with case("accumulate"):
        total, grad = data(rng, n, dtype=dtype), data(rng, n, dtype=dtype)
        expected = total + grad
        on_cpu(cpu, "accumulate", total, grad)
        np.testing.assert_array_equal(total, expected)
    for momentum, weight_decay in [(0.0, 0.01), (0.9, 0.01)]:
        with case(f"sgd momentum={momentum}"):
            sgd_case(cpu, rng, (n,), momentum, weight_decay, dtype)
    for count in ("host", "counter"):
        with case(f"adam {count}"):
            p, g = data(rng, n, dtype=dtype), data(rng, n, dtype=dtype)
            m, v = np.zeros(n, dtype), np.zeros(n, dtype)
            p64, m64, v64 = p.astype(np.float64), np.zeros(n), np.zeros(n)
            args = (1e-2, 0.9, 0.999, 1e-8, 0.01)
            on_cpu(cpu, "adam_step", p, g, m, v, 1 if count == "host" else np.zeros((), np.int64), *args)
            NP["adam_step"](p64, g.astype(np.float64), m64, v64, 1, *args)
            for out, ref in ((p, p64), (m, m64), (v, v64)):
                check(out, ref, ref, dtype, "elementwise")
    kernels = {name for name, _, _ in rec.launches}
    for prefix in ("activation_fwd", "activation_bwd", "accumulate", "sgd_step", "adam_step<",
                   "adam_step_counted"):
        assert any(k.startswith(prefix) for k in kernels), (prefix, sorted(kernels))
    for name, grid, block in rec.launches:
        if not name.startswith("counter_increment"):
            assert grid == (1, 1, 1) and block == (config.ELEMENTWISE_THREADS, 1, 1), (name, grid)


@pytest.mark.parametrize("rows_per_chunk", [2, 4])
def test_bias_grad_with_more_chunks_than_rows_per_chunk(cpu, rng, monkeypatch, rows_per_chunk):
    """The second pass of the split-M column sum adds `chunks` partial rows as one chunk of
    its own. Past COLSUM_ROWS_PER_CHUNK^2 rows (262,144 at 512) there are more partials than
    rows in a first-pass chunk, so a second pass given the first pass's rows_per_chunk would
    sum only the first rows_per_chunk of them (the (TALL, 64) GPU test of test_reliability.py
    has 65,409 chunks of 513 rows; none of the CPU tests has more than 10 chunks). The
    chunk length is a launcher constant, not compiled into the kernel: shrunk here so that
    M = 5 * rows_per_chunk^2 + 1 rows take 5 * rows_per_chunk + 1 chunks. Plain and fused,
    N = 1 and 33 (a partial column block), both dtypes (looped)."""
    monkeypatch.setattr(config, "COLSUM_ROWS_PER_CHUNK", rows_per_chunk)
    m = 5 * rows_per_chunk**2 + 1
    for dtype in (F32, F64):
        for n in (1, 33):
            with case(f"{dtype.name} {m}x{n}"):
                g = data(rng, m, n, dtype=dtype)
                first = len(cpu.calls)
                check(on_cpu(cpu, "bias_grad", g), g.astype(np.float64).sum(0), NP["bias_grad"](g), dtype)
                assert len(launched(cpu, first)) == 2
                z = NP["activation"]("tanh", data(rng, m, n, dtype=dtype))
                gi, db = on_cpu(cpu, "activation_backward_bias_grad", "tanh", g, z)
                g64 = act_bwd64("tanh", g, z)
                check(gi, g64, NP["activation_backward"]("tanh", g, z), dtype, "elementwise")
                check(db, g64.sum(0), NP["bias_grad"](g64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_ops_on_empty_arrays_launch_nothing(cpu, dtype):
    """n = 0: a grid of 0 blocks is a launch error on the GPU (and on the harness), so every
    op that goes through _launch_elementwise must return without launching: activation
    forward and backward, accumulate, SGD (both variants), Adam (host count; the device
    count still counts the step), MSE gradient."""
    e = np.empty((0, 5), dtype)
    first = len(cpu.calls)
    for name in ACTS:
        with case(name):
            assert on_cpu(cpu, "activation", name, e).shape == (0, 5)
            assert on_cpu(cpu, "activation_backward", name, e, e).shape == (0, 5)
    on_cpu(cpu, "accumulate", e.copy(), e)
    on_cpu(cpu, "sgd_step", e.copy(), e, None, 0.1, 0.0, 0.0)
    on_cpu(cpu, "sgd_step", e.copy(), e, e.copy(), 0.1, 0.9, 0.01)
    on_cpu(cpu, "adam_step", e.copy(), e, e.copy(), e.copy(), 1, 1e-2, 0.9, 0.999, 1e-8, 0.0)
    assert on_cpu(cpu, "mse_loss_backward", e, e, "sum").shape == (0, 5)
    assert launched(cpu, first) == []
    counter = np.zeros((), np.int64)
    on_cpu(cpu, "adam_step", e.copy(), e, e.copy(), e.copy(), counter, 1e-2, 0.9, 0.999, 1e-8, 0.0)
    assert int(counter) == 1
    assert launched(cpu, first) == [config.COUNTER_INCREMENT]


def test_bias_grad_width_past_int32_is_refused_before_a_copy(cpu, monkeypatch):
    """As test_a_width_past_int32_is_refused_before_anything_is_allocated, with a Fortran-
    ordered gradient: bias_grad makes it C-contiguous (a full copy: on a full card, out of
    memory instead of the clear error) only after the width check."""
    monkeypatch.setattr(config, "INT32_MAX", 15)
    copies = []

    class _Xp:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def ascontiguousarray(x):
            if not x.flags.c_contiguous:
                copies.append(x.shape)
            return np.ascontiguousarray(x)

    monkeypatch.setattr(cpu, "xp", _Xp())
    for op in ("bias_grad", "activation_backward_bias_grad"):
        with case(op):
            g = np.asfortranarray(np.ones((4, 16), np.float32))
            args = (g,) if op == "bias_grad" else ("relu", g, g)
            with pytest.raises(ValueError, match=r"exceeds 2\^31 - 1"):
                on_cpu(cpu, op, *args)
            assert copies == []


# ------------------- from a mutation probe of the CUDA backend's host code (session 13)
# Each test below fails on a mutant that every other test let live.


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bias_grad_of_zero_columns_launches_nothing(cpu, dtype):
    """N = 0: bias_grad and the fused activation backward + bias_grad return empty sums
    without a launch (a grid of 0 blocks is a launch error on the GPU and the cpu).
    Kills: _colsum's n == 0 early return dropped."""
    from cugrad.backends.cuda import ops
    from cugrad.backends.cuda.context import use_context
    g = np.ones((5, 0), dtype)
    first = len(cpu.calls)
    with use_context(cpu):
        db = ops.bias_grad(g)
        gi, db2 = ops.activation_backward_bias_grad("relu", g, g)
    assert db.shape == (0,) and db.dtype == dtype and db2.shape == (0,) and gi.shape == (5, 0)
    assert cpu.calls[first:] == []


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax_of_zero_rows_launches_nothing(cpu, op):
    """(0, C): an empty result without a launch (0 blocks is a launch error). Kills: the
    `if rows:` guard of _softmax dropped."""
    from cugrad.backends.cuda import ops
    from cugrad.backends.cuda.context import use_context
    first = len(cpu.calls)
    with use_context(cpu):
        out = getattr(ops, op)(np.ones((0, 5), np.float32))
    assert out.shape == (0, 5) and out.dtype == np.float32
    assert cpu.calls[first:] == []


def test_row_ops_refuse_zero_columns_at_the_launcher(cpu):
    """(R, 0) logits reaching the launchers directly: a ValueError, not a kernel run over
    empty rows (kills: _row_launch's cols == 0 refusal dropped)."""
    from cugrad.backends.cuda import ops
    from cugrad.backends.cuda.context import use_context
    z = np.ones((3, 0), np.float32)
    with use_context(cpu):
        for call in (lambda: ops.softmax(z), lambda: ops.log_softmax(z),
                     lambda: ops.cross_entropy(z, np.zeros(3, np.int64), "mean")):
            with pytest.raises(ValueError, match="a row-wise op needs at least one column"):
                call()


class _LaunchRecorder:
    """A context that runs no kernel and records (name, grid) of each launch."""
    xp = np
    sm_count = 132

    def __init__(self):
        self.launches = []

    def empty(self, shape, dtype):
        return np.full(shape, np.nan, dtype=dtype)

    def function(self, file, name):
        config.module_of(file, name)
        return lambda grid, block, args, shared_mem=0: self.launches.append((name, tuple(grid)))


@pytest.mark.parametrize("n", [2 * config.REDUCE_MIN_PER_BLOCK + 1, 100_000])
def test_sum_reductions_give_each_block_at_least_min_per_block_elements(n):
    """Past the single-block size, the first pass of a sum has cdiv(n, per_block) blocks
    with per_block = max(REDUCE_MIN_PER_BLOCK, cdiv(n, REDUCE_MAX_BLOCKS)) (config: 'elements
    per block at least'). Kills: the REDUCE_MIN_PER_BLOCK floor dropped (then 16385 elements
    run as ~964 blocks of 17)."""
    from cugrad.backends.cuda import ops
    from cugrad.backends.cuda.context import use_context
    per_block = max(config.REDUCE_MIN_PER_BLOCK, -(-n // config.REDUCE_MAX_BLOCKS))
    blocks = -(-n // per_block)
    rec = _LaunchRecorder()
    p = np.zeros(n, np.float32)
    with use_context(rec):
        ops.mse_loss(p, p, "mean")
        ops.mse_fwd_bwd(p, p, "mean")
    grids = [grid for _, grid in rec.launches]
    assert grids == [(blocks, 1, 1), (1, 1, 1)] * 2, rec.launches


def test_sgd_op_refuses_a_fortran_momentum_buffer(cpu):
    """At the op level (functional checks first, this is the launcher's own guard): a
    momentum buffer that is not C-contiguous is a ValueError naming it, as param is (kills:
    momentum_buf left out of sgd_step's _check_in_place)."""
    from cugrad.backends.cuda import ops
    from cugrad.backends.cuda.context import use_context
    p, g = np.ones((5, 3), np.float32), np.ones((5, 3), np.float32)
    buf = np.asfortranarray(np.arange(15, dtype=np.float32).reshape(5, 3))
    with use_context(cpu), pytest.raises(ValueError, match="updates momentum_buf in place"):
        ops.sgd_step(p, g, buf, 0.1, 0.9, 0.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accumulate_and_sgd_ops_take_a_strided_gradient(cpu, dtype):
    """The gradient (read only) may have any layout at the op level: a strided or Fortran
    one is made C-contiguous (kills: accumulate's / sgd_step's ascontiguousarray dropped;
    the cpu refuses the strided argument, a GPU would read the wrong elements)."""
    from cugrad.backends.cuda import ops
    from cugrad.backends.cuda.context import use_context
    rng = np.random.default_rng(5)
    total = rng.standard_normal((4, 3)).astype(dtype)
    wide = rng.standard_normal((4, 6)).astype(dtype)
    for grad in (wide[:, ::2], np.asfortranarray(wide[:, :3])):
        t, p = total.copy(), total.copy()
        with use_context(cpu):
            ops.accumulate(t, grad)
            ops.sgd_step(p, grad, None, 0.5, 0.0, 0.0)
        np.testing.assert_array_equal(t, total + grad)
        np.testing.assert_allclose(p, total.astype(np.float64) - 0.5 * grad.astype(np.float64),
                                   rtol=1e-6)


@pytest.mark.parametrize("op", ["cross_entropy", "cross_entropy_backward", "cross_entropy_fwd_bwd"])
def test_cross_entropy_width_past_int32_is_refused_before_anything_is_allocated(
        cpu, monkeypatch, op):
    """As test_harness_edges' width test, for the cross-entropy launchers: with
    config.INT32_MAX shrunk to 15, C = 16 is refused before any copy or allocation (kills:
    _xent's early _check_int32 dropped: _row_launch refuses only after the (R,) and (R, C)
    buffers and the contiguous copy)."""
    from cugrad.backends.cuda import ops
    from cugrad.backends.cuda.context import use_context
    monkeypatch.setattr(config, "INT32_MAX", 15)
    allocs = _recorded_allocations(cpu, monkeypatch)
    t = np.zeros(4, np.int64)
    with use_context(cpu), pytest.raises(ValueError, match=r"exceeds 2\^31 - 1"):
        getattr(ops, op)(np.asfortranarray(np.ones((4, 16), np.float32)), t, "mean")
    assert allocs == []


def test_cross_entropy_loss_alone_allocates_no_gradient(cpu, monkeypatch):
    """The forward-only launcher allocates no (R, C) gradient buffer (kills: the gradient
    allocated whatever want_grad; a logits-sized buffer per forward)."""
    from cugrad.backends.cuda import ops
    from cugrad.backends.cuda.context import use_context
    allocs = _recorded_allocations(cpu, monkeypatch)
    z = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    with use_context(cpu):
        ops.cross_entropy(z, np.arange(6, dtype=np.int64) % 5, "mean")
    assert (6, 5) not in allocs, allocs


def test_adam_op_takes_a_numpy_integer_step_as_a_host_count(cpu):
    """A NumPy integer step (np.int64(3), e.g. read from a checkpoint) is a host step count
    like 3, bit for bit, not a device counter (kills: isinstance(step, int) for
    numbers.Integral)."""
    from cugrad.backends.cuda import ops
    from cugrad.backends.cuda.context import use_context
    rng = np.random.default_rng(9)
    p0, g = rng.standard_normal(7).astype(np.float32), rng.standard_normal(7).astype(np.float32)
    out = []
    for step in (3, np.int64(3), np.int32(3)):
        p, m, v = p0.copy(), np.full(7, 0.1, np.float32), np.full(7, 0.2, np.float32)
        with use_context(cpu):
            ops.adam_step(p, g, m, v, step, 1e-2, 0.9, 0.999, 1e-8, 0.0)
        out.append((p, m, v))
    for got in out[1:]:
        for a, b in zip(got, out[0]):
            np.testing.assert_array_equal(a, b)
