"""cugrad: neural-network layers trained with hand-written CUDA kernels, and the same API
on the CPU through NumPy."""

from ._backend import BackendUnavailableError, cuda_available, cuda_unavailable_reason

__version__ = "0.1.0"

__all__ = ["BackendUnavailableError", "cuda_available", "cuda_unavailable_reason"]
