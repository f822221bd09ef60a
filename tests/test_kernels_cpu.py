"""The real kernels/*.cu on the CPU: every kernel the CUDA backend launches, compiled by g++
through the harness in tests/cuda_harness/ (README there), run through the backend's own
launchers (cugrad/backends/cuda/ops.py) and compared with the NumPy backend and with
float64 references, ‖out − ref‖/‖ref‖ (MATH.md §7), at small odd shapes. Outputs are
poisoned (NaN) by the harness context; AddressSanitizer turns an out-of-bounds global read
or write into a failure; the threads of a block run in a seeded adversarial order, so a
missing barrier or a wrong shared-memory index gives a wrong result.

The run ends with a "CUDA kernels on the CPU harness" section: build time, how many
instantiations ran, and the GPU-only list (inline PTX), each of which is also a skipped
test here with its reason. No GPU and no CuPy needed; skipped where there is no g++.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cuda_harness as ch  # noqa: E402

SANITIZER_NAMES = {"address": "ASan + UBSan(alignment)",
                   "thread": "ThreadSanitizer (races between the threads of a block)", None: "off"}

if ch.unavailable():
    pytest.skip(ch.unavailable(), allow_module_level=True)

from conftest import rel_err, tol  # noqa: E402
from kernel_checks import (ACTS, DTYPES, EPILOGUES, F32, F64, LAYOUTS, NP,  # noqa: E402
                           act64, act_bwd64, check, data, log_softmax64, mse64, on_cpu,
                           sgd_case, softmax64, targets, xent64)

from cugrad.backends.cuda import config, gemm_reference  # noqa: E402
from cugrad.backends.cuda.context import use_context  # noqa: E402

# ----------------------------------------------------------------------------- harness

class _Summary:
    """Prints what the harness built, ran and could not run, at the end of the session."""

    def __init__(self, ctx: ch.CpuContext):
        self.ctx = ctx

    def pytest_terminal_summary(self, terminalreporter):
        ctx, tr = self.ctx, terminalreporter
        tr.section("CUDA kernels on the CPU harness (tests/cuda_harness)")
        all_names = {(f, n) for f, _, names in ctx.instantiations for n in names}
        gpu_only = ctx.gpu_only()
        skipped = {(f, n) for f, n, _ in gpu_only}
        launched = ctx.launched & all_names
        tr.write_line(f"g++ {ch.harness.opt_level()}, sanitizers: "
                      f"{SANITIZER_NAMES[ch.sanitizer()]}; "
                      f"schedule {ctx.schedule}, seed {ctx.seed}; "
                      f"modules built or found in the cache in {ctx.build_seconds:.1f} s")
        tr.write_line(f"instantiations run: {len(launched)} of {len(all_names - skipped)} CPU-runnable "
                      f"({len(all_names)} in config.instantiations())")
        if ctx.build_failures:
            tr.write_line(f"modules that failed to build: {len(ctx.build_failures)}", red=True)
        if gpu_only:
            tr.write_line("GPU-only (not run by the harness):")
            for f, n, why in gpu_only:
                tr.write_line(f"  {f}: {n}: {why}")
        else:
            tr.write_line("GPU-only (not run by the harness): none - no kernel uses inline PTX")
        missed = sorted(all_names - skipped - launched)
        if missed and len(launched):
            tr.write_line(f"not run by this session ({len(missed)}): "
                          + ", ".join(f"{f}:{n}" for f, n in missed[:8]) + (" ..." if len(missed) > 8 else ""))


@pytest.fixture(scope="module")
def cpu(request) -> ch.CpuContext:
    ctx = ch.CpuContext()
    ctx.prebuild()
    plugins = request.config.pluginmanager
    if not plugins.has_plugin("cugrad-cuda-harness-summary"):
        plugins.register(_Summary(ctx), "cugrad-cuda-harness-summary")
    return ctx


@pytest.fixture
def rng():
    return np.random.default_rng(20240611)


# ----------------------------------------------------------------------------- GEMM

ODD_MNK = [(1, 1, 1), (7, 33, 5), (65, 17, 129)]
VEC_MNK = [(4, 4, 4), (68, 20, 36)]   # every stored row a whole number of 16-byte vectors


def _gemm_plans(dtype):
    """Every way the launcher can run gemm_tiled for dtype: each tile of config.GEMM_TILES
    without split, and the smallest tile with K cut into 16-deep splits."""
    tiles = config.GEMM_TILES[dtype.name]
    plans = {f"{t.bm}x{t.bn}": (t, None) for t in tiles}
    plans[f"{tiles[-1].bm}x{tiles[-1].bn}-splitK"] = (tiles[-1], 2 * tiles[-1].bk)
    return plans


def _gemm_cases():
    for dtype in (F32, F64):
        dt = "f32" if dtype == F32 else "f64"
        for mnk in ODD_MNK + VEC_MNK:
            for plan in _gemm_plans(dtype):
                yield pytest.param("tiled", mnk, dtype, plan,
                                   id=f"tiled-{'x'.join(map(str, mnk))}-{dt}-{plan}")
        for mnk in ODD_MNK:
            yield pytest.param("reference", mnk, dtype, None,
                               id=f"reference-{'x'.join(map(str, mnk))}-{dt}")


@pytest.mark.parametrize("epi", list(EPILOGUES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kernel,mnk,dtype,plan", list(_gemm_cases()))
def test_gemm(cpu, rng, monkeypatch, kernel, mnk, dtype, plan, layout, epi):
    m, n, k = mnk
    ta, tb = LAYOUTS[layout]
    has_bias, act = EPILOGUES[epi]
    a = data(rng, *((k, m) if ta else (m, k)), dtype=dtype)
    b = data(rng, *((n, k) if tb else (k, n)), dtype=dtype)
    bias = data(rng, n, dtype=dtype) if has_bias else None
    first = len(cpu.calls)
    if kernel == "tiled":
        tiles, k_split = _gemm_plans(dtype)[plan]
        splits = -(-k // k_split) if k_split else 1
        forced = config.GemmPlan(tiles, splits, k_split if splits > 1 else k)
        monkeypatch.setattr(config, "gemm_plan", lambda *args: forced)
        out = on_cpu(cpu, "gemm", a, b, ta, tb, bias, act)
    else:
        with use_context(cpu):
            out = gemm_reference(a, b, ta, tb, bias, act)
    names = [nm for _, nm in cpu.calls[first:]]
    assert names and names[0].startswith(f"gemm_{kernel}<"), names
    if kernel == "tiled":
        assert tiles.template in names[0], names
        if splits > 1:   # the partial products without epilogue, then their sum with it
            epi_code = config.gemm_epilogue(has_bias, act)
            assert names[0].endswith(", 0, 0>") or names[0].endswith(", 0, 1>"), names
            assert names[1:] == [config.gemm_split_sum_name(dtype.name, epi_code)], names
        else:
            assert len(names) == 1, names
    if (m, n, k) in VEC_MNK:
        assert names[0].endswith(", 1>"), f"expected the 16-byte vector path, got {names[0]}"
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref = (a64.T if ta else a64) @ (b64.T if tb else b64)
    if has_bias:
        ref = ref + bias.astype(np.float64)
    check(out, act64(act, ref), NP["gemm"](a, b, ta, tb, bias, act), dtype)
    assert out.shape == (m, n)


def test_gemm_plan_covers_the_gpu_and_cuts_k_in_whole_tiles():
    """config.gemm_plan: a big output takes the largest tile unsplit; a small output with a
    long K is split so that its grid reaches the SM count, in k-tile multiples covering K."""
    for dtype in config.DTYPES:
        tiles = config.GEMM_TILES[dtype]
        big = config.gemm_plan(4096, 4096, 4096, dtype, 132)
        assert big.tiles == tiles[0] and big.splits == 1 and big.k_split == 4096
        for m, n, k in [(128, 784, 256), (256, 784, 128), (128, 256, 784), (65, 17, 129),
                        (256, 1024, 1024), (1, 1, 100000)]:
            plan = config.gemm_plan(m, n, k, dtype, 132)
            blocks = -(-m // plan.tiles.bm) * -(-n // plan.tiles.bn)
            assert plan.tiles == tiles[-1]
            assert 1 < plan.splits <= config.GEMM_MAX_SPLITS, (m, n, k, plan)
            assert plan.k_split % plan.tiles.bk == 0 and plan.k_split >= config.GEMM_SPLIT_MIN_K
            assert (plan.splits - 1) * plan.k_split < k <= plan.splits * plan.k_split
            # enough blocks, or as many splits as allowed, or splits as short as allowed
            assert blocks * plan.splits >= 132 or plan.splits == config.GEMM_MAX_SPLITS \
                or plan.k_split < 2 * config.GEMM_SPLIT_MIN_K, (m, n, k, plan)
        short = config.gemm_plan(128, 256, 100, dtype, 132)      # K too short to split
        assert short.splits == 1 and short.k_split == 100
        # A K past GEMM_MAX_K_PER_SPLIT is split whatever the output (accuracy, not speed).
        cap = config.GEMM_MAX_K_PER_SPLIT
        for m, n, k in [(4096, 4096, cap), (4096, 4096, cap + 1), (8192, 8192, 2**20 + 3),
                        (1, 1, 2**24), (1, 1, 2**31 - 1), (768, 768, 3 * cap)]:
            plan = config.gemm_plan(m, n, k, dtype, 132)
            assert plan.k_split <= cap and plan.k_split % plan.tiles.bk == 0, (m, n, k, plan)
            assert (plan.splits - 1) * plan.k_split < k <= plan.splits * plan.k_split, plan
            assert plan.splits >= -(-k // cap) and plan.splits <= max(config.GEMM_MAX_SPLITS,
                                                                      -(-k // cap)), plan
            assert plan.splits <= config.MAX_GRID_YZ, plan
        assert config.gemm_plan(4096, 4096, cap, dtype, 132).splits == 1


def test_gemm_max_k_per_split_keeps_a_float32_product_inside_the_bound():
    """Why GEMM_MAX_K_PER_SPLIT is 2^17: a thread of gemm_tiled adds its products one at a
    time into a float32 register. That order (np.cumsum adds in sequence) over U[0, 1) data,
    the worst case for a running sum (every term the same sign): at the cap it stays 10x
    inside MATH.md §7's 1e-4; at 8x the cap (2^20, one split of a 16-way K before the cap) it
    does not."""
    rng = np.random.default_rng(0)
    cap = config.GEMM_MAX_K_PER_SPLIT
    assert all(cap % t.bk == 0 for tiles in config.GEMM_TILES.values() for t in tiles)

    def running_sum_err(k):
        a, b = rng.random(k, dtype=np.float32), rng.random(k, dtype=np.float32)
        got = np.cumsum(a * b, dtype=np.float32)[-1]
        want = np.dot(a.astype(np.float64), b.astype(np.float64))
        return abs(float(got) - want) / want

    assert running_sum_err(cap) <= 1e-5
    assert running_sum_err(8 * cap) > 1e-4


# ----------------------------------------------------------------------------- bias_grad

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mn", [(1, 1), (300, 7), (1000, 33)], ids=lambda s: "x".join(map(str, s)))
def test_bias_grad(cpu, rng, mn, dtype):
    g = data(rng, *mn, dtype=dtype)
    out = on_cpu(cpu, "bias_grad", g)
    check(out, g.astype(np.float64).sum(axis=0), NP["bias_grad"](g), dtype, "product")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mn", [(1, 1), (300, 7), (1000, 33)], ids=lambda s: "x".join(map(str, s)))
def test_activation_backward_bias_grad_fused(cpu, rng, mn, dtype, act):
    """The fused pass (G = dZ ⊙ f'(Z) written, db = Σ_rows G) against float64 and NumPy, and
    bitwise equal to the two separate kernels (same summation order)."""
    dz = data(rng, *mn, dtype=dtype)
    z = NP["activation"](act, data(rng, *mn, dtype=dtype))
    first = len(cpu.calls)
    g, db = on_cpu(cpu, "activation_backward_bias_grad", act, dz, z)
    names = [nm for _, nm in cpu.calls[first:]]
    assert names[0] == config.colsum_name(dtype.name, act), names
    g64 = NP["activation_backward"](act, dz.astype(np.float64), z.astype(np.float64))
    check(g, g64, NP["activation_backward"](act, dz, z), dtype, "elementwise")
    check(db, g64.sum(axis=0), NP["bias_grad"](g64).astype(dtype), dtype, "product")
    g_sep = on_cpu(cpu, "activation_backward", act, dz, z)
    assert np.array_equal(g, g_sep)
    assert np.array_equal(db, on_cpu(cpu, "bias_grad", g_sep))


# ----------------------------------------------------------------------------- activations

SHAPES_2D = [(1, 1), (7, 33), (300, 7)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_2D, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ACTS)
def test_activation_forward_backward(cpu, rng, name, shape, dtype):
    x = data(rng, *shape, dtype=dtype, scale=3.0)
    x.flat[::5] *= 40.0   # far into the saturated range: sigmoid must not overflow
    z = on_cpu(cpu, "activation", name, x)
    check(z, act64(name, x), NP["activation"](name, x), dtype, "elementwise")
    g = data(rng, *shape, dtype=dtype)
    saved = NP["activation"](name, x)
    dx = on_cpu(cpu, "activation_backward", name, g, saved)
    check(dx, act_bwd64(name, g, saved), NP["activation_backward"](name, g, saved), dtype, "elementwise")


# ----------------------------------------------------------------------------- softmax, losses

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_2D + [(3, 1000)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax(cpu, rng, op, shape, dtype):
    x = data(rng, *shape, dtype=dtype, scale=4.0)
    out = on_cpu(cpu, op, x)
    ref = softmax64(x) if op == "softmax" else log_softmax64(x)
    check(out, ref, NP[op](x), dtype, "elementwise")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("target", ["index", "probs"])
@pytest.mark.parametrize("nc", [(1, 1), (7, 1), (33, 5), (5, 1000), (300, 1000)],
                         ids=lambda s: "x".join(map(str, s)))
def test_cross_entropy(cpu, rng, nc, target, reduction, dtype):
    n, c = nc
    z = data(rng, n, c, dtype=dtype, scale=3.0)
    t = targets(rng, target, n, c, dtype)
    loss_ref, grad_ref = xent64(z, t, reduction)
    loss = on_cpu(cpu, "cross_entropy", z, t, reduction)
    check(np.asarray(loss), loss_ref, NP["cross_entropy"](z, t, reduction), dtype, "product")
    assert np.asarray(loss).shape == ()
    grad = on_cpu(cpu, "cross_entropy_backward", z, t, reduction)
    check(grad, grad_ref, NP["cross_entropy_backward"](z, t, reduction), dtype, "elementwise")
    loss2, grad2 = on_cpu(cpu, "cross_entropy_fwd_bwd", z, t, reduction)
    check(np.asarray(loss2), loss_ref, loss_ref, dtype, "product")
    check(grad2, grad_ref, grad_ref, dtype, "elementwise")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "half_sum"])
@pytest.mark.parametrize("shape", [(1,), (7, 33), (300, 70)], ids=lambda s: "x".join(map(str, s)))
def test_mse(cpu, rng, shape, reduction, dtype):
    # (300, 70) has 21000 elements: past 2 * REDUCE_MIN_PER_BLOCK, so the two-pass sum runs.
    p = data(rng, *shape, dtype=dtype)
    t = data(rng, *shape, dtype=dtype)
    loss_ref, grad_ref = mse64(p, t, reduction)
    loss = on_cpu(cpu, "mse_loss", p, t, reduction)
    check(np.asarray(loss), loss_ref, NP["mse_loss"](p, t, reduction), dtype, "product")
    grad = on_cpu(cpu, "mse_loss_backward", p, t, reduction)
    check(grad, grad_ref, NP["mse_loss_backward"](p, t, reduction), dtype, "elementwise")
    # The fused pass: the same bits as the two kernels above, and as the NumPy backend's
    # fused op against its own two.
    loss2, grad2 = on_cpu(cpu, "mse_fwd_bwd", p, t, reduction)
    np.testing.assert_array_equal(np.asarray(loss2), np.asarray(loss))
    np.testing.assert_array_equal(grad2, grad)
    loss_np, grad_np = NP["mse_fwd_bwd"](p, t, reduction)
    np.testing.assert_array_equal(loss_np, NP["mse_loss"](p, t, reduction))
    np.testing.assert_array_equal(grad_np, NP["mse_loss_backward"](p, t, reduction))


# ----------------------------------------------------------------------------- optimisers

def _f64(*arrays):
    return [None if a is None else a.astype(np.float64) for a in arrays]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (7, 33), (300, 7), (255,), (256,), (257,)],
                         ids=lambda s: "x".join(map(str, s)))
def test_accumulate(cpu, rng, shape, dtype):
    """total += grad, twice (the second grad a transposed view, made contiguous by the
    launcher): bitwise NumPy's sum, one rounding per element."""
    total = data(rng, *shape, dtype=dtype)
    expected = total.copy()
    for grad in (data(rng, *shape, dtype=dtype), data(rng, *shape[::-1], dtype=dtype).T):
        on_cpu(cpu, "accumulate", total, grad)
        expected = expected + grad
    np.testing.assert_array_equal(total, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("shape", [(1,), (7, 33), (300, 7)], ids=lambda s: "x".join(map(str, s)))
def test_sgd_step(cpu, rng, shape, momentum, weight_decay, dtype):
    sgd_case(cpu, rng, shape, momentum, weight_decay, dtype)


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="f32"), pytest.param(F64, id="f64")])
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("shape", [(1,), (7, 33), (300, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("count", ["host", "counter"])
def test_adam_step(cpu, rng, shape, weight_decay, dtype, count):
    """count="counter": the step is a 0-d int64 counter in device memory (counter_increment,
    then adam_step_counted forming the bias corrections on the device); it must count 1, 2,
    3 and give what the host-counted step gives."""
    p = data(rng, *shape, dtype=dtype)
    m, v = np.zeros(shape, dtype), np.zeros(shape, dtype)
    p_np, m_np, v_np = p.copy(), m.copy(), v.copy()
    p64, m64, v64 = _f64(p, m, v)
    counter = np.zeros((), np.int64)
    for step in (1, 2, 3):
        g = data(rng, *shape, dtype=dtype)
        args = (step, 1e-2, 0.9, 0.999, 1e-8, weight_decay)
        on_cpu(cpu, "adam_step", p, g, m, v, counter if count == "counter" else step, *args[1:])
        NP["adam_step"](p_np, g, m_np, v_np, *args)
        NP["adam_step"](p64, g.astype(np.float64), m64, v64, *args)
        if count == "counter":
            assert int(counter) == step
    for out, ref64, ref_np in ((p, p64, p_np), (m, m64, m_np), (v, v64, v_np)):
        check(out, ref64, ref_np, dtype, "elementwise")


# ----------------------------------------------------------------------------- launch shapes

@pytest.mark.parametrize("dtype", DTYPES)
def test_grid_stride_loops_with_small_grids(cpu, rng, dtype):
    """The grid-stride kernels must cover n (and rows) with any grid; the launchers only use
    small grids for small inputs, so launch them directly with one that is too small."""
    ct = config.CTYPES[dtype.name]
    n = 1000
    x = data(rng, n, dtype=dtype)
    y = cpu.empty((n,), dtype)
    cpu.function("activations.cu", f"activation_fwd<{ct}, {config.ACTIVATIONS['tanh']}>")(
        (3, 1, 1), (64, 1, 1), (x, y, np.int64(n)))
    assert rel_err(y, np.tanh(x.astype(np.float64))) <= tol(dtype, "elementwise")
    t = data(rng, n, dtype=dtype)
    grad = cpu.empty((n,), dtype)
    cpu.function("losses.cu", config.mse_grad_name(dtype.name))(
        (2, 1, 1), (96, 1, 1), (x, t, grad, np.int64(n), config.scalar(dtype, 3.0)))
    assert rel_err(grad, 3.0 * (x.astype(np.float64) - t)) <= tol(dtype, "elementwise")
    rows, cols = 37, 45   # 37 rows for 2 blocks of ROW_WARPS warps: several rows per warp
    z = data(rng, rows, cols, dtype=dtype)
    out = cpu.empty((rows, cols), dtype)
    cpu.function("losses.cu", config.softmax_name(dtype.name, False))(
        (2, 1, 1), (32 * config.ROW_WARPS, 1, 1), (z, out, np.int64(rows), np.int32(cols)))
    assert rel_err(out, softmax64(z)) <= tol(dtype, "elementwise")


@pytest.mark.parametrize("schedule", ["forward", "reverse", "random-7", "random-99"])
def test_results_do_not_depend_on_thread_order(cpu, rng, schedule):
    """The kernels promise results that depend only on the shapes, never on timing: every
    reduction gives the same bits whatever order the harness runs the threads in."""
    x = data(rng, 1000, 33)
    z = data(rng, 300, 37)
    t = rng.integers(0, 37, size=300).astype(np.int64)
    a, b = data(rng, 65, 129), data(rng, 17, 129)

    def outputs(ctx):
        return [on_cpu(ctx, "bias_grad", x), on_cpu(ctx, "mse_loss", x, x[::-1].copy(), "mean"),
                *on_cpu(ctx, "cross_entropy_fwd_bwd", z, t, "mean"), on_cpu(ctx, "softmax", z),
                on_cpu(ctx, "gemm", a, b, False, True, None, "tanh")]

    kind, _, seed = schedule.partition("-")
    other = ch.CpuContext(cpu.instantiations, schedule=kind, seed=int(seed or 0))
    other.build_failures = cpu.build_failures
    for mine, theirs in zip(outputs(cpu), outputs(other)):
        # Finite inputs give finite outputs: NaN == NaN for assert_array_equal, so two runs
        # that both read unwritten (poisoned) shared memory would otherwise agree.
        assert np.isfinite(np.asarray(theirs)).all(), f"non-finite output under {schedule}"
        np.testing.assert_array_equal(np.asarray(mine), np.asarray(theirs))


# ----------------------------------------------------------------------------- coverage

def _gpu_only_params():
    try:
        listed = ch.CpuContext().gpu_only()
    except Exception as exc:   # noqa: BLE001 - reported by the test below
        return [pytest.param(None, None, f"{type(exc).__name__}: {exc}", id="table-error")]
    return [pytest.param(f, n, why, id=f"{f}:{n}") for f, n, why in listed] or \
        [pytest.param(None, None, None, id="none")]


@pytest.mark.parametrize("file,name,why", _gpu_only_params())
def test_gpu_only_kernels_are_listed(file, name, why):
    """One skipped test per kernel (or code path) the harness cannot run, with the reason."""
    if file is None and why is not None:
        pytest.fail(f"cannot read the instantiation table: {why}")
    if file is not None:
        pytest.skip(f"GPU-only, not run on the CPU harness: {file}: {name}: {why}")


def test_every_runnable_instantiation_ran(cpu, request):
    """Every instantiation the backend can launch (less GPU-only ones) ran in this module.
    Meaningful only when the whole module ran: skipped under -k / deselection."""
    here = [i for i in request.session.items if i.module is request.module]
    functions = {name for name in dir(request.module) if name.startswith("test_")}
    opt = request.config.option
    if {i.originalname for i in here} != functions or opt.keyword or opt.markexpr or getattr(opt, "lf", False):
        pytest.skip("part of the module was deselected")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("under pytest-xdist this module's tests ran in several processes")
    wanted = {(f, n) for f, _, names in cpu.instantiations for n in names}
    wanted -= {(f, n) for f, n, _ in cpu.gpu_only()}
    missing = sorted(wanted - cpu.launched)
    assert not missing, f"{len(missing)} instantiations never ran: {missing[:10]}"
