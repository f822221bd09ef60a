"""The benchmark suite: every figure in one process, each against its peer.

    python -m cugrad bench [--quick] [--only SUBSTR ...] [--out PATH] [--max-seconds S]
    python -m cugrad bench --list            # the figures, without running anything
    python -m cugrad bench --gemm-plans --only gemm_plan   # GEMM tile / split-K sweep
    python -m cugrad bench --smoke [--gemm-plans]          # every figure at tiny shapes
    python profiling/bench.py ...            # the same, from a source checkout

It first measures the device's two ceilings (device-to-device copy bandwidth, counting
bytes read + written, and cuBLAS SGEMM at 8192³ through ``cupy.matmul``), then every
figure, and writes ``bench-<gpu>-<yyyymmdd>.json`` (``--out``), in ``./profiling/results/``
where that folder exists (a source checkout) and else in the current folder, and a
Markdown table beside it (same name, ``.md``), which it prints last.

A figure compares one of our calls ("ours") with a peer run in the same process on the same
inputs: cuBLAS, a CuPy reduction, PyTorch, or ``copy`` — a device-to-device copy moving
the same number of bytes (read + written) as the op must move at least, which is what a
bandwidth goal is measured against. ``speedup`` is ``peer_ms / ours_ms``; ``target`` is the
least speedup asked for (null: reported only), ``met`` whether it was reached.

How a figure is measured:

* Inputs are random, non-zero float32 (``standard_normal``). Each figure makes several
  input sets whose total exceeds twice the L2 cache where memory allows, and every call
  takes the next set, so that small sizes are not served from L2.
* Before any timing, ours is checked against the peer's result (or, for a copy peer, an
  independent CuPy computation): ‖ours − ref‖ / ‖ref‖ in float64 must be within the
  figure's tolerance. A figure whose check fails is reported as failed and not timed.
* Each call is timed with a pair of CUDA events on the current stream (PyTorch and CuPy
  share the legacy default stream; the suite checks that). Before each timed call a spin
  kernel holds the GPU for 1.5 × the call's host time + 20 µs (at most 2 ms), so that the
  call's kernels are queued before its start event fires: the figure is device time, not
  Python launch overhead — except where the call itself waits for the device (the public
  loss functions check their targets' values on the host; their ``*_kernels`` figures time
  the backend ops without those checks). Training steps are timed with the host clock over
  batches of steps, the device synchronised: there the host's time is the point.
* Each callable is warmed up (at least 3 calls and 20 ms), then timed for at least 10
  calls and ~100 ms (at most 300 calls or ~1 s), ours and peers interleaved in rounds.
  ``ours_ms``/``peer_ms`` are medians; ``spread`` gives each side's 10th and 90th
  percentiles (ms).
* TF32 is off for every FP32 peer: ``CUPY_TF32=0`` and ``NVIDIA_TF32_OVERRIDE=0`` are set
  before CuPy is imported, PyTorch's ``allow_tf32`` flags are cleared.

Every figure runs inside its own ``try``: an exception is recorded in the figure as
``"error"`` and the suite goes on; figures left when ``--max-seconds`` runs out, and those
that cannot run here (no PyTorch for a PyTorch peer), are recorded as skipped with the
reason. The JSON (and the table) are rewritten after every figure, so an interrupted run
leaves what it measured.

``--smoke`` runs every figure at tiny shapes (SMOKE_SHAPES: each dimension shrunk by
``smoke_dim``) with two timed calls and two input sets: it checks that the suite's host
code builds, checks and times every figure, in seconds, and means nothing as a
measurement (the JSON has ``"smoke": true``, the table says so). It also runs on the CPU
stand-in for CuPy (tests/fake_cupy, ``"cupy_stand_in": true``), where what the stand-in
cannot imitate (the spin kernel's inline PTX, ``cupy.ElementwiseKernel``) is skipped with
its message; there and in a smoke run the output goes under the temp folder unless
``--out`` says otherwise, never to profiling/results/.

This module imports neither CuPy nor PyTorch at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import itertools
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ._cli import finite_positive, new_file

SPREAD = "p10-p90"           # what "spread" holds: 10th and 90th percentile, ms
L2_FALLBACK_BYTES = 50 * 2**20
ROTATION_FACTOR = 2          # input sets total at least this many times the L2 cache ...
MAX_INPUT_SETS = 256         # ... with at most this many sets ...
INPUT_BUDGET_BYTES = 4 * 2**30   # ... and at most this much memory
STEP_INPUT_SETS = 16         # batches a training-step figure cycles through
STEPS_PER_SAMPLE = 10        # training steps per host-clock sample
TOL_PRODUCT = 1e-4           # check tolerances (tests/conftest.py: MATH.md §7)
TOL_ELEMENTWISE = 1e-5
COPY_CEILING_BYTES = 2**30   # the copy ceiling copies 1 GiB (2 GiB read + written)
SGEMM_CEILING_N = 8192
DEFAULT_MAX_SECONDS = 225.0

# Figure sizes. Products are M x N x K: op(a) is (M, K), op(b) (K, N); for linear, x is
# (M, K) and the weight (N, K).
GEMM_SQUARE = (4096, 8192)
MLP_SHAPES = ((256, 1024, 1024), (4096, 4096, 512), (8192, 1024, 1024), (128, 784, 256))
BIAS_GRAD_SHAPES = ((8192, 8192), (65536, 1024))
LOSS_SHAPE = (8192, 1000)               # (batch, classes)
ACTIVATION_SHAPE = (4096, 4096)         # 16M elements
LINEAR_SHAPES = ((4096, 4096, 4096), (256, 1024, 1024))
MLP_WIDTHS = (784, 256, 256, 10)
MLP_BATCH = 128
MLP_LR = 0.01

TABLE_COLUMNS = ("name", "shape", "ours ms", "peer", "peer ms", "speedup", "target", "met",
                 "check")


@dataclass(frozen=True)
class Shapes:
    """The sizes of every figure and of the two ceilings: FULL_SHAPES is the suite,
    SMOKE_SHAPES the same figures shrunk for ``--smoke``."""
    gemm_square: tuple[int, ...] = GEMM_SQUARE
    mlp: tuple[tuple[int, int, int], ...] = MLP_SHAPES
    bias_grad: tuple[tuple[int, int], ...] = BIAS_GRAD_SHAPES
    loss: tuple[int, int] = LOSS_SHAPE
    activation: tuple[int, int] = ACTIVATION_SHAPE
    linear: tuple[tuple[int, int, int], ...] = LINEAR_SHAPES
    mlp_widths: tuple[int, ...] = MLP_WIDTHS
    mlp_batch: int = MLP_BATCH
    copy_ceiling_bytes: int = COPY_CEILING_BYTES
    sgemm_ceiling_n: int = SGEMM_CEILING_N


def smoke_dim(d: int) -> int:
    """A figure dimension shrunk for ``--smoke``: up to 64 it stays; above, it keeps its
    remainder modulo 64 (the GEMM tile: a dimension off the tile grid stays off it) plus 8
    per doubling of its multiple of 64, so distinct dimensions stay distinct (4096 -> 56,
    8192 -> 64, 784 -> 48, 1000 -> 72, 1024 -> 40, 10 -> 10)."""
    if d <= 64:
        return d
    q, r = divmod(d, 64)
    small = r + 8 * q.bit_length()
    return small + 8 if r and small % 64 == 0 else small


def _shrunk(value):
    return smoke_dim(value) if isinstance(value, int) else tuple(_shrunk(v) for v in value)


def _dims(value) -> list[int]:
    """Every figure dimension in ``value`` (a Shapes, or part of one)."""
    if isinstance(value, Shapes):
        return [d for k, v in vars(value).items()
                if k not in ("copy_ceiling_bytes", "sgemm_ceiling_n") for d in _dims(v)]
    return [value] if isinstance(value, int) else [d for v in value for d in _dims(v)]


FULL_SHAPES = Shapes()
SMOKE_SHAPES = Shapes(**{k: _shrunk(v) for k, v in vars(FULL_SHAPES).items()
                         if k not in ("copy_ceiling_bytes", "sgemm_ceiling_n")},
                      copy_ceiling_bytes=2**20, sgemm_ceiling_n=64)


# ------------------------------------------------------------------------ timing plan

@dataclass(frozen=True)
class Settings:
    """How long each callable is warmed up and timed (see the module docstring)."""
    warmup_calls: int = 3
    warmup_s: float = 0.02
    target_s: float = 0.1      # time each callable for about this long ...
    min_reps: int = 10         # ... and at least this many calls ...
    max_reps: int = 300        # ... but at most this many ...
    max_s: float = 1.0         # ... or this long (never fewer than 3 calls)
    rounds: int = 5            # ours and peers alternate this many times
    max_head_start_us: float = 2000.0
    max_input_sets: int = MAX_INPUT_SETS   # input sets a figure rotates through, at most


FULL = Settings()
QUICK = Settings(warmup_s=0.005, target_s=0.02, min_reps=5, max_reps=30, max_s=0.2, rounds=3)
# --smoke: does every figure build, check and time? Two calls to warm up (the first is
# dropped), two timed, two input sets: the timings mean nothing.
SMOKE = Settings(warmup_calls=2, warmup_s=0.0, target_s=0.0, min_reps=1, max_reps=2,
                 max_s=0.0, rounds=1, max_input_sets=2)


def plan_reps(est_s: float, settings: Settings) -> int:
    """Timed calls for a callable taking ``est_s`` seconds: enough for ``target_s`` and at
    least ``min_reps``, capped by ``max_reps`` and ``max_s``, never fewer than 3 (or than
    ``max_reps``, if that is fewer)."""
    if est_s <= 0 or not math.isfinite(est_s):
        return settings.max_reps
    n = max(math.ceil(settings.target_s / est_s), settings.min_reps)
    return max(min(3, settings.max_reps), min(n, settings.max_reps, int(settings.max_s / est_s)))


def head_start_us(host_s: float, settings: Settings) -> float:
    """How long the spin kernel holds the GPU before a timed call whose host side takes
    ``host_s`` seconds: long enough for the call's launches to be queued."""
    return min(settings.max_head_start_us, 1.5 * host_s * 1e6 + 20.0)


def input_sets(set_bytes: int, l2_bytes: int, budget_bytes: int = INPUT_BUDGET_BYTES) -> int:
    """How many input sets of ``set_bytes`` to rotate through: together more than
    ROTATION_FACTOR × L2, within MAX_INPUT_SETS and ``budget_bytes`` (at least one)."""
    wanted = math.ceil(ROTATION_FACTOR * l2_bytes / max(set_bytes, 1))
    affordable = budget_bytes // max(set_bytes, 1)
    return max(1, min(wanted, MAX_INPUT_SETS, affordable))


def summarize(samples_ms) -> dict:
    """Median, 10th and 90th percentile (ms) and the count of a list of timings."""
    p10, median, p90 = np.percentile(np.asarray(samples_ms, dtype=np.float64), [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90),
            "n": len(samples_ms)}


def worst(errors) -> float:
    """The largest of several relative errors; NaN if any is NaN (NaN never passes)."""
    errors = [float(e) for e in errors]
    return math.nan if any(math.isnan(e) for e in errors) else max(errors)


# --------------------------------------------------------------------------- figures

@dataclass(frozen=True)
class PeerSpec:
    name: str                  # the "peer" column: "cuBLAS", "copy", "PyTorch", ...
    target: float | None       # least speedup asked for; None: reported only
    detail: str                # what exactly runs
    strict: bool = False       # the goal is speedup > target ("faster"), not >=


@dataclass(frozen=True)
class Spec:
    """One of our calls against one or more peers; one figure per peer."""
    name: str
    shape: str
    ours: str                  # what of ours runs
    peers: tuple[PeerSpec, ...]
    build: Callable[["Env"], "Case"]
    flops: float = 0.0         # floating-point operations per call (for TFLOP/s)
    nbytes: int = 0            # bytes an ideal call must read + write (for GB/s)
    tol: float = TOL_PRODUCT
    host_clock: bool = False   # time with the host clock over batches (training steps)

    @property
    def label(self) -> str:
        return f"{self.name} {self.shape}"


@dataclass
class PeerRun:
    run: Callable[[int], Any]                       # the peer on input set i
    reference: Callable[[], Any] | None = None      # what ours(0) must equal; default run(0)


@dataclass
class Case:
    """A built Spec: the callables on their input sets (``sets`` of them)."""
    ours: Callable[[int], Any]
    peers: dict[str, PeerRun]
    sets: int
    # Custom check (training steps, which change state): {peer name: relative error}.
    check: Callable[[], dict[str, float]] | None = None


class Unavailable(Exception):
    """A figure that does not apply here (e.g. an optional module is absent): skipped."""


def make_figure(spec: Spec, peer: PeerSpec, *, sets: int | None = None,
                check_err: float | None = None, ours: dict | None = None,
                theirs: dict | None = None, error: str | None = None,
                skipped: bool = False, setup_s: float | None = None,
                ceilings: dict | None = None) -> dict:
    """The JSON record of one figure. ``ours``/``theirs`` are ``summarize`` results (plus
    ``head_start_us``); without them the figure was not timed and ``error`` says why
    (``skipped``: it was not even built). ``setup_s``: building the inputs and checking,
    kernel compilation included."""
    fig = {"name": spec.name, "shape": spec.shape, "ours": spec.ours, "ours_ms": None,
           "peer": peer.name, "peer_detail": peer.detail, "peer_ms": None, "speedup": None,
           "target": peer.target, "met": None,   # set below when both sides were timed
           "spread": None, "check_rel_err": check_err, "check_tol": spec.tol,
           **({"target_strict": True} if peer.strict else {}),
           "input_sets": sets, "clock": "host, batches of steps" if spec.host_clock
           else "CUDA events", "setup_s": setup_s}
    if ours is not None and theirs is not None:
        speedup = theirs["median"] / ours["median"]
        fig.update(ours_ms=ours["median"], peer_ms=theirs["median"], speedup=speedup,
                   spread={"ours": [ours["p10"], ours["p90"]],
                           "peer": [theirs["p10"], theirs["p90"]]},
                   reps={"ours": ours["n"], "peer": theirs["n"]},
                   head_start_us={"ours": ours.get("head_start_us", 0.0),
                                  "peer": theirs.get("head_start_us", 0.0)})
        if peer.target is not None:
            fig["met"] = speedup > peer.target if peer.strict else speedup >= peer.target
        ceilings = ceilings or {}
        if spec.flops:
            fig["tflops"] = {"ours": spec.flops / ours["median"] / 1e9,
                             "peer": spec.flops / theirs["median"] / 1e9}
            ceiling = ceilings.get("sgemm", {}).get("tflops")
            if ceiling:
                fig["ours_fraction_of_sgemm_ceiling"] = fig["tflops"]["ours"] / ceiling
        if spec.nbytes:
            fig["bytes"] = spec.nbytes
            fig["gbps"] = {"ours": spec.nbytes / ours["median"] / 1e6,
                           "peer": spec.nbytes / theirs["median"] / 1e6}
            ceiling = ceilings.get("copy", {}).get("gbps")
            if ceiling:
                fig["ours_fraction_of_copy_ceiling"] = fig["gbps"]["ours"] / ceiling
    if error is not None:
        fig["error"] = error
    if skipped:
        fig["skipped"] = True
    return fig


def figure_status(fig: dict) -> str:
    """One word for a figure: met, missed, report, failed, skipped."""
    if fig.get("skipped"):
        return "skipped"
    if fig.get("error") is not None or fig.get("speedup") is None:
        return "failed"
    if fig.get("target") is None:
        return "report"
    return "met" if fig.get("met") else "missed"


# ------------------------------------------------------------------------ the report

def _num(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def table_row(fig: dict) -> list[str]:
    err = fig.get("check_rel_err")
    if fig.get("skipped"):
        check = "skipped"
    elif fig.get("error") is not None:
        check = "FAILED" if err is not None and not (err <= fig["check_tol"]) else "error"
    else:
        check = "ok" if err is not None else "—"
    if err is not None:
        check += f" {err:.1e}"
    met = fig.get("met")
    return [fig["name"], fig["shape"], _num(fig.get("ours_ms"), ".4g"), fig["peer"],
            _num(fig.get("peer_ms"), ".4g"), _num(fig.get("speedup"), ".3f"),
            ("> " if fig.get("target_strict") else "") + _num(fig.get("target"), ".2f"),
            "—" if met is None else ("yes" if met else "NO"),
            check]


def _clip(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def markdown_report(result: dict) -> str:
    """The Markdown table of a result (the JSON's dict): header, one row per figure, then
    the errors in full."""
    lines = [f"# cugrad benchmarks: {result.get('device')}, {result.get('date')}", ""]
    if result.get("smoke"):
        lines += [f"**SMOKE RUN, NOT A MEASUREMENT**: {result.get('smoke_note', '')}", ""]
    if result.get("cupy_stand_in"):
        lines += ["**Run on the CPU stand-in for CuPy (tests/fake_cupy), not on a GPU**: "
                  "kernels ran on the CPU harness; no timing here means anything.", ""]
    versions = ", ".join(f"{k} {result.get(k)}" for k in ("driver", "cuda", "cupy", "torch"))
    lines.append(f"{versions}; python {result.get('python')}, numpy {result.get('numpy')}")
    ceilings = result.get("ceilings") or {}
    parts = []
    for key, unit in (("copy", "gbps"), ("sgemm", "tflops")):
        c = ceilings.get(key) or {}
        parts.append(f"{key} {c[unit]:.4g} {'GB/s' if unit == 'gbps' else 'TFLOP/s'}"
                     if c.get(unit) else f"{key} {c.get('error', 'not measured')}")
    lines += [f"Ceilings: {'; '.join(parts)}.", "",
              f"ms are medians ({result.get('timing', {}).get('summary', '')}); "
              f"speedup = peer ms / ours ms; met: speedup ≥ target.", ""]
    lines.append("| " + " | ".join(TABLE_COLUMNS) + " |")
    lines.append("|" + "---|" * len(TABLE_COLUMNS))
    figures = result.get("figures", [])
    for fig in figures:
        lines.append("| " + " | ".join(table_row(fig)) + " |")
    counts = {s: sum(figure_status(f) == s for f in figures)
              for s in ("met", "missed", "report", "failed", "skipped")}
    smoke = " (a smoke run: met and missed mean nothing)" if result.get("smoke") else ""
    lines += ["", f"{len(figures)} figures{smoke}: {counts['met']} met, {counts['missed']} missed, "
              f"{counts['report']} reported only, {counts['failed']} failed, "
              f"{counts['skipped']} skipped."]
    errors = [f for f in figures if f.get("error") is not None and not f.get("skipped")]
    notes = [f"- {f['name']} {f['shape']} vs {f['peer']}: {_clip(f['error'])}" for f in errors]
    reasons: dict[str, int] = {}
    for f in figures:
        if f.get("skipped"):
            reason = str(f.get("error"))
            reasons[reason] = reasons.get(reason, 0) + 1
    notes += [f"- {count} figure{'s' if count > 1 else ''} skipped: {_clip(reason)}"
              for reason, count in reasons.items()]
    notes += [f"- not run: {note}" for note in result.get("skipped", [])]
    if notes:
        lines += ["", "Errors and omissions:", ""] + notes
    return "\n".join(lines) + "\n"


def jsonable(obj):
    """``obj`` with NaN and infinities as strings (strict JSON has neither)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def write_outputs(result: dict, json_path: Path) -> Path:
    """Write the JSON and, beside it, the Markdown table (atomically); returns the .md."""
    json_path.parent.mkdir(parents=True, exist_ok=True)
    md_path = json_path.with_suffix(".md")
    for path, text in ((json_path, json.dumps(jsonable(result), indent=2) + "\n"),
                       (md_path, markdown_report(result))):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return md_path


def gpu_short_name(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'NVIDIA A100-SXM4-80GB' -> 'a100': the first
    word with a digit, vendor words dropped; 'gpu' when there is none."""
    words = [w for w in re.split(r"[\s\-_/]+", device_name.lower())
             if w and w not in ("nvidia", "geforce", "tesla", "quadro")]
    for w in words:
        if any(c.isdigit() for c in w):
            return re.sub(r"[^a-z0-9]", "", w) or "gpu"
    return "gpu"


def default_out_path(device_name: str, date: datetime.date, *, scratch: bool = False) -> Path:
    """bench-<gpu>-<yyyymmdd>.json in ./profiling/results/ where that folder exists (a source
    checkout), else in the current folder: an installed cugrad run elsewhere creates no
    profiling/results/ there. ``scratch`` (a smoke run, or the CPU
    stand-in for CuPy: no measurement) the same name under the temp folder, with
    ``-smoke``."""
    name = f"bench-{gpu_short_name(device_name)}-{date:%Y%m%d}"
    if scratch:
        return Path(tempfile.gettempdir()) / f"cugrad-{name}-smoke.json"
    results = Path("profiling") / "results"
    return (results if results.is_dir() else Path()) / f"{name}.json"


def selected(specs: list[Spec], only: list[str] | None) -> list[Spec]:
    """The specs whose "name shape" contains any of ``only`` (case-insensitive)."""
    if not only:
        return list(specs)
    keys = [o.lower() for o in only]
    return [s for s in specs if any(k in s.label.lower() for k in keys)]


# ------------------------------------------------------------------ device: the env

_SPIN_SOURCE = r"""
extern "C" __global__ void cugrad_bench_spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
"""


def stand_in_limit(cupy, exc: BaseException) -> bool:
    """Whether ``exc`` is the CPU stand-in for CuPy (tests/fake_cupy) saying it cannot
    imitate something: never true with the real CuPy."""
    return bool(getattr(cupy, "FAKE", False)) and \
        isinstance(exc, getattr(cupy, "FakeCupyError", ()))


class Env:
    """The device side shared by all figures: CuPy, PyTorch (on demand), random inputs,
    the spin kernel and the timer. ``smoke``: a ``--smoke`` run (see ``torch``)."""

    def __init__(self, settings: Settings, *, smoke: bool = False):
        import cupy

        self.cp = cupy
        self.settings = settings
        self.smoke = smoke
        self.device = cupy.cuda.Device()
        self.l2_bytes = self.attribute("L2CacheSize") or L2_FALLBACK_BYTES
        self._host_rng = np.random.default_rng(1234)
        self._rng, self.rng_note = self._device_rng()
        self._spin = cupy.RawKernel(_SPIN_SOURCE, "cugrad_bench_spin")
        self.spin_note = None
        try:
            self.spin(0)
        except Exception as exc:
            # The spin kernel reads %globaltimer with inline PTX, which the stand-in's CPU
            # harness cannot run: there, no head start. Anywhere else this is an error.
            if not stand_in_limit(cupy, exc):
                raise
            self._spin = None
            self.spin_note = f"no head start (spin kernel unavailable: {exc})"
        self.sync()
        self._torch = None
        self._torch_error: str | None = None

    def attribute(self, name: str) -> int | None:
        """A device attribute (``cudaDevAttr<name>``), None if it cannot be read."""
        runtime = self.cp.cuda.runtime
        try:
            return int(runtime.deviceGetAttribute(getattr(runtime, f"cudaDevAttr{name}"),
                                                  self.device.id))
        except Exception:
            return None

    # -- libraries -------------------------------------------------------------------
    def torch(self, ours: Callable[[int], Any] | None = None):
        """PyTorch, TF32 off, on CuPy's stream; raises ``Unavailable`` (the figure is
        skipped) where it cannot be. In a smoke run ``ours`` (the figure's own call) runs
        once on input set 0 before that, so that our side still runs without PyTorch."""
        if self._torch is None and self._torch_error is None:
            try:
                import torch
                if not torch.cuda.is_available():
                    raise RuntimeError("torch.cuda.is_available() is False")
                with warnings.catch_warnings():     # newer PyTorch: a deprecation note
                    warnings.simplefilter("ignore")
                    torch.backends.cuda.matmul.allow_tf32 = False
                    torch.backends.cudnn.allow_tf32 = False
                cupy_stream = self.cp.cuda.get_current_stream().ptr
                theirs = torch.cuda.current_stream().cuda_stream
                if cupy_stream != theirs:
                    raise RuntimeError(f"PyTorch's current stream ({theirs:#x}) is not "
                                       f"CuPy's ({cupy_stream:#x}); one event clock cannot "
                                       "time both")
                self._torch = torch
            except Exception as exc:
                self._torch_error = f"{type(exc).__name__}: {exc}"
        if self._torch is None:
            why = f"PyTorch unavailable: {self._torch_error}"
            if self.smoke and ours is not None:
                ours(0)
                self.sync()
                why += " (smoke: ours ran once, unchecked)"
            raise Unavailable(why)
        return self._torch

    def torch_of(self, x):
        """A PyTorch tensor sharing ``x``'s memory."""
        return self.torch().from_dlpack(x)

    # -- data --------------------------------------------------------------------------
    def _device_rng(self):
        """(CuPy's generator, "cupy.random"), or (None, why) where it fails (it needs
        cuRAND): inputs are then drawn on the host."""
        try:
            rng = self.cp.random.RandomState(1234)
            rng.standard_normal((2,), dtype=self.cp.float32)
            self.sync()
            return rng, "cupy.random (cuRAND)"
        except Exception as exc:
            return None, f"NumPy on the host (cupy.random failed: {type(exc).__name__}: {exc})"

    def randn(self, *shape):
        """Standard normal float32 on the device."""
        if self._rng is not None:
            return self._rng.standard_normal(shape, dtype=self.cp.float32)
        return self.cp.asarray(self._host_rng.standard_normal(shape, dtype=np.float32))

    def classes(self, n: int, classes: int):
        """n int64 class indices in [0, classes) on the device."""
        return self.cp.asarray(self._host_rng.integers(0, classes, size=n, dtype=np.int64))

    def sets_for(self, set_bytes: int) -> int:
        return min(input_sets(set_bytes, self.l2_bytes), self.settings.max_input_sets)

    @property
    def step_sets(self) -> int:
        """Batches a training-step figure cycles through."""
        return min(STEP_INPUT_SETS, self.settings.max_input_sets)

    def copy_peer(self, nbytes: int, sets: int) -> Callable[[int], Any]:
        """A device-to-device copy moving ``nbytes`` read + written (half that copied),
        cycling through ``sets`` buffer pairs."""
        size = max(nbytes // 2, 1)
        pairs = []
        for _ in range(sets):
            src = self.cp.empty(size, dtype=self.cp.uint8)
            src.fill(1)
            pairs.append((src, self.cp.empty(size, dtype=self.cp.uint8)))
        copyto = self.cp.copyto

        def copy(i):
            # Contiguous, same dtype and size: CuPy's copyto is one cudaMemcpyAsync
            # (dst.data.copy_from_async) on the current stream.
            src, dst = pairs[i]
            copyto(dst, src)
        return copy

    # -- checks ------------------------------------------------------------------------
    def as_cupy(self, x):
        if isinstance(x, self.cp.ndarray):
            return x
        if hasattr(x, "detach"):                 # a PyTorch tensor
            return self.cp.from_dlpack(x.detach())
        return self.cp.asarray(x)

    def rel_err(self, out, ref) -> float:
        """max over components of ‖out − ref‖ / ‖ref‖, in float64 on the device."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        if len(outs) != len(refs):
            raise ValueError(f"check: {len(outs)} results against {len(refs)} references")
        errors = []
        for o, r in zip(outs, refs):
            o = self.as_cupy(o).astype(self.cp.float64)
            r = self.as_cupy(r).astype(self.cp.float64)
            if o.shape != r.shape:
                raise ValueError(f"check: result shape {o.shape} != reference {r.shape}")
            denom = float(self.cp.linalg.norm(r.ravel()))
            diff = float(self.cp.linalg.norm((o - r).ravel()))
            errors.append(diff / denom if denom > 0 else diff)
        return worst(errors)

    # -- timing ------------------------------------------------------------------------
    def sync(self):
        self.device.synchronize()

    def spin(self, ns: int):
        if self._spin is not None:
            self._spin((1, 1, 1), (1, 1, 1), (np.uint64(ns),))

    def time_interleaved(self, calls: dict[str, Callable[[int], Any]], sets: int, *,
                         host_clock: bool = False) -> dict[str, dict]:
        """Time each callable (called with an input-set index, cycling through ``sets``),
        interleaved in rounds; {label: summarize(...) plus head_start_us}. CUDA events
        per call after a head start, or with ``host_clock`` the host clock over batches
        of STEPS_PER_SAMPLE calls (see the module docstring)."""
        s = self.settings
        batch = STEPS_PER_SAMPLE if host_clock else 1
        series = {}
        for label, fn in calls.items():
            counter = itertools.count()
            next_set = (lambda c: lambda: next(c) % sets)(counter)
            host_s, whole_s = self._warm_up(fn, next_set)
            series[label] = {"fn": fn, "next_set": next_set, "samples": [],
                             "reps": plan_reps(whole_s * batch, s),
                             "head_ns": 0 if host_clock or self._spin is None
                             else int(head_start_us(host_s, s) * 1e3)}
        rounds = max(1, min(s.rounds, min(x["reps"] for x in series.values())))
        labels = list(series)
        for r in range(rounds):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                x = series[label]
                n = math.ceil(x["reps"] / rounds)
                if host_clock:
                    x["samples"] += self._run_host_clock(x["fn"], x["next_set"], n, batch)
                else:
                    x["samples"] += self._run_events(x["fn"], x["next_set"], n, x["head_ns"])
        return {label: {**summarize(x["samples"]), "head_start_us": x["head_ns"] / 1e3}
                for label, x in series.items()}

    def _warm_up(self, fn, next_set) -> tuple[float, float]:
        """At least ``warmup_calls`` calls and ``warmup_s``, each from an idle device;
        returns the median host time to issue a call and the median time of a whole call
        (issue to device idle), both in seconds, the first call left out."""
        s = self.settings
        host, whole = [], []
        t_start = time.perf_counter()
        while len(host) < s.warmup_calls or time.perf_counter() - t_start < s.warmup_s:
            self.sync()
            t0 = time.perf_counter()
            fn(next_set())
            t1 = time.perf_counter()
            self.sync()
            host.append(t1 - t0)
            whole.append(time.perf_counter() - t0)
        return float(np.median(host[1:])), float(np.median(whole[1:]))

    def _run_events(self, fn, next_set, n: int, head_ns: int) -> list[float]:
        """n calls, each between a pair of CUDA events after a head start; ms each."""
        cp = self.cp
        stream = cp.cuda.get_current_stream()
        events = [(cp.cuda.Event(), cp.cuda.Event()) for _ in range(n)]
        self.sync()
        for start, end in events:
            if head_ns:
                self.spin(head_ns)
            start.record(stream)
            fn(next_set())
            end.record(stream)
        self.sync()
        return [cp.cuda.get_elapsed_time(start, end) for start, end in events]

    def _run_host_clock(self, fn, next_set, n: int, batch: int) -> list[float]:
        """n samples, each the mean host time of ``batch`` calls from an idle device to an
        idle device; ms each."""
        out = []
        for _ in range(n):
            self.sync()
            t0 = time.perf_counter()
            for _ in range(batch):
                fn(next_set())
            self.sync()
            out.append((time.perf_counter() - t0) * 1e3 / batch)
        return out

    def free(self):
        gc.collect()
        self.sync()
        self.cp.get_default_memory_pool().free_all_blocks()
        self.cp.get_default_pinned_memory_pool().free_all_blocks()
        if self._torch is not None:
            self._torch.cuda.empty_cache()


# ----------------------------------------------------------- the figures: builders

@contextlib.contextmanager
def _forced_gemm_plan(plan):
    """Launch every gemm_tiled with ``plan`` (a config.GemmPlan) instead of the launcher's
    choice; None leaves the choice alone."""
    from .backends.cuda import config
    if plan is None:
        yield
        return
    chosen = config.gemm_plan
    config.gemm_plan = lambda *_: plan
    try:
        yield
    finally:
        config.gemm_plan = chosen


def _build_gemm(layout: str, m: int, n: int, k: int, plan=None):
    ta, tb = layout[0] == "T", layout[1] == "T"

    def build(env: Env) -> Case:
        from . import functional as F
        cp = env.cp
        a_shape = (k, m) if ta else (m, k)
        b_shape = (n, k) if tb else (k, n)
        sets = env.sets_for(4 * (a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1]))
        A = [env.randn(*a_shape) for _ in range(sets)]
        B = [env.randn(*b_shape) for _ in range(sets)]

        def ours(i):
            with _forced_gemm_plan(plan):
                return F.matmul(A[i], B[i], trans_a=ta, trans_b=tb)

        def cublas(i):
            return cp.matmul(A[i].T if ta else A[i], B[i].T if tb else B[i])
        return Case(ours, {"cuBLAS": PeerRun(cublas)}, sets)
    return build


def _build_linear_sigmoid(m: int, n: int, k: int):
    def build(env: Env) -> Case:
        from . import functional as F
        cp = env.cp
        sigmoid = cp.ElementwiseKernel("T x", "T y", "y = 1 / (1 + exp(-x))",
                                       "cugrad_bench_sigmoid")
        sets = env.sets_for(4 * (m * k + n * k + n))
        X = [env.randn(m, k) for _ in range(sets)]
        W = [env.randn(n, k) * (1.0 / math.sqrt(k)) for _ in range(sets)]
        b = [env.randn(n) for _ in range(sets)]

        def ours(i):
            return F.linear(X[i], W[i], b[i], activation="sigmoid")

        def three_launches(i):
            y = cp.matmul(X[i], W[i].T)
            y += b[i]
            return sigmoid(y)
        return Case(ours, {"cuBLAS + CuPy": PeerRun(three_launches)}, sets)
    return build


def _build_bias_grad(m: int, n: int):
    def build(env: Env) -> Case:
        from . import functional as F
        cp = env.cp
        sets = env.sets_for(4 * m * n)
        G = [env.randn(m, n) for _ in range(sets)]

        def cupy_sum(i):
            return G[i].sum(axis=0)     # what cupy.sum(g, axis=0) calls in CuPy
        return Case(lambda i: F.bias_grad(G[i]),
                    {"cupy.sum": PeerRun(cupy_sum),
                     "copy": PeerRun(env.copy_peer(4 * (m * n + n), sets),
                                     reference=lambda: G[0].astype(cp.float64).sum(axis=0))},
                    sets)
    return build


def _xent_reference(cp, z, t):
    """(mean loss, gradient) of softmax cross-entropy, in float64."""
    z = z.astype(cp.float64)
    n = z.shape[0]
    shifted = z - z.max(axis=1, keepdims=True)
    lse = cp.log(cp.exp(shifted).sum(axis=1))
    rows = cp.arange(n)
    loss = (lse - shifted[rows, t]).mean()
    grad = cp.exp(shifted - lse[:, None])
    grad[rows, t] -= 1.0
    return loss, grad / n


def _build_xent(n: int, c: int, nbytes: int, *, kernels: bool, torch_peer: bool):
    def build(env: Env) -> Case:
        from . import functional as F
        from .backends.cuda import ops
        sets = env.sets_for(4 * n * c + 8 * n)
        Z = [env.randn(n, c) for _ in range(sets)]
        T = [env.classes(n, c) for _ in range(sets)]
        if kernels:
            def ours(i):
                return ops.cross_entropy_fwd_bwd(Z[i], T[i], "mean")
        else:
            def ours(i):
                return F.cross_entropy_with_grad(Z[i], T[i])
        if torch_peer:
            torch = env.torch(ours)
            tF = torch.nn.functional
            Zt = [env.torch_of(z).requires_grad_(True) for z in Z]
            Tt = [env.torch_of(t) for t in T]

            def pytorch(i):
                loss = tF.cross_entropy(Zt[i], Tt[i])
                (grad,) = torch.autograd.grad(loss, Zt[i])
                return loss, grad
            return Case(ours, {"PyTorch": PeerRun(pytorch)}, sets)
        return Case(ours, {"copy": PeerRun(env.copy_peer(nbytes, sets),
                                           reference=lambda: _xent_reference(env.cp, Z[0], T[0]))},
                    sets)
    return build


def _build_mse(n: int, c: int, nbytes: int, *, kernels: bool, torch_peer: bool):
    def build(env: Env) -> Case:
        from . import functional as F
        from .backends.cuda import ops
        sets = env.sets_for(2 * 4 * n * c)
        P = [env.randn(n, c) for _ in range(sets)]
        T = [env.randn(n, c) for _ in range(sets)]
        if kernels:
            def ours(i):
                return ops.mse_fwd_bwd(P[i], T[i], "mean")
        else:
            def ours(i):
                return F.mse_loss_with_grad(P[i], T[i])
        if torch_peer:
            torch = env.torch(ours)
            Pt = [env.torch_of(p).requires_grad_(True) for p in P]
            Tt = [env.torch_of(t) for t in T]

            def pytorch(i):
                loss = torch.nn.functional.mse_loss(Pt[i], Tt[i])
                (grad,) = torch.autograd.grad(loss, Pt[i])
                return loss, grad
            return Case(ours, {"PyTorch": PeerRun(pytorch)}, sets)

        def reference():
            d = P[0].astype(env.cp.float64) - T[0]
            return (d * d).mean(), 2.0 * d / d.size
        return Case(ours, {"copy": PeerRun(env.copy_peer(nbytes, sets),
                                           reference=reference)}, sets)
    return build


_ACT_REFERENCE = {   # float64 CuPy: forward(x), backward(g, z) with z the forward output
    "sigmoid": (lambda cp, x: 1.0 / (1.0 + cp.exp(-x)), lambda cp, g, z: g * z * (1.0 - z)),
    "tanh": (lambda cp, x: cp.tanh(x), lambda cp, g, z: g * (1.0 - z * z)),
    "relu": (lambda cp, x: cp.maximum(x, 0.0), lambda cp, g, z: g * (z > 0)),
}


def _build_activation(name: str, backward: bool, n_rows: int, n_cols: int, *, torch_peer: bool):
    def build(env: Env) -> Case:
        from . import functional as F
        cp = env.cp
        fwd_ref, bwd_ref = _ACT_REFERENCE[name]
        arrays = 2 if backward else 1
        sets = env.sets_for(4 * arrays * n_rows * n_cols)
        if backward:
            G = [env.randn(n_rows, n_cols) for _ in range(sets)]
            Z = [fwd_ref(cp, env.randn(n_rows, n_cols).astype(cp.float64)).astype(cp.float32)
                 for _ in range(sets)]
            f_bwd = getattr(F, f"{name}_backward")

            def ours(i):
                return f_bwd(G[i], Z[i])

            def reference():
                return bwd_ref(cp, G[0].astype(cp.float64), Z[0].astype(cp.float64))
        else:
            X = [env.randn(n_rows, n_cols) for _ in range(sets)]
            f_fwd = getattr(F, name)

            def ours(i):
                return f_fwd(X[i])

            def reference():
                return fwd_ref(cp, X[0].astype(cp.float64))
        if torch_peer:
            torch = env.torch(ours)
            aten = torch.ops.aten
            if backward:
                Gt, Zt = [env.torch_of(g) for g in G], [env.torch_of(z) for z in Z]
                t_bwd = {"sigmoid": aten.sigmoid_backward, "tanh": aten.tanh_backward,
                         "relu": lambda g, z: aten.threshold_backward(g, z, 0)}[name]

                def pytorch(i):
                    return t_bwd(Gt[i], Zt[i])
            else:
                Xt = [env.torch_of(x) for x in X]
                t_fwd = getattr(torch, name)

                def pytorch(i):
                    return t_fwd(Xt[i])
            return Case(ours, {"PyTorch": PeerRun(pytorch)}, sets)
        nbytes = 4 * (arrays + 1) * n_rows * n_cols
        return Case(ours, {"copy": PeerRun(env.copy_peer(nbytes, sets), reference=reference)},
                    sets)
    return build


def _torch_linear_like(env: Env, lin):
    """A torch.nn.Linear with the weights of a cugrad Linear."""
    torch = env.torch()
    t = torch.nn.Linear(lin.in_features, lin.out_features, device="cuda")
    with torch.no_grad():
        t.weight.copy_(env.torch_of(lin.weight.data))
        t.bias.copy_(env.torch_of(lin.bias.data))
    return t


def _build_linear_fwd_bwd(m: int, n: int, k: int):
    def build(env: Env) -> Case:
        from . import nn
        sets = env.sets_for(4 * (m * k + n * k + m * n + n))
        lins = [nn.Linear(k, n, rng=i, device="cuda") for i in range(sets)]
        X = [env.randn(m, k) for _ in range(sets)]
        GY = [env.randn(m, n) for _ in range(sets)]

        def ours(i):
            lin = lins[i]
            lin.zero_grad()
            y = lin(X[i])
            gx = lin.backward(GY[i])
            return y, gx, lin.weight.grad, lin.bias.grad

        torch = env.torch(ours)
        tlins = [_torch_linear_like(env, lin) for lin in lins]
        Xt = [env.torch_of(x).requires_grad_(True) for x in X]
        GYt = [env.torch_of(g) for g in GY]

        def pytorch(i):
            t = tlins[i]
            y = t(Xt[i])
            gx, gw, gb = torch.autograd.grad(y, (Xt[i], t.weight, t.bias), GYt[i])
            return y, gx, gw, gb
        return Case(ours, {"PyTorch": PeerRun(pytorch)}, sets)
    return build


def _mlp_ours(widths: tuple[int, ...]):
    """A cugrad MLP of ``widths`` (ReLU fused into the hidden Linears), CrossEntropyLoss
    and SGD."""
    from . import nn, optim
    layers = [nn.Linear(a, b, rng=i, device="cuda",
                        activation="relu" if i < len(widths) - 2 else None)
              for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]
    model = nn.Sequential(*layers)
    return model, nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=MLP_LR)


def _torch_mlp_like(env: Env, model):
    """The same network as ``_mlp_ours``'s ``model`` in PyTorch, with the same weights, its
    CrossEntropyLoss and SGD."""
    torch = env.torch()
    tlayers = []
    for lin in model.layers:
        tlayers.append(_torch_linear_like(env, lin))
        if lin.activation == "relu":
            tlayers.append(torch.nn.ReLU())
    tmodel = torch.nn.Sequential(*tlayers)
    return tmodel, torch.nn.CrossEntropyLoss(), torch.optim.SGD(tmodel.parameters(), lr=MLP_LR)


def _torch_step(tmodel, tcrit, topt, x, y):
    topt.zero_grad(set_to_none=True)
    loss = tcrit(tmodel(x), y)
    loss.backward()
    topt.step()
    return loss


def _build_mlp_step(graph: bool, widths: tuple[int, ...] = MLP_WIDTHS,
                    batch: int = MLP_BATCH):
    def build(env: Env) -> Case:
        if graph:
            try:
                from .graph import capture_train_step
            except ImportError as exc:
                raise Unavailable(f"cugrad.graph.capture_train_step is not importable "
                                  f"({type(exc).__name__}: {exc})") from None
        model, crit, opt = _mlp_ours(widths)
        sets = env.step_sets
        X = [env.randn(batch, widths[0]) for _ in range(sets)]
        Y = [env.classes(batch, widths[-1]) for _ in range(sets)]

        if graph:
            replay = capture_train_step(model, crit, opt, X[0], Y[0])

            def step(i):
                return replay(X[i], Y[i])
        else:
            def step(i):
                opt.zero_grad()
                loss = crit(model(X[i]), Y[i])
                model.backward(crit.backward(), input_grad=False)
                opt.step()
                return loss

        torch = env.torch(step)
        tmodel, tcrit, topt = _torch_mlp_like(env, model)
        Xt, Yt = [env.torch_of(x) for x in X], [env.torch_of(y) for y in Y]

        def check():
            # From the same weights (copied over just before), one step each on batch 0:
            # the losses, the gradients and the updated weights must agree.
            with torch.no_grad():
                for p, tp in zip(model.parameters(), tmodel.parameters()):
                    tp.copy_(env.torch_of(p.data))
            loss = float(env.as_cupy(step(0)))
            tloss = float(_torch_step(tmodel, tcrit, topt, Xt[0], Yt[0]).detach())
            params, tparams = model.parameters(), list(tmodel.parameters())
            grads = env.rel_err([p.grad for p in params], [tp.grad for tp in tparams])
            weights = env.rel_err([p.data for p in params], tparams)
            loss_err = abs(loss - tloss) / abs(tloss) if tloss else abs(loss)
            return {"PyTorch": worst([loss_err, grads, weights])}

        def pytorch(i):
            return _torch_step(tmodel, tcrit, topt, Xt[i], Yt[i])
        return Case(step, {"PyTorch": PeerRun(pytorch)}, sets, check=check)
    return build


# ------------------------------------------------------------- the figures: the list

def _loss_specs(name, shape, build, n, c, nbytes, copy_detail, public, kernels, torch_detail):
    """A loss's three figures: the public op against a copy of its bytes and against
    PyTorch, and the backend kernels alone (no host-syncing validation) against the copy.
    The bandwidth goal (0.85 of the copy) is the kernels' figure; the public op's, which
    adds its checks' passes and a host sync, is reported beside it."""
    copy = (PeerSpec("copy", 0.85, copy_detail),)
    public_copy = (PeerSpec("copy", None, copy_detail + "; reported: the goal is the "
                            f"{name}_kernels figure's (the public op adds its checks)"),)
    return [
        Spec(name, shape, public, public_copy,
             build(n, c, nbytes, kernels=False, torch_peer=False), nbytes=nbytes),
        Spec(name, shape, public, (PeerSpec("PyTorch", None, torch_detail),),
             build(n, c, nbytes, kernels=False, torch_peer=True), nbytes=nbytes),
        Spec(f"{name}_kernels", shape, kernels, copy,
             build(n, c, nbytes, kernels=True, torch_peer=False), nbytes=nbytes),
    ]


def specs(shapes: Shapes = FULL_SHAPES) -> list[Spec]:
    """Every figure of the suite at ``shapes``, in the order they run (nothing is built
    here)."""
    out: list[Spec] = []
    cublas = "cupy.matmul (cuBLAS SGEMM, TF32 off)"
    copy_detail = "cudaMemcpyAsync device-to-device moving the same bytes (read + written)"
    for n in shapes.gemm_square:
        for layout in ("NN", "NT", "TN"):
            out.append(Spec(f"gemm_{layout.lower()}", f"{n}x{n}x{n}",
                            f"F.matmul(trans_a={layout[0] == 'T'}, trans_b={layout[1] == 'T'})",
                            (PeerSpec("cuBLAS", 0.90, cublas),), _build_gemm(layout, n, n, n),
                            flops=2.0 * n ** 3))
    for m, n, k in shapes.mlp:
        out.append(Spec("gemm_mlp_nn", f"{m}x{n}x{k}", "F.matmul",
                        (PeerSpec("cuBLAS", 0.80, cublas),), _build_gemm("NN", m, n, k),
                        flops=2.0 * m * n * k))
    for m, n, k in shapes.mlp:
        out.append(Spec("linear_bias_sigmoid", f"{m}x{n}x{k}",
                        "F.linear(x, w, b, activation='sigmoid'), one fused kernel",
                        (PeerSpec("cuBLAS + CuPy", 1.0, "cupy.matmul(x, w.T); y += b; sigmoid "
                                  "ElementwiseKernel (3 launches)", strict=True),),
                        _build_linear_sigmoid(m, n, k), flops=2.0 * m * n * k))
    for m, n in shapes.bias_grad:
        out.append(Spec("bias_grad", f"{m}x{n}", "F.bias_grad",
                        (PeerSpec("cupy.sum", 1.3, "cupy.sum(g, axis=0)", strict=True),
                         PeerSpec("copy", 0.85, copy_detail)),
                        _build_bias_grad(m, n), nbytes=4 * (m * n + n)))
    n, c = shapes.loss
    out += _loss_specs("cross_entropy_fwd_bwd", f"{n}x{c}", _build_xent, n, c,
                       2 * 4 * n * c + 8 * n + 4, copy_detail,
                       "F.cross_entropy_with_grad (public API: its index check syncs the host)",
                       "backends.cuda.ops.cross_entropy_fwd_bwd (the kernels, no validation)",
                       "F.cross_entropy + autograd.grad")
    out += _loss_specs("mse_fwd_bwd", f"{n}x{c}", _build_mse, n, c, 3 * 4 * n * c + 4, copy_detail,
                       "F.mse_loss_with_grad (public API: its NaN check syncs the host)",
                       "backends.cuda.ops.mse_fwd_bwd (one pass and the partial sums' pass, "
                       "no validation)",
                       "F.mse_loss + autograd.grad")
    rows, cols = shapes.activation
    for act in ("sigmoid", "tanh", "relu"):
        for backward in (False, True):
            fn = f"F.{act}_backward(g, out)" if backward else f"F.{act}(x)"
            aten_name = "threshold" if act == "relu" else act
            torch_fn = f"aten.{aten_name}_backward" if backward else f"torch.{act}"
            nbytes = 4 * (3 if backward else 2) * rows * cols
            for peer in (PeerSpec("copy", 0.85, copy_detail),
                         PeerSpec("PyTorch", None, torch_fn)):
                out.append(Spec(f"{act}_{'bwd' if backward else 'fwd'}", f"{rows}x{cols}", fn,
                                (peer,), _build_activation(act, backward, rows, cols,
                                                           torch_peer=peer.name == "PyTorch"),
                                nbytes=nbytes, tol=TOL_ELEMENTWISE))
    for m, n, k in shapes.linear:
        out.append(Spec("linear_fwd_bwd", f"{m}x{n}x{k}",
                        "nn.Linear forward + backward (dX, dW, db)",
                        (PeerSpec("PyTorch", 1.0, "torch.nn.Linear forward + autograd.grad "
                                  "(dX, dW, db), same weights"),),
                        _build_linear_fwd_bwd(m, n, k), flops=6.0 * m * n * k))
    widths, batch = shapes.mlp_widths, shapes.mlp_batch
    mlp = f"{'-'.join(map(str, widths))} ReLU, batch {batch}"
    eager = "PyTorch eager: same model, CrossEntropyLoss, SGD(lr=0.01)"
    out.append(Spec("mlp_step", mlp, "eager step: Sequential (ReLU fused), CrossEntropyLoss, "
                    "SGD(lr=0.01)", (PeerSpec("PyTorch", None, eager),),
                    _build_mlp_step(False, widths, batch), host_clock=True))
    out.append(Spec("mlp_step_graph", mlp, "cugrad.graph.capture_train_step(...) replayed",
                    (PeerSpec("PyTorch", 2.0, eager),), _build_mlp_step(True, widths, batch),
                    host_clock=True))
    return out


# The products of one training step of the MLP of ``shapes`` (forward NT, dX NN, dW TN),
# for the plan sweep.
def _mlp_step_products(shapes: Shapes = FULL_SHAPES) -> list[tuple[str, int, int, int]]:
    out = []
    widths, batch = shapes.mlp_widths, shapes.mlp_batch
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        out.append(("NT", batch, d_out, d_in))
        if i > 0:
            out.append(("NN", batch, d_in, d_out))
        out.append(("TN", d_out, d_in, batch))
    return out


def gemm_plan_specs(splits=(1, 2, 4, 8), shapes: Shapes = FULL_SHAPES,
                    sm_count: int = 132) -> list[Spec]:
    """``--gemm-plans``: the MLP-shape products and those of the MLP training step, each
    under every tile of config.GEMM_TILES (float32) and K split in ``splits``, against cuBLAS
    (reported only): the measurements that config.gemm_plan's heuristic is tuned by. The
    plan F.matmul itself takes on a GPU of ``sm_count`` SMs is marked ``_auto`` (the bench
    passes the device's count; 132, an H100 SXM's, where no device is asked, as for
    ``--list``)."""
    from .backends.cuda import config
    cublas = "cupy.matmul (cuBLAS SGEMM, TF32 off)"
    products = [("NN", m, n, k) for m, n, k in shapes.mlp] + _mlp_step_products(shapes)
    out = []
    for layout, m, n, k in dict.fromkeys(products):
        auto = config.gemm_plan(m, n, k, "float32", sm_count)
        plans = [auto]
        for tiles in config.GEMM_TILES["float32"]:
            for want in splits:
                plan = config.GemmPlan.split_k(tiles, k, want)
                if plan.splits == want and plan not in plans:
                    plans.append(plan)
        for plan in plans:
            tiles = plan.tiles
            mark = f" (gemm_plan's choice on {sm_count} SMs)" if plan == auto else ""
            name = f"gemm_plan_{layout.lower()}_t{tiles.bm}_s{plan.splits}"
            out.append(Spec(name + ("_auto" if plan == auto else ""), f"{m}x{n}x{k}",
                            f"F.matmul, tile {tiles.bm}x{tiles.bn}, {plan.splits} K "
                            f"split(s) of {plan.k_split}{mark}",
                            (PeerSpec("cuBLAS", None, cublas),),
                            _build_gemm(layout, m, n, k, plan), flops=2.0 * m * n * k))
    return out


# ------------------------------------------------------------------------ the suite

def _error_text(exc: BaseException) -> str:
    where = traceback.extract_tb(exc.__traceback__)
    at = f" (at {Path(where[-1].filename).name}:{where[-1].lineno})" if where else ""
    return f"{type(exc).__name__}: {exc}{at}"


def _check(env: Env, spec: Spec, case: Case) -> dict[str, float]:
    """{peer name: relative error of ours against that peer's reference}."""
    if case.check is not None:
        return case.check()
    out = case.ours(0)
    errors = {}
    for peer in spec.peers:
        run = case.peers[peer.name]
        errors[peer.name] = env.rel_err(out, run.reference() if run.reference is not None
                                        else run.run(0))
    return errors


def run_spec(env: Env, spec: Spec, ceilings: dict) -> list[dict]:
    """Build, check and time one spec; one figure per peer. Raises only ``Unavailable``."""
    case = None
    try:
        t0 = time.perf_counter()
        case = spec.build(env)
        errors = _check(env, spec, case)
        setup_s = time.perf_counter() - t0
        passed = [p for p in spec.peers if errors[p.name] <= spec.tol]
        stats = {}
        if passed:
            calls = {"ours": case.ours, **{p.name: case.peers[p.name].run for p in passed}}
            stats = env.time_interleaved(calls, case.sets, host_clock=spec.host_clock)
        figures = []
        for peer in spec.peers:
            err = errors[peer.name]
            if peer in passed:
                figures.append(make_figure(spec, peer, sets=case.sets, check_err=err,
                                           ours=stats["ours"], theirs=stats[peer.name],
                                           setup_s=setup_s, ceilings=ceilings))
            else:
                figures.append(make_figure(
                    spec, peer, sets=case.sets, check_err=err, setup_s=setup_s,
                    error=f"check failed: relative error {err:.3g} > tolerance {spec.tol:g}; "
                          "not timed"))
        return figures
    except Unavailable:
        raise
    except Exception as exc:
        if stand_in_limit(getattr(env, "cp", None), exc):
            return [make_figure(spec, peer, skipped=True, error="the CPU stand-in for CuPy "
                                f"cannot run this figure: {_error_text(exc)}")
                    for peer in spec.peers]
        return [make_figure(spec, peer, error=_error_text(exc)) for peer in spec.peers]
    finally:
        del case
        try:
            env.free()
        except Exception:   # a broken CUDA context: the next figure reports it
            pass


def _copy_ceiling(env: Env, shapes: Shapes) -> dict:
    size = shapes.copy_ceiling_bytes
    copy = env.copy_peer(2 * size, 1)
    st = env.time_interleaved({"copy": copy}, 1)["copy"]
    return {"bytes": 2 * size, "ms": st["median"],
            "spread": [st["p10"], st["p90"]],
            "gbps": 2 * size / st["median"] / 1e6,
            "how": "cudaMemcpyAsync device-to-device of " + (
                f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size / 2**20:g} MiB")}


def _sgemm_ceiling(env: Env, shapes: Shapes) -> dict:
    n = shapes.sgemm_ceiling_n
    a, b = env.randn(n, n), env.randn(n, n)
    st = env.time_interleaved({"sgemm": lambda i: env.cp.matmul(a, b)}, 1)["sgemm"]
    return {"shape": f"{n}x{n}x{n}", "ms": st["median"], "spread": [st["p10"], st["p90"]],
            "tflops": 2.0 * n ** 3 / st["median"] / 1e9,
            "how": "cupy.matmul float32 (cuBLAS SGEMM, TF32 off)"}


def measure_ceilings(env: Env, shapes: Shapes = FULL_SHAPES) -> dict:
    """Copy bandwidth (bytes read + written) and cuBLAS SGEMM (at 8192³ in the full suite);
    a ceiling that fails holds {"error": ...}."""
    ceilings = {}
    for name, measure in (("copy", _copy_ceiling), ("sgemm", _sgemm_ceiling)):
        try:
            ceilings[name] = measure(env, shapes)
        except Exception as exc:
            ceilings[name] = {"error": _error_text(exc)}
        finally:
            env.free()
    return ceilings


def _driver_version(cupy) -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=20, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    v = cupy.cuda.runtime.driverGetVersion()
    return f"CUDA driver API {v // 1000}.{v % 1000 // 10}"


def _cupy_compute_type() -> str:
    """CuPy's compute type for float32 products ("COMPUTE_TYPE_DEFAULT" is plain FP32
    unless CUPY_TF32=1); read through a private module, so "unknown" if it moved."""
    try:
        from cupy._core import _routines_linalg as linalg
        return linalg.compute_type_to_str(linalg.get_compute_type(np.dtype(np.float32)))
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def _or_error(fn):
    """fn(), or "unknown (the error)" if it raises: the header never stops the suite."""
    try:
        return fn()
    except Exception as exc:
        return f"unknown ({type(exc).__name__}: {exc})"


def _device_name(cupy, device_id: int) -> str:
    name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def _cuda_runtime(cupy) -> str:
    v = cupy.cuda.runtime.runtimeGetVersion()
    return f"{v // 1000}.{v % 1000 // 10}"


def environment(env: Env) -> dict:
    """Device, driver and library versions for the result's header."""
    import cupy

    from . import __version__
    try:
        torch = env.torch()
        torch_version = torch.__version__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_tf32 = {"matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                          "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
    except Unavailable as exc:
        torch_version, torch_tf32 = f"unavailable ({exc})", None
    return {
        "device": _or_error(lambda: _device_name(cupy, env.device.id)),
        "driver": _or_error(lambda: _driver_version(cupy)),
        "cuda": _or_error(lambda: _cuda_runtime(cupy)),
        "cupy": cupy.__version__,
        "torch": torch_version,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cugrad": __version__,
        "l2_bytes": env.l2_bytes,
        "sm_count": env.attribute("MultiProcessorCount"),
        "inputs": env.rng_note,
        "tf32": {"CUPY_TF32": os.environ.get("CUPY_TF32"),
                 "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE"),
                 "cupy_float32_compute_type": _cupy_compute_type(),
                 "torch": torch_tf32},
    }


def run_suite(settings: Settings, chosen: list[Spec], out_path: Path | None,
              max_seconds: float, log=functools.partial(print, flush=True), *,
              smoke: bool = False, shapes: Shapes = FULL_SHAPES) -> tuple[dict, Path]:
    """Run the ceilings and ``chosen``, writing the outputs after each; returns the result
    and the JSON's path. Needs a working CUDA backend. ``smoke``: a ``--smoke`` run
    (``chosen`` at SMOKE_SHAPES, ``settings`` SMOKE), marked so in the result and written
    by default under the temp folder, as is any run on the CPU stand-in for CuPy."""
    t_start = time.perf_counter()
    env = Env(settings, smoke=smoke)
    result = environment(env)
    stand_in = bool(getattr(env.cp, "FAKE", False))
    if out_path is None:
        # The file's date is the JSON's (UTC), not the host's local date.
        out_path = default_out_path(result["device"],
                                    datetime.date.fromisoformat(result["date"][:10]),
                                    scratch=smoke or stand_in)
    result = {"smoke": smoke, "cupy_stand_in": stand_in, **result}
    if smoke:
        result["smoke_note"] = (
            "--smoke: every figure at tiny shapes (each dimension shrunk to at most "
            f"{max(_dims(shapes))}), "
            f"{settings.max_reps} timed calls, at most {settings.max_input_sets} input sets; "
            "it checks that each figure builds, agrees with its peer and is timed. The "
            "timings mean nothing.")
    result.update({
        "timing": {
            "summary": f"per-call CUDA events after a head start, {SPREAD} spread",
            "spread": SPREAD + " percentiles of the per-call times, ms",
            "settings": vars(settings),
            "head_start": env.spin_note or
                          "a spin kernel holds the GPU 1.5x the call's host time + 20 us "
                          "before each timed call, so its launches are queued first",
            "training_steps": f"host clock over batches of {STEPS_PER_SAMPLE} steps, "
                              "device synchronised before and after",
        },
        "ceilings": {}, "figures": [],
    })
    log(f"cugrad bench on {result['device']} (driver {result['driver']}, CUDA "
        f"{result['cuda']}, CuPy {result['cupy']}, PyTorch {result['torch']}); "
        f"writing {out_path}")
    result["ceilings"] = measure_ceilings(env, shapes)
    log(f"ceilings: {json.dumps(jsonable(result['ceilings']))}")
    write_outputs(result, out_path)
    for spec in chosen:
        elapsed = time.perf_counter() - t_start
        if elapsed > max_seconds:
            figures = [make_figure(spec, p, error=f"the time budget (--max-seconds "
                                   f"{max_seconds:g}) ran out", skipped=True)
                       for p in spec.peers]
        else:
            try:
                figures = run_spec(env, spec, result["ceilings"])
            except Unavailable as exc:
                figures = [make_figure(spec, p, error=str(exc), skipped=True)
                           for p in spec.peers]
        result["figures"] += figures
        for fig in figures:
            log(f"  [{time.perf_counter() - t_start:6.1f}s] " + " | ".join(table_row(fig)))
        result["elapsed_s"] = time.perf_counter() - t_start
        write_outputs(result, out_path)
    result["elapsed_s"] = time.perf_counter() - t_start
    return result, out_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cugrad bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=new_file(".json"), help="JSON path, ending in .json; the "
                    "table goes beside it as .md (default: bench-<gpu>-<yyyymmdd>.json in "
                    "./profiling/results/ when that folder exists, as in a source checkout, "
                    "else in the current folder)")
    ap.add_argument("--only", action="append", metavar="SUBSTR",
                    help="run only figures whose 'name shape' contains SUBSTR (repeatable)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--smoke", action="store_true",
                    help="every figure at tiny shapes, 2 timed calls each: checks that the "
                    "suite runs (also on the CPU stand-in for CuPy); the timings mean nothing. "
                    "Written under the temp folder unless --out is given")
    ap.add_argument("--max-seconds", type=finite_positive(" of seconds"), default=DEFAULT_MAX_SECONDS,
                    help="start no figure after this many seconds; the rest are recorded "
                    f"as skipped (default {DEFAULT_MAX_SECONDS:g})")
    ap.add_argument("--list", action="store_true", help="list the figures and exit")
    ap.add_argument("--gemm-plans", action="store_true",
                    help="add the GEMM plan sweep (every tile and K split at the MLP shapes)")
    args = ap.parse_args(argv)

    shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES

    def choose(sm_count=132):
        return selected(specs(shapes) + (gemm_plan_specs(shapes=shapes, sm_count=sm_count)
                                         if args.gemm_plans else []), args.only)
    chosen = choose()
    if args.list:
        for s in chosen:
            for p in s.peers:
                target = "report only" if p.target is None else f"target {p.target:g}"
                print(f"{s.name:30s} {s.shape:31s} vs {p.name:14s} {target}")
        return 0
    if not chosen:
        print(f"cugrad bench: no figure matches --only {args.only}", file=sys.stderr)
        return 2
    # Before CuPy (and cuBLAS) load: no TF32 for any FP32 peer; no NaN-poisoned outputs.
    cupy_loaded = "cupy" in sys.modules
    os.environ["CUPY_TF32"] = "0"
    os.environ["NVIDIA_TF32_OVERRIDE"] = "0"
    os.environ.pop("CUGRAD_POISON_OUTPUTS", None)
    from . import _backend
    if not _backend.cuda_available():
        print("cugrad bench: needs a working CUDA device, and there is none here: "
              f"{_backend.cuda_unavailable_reason()}", file=sys.stderr)
        return 2
    if cupy_loaded:
        print("cugrad bench: warning: CuPy was imported before the bench set CUPY_TF32=0",
              file=sys.stderr)
    if args.gemm_plans:     # mark the plan F.matmul takes on this device, not on 132 SMs
        from .backends.cuda.context import current_context
        chosen = choose(current_context().sm_count)
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    result, out_path = run_suite(settings, chosen, args.out, args.max_seconds,
                                 smoke=args.smoke, shapes=shapes)
    md_path = write_outputs(result, out_path)
    print(f"\nwrote {out_path} and {md_path} in {result.get('elapsed_s', 0):.0f} s\n")
    print(markdown_report(result), flush=True)
    return 0
