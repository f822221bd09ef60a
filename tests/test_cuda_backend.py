"""The CUDA backend: launchers and loader on the CPU, kernels on a GPU.

CPU tests (always run): every op is registered; every kernel a launcher asks for is in
``config.instantiations()`` with legal launch dimensions and typed arguments (checked
through a recording context, no kernel runs); the loader reads sources from a checkout
and from an installed package.

GPU tests (``@pytest.mark.gpu``, skipped with the reason where no CUDA device works):
gemm_tiled against gemm_reference against float64 NumPy in every layout, epilogue and
dtype at shapes 1...1000; every op against float64 references; determinism of the
reductions; the NVRTC error message; the PyTorch DLPack round trip; kernels loaded from an
installed package. Outputs are poisoned with NaN (CUGRAD_POISON_OUTPUTS=1).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from cugrad._backend import OPS, missing_ops
from cugrad.backends import numpy_backend as npb
from cugrad.backends.cuda import config, ops
from cugrad.backends.cuda.context import (Context, CupyContext, Kernel, check_kernel_args,
                                         use_context)
from cugrad.backends.cuda.loader import read_source, source_dir

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = list(itertools.product([False, True], repeat=2))
ACTS = [None, "sigmoid", "tanh", "relu"]


# ------------------------------------------------------------------- CPU: launchers, loader

def test_every_op_registered_without_cupy_import():
    assert missing_ops("cuda") == []
    code = ("import sys, cugrad.backends.cuda as c; from cugrad._backend import missing_ops; "
            "assert missing_ops('cuda') == []; print('cupy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing the CUDA backend must not import CuPy"


class _RecordingKernel(Kernel):
    def __init__(self, ctx, file, name):
        self.ctx, self.file, self.name = ctx, file, name

    def __call__(self, grid, block, args, shared_mem=0):
        check_kernel_args(args, np)
        assert len(grid) == 3 and len(block) == 3 and all(int(v) >= 1 for v in (*grid, *block))
        assert grid[0] <= config.INT32_MAX and grid[1] <= 65535 and grid[2] <= 65535
        assert block[0] * block[1] * block[2] <= 1024
        self.ctx.launches.append((self.file, self.name, grid, block, args))


class RecordingContext(Context):
    """Runs no kernel: checks each launch against the instantiation table and records it."""
    xp = np

    def __init__(self):
        self.launches = []

    def empty(self, shape, dtype):
        return np.full(shape, np.nan, dtype=dtype)

    def function(self, file, name_expression):
        config.module_of(file, name_expression)    # KeyError if not compiled
        return _RecordingKernel(self, file, name_expression)


def _every_op_call(dt):
    """Calls covering every kernel variant the launchers can choose."""
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(dt)  # noqa: E731
    calls = []
    for ta, tb, bias, act, k in itertools.product([False, True], [False, True], [False, True], ACTS, [8, 7]):
        a = r(k, 9) if ta else r(9, k)
        b = r(12, k) if tb else r(k, 12)
        calls.append(("gemm", (a, b, ta, tb, r(12) if bias else None, act)))
    calls.append(("gemm", (np.asfortranarray(r(9, 8)), r(8, 12)[:, ::2], False, False, None, None)))
    calls.append(("gemm", (r(9, 700), r(700, 12), False, False, r(12), "relu")))   # split-K
    calls += [("bias_grad", (r(5, 3),)), ("bias_grad", (r(3000, 40),)),
              ("bias_grad", (r(200, 10)[::2],))]
    for name in ("sigmoid", "tanh", "relu"):
        calls += [("activation", (name, r(3, 4))), ("activation_backward", (name, r(3, 4), r(3, 4))),
                  ("activation_backward_bias_grad", (name, r(3, 4), r(3, 4))),
                  ("activation_backward_bias_grad", (name, r(1500, 4), r(1500, 4)))]
    calls += [("softmax", (r(5, 3),)), ("log_softmax", (r(5, 3),))]
    for red in ("mean", "sum", "half_sum"):
        calls += [("mse_loss", (r(4, 3), r(4, 3), red)), ("mse_loss", (r(300, 200), r(300, 200), red)),
                  ("mse_loss_backward", (r(4, 3), r(4, 3), red)),
                  ("mse_fwd_bwd", (r(4, 3), r(4, 3), red)),
                  ("mse_fwd_bwd", (r(300, 200), r(300, 200), red))]
    for op, red, target in itertools.product(
            ("cross_entropy", "cross_entropy_backward", "cross_entropy_fwd_bwd"), ("mean", "sum"),
            (np.array([0, 2, 1], np.int64), np.full((3, 3), 1 / 3, dt))):
        calls.append((op, (r(3, 3), target, red)))
    calls += [("sgd_step", (r(4), r(4), None, 0.1, 0.0, 0.0)),
              ("sgd_step", (r(4), r(4), r(4), 0.1, 0.9, 0.01)),
              ("adam_step", (r(4), r(4), r(4), r(4), 3, 1e-3, 0.9, 0.999, 1e-8, 0.0)),
              ("accumulate", (r(4), r(4))), ("accumulate", (r(4), r(8)[::2]))]
    return calls


def test_launchers_use_only_compiled_kernels_with_typed_arguments():
    ctx = RecordingContext()
    with use_context(ctx):
        for dt in (np.float32, np.float64):
            for op, args in _every_op_call(dt):
                getattr(ops, op)(*args)
    launched = {name for _, name, *_ in ctx.launches}
    assert {op for op, _ in _every_op_call(np.float32)} == set(OPS)
    # Both gemm_tiled variants (scalar and 16-byte vector loads) and both colsum passes occur.
    assert any(n.startswith("gemm_tiled") and n.endswith(", 1>") for n in launched)
    assert any(n.startswith("gemm_tiled") and n.endswith(", 0>") for n in launched)
    assert config.gemm_split_sum_name(np.dtype(np.float32).name, 7) in launched
    colsum_grids = [g for _, n, g, *_ in ctx.launches if n.startswith("bias_grad")]
    assert any(g[1] > 1 for g in colsum_grids)


def test_launchers_reject_sizes_past_32_bit_dims():
    class Shape:   # shape and dtype only: the launcher must refuse before touching data
        dtype = np.dtype(np.float32)

        def __init__(self, *shape):
            self.shape = shape
    with use_context(RecordingContext()), pytest.raises(ValueError, match="2\\^31"):
        ops.gemm(Shape(4, 2**31), Shape(2**31, 1), False, False, None, None)


def test_loader_inlines_the_common_header():
    src = read_source("gemm.cu")
    assert not [line for line in src.splitlines() if line.strip().startswith("#include")]
    assert "sigmoid_of" in src
    assert source_dir() == REPO / "kernels"


def _install_copy(tmp_path: Path) -> Path:
    """pip-install a copy of the package (non-editable) into a target directory."""
    copy = tmp_path / "src"
    copy.mkdir()
    for item in ("pyproject.toml", "README.md", "cugrad", "kernels"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, copy / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, copy / item)
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(copy)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:   # offline (no registry for the build backend): use the installed one
        proc = subprocess.run(cmd + ["--no-build-isolation"], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"pip could not build the package here: {proc.stderr[-500:]}")
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return _install_copy(tmp_path_factory.mktemp("install"))


def test_installed_package_ships_and_reads_kernels(installed):
    code = textwrap.dedent("""
        from cugrad.backends.cuda import loader, config
        assert loader.source_dir() is None, loader.source_dir()
        for file, _, _ in config.instantiations():
            assert "begin common.cuh" in loader.read_source(file) or "common" not in file
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-c", code], cwd=installed, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---------------------------------------------------------------------------- GPU tests

def rel_err(out, ref) -> float:
    out = np.asarray(out.get() if hasattr(out, "get") else out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape
    assert np.isfinite(out).all(), "NaN or inf in the output (an unwritten element?)"
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(out - ref) / (denom if denom > 0 else 1.0))


def tol(dtype, kind="product"):
    if np.dtype(dtype) == np.float64:
        return 1e-12
    return 1e-4 if kind == "product" else 1e-5


def _gemm64(a, b, ta, tb, bias, act):
    return npb.gemm(np.asarray(a, np.float64), np.asarray(b, np.float64), ta, tb,
                    None if bias is None else np.asarray(bias, np.float64), act)


GEMM_SHAPES = [(1, 1, 1), (2, 3, 5), (7, 13, 1), (33, 127, 61), (128, 128, 8), (129, 257, 31),
               (1000, 17, 999), (997, 1000, 5), (64, 1000, 1000)]


def _gemm_plans(dtype, k):
    """The launcher's own plan (None), then every tile of the table without split, then the
    smallest tile with K cut into two-k-tile splits: every way gemm_tiled can be launched."""
    tiles = config.GEMM_TILES[np.dtype(dtype).name]
    plans = [None] + [config.GemmPlan(t, 1, k) for t in tiles]
    k_split = 2 * tiles[-1].bk
    if k > k_split:
        plans.append(config.GemmPlan(tiles[-1], -(-k // k_split), k_split))
    return plans


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("ta,tb", LAYOUTS, ids=["NN", "NT", "TN", "TT"])
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
def test_gemm_tiled_vs_reference_vs_float64(gpu, monkeypatch, dt, ta, tb, m, n, k):
    """gemm_tiled under every plan (each tile, split-K, the launcher's choice) and
    gemm_reference against float64, in every epilogue."""
    cp = gpu
    rng = np.random.default_rng(m * 7919 + n * 31 + k)
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dt)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dt)
    bias = rng.standard_normal(n).astype(dt)
    auto_plan = config.gemm_plan
    for has_bias, act in itertools.product([False, True], ACTS):
        bb = bias if has_bias else None
        ref = _gemm64(a, b, ta, tb, bb, act)
        args = (cp.asarray(a), cp.asarray(b), ta, tb, None if bb is None else cp.asarray(bb), act)
        refk = ops.gemm_reference(*args)
        assert rel_err(refk, ref) < tol(dt), ("reference", has_bias, act)
        for plan in _gemm_plans(dt, k):
            monkeypatch.setattr(config, "gemm_plan",
                                auto_plan if plan is None else (lambda *_, p=plan: p))
            tiled = ops.gemm(*args)
            assert rel_err(tiled, ref) < tol(dt), ("tiled", plan, has_bias, act)
            assert rel_err(tiled, refk.get()) < tol(dt), ("tiled vs reference", plan)


@pytest.mark.gpu
def test_long_k_float32_products_stay_inside_the_bound(gpu, monkeypatch):
    """K = 2^22 + 3 products of U[0, 1) data (every term the same sign, the worst case for a
    float32 running sum) in NN, NT with bias and TN: within MATH.md §7's 1e-4 of float64 because
    gemm_plan cuts K into ranges of at most GEMM_MAX_K_PER_SPLIT (unsplit, a thread would sum
    the whole K: 1.4e-4 off at 2^20, 1e-3 at 2^24). Planned for one SM, so that filling the
    GPU is no reason to split: the cap is the only one (as for a large output)."""
    from cugrad.backends.cuda.context import CupyContext
    monkeypatch.setattr(CupyContext, "sm_count", 1)
    cp = gpu
    rng = np.random.default_rng(22)
    k = 2**22 + 3
    a = rng.random((2, k), dtype=np.float32)
    b = rng.random((k, 3), dtype=np.float32)
    bias = rng.random(3, dtype=np.float32)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ga, gb = cp.asarray(a), cp.asarray(b)
    plan = config.gemm_plan(2, 3, k, "float32", 1)
    assert plan.splits > 1 and plan.k_split <= config.GEMM_MAX_K_PER_SPLIT, plan
    assert rel_err(ops.gemm(ga, gb, False, False, None, None), a64 @ b64) < 1e-4, "NN"
    w = cp.ascontiguousarray(gb.T)                               # (3, K): linear's NT
    assert rel_err(ops.gemm(ga, w, False, True, cp.asarray(bias), None), a64 @ b64 + bias) < 1e-4, "NT"
    x = cp.ascontiguousarray(ga.T)                               # (K, 2): dW's TN
    assert rel_err(ops.gemm(x, gb, True, False, None, None), a64 @ b64) < 1e-4, "TN"


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_gemm_unaligned_fortran_and_strided_operands(gpu, dt):
    cp = gpu
    rng = np.random.default_rng(1)
    a = rng.standard_normal((65, 64)).astype(dt)
    b = rng.standard_normal((64, 36)).astype(dt)
    ref = _gemm64(a, b, False, False, None, None)
    ga = cp.empty(a.size + 1, dt)[1:].reshape(a.shape)       # misaligned: scalar loads
    ga[...] = cp.asarray(a)
    assert rel_err(ops.gemm(ga, cp.asarray(b), False, False, None, None), ref) < tol(dt)
    fa, fb = cp.asfortranarray(cp.asarray(a)), cp.asfortranarray(cp.asarray(b))   # read in place
    assert rel_err(ops.gemm(fa, fb, False, False, None, None), ref) < tol(dt)
    wide = cp.asarray(np.repeat(b, 2, axis=1))[:, ::2]        # non-contiguous: copied
    assert rel_err(ops.gemm(cp.asarray(a), wide, False, False, None, None), ref) < tol(dt)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("m,n", [(1, 1), (7, 33), (1000, 1), (4096, 1000), (65536, 64)])
def test_bias_grad_matches_and_is_deterministic(gpu, dt, m, n):
    cp = gpu
    g = np.random.default_rng(m + n).standard_normal((m, n)).astype(dt)
    gg = cp.asarray(g)
    first = ops.bias_grad(gg)
    assert rel_err(first, g.astype(np.float64).sum(0)) < tol(dt)
    for _ in range(3):
        assert cp.array_equal(ops.bias_grad(gg), first)


@pytest.mark.gpu
@pytest.mark.parametrize("dt", [np.float32, np.float64], ids=["f32", "f64"])
def test_elementwise_rowwise_losses_optim_against_numpy(gpu, dt):
    cp = gpu
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((127, 33)) * 4).astype(dt)
    x[0, :2] = (1e4, -1e4)
    for name in ("sigmoid", "tanh", "relu"):
        z = ops.activation(name, cp.asarray(x))
        assert rel_err(z, npb.activation(name, x.astype(np.float64))) < tol(dt, "elementwise")
        go = rng.standard_normal(x.shape).astype(dt)
        ref = npb.activation_backward(name, go.astype(np.float64), z.get().astype(np.float64))
        assert rel_err(ops.activation_backward(name, cp.asarray(go), z), ref) < tol(dt, "elementwise")
    for fn in ("softmax", "log_softmax"):
        assert rel_err(getattr(ops, fn)(cp.asarray(x)), getattr(npb, fn)(x.astype(np.float64))) < tol(dt, "elementwise")
    idx = rng.integers(0, 33, 127).astype(np.int64)
    prob = rng.random((127, 33)).astype(dt)
    prob /= prob.sum(1, keepdims=True)
    for target, red in itertools.product((idx, prob), ("mean", "sum")):
        ref_loss, ref_grad = npb.cross_entropy_fwd_bwd(x.astype(np.float64), target if target.ndim == 1
                                                       else target.astype(np.float64), red)
        loss, grad = ops.cross_entropy_fwd_bwd(cp.asarray(x), cp.asarray(target), red)
        assert loss.shape == () and loss.dtype == dt
        assert rel_err(loss, ref_loss) < tol(dt)
        assert rel_err(grad, ref_grad) < tol(dt, "elementwise")
        assert rel_err(ops.cross_entropy(cp.asarray(x), cp.asarray(target), red), ref_loss) < tol(dt)
        assert rel_err(ops.cross_entropy_backward(cp.asarray(x), cp.asarray(target), red),
                       ref_grad) < tol(dt, "elementwise")
    for shape in [(1,), (127, 33), (1000, 1000)]:
        p, t = rng.standard_normal(shape).astype(dt), rng.standard_normal(shape).astype(dt)
        for red in ("mean", "sum", "half_sum"):
            p64, t64 = p.astype(np.float64), t.astype(np.float64)
            assert rel_err(ops.mse_loss(cp.asarray(p), cp.asarray(t), red), npb.mse_loss(p64, t64, red)) < tol(dt)
            assert rel_err(ops.mse_loss_backward(cp.asarray(p), cp.asarray(t), red),
                           npb.mse_loss_backward(p64, t64, red)) < tol(dt, "elementwise")
    p0 = rng.standard_normal((33, 7)).astype(dt)
    p, m_, v_ = cp.asarray(p0), cp.zeros_like(cp.asarray(p0)), cp.zeros_like(cp.asarray(p0))
    pr, mr, vr = p0.astype(np.float64), np.zeros(p0.shape), np.zeros(p0.shape)
    buf, bufr = cp.zeros_like(p), np.zeros(p0.shape)
    q, qr = cp.asarray(p0), p0.astype(np.float64)
    for step in range(1, 4):
        g = rng.standard_normal(p0.shape).astype(dt)
        ops.adam_step(p, cp.asarray(g), m_, v_, step, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        npb.adam_step(pr, g.astype(np.float64), mr, vr, step, 1e-3, 0.9, 0.999, 1e-8, 0.01)
        ops.sgd_step(q, cp.asarray(g), buf, 0.1, 0.9, 0.01)
        npb.sgd_step(qr, g.astype(np.float64), bufr, 0.1, 0.9, 0.01)
    assert rel_err(p, pr) < tol(dt, "elementwise") and rel_err(q, qr) < tol(dt, "elementwise")
    for state, ref in ((m_, mr), (v_, vr), (buf, bufr)):      # the state the next step reads
        assert rel_err(state, ref) < tol(dt, "elementwise")


@pytest.mark.gpu
def test_reductions_are_bitwise_deterministic(gpu):
    cp = gpu
    p = cp.asarray(np.random.default_rng(3).standard_normal((4096, 3000)).astype(np.float32))
    t = cp.zeros_like(p)
    first = ops.mse_loss(p, t, "mean")
    assert all(cp.array_equal(ops.mse_loss(p, t, "mean"), first) for _ in range(3))


@pytest.mark.gpu
def test_compile_error_shows_file_options_and_log(gpu):
    from cugrad.backends.cuda.context import CupyContext, KernelCompileError
    broken = "template <typename T> __global__ void k(T* x) { x[0] = undefined_symbol; }"
    with pytest.raises(KernelCompileError) as info:
        CupyContext().module("broken.cu", broken, ["-std=c++17", "-DMARK=1"], ["k<float>"])
    msg = str(info.value)
    assert "broken.cu" in msg and "-DMARK=1" in msg and "undefined_symbol" in msg


@pytest.mark.gpu
def test_torch_dlpack_round_trip(gpu):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    from cugrad.backends.cuda.interop import to_cupy, to_torch
    t = torch.randn(33, 7, device="cuda", dtype=torch.float32)
    c = to_cupy(t)
    assert c.data.ptr == t.data_ptr(), "to_cupy copied"
    out = ops.activation("relu", c)
    back = to_torch(out)
    assert back.is_cuda and torch.equal(back, torch.relu(t))


@pytest.mark.gpu
def test_torch_state_dicts_and_parameters_come_in_without_a_copy(gpu):
    """A PyTorch nn.Linear's state dict loads into a cugrad Linear (same names and layout),
    the two agree on a batch, and Parameter(tensor) is a CuPy array over the tensor's memory
    that an SGD step updates in place (written without a GPU in session 14)."""
    cp = gpu
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    from cugrad import nn, optim
    torch.manual_seed(0)
    ref = torch.nn.Linear(7, 5).cuda()
    layer = nn.Linear(7, 5, device="cuda")
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(9, 7, device="cuda")
    got = torch.from_dlpack(layer(x))
    assert torch.allclose(got, ref(x).detach(), rtol=1e-5, atol=1e-5)
    w = torch.ones(3, 4, device="cuda")
    p = nn.Parameter(w)
    assert p.device == "cuda" and p.data.data.ptr == w.data_ptr(), "the import copied"
    p.grad = cp.ones((3, 4), cp.float32)
    optim.SGD([p], lr=0.5).step()
    torch.cuda.synchronize()
    assert torch.equal(w, torch.full((3, 4), 0.5, device="cuda"))


@pytest.mark.gpu
def test_kernels_compile_and_run_from_installed_package(gpu, installed):
    code = textwrap.dedent("""
        import numpy as np, cupy as cp
        from cugrad.backends.cuda import ops, loader
        assert loader.source_dir() is None
        a = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
        out = ops.gemm(a, a, False, True, None, None).get()
        ref = np.arange(6, dtype=np.float64).reshape(2, 3)
        assert np.allclose(out, ref @ ref.T), out
        print("ok")
    """)
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run([sys.executable, "-c", code], cwd=installed, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_cupy_context_plans_for_the_current_devices_sm_count(monkeypatch):
    """CupyContext.sm_count reads MultiProcessorCount of the current device (once per device),
    and the GEMM launcher plans with it: a stand-in for CuPy, no GPU needed."""
    import types
    from cugrad.backends.cuda.context import CupyContext
    reads = []

    class Device:
        current = 0

        def __init__(self):
            self.id = Device.current

        @property
        def attributes(self):
            reads.append(self.id)
            return {"MultiProcessorCount": {0: 132, 1: 8}[self.id]}
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=types.SimpleNamespace(Device=Device)))
    ctx = CupyContext()
    assert ctx.sm_count == 132 and ctx.sm_count == 132
    Device.current = 1
    assert ctx.sm_count == 8
    assert reads == [0, 1]
    # 256x1024: 16 large tiles; 8 SMs are filled by them, 132 need the small tile and splits
    assert config.gemm_plan(256, 1024, 1024, "float32", 8).tiles == config.GEMM_TILES["float32"][0]
    assert config.gemm_plan(256, 1024, 1024, "float32", 132).splits > 1


@pytest.mark.parametrize("value, poisoned", [("1", True), ("yes", True), ("", False), ("0", False),
                                             ("false", False), ("Off", False), (" no ", False)])
def test_poison_outputs_reads_the_flag_like_the_other_switches(monkeypatch, value, poisoned):
    """CUGRAD_POISON_OUTPUTS is read like CUGRAD_FORCE_CPU and CUGRAD_NVTX (env_flag): a
    stand-in for CuPy's empty, no GPU needed."""
    import types
    from cugrad.backends.cuda.context import POISON_ENV, CupyContext
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(empty=np.zeros))
    monkeypatch.setenv(POISON_ENV, value)
    out = CupyContext().empty((3,), np.float32)
    assert bool(np.isnan(out).all()) == poisoned


# ------------------- from a mutation probe of the CUDA backend's host code (session 13)
# Each test below fails on a mutant that every other test let live.


def _two_device_cupy():
    """A stand-in for CuPy with two devices: RawModule remembers the device current when it
    was built, and its functions say which device they belong to."""
    current = {"id": 0}

    class RawModule:
        def __init__(self, code, options, name_expressions):
            self.device = current["id"]

        def compile(self):
            pass

        def get_function(self, name):
            return ("function", name, self.device)

    def Device():
        return types.SimpleNamespace(id=current["id"])
    return current, types.SimpleNamespace(RawModule=RawModule, ndarray=np.ndarray,
                                          cuda=types.SimpleNamespace(Device=Device))


def test_cupy_context_compiles_and_caches_kernels_per_device(monkeypatch):
    """A kernel asked for on device 1 after device 0 is a module of device 1, compiled once
    per device (kills: kernel cache key without the device; module cache key without it)."""
    current, fake = _two_device_cupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    ctx = CupyContext()
    file, _, names = config.instantiations()[0]
    name = names[0]
    assert ctx.function(file, name)._fn == ("function", name, 0)
    current["id"] = 1
    assert ctx.function(file, name)._fn == ("function", name, 1)
    current["id"] = 0
    assert ctx.function(file, name)._fn == ("function", name, 0)
    assert sorted(key[-1] for key in ctx.compile_count) == [0, 1]
    assert set(ctx.compile_count.values()) == {1}


@pytest.mark.gpu
def test_to_cupy_returns_a_cupy_array_itself(gpu):
    """A CuPy array is returned as it is, not re-imported (kills: the isinstance short cut
    dropped; on the stand-in the re-import through DLPack raises, on a real GPU it would
    make a new view)."""
    from cugrad.backends.cuda.interop import to_cupy
    x = gpu.arange(6, dtype=gpu.float32)
    assert to_cupy(x) is x


@pytest.mark.gpu
def test_to_cupy_of_host_data_says_where_it_lives(gpu):
    """Host data with DLPack (NumPy) is a TypeError naming its DLPack device type; an object
    with neither interface says so (kills: the device-type branch inverted)."""
    from cugrad.backends.cuda.interop import to_cupy
    with pytest.raises(TypeError, match="lives on DLPack device type 1, not on a CUDA device"):
        to_cupy(np.zeros(3, np.float32))
    with pytest.raises(TypeError, match="exposes neither __cuda_array_interface__ nor __dlpack__"):
        to_cupy([1.0, 2.0])


@pytest.mark.gpu
def test_a_module_that_failed_to_compile_is_not_cached(gpu):
    """Asking again for a module that failed to compile fails again, with the log, rather
    than returning the broken module (kills: the module stored before compile())."""
    from cugrad.backends.cuda.context import KernelCompileError
    broken = "template <typename T> __global__ void k(T* x) { x[0] = undefined_symbol; }"
    ctx = CupyContext()
    for _ in range(2):
        with pytest.raises(KernelCompileError, match="undefined_symbol"):
            ctx.module("broken.cu", broken, ["-std=c++17"], ["k<float>"])


def test_use_context_nests_unwinds_on_error_and_is_per_thread():
    """The innermost use_context wins and the outer one is back after it (kills: stack[0]);
    an exception in the block still uninstalls the context (kills: pop outside finally);
    another thread does not see this thread's context (kills: a shared, non-thread-local
    stack)."""
    import threading
    from cugrad.backends.cuda.context import Context, current_context, use_context
    a, b = Context(), Context()
    with use_context(a):
        with use_context(b):
            assert current_context() is b
        assert current_context() is a
        seen = []
        t = threading.Thread(target=lambda: seen.append(current_context()))
        t.start()
        t.join()
        assert seen and seen[0] is not a and isinstance(seen[0], CupyContext)
    assert isinstance(current_context(), CupyContext)
    with pytest.raises(ZeroDivisionError):
        with use_context(a):
            1 / 0
    assert current_context() is not a and isinstance(current_context(), CupyContext)


def test_check_kernel_args_refuses_python_numbers_and_none():
    """Python int/float/None as kernel arguments are refused, naming the argument (kills:
    int/float accepted)."""
    from cugrad.backends.cuda.context import check_kernel_args
    check_kernel_args((np.zeros(2, np.float32), np.int64(2), np.float32(1.0)), np)
    for i, bad in ((1, 3), (1, 0.5), (1, None)):
        with pytest.raises(TypeError, match=f"kernel argument {i} is {type(bad).__name__}"):
            check_kernel_args((np.zeros(2, np.float32), bad), np)


@pytest.mark.gpu
def test_a_cupy_kernel_refuses_an_untyped_argument_before_launch(gpu):
    """CupyContext's kernels check their arguments themselves: a Python int is cugrad's
    TypeError, not whatever CuPy makes of it (real CuPy guesses a C type and launches).
    Kills: _CupyKernel without check_kernel_args (the stand-in has its own, differently
    worded refusal, which this test tells apart)."""
    from cugrad.backends.cuda.context import current_context
    ctx = current_context()
    fn = ctx.function("optim.cu", config.accumulate_name("float32"))
    total, grad = gpu.zeros(4, gpu.float32), gpu.ones(4, gpu.float32)
    with pytest.raises(TypeError, match=r"^cugrad: kernel argument 2 is int"):
        fn((1, 1, 1), (32, 1, 1), (total, grad, 4))
    fn((1, 1, 1), (32, 1, 1), (total, grad, np.int64(4)))
    np.testing.assert_array_equal(total.get(), np.ones(4, np.float32))


@pytest.mark.gpu
def test_a_gpu_parameter_converts_and_is_described_as_on_the_gpu(gpu):
    """A probe on the stand-in: to_numpy(param), asarray(param) and
    load_state_dict(dict(other.named_parameters())) worked on the CPU (through the
    Parameter's __array__) and raised CuPy's bare "Implicit conversion to a NumPy array"
    on the GPU; messages said a GPU Parameter was "on cpu"."""
    import cugrad
    import cugrad.functional as F
    from cugrad import nn
    a = nn.Linear(3, 2, rng=0, device="cuda")
    b = nn.Linear(3, 2, rng=1, device="cuda")
    want = gpu.asnumpy(a.weight.data)
    assert np.array_equal(cugrad.to_numpy(a.weight), want)
    got = cugrad.asarray(a.weight, device="cuda")
    assert np.array_equal(gpu.asnumpy(got), want)
    b.load_state_dict(dict(a.named_parameters()))
    assert np.array_equal(gpu.asnumpy(b.weight.data), want)
    assert b.weight.data is not a.weight.data
    with pytest.raises(TypeError, match=r"got cugrad\.Parameter of shape \(2, 3\), dtype "
                                        r"float32, on cuda; pass its \.data"):
        F.relu(a.weight)
