"""The command line's error paths, CUGRAD_FORCE_CPU's reading of its value, profiling
scripts run from a checkout (and gpu_suite.sh's exit status), and MATH.md's section numbers
as the sources cite them."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cugrad import _backend

ROOT = Path(__file__).resolve().parents[1]


def run(args, env=None, cwd=ROOT, timeout=120):
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------ command line

def test_demo_device_cuda_without_a_gpu_is_a_clean_error():
    """--device cuda where the CUDA backend cannot run: a message and exit status 1, as
    --graph gives, not a BackendUnavailableError traceback. CUGRAD_FORCE_CPU=1 makes the
    backend unavailable on any machine, so this runs the same with or without a GPU."""
    proc = run(["-m", "cugrad", "demo", "--device", "cuda", "--epochs", "1", "--no-progress"],
               env={"CUGRAD_FORCE_CPU": "1"})
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "--device cuda needs the CUDA backend" in proc.stderr
    assert "CUGRAD_FORCE_CPU=1 forces the CPU backend" in proc.stderr   # the reason
    assert "--device cpu" in proc.stderr                                # what to do instead


def test_demo_train_device_cuda_raises_system_exit(monkeypatch):
    from cugrad import demo
    monkeypatch.setattr(_backend, "cuda_available", lambda: False)
    monkeypatch.setattr(_backend, "cuda_unavailable_reason", lambda: "no GPU in this test")
    with pytest.raises(SystemExit, match="--device cuda needs the CUDA backend.*no GPU in this test"):
        demo.train(epochs=1, progress=False, device="cuda")


def test_unknown_command_says_so(capsys):
    from cugrad.__main__ import main
    assert main(["trian"]) == 2
    out, err = capsys.readouterr()
    assert "unknown command 'trian'" in err
    assert "demo, info, bench, compile" in err
    assert "usage: python -m cugrad" in err and out == ""     # the usage goes with the error


def test_version_and_info_help(capsys):
    from cugrad.__main__ import main
    import cugrad
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"cugrad {cugrad.__version__}"
    with pytest.raises(SystemExit) as info:
        main(["info", "--help"])
    assert info.value.code == 0 and "no options" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["info", "--bogus"])
    assert info.value.code == 2


def test_compile_without_the_cuda_backend_is_a_clean_error():
    proc = run(["-m", "cugrad", "compile"], env={"CUGRAD_FORCE_CPU": "1"})
    assert proc.returncode == 1, proc.stderr
    assert "python -m cugrad compile: the CUDA backend does not work here" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compile_lists_every_module_on_the_stand_in(tmp_path):
    """`python -m cugrad compile --jobs 2` on the CPU stand-in for CuPy (tests/fake_cupy):
    two spawned processes compile, then the command loads every module of
    config.instantiations() itself and lists it."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import cuda_harness as ch
    finally:
        sys.path.remove(str(ROOT / "tests"))
    if ch.compiler() is None:
        pytest.skip("no host C++ compiler (g++): the CuPy stand-in's kernel harness cannot build")
    from cugrad.backends.cuda import config
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests" / "fake_cupy"), str(ROOT)]),
           "CUGRAD_FORCE_CPU": "", "CUGRAD_FAKE_CUPY": ""}
    proc = run(["-m", "cugrad", "compile", "--jobs", "2"], env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    modules = config.instantiations()
    listed = [line for line in proc.stdout.splitlines() if " kernels (" in line]
    assert len(listed) == len(modules), proc.stdout
    for line, (file, _, names) in zip(listed, modules):
        assert f"{file}" in line and f"{len(names)} kernels ({names[0]}, ...)" in line, line
    assert f"compiling {len(modules)} kernel modules" in proc.stdout
    assert "2 processes" in proc.stdout and "done in" in proc.stdout


def test_compile_failure_shows_the_compiler_log(monkeypatch, capsys):
    from cugrad.backends.cuda import precompile
    from cugrad.backends.cuda.context import KernelCompileError

    def fail(module):
        raise KernelCompileError("gemm.cu", ["-DGEMM_X=1"], "error: the planted failure")
    monkeypatch.setattr(_backend, "cuda_available", lambda: True)
    monkeypatch.setattr(precompile, "compile_module", fail)
    assert precompile.main([]) == 1
    err = capsys.readouterr().err
    assert "failed to compile kernels/gemm.cu with options -DGEMM_X=1" in err
    assert "error: the planted failure" in err
    # in a pool process the error comes back as its message (it does not pickle)
    assert precompile._compile_in_child(("gemm.cu", [], ["k"])) == (0.0, str(KernelCompileError(
        "gemm.cu", ["-DGEMM_X=1"], "error: the planted failure")))
    with pytest.raises(SystemExit):
        precompile.main(["--jobs", "0"])
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["-h"], ["--help"]])
def test_help_is_not_an_error(capsys, argv):
    from cugrad.__main__ import main
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "usage: python -m cugrad" in out and err == ""


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command, says", [
    ("demo", "usage: python -m cugrad demo"), ("info", "usage: python -m cugrad info"),
    ("bench", "usage: python -m cugrad bench"), ("compile", "usage: python -m cugrad compile")])
def test_help_before_a_command_shows_that_commands_help(capsys, flag, command, says):
    """`python -m cugrad --help demo` prints demo's help (its options), exit 0, as
    `demo --help` does. Fails on the old main, which printed the top-level help."""
    from cugrad.__main__ import main
    assert main([flag, command]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(says) and err == "", out + err


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["info", "--help"],
                                  ["bench", "--help"], ["compile", "--help"]])
def test_help_names_no_tracker_issue(capsys, argv):
    """The help a user reads cites no internal issue numbers. Fails on the old bench help,
    "The benchmark suite (issue 8)"."""
    from cugrad.__main__ import main
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    assert out and not re.search(r"\bissues?\b", out, re.I), out


def test_help_before_an_unknown_command_is_a_usage_error(capsys):
    """`--help trian`: exit 2 naming 'trian', the usage on stderr. Fails on the old main,
    which printed the top-level help and exited 0."""
    from cugrad.__main__ import main
    assert main(["--help", "trian"]) == 2
    out, err = capsys.readouterr()
    assert "unknown command 'trian'" in err and "usage: python -m cugrad" in err and out == ""


def test_help_demo_from_the_shell():
    proc = run(["-m", "cugrad", "--help", "demo"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m cugrad demo") and "--epochs" in proc.stdout


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "PYTHONUNBUFFERED"])
@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["--help", "bench"],
                                  ["bench", "--list"], ["info"], ["--version"]])
def test_a_closed_stdout_ends_quietly_with_141(args, buffered):
    """stdout is a pipe whose reader is gone before the first write (`python -m cugrad
    --help | head -1` when head exits first): exit status 141, as a tool killed by SIGPIPE
    reports, and nothing on stderr. Fails on the old main: "Exception ignored ...
    BrokenPipeError" from the interpreter's flush at exit (status 120), or with
    PYTHONUNBUFFERED a BrokenPipeError traceback (status 1). One exception: unbuffered, an
    argparse --help's write fails inside argparse, which ignores write errors and exits 0;
    quiet all the same."""
    if os.name != "posix":
        pytest.skip("needs POSIX pipes")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONUNBUFFERED")}
    env.update(PYTHONPATH=str(ROOT), CUGRAD_FORCE_CPU="1")
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    read_end, write_end = os.pipe()
    os.close(read_end)                       # the reader is gone: every write is EPIPE
    try:
        proc = subprocess.run([sys.executable, "-m", "cugrad", *args], cwd=ROOT, env=env,
                              stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    argparse_help = "--help" in args and len(args) == 2
    assert proc.returncode == (0 if argparse_help and not buffered else 141), proc.stderr
    assert proc.stderr == ""


def test_an_error_is_not_hidden_by_a_closed_stdout():
    """A command that raises while stdout's reader is gone: its traceback and status 1, not
    a quiet 141 (a flush on the way out replaced the error with the broken pipe)."""
    if os.name != "posix":
        pytest.skip("needs POSIX pipes")
    code = ("import sys, cugrad.__main__ as m\n"
            "def info(argv=()):\n"
            "    print('partial output')\n"
            "    raise RuntimeError('the real error')\n"
            "m.info = info\n"
            "sys.exit(m.main(['info']))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONUNBUFFERED")}
    env.update(PYTHONPATH=str(ROOT))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert proc.returncode != 141 and "RuntimeError: the real error" in proc.stderr, proc.stderr


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error():
    """A BrokenPipeError from another pipe (a worker process's) while stdout is open is a
    real failure: the traceback and a non-zero status, not a quiet 141."""
    code = ("import sys, cugrad.__main__ as m\n"
            "def info(argv=()):\n"
            "    raise BrokenPipeError(32, 'a worker pipe broke')\n"
            "m.info = info\n"
            "sys.exit(m.main(['info']))\n")
    proc = run(["-c", code])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "BrokenPipeError: [Errno 32] a worker pipe broke" in proc.stderr


# ----------------------------------------------------------------------- info: NVTX line

def _info_nvtx_line(env=None, block_nvtx=False):
    code = ("import sys\n" + ("sys.modules['nvtx'] = None\n" if block_nvtx else "") +
            "from cugrad.__main__ import main\nsys.exit(main(['info']))\n")
    full = {"CUGRAD_FORCE_CPU": "1", **(env or {})}
    proc = run(["-c", code], env=full)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("NVTX ranges: ")]
    assert len(lines) == 1, proc.stdout
    return lines[0]


def _without_nvtx_env(monkeypatch):
    for name in ("CUGRAD_NVTX", "NVTX_INJECTION64_PATH"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("value", ["0", "off", " No ", "FALSE"])
def test_info_says_nvtx_ranges_are_off_by_cugrad_nvtx(monkeypatch, value):
    """`python -m cugrad info` has an NVTX line: off, naming CUGRAD_NVTX as set, for each of
    the words cugrad._trace reads as off. Fails on the old info, which had no NVTX line."""
    pytest.importorskip("nvtx", reason="the nvtx package is not installed (pip install '.[nvtx]')")
    _without_nvtx_env(monkeypatch)
    from importlib import metadata
    line = _info_nvtx_line({"CUGRAD_NVTX": value})
    assert line == f"NVTX ranges: off, CUGRAD_NVTX={value} (nvtx {metadata.version('nvtx')} importable)"


@pytest.mark.parametrize("value", [None, "", "1", "yes"])
def test_info_says_nvtx_ranges_are_on_without_a_tool_attached(monkeypatch, value):
    """CUGRAD_NVTX unset, empty or on, nvtx importable, no NVTX tool in this process: ranges
    are on, emitted once a tool (Nsight) attaches; the line says none is attached now."""
    pytest.importorskip("nvtx", reason="the nvtx package is not installed (pip install '.[nvtx]')")
    _without_nvtx_env(monkeypatch)
    from importlib import metadata
    env = {} if value is None else {"CUGRAD_NVTX": value}
    switch = "CUGRAD_NVTX unset" if value is None else f"CUGRAD_NVTX={value}"
    line = _info_nvtx_line(env)
    assert line == ("NVTX ranges: on, emitted while an NVTX tool (Nsight Systems, Nsight "
                    f"Compute) is attached; none is now (nvtx {metadata.version('nvtx')} "
                    f"importable, {switch})")


def test_info_says_when_nvtx_is_not_importable(monkeypatch):
    _without_nvtx_env(monkeypatch)
    line = _info_nvtx_line(block_nvtx=True)
    assert line.startswith("NVTX ranges: off, the nvtx package is not importable "
                           "(ModuleNotFoundError: "), line
    assert line.endswith("install it with the nvtx extra) (CUGRAD_NVTX unset)"), line


def test_info_says_nvtx_ranges_are_on_with_a_tool_attached(monkeypatch, capsys):
    """With a domain resolved (as _trace has one when a tool is attached), the line says on."""
    pytest.importorskip("nvtx", reason="the nvtx package is not installed (pip install '.[nvtx]')")
    from cugrad import _trace
    from cugrad.__main__ import main
    _without_nvtx_env(monkeypatch)
    monkeypatch.setattr(_trace, "_domain", object())
    monkeypatch.setattr(_trace, "_nvtx_off_reason", "")
    assert main(["info"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("NVTX ranges: on, an NVTX tool is attached (nvtx "), line
    assert line.endswith(" importable, CUGRAD_NVTX unset)"), line


# -------------------------------------------------------------------- CUGRAD_FORCE_CPU

@pytest.mark.parametrize("value", ["", "0", "false", "False", "OFF", "no", " No ", "  "])
def test_force_cpu_off_values(monkeypatch, value):
    """The values CUGRAD_NVTX reads as off (and empty) do not force the CPU."""
    monkeypatch.setenv("CUGRAD_FORCE_CPU", value)
    assert not _backend.env_flag("CUGRAD_FORCE_CPU")
    ok, reason = _backend._probe_cuda()
    assert "forces the CPU" not in reason


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "ON", "2"])
def test_force_cpu_on_values(monkeypatch, value):
    monkeypatch.setenv("CUGRAD_FORCE_CPU", value)
    assert _backend.env_flag("CUGRAD_FORCE_CPU")
    assert _backend._probe_cuda() == (False, f"CUGRAD_FORCE_CPU={value} forces the CPU backend")


def test_force_cpu_unset(monkeypatch):
    monkeypatch.delenv("CUGRAD_FORCE_CPU", raising=False)
    assert not _backend.env_flag("CUGRAD_FORCE_CPU")


@pytest.mark.parametrize("value", ["0", "false", "OFF", " No "])
def test_force_cpu_reads_the_words_nvtx_reads_as_off(monkeypatch, value):
    """The off words of CUGRAD_FORCE_CPU are CUGRAD_NVTX's: both switches read env_flag, and
    an unset CUGRAD_NVTX keeps ranges on (its default) while an unset CUGRAD_FORCE_CPU is off."""
    from cugrad import _trace
    monkeypatch.setattr(_trace, "_domain", _trace._UNRESOLVED)
    monkeypatch.setattr(_trace, "_nvtx_off_reason", "")
    monkeypatch.setenv("CUGRAD_FORCE_CPU", value)
    monkeypatch.setenv("CUGRAD_NVTX", value)
    _trace._resolve_nvtx()
    assert not _backend.env_flag("CUGRAD_FORCE_CPU")
    assert not _trace.nvtx_enabled() and _trace.nvtx_disabled_reason() == f"CUGRAD_NVTX={value}"
    monkeypatch.setattr(_trace, "_domain", _trace._UNRESOLVED)
    monkeypatch.delenv("CUGRAD_NVTX")
    _trace._resolve_nvtx()
    assert not _trace.nvtx_disabled_reason().startswith("CUGRAD_NVTX")


# ---------------------------------------------------------------------- profiling scripts

def test_bench_numpy_step_runs_from_a_checkout(tmp_path):
    """`python profiling/bench_numpy_step.py` from anywhere, cugrad not installed: the script
    puts the checkout on sys.path itself (as train_mlp.py does)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(ROOT / "profiling" / "bench_numpy_step.py"),
                           "--batch", "4", "--sizes", "8,5,3", "--repeats", "5",
                           "--json", "r.json"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "batch 4, MLP 8-5-3: cugrad" in proc.stdout and "ratio" in proc.stdout
    assert json.loads((tmp_path / "r.json").read_text())["shape"] == "batch 4, MLP 8-5-3"


@pytest.mark.parametrize("script, args", [
    ("train_mlp.py", ["--steps", "0"]), ("bench_numpy_step.py", ["--repeats", "4"]),
    ("bench_nvtx_overhead.py", ["--rounds", "0"])])
def test_profiling_scripts_refuse_bad_counts_before_any_work(tmp_path, script, args):
    """A usage error naming the option (bench_nvtx_overhead's --rounds 0 printed its header,
    then failed with a TypeError)."""
    proc = subprocess.run([sys.executable, str(ROOT / "profiling" / script), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert args[0] in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


def _load_script(name):
    """A profiling script imported as a module (they are scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"),
                                                  ROOT / "profiling" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args", [["--config", "small"], ["--config", "small", "--fused"],
                                  ["--widths", "7,5,4,3", "--batch", "6"],
                                  ["--widths", "9,4", "--batch", "3"]])
def test_train_mlp_tflops_count_the_products_that_ran(monkeypatch, capsys, args):
    """train_mlp.py's TFLOP/s counts the GEMMs its step computes: the sum of 2·M·N·K over
    every product the step hands the backend (cugrad.functional._gemm, counted here), and
    step_flops() equals it. Fails on the old 6·batch·Σ in·out, which counted the first
    layer's dX that backward(..., input_grad=False) never computes (+11.8 % for --config
    small). The clock is faked so that the printed figure reads 1000.00 TFLOP/s exactly
    when the script's count equals the counted one."""
    from cugrad import functional
    mlp = _load_script("train_mlp.py")
    counted = [0]
    real_gemm = functional._gemm

    def counting_gemm(backend, a, b, trans_a, trans_b, *rest, **kw):
        m, k = a.shape[::-1] if trans_a else a.shape
        n = b.shape[0] if trans_b else b.shape[1]
        counted[0] += 2 * m * n * k
        return real_gemm(backend, a, b, trans_a, trans_b, *rest, **kw)

    clock = iter([0.0, None])

    def perf_counter():          # t0, then "elapsed" = counted / 1e15 s for the 1 step
        value = next(clock)
        return counted[0] / 1e15 if value is None else value

    monkeypatch.setattr(functional, "_gemm", counting_gemm)
    monkeypatch.setattr(mlp, "time", types.SimpleNamespace(perf_counter=perf_counter))
    assert mlp.main(["--device", "cpu", "--steps", "1", "--warmup", "0", *args]) == 0
    out = capsys.readouterr().out
    batch, widths = mlp.CONFIGS["small"] if "--config" in args else (
        int(args[3]), [int(w) for w in args[1].split(",")])
    assert counted[0] > 0
    assert "1000.00 TFLOP/s (GEMMs)" in out, out
    assert mlp.step_flops(batch, widths) == counted[0]
    # the label is the configuration's, or "custom" where --widths replaced its widths
    assert out.startswith(f"small MLP {widths}" if "--config" in args else f"custom MLP {widths}"), out


BENCH_QUICK = {"bench_numpy_step.py": ["--batch", "4", "--sizes", "8,5,3", "--repeats", "5"],
               "bench_nvtx_overhead.py": ["--quick", "--rounds", "1"]}


@pytest.mark.parametrize("script", sorted(BENCH_QUICK))
@pytest.mark.parametrize("where, says", [
    ("/nonexistent/x.json", "the folder '/nonexistent' does not exist"),
    ("{tmp}", "expected a file name ending in .json, got '{tmp}'"),
    ("{tmp}/folder.json", "'{tmp}/folder.json' is a folder"),
    ("/proc/cugrad-x.json", "cannot write '/proc/cugrad-x.json': ")])
def test_bench_scripts_refuse_an_unwritable_json_before_any_work(tmp_path, script, where, says):
    """--json where no file can be written: a usage error naming --json (exit 2, nothing on
    stdout), before any round. Fails on the old scripts, which ran every round, printed the
    results, then failed with a FileNotFoundError / IsADirectoryError traceback."""
    if where.startswith("/proc") and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    (tmp_path / "folder.json").mkdir()
    where, says = where.format(tmp=tmp_path), says.format(tmp=tmp_path)
    proc = subprocess.run([sys.executable, str(ROOT / "profiling" / script),
                           *BENCH_QUICK[script], "--json", where],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"argument --json: {says}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def _planted_cuda_root(tmp_path):
    """A CUDA root whose nvtx3/nvToolsExt.h stops any build with an #error."""
    header = tmp_path / "cuda" / "include" / "nvtx3" / "nvToolsExt.h"
    header.parent.mkdir(parents=True)
    header.write_text("#error planted by the test: this build must fail\n")
    return tmp_path / "cuda"


@pytest.mark.parametrize("variable", ["CUDA_HOME", "CUDA_PATH"])
def test_bench_nvtx_overhead_reports_a_failed_build_as_skipped(tmp_path, variable):
    """The NVTX injection library's build fails (a planted header whose #error the compiler
    prints): the tool row says "skipped: ..." with the compiler's stderr, the other modes
    run, exit 0. The headers are looked for under $CUDA_HOME, then $CUDA_PATH (as
    tests/test_nvtx.py looks), then /usr/local/cuda. Fails on the old script: with CUDA_HOME
    a CalledProcessError traceback (check=True); with CUDA_PATH it never looked there."""
    import shutil
    if not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler (gcc/cc): the build is never tried")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env[variable] = str(_planted_cuda_root(tmp_path))
    proc = subprocess.run([sys.executable, str(ROOT / "profiling" / "bench_nvtx_overhead.py"),
                           *BENCH_QUICK["bench_nvtx_overhead.py"]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    tool = proc.stdout.split("\ntool ", 1)[1]
    assert tool.lstrip().startswith("(skipped: building the NVTX injection library"), proc.stdout
    assert f"-I{tmp_path / 'cuda' / 'include'} failed" in tool
    assert "planted by the test" in tool                     # the compiler's stderr tail
    assert "\noff " in proc.stdout and "\nprofile " in proc.stdout


def test_bench_nvtx_overhead_skip_reasons(tmp_path, monkeypatch):
    """No compiler, or no headers in any of the three places: the reason names what is
    missing (and where the headers were looked for)."""
    bench = _load_script("bench_nvtx_overhead.py")
    monkeypatch.setattr(bench.shutil, "which", lambda name: None)
    assert bench.build_injection(tmp_path) == (
        None, "no C compiler (gcc/cc) to build the NVTX injection library")
    monkeypatch.setattr(bench.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "a"))
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "b"))
    monkeypatch.setattr(bench, "cuda_include_dirs", lambda real=bench.cuda_include_dirs:
                        real()[:2])                # leave out this machine's /usr/local/cuda
    a, b = tmp_path / "a" / "include", tmp_path / "b" / "include"
    assert bench.build_injection(tmp_path) == (
        None, f"the nvtx3 headers are not found (looked in {a}, {b})")


GPU_SUITE = ROOT / "profiling" / "gpu_suite.sh"


def _gpu_suite(tmp_path, *steps, python="false"):
    """gpu_suite.sh with an interpreter that fails at once (`false`): the steps' commands run
    and fail without a GPU, CuPy or the time a real step takes."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT=str(tmp_path / "out"), PYTHON=python)
    return subprocess.run(["bash", str(GPU_SUITE), *steps], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_gpu_suite_refuses_an_unknown_step_before_running_any(tmp_path):
    proc = _gpu_suite(tmp_path, "warm", "sanity")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "unknown step sanity" in proc.stderr and "memcheck" in proc.stderr
    assert not (tmp_path / "out" / "warm.log").exists()      # warm, listed first, never ran


def test_gpu_suite_runs_every_step_and_exits_1_naming_the_failed_ones(tmp_path):
    proc = _gpu_suite(tmp_path, "warm", "demo")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = proc.stdout.split("== summary", 1)[1]
    assert "warm: rc=1" in summary and "demo: rc=1" in summary
    assert proc.stdout.rstrip().endswith("== failed: warm demo")


def test_gpu_suite_exits_0_when_every_step_passes(tmp_path):
    proc = _gpu_suite(tmp_path, "warm", python="true")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warm: rc=0" in proc.stdout and "failed" not in proc.stdout


NCU_KERNELS = ROOT / "profiling" / "ncu_kernels.sh"
NSYS_TRAIN = ROOT / "profiling" / "nsys_train.sh"


def _profiling_script(tmp_path, script, *args, python="true", say=None, status=0):
    """ncu_kernels.sh or nsys_train.sh with stand-ins for ncu and nsys (a script that says
    ``say``, by default "No kernels were profiled", and writes no report, as ncu does when
    its NVTX filter matches nothing, then exits ``status``) and an interpreter that does
    nothing (`true`: "import nvtx" succeeds) or fails (`false`)."""
    tools = tmp_path / "bin"
    tools.mkdir(exist_ok=True)
    say = say or "==WARNING== No kernels were profiled."
    for tool in ("ncu", "nsys"):
        (tools / tool).write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'Version 0' && exit 0\n"
                                  f"echo '{say}'\nexit {status}\n")
        (tools / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PATH=f"{tools}{os.pathsep}{env['PATH']}", PYTHON=python,
               OUT_DIR=str(tmp_path / "out"))
    return subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_ncu_kernels_goes_on_past_a_range_without_kernels_and_exits_1(tmp_path):
    """ncu exits 0 and writes no report when its filter matches no kernel: the script's
    --import of the missing report stopped it (set -e) at the first such range, leaving a
    summary of its header only."""
    proc = _profiling_script(tmp_path, NCU_KERNELS, "relu", "linear.forward")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    for r in ("relu", "linear.forward"):
        assert f"## `cugrad@{r}/`: no kernel profiled" in summary, summary
    assert "No kernels were profiled" in summary
    assert "2 range(s) without a report" in proc.stderr


def test_ncu_kernels_notes_a_failed_range_and_ignores_an_earlier_report(tmp_path):
    """A report left by an earlier run was read as this run's when ncu wrote none; a range
    where ncu failed (no access to the counters) had no line in the summary."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ncu_relu.ncu-rep").write_text("an earlier run's report")
    proc = _profiling_script(tmp_path, NCU_KERNELS, "relu", status=1,
                             say="==ERROR== ERR_NVGPUCTRPERM - no permission")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "## `cugrad@relu/`: no kernel profiled (ncu exit 1)" in summary, summary
    assert "ERR_NVGPUCTRPERM" in summary
    assert not (tmp_path / "out" / "ncu_relu.ncu-rep").exists()


@pytest.mark.parametrize("script", [NCU_KERNELS, NSYS_TRAIN], ids=["ncu", "nsys"])
def test_profiling_scripts_refuse_a_python_without_nvtx(tmp_path, script):
    """Without the nvtx package cugrad emits no ranges: ncu would match no kernel and nsys's
    NVTX summaries would be empty, after minutes on a lent GPU."""
    proc = _profiling_script(tmp_path, script, python="false")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the nvtx package is not importable for false" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ----------------------------------------------------------------------------- MATH.md

MATH = ROOT / "MATH.md"


def _sections():
    text = MATH.read_text(encoding="utf-8")
    return {int(n): title for n, title in re.findall(r"^## (\d+)\. (.+)$", text, re.M)}


def test_math_md_has_the_seven_sections():
    if not MATH.is_file():
        pytest.skip(f"MATH.md not found at {MATH} (installed-package test run)")
    assert sorted(_sections()) == [1, 2, 3, 4, 5, 6, 7]


# What each cited section must be about: a word of its title.
SECTION_TOPIC = {1: "product", 2: "linear", 3: "activation", 4: "loss", 5: "backprop",
                 6: "outer product", 7: "tolerance"}


def test_every_math_md_citation_names_an_existing_section():
    """`MATH.md §N` (or §N–M, §N-M) anywhere in the sources, tests and README names one of
    MATH.md's sections; and, while there is no DESIGN.md, no source cites one."""
    if not MATH.is_file():
        pytest.skip(f"MATH.md not found at {MATH} (installed-package test run)")
    sections = _sections()
    for n, word in SECTION_TOPIC.items():
        assert word in sections[n].lower(), f"MATH.md §{n} is {sections[n]!r}"
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for sub in ("cugrad", "kernels", "tests"):
        files += [p for p in (ROOT / sub).rglob("*")
                  if p.suffix in (".py", ".cu", ".cuh", ".md") and "build" not in p.parts]
    cited = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for m in re.finditer(r"MATH\.md[^\n§]{0,3}§(\d+)(?:\s*[–-]\s*(\d+))?", text):
            for n in {int(m.group(1)), int(m.group(2) or m.group(1))}:
                cited += 1
                assert n in sections, f"{path.relative_to(ROOT)} cites MATH.md §{n}"
        if not (ROOT / "DESIGN.md").is_file() and path.name != Path(__file__).name:
            assert "DESIGN.md" not in text, f"{path.relative_to(ROOT)} cites DESIGN.md"
    assert cited > 10
