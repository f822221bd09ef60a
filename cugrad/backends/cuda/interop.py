"""Zero-copy exchange with other GPU array libraries.

``to_cupy`` accepts anything exposing ``__cuda_array_interface__`` (CuPy, Numba, PyTorch
CUDA tensors) or a CUDA ``__dlpack__`` (PyTorch, JAX, ...) and returns a CuPy array over the
same memory. Results go back with the consumer's own DLPack import, e.g.
``torch.from_dlpack(cupy_array)`` (``to_torch`` below).
"""

from __future__ import annotations

from ..._backend import has_cuda_array_interface

_DLPACK_CUDA_DEVICES = (2, 13)   # kDLCUDA, kDLCUDAManaged


class ExportRefused(TypeError):
    """The array's own ``__cuda_array_interface__`` raised (PyTorch: a tensor that requires
    grad); the message is the exporter's, the exception its ``__cause__``."""


def to_cupy(x):
    """A CuPy array sharing ``x``'s device memory (no copy). Raises TypeError for host data,
    ``ExportRefused`` (a TypeError) where the array refuses to export its interface."""
    import cupy

    if isinstance(x, cupy.ndarray):
        return x
    if has_cuda_array_interface(x):
        try:
            x.__cuda_array_interface__   # the exporter's refusal, told apart from CuPy's errors
        except Exception as exc:
            raise ExportRefused(f"{type(exc).__name__}: {exc}") from exc
        return cupy.asarray(x)           # wraps the pointer; no copy
    if hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__"):
        device_type = int(x.__dlpack_device__()[0])
        if device_type in _DLPACK_CUDA_DEVICES:
            return cupy.from_dlpack(x)
        raise TypeError(f"cugrad: {type(x).__name__} lives on DLPack device type {device_type}, "
                        "not on a CUDA device; move it to the GPU or use the CPU backend")
    raise TypeError(f"cugrad: {type(x).__name__} exposes neither __cuda_array_interface__ nor "
                    "__dlpack__; it cannot be shared with CuPy without a copy")


def to_torch(x):
    """A PyTorch CUDA tensor sharing ``x``'s memory, through DLPack."""
    import torch

    return torch.from_dlpack(x)
