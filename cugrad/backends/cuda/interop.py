"""Zero-copy exchange with other GPU array libraries.

``to_cupy`` accepts anything exposing a CUDA ``__dlpack__`` (PyTorch, JAX, ...) or
``__cuda_array_interface__`` (Numba, ...) and returns a CuPy array over the same memory.
DLPack is preferred where an array has both (a PyTorch CUDA tensor): CuPy hands the producer
its current stream, and the producer orders its own pending work before it, so our kernels
never read a tensor that PyTorch is still writing on another stream (PyTorch's
``__cuda_array_interface__`` is version 2, without a stream: nothing would order the two).
Results go back with the consumer's own DLPack import, e.g. ``torch.from_dlpack(cupy_array)``
(``to_torch`` below), which hands CuPy the consumer's stream in the same way.
"""

from __future__ import annotations

from ..._backend import has_cuda_array_interface
from ..._checks import DLPACK_CUDA_DEVICES, dlpack_device_type


class ExportRefused(TypeError):
    """The array's own ``__cuda_array_interface__`` raised (PyTorch: a tensor that requires
    grad); the message is the exporter's, the exception its ``__cause__``."""


class InterfaceRefused(TypeError):
    """The array's ``__cuda_array_interface__`` describes what cugrad does not take: a mask
    (the ops would ignore it) or big-endian data; the message says which."""


class _Exporter:
    """``x`` as CuPy's ``from_dlpack`` sees it, keeping what ``x.__dlpack__`` raised: the
    exporter's refusal, told apart from CuPy's own errors (CuPy calls it twice when the first
    call's keywords are too new for the exporter: only an error that ends the import counts)."""

    def __init__(self, x):
        self._x = x
        self.raised = None

    def __dlpack_device__(self):
        return self._x.__dlpack_device__()

    def __dlpack__(self, *args, **kwargs):
        try:
            return self._x.__dlpack__(*args, **kwargs)
        except Exception as exc:
            self.raised = exc
            raise


def to_cupy(x):
    """A CuPy array sharing ``x``'s device memory (no copy), ordered after the producer's
    pending work where it speaks DLPack. Raises TypeError for host data, ``ExportRefused``
    (a TypeError) where the array refuses to export itself."""
    import cupy

    if isinstance(x, cupy.ndarray):
        return x
    device_type = dlpack_device_type(x)
    if device_type in DLPACK_CUDA_DEVICES:
        exporter = _Exporter(x)
        try:
            return cupy.from_dlpack(exporter)
        except Exception as exc:
            if exc is exporter.raised:
                raise ExportRefused(f"{type(exc).__name__}: {exc}") from exc
            raise
    if has_cuda_array_interface(x):
        try:
            iface = x.__cuda_array_interface__   # the exporter's refusal, told apart from CuPy's
        except Exception as exc:
            raise ExportRefused(f"{type(exc).__name__}: {exc}") from exc
        if isinstance(iface, dict):
            if iface.get("mask") is not None:
                raise InterfaceRefused("its __cuda_array_interface__ carries a mask, which "
                                       "cugrad's ops would ignore; fill the masked elements "
                                       "and pass the array without its mask")
            if str(iface.get("typestr", ""))[:1] == ">":
                raise InterfaceRefused(f"its __cuda_array_interface__ has big-endian data "
                                       f"(typestr {iface['typestr']!r}); expected "
                                       "little-endian float32 or float64")
        return cupy.asarray(x)           # wraps the pointer; no copy
    if device_type is not None:
        raise TypeError(f"cugrad: {type(x).__name__} lives on DLPack device type {device_type}, "
                        "not on a CUDA device; move it to the GPU or use the CPU backend")
    raise TypeError(f"cugrad: {type(x).__name__} exposes neither __cuda_array_interface__ nor "
                    "__dlpack__; it cannot be shared with CuPy without a copy")


def to_torch(x):
    """A PyTorch CUDA tensor sharing ``x``'s memory, through DLPack."""
    import torch

    return torch.from_dlpack(x)
