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


# ---------------------------- from a mutation probe of _arrays.py and _backend.py (session 13)
# Each test below fails on a mutant that every other test let live.


def test_asarray_takes_a_dlpack_cpu_array():
    out = cugrad.asarray(_DLPackOnly(np.array([1.5, -2.0, 3.0])))
    assert type(out) is np.ndarray
    assert out.dtype == np.float64
    assert out.tolist() == [1.5, -2.0, 3.0]


def test_asarray_refuses_complex_numbers_held_as_objects():
    """An object array of complex numbers is complex data: a TypeError, not a silent drop of
    the imaginary part in the float32 cast."""
    with pytest.raises(TypeError, match=r"^asarray: argument 'x' must hold real numbers, got "
                                        r"numpy.ndarray of shape \(2,\), dtype object"):
        cugrad.asarray(np.array([1 + 2j, 3.0], dtype=object))


def test_asarray_keeps_the_largest_finite_value_of_a_narrower_float():
    """float32's own maximum, held in float64, stays finite in float32: not 'too large'."""
    top = float(np.finfo(np.float32).max)
    out = cugrad.asarray(np.array([top, -top]), dtype=np.float32)
    assert out.dtype == np.float32
    assert out.tolist() == [top, -top]


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.float16])
def test_asarray_of_an_empty_array_into_a_narrower_dtype(dtype):
    """No values, nothing to refuse: an empty float64 array (empty targets, say) converts."""
    out = cugrad.asarray(np.zeros((0, 3)), dtype=dtype)
    assert out.dtype == dtype and out.shape == (0, 3)
    assert cugrad.asarray([], dtype=dtype).shape == (0,)


class _ShapedThing:
    shape = (2,)          # a shape but no dtype: not an array

    def __repr__(self):
        return "<shaped thing>"


def test_asarray_names_a_non_array_by_its_type_and_repr():
    with pytest.raises(TypeError, match=r"^asarray: argument 'x' must hold real numbers, got "
                                        r"_ShapedThing <shaped thing>$"):
        cugrad.asarray(_ShapedThing())


@pytest.mark.parametrize("device", ["cpu", "CPU", "numpy", "Cpu"])
def test_device_names_are_case_insensitive(device):
    assert _backend.normalize_device(device) == "cpu"
    out = cugrad.asarray([1.0, 2.0], device=device)
    assert type(out) is np.ndarray and out.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "CUDA", "CUDA:0"])
def test_cuda_and_cuda_0_name_the_current_device(device):
    assert _backend.normalize_device(device) == "cuda"


def test_cuda_1_is_refused_by_name():
    with pytest.raises(ValueError, match=r"^cugrad: device 'cuda:1' is not supported; "
                                         r"expected 'cpu' or 'cuda'"):
        _backend.normalize_device("cuda:1")


def test_an_implementation_must_take_the_parameters_in_order():
    with pytest.raises(TypeError, match=r"^cugrad: probe_c implementation of 'activation' "
                                        r"has parameters \('x', 'name'\), expected "
                                        r"\('name', 'x'\)$"):
        _backend.implements("probe_c", "activation")(lambda x, name: None)
    assert "probe_c" not in _backend._IMPLS


def test_missing_ops_of_an_unregistered_backend_is_every_op():
    assert _backend.missing_ops("probe_c_nothing") == sorted(_backend.OPS)


def test_an_op_a_backend_lacks_is_a_not_implemented_error_naming_it():
    table = _backend._OpTable("probe_c", {})
    with pytest.raises(NotImplementedError, match=r"^cugrad: the probe_c backend does not "
                                                  r"implement op 'gemm'$"):
        table.gemm


def test_an_op_registered_again_replaces_the_one_a_table_has_read(monkeypatch):
    """A table keeps each op it has found as an attribute; registering the op again drops
    it, so the next call reads the new implementation (and another backend's is kept)."""
    impls, other = {}, {}
    monkeypatch.setitem(_backend._IMPLS, "probe_d", impls)
    monkeypatch.setitem(_backend._IMPLS, "probe_e", other)
    table, other_table = _backend._OpTable("probe_d", impls), _backend._OpTable("probe_e", other)

    def first(grad):
        return 1

    def second(grad):
        return 2

    _backend.implements("probe_d", "bias_grad")(first)
    _backend.implements("probe_e", "bias_grad")(first)
    assert table.bias_grad is first and "bias_grad" in vars(table)
    assert other_table.bias_grad is first
    _backend.implements("probe_d", "bias_grad")(second)
    assert table.bias_grad is second and other_table.bias_grad is first


def test_an_op_registered_again_during_a_lookup_is_not_cached_stale():
    """A lookup that read the old function while another thread registered a new one keeps
    no attribute (the registration's drop may have come before the store)."""
    def old(grad):
        return 1

    def new(grad):
        return 2

    class RegisteredMeanwhile(dict):    # the lookup reads old; by the re-check, new is in
        def __getitem__(self, op):
            return old

    table = _backend._OpTable("probe_f", RegisteredMeanwhile(bias_grad=new))
    assert table.bias_grad is old and "bias_grad" not in vars(table)


def test_cupy_seeing_no_device_is_reported_as_such(monkeypatch):
    """getDeviceCount() == 0: CUDA is unavailable because CuPy sees no device, said so (not
    an error from a probe kernel run on no device)."""
    import sys
    import types

    runtime = types.SimpleNamespace(getDeviceCount=lambda: 0)
    stub = types.ModuleType("cupy")
    stub.cuda = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "cupy", stub)
    monkeypatch.delenv(_backend.FORCE_CPU_ENV, raising=False)
    assert _backend._probe_cuda() == (False, "CuPy sees no CUDA device")


def test_an_array_type_from_a_cupy_submodule_is_a_cupy_array():
    """Real CuPy arrays are of type cupy._core.core.ndarray (the stand-in of tests/fake_cupy
    defines its ndarray in `cupy` itself, so it cannot show a check of the top module only)."""
    fake = type("ndarray", (), {"__module__": "cupy._core.core"})()
    assert _backend.is_cupy_array(fake) and _backend.device_of(fake) == "cuda"
    other = type("ndarray", (), {"__module__": "mylib.cupy_like"})()
    assert not _backend.is_cupy_array(other)


@pytest.mark.parametrize("dtype, fits, overflows", [
    (np.float16, 65519, 65520),                      # 65504 + 16: half a unit in the last place
    (np.float32, float(np.finfo(np.float32).max) * (1 + 2.0**-25),
     float(np.finfo(np.float32).max) * (1 + 2.0**-24)),
])
def test_asarray_refuses_only_values_that_round_to_infinity(dtype, fits, overflows):
    """A value a little past a narrower float's largest finite one rounds to it, as NumPy's
    cast gives: converted, not refused as 'it would become infinity'; from half a unit in the
    last place up it does become infinity and is refused. Integers and floats alike."""
    for src in (np.float64, np.int64) if dtype == np.float16 else (np.float64,):
        got = cugrad.asarray(np.array([fits, -fits], dtype=src), dtype=dtype)
        assert got.tolist() == [float(np.finfo(dtype).max), -float(np.finfo(dtype).max)]
        with pytest.raises(ValueError, match="it would become infinity"):
            cugrad.asarray(np.array([1.0, -overflows], dtype=src), dtype=dtype)


@pytest.mark.gpu
def test_cuda_0_is_refused_where_another_device_is_current(monkeypatch):
    """"cuda:0" meant the current CuPy device whichever it was: with device 1 current, arrays
    asked for on "cuda:0" went to device 1."""
    if not cugrad.cuda_available():
        pytest.skip(f"CUDA backend not tested: {cugrad.cuda_unavailable_reason()}")
    import cupy
    assert _backend.normalize_device("cuda:0") == "cuda"        # device 0 is current
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 1)
    with pytest.raises(ValueError, match=r"^cugrad: device 'cuda:0' is not the current CuPy "
                                         r"device \(1\); .*pass 'cuda'"):
        _backend.normalize_device("cuda:0")
    assert _backend.normalize_device("cuda") == "cuda"
