"""RawModule and RawKernel for the stand-in: NVRTC's place is taken by the CPU harness
(tests/cuda_harness), which compiles the same source with the host compiler; launches take
device arrays and NumPy scalars, like CuPy's, and go to the current stream."""

from __future__ import annotations

import contextlib
import sys
import threading
from pathlib import Path

import numpy as _np

from . import FakeCupyError, _check_surface, _source_digest, _submit, ndarray

_TESTS = Path(__file__).resolve().parents[2]
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

import cuda_harness as _ch  # noqa: E402

_lock = threading.Lock()
_sources: dict[str, Path] = {}


class CompileException(Exception):
    """What cupy.cuda.compiler.CompileException is to the caller: a failed compilation."""


def _source_file(code: str) -> Path:
    """Where the harness finds ``code``: the kernels/ file it came from (read through
    cugrad's loader, which inlines includes), so that the harness's build cache serves the
    stand-in too; else a file of its own under the harness build folder."""
    digest = _source_digest(code)
    with _lock:
        path = _sources.get(digest)
        if path is None:
            try:
                from cugrad.backends.cuda.loader import read_source
                for f in sorted(_ch.KERNELS_DIR.glob("*.cu")):
                    if read_source(f.name) == code:
                        path = f
                        break
            except ImportError:
                pass
            if path is None:
                folder = _ch.BUILD_DIR / "fake_cupy"
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / f"{digest}.cu"
                if not path.exists():
                    path.write_text(code)
            _sources[digest] = path
    return path


_DEFAULT_SMEM = 48 * 1024   # dynamic shared memory a launch gets without opting in


class _Function:
    def __init__(self, kernel, name):
        self._kernel = kernel
        self.name = name
        self.max_dynamic_shared_size_bytes = 0

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
        for what, v in (("grid", grid), ("block", block), ("args", args)):
            if not isinstance(v, tuple):   # CuPy's Function.__call__ is typed `tuple`
                raise TypeError(f"Argument '{what}' has incorrect type (expected tuple, got "
                                f"{type(v).__name__})")
        if shared_mem > max(_DEFAULT_SMEM, self.max_dynamic_shared_size_bytes):
            from .cuda.runtime import CUDARuntimeError
            raise CUDARuntimeError(f"cudaErrorInvalidValue: {shared_mem} bytes of dynamic shared "
                                   "memory without max_dynamic_shared_size_bytes set")
        host_args = []
        for i, a in enumerate(args):
            if isinstance(a, ndarray):
                host_args.append(a._a)
            elif isinstance(a, _np.ndarray):
                raise TypeError(f"Unsupported type <class 'numpy.ndarray'> (fake cupy: kernel "
                                f"argument {i} of {self.name} is a host array)")
            elif type(a) in (bool, int, float):
                raise FakeCupyError(f"fake cupy: kernel argument {i} of {self.name} is a Python "
                                    f"{type(a).__name__}; CuPy would guess its C type, the "
                                    "harness needs a NumPy scalar")
            else:
                host_args.append(a)
        kernel, shared = self._kernel, int(shared_mem)
        with stream if stream is not None else contextlib.nullcontext():
            _submit(lambda: kernel(grid, block, host_args, shared))


class RawModule:
    def __init__(self, code=None, path=None, options=(), backend="nvrtc",
                 translate_cucomplex=False, enable_cooperative_groups=False,
                 name_expressions=None, jitify=False):
        if code is None:
            code = Path(path).read_text()
        if not isinstance(options, tuple):   # typed `tuple options` in CuPy
            raise TypeError(f"Argument 'options' has incorrect type (expected tuple, got "
                            f"{type(options).__name__})")
        self.code = code
        self.options = options
        self.name_expressions = tuple(name_expressions or ())
        self._source = None
        self._ctx = None

    def __getattr__(self, name):
        _check_surface("cupy.RawModule", name)
        raise FakeCupyError(f"fake cupy: RawModule.{name} is not imitated")

    def compile(self, log_stream=None):
        """Build the module's runnable names now (the harness caches builds by content)."""
        if self._ctx is not None:
            return
        self._source = _source_file(self.code)
        ctx = _ch.CpuContext(instantiations=[(self._source.name, self.options,
                                              self.name_expressions)],
                             kernels_dir=self._source.parent)
        try:
            for spec in ctx.module_specs():
                _ch.build_module(spec)
        except _ch.BuildError as exc:
            raise CompileException(str(exc)) from None
        self._ctx = ctx

    def get_function(self, name):
        self.compile()
        if self.name_expressions and name not in self.name_expressions:
            raise KeyError(f"fake cupy: {name!r} is not among the module's name expressions")
        try:
            kernel = self._ctx.function(self._source.name, name)
        except _ch.GpuOnly as exc:
            raise FakeCupyError(f"fake cupy: {exc} (runs only on a GPU)") from None
        except _ch.BuildError as exc:
            raise CompileException(str(exc)) from None
        return _Function(kernel, name)


class RawKernel:
    def __init__(self, code, name, options=(), backend="nvrtc", translate_cucomplex=False,
                 enable_cooperative_groups=False, jitify=False):
        self.code = code
        self.name = name
        self.options = tuple(options)
        self._fn = None

    def __getattr__(self, name):
        _check_surface("cupy.RawKernel", name)
        raise FakeCupyError(f"fake cupy: RawKernel.{name} is not imitated")

    def compile(self, log_stream=None):
        if self._fn is None:
            module = RawModule(code=self.code, options=self.options, name_expressions=[self.name])
            self._fn = module.get_function(self.name)

    def __call__(self, grid, block, args, *, shared_mem=0):
        self.compile()
        self._fn(grid, block, args, shared_mem=shared_mem)


class ElementwiseKernel:
    def __init__(self, *args, **kwargs):
        raise FakeCupyError("fake cupy: ElementwiseKernel (CuPy's own code generator) is not "
                            "imitated")
