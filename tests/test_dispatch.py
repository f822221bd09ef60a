"""The backend follows the data; one registry, one signature per op."""

import os
import subprocess
import sys

import numpy as np
import pytest

import cugrad
import cugrad.functional as F
from cugrad import _backend


def test_numpy_backend_implements_every_op():
    _backend.numpy_backend()
    assert _backend.missing_ops("numpy") == []


def test_cuda_backend_registers_every_op_with_the_same_signatures():
    """Importing the CUDA backend needs no CuPy; its registrations are checked against OPS."""
    import cugrad.backends.cuda  # noqa: F401
    assert _backend.missing_ops("cuda") == []


def test_a_registration_with_another_signature_is_refused():
    with pytest.raises(TypeError, match="expected"):
        _backend.implements("numpy", "bias_grad")(lambda g: g)
    with pytest.raises(KeyError, match="unknown op"):
        _backend.implements("numpy", "conv2d")


class FakeGpuArray:
    """Stands for a GPU array from another library (it exposes the CUDA array interface)."""
    shape, dtype = (2, 2), np.dtype(np.float32)
    __cuda_array_interface__ = {"shape": (2, 2), "typestr": "<f4", "data": (0, False),
                                "version": 3}


def test_gpu_array_without_cuda_backend_is_a_clear_error():
    if cugrad.cuda_available():
        pytest.skip("a CUDA device works here")
    with pytest.raises(cugrad.BackendUnavailableError) as info:
        F.matmul(FakeGpuArray(), FakeGpuArray())
    msg = str(info.value)
    assert "'a'" in msg and "CUDA backend is unavailable" in msg
    assert cugrad.cuda_unavailable_reason() in msg


@pytest.mark.gpu
def test_mixing_devices_is_an_error(gpu):
    cupy = gpu
    with pytest.raises(ValueError, match="on cuda .* on cpu|on cpu .* on cuda"):
        F.matmul(np.ones((2, 2), np.float32), cupy.ones((2, 2), cupy.float32))


def _run(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=full_env, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_import_works_without_cupy():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "import numpy as np, cugrad, cugrad.functional as F\n"
            "assert not cugrad.cuda_available()\n"
            "print(cugrad.cuda_unavailable_reason())\n"
            "print(F.relu(np.array([-1.0, 2.0], np.float32)))")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert "CuPy is not importable" in out.stdout and "[0. 2.]" in out.stdout


def test_force_cpu_environment_variable():
    out = _run("import cugrad; print(cugrad.cuda_available()); "
               "print(cugrad.cuda_unavailable_reason())", CUGRAD_FORCE_CPU="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["False", "CUGRAD_FORCE_CPU=1 forces the CPU backend"]


def test_asarray_and_dlpack_on_the_host():
    x = cugrad.asarray([[1, 2], [3, 4]])
    assert x.dtype == np.float32 and isinstance(x, np.ndarray)
    y = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert cugrad.asarray(y) is y                         # no copy when nothing changes
    view = F.relu(_DLPackOnly(y))                          # a DLPack CPU producer
    assert np.array_equal(view, y)


class _DLPackOnly:
    def __init__(self, arr):
        self._arr = arr

    def __dlpack__(self, **kwargs):
        return self._arr.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._arr.__dlpack_device__()
