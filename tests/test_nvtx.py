"""NVTX ranges, observed through the real ``nvtx`` package and NVTX's tool injection.

A small NVTX tool (tests/nvtx_inject/nvtx_record.c, compiled here with gcc against the
CUDA toolkit's nvtx3 headers) is loaded by the NVTX code inside the ``nvtx`` package
when a process names it in ``NVTX_INJECTION64_PATH``; it writes every push and pop it
receives (entry point, domain, message, per-thread depth) to a file. The injection is
read at the first NVTX call of a process, so each scenario runs in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
INJECT_SRC = Path(__file__).with_name("nvtx_inject") / "nvtx_record.c"


def _cuda_include_dirs() -> list[Path]:
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    return [Path(r) / "include" for r in roots if r]


@pytest.fixture(scope="session")
def injection_lib(tmp_path_factory) -> Path:
    pytest.importorskip("nvtx", reason="the nvtx package is not installed "
                        "(pip install -e .[test])")
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler (gcc/cc) to build the NVTX injection library")
    include = next((d for d in _cuda_include_dirs()
                    if (d / "nvtx3" / "nvToolsExt.h").is_file()), None)
    if include is None:
        pytest.skip("the nvtx3 headers are not found (looked in $CUDA_HOME/include, "
                    "$CUDA_PATH/include, /usr/local/cuda/include)")
    out = tmp_path_factory.mktemp("nvtx_inject") / "libnvtx_record.so"
    cmd = [gcc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", f"-I{include}",
           str(INJECT_SRC), "-o", str(out), "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the injection library failed:\n{proc.stderr}"
    return out


@dataclass
class Range:
    name: str
    domain: str
    depth: int
    entry: str          # the NVTX C entry point that pushed it
    message_type: str   # "registered" or "ascii"
    thread: int
    parent: "Range | None" = None
    children: list = field(default_factory=list)
    closed: bool = False

    def path(self) -> list[str]:
        node, out = self, []
        while node is not None:
            out.append(node.name)
            node = node.parent
        return out[::-1]


@dataclass
class Recording:
    lines: list[list[str]]
    ranges: list[Range]          # every pushed range, in push order
    errors: list[str]
    open_at_exit: list[Range]
    stdout: str

    def named(self, name: str) -> list[Range]:
        return [r for r in self.ranges if r.name == name]

    def names(self) -> list[str]:
        return [r.name for r in self.ranges]

    def entry_points(self) -> set[str]:
        return {ln[3] for ln in self.lines if ln[0] in ("push", "pop")}


def _parse(text: str, stdout: str) -> Recording:
    lines = [ln.split("\t") for ln in text.splitlines() if ln]
    ranges, errors, stacks = [], [], {}
    for ln in lines:
        kind, tid = ln[0], int(ln[1]) if len(ln) > 1 and ln[1].isdigit() else 0
        stack = stacks.setdefault(tid, [])
        if kind == "push":
            _, _, depth, entry, mtype, domain, name = ln
            node = Range(name, domain, int(depth), entry, mtype, tid,
                         parent=stack[-1] if stack else None)
            if node.parent is not None:
                node.parent.children.append(node)
            stack.append(node)
            ranges.append(node)
        elif kind == "pop":
            _, _, depth, entry, domain = ln
            assert stack, f"pop with nothing open: {ln}"
            top = stack.pop()
            assert (top.domain, top.depth) == (domain, int(depth)), (top, ln)
            top.closed = True
        elif kind == "error":
            errors.append("\t".join(ln[2:]))
    open_at_exit = [r for s in stacks.values() for r in s]
    return Recording(lines, ranges, errors, open_at_exit, stdout)


def record(lib: Path, tmp_path: Path, code: str, **env_extra) -> Recording:
    """Run ``code`` in a fresh interpreter with the recording NVTX tool attached."""
    out = tmp_path / "nvtx_record.tsv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVTX_")}
    env.pop("CUGRAD_NVTX", None)
    env.update(NVTX_INJECTION64_PATH=str(lib), NVTX_RECORD_PATH=str(out),
               CUGRAD_FORCE_CPU="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    env.update(env_extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    text = out.read_text() if out.exists() else ""
    return _parse(text, proc.stdout)


# --------------------------------------------------------------------------- op_range

def test_ranges_reach_the_tool_nested_in_domain_cugrad(injection_lib, tmp_path):
    rec = record(injection_lib, tmp_path, """
        from cugrad._trace import op_range, nvtx_enabled, nvtx_disabled_reason
        assert nvtx_enabled(), nvtx_disabled_reason()
        with op_range("Linear.forward", "cpu"):
            with op_range("linear.forward", "cpu"):
                with op_range("matmul", None):
                    pass
            with op_range("relu", "cpu"):
                pass
        with op_range("sgd.step", "cpu"):
            pass
    """)
    assert rec.lines[0][0] == "init"
    assert rec.names() == ["Linear.forward", "linear.forward", "matmul", "relu", "sgd.step"]
    assert {r.domain for r in rec.ranges} == {"cugrad"}
    assert [r.path() for r in rec.ranges] == [
        ["Linear.forward"], ["Linear.forward", "linear.forward"],
        ["Linear.forward", "linear.forward", "matmul"], ["Linear.forward", "relu"],
        ["sgd.step"]]
    assert [r.depth for r in rec.ranges] == [1, 2, 3, 2, 1]
    assert all(r.closed for r in rec.ranges) and not rec.open_at_exit and not rec.errors
    # What the nvtx package really calls: domain push/pop with registered-string messages.
    assert rec.entry_points() == {"nvtxDomainRangePushEx", "nvtxDomainRangePop"}
    assert {r.message_type for r in rec.ranges} == {"registered"}


@pytest.mark.parametrize("profiled", [False, True], ids=["plain", "while-profiling"])
def test_an_exception_closes_its_range(injection_lib, tmp_path, profiled):
    """A raising op closes its range and the ranges around it; inside cugrad.profile() too,
    where the timed range pops its NVTX range whatever the body raised and the failed call
    is still counted."""
    rec = record(injection_lib, tmp_path, f"""
        import contextlib
        import numpy as np
        import cugrad.functional as F
        from cugrad._trace import op_range
        from cugrad.profiler import profile
        a = np.ones((4, 5), np.float32)
        b = np.ones((6, 3), np.float32)          # inner dimensions 5 != 6
        prof = profile() if {profiled} else contextlib.nullcontext()
        with prof:
            try:
                with op_range("outer", "cpu"):
                    F.matmul(a, b)
            except ValueError as exc:
                print("raised", type(exc).__name__)
            with op_range("after", "cpu"):
                pass
        if {profiled}:
            print(prof["outer"].calls, prof["matmul"].calls)
    """)
    assert rec.stdout.split() == ["raised", "ValueError"] + (["1", "1"] if profiled else [])
    assert rec.names() == ["outer", "matmul", "after"]
    assert rec.named("matmul")[0].parent is rec.named("outer")[0]
    assert all(r.closed for r in rec.ranges) and not rec.open_at_exit and not rec.errors
    assert rec.named("after")[0].depth == 1       # the stack was left balanced


def test_ranges_are_per_thread_and_balanced(injection_lib, tmp_path):
    rec = record(injection_lib, tmp_path, """
        import threading
        from cugrad._trace import op_range
        barrier = threading.Barrier(4)
        def work(i):
            barrier.wait()
            for _ in range(50):
                with op_range(f"outer{i}", "cpu"):
                    with op_range("inner", "cpu"):
                        pass
        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
    """)
    assert len(rec.ranges) == 4 * 50 * 2
    assert all(r.closed for r in rec.ranges) and not rec.open_at_exit and not rec.errors
    for r in rec.named("inner"):
        assert r.depth == 2 and r.parent.name.startswith("outer")
        assert r.parent.thread == r.thread
    assert len({r.thread for r in rec.ranges}) == 4


def test_ranges_also_run_while_profiling(injection_lib, tmp_path):
    rec = record(injection_lib, tmp_path, """
        from cugrad._trace import op_range
        from cugrad.profiler import profile
        with profile() as prof:
            with op_range("Linear.forward", "cpu"):
                with op_range("linear.forward", "cpu"):
                    pass
        print(prof["linear.forward"].calls)
    """)
    assert rec.stdout.split() == ["1"]
    assert [r.path() for r in rec.ranges] == [["Linear.forward"],
                                              ["Linear.forward", "linear.forward"]]
    assert all(r.closed for r in rec.ranges)


def test_env_var_turns_ranges_off(injection_lib, tmp_path):
    rec = record(injection_lib, tmp_path, """
        from cugrad._trace import op_range, nvtx_enabled, nvtx_disabled_reason
        with op_range("linear.forward", "cpu"):
            pass
        print(nvtx_enabled(), nvtx_disabled_reason())
    """, CUGRAD_NVTX="0")
    assert rec.stdout.strip() == "False CUGRAD_NVTX=0"
    assert rec.ranges == []


def test_without_a_tool_op_range_is_a_shared_no_op():
    """In this process no NVTX tool is attached (unless pytest itself runs under Nsight)."""
    if os.environ.get("NVTX_INJECTION64_PATH"):
        pytest.skip("an NVTX tool is attached to the test process")
    from cugrad import _trace
    if _trace._profilers:
        pytest.skip("a cugrad.profile() is active in this process")
    first = _trace.op_range("matmul", "cpu")
    assert not _trace.nvtx_enabled()
    assert _trace.nvtx_disabled_reason()
    assert _trace.op_range("matmul", "cpu") is _trace.op_range("relu", None) is _trace._NO_RANGE
    assert first is _trace._NO_RANGE
    with _trace.op_range("x", "cpu") as value:
        assert value is None


# --------------------------------------------------------------------------- layers

TRAIN_STEP = """
    import numpy as np
    import cugrad.functional as F
    from cugrad.nn import CrossEntropyLoss, Linear, ReLU, Sequential
    from cugrad.optim import SGD
    from cugrad._trace import op_range

    model = Sequential(Linear(5, 7, rng=0), ReLU(), Linear(7, 3, rng=1))
    loss_fn = CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=0.1)
    x = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32)
    y = np.array([0, 2, 1, 2], dtype=np.int64)

    with op_range("step", None):
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward())
        opt.step()
    try:
        F.matmul(x, x)                  # (4, 5) @ (4, 5): shape mismatch
    except ValueError:
        print("raised")
"""


@pytest.fixture(scope="module")
def train_step_recording(injection_lib, tmp_path_factory):
    pytest.importorskip("cugrad.nn")
    pytest.importorskip("cugrad.optim")
    return record(injection_lib, tmp_path_factory.mktemp("train"), TRAIN_STEP)


def _only(rec: Recording, name: str) -> Range:
    found = rec.named(name)
    assert len(found) == 1, f"{name}: {len(found)} ranges; all ranges: {rec.names()}"
    return found[0]


def test_train_step_ranges_are_balanced_in_domain_cugrad(train_step_recording):
    rec = train_step_recording
    assert "raised" in rec.stdout
    assert rec.ranges and {r.domain for r in rec.ranges} == {"cugrad"}
    assert all(r.closed for r in rec.ranges) and not rec.open_at_exit and not rec.errors
    # Everything of the step nests in "step"; the failed matmul is a closed top-level range.
    top = [r for r in rec.ranges if r.parent is None]
    assert [r.name for r in top] == ["step", "matmul"]


def test_layer_ranges_hold_their_ops(train_step_recording):
    rec = train_step_recording
    seq_fwd = _only(rec, "Sequential.forward")
    assert seq_fwd.path() == ["step", "Sequential.forward"]
    assert [c.name for c in seq_fwd.children] == [
        "0:Linear.forward", "1:ReLU.forward", "2:Linear.forward"]
    for layer in ("0:Linear.forward", "2:Linear.forward"):
        ops = [c.name for c in _only(rec, layer).children]
        assert "linear.forward" in ops, (layer, ops)
    assert "relu" in [c.name for c in _only(rec, "1:ReLU.forward").children]

    seq_bwd = _only(rec, "Sequential.backward")
    assert [c.name for c in seq_bwd.children] == [
        "2:Linear.backward", "1:ReLU.backward", "0:Linear.backward"]
    lin_bwd = [c.name for c in _only(rec, "2:Linear.backward").children]
    assert "linear.backward" in lin_bwd, lin_bwd
    lin_parts = {c.name for c in rec.named("linear.backward")[0].children}
    assert {"linear.backward.dW", "linear.backward.db"} <= lin_parts, lin_parts
    assert "relu.backward" in [c.name for c in _only(rec, "1:ReLU.backward").children]

    ce = _only(rec, "CrossEntropyLoss.forward")
    assert ce.path() == ["step", "CrossEntropyLoss.forward"]
    assert any(c.name.startswith("cross_entropy") for c in ce.children)
    assert _only(rec, "CrossEntropyLoss.backward").parent.name == "step"

    sgd = _only(rec, "sgd.step")
    assert sgd.path() == ["step", "sgd.step"]
    assert [c.name for c in sgd.children] == ["sgd_step"] * 4     # 2 weights + 2 biases


def test_every_range_name_is_a_known_op_or_layer(train_step_recording):
    import re
    ops = {"matmul", "matmul.backward", "linear.forward", "linear.backward",
           "linear.backward.act", "linear.backward.act_db", "linear.backward.dX",
           "linear.backward.dW",
           "linear.backward.db", "bias_grad", "relu", "relu.backward", "cross_entropy",
           "cross_entropy.backward", "sgd_step", "sgd.step", "step"}
    layer = re.compile(r"^(\d+:)?(Sequential|Linear|ReLU|CrossEntropyLoss)\.(forward|backward)$")
    unknown = {n for n in train_step_recording.names() if n not in ops and not layer.match(n)}
    assert not unknown, unknown


# ---------------------------- from a mutation probe of _trace.py (session 13)
# Each test below fails on a mutant that every other test let live.


@pytest.mark.parametrize("name, colour", [
    ("linear.backward", "_COLOR_BACKWARD"),
    ("linear.backward.dW", "_COLOR_BACKWARD"),      # a sub-range of a backward
    ("Sequential.backward", "_COLOR_BACKWARD"),
    ("sgd.step", "_COLOR_STEP"),
    ("adam_step", "_COLOR_STEP"),
    ("stepwise.forward", "_COLOR_FORWARD"),         # "step" inside a name: not a step
    ("relu", "_COLOR_FORWARD"),
])
def test_nvtx_colour_by_kind_of_range(name, colour):
    from cugrad import _trace
    assert _trace._color_for(name) == getattr(_trace, colour)


def test_one_nvtx_range_object_serves_every_call_of_a_name(injection_lib, tmp_path):
    """With a tool attached, op_range hands back one stateless range per name (the attributes,
    registered string included, are made once), not a new one per call."""
    rec = record(injection_lib, tmp_path, """
        from cugrad._trace import op_range, nvtx_enabled
        assert nvtx_enabled()
        print(op_range("a", "cpu") is op_range("a", "cpu"), op_range("a") is op_range("b"))
    """)
    assert rec.stdout.split() == ["True", "False"]
