"""Moving data between host, device and other libraries."""

from __future__ import annotations

import numpy as np

from . import _backend
from ._checks import _to_backend_array

DEFAULT_DTYPE = np.dtype(np.float32)


def asarray(x, *, device=None, dtype=None):
    """An array cugrad's ops accept: a NumPy array on "cpu", a CuPy array on "cuda".

    ``x`` may be a NumPy or CuPy array, a GPU array exposing ``__cuda_array_interface__``
    or DLPack (a PyTorch CUDA tensor: no copy), a DLPack CPU array, or a list/scalar.
    ``device`` defaults to where the data already lives. ``dtype`` defaults to the data's
    floating dtype, else float32. Copies only when the device or dtype changes.
    """
    if isinstance(x, np.ndarray) or _backend.is_gpu_array(x) or hasattr(x, "__dlpack__"):
        arr = _to_backend_array("asarray", "x", x)
    else:
        arr = np.asarray(x)
    if dtype is None:
        dtype = arr.dtype if arr.dtype.kind == "f" else DEFAULT_DTYPE
    target = _backend.device_of(arr) if device is None else _backend.normalize_device(device)
    if target == "cpu":
        return to_numpy(arr).astype(dtype, copy=False)
    return _backend.cuda_backend().xp.asarray(arr, dtype=dtype)


def to_numpy(x) -> np.ndarray:
    """A host NumPy array of ``x`` (a copy from the GPU, or ``x`` itself on the host)."""
    if isinstance(x, np.ndarray):
        return x
    if _backend.is_cupy_array(x):
        return x.get()
    return np.asarray(x)
