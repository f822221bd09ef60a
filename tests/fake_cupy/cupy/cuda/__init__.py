"""cupy.cuda for the stand-in: one device, streams that run work in order or record it."""

from __future__ import annotations

import contextlib
import itertools
import time

from .. import (MemoryPointer, UnownedMemory, _Pool, _check_surface, _host_sync, _state,
                _strict, _submit, _sync_count)
from . import graph, profiler, runtime  # noqa: F401  (cupy.cuda.runtime etc.)

_SM_COUNT = 132   # an H100 SXM, what cugrad's launch plans assume without a GPU


def __getattr__(name):
    _check_surface("cupy.cuda", name)
    from .. import FakeCupyError
    raise FakeCupyError(f"fake cupy: cupy.cuda.{name} is not imitated")


class MemoryPool(_Pool):
    """cupy.cuda.MemoryPool(): counts the bytes of the live blocks it handed out."""

    __getattr__ = _strict("cupy.cuda.MemoryPool")

    def __init__(self, allocator=None):
        super().__init__()


class Device:
    """The one device, id 0 (another id is an error when used, as without that GPU)."""

    __getattr__ = _strict("cupy.cuda.Device")

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)

    def _check(self):
        if self.id != 0:
            raise runtime.CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    @property
    def attributes(self):
        self._check()
        return {"MultiProcessorCount": _SM_COUNT, "MaxThreadsPerBlock": 1024,
                "MaxSharedMemoryPerBlockOptin": 232448, "WarpSize": 32}

    @property
    def compute_capability(self):
        self._check()
        return "90"

    @property
    def mem_info(self):
        return (64 << 30, 80 << 30)

    def synchronize(self):
        self._check()
        _host_sync("Device.synchronize", Stream._capturing_streams)

    def use(self):
        self._check()

    def __enter__(self):
        self._check()
        return self

    def __exit__(self, *exc):
        return False

    def __int__(self):
        return self.id

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    def __hash__(self):
        return hash(("Device", self.id))

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


_ptrs = itertools.count(0x1000, 0x10)


class Stream:
    """A stream: work submitted while it is current runs at once, in order, or, between
    begin_capture and end_capture, is recorded into a Graph."""

    null: "Stream"
    __getattr__ = _strict("cupy.cuda.Stream")
    _capturing_streams: list = []

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=0):
        self.ptr = 0 if null else next(_ptrs)
        self.device_id = -1 if null else 0      # as CuPy's null stream reports
        self._invalidated = False
        self.is_non_blocking = bool(non_blocking)
        self.priority = priority
        self._capture = None

    def __enter__(self):
        _state.streams.append(self)
        return self

    def __exit__(self, *exc):
        _state.streams.pop()
        return False

    def use(self):
        _state.streams[:] = [self]
        return self

    @property
    def done(self):
        return True

    def synchronize(self):
        _host_sync("Stream.synchronize", [self])

    def record(self, event=None):
        event = Event() if event is None else event
        event.record(self)
        return event

    def wait_event(self, event):
        pass   # work runs in order: an event is always complete before later work

    def begin_capture(self, mode=None):
        if self.ptr == 0:
            raise RuntimeError("cannot capture on the null stream")
        if self._capture is not None:
            raise runtime.CUDARuntimeError("cudaErrorIllegalState: stream is already capturing")
        self._capture = []
        self._invalidated = False
        Stream._capturing_streams.append(self)

    def is_capturing(self):
        return self._capture is not None

    def end_capture(self):
        if self._capture is None:
            raise runtime.CUDARuntimeError("cudaErrorIllegalState: stream is not capturing")
        work, self._capture = self._capture, None
        Stream._capturing_streams.remove(self)
        if self._invalidated:   # something illegal happened during the capture
            raise runtime.CUDARuntimeError("cudaErrorStreamCaptureInvalidated: the capture was "
                                           "invalidated by an operation that is not permitted "
                                           "while capturing")
        return graph.Graph(work)

    def __eq__(self, other):
        return isinstance(other, Stream) and other.ptr == self.ptr

    def __hash__(self):
        return hash(("Stream", self.ptr))

    def __repr__(self):
        return f"<Stream {self.ptr:#x} (fake cupy)>"


Stream.null = Stream(null=True)


def get_current_stream(device_id=None):
    return _state.streams[-1] if _state.streams else Stream.null


class Event:
    """An event: its time is taken when the work before it has run (all work runs in order)."""

    __getattr__ = _strict("cupy.cuda.Event")

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.ptr = next(_ptrs)
        self._disable_timing = disable_timing
        self._time = None
        self._epoch = None     # synchronisations before it was recorded

    def record(self, stream=None):
        stream = get_current_stream() if stream is None else stream

        def stamp():
            self._time = time.perf_counter()
            self._epoch = _sync_count[0]
        if stream._capture is not None:
            stream._capture.append(stamp)
        else:
            stamp()

    def synchronize(self):
        _host_sync("Event.synchronize")

    @property
    def done(self):
        # all work runs at once, but CUDA says done only once the host has waited after it
        return self._epoch is not None and self._epoch < _sync_count[0]


def get_elapsed_time(start_event, end_event):
    for e in (start_event, end_event):
        if e._disable_timing:
            raise runtime.CUDARuntimeError("cudaErrorInvalidResourceHandle: timing disabled")
        if e._time is None:
            raise runtime.CUDARuntimeError("cudaErrorInvalidResourceHandle: event not recorded")
        # cudaEventElapsedTime does not wait: an event the host has not waited for since it
        # was recorded may not have happened yet
        if not e.done:
            raise runtime.CUDARuntimeError("cudaErrorNotReady: device not ready (no "
                                           "synchronisation after the event was recorded)")
    return (end_event._time - start_event._time) * 1e3


@contextlib.contextmanager
def using_allocator(allocator=None):
    _state.allocators.append(allocator)
    try:
        yield
    finally:
        _state.allocators.pop()


def set_allocator(allocator=None):
    _state.allocators[:] = [allocator] if allocator is not None else []


def is_available():
    return True


__all__ = ["Device", "Event", "MemoryPointer", "MemoryPool", "Stream", "UnownedMemory",
           "get_current_stream", "get_elapsed_time", "graph", "profiler", "runtime",
           "using_allocator", "set_allocator", "_submit"]
