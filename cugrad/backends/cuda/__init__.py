"""The CUDA backend: our kernels (``kernels/*.cu``) compiled with NVRTC through CuPy.

Importing this package registers every op of ``cugrad._backend.OPS`` for "cuda"; it does
not import CuPy (the context imports it lazily, at the first launch).

    context.py   where kernels run: CupyContext (the GPU) or a test harness's context
    config.py    the table of tunables, launch configurations and kernel instantiations
    loader.py    reads the .cu sources (source checkout or installed package data)
    ops.py       one typed launcher per kernel family; the registered ops
    interop.py   zero-copy exchange with PyTorch and other GPU array libraries
    precompile.py  ``python -m cugrad compile``: every module compiled ahead of use
"""

from . import ops  # noqa: F401  (registers the ops)
from .context import Context, CupyContext, Kernel, KernelCompileError, current_context, use_context
from .ops import gemm_reference

__all__ = ["Context", "CupyContext", "Kernel", "KernelCompileError", "current_context",
           "gemm_reference", "use_context"]
