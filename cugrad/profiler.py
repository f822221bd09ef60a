"""``cugrad.profile()``: where does my step's time go, without Nsight.

    with cugrad.profile() as prof:
        loss = loss_fn(model(x), y)
        model.backward(loss_fn.backward(), input_grad=False); opt.step()
    print(prof)

records every op and layer range (``cugrad._trace.op_range``) entered in the block, in
every thread, and prints a table sorted by total time (an excerpt, 100 CPU steps of a
small MLP)::

    op                             calls      total    total %       self     self %       mean
    -------------------------------------------------------------------------------------------
    Sequential.backward              100    7.956ms     34.9 %    1.064ms      4.7 %   79.562us
    CrossEntropyLoss.forward         100    5.206ms     22.8 %  521.695us      2.3 %   52.061us
    cross_entropy                    100    4.684ms     20.5 %    4.684ms     20.5 %   46.844us
    linear.backward                  200    4.505ms     19.7 %    2.430ms     10.6 %   22.526us
    ...
    -------------------------------------------------------------------------------------------
    profiled host time: 22.819ms (sum of outermost ranges = sum of self)
    wall time of the block: 24.430ms; total includes nested ranges, self % sums to 100 %

How nested ranges are counted (the same convention as PyTorch's profiler):

* **total**: inclusive time of the range, children included. A layer's total contains
  its ops' totals, so totals of nested rows add up to more than the profiled time and the
  *total %* column does not sum to 100 %.
* **self**: total less the time of the ranges directly inside it (on its clock: a
  device range inside a host range inside a device range counts against the outer
  device range). Every instant of profiled time belongs to exactly one range's self
  time, so **self % sums to 100 %**:
  it is the column that answers "where does the time go".
* **profiled time**, the base of both percentages: the sum of the durations of the
  outermost ranges (equal to the sum of all self times). Time between ops (user code,
  data loading) is not in it; the footer gives the wall time of the block beside it.
* **mean**: total / calls.

Clocks: ranges on ``device="cpu"`` are timed on the host with ``time.perf_counter_ns``;
ranges on ``device="cuda"`` are timed on the GPU with a pair of CUDA events on CuPy's
current stream (device time, read when the block exits or when the results are read inside
it, which waits for the GPU; CuPy is imported at the first such range, never for a block of
CPU ops). A
range with ``device=None`` uses the clock of the range around it (the host clock at top
level). Host and device durations are never subtracted from one another or added into
one percentage: each clock gets its own rows, percentages and profiled time.

Outside a ``profile()`` block nothing is timed or recorded (``op_range`` returns a shared
no-op object). Blocks may nest and may be used from several threads; a range counts in
every block active when it was entered, if that block is still active when it exits.
"""

from __future__ import annotations

import numbers
import threading
import time
from dataclasses import dataclass

from . import _trace

__all__ = ["profile", "Profile", "OpStat"]

_SORT_KEYS = {
    "total": lambda s: (-s.total_ns, s.name),
    "self": lambda s: (-s.self_ns, s.name),
    "mean": lambda s: (-s.mean_ns, s.name),
    "calls": lambda s: (-s.calls, s.name),
    "name": lambda s: (s.name,),
}

_active_lock = threading.Lock()


@dataclass(frozen=True)
class OpStat:
    """Aggregate of one range name on one clock ("cpu": host time, "cuda": device time)."""

    name: str
    device: str
    calls: int
    total_ns: int
    self_ns: int
    total_pct: float   # total / profiled time of this clock, in percent
    self_pct: float    # self / profiled time of this clock, in percent (sums to 100)

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.calls


class Profile:
    """The object ``profile()`` yields; its ``str`` is the summary table."""

    def __init__(self, sort_by: str = "total"):
        self.sort_by = _check_sort_by("cugrad.profile", sort_by)
        self._lock = threading.Lock()
        self._active = False
        self._acc: dict[tuple[str, str], list[int]] = {}   # (name, clock) -> [calls, total, self]
        self._pending: list = []       # CUDA-timed ranges, resolved at exit
        self.wall_ns = 0               # wall time of the block
        self._t0 = None                # perf_counter_ns at __enter__

    # ---- recording (called by _trace for every range while active)
    def _record(self, rng) -> None:
        # _active is read under the lock that __exit__ clears it under: a device range is
        # either pending before the exit resolves the pending ones, or not recorded.
        with self._lock:
            if not self._active:
                return
            if rng.clock == "cuda":
                self._pending.append(rng)
            else:
                self._add(rng.name, "cpu", rng.duration_ns, rng.duration_ns - rng.child_ns)

    def _add(self, name: str, clock: str, total_ns: int, self_ns: int) -> None:
        acc = self._acc.get((name, clock))
        if acc is None:
            self._acc[(name, clock)] = [1, total_ns, self_ns]
        else:
            acc[0] += 1
            acc[1] += total_ns
            acc[2] += self_ns

    def _resolve_cuda(self) -> None:
        """Device-clock ranges ended so far into the rows (waits for the GPU to reach their
        end events): at exit, and inside the block when the results are read."""
        with self._lock:
            pending, self._pending = self._pending, []
        for rng in pending:
            total = _cuda_duration_ns(rng)
            children = sum(_cuda_duration_ns(child) for child in rng.children)
            with self._lock:
                self._add(rng.name, "cuda", total, total - children)

    # ---- context manager
    def __enter__(self) -> "Profile":
        with _active_lock:
            if self._active:
                raise RuntimeError("cugrad.profile: this profile is already recording")
            self._t0 = time.perf_counter_ns()
            self._active = True
            _trace._set_profilers(_trace._profilers + (self,))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        with _active_lock:
            if not self._active:
                raise RuntimeError("cugrad.profile: __exit__ called on a profile that is not "
                                   "recording (no matching __enter__); use it as "
                                   "`with cugrad.profile() as prof:`")
            self.wall_ns += time.perf_counter_ns() - self._t0
            with self._lock:
                self._active = False
            _trace._set_profilers(tuple(p for p in _trace._profilers if p is not self))
        self._resolve_cuda()
        return False

    # ---- results
    def stats(self, device: str | None = None) -> list[OpStat]:
        """One ``OpStat`` per (range name, clock), sorted by ``self.sort_by``; only the
        rows of one clock when ``device`` is "cpu" or "cuda"."""
        if device is not None:
            _check_clock("Profile.stats", device)
        return self._stats(self.sort_by, device)

    def _stats(self, sort_by: str, device: str | None) -> list[OpStat]:
        self._resolve_cuda()
        with self._lock:
            acc = {key: list(v) for key, v in self._acc.items()}
        profiled = self._profiled_ns(acc)
        rows = []
        for (name, clock), (calls, total, self_ns) in acc.items():
            if device is not None and clock != device:
                continue
            base = profiled[clock] or 1
            rows.append(OpStat(name, clock, calls, total, self_ns,
                               100.0 * total / base, 100.0 * self_ns / base))
        rows.sort(key=_SORT_KEYS[sort_by])
        return rows

    def __getitem__(self, name: str) -> OpStat:
        """The row of ``name`` (the host-clock row if it ran on both clocks)."""
        rows = [s for s in self.stats() if s.name == name]
        if not rows:
            raise KeyError(name)
        return min(rows, key=lambda s: s.device != "cpu")

    def __contains__(self, name: str) -> bool:
        self._resolve_cuda()
        with self._lock:
            return any(n == name for n, _ in self._acc)

    def profiled_ns(self, device: str = "cpu") -> int:
        """Sum of the durations of the outermost ranges on that clock (= sum of self)."""
        _check_clock("Profile.profiled_ns", device)
        self._resolve_cuda()
        with self._lock:
            acc = dict(self._acc)
        return self._profiled_ns(acc)[device]

    @staticmethod
    def _profiled_ns(acc) -> dict[str, int]:
        out = {"cpu": 0, "cuda": 0}
        for (_, clock), (_, _, self_ns) in acc.items():
            out[clock] += self_ns
        return out

    def table(self, sort_by: str | None = None, row_limit: int | None = None) -> str:
        """The summary table; ``sort_by``: total | self | mean | calls | name (default: the
        profile's). ``row_limit``: None for every row, else the first ``row_limit`` rows
        (0 keeps only the header and the footer); a negative limit is a ValueError (use
        None for all rows, not PyTorch's -1). The footer always covers every row."""
        sort_by = (self.sort_by if sort_by is None
                   else _check_sort_by("Profile.table", sort_by))
        if row_limit is not None:
            if isinstance(row_limit, bool) or not isinstance(row_limit, numbers.Integral):
                raise TypeError(f"Profile.table: row_limit must be None or an int, got "
                                f"{type(row_limit).__name__} {row_limit!r}")
            if row_limit < 0:
                raise ValueError(f"Profile.table: row_limit={row_limit} is negative; expected "
                                 "None (every row) or a count >= 0")
        rows = self._stats(sort_by, None)
        clocks = sorted({r.device for r in rows})
        if not rows:
            return "cugrad.profile: no op ran in the profiled block"
        if row_limit is not None:
            rows = rows[:int(row_limit)]
        show_device = len(clocks) > 1
        name_w = max([len("op")] + [len(r.name) for r in rows])
        head = (["op".ljust(name_w)] + (["device"] if show_device else [])
                + [f"{h:>9}" for h in ("calls", "total", "total %", "self", "self %", "mean")])
        lines = ["  ".join(head)]
        lines.append("-" * len(lines[0]))
        for r in rows:
            cells = ([r.name.ljust(name_w)] + ([f"{r.device:<6}"] if show_device else [])
                     + [f"{r.calls:>9d}", f"{_fmt_ns(r.total_ns):>9}",
                        f"{r.total_pct:>7.1f} %", f"{_fmt_ns(r.self_ns):>9}",
                        f"{r.self_pct:>7.1f} %", f"{_fmt_ns(r.mean_ns):>9}"])
            lines.append("  ".join(cells))
        lines.append("-" * len(lines[0]))
        for clock in clocks:
            what = "host time" if clock == "cpu" else "device time (CUDA events)"
            lines.append(f"profiled {what}: {_fmt_ns(self.profiled_ns(clock))} "
                         "(sum of outermost ranges = sum of self)")
        wall, running = self.wall_ns, ""
        if self._active:           # printed inside the block: the time so far
            wall += time.perf_counter_ns() - self._t0
            running = " so far (still recording)"
        lines.append(f"wall time of the block{running}: {_fmt_ns(wall)}; "
                     "total includes nested ranges, self % sums to 100 %")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        self._resolve_cuda()
        with self._lock:
            ops, n = len(self._acc), sum(v[0] for v in self._acc.values())
        return f"<cugrad.Profile: {ops} ops, {n} calls, active={self._active}>"


def _check_sort_by(where: str, sort_by) -> str:
    if not isinstance(sort_by, str) or sort_by not in _SORT_KEYS:
        raise ValueError(f"{where}: sort_by must be one of {sorted(_SORT_KEYS)}, got "
                         f"{sort_by!r}")
    return sort_by


def _check_clock(where: str, device) -> None:
    if not isinstance(device, str) or device not in ("cpu", "cuda"):
        raise ValueError(f"{where}: device must be \"cpu\" or \"cuda\", got {device!r}")


def _cuda_duration_ns(rng) -> int:
    if rng.duration_ns is None:
        import cupy
        rng.end.synchronize()
        rng.duration_ns = int(round(cupy.cuda.get_elapsed_time(rng.start, rng.end) * 1e6))
    return rng.duration_ns


def _fmt_ns(ns: float) -> str:
    """Three decimals in the largest unit that the rounded value reaches (999,999.7 ns is
    "1.000ms", not "1000.000us")."""
    for scale, unit in ((1e9, "s"), (1e6, "ms"), (1e3, "us")):
        text = f"{ns / scale:.3f}"
        if float(text) >= 1:
            return text + unit
    text = f"{ns:.0f}"
    return "1.000us" if text == "1000" else text + "ns"


def profile(sort_by: str = "total") -> Profile:
    """Record every cugrad op and layer call in a ``with`` block::

        with cugrad.profile() as prof:
            train_step()         # your code: a step, a loop, any cugrad calls
        print(prof)              # the table; prof.stats() / prof["linear.forward"] for data

    ``sort_by`` orders the table: "total" (inclusive time, the default), "self", "mean",
    "calls" or "name". See this module's docstring for how nested ranges are counted.
    """
    return Profile(sort_by)
