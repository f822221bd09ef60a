"""The benchmark suite's host side, without a GPU, CuPy or PyTorch: timing plan and
statistics, the figure records, the JSON and the table, the figure list, the orchestration
of one figure (stand-in device environment) and the command line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cugrad import bench
from cugrad.bench import (FULL, QUICK, Case, PeerRun, PeerSpec, Spec, Unavailable,
                          head_start_us, input_sets, make_figure, plan_reps, summarize, worst)

ROOT = Path(__file__).resolve().parents[1]


def _spec(peers=(PeerSpec("cuBLAS", 0.9, "cupy.matmul"),), build=None, **kw):
    return Spec("gemm_nn", "4x4x4", "F.matmul", tuple(peers), build or (lambda env: None), **kw)


def _stats(median, p10=None, p90=None, n=10):
    return {"median": median, "p10": p10 or median, "p90": p90 or median, "n": n,
            "head_start_us": 25.0}


# ------------------------------------------------------------------- plan and statistics

def test_plan_reps_targets_time_with_floor_and_caps():
    assert plan_reps(0.001, FULL) == 100            # 0.1 s of 1 ms calls
    assert plan_reps(0.05, FULL) == 10              # at least 10 calls ...
    assert plan_reps(0.2, FULL) == 5                # ... but about 1 s at most
    assert plan_reps(5.0, FULL) == 3                # never fewer than 3
    assert plan_reps(1e-6, FULL) == FULL.max_reps   # capped
    assert plan_reps(0.0, FULL) == FULL.max_reps
    assert plan_reps(1e-6, QUICK) == QUICK.max_reps < FULL.max_reps


def test_head_start_covers_host_time_within_a_cap():
    assert head_start_us(10e-6, FULL) == pytest.approx(35.0)
    assert head_start_us(0.0, FULL) == pytest.approx(20.0)
    assert head_start_us(1.0, FULL) == FULL.max_head_start_us


def test_input_sets_exceed_twice_l2_within_limits():
    l2 = 50 * 2**20
    assert input_sets(2**20, l2) == 100                           # 100 MiB of 1 MiB sets
    assert input_sets(3 * 2**20, l2) * 3 * 2**20 > 2 * l2
    assert input_sets(256 * 2**20, l2) == 1                      # one set is already > 2x L2
    assert input_sets(1000, l2) == bench.MAX_INPUT_SETS
    assert input_sets(2**30, l2, budget_bytes=2**29) == 1         # never zero
    assert input_sets(40 * 2**20, l2, budget_bytes=80 * 2**20) == 2


def test_summarize_gives_median_and_p10_p90():
    st = summarize([float(v) for v in range(1, 12)])       # 1 .. 11
    assert st == {"median": 6.0, "p10": 2.0, "p90": 10.0, "n": 11}
    assert summarize([3.0])["median"] == 3.0


def test_worst_is_nan_if_any_is_nan():
    assert worst([1e-7, 3e-6, 0.0]) == 3e-6
    assert math.isnan(worst([math.nan, 1.0]))
    assert math.isnan(worst([1.0, math.nan]))


# --------------------------------------------------------------------------- figures

def test_make_figure_timed_with_rates_and_ceilings():
    spec = _spec(flops=2.0 * 4096 ** 3)
    peer = spec.peers[0]
    ceilings = {"sgemm": {"tflops": 50.0}, "copy": {"gbps": 3000.0}}
    fig = make_figure(spec, peer, sets=3, check_err=1e-7, ours=_stats(4.0, 3.9, 4.2),
                      theirs=_stats(3.0, 2.9, 3.1), setup_s=0.5, ceilings=ceilings)
    for key in ("name", "shape", "ours_ms", "peer", "peer_ms", "speedup", "target", "spread"):
        assert key in fig
    assert fig["ours_ms"] == 4.0 and fig["peer_ms"] == 3.0
    assert fig["speedup"] == pytest.approx(0.75)
    assert fig["met"] is False and fig["target"] == 0.9
    assert fig["spread"] == {"ours": [3.9, 4.2], "peer": [2.9, 3.1]}
    assert fig["tflops"]["ours"] == pytest.approx(2.0 * 4096 ** 3 / 4e-3 / 1e12)
    assert fig["ours_fraction_of_sgemm_ceiling"] == pytest.approx(fig["tflops"]["ours"] / 50)
    assert "gbps" not in fig and "error" not in fig
    assert fig["check_rel_err"] == 1e-7 and fig["input_sets"] == 3
    assert bench.figure_status(fig) == "missed"

    fast = make_figure(spec, peer, ours=_stats(2.0), theirs=_stats(3.0))
    assert fast["met"] is True and bench.figure_status(fast) == "met"


def test_a_strict_target_is_not_met_by_a_tie():
    """"faster" (> 1.0x) and "> 1.3x cupy.sum" are strict: a tie meets >= but not >."""
    for strict, met in ((False, True), (True, False)):
        peer = PeerSpec("cupy.sum", 1.0, "peer", strict=strict)
        fig = make_figure(_spec(peers=(peer,)), peer, ours=_stats(2.0), theirs=_stats(2.0))
        assert fig["speedup"] == 1.0 and fig["met"] is met
        assert fig.get("target_strict", False) is strict
        assert bench.table_row(fig)[6] == ("> 1.00" if strict else "1.00")


def test_make_figure_bandwidth_report_only_error_and_skip():
    copy = PeerSpec("copy", 0.85, "memcpy")
    spec = _spec(peers=(copy,), nbytes=10**9)
    fig = make_figure(spec, copy, ours=_stats(0.5), theirs=_stats(0.4),
                      ceilings={"copy": {"gbps": 2500.0}})
    assert fig["gbps"] == {"ours": pytest.approx(2000.0), "peer": pytest.approx(2500.0)}
    assert fig["ours_fraction_of_copy_ceiling"] == pytest.approx(0.8)
    assert fig["bytes"] == 10**9 and "tflops" not in fig

    report = PeerSpec("PyTorch", None, "torch")
    fig = make_figure(_spec(peers=(report,)), report, ours=_stats(1.0), theirs=_stats(2.0))
    assert fig["met"] is None and bench.figure_status(fig) == "report"

    failed = make_figure(spec, copy, check_err=0.3, error="check failed")
    assert failed["ours_ms"] is None and failed["speedup"] is None and failed["met"] is None
    assert bench.figure_status(failed) == "failed"
    skipped = make_figure(spec, copy, error="the time budget ran out", skipped=True)
    assert bench.figure_status(skipped) == "skipped"


def test_table_row_check_column():
    spec = _spec()
    peer = spec.peers[0]
    ok = bench.table_row(make_figure(spec, peer, check_err=2e-7, ours=_stats(1.0),
                                     theirs=_stats(1.0)))
    assert len(ok) == len(bench.TABLE_COLUMNS)
    assert ok[0] == "gemm_nn" and ok[3] == "cuBLAS" and ok[7] == "yes"
    assert ok[-1] == "ok 2.0e-07"
    bad = bench.table_row(make_figure(spec, peer, check_err=0.5, error="check failed"))
    assert bad[-1] == "FAILED 5.0e-01" and bad[2] == "—" and bad[7] == "—"   # not timed: no verdict
    nan = bench.table_row(make_figure(spec, peer, check_err=math.nan, error="check failed"))
    assert nan[-1] == "FAILED nan"
    crash = bench.table_row(make_figure(spec, peer, error="RuntimeError: boom"))
    assert crash[-1] == "error"
    skip = bench.table_row(make_figure(spec, peer, error="budget", skipped=True))
    assert skip[-1] == "skipped"


def _result(figures):
    return {"device": "NVIDIA H100 80GB HBM3", "driver": "580.1", "cuda": "13.0",
            "cupy": "14.2.0", "torch": "2.11.0", "date": "2026-11-24T00:00:00+00:00",
            "python": "3.12.0", "numpy": "2.5.0",
            "timing": {"summary": "per-call CUDA events"},
            "ceilings": {"copy": {"gbps": 2900.0}, "sgemm": {"error": "RuntimeError: x"}},
            "figures": figures, "skipped": ["mlp_step_graph 784-256-256-10: not importable"]}


def test_markdown_report_has_every_figure_and_the_errors():
    spec = _spec()
    peer = spec.peers[0]
    figures = [make_figure(spec, peer, check_err=1e-7, ours=_stats(1.0), theirs=_stats(0.85)),
               make_figure(spec, peer, error="ValueError: " + "x" * 1000),
               make_figure(spec, peer, error="budget ran out", skipped=True),
               make_figure(spec, peer, error="budget ran out", skipped=True)]
    text = bench.markdown_report(_result(figures))
    lines = text.splitlines()
    header = "| " + " | ".join(bench.TABLE_COLUMNS) + " |"
    assert header in lines
    rows = [ln for ln in lines if ln.startswith("| gemm_nn ")]
    assert len(rows) == 4
    assert "copy 2900 GB/s" in text and "sgemm RuntimeError: x" in text
    assert "4 figures: 0 met, 1 missed, 0 reported only, 1 failed, 2 skipped." in text
    assert "- 2 figures skipped: budget ran out" in text
    assert "SMOKE" not in text
    assert "- not run: mlp_step_graph" in text
    error_line = next(ln for ln in lines if ln.startswith("- gemm_nn 4x4x4 vs cuBLAS: ValueError"))
    assert len(error_line) < 400 and error_line.endswith("…")


def test_markdown_report_lists_each_skip_reason_and_marks_a_smoke_run():
    spec = _spec()
    peer = spec.peers[0]
    figures = [make_figure(spec, peer, error="PyTorch unavailable", skipped=True),
               make_figure(spec, peer, error="budget ran out", skipped=True),
               make_figure(spec, peer, error="PyTorch unavailable", skipped=True)]
    assert all(f["met"] is None for f in figures)
    text = bench.markdown_report({**_result(figures), "smoke": True, "smoke_note": "tiny",
                                  "cupy_stand_in": True})
    assert "- 2 figures skipped: PyTorch unavailable" in text
    assert "- 1 figure skipped: budget ran out" in text
    assert "**SMOKE RUN, NOT A MEASUREMENT**: tiny" in text
    assert "not on a GPU" in text and "(a smoke run: met and missed mean nothing)" in text


def test_write_outputs_strict_json_and_markdown_beside(tmp_path):
    spec = _spec()
    fig = make_figure(spec, spec.peers[0], check_err=math.nan, error="check failed")
    out = tmp_path / "results" / "bench-h100-20261124.json"
    md = bench.write_outputs(_result([fig]), out)
    assert md == out.with_suffix(".md") and md.read_text().startswith("# cugrad benchmarks")

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    data = json.loads(out.read_text(), parse_constant=no_constants)
    for key in ("device", "driver", "cuda", "cupy", "torch", "date", "ceilings", "figures"):
        assert key in data
    assert data["figures"][0]["check_rel_err"] == "nan"
    assert not list(out.parent.glob("*.tmp"))


@pytest.mark.parametrize("name, short", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("Tesla V100-SXM2-16GB", "v100"),
    ("NVIDIA GeForce RTX 4090", "4090"), ("Some Accelerator", "gpu")])
def test_gpu_short_name(name, short):
    assert bench.gpu_short_name(name) == short


def test_default_out_path_is_profiling_results_in_a_checkout(tmp_path, monkeypatch):
    import datetime
    (tmp_path / "profiling" / "results").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    path = bench.default_out_path("NVIDIA H100 80GB HBM3", datetime.date(2026, 11, 24))
    assert path == Path("profiling/results/bench-h100-20261124.json")


def test_default_out_path_is_the_current_folder_elsewhere(tmp_path, monkeypatch):
    """Run where there is no ./profiling/results (an installed cugrad, from any folder): the
    JSON goes into the current folder. Fails on the old default, which was
    profiling/results/ relative to any current folder, so that the run created
    ./profiling/results/ wherever it was started."""
    import datetime
    monkeypatch.chdir(tmp_path)
    path = bench.default_out_path("NVIDIA H100 80GB HBM3", datetime.date(2026, 11, 24))
    assert path == Path("bench-h100-20261124.json")
    (tmp_path / "profiling").mkdir()           # a profiling/ folder alone is not a checkout's
    assert bench.default_out_path("NVIDIA H100 80GB HBM3", datetime.date(2026, 11, 24)) == path


def test_help_says_where_the_default_out_goes_and_names_no_issue(capsys):
    """`bench --help` describes the suite without the tracker's issue numbers and says where
    the JSON goes by default. Fails on the old help ("The benchmark suite (issue 8)",
    default profiling/results/... wherever the command runs)."""
    with pytest.raises(SystemExit) as info:
        bench.main(["--help"])
    assert info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "issue" not in out.lower(), out
    assert ("(default: bench-<gpu>-<yyyymmdd>.json in ./profiling/results/ when that folder "
            "exists, as in a source checkout, else in the current folder)") in out, out


# ---------------------------------------------------------------------- the figure list

def test_specs_cover_the_issue_with_its_targets():
    specs = bench.specs()
    figures = [(s, p) for s in specs for p in s.peers]
    keys = [(s.name, s.shape, p.name) for s, p in figures]
    assert len(keys) == len(set(keys)), "a figure appears twice"

    def targets(name):
        return {(s.shape, p.name): p.target for s, p in figures if s.name == name}
    for layout in ("nn", "nt", "tn"):
        assert targets(f"gemm_{layout}") == {("4096x4096x4096", "cuBLAS"): 0.9,
                                             ("8192x8192x8192", "cuBLAS"): 0.9}
    mlp = {"256x1024x1024", "4096x4096x512", "8192x1024x1024", "128x784x256"}
    assert targets("gemm_mlp_nn") == {(s, "cuBLAS"): 0.8 for s in mlp}
    assert set(targets("linear_bias_sigmoid").values()) == {1.0}
    assert {s for s, _ in targets("linear_bias_sigmoid")} == mlp
    assert targets("bias_grad") == {("8192x8192", "cupy.sum"): 1.3, ("8192x8192", "copy"): 0.85,
                                    ("65536x1024", "cupy.sum"): 1.3, ("65536x1024", "copy"): 0.85}
    # "faster" and "> 1.3x": strictly above the target.
    strict = {(s.name, p.name) for s, p in figures if p.strict}
    assert strict == {("linear_bias_sigmoid", "cuBLAS + CuPy"), ("bias_grad", "cupy.sum")}
    for name in ("sigmoid_fwd", "sigmoid_bwd", "tanh_fwd", "tanh_bwd", "relu_fwd", "relu_bwd",
                 "cross_entropy_fwd_bwd_kernels", "mse_fwd_bwd_kernels"):
        assert targets(name), f"no {name} figure"
        assert targets(name) == {(s, "copy"): 0.85 for s, _ in targets(name)} | \
            {(s, "PyTorch"): None for s, _ in targets(name) if "kernels" not in name}, name
    for name in ("cross_entropy_fwd_bwd", "mse_fwd_bwd"):     # the public ops: reported
        assert set(targets(name).values()) == {None}, name
    assert targets("linear_fwd_bwd") == {("4096x4096x4096", "PyTorch"): 1.0,
                                         ("256x1024x1024", "PyTorch"): 1.0}
    assert list(targets("mlp_step").values()) == [None]
    assert list(targets("mlp_step_graph").values()) == [2.0]
    for s, p in figures:
        if p.name == "copy":
            assert s.nbytes > 0, s.label
        if s.name.startswith(("gemm", "linear")):
            assert s.flops > 0, s.label
    assert all(s.host_clock == s.name.startswith("mlp_step") for s in specs)


def test_smoke_shapes_are_small_distinct_and_keep_off_tile_dimensions():
    full, smoke = bench._dims(bench.FULL_SHAPES), bench._dims(bench.SMOKE_SHAPES)
    assert len(full) == len(smoke) and max(smoke) <= 96
    pairs = dict(zip(full, smoke))
    assert len(set(pairs.values())) == len(pairs), pairs           # distinct stay distinct
    for d, s in pairs.items():
        assert 1 <= s <= d and (s == d or d > 64), (d, s)        # small ones unchanged
        if d % 64:
            assert s % 64, (d, s)                                   # off the tile grid stays off
    assert bench.smoke_dim(10) == 10 and bench.smoke_dim(784) == 48
    assert bench.SMOKE_SHAPES.copy_ceiling_bytes <= 2**20
    assert bench.SMOKE_SHAPES.sgemm_ceiling_n <= 64


def test_smoke_specs_are_the_full_figures_at_small_shapes():
    def key(specs):
        return [(s.name, p.name, p.target, s.tol, s.host_clock, bool(s.flops), bool(s.nbytes))
                for s in specs for p in s.peers]
    assert key(bench.specs(bench.SMOKE_SHAPES)) == key(bench.specs())
    plans = bench.gemm_plan_specs(shapes=bench.SMOKE_SHAPES)
    assert plans and all(s.name.startswith("gemm_plan_") for s in plans)
    assert len({s.label for s in plans}) == len(plans)
    assert plan_reps(1e-3, bench.SMOKE) == bench.SMOKE.max_reps == 2
    assert plan_reps(10.0, bench.SMOKE) == 2


def test_smoke_and_stand_in_outputs_stay_out_of_profiling_results():
    import datetime
    path = bench.default_out_path("fake cupy (CPU harness)", datetime.date(2026, 11, 24),
                                  scratch=True)
    assert "profiling" not in path.parts and path.name.endswith("-smoke.json")


def test_gemm_plan_sweep_covers_every_tile_and_marks_the_launchers_choice():
    from cugrad.backends.cuda import config
    specs = bench.gemm_plan_specs()
    labels = [s.label for s in specs]
    assert len(labels) == len(set(labels)), "a plan appears twice"
    shapes = {s.shape for s in specs}
    # the MLP shapes and a training step's forward, dX and dW products
    assert {"256x1024x1024", "128x784x256", "128x256x784", "256x784x128"} <= shapes
    products = {(s.name.split("_")[2], s.shape) for s in specs}     # (layout, shape)
    for layout, shape in products:
        mine = [s for s in specs if s.shape == shape and s.name.split("_")[2] == layout]
        assert sum(s.name.endswith("_auto") for s in mine) == 1, (layout, shape)
        for tiles in config.GEMM_TILES["float32"]:
            assert any(f"_t{tiles.bm}_s1" in s.name for s in mine), (shape, tiles)
    assert all(p.target is None for s in specs for p in s.peers)
    assert not set(labels) & {s.label for s in bench.specs()}


def test_gemm_plan_sweep_marks_the_choice_for_the_devices_sm_count():
    """On a GPU with another SM count than 132 (an H100 PCIe has 114) the plan marked
    ``_auto`` is the one F.matmul takes there; the bench passes the device's count."""
    from cugrad.backends.cuda import config
    for sm_count in (114, 16):
        specs = bench.gemm_plan_specs(sm_count=sm_count)
        autos = [s for s in specs if s.name.endswith("_auto")]
        assert autos and all(f"choice on {sm_count} SMs" in s.ours for s in autos)
        for s in autos:
            m, n, k = map(int, s.shape.split("x"))
            plan = config.gemm_plan(m, n, k, "float32", sm_count)
            assert f"_t{plan.tiles.bm}_s{plan.splits}_auto" in s.name, (sm_count, s.name)
    # the counts differ where it matters: some product is planned otherwise on 16 SMs
    marked = lambda c: {s.name for s in bench.gemm_plan_specs(sm_count=c)  # noqa: E731
                        if s.name.endswith("_auto")}
    assert marked(16) != marked(132)


def test_forced_gemm_plan_is_used_and_undone():
    from cugrad.backends.cuda import config
    chosen = config.gemm_plan
    plan = config.GemmPlan(config.GEMM_TILES["float32"][0], 2, 64)
    with bench._forced_gemm_plan(plan):
        assert config.gemm_plan(1, 1, 100, "float32", 132) == plan
    assert config.gemm_plan is chosen
    with pytest.raises(ZeroDivisionError), bench._forced_gemm_plan(plan):
        1 / 0
    assert config.gemm_plan is chosen


def test_selected_filters_on_name_and_shape():
    specs = bench.specs()
    assert bench.selected(specs, None) == specs
    gemm = bench.selected(specs, ["GEMM_NN"])
    assert {s.name for s in gemm} == {"gemm_nn"}
    both = bench.selected(specs, ["bias_grad", "8192x8192x8192"])
    assert {s.label for s in both} == {"bias_grad 8192x8192", "bias_grad 65536x1024",
                                       "gemm_nn 8192x8192x8192", "gemm_nt 8192x8192x8192",
                                       "gemm_tn 8192x8192x8192"}
    assert bench.selected(specs, ["no such figure"]) == []


# --------------------------------------------------- one figure, stand-in device environment

class StubEnv:
    """What run_spec needs of bench.Env: relative errors on NumPy, canned timings."""

    def __init__(self):
        self.timed = []
        self.freed = 0

    def rel_err(self, out, ref):
        import numpy as np
        out, ref = np.asarray(out, dtype=float), np.asarray(ref, dtype=float)
        return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))

    def time_interleaved(self, calls, sets, *, host_clock=False):
        self.timed.append((sorted(calls), sets, host_clock))
        return {label: _stats(2.0 if label == "ours" else 1.0) for label in calls}

    def free(self):
        self.freed += 1


def test_run_spec_checks_then_times_only_the_peers_that_agree():
    good, bad = PeerSpec("cupy.sum", 1.3, "sum"), PeerSpec("copy", 0.85, "memcpy")

    def build(env):
        return Case(lambda i: [1.0, 2.0], {"cupy.sum": PeerRun(lambda i: [1.0, 2.0]),
                                           "copy": PeerRun(lambda i: None,
                                                           reference=lambda: [1.0, 3.0])}, 4)
    env = StubEnv()
    figs = bench.run_spec(env, _spec(peers=(good, bad), build=build), {})
    assert env.timed == [(["cupy.sum", "ours"], 4, False)]
    assert env.freed == 1
    assert figs[0]["peer"] == "cupy.sum" and figs[0]["speedup"] == 0.5
    assert figs[0]["check_rel_err"] == 0.0 and figs[0]["setup_s"] >= 0
    assert figs[1]["peer"] == "copy" and figs[1]["ours_ms"] is None
    assert figs[1]["error"].startswith("check failed: relative error 0.316 > tolerance 0.0001")
    assert figs[1]["met"] is None          # never timed: "failed", not a miss


def test_run_spec_custom_check_and_host_clock():
    peer = PeerSpec("PyTorch", None, "eager")
    build = lambda env: Case(lambda i: None, {"PyTorch": PeerRun(lambda i: None)}, 16,  # noqa: E731
                             check=lambda: {"PyTorch": 1e-7})
    env = StubEnv()
    figs = bench.run_spec(env, _spec(peers=(peer,), build=build, host_clock=True), {})
    assert env.timed == [(["PyTorch", "ours"], 16, True)]
    assert figs[0]["clock"] == "host, batches of steps" and figs[0]["met"] is None


def test_run_spec_records_an_exception_per_peer_and_goes_on():
    peers = (PeerSpec("cupy.sum", 1.3, "sum"), PeerSpec("copy", 0.85, "memcpy"))

    def build(env):
        raise RuntimeError("no kernel today")
    env = StubEnv()
    figs = bench.run_spec(env, _spec(peers=peers, build=build), {})
    assert [f["peer"] for f in figs] == ["cupy.sum", "copy"]
    assert all(f["error"].startswith("RuntimeError: no kernel today (at test_bench.py:")
               for f in figs)
    assert env.timed == [] and env.freed == 1


def test_run_spec_lets_unavailable_through():
    def build(env):
        raise Unavailable("cugrad.graph is absent")
    env = StubEnv()
    with pytest.raises(Unavailable):
        bench.run_spec(env, _spec(build=build), {})
    assert env.freed == 1


# ------------------------------------------------------------- the timer, stand-in CuPy

class _Clock:
    now = 0.0


class _Event:
    def record(self, stream=None):
        self.t = _Clock.now


def _timer_env(settings):
    """A bench.Env whose CuPy is a stand-in: events read a fake clock that the timed
    callables advance; the spin kernel is recorded."""
    env = bench.Env.__new__(bench.Env)
    env.settings = settings
    env.spins = []
    env.device = types.SimpleNamespace(synchronize=lambda: None)
    env.cp = types.SimpleNamespace(cuda=types.SimpleNamespace(
        Event=_Event, get_current_stream=lambda: None,
        get_elapsed_time=lambda a, b: (b.t - a.t) * 1e3))
    env._spin = lambda grid, block, args: env.spins.append(int(args[0]))
    return env


def test_time_interleaved_rotates_sets_and_gives_a_head_start():
    env = _timer_env(QUICK)
    seen = {"ours": [], "peer": []}

    def make(label, seconds):
        def fn(i):
            seen[label].append(i)
            _Clock.now += seconds
        return fn
    stats = env.time_interleaved({"ours": make("ours", 2e-3), "peer": make("peer", 1e-3)}, 3)
    assert stats["ours"]["median"] == pytest.approx(2.0)
    assert stats["peer"]["median"] == pytest.approx(1.0)
    for label in ("ours", "peer"):
        assert seen[label][:7] == [0, 1, 2, 0, 1, 2, 0]       # warm-up, then timed calls
        assert stats[label]["n"] >= QUICK.min_reps
        assert stats[label]["head_start_us"] >= 20.0
    timed_calls = stats["ours"]["n"] + stats["peer"]["n"]
    assert len(env.spins) == timed_calls and all(ns >= 20_000 for ns in env.spins)


def test_time_interleaved_host_clock_batches_steps_without_spin():
    env = _timer_env(QUICK)
    env._warm_up = lambda fn, next_set: (1e-5, 1e-3)      # 1 ms a step, warm-up done
    calls = []
    stats = env.time_interleaved({"ours": lambda i: calls.append(i)}, 16, host_clock=True)
    assert env.spins == [] and stats["ours"]["head_start_us"] == 0.0
    reps = plan_reps(1e-3 * bench.STEPS_PER_SAMPLE, QUICK)
    rounds = min(QUICK.rounds, reps)
    samples = math.ceil(reps / rounds) * rounds
    assert stats["ours"]["n"] == samples
    assert calls == [i % 16 for i in range(samples * bench.STEPS_PER_SAMPLE)]


# ------------------------------------------------------------------------- command line

def _run(*args, **env):
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "CUGRAD_FORCE_CPU": "1", **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=120)


def test_import_needs_neither_cupy_nor_torch():
    code = ("import sys; sys.modules['cupy'] = None; sys.modules['torch'] = None\n"
            "import cugrad.bench as b; assert len(b.specs()) > 30\n"
            "assert b.main(['--list']) == 0\n"
            "assert 'cupy' not in [m.split('.')[0] for m in sys.modules if sys.modules[m]]\n")
    proc = _run("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert "gemm_nn" in proc.stdout and "report only" in proc.stdout


def test_command_without_a_device_exits_nonzero_with_a_message(tmp_path):
    out = tmp_path / "r.json"
    for args in (["-m", "cugrad", "bench", "--quick", "--out", str(out)],
                 ["profiling/bench.py", "--out", str(out)]):
        proc = _run(*args)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "cugrad bench: needs a working CUDA device" in proc.stderr
        assert "CUGRAD_FORCE_CPU" in proc.stderr
    assert not out.exists()


def test_list_and_only_from_both_entry_points():
    a = _run("-m", "cugrad", "bench", "--list", "--only", "bias_grad")
    b = _run("profiling/bench.py", "--list", "--only", "bias_grad")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and len(a.stdout.splitlines()) == 4
    none = _run("-m", "cugrad", "bench", "--only", "no such figure")
    assert none.returncode == 2 and "no figure matches" in none.stderr
    usage = _run("-m", "cugrad", "--help")
    assert "bench" in usage.stdout


# ------------------------------------------- the whole suite, smoke-sized, on the stand-in

# Figures the stand-in may skip, and why: CuPy's ElementwiseKernel (the peer's sigmoid) is
# not imitated, nor DLPack export (PyTorch peers, where a CUDA PyTorch is installed). Any
# other stand-in skip is a new gap in the smoke run's coverage.
STAND_IN_SKIPS = {"linear_bias_sigmoid": "ElementwiseKernel", "PyTorch": "DLPack"}


def test_smoke_run_on_the_cupy_stand_in(tmp_path):
    """`python -m cugrad bench --smoke` end to end on the CPU stand-in for CuPy: every
    figure is either checked and timed or skipped with its reason; the JSON says it is a
    smoke run. Seconds with the harness's build cache warm, about 20 s cold (2 cores)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import cuda_harness as ch
    finally:
        sys.path.remove(str(ROOT / "tests"))
    if ch.compiler() is None:
        pytest.skip("no host C++ compiler (g++): the CPU kernel harness behind the CuPy "
                    "stand-in (tests/cuda_harness) cannot build")
    out = tmp_path / "x.json"
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUGRAD_FORCE_CPU", "CUGRAD_FAKE_CUPY", "CUGRAD_POISON_OUTPUTS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "fake_cupy"), str(ROOT)])
    proc = subprocess.run([sys.executable, "-m", "cugrad", "bench", "--smoke", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["smoke"] is True and data["cupy_stand_in"] is True
    assert "mean nothing" in data["smoke_note"]
    assert out.with_suffix(".md").read_text().count("SMOKE RUN, NOT A MEASUREMENT") == 1
    assert "copy" in data["ceilings"] and "gbps" in data["ceilings"]["copy"], data["ceilings"]
    assert "tflops" in data["ceilings"]["sgemm"], data["ceilings"]

    expected = [(s.name, s.shape, p.name) for s in bench.specs(bench.SMOKE_SHAPES)
                for p in s.peers]
    figures = data["figures"]
    assert [(f["name"], f["shape"], f["peer"]) for f in figures] == expected
    timed = 0
    for f in figures:
        where = f"{f['name']} {f['shape']} vs {f['peer']}"
        if f.get("skipped"):
            reason = f["error"]
            assert reason, where
            if reason.startswith("PyTorch unavailable"):
                assert f["peer"] == "PyTorch", (where, reason)
                assert "ours ran once" in reason, (where, reason)   # our side still ran
            else:
                gap = STAND_IN_SKIPS.get(f["peer"] if f["peer"] == "PyTorch" else f["name"])
                assert gap and gap in reason, (where, reason)
                assert "CPU stand-in for CuPy cannot run this figure" in reason, (where, reason)
            continue
        assert f.get("error") is None, (where, f.get("error"))
        assert f["ours_ms"] > 0 and f["peer_ms"] > 0 and f["speedup"] > 0, where
        assert f["check_rel_err"] <= f["check_tol"], where
        assert f["reps"]["ours"] == f["reps"]["peer"] == 2, where
        assert 1 <= f["input_sets"] <= 2, where
        timed += 1
    # every figure without a PyTorch peer or an imitation gap was timed
    assert timed == sum(1 for f in figures if f["peer"] != "PyTorch"
                        and f["name"] != "linear_bias_sigmoid") > 20


@pytest.mark.parametrize("option, value, says", [
    ("--out", "table.md", "expected a file name ending in .json, got 'table.md'"),
    ("--out", "", "expected a file name ending in .json, got ''"),
    ("--out", "no/such/folder/r.json", "the folder 'no/such/folder' does not exist"),
    ("--max-seconds", "-5", "expected a finite number of seconds > 0, got -5"),
    ("--max-seconds", "nan", "expected a finite number of seconds > 0, got nan"),
])
def test_bad_options_are_usage_errors(capsys, option, value, says):
    """--out X.md had the table written over the JSON; a negative or NaN budget skipped every
    figure or none, silently."""
    from cugrad.bench import main
    with pytest.raises(SystemExit) as info:
        main([option, value])
    assert info.value.code == 2
    assert f"argument {option}: {says}" in capsys.readouterr().err
