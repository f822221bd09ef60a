"""NVTX ranges and the op recorder behind ``cugrad.profile()``.

Every public op and layer method runs inside ``with op_range(name, device):``. What that
costs depends on what is listening:

* nobody (the usual case): ``op_range`` returns one shared no-op context object. No
  NVTX call is made and no time is read.
* an NVTX tool (Nsight Systems / Compute, or any library named by
  ``NVTX_INJECTION64_PATH``): a push/pop pair in the domain ``cugrad``, with the range
  named ``name`` (a registered string, so the tool sees the text once). The ``nvtx``
  package decides whether a tool is attached (``nvtxDomainIsEnabled``): without one it
  hands back a dummy domain and we emit nothing at all. Without the ``nvtx`` package, or
  with ``CUGRAD_NVTX=0`` in the environment, ranges are off.
* an active ``cugrad.profile()``: the range is also timed and recorded (see
  ``cugrad/profiler.py``): host time with ``time.perf_counter_ns`` for ``device="cpu"``,
  device time with CUDA events on the current stream for ``device="cuda"`` (CuPy is
  imported at the first such range; where it cannot make an event, the range is timed on
  the host and the op raises its own error). ``device=None`` means "the device of the enclosing range" (the host
  clock at top level).

Ranges nest and are exception-safe: ``__exit__`` always pops and records, whatever the
body raised. NVTX push/pop stacks are per thread; so is the recorder's range stack.
"""

from __future__ import annotations

import os
import threading
from time import perf_counter_ns

from ._backend import env_flag

NVTX_DOMAIN = "cugrad"
NVTX_ENV = "CUGRAD_NVTX"


class _NoRange:
    """The shared do-nothing range returned while nothing listens."""

    __slots__ = ()

    def __enter__(self):
        return None

    def __exit__(self, exc_type, exc, tb):
        return False


_NO_RANGE = _NoRange()

# --------------------------------------------------------------------------- state
# ``_quiet`` is the only thing the hot path reads: True when there is no NVTX domain to
# write to and no profile is recording. It is recomputed whenever either changes.
_state_lock = threading.Lock()
_UNRESOLVED = object()
_domain = _UNRESOLVED          # nvtx Domain, or None when ranges are off
_nvtx_off_reason = ""
_nvtx_ranges: dict = {}        # name -> _NvtxRange (stateless, shared by all threads)
_profilers: tuple = ()         # active Profile objects (see profiler.py)
_quiet = False                 # False until the NVTX question is resolved at first use
_tls = threading.local()       # .top: innermost timed range of this thread


def _recompute_quiet() -> None:
    global _quiet
    _quiet = _domain is None and not _profilers


def _resolve_nvtx() -> None:
    """Decide once whether NVTX ranges are emitted (at the first op, not at import, so
    that importing cugrad neither imports ``nvtx`` nor initialises NVTX)."""
    global _domain, _nvtx_off_reason
    with _state_lock:
        if _domain is not _UNRESOLVED:
            return
        domain, reason = None, ""
        if not env_flag(NVTX_ENV, default=True):
            reason = f"{NVTX_ENV}={os.environ[NVTX_ENV]}"
        else:
            try:
                import nvtx
                candidate = nvtx.get_domain(NVTX_DOMAIN)   # initialises NVTX: loads a tool
            except Exception as exc:  # ImportError, or a broken install or tool
                reason = f"the nvtx package is unusable ({type(exc).__name__}: {exc})"
            else:
                if isinstance(candidate, nvtx.Domain):
                    domain = candidate
                else:  # nvtx's DummyDomain: no NVTX tool is attached to this process
                    reason = "no NVTX tool is attached (nvtxDomainIsEnabled returned 0)"
        _domain, _nvtx_off_reason = domain, reason
        _recompute_quiet()


def nvtx_enabled() -> bool:
    """True when ops emit NVTX ranges: ``nvtx`` is installed, ``CUGRAD_NVTX`` is not 0 and
    an NVTX tool (Nsight, an injection library) is attached."""
    if _domain is _UNRESOLVED:
        _resolve_nvtx()
    return _domain is not None


def nvtx_disabled_reason() -> str:
    """Why ``nvtx_enabled()`` is False ("" when it is True)."""
    nvtx_enabled()
    return _nvtx_off_reason


def _set_profilers(profilers: tuple) -> None:
    """Install the tuple of recording profiles (called by profiler.py under its lock)."""
    global _profilers
    if _domain is _UNRESOLVED:
        _resolve_nvtx()
    with _state_lock:
        _profilers = profilers
        _recompute_quiet()


# --------------------------------------------------------------------------- NVTX

# ARGB colours by kind of range, so a timeline separates them at a glance.
_COLOR_FORWARD = 0xFF2E7D32    # green: ops and layer forwards
_COLOR_BACKWARD = 0xFFC62828   # red: anything .backward
_COLOR_STEP = 0xFF1565C0       # blue: optimiser steps


def _color_for(name: str) -> int:
    if ".backward" in name:
        return _COLOR_BACKWARD
    if name.endswith("step"):
        return _COLOR_STEP
    return _COLOR_FORWARD


class _NvtxRange:
    """Push/pop of one named range in the cugrad domain. Holds no per-call state, so one
    instance per name serves every call, nested or concurrent."""

    __slots__ = ("_push", "_pop", "_attributes")

    def __init__(self, domain, name: str):
        self._attributes = domain.get_event_attributes(message=name, color=_color_for(name))
        self._push = domain.push_range
        self._pop = domain.pop_range

    def __enter__(self):
        self._push(self._attributes)

    def __exit__(self, exc_type, exc, tb):
        self._pop()
        return False


def _nvtx_range(name: str, domain) -> _NvtxRange:
    rng = _nvtx_ranges.get(name)
    if rng is None:
        with _state_lock:
            rng = _nvtx_ranges.get(name)
            if rng is None:
                rng = _nvtx_ranges[name] = _NvtxRange(domain, name)
    return rng


# --------------------------------------------------------------------------- timing

class _TimedRange:
    """One timed call, created per call while a profile records.

    ``clock`` is "cpu" (perf_counter_ns) or "cuda" (CUDA events). A range's self time is
    its duration less the durations of the outermost same-clock ranges inside it: those
    whose nearest enclosing range on that clock it is, with ranges on the other clock in
    between or not (host and device durations cannot be subtracted from one another).
    """

    __slots__ = ("name", "clock", "nvtx", "profilers", "parent", "start", "end",
                 "child_ns", "children", "duration_ns")

    def __init__(self, name, clock, nvtx, profilers):
        self.name = name
        self.clock = clock
        self.nvtx = nvtx
        self.profilers = profilers
        self.child_ns = 0            # host clock: summed durations of same-clock children
        self.children = None         # device clock: child ranges, resolved at the end
        self.duration_ns = None

    def __enter__(self):
        if self.clock == "cuda":
            try:
                start = _cuda_event()
            except Exception:
                # No working CuPy/device: the op is about to say so in its own terms
                # (BackendUnavailableError, ...); profiling must not replace that error
                # with an ImportError or a CUDA error of its own. Timed on the host instead.
                self.clock = "cpu"
            else:
                self.children = []
        if self.nvtx is not None:
            self.nvtx.__enter__()
        self.parent = getattr(_tls, "top", None)
        _tls.top = self
        self.start = start if self.clock == "cuda" else perf_counter_ns()

    def __exit__(self, exc_type, exc, tb):
        end_ns = perf_counter_ns()
        parent = self.parent
        _tls.top = parent
        self.parent = None
        try:
            # The nearest enclosing range on this clock (still open: its parent link holds).
            while parent is not None and parent.clock != self.clock:
                parent = parent.parent
            if self.clock == "cuda":
                self.end = _cuda_event()
                if parent is not None:
                    parent.children.append(self)
            else:
                self.duration_ns = end_ns - self.start
                if parent is not None:
                    parent.child_ns += self.duration_ns
            for prof in self.profilers:
                prof._record(self)
        finally:
            if self.nvtx is not None:
                self.nvtx.__exit__(exc_type, exc, tb)
        return False


_cupy = None


def _cuda_event():
    """Record a timing event on CuPy's current stream (CuPy imported on first use)."""
    global _cupy
    if _cupy is None:
        import cupy
        _cupy = cupy
    event = _cupy.cuda.Event()
    event.record()
    return event


def _timed_range(name: str, device: str | None, domain, profilers: tuple):
    clock = device
    if clock is None:
        top = getattr(_tls, "top", None)
        clock = top.clock if top is not None else "cpu"
    elif clock != "cuda":
        clock = "cpu"
    nvtx = _nvtx_range(name, domain) if domain is not None else None
    return _TimedRange(name, clock, nvtx, profilers)


# --------------------------------------------------------------------------- entry point

def op_range(name: str, device: str | None = None):
    """Context manager around one op or layer call. ``device`` is "cpu" or "cuda" (or
    None: the device of the enclosing range)."""
    if _quiet:
        return _NO_RANGE
    # Read the shared state once: another thread may end a profile (or start one) between
    # two reads, and the decision must rest on one consistent view.
    domain, profilers = _domain, _profilers
    if domain is _UNRESOLVED:
        _resolve_nvtx()
        return op_range(name, device)
    if profilers:
        return _timed_range(name, device, domain, profilers)
    if domain is None:           # the last profile ended after the _quiet check
        return _NO_RANGE
    return _nvtx_range(name, domain)
