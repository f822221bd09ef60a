"""What an op's NVTX range and profiler hook cost, per call (a benchmark, not a test).

Every cugrad op and layer call runs inside ``with op_range(name, device):``. This script
times, in one fresh interpreter per mode (NVTX is configured once per process):

* ``range``:  an empty ``with op_range("linear.forward", "cpu"): pass`` block;
* ``relu``:   ``F.relu`` on a (4, 5) float32 array (validation + range + NumPy kernel);
* ``step``:   one training step of Sequential(Linear(5, 7), ReLU(), Linear(7, 3)) with
  CrossEntropyLoss and SGD on a (4, 5) batch, backward with ``input_grad=False`` (27 ranges
  per step: the first layer has no ``linear.backward.dX``; the script counts and prints them);

in these modes:

* ``off``       ``CUGRAD_NVTX=0``: ranges disabled, the shared no-op object;
* ``no-tool``   the default with ``nvtx`` installed but no tool attached (no Nsight):
  ``nvtx`` reports the domain disabled, so this is the same no-op path;
* ``tool``      an NVTX tool attached (tests/nvtx_inject/nvtx_record.c, built here with
  gcc, counting events without writing them): the real push/pop through the ``nvtx``
  package, as under Nsight minus Nsight's own per-event cost. A row "skipped: <reason>"
  where gcc or the nvtx3 headers ($CUDA_HOME/include, $CUDA_PATH/include or
  /usr/local/cuda/include, the first that has them) are missing, or the build fails;
* ``profile``   inside ``cugrad.profile()`` (host clock), no NVTX tool.

Each figure is a mean per call in nanoseconds, the median over 7 (5 for ``step``)
repeats in a process, then the median over ``--rounds`` rounds that run the modes
interleaved (so that drifting machine load hits every mode alike). ``range`` has the
empty loop's cost subtracted. Δ columns are differences from ``off``; Δ/range divides the
step's difference by the number of ranges in a step. Run on an idle machine:

    python profiling/bench_nvtx_overhead.py [--quick] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INJECT_SRC = REPO / "tests" / "nvtx_inject" / "nvtx_record.c"
MODES = ("off", "no-tool", "tool", "profile")


# --------------------------------------------------------------------------- worker

def _per_call_ns(fn, n: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn(n)
        samples.append((time.perf_counter_ns() - t0) / n)
    return statistics.median(samples)


def worker(mode: str, scale: float) -> dict:
    sys.path.insert(0, str(REPO))
    import numpy as np

    import cugrad.functional as F
    from cugrad import _trace
    from cugrad._trace import op_range
    from cugrad.nn import CrossEntropyLoss, Linear, ReLU, Sequential
    from cugrad.optim import SGD
    from cugrad.profiler import profile

    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    y = np.array([0, 2, 1, 2], dtype=np.int64)
    model = Sequential(Linear(5, 7, rng=0), ReLU(), Linear(7, 3, rng=1))
    loss_fn = CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=0.01)

    def empty_loop(n):
        for _ in range(n):
            pass

    def ranges(n):
        for _ in range(n):
            with op_range("linear.forward", "cpu"):
                pass

    def relu(n):
        for _ in range(n):
            F.relu(x)

    def step(n):
        for _ in range(n):
            opt.zero_grad()       # no range; without it each step adds 4 accumulate ranges
            loss_fn(model(x), y)
            model.backward(loss_fn.backward(), input_grad=False)
            opt.step()

    prof = profile()
    if mode == "profile":
        prof.__enter__()
    step(3)                                         # warm-up, resolves NVTX
    n_range, n_relu, n_step = (max(1, int(v * scale)) for v in (200_000, 20_000, 2_000))
    out = {
        "mode": mode,
        "nvtx_enabled": _trace.nvtx_enabled(),
        "empty_loop": _per_call_ns(empty_loop, n_range, 7),
        "range": _per_call_ns(ranges, n_range, 7),
        "relu": _per_call_ns(relu, n_relu, 7),
        "step": _per_call_ns(step, n_step, 5),
    }
    if mode == "profile":
        prof.__exit__(None, None, None)
    with profile() as count:                         # ranges per training step
        step(1)
    out["ranges_per_step"] = sum(s.calls for s in count.stats())
    return out


# --------------------------------------------------------------------------- driver

def cuda_include_dirs() -> list[Path]:
    """Where the nvtx3 headers are looked for, in tests/test_nvtx.py's order:
    $CUDA_HOME/include, $CUDA_PATH/include, /usr/local/cuda/include."""
    roots = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    return [Path(r) / "include" for r in roots if r]


def build_injection(tmp: Path) -> tuple[Path | None, str]:
    """(the NVTX injection library, built in ``tmp``, "") or (None, why the ``tool`` mode is
    skipped): no compiler, no nvtx3 headers, or a failed build (with the compiler's stderr
    tail): each is a "skipped" row, not a traceback."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None, "no C compiler (gcc/cc) to build the NVTX injection library"
    dirs = cuda_include_dirs()
    include = next((d for d in dirs if (d / "nvtx3" / "nvToolsExt.h").is_file()), None)
    if include is None:
        return None, ("the nvtx3 headers are not found (looked in "
                      f"{', '.join(str(d) for d in dirs)})")
    lib = tmp / "libnvtx_record.so"
    cmd = [gcc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", f"-I{include}",
           str(INJECT_SRC), "-o", str(lib), "-lpthread"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        return None, f"building the NVTX injection library: {gcc} could not run: {e}"
    if proc.returncode != 0:
        # the compiler's stderr tail, preceded by its first error line when the tail does
        # not hold it (the cause; the errors after it often only follow from it)
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        first = next((i for i, line in enumerate(lines) if "error" in line), None)
        shown = lines[-6:]
        if first is not None and first < len(lines) - 6:
            shown = [lines[first], "..."] + shown
        return None, (f"building the NVTX injection library with {gcc} -I{include} failed "
                      f"(exit status {proc.returncode})" + ("; its output:" if shown else "")
                      + "".join(f"\n#   {line}" for line in shown))
    return lib, ""


def run_mode(mode: str, lib: Path | None, scale: float) -> dict | None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVTX_")}
    env.pop("CUGRAD_NVTX", None)
    env["CUGRAD_FORCE_CPU"] = "1"
    if mode == "off":
        env["CUGRAD_NVTX"] = "0"
    elif mode == "tool":
        if lib is None:
            return None
        env["NVTX_INJECTION64_PATH"] = str(lib)     # no NVTX_RECORD_PATH: count only
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, "--scale", str(scale)],
                          env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))     # run from a checkout; the workers import cugrad themselves
    from cugrad._cli import int_at_least, new_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="10x fewer iterations")
    ap.add_argument("--rounds", type=int_at_least(1), default=3, help="interleaved rounds of all modes")
    ap.add_argument("--json", type=new_file(".json"), metavar="FILE.json",
                    help="also write the results here (checked before any round runs)")
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.scale)))
        return 0

    scale = 0.1 if args.quick else 1.0
    rounds: dict[str, list[dict]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        lib, tool_skipped = build_injection(Path(tmp))
        for _ in range(args.rounds):
            for m in MODES:
                r = run_mode(m, lib, scale)
                if r is not None:
                    rounds[m].append(r)
    results = {m: _median_of(rs) if rs else None for m, rs in rounds.items()}
    base = results["off"]
    import numpy
    try:
        import nvtx
        nvtx_version = getattr(nvtx, "__version__", None) or _dist_version("nvtx")
    except ImportError:
        nvtx_version = "not installed"
    print(f"# cugrad NVTX / profiler overhead, CPU backend; Python {platform.python_version()}, "
          f"NumPy {numpy.__version__}, nvtx {nvtx_version}, {platform.processor() or platform.machine()}")
    print(f"# {args.rounds} interleaved rounds; median of per-call means, ns; the empty loop costs {base['empty_loop']:.1f} ns "
          f"per iteration and is subtracted from 'range'; "
          f"{base['ranges_per_step']} ranges per training step")
    print(f"{'mode':<9} {'NVTX on':>7} {'range':>9} {'relu':>9} {'Δ relu':>8} "
          f"{'step':>10} {'Δ step':>9} {'Δ/range':>8}")
    for mode in MODES:
        r = results[mode]
        if r is None:
            head, _, detail = tool_skipped.partition("\n")    # a failed build's stderr below
            print(f"{mode:<9} (skipped: {head})" + (f"\n{detail}" if detail else ""))
            continue
        rng = r["range"] - r["empty_loop"]
        d_relu = r["relu"] - base["relu"]
        d_step = r["step"] - base["step"]
        print(f"{mode:<9} {str(r['nvtx_enabled']):>7} {rng:9.1f} {r['relu']:9.1f} "
              f"{d_relu:+8.1f} {r['step']:10.1f} {d_step:+9.1f} "
              f"{d_step / base['ranges_per_step']:+8.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _median_of(runs: list[dict]) -> dict:
    out = dict(runs[0])
    for key in ("empty_loop", "range", "relu", "step"):
        out[key] = statistics.median(r[key] for r in runs)
    return out


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


if __name__ == "__main__":
    sys.exit(main())
