"""CUDA graphs: capture a whole training step once, replay it with one launch per step.

A small model's training step is bound by kernel-launch latency: a few dozen launches,
each costing microseconds of Python and driver time for microseconds of GPU work.
``capture_train_step`` records one step — forward, loss, backward, optimiser update —
into a CUDA graph with CuPy's stream capture; the ``TrainStepGraph`` it returns replays
it with two input copies and a single ``cudaGraphLaunch``::

    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(),
                                     optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                     x_example, y_example)
    for x, y in batches:            # each the shape, dtype and device of the examples
        loss = step(x, y)           # a 0-d device array, overwritten by the next step

What a graph freezes, and so what this module checks or documents:

* Addresses. The graph reads its inputs from static buffers (``step`` copies ``x`` and
  ``y`` in) and reads and writes the parameters, gradients, optimiser buffers and every
  intermediate where they lived during capture. Parameters must not be replaced afterwards
  (``load_state_dict`` replaces them, as does ``Module.to`` another device; copying into
  ``p.data`` in place is fine): a step after that raises rather than train arrays that are
  no longer the model's.
* Host values. Shapes and the optimiser's hyperparameters (learning rate, momentum, betas,
  eps, weight decay) are baked into the launches; a step after they changed raises.
  ``optim.SGD`` (any momentum and weight decay) and ``optim.Adam(..., capturable=True)``
  can be captured; a default Adam cannot (``NotImplementedError`` says why): its bias
  corrections come from a host-side step count, which a capturable Adam keeps on the
  device instead.
* Python. Replays run no Python code: a module's Python side effects happen at capture only.
* Host synchronisation. Nothing in the captured step may wait for the device. cugrad's
  checks that read array values (NaN targets, class-index ranges) are run on the example
  inputs before capture and skipped inside it; replayed inputs are not value-checked on the
  host. An out-of-range class index then gives a NaN loss and NaN gradients (the kernel
  never reads out of bounds), so the parameters turn NaN: check the loss.

The eager warm-up steps that precede capture (they compile the kernels and create the
optimiser's momentum buffers) are not training steps: ``capture_train_step`` snapshots the
parameters, gradients and optimiser state first and restores them, in place, afterwards.
The first ``step`` therefore continues from exactly the state the model was in.
"""

from __future__ import annotations

import contextlib
import numbers

from . import _backend, _trace
from ._backend import BackendUnavailableError
from ._checks import _to_backend_array, describe, device_value_checks_skipped
from .nn import Module, run_backward
from .optim import SGD, Adam, Optimizer

__all__ = ["capture_train_step", "TrainStepGraph"]

_OP = "capture_train_step"


def capture_train_step(model, loss_fn, optimizer, x_example, y_example, *, warmup=3):
    """Capture one training step of ``model`` as a CUDA graph; returns a ``TrainStepGraph``.

    The step is ``optimizer.zero_grad(); model.zero_grad(); loss = loss_fn(model(x), y);
    model.backward(loss_fn.backward(), input_grad=False); optimizer.step()`` (no gradient
    for the input batch; a model whose ``backward`` has no ``input_grad`` computes it and
    it is dropped). ``x_example`` and ``y_example`` (CUDA arrays) fix the shapes and dtypes
    every replay takes; they are validated by ``warmup`` (>= 1) eager steps run on a side
    stream before capture. Those steps do not count: parameters, gradients and optimiser
    state are restored afterwards.

    Raises ``BackendUnavailableError`` where the CUDA backend is unavailable (graphs need
    it; on the CPU run the step eagerly), ``ValueError`` for data or parameters on the CPU,
    ``NotImplementedError`` for an Adam without ``capturable=True`` or an optimiser other
    than SGD and Adam, and
    ``RuntimeError`` if the step cannot be captured (it synchronised the host) or a
    ``cugrad.profile()`` is recording.
    """
    _check_arguments(model, loss_fn, optimizer, warmup)
    if not _backend.cuda_available():
        raise BackendUnavailableError(
            f"{_OP}: CUDA graphs need the CUDA backend, which is unavailable here "
            f"({_backend.cuda_unavailable_reason()}); on the CPU, run the training step "
            "eagerly")
    x_example = _cuda_array("x_example", x_example)
    y_example = _cuda_array("y_example", y_example)
    labelled = _labelled_parameters(model, optimizer)
    for label, p in labelled:
        if p.device != "cuda":
            raise ValueError(f"{_OP}: {label} is on {p.device} ({describe(p.data)}); move "
                             "the model to the GPU with model.to('cuda') before building "
                             "the optimiser's state")
    if _trace._profilers:
        raise RuntimeError(f"{_OP}: a cugrad.profile() is recording, and its CUDA events "
                           "cannot be timed inside a graph capture; capture first, then "
                           "profile the replays")
    return TrainStepGraph._capture(model, loss_fn, optimizer, x_example, y_example,
                                   int(warmup), labelled)


class TrainStepGraph:
    """A captured training step; ``step(x, y)`` replays it and returns the loss.

    Built by ``capture_train_step``. Each call checks that ``x`` and ``y`` have the shape,
    dtype and device of the examples, copies them into the graph's static input buffers
    and launches the graph on the current CuPy stream (ordered after the caller's work on
    that stream; nothing waits for the device). It returns the loss as a 0-d device array
    that is a static buffer: the next call overwrites it, so copy it (``float(loss)``,
    ``loss.copy()``) to keep a value. Afterwards each parameter's ``.grad`` is the
    gradient of this step (also a buffer the next call overwrites), for the parameters the
    optimiser leaves alone too: a replayed step does not accumulate gradients over steps.
    Every replay uses the same buffers: calls on different streams must be ordered by the
    caller.
    """

    def __init__(self):
        raise TypeError("TrainStepGraph is built by cugrad.capture_train_step(...)")

    @classmethod
    def _capture(cls, model, loss_fn, optimizer, x_example, y_example, warmup, labelled):
        import cupy

        self = object.__new__(cls)
        self._cupy = cupy
        self._optimizer = optimizer
        # Memory allocated during capture comes from this private pool. The graph keeps
        # using those addresses on every replay, including blocks CuPy considers free once
        # capture ends (intermediates whose arrays were dropped). In the default pool such a
        # block could be handed to other code, which would then share memory with the graph.
        # Nothing else allocates from this pool, so its blocks stay the graph's for the
        # pool's lifetime; the arrays handed out (loss, gradients) keep it alive.
        self._pool = cupy.cuda.MemoryPool()
        # Capture needs a stream other than the legacy default stream; non-blocking, so
        # that work other code puts on the default stream cannot join (and break) the
        # capture. The replays run on whatever stream is current at each call.
        stream = cupy.cuda.Stream(non_blocking=True)
        stream.wait_event(cupy.cuda.get_current_stream().record())
        try:
            with stream:
                with cupy.cuda.using_allocator(self._pool.malloc):
                    self._x = cupy.empty(x_example.shape, x_example.dtype)
                    self._y = cupy.empty(y_example.shape, y_example.dtype)
                cupy.copyto(self._x, x_example)
                cupy.copyto(self._y, y_example)

                def train_step():
                    # Every parameter's gradient is this step's: the model's too, where the
                    # optimiser updates only some (a frozen layer's would otherwise
                    # accumulate over the warm-ups and every replay).
                    optimizer.zero_grad()
                    model.zero_grad()
                    loss = loss_fn(model(self._x), self._y)
                    run_backward(model, loss_fn.backward(), input_grad=False)
                    optimizer.step()
                    return loss

                with _state_restored(cupy, model, optimizer):
                    for _ in range(warmup):     # also validates the examples' values
                        train_step()
                    with cupy.cuda.using_allocator(self._pool.malloc), \
                            device_value_checks_skipped():
                        self._graph, loss = _capture_on(stream, train_step)
                    self._loss = self._pinned(loss)
                    self._grads = tuple((p, None if p.grad is None else self._pinned(p.grad))
                                        for p in model.parameters())
        finally:
            stream.synchronize()
            # The warm-up's and the snapshot's temporaries went back to the default pool,
            # which keeps freed blocks per stream: release this stream's, no one else can
            # reuse them.
            cupy.get_default_memory_pool().free_all_blocks(stream=stream)
        self._bound = tuple((label, p, p.data) for label, p in labelled)
        # the optimiser's state arrays too: the graph updates these ones (a device step
        # counter replaced by capturable switched off and on, say, would stop counting)
        self._state = tuple((f"{i}.{name}", optimizer.state[id(p)], name, value)
                            for i, p in enumerate(optimizer.params)
                            for name, value in optimizer.state[id(p)].items())
        self._hyper = _hyperparameters(optimizer)
        return self

    def _pinned(self, arr):
        """A view of ``arr`` that keeps ``arr`` and the private pool alive. An array from a
        CuPy pool holds only a weak reference to its pool, and (in some CuPy versions) a
        pool that is collected frees its memory, arrays still using it or not."""
        cupy = self._cupy
        memory = cupy.cuda.UnownedMemory(arr.data.ptr, arr.nbytes, (self._pool, arr),
                                         arr.device.id)
        return cupy.ndarray(arr.shape, arr.dtype, cupy.cuda.MemoryPointer(memory, 0),
                            strides=arr.strides)

    def __call__(self, x, y):
        """Replay the step on ``x`` and ``y``; returns the loss (a static device buffer)."""
        x = self._input("x", x, self._x)
        y = self._input("y", y, self._y)
        self._check_unchanged()
        self._cupy.copyto(self._x, x)
        self._cupy.copyto(self._y, y)
        with _trace.op_range("graph.replay", "cuda"):
            self._graph.launch()
        for p, grad in self._grads:
            p.grad = grad
        return self._loss

    def _input(self, name, value, static):
        arr = _to_backend_array("TrainStepGraph", name, value)
        if _backend.device_of(arr) != "cuda":
            raise ValueError(f"TrainStepGraph: argument {name!r} is on the CPU "
                             f"({describe(arr)}); the graph reads device memory: move it "
                             f"with cugrad.asarray({name}, device='cuda')")
        if arr.shape != static.shape:
            raise ValueError(f"TrainStepGraph: argument {name!r} has shape {arr.shape} "
                             f"({describe(arr)}), expected {static.shape} (the shape of "
                             f"{name}_example at capture; capture another graph for "
                             "another shape)")
        if arr.dtype != static.dtype:
            raise TypeError(f"TrainStepGraph: argument {name!r} has dtype {arr.dtype} "
                            f"({describe(arr)}), expected {static.dtype} (the dtype of "
                            f"{name}_example at capture)")
        if arr.device.id != static.device.id:
            raise ValueError(f"TrainStepGraph: argument {name!r} is on GPU {arr.device.id} "
                             f"but the graph was captured on GPU {static.device.id}")
        return arr

    def _check_unchanged(self):
        for label, p, data in self._bound:
            if p.data is not data:
                raise RuntimeError(f"TrainStepGraph: {label} was replaced since capture "
                                   "(load_state_dict or Module.to make new arrays); the "
                                   "graph would update the old ones: capture again")
        for key, state, name, value in self._state:
            if state.get(name) is not value:
                raise RuntimeError(f"TrainStepGraph: the optimiser's state {key!r} was "
                                   "replaced since capture (an eager step after capturable "
                                   "was switched, or after a dtype or device change, makes "
                                   "new arrays); the graph would update the old one: "
                                   "capture again")
        now = _hyperparameters(self._optimizer)
        if now != self._hyper:
            raise RuntimeError(f"TrainStepGraph: the optimiser's hyperparameters "
                               f"({', '.join(now)}) changed from {tuple(self._hyper.values())} "
                               f"to {tuple(now.values())} since "
                               "capture; the graph replays the values it captured: "
                               "capture again")

    def __repr__(self):
        return (f"TrainStepGraph(x {self._x.shape} {self._x.dtype}, "
                f"y {self._y.shape} {self._y.dtype}, {type(self._optimizer).__name__})")


# ------------------------------------------------------------------------------ helpers

def _check_arguments(model, loss_fn, optimizer, warmup) -> None:
    for name, value in (("model", model), ("loss_fn", loss_fn)):
        if not isinstance(value, Module):
            raise TypeError(f"{_OP}: {name} must be a cugrad.nn.Module, got "
                            f"{type(value).__name__}")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"{_OP}: optimizer must be a cugrad.optim.Optimizer, got "
                        f"{type(optimizer).__name__}")
    if isinstance(optimizer, Adam) and not optimizer.capturable:
        raise NotImplementedError(
            f"{_OP}: this Adam cannot be captured: its bias corrections 1 - beta^t come from "
            "the step count t on the host and are passed to the kernel as values, so a graph "
            "would replay step t's correction forever. Build it with "
            "optim.Adam(..., capturable=True), which counts steps on the device")
    if not isinstance(optimizer, (SGD, Adam)):
        raise NotImplementedError(
            f"{_OP}: only optim.SGD and optim.Adam(capturable=True) are known to be "
            "capture-safe (no host-side state that changes from step to step), got "
            f"{type(optimizer).__name__}")
    if isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 1:
        raise ValueError(f"{_OP}: warmup must be an integer >= 1 (the eager warm-up steps "
                         "compile the kernels and create the optimiser's buffers before "
                         f"capture), got {warmup!r}")


def _cuda_array(name, value):
    arr = _to_backend_array(_OP, name, value)
    if _backend.device_of(arr) != "cuda":
        raise ValueError(f"{_OP}: argument {name!r} is on the CPU ({describe(arr)}); a CUDA "
                         f"graph needs device data: cugrad.asarray({name}, device='cuda')")
    return arr


def _labelled_parameters(model, optimizer):
    """(label, Parameter) for the model's parameters, then any other optimised one."""
    labelled = [(f"parameter {name!r}", p) for name, p in model.named_parameters()]
    seen = {id(p) for _, p in labelled}
    labelled += [(f"optimizer.params[{i}]", p) for i, p in enumerate(optimizer.params)
                 if id(p) not in seen]
    return labelled


def _hyperparameters(optimizer) -> dict:
    """The host values a captured step baked in, by name: the optimiser's own
    ``_hyperparameters`` (lr, momentum and weight_decay for SGD; lr, betas, eps,
    weight_decay and capturable for Adam: the graph counts steps on the device, and an eager
    step without capturable would count on the host)."""
    return {name: getattr(optimizer, name) for name in type(optimizer)._hyperparameters}


@contextlib.contextmanager
def _state_restored(cupy, model, optimizer):
    """Whatever the block does, put the optimised parameters, the optimiser's state and
    every gradient back as they were. Arrays are restored in place (a graph captured in
    the block keeps their addresses); a state buffer the block created is zeroed, which is
    how the optimiser's buffers start (``Optimizer._buffer``)."""
    data = [(p, cupy.array(p.data)) for p in optimizer.params]
    state = {id(p): {k: cupy.array(v) for k, v in optimizer.state[id(p)].items()}
             for p in optimizer.params}
    grads = [(p, p.grad) for p in {id(p): p for p in
                                   [*model.parameters(), *optimizer.params]}.values()]
    try:
        yield
    finally:
        for p, saved in data:
            cupy.copyto(p.data, saved)
        for p in optimizer.params:
            for name, buf in optimizer.state[id(p)].items():
                if name in state[id(p)]:
                    cupy.copyto(buf, state[id(p)][name])
                else:
                    buf.fill(0)
        for p, grad in grads:
            p.grad = grad


def _capture_on(stream, train_step):
    """(graph, loss): ``train_step`` captured on ``stream``, which is current."""
    stream.begin_capture()
    try:
        loss = train_step()
    except BaseException as exc:
        try:
            stream.end_capture()
        except Exception:   # the error invalidated the capture; ending it only tidies up
            pass
        if not isinstance(exc, Exception):      # KeyboardInterrupt and the like
            raise
        raise RuntimeError(
            f"{_OP}: the training step failed during CUDA graph capture "
            f"({type(exc).__name__}: {exc}). A captured step must not wait for the device: "
            "no .item(), float(), bool() or .get() of a device array, no synchronize(), no "
            "host copies") from exc
    return stream.end_capture(), loss
