"""The CPU kernel harness (tests/cuda_harness/) proves itself on its own kernels
(tests/cuda_harness/selftest/selftest.cu) before it is trusted with kernels/*.cu: barriers,
warp shuffles and votes, dynamic and static shared memory, atomics and aliasing work; and
the bugs it exists to catch are caught - a removed barrier and a wrong shared-memory index
give wrong results, out-of-bounds accesses are AddressSanitizer reports, a misaligned
vector load is a UBSan report, a deadlock, a divergent barrier and a bad warp mask are harness
faults. Built with
ThreadSanitizer (CUGRAD_HARNESS_SANITIZE=thread, `make race-test`), races between the threads
of a block are reports: the removed barrier, and two races (__syncwarp for __syncthreads, a
shuffle for __syncwarp) that give the right answer under every schedule of the harness.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_harness as ch  # noqa: E402

if ch.unavailable():
    pytest.skip(ch.unavailable(), allow_module_level=True)

SELFTEST = ch.harness.HARNESS_DIR / "selftest"
NAMES = ["block_sum<1>", "block_sum<0>", "warp_sum", "reverse_dyn", "votes", "scale_inplace",
         "oob_write", "dyn_smem_overrun", "misaligned_float4", "warp_deadlock", "atomic_hist",
         "bad_mask", "uninit_shared", "shared_index_bug", "cross_warp<1>", "cross_warp<0>",
         "lane_exchange<1>", "lane_exchange<0>", "divergent_barrier"]
needs_asan = pytest.mark.skipif(not ch.sanitize(), reason="built without AddressSanitizer "
                                "(CUGRAD_HARNESS_SANITIZE is 0 or thread)")
TSAN = ch.sanitizer() == "thread"


def assert_race_report(launch, line_of: str):
    """Under ThreadSanitizer, launch() must die with a data-race report at the selftest.cu
    line that holds `line_of`."""
    src = (SELFTEST / "selftest.cu").read_text().splitlines()
    line = next(i for i, text in enumerate(src, 1) if line_of in text)
    with pytest.raises(ch.KernelFault, match="ThreadSanitizer: a data race") as info:
        launch()
    assert f"selftest.cu:{line}" in str(info.value), str(info.value)[-3000:]


def context(schedule="random", seed=None):
    return ch.CpuContext([("selftest.cu", [], NAMES)], kernels_dir=SELFTEST, schedule=schedule, seed=seed)


@pytest.fixture(scope="module")
def ctx():
    c = context()
    c.prebuild()
    return c


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def block_sums(ctx, sync, x):
    rows, n = x.shape
    out = ctx.empty((rows,), np.float32)
    ctx.function("selftest.cu", f"block_sum<{sync}>")((rows, 1, 1), (256, 1, 1), (x, out, np.int32(n)))
    return out


@pytest.mark.parametrize("schedule", ["random", "forward", "reverse"])
def test_block_reduction_with_barriers_is_right_in_every_order(schedule, rng):
    x = rng.standard_normal((5, 1000)).astype(np.float32)
    out = block_sums(context(schedule), 1, x)
    np.testing.assert_allclose(out, x.astype(np.float64).sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_removed_barrier_gives_a_wrong_result(seed, rng):
    """block_sum<0> lacks the __syncthreads() inside its tree loop: a wrong result, or under
    ThreadSanitizer a race report on the tree's line."""
    x = rng.standard_normal((5, 1000)).astype(np.float32)
    if TSAN:
        assert_race_report(lambda: block_sums(context("random", seed), 0, x),
                           "partial[threadIdx.x] += partial[threadIdx.x + stride]")
        return
    out = block_sums(context("random", seed), 0, x)
    assert not np.allclose(out, x.astype(np.float64).sum(1), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kernel, block, expected", [
    ("cross_warp", 128, lambda n: np.tile(np.arange(n - 1, -1, -1, dtype=np.float32), 3)),
    ("lane_exchange", 32, lambda n: (np.arange(31, -1, -1) + (np.arange(32) ^ 1)).astype(np.float32)),
])
@pytest.mark.parametrize("sync", [1, 0])
def test_races_no_schedule_shows(kernel, block, expected, sync, ctx):
    """With its barrier (SYNC=1) each kernel is right in every build. Without it (SYNC=0) it
    is a race on a GPU, yet every schedule of the harness gives the right answer: only
    ThreadSanitizer reports it (the line of the load)."""
    grid = 3 if kernel == "cross_warp" else 1
    out = ctx.empty((grid * block,), np.float32)
    launch = lambda: ctx.function("selftest.cu", f"{kernel}<{sync}>")((grid, 1, 1), (block, 1, 1), (out,))  # noqa: E731
    if sync == 0 and TSAN:
        assert_race_report(launch, "v[n - 1 - t]" if kernel == "cross_warp" else "v[31 - lane]")
        return
    launch()
    np.testing.assert_array_equal(out, expected(block))


@pytest.mark.skipif(TSAN, reason="under ThreadSanitizer the racy block_sum<0> is a race report, "
                    "not a result (test_a_removed_barrier_gives_a_wrong_result checks the report)")
def test_the_schedule_is_deterministic(rng):
    x = rng.standard_normal((5, 1000)).astype(np.float32)
    first, again = block_sums(context("random", 5), 0, x), block_sums(context("random", 5), 0, x)
    np.testing.assert_array_equal(first, again)


def test_a_wrong_shared_memory_index_gives_a_wrong_result(ctx, rng):
    x = rng.standard_normal(100).astype(np.float32)
    y = ctx.empty((100,), np.float32)
    ctx.function("selftest.cu", "shared_index_bug")((2, 1, 1), (64, 1, 1), (x, y, np.int32(100)))
    assert not np.allclose(y, x)


def test_shared_memory_starts_as_garbage_in_every_block(ctx):
    out = np.zeros(3 * 32, np.float32)
    ctx.function("selftest.cu", "uninit_shared")((3, 1, 1), (32, 1, 1), (out,))
    assert np.isnan(out).all()


def test_warp_shuffles(ctx, rng):
    x = rng.standard_normal((7, 77))
    out = ctx.empty((7,), np.float64)
    ctx.function("selftest.cu", "warp_sum")((2, 1, 1), (32, 4, 1), (x, out, np.int32(7), np.int32(77)))
    np.testing.assert_allclose(out, x.sum(1), rtol=1e-12)


def test_dynamic_shared_memory(ctx, rng):
    x = rng.standard_normal(96).astype(np.float32)
    y = ctx.empty((96,), np.float32)
    ctx.function("selftest.cu", "reverse_dyn")((3, 1, 1), (32, 1, 1), (x, y, np.int32(96)), shared_mem=32 * 4)
    np.testing.assert_array_equal(y, x.reshape(3, 32)[:, ::-1].ravel())


def test_votes_and_syncthreads_count(ctx, rng):
    flags = (rng.random(64) < 0.5).astype(np.int32)
    flags[32:] = 1
    out = ctx.empty((7,), np.uint32)
    ctx.function("selftest.cu", "votes")((1, 1, 1), (64, 1, 1), (flags, out))
    ballot = sum(int(f) << i for i, f in enumerate(flags[:32]))
    assert out.tolist() == [ballot, int(flags[:32].all()), int(flags[:32].any()),
                            0xFFFFFFFF, 1, 1, int(flags.sum())]


def test_atomics(ctx, rng):
    bins = rng.integers(0, 7, 1000).astype(np.int32)
    hist = np.zeros(7, np.int32)
    ctx.function("selftest.cu", "atomic_hist")((8, 1, 1), (128, 1, 1), (bins, np.int32(1000), hist))
    np.testing.assert_array_equal(hist, np.bincount(bins, minlength=7))


def test_aliased_arguments_and_a_double_scalar(ctx):
    x = np.arange(10, dtype=np.float32)
    ctx.function("selftest.cu", "scale_inplace")((1, 1, 1), (32, 1, 1), (x, x, np.float64(2.5), np.int64(10)))
    np.testing.assert_array_equal(x, np.arange(10, dtype=np.float32) * 2.5)


def test_an_empty_view_inside_another_argument_is_no_overlap(ctx):
    """A zero-size argument touches no memory, wherever its pointer lies (a (0, n) operand's
    column view points inside its parent): only a real partial overlap is refused."""
    x = np.arange(10, dtype=np.float32)
    ctx.function("selftest.cu", "scale_inplace")((1, 1, 1), (32, 1, 1), (x, x[4:][:0], np.float64(2.5), np.int64(0)))
    np.testing.assert_array_equal(x, np.arange(10, dtype=np.float32))
    with pytest.raises(ch.HarnessError, match="partially overlaps"):
        ctx.function("selftest.cu", "scale_inplace")((1, 1, 1), (32, 1, 1),
                                                      (x[:6], x[3:9], np.float64(2.5), np.int64(6)))


# ----------------------------------------------------------------------------- faults

@needs_asan
def test_out_of_bounds_global_write_is_an_asan_report(ctx):
    out = np.zeros(100, np.float32)
    with pytest.raises(ch.KernelFault, match=r"heap-buffer-overflow(.|\n)*selftest\.cu"):
        ctx.function("selftest.cu", "oob_write")((4, 1, 1), (32, 1, 1), (out, np.int32(100)))


@needs_asan
def test_reading_past_the_dynamic_shared_memory_is_an_asan_report(ctx):
    out = np.zeros(32, np.float32)
    with pytest.raises(ch.KernelFault, match="AddressSanitizer"):
        ctx.function("selftest.cu", "dyn_smem_overrun")((1, 1, 1), (32, 1, 1), (out,), shared_mem=32 * 4)


@needs_asan
def test_misaligned_vector_load_is_a_ubsan_report(ctx):
    x, out = np.arange(8, dtype=np.float32), np.zeros(4, np.float32)
    with pytest.raises(ch.KernelFault, match="misaligned address"):
        ctx.function("selftest.cu", "misaligned_float4")((1, 1, 1), (1, 1, 1), (x, out))


def test_deadlock_is_reported(ctx):
    out = np.zeros(32, np.float32)
    with pytest.raises(ch.KernelFault, match="deadlock: 16 threads wait at __syncthreads"):
        ctx.function("selftest.cu", "warp_deadlock")((1, 1, 1), (32, 1, 1), (out,))


def test_a_divergent_barrier_is_reported(ctx):
    """Threads waiting at two different __syncthreads: a harness fault naming both lines."""
    src = (SELFTEST / "selftest.cu").read_text().splitlines()
    start = next(i for i, text in enumerate(src, 1) if "void divergent_barrier" in text)
    lines = [i for i, text in enumerate(src, 1) if i > start and "__syncthreads();" in text][:2]
    with pytest.raises(ch.KernelFault, match="divergent barrier") as info:
        ctx.function("selftest.cu", "divergent_barrier")((1, 1, 1), (64, 1, 1), (ctx.empty((64,), np.float32),))
    assert all(f"selftest.cu:{line}" in str(info.value) for line in lines), str(info.value)


def test_inconsistent_warp_masks_are_reported(ctx):
    out = np.zeros(32, np.float32)
    with pytest.raises(ch.KernelFault, match="mask 0x00000003"):
        ctx.function("selftest.cu", "bad_mask")((1, 1, 1), (32, 1, 1), (out,))


def test_the_runner_recovers_after_a_fault(ctx, rng):
    with pytest.raises(ch.KernelFault):
        ctx.function("selftest.cu", "warp_deadlock")((1, 1, 1), (32, 1, 1), (np.zeros(32, np.float32),))
    x = rng.standard_normal((2, 300)).astype(np.float32)
    np.testing.assert_allclose(block_sums(ctx, 1, x), x.sum(1), rtol=1e-5, atol=1e-4)


def test_bad_launches_and_arguments_are_refused(ctx):
    out = np.zeros(32, np.float32)
    kern = ctx.function("selftest.cu", "oob_write")
    with pytest.raises(ch.LaunchError, match="block dimension too large"):
        kern((1, 1, 1), (2048, 1, 1), (out, np.int32(1)))
    with pytest.raises(TypeError, match="explicit numpy scalars"):
        kern((1, 1, 1), (32, 1, 1), (out, 5))
    with pytest.raises(TypeError, match="dtype int64 for a parameter of type i4"):
        kern((1, 1, 1), (32, 1, 1), (out, np.int64(5)))
    with pytest.raises(TypeError, match="float64 for a pointer to f4"):
        kern((1, 1, 1), (32, 1, 1), (out.astype(np.float64), np.int32(5)))
    with pytest.raises(TypeError, match="not C-contiguous"):
        kern((1, 1, 1), (32, 1, 1), (np.zeros(64, np.float32)[::2], np.int32(5)))
    with pytest.raises(TypeError, match="takes 2 arguments"):
        kern((1, 1, 1), (32, 1, 1), (out,))


def test_inline_ptx_kernels_are_listed_as_gpu_only_and_the_rest_runs(tmp_path):
    (tmp_path / "mixed.cu").write_text(textwrap.dedent("""
        __device__ __forceinline__ unsigned lane_id() {
            unsigned r; asm volatile("mov.u32 %0, %%laneid;" : "=r"(r)); return r;
        }
        template <typename T> __global__ void with_ptx(T* out) { out[threadIdx.x] = (T)lane_id(); }
        template <typename T> __global__ void plain(T* out) { out[threadIdx.x] = (T)(threadIdx.x % 32); }
    """))
    c = ch.CpuContext([("mixed.cu", [], ["with_ptx<float>", "plain<float>"])], kernels_dir=tmp_path)
    assert c.gpu_only() == [("mixed.cu", "with_ptx<float>",
                             "calls lane_id(), which uses inline PTX (asm)")]
    with pytest.raises(ch.GpuOnly, match="with_ptx"):
        c.function("mixed.cu", "with_ptx<float>")
    out = np.zeros(64, np.float32)
    c.function("mixed.cu", "plain<float>")((1, 1, 1), (64, 1, 1), (out,))
    np.testing.assert_array_equal(out, np.arange(64) % 32)


@pytest.mark.parametrize("value,expected", [("", "address"), ("  ", "address"), ("1", "address"),
                                            ("Address", "address"), ("thread", "thread"),
                                            ("0", None)])
def test_sanitizer_setting_reads_empty_as_the_default(monkeypatch, value, expected):
    """Fails if an empty CUGRAD_HARNESS_SANITIZE turns the sanitizer off (the project's
    variables read unset and empty alike: the default)."""
    monkeypatch.setenv("CUGRAD_HARNESS_SANITIZE", value)
    assert ch.sanitizer() == expected
