"""Where kernels run: the execution context of the CUDA backend's ops.

An op body obtains ``ctx = current_context()`` and uses only ``ctx.xp`` (array module),
``ctx.empty`` (output allocation), ``ctx.function(file, name_expression)`` (a launchable
kernel) and ``ctx.sm_count`` (streaming multiprocessors, for launch plans). The default
context is ``CupyContext``: the real GPU, with modules compiled by NVRTC through
``cupy.RawModule``. The CPU harness (tests/cuda_harness/) supplies a context
whose ``xp`` is NumPy and whose kernels are the same sources compiled by a host compiler;
``use_context`` installs it, so the very same op code runs on both.

Importing this module does not import CuPy.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from ..._backend import env_flag
from . import config
from .loader import read_source


class KernelCompileError(RuntimeError):
    """A kernel module failed to compile; the message shows file, options and compiler log."""

    def __init__(self, file: str, options: Sequence[str], log: str):
        self.file = file
        self.options = tuple(options)
        self.log = log
        super().__init__(f"cugrad: failed to compile kernels/{file} with options "
                         f"{' '.join(self.options)}\ncompiler log:\n{log}")


POISON_ENV = "CUGRAD_POISON_OUTPUTS"   # fill fresh outputs with NaN (tests)

_SCALAR_TYPES = (np.int32, np.int64, np.float32, np.float64)


def check_kernel_args(args: tuple, xp) -> None:
    """Kernel arguments are arrays of ``xp`` and explicit NumPy scalars, nothing else:
    a Python int or float would be passed with a guessed C type, None as a null pointer."""
    for i, arg in enumerate(args):
        if not isinstance(arg, (xp.ndarray, *_SCALAR_TYPES)):
            raise TypeError(f"cugrad: kernel argument {i} is {type(arg).__name__}; expected an "
                            f"{xp.__name__} array or numpy.int32/int64/float32/float64")


class Kernel:
    """A launchable kernel: ``kernel(grid, block, args, shared_mem=0)``."""

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple,
                 shared_mem: int = 0) -> None:
        raise NotImplementedError


class Context:
    """Abstract execution context (see the module docstring)."""

    xp: Any
    # SMs of the device the launches plan for; a context without a GPU plans for an H100 SXM.
    sm_count: int = 132

    def empty(self, shape, dtype):
        raise NotImplementedError

    def function(self, file: str, name_expression: str) -> Kernel:
        raise NotImplementedError


class _CupyKernel(Kernel):
    def __init__(self, fn, xp):
        self._fn = fn
        self._xp = xp

    def __call__(self, grid, block, args, shared_mem=0):
        check_kernel_args(args, self._xp)
        self._fn(tuple(grid), tuple(block), tuple(args), shared_mem=shared_mem)


class CupyContext(Context):
    """The GPU: modules compiled once per (file, options, names, device), cached, thread-safe.

    ``compile_count`` counts the compilations per (file, options, names, device) key, for tests
    and diagnostics: each key is compiled once however many threads ask at the same time.
    Each key has its own lock, so threads compiling different modules (a GEMM module takes
    seconds of NVRTC) do not wait for one another.
    """

    def __init__(self):
        self._lock = threading.Lock()           # guards the dictionaries, never a compile
        self._module_locks: dict[tuple, threading.Lock] = {}
        self._modules: dict[tuple, Any] = {}
        self._kernels: dict[tuple, _CupyKernel] = {}
        self.compile_count: collections.Counter = collections.Counter()
        self._sm_counts: dict[int, int] = {}

    @property
    def xp(self):
        import cupy
        return cupy

    @property
    def sm_count(self) -> int:
        cupy = self.xp
        device = cupy.cuda.Device()
        count = self._sm_counts.get(device.id)
        if count is None:
            count = self._sm_counts[device.id] = int(device.attributes["MultiProcessorCount"])
        return count

    def empty(self, shape, dtype):
        out = self.xp.empty(shape, dtype=dtype)
        if env_flag(POISON_ENV):
            out.fill(float("nan"))   # debugging aid: an output element a kernel misses shows
        return out

    def function(self, file: str, name_expression: str) -> Kernel:
        device = self.xp.cuda.Device().id
        key = (file, name_expression, device)
        kernel = self._kernels.get(key)
        if kernel is None:
            options, names = config.module_of(file, name_expression)
            module = self.module(file, read_source(file), options, names)
            kernel = _CupyKernel(module.get_function(name_expression), self.xp)
            with self._lock:
                self._kernels[key] = kernel
        return kernel

    def module(self, file: str, code: str, options: Sequence[str], name_expressions: Sequence[str]):
        """A compiled ``cupy.RawModule`` of ``code`` (labelled ``file`` in errors), cached per
        (file, options, name expressions, device): one file is several modules (gemm.cu has
        one per tile). Compiles eagerly so failures surface here, with the log."""
        cupy = self.xp
        key = (file, tuple(options), tuple(name_expressions), cupy.cuda.Device().id)
        module = self._modules.get(key)
        if module is not None:
            return module
        with self._lock:
            key_lock = self._module_locks.setdefault(key, threading.Lock())
        with key_lock:                   # one compile per key; other keys go on meanwhile
            module = self._modules.get(key)
            if module is None:
                module = cupy.RawModule(code=code, options=tuple(options),
                                        name_expressions=list(name_expressions))
                with self._lock:
                    self.compile_count[key] += 1
                try:
                    module.compile()
                except Exception as exc:
                    if type(exc).__name__ != "CompileException":
                        raise
                    raise KernelCompileError(file, options, str(exc)) from None
                with self._lock:
                    self._modules[key] = module
        return module


_default: CupyContext | None = None
_default_lock = threading.Lock()
_local = threading.local()


def current_context() -> Context:
    """The innermost ``use_context`` of this thread, else the process's CupyContext."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = CupyContext()
    return _default


@contextlib.contextmanager
def use_context(ctx: Context) -> Iterator[Context]:
    """Run the CUDA backend's ops of this thread in ``ctx`` (e.g. the CPU harness)."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(ctx)
    try:
        yield ctx
    finally:
        stack.pop()
