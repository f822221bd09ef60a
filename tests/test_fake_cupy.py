"""The CPU stand-in for CuPy (tests/fake_cupy): is it as strict as CuPy where it claims to be?

Two parts. The surface checks run in every test process: they read the stand-in's source
without importing it as ``cupy`` (that would switch the CUDA backend on for the whole run)
and check that every name it defines exists in ``surface.json``, the recorded names of the
real CuPy; where the real CuPy imports, the record is compared with it. The behaviour checks
need the stand-in imported as ``cupy`` and run under ``CUGRAD_FAKE_CUPY=1`` (``make
fake-gpu-test``), where the GPU-marked tests run on it too.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FAKE = Path(__file__).resolve().parent / "fake_cupy"
SURFACE = json.loads((FAKE / "surface.json").read_text())

# Attributes CuPy's Stream and Event set per instance (so not in the class's dir()):
# "ptr" and "device_id" are documented on cupy.cuda.Stream, "ptr" on cupy.cuda.Event.
INSTANCE_ATTRS = {"cupy.cuda.Stream": {"ptr", "device_id"}, "cupy.cuda.Event": {"ptr"}}

# module file -> (surface key of the module, {class name: surface key of the class})
MODULES = {
    "cupy/__init__.py": ("cupy", {"ndarray": "cupy.ndarray", "MemoryPointer":
                                  "cupy.cuda.MemoryPointer", "UnownedMemory":
                                  "cupy.cuda.UnownedMemory", "_Pool": "cupy.cuda.MemoryPool",
                                  "_Flags": "flags"}),
    "cupy/cuda/__init__.py": ("cupy.cuda", {"Stream": "cupy.cuda.Stream",
                                            "Event": "cupy.cuda.Event",
                                            "Device": "cupy.cuda.Device",
                                            "MemoryPool": "cupy.cuda.MemoryPool"}),
    "cupy/cuda/runtime.py": ("cupy.cuda.runtime", {}),
    "cupy/cuda/graph.py": (None, {"Graph": "cupy.cuda.graph.Graph"}),
    "cupy/_kernels.py": (None, {"RawModule": "cupy.RawModule", "RawKernel": "cupy.RawKernel"}),
    "cupy/random.py": ("cupy.random", {"RandomState": "cupy.random.RandomState"}),
    "cupy/linalg.py": ("cupy.linalg", {}),
}
# Names the stand-in adds on purpose: its own marker and error, and the harness's exception;
# __getattr__ is how it refuses (or forwards) the names it does not define.
OWN_NAMES = {"FAKE", "FakeCupyError", "SURFACE", "CompileException"}
HOOKS = {"__getattr__", "__slots__"}


def _defined(body) -> set:
    """Names a block of statements defines: functions, classes, assigned names."""
    names = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _public_defs(tree: ast.Module):
    """Top-level public functions/classes/assignments, and each class's public members."""
    top, classes = _defined(tree.body), {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members = _defined(node.body)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    for sub in ast.walk(item):
                        if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                                and isinstance(sub.value, ast.Name) and sub.value.id == "self"):
                            members.add(sub.attr)
            classes[node.name] = members
    return top, classes


def _is_public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("path", sorted(MODULES))
def test_every_name_the_stand_in_defines_exists_in_cupy(path):
    module_key, class_keys = MODULES[path]
    top, classes = _public_defs(ast.parse((FAKE / path).read_text()))
    unknown = []
    if module_key is not None:
        allowed = set(SURFACE[module_key]) | OWN_NAMES | {"annotations"}
        unknown += [f"{module_key}.{n}" for n in sorted(top)
                    if _is_public(n) and not n.startswith("__") and n not in allowed
                    and n not in classes]
        unknown += [f"{module_key}.{n}" for n in sorted(classes)
                    if _is_public(n) and n not in allowed and n not in class_keys]
    for cls, key in class_keys.items():
        allowed = set(SURFACE[key]) | INSTANCE_ATTRS.get(key, set())
        unknown += [f"{key}.{n}" for n in sorted(classes[cls])
                    if _is_public(n) and n not in allowed and n not in HOOKS]
    assert not unknown, (f"the stand-in defines names CuPy {SURFACE['cupy_version']} lacks "
                         f"(host code could come to rely on them): {unknown}")


def test_the_surface_record_knows_the_names_host_code_must_not_use():
    # The reason the record exists: session 2's GPU run failed 15 tests on `flags.writeable`.
    assert "writeable" not in SURFACE["flags"]
    assert {"c_contiguous", "f_contiguous", "owndata"} <= set(SURFACE["flags"])
    assert "__index__" not in SURFACE["cupy.ndarray"]
    assert {"get", "set", "__cuda_array_interface__", "__dlpack__"} <= set(SURFACE["cupy.ndarray"])


def _real_cupy_importable() -> bool:
    spec = importlib.util.find_spec("cupy")
    return spec is not None and not str(spec.origin or "").startswith(str(FAKE))


@pytest.mark.skipif(not _real_cupy_importable(), reason="the real CuPy is not importable here")
def test_the_record_matches_the_real_cupy():
    out = subprocess.run([sys.executable, str(FAKE / "record_surface.py")], capture_output=True,
                         text=True, check=True, cwd=str(FAKE.parent.parent)).stdout
    real = json.loads(out)
    if real["cupy_version"] != SURFACE["cupy_version"]:
        pytest.skip(f"CuPy {real['cupy_version']} here, the record is of "
                    f"{SURFACE['cupy_version']}: re-record with record_surface.py")
    assert real == SURFACE


@pytest.mark.skipif(not _real_cupy_importable(), reason="the real CuPy is not importable here")
def test_the_real_cupy_still_compiles_with_ftz_as_config_says():
    """config.BASE_OPTIONS names -ftz=true because CuPy appends it to every NVRTC compile
    (last wins): if a CuPy release stops, the GPU keeps subnormals and the option, MATH.md §7
    and the nvcc check must follow. Read from CuPy's source (no GPU needed)."""
    out = subprocess.run([sys.executable, "-c", (
        "import inspect, cupy.cuda.compiler as c; "
        "print(\"options += ('-ftz=true',)\" in inspect.getsource(c._compile_with_cache_cuda))")],
        capture_output=True, text=True, check=True, cwd=str(FAKE.parent.parent)).stdout
    assert out.strip() == "True"
    from cugrad.backends.cuda import config
    assert "-ftz=true" in config.BASE_OPTIONS


# --------------------------------------------------------------------------- behaviour

def _fake_cupy():
    try:
        import cupy
    except ImportError:
        pytest.skip("CuPy is not importable (run with CUGRAD_FAKE_CUPY=1 for the stand-in)")
    if not getattr(cupy, "FAKE", False):
        pytest.skip("the stand-in is not `cupy` in this process (run with CUGRAD_FAKE_CUPY=1)")
    return cupy


@pytest.fixture
def cp():
    return _fake_cupy()


fake_only = pytest.mark.fake_cupy


@fake_only
def test_device_arrays_do_not_become_numpy_arrays_by_accident(cp):
    x = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Unsupported type"):
        x + np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        cp.sum(np.ones(3))
    with pytest.raises(AttributeError):
        x.flags.writeable
    with pytest.raises(AttributeError):
        x.no_such_method()
    with pytest.raises(AttributeError):
        cp.cuda.Stream().no_such_attribute          # every stand-in class is as strict
    with pytest.raises(cp.FakeCupyError, match="not imitated"):
        x.data.copy_from_device_async               # CuPy has it; the stand-in says so
    assert x.flags.c_contiguous and x.T.flags.f_contiguous
    np.testing.assert_array_equal(x.get(), np.arange(6).reshape(2, 3))


@fake_only
def test_reductions_are_device_arrays_and_results_live_in_pool_memory(cp):
    x = cp.asarray(np.ones((3, 4), np.float64))
    s = x.sum()
    assert isinstance(s, cp.ndarray) and s.shape == () and float(s) == 12.0
    assert isinstance(cp.isfinite(x), cp.ndarray)
    assert isinstance(np.isfinite(x), cp.ndarray)      # NumPy's ufunc dispatches to cupy's
    assert float(cp.max(x)) == 1.0 and float(cp.sum(x)) == 12.0
    assert cp.ndarray((2, 3), np.float32, strides=(4, 8)).strides == (4, 8)   # uses sum()
    pool = cp.get_default_memory_pool()
    before = pool.used_bytes()
    y = cp.empty((1000,), np.float64)
    assert pool.used_bytes() - before == 8192 and y.data.ptr % 256 == 0   # 512-byte units
    del y
    assert pool.used_bytes() == before
    # A view outliving its array keeps the memory in use, as in CuPy (the stand-in released
    # it with the array: a leak through retained views passed the memory-growth tests).
    z = cp.empty((10, 100), np.float64)
    views = [z.T, z[3:5], z.reshape(100, 10)]
    del z
    while len(views) > 1:
        assert pool.used_bytes() - before == 8192
        del views[0]
    assert pool.used_bytes() - before == 8192
    views.clear()
    assert pool.used_bytes() == before


@fake_only
def test_a_view_shares_memory_and_pointer_arithmetic_holds(cp):
    x = cp.zeros((4, 5), np.float32)
    row = x[2]
    row.fill(3.0)
    assert float(x.sum()) == 15.0
    flat = x.reshape(-1)                         # a method's view is a view too
    flat[0] = 1.0
    x.T[1, 0] = 2.0
    assert float(x[0, 0]) == 1.0 and float(x[0, 1]) == 2.0
    assert row.data.ptr == x.data.ptr + 2 * 5 * 4
    mem = cp.cuda.UnownedMemory(x.data.ptr, x.nbytes, x)
    alias = cp.ndarray(x.shape, x.dtype, cp.cuda.MemoryPointer(mem, 0))
    alias[0, 0] = 7.0
    assert float(x[0, 0]) == 7.0


@fake_only
def test_capture_records_device_work_and_refuses_host_sync(cp):
    x = cp.zeros((3,), np.float32)
    src = cp.full((3,), 5.0, np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        cp.copyto(x, src)                        # recorded, not run
        x += 1
        y = x * 2                                # a new array, computed at each replay
        graph = stream.end_capture()
    assert x.get().tolist() == [0.0, 0.0, 0.0]   # nothing ran yet
    graph.launch()
    assert x.get().tolist() == [6.0, 6.0, 6.0] and y.get().tolist() == [12.0, 12.0, 12.0]
    src.fill(1.0)
    graph.launch()                               # the replay reads src as it is now
    assert x.get().tolist() == [2.0, 2.0, 2.0] and y.get().tolist() == [4.0, 4.0, 4.0]


@fake_only
@pytest.mark.parametrize("what", ["get", "float", "mask", "unique", "device_sync",
                                  "stream_sync"])
def test_a_host_sync_in_a_capture_raises_and_invalidates_it(cp, what):
    x = cp.ones((4,), np.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    sync = {"get": lambda: x.get(), "float": lambda: float(x[0]),
            "mask": lambda: x[x > 0], "unique": lambda: cp.unique(x),
            "device_sync": lambda: cp.cuda.Device().synchronize(),
            "stream_sync": lambda: stream.synchronize()}[what]
    with stream:
        stream.begin_capture()
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="CaptureUnsupported"):
            sync()
        with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="Invalidated"):
            stream.end_capture()


@fake_only
def test_host_data_in_a_capture_and_unwaited_events_are_refused(cp):
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(cp.FakeCupyError, match="host-to-device"):
            cp.asarray(np.ones(3, np.float32))
        stream.end_capture()
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    end.record()
    with pytest.raises(cp.cuda.runtime.CUDARuntimeError, match="NotReady"):
        cp.cuda.get_elapsed_time(start, end)     # the host has not waited for `end`
    end.synchronize()
    assert cp.cuda.get_elapsed_time(start, end) >= 0.0


@fake_only
def test_raw_kernels_run_on_the_harness_with_numpy_scalars_only(cp):
    code = r'''
extern "C" __global__ void axpy(const float* x, float* y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += a * x[i];
}'''
    kernel = cp.RawKernel(code, "axpy")
    x = cp.asarray(np.arange(70, dtype=np.float32))
    y = cp.ones(70, np.float32)
    kernel((3,), (32,), (x, y, np.float32(2), np.int32(70)))
    np.testing.assert_array_equal(y.get(), 1 + 2 * np.arange(70, dtype=np.float32))
    with pytest.raises(cp.FakeCupyError, match="Python float"):
        kernel((3,), (32,), (x, y, 2.0, np.int32(70)))
    with pytest.raises(TypeError, match="host array"):
        kernel((3,), (32,), (x.get(), y, np.float32(2), np.int32(70)))


class _TorchLikeCudaTensor:
    """A PyTorch CUDA tensor as the stand-in can have one: ``__cuda_array_interface__``
    version 2 (no stream, as PyTorch's) and a CUDA ``__dlpack__`` over the same memory (host
    memory standing for device memory: a CPU capsule of it). Records the stream each export
    was asked to order itself before; ``requires_grad`` refuses both, in PyTorch's words;
    ``old_dlpack``: a ``__dlpack__(stream)`` that knows no ``max_version``."""

    def __init__(self, host, requires_grad=False, old_dlpack=False):
        self._host, self.requires_grad, self.old_dlpack = host, requires_grad, old_dlpack
        self.shape, self.dtype, self.ndim = host.shape, host.dtype, host.ndim
        self.streams = []

    @property
    def __cuda_array_interface__(self):
        if self.requires_grad:
            raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires "
                               "grad. If gradients aren't needed, use var.detach()")
        iface = self._host.__array_interface__
        return {"shape": iface["shape"], "typestr": iface["typestr"],
                "data": (iface["data"][0], False), "strides": None, "version": 2}

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, *, stream=None, **newer):
        if self.old_dlpack and newer:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        if self.requires_grad:
            raise RuntimeError("Can't export tensors that require gradient, use tensor.detach()")
        self.streams.append(stream)
        return self._host.__dlpack__()


@fake_only
@pytest.mark.parametrize("old_dlpack", [False, True], ids=["dlpack-1.0", "old-dlpack"])
def test_a_torch_like_tensor_comes_in_through_dlpack_with_the_current_stream(cp, old_dlpack):
    """A tensor with both interfaces comes in through DLPack, so its producer is told the
    stream our kernels run on (the legacy default stream, 1, or the current one) and can order
    its own pending work first; __cuda_array_interface__ (PyTorch's has no stream) left that
    to chance. No copy; an exporter too old for max_version is asked again without it."""
    import cugrad
    import cugrad.functional as F
    host = np.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]], np.float32)
    t = _TorchLikeCudaTensor(host, old_dlpack=old_dlpack)
    x = cugrad.asarray(t)
    assert x.data.ptr == host.ctypes.data, "the import copied"
    assert t.streams == [1]
    s = cp.cuda.Stream()
    with s:
        y = F.relu(t)
    assert t.streams == [1, s.ptr]
    np.testing.assert_array_equal(y.get(), np.maximum(host, 0))


@fake_only
def test_a_torch_like_tensor_that_requires_grad_is_a_type_error_in_its_words(cp):
    import cugrad.functional as F
    t = _TorchLikeCudaTensor(np.ones((2, 3), np.float32), requires_grad=True)
    with pytest.raises(TypeError, match=r"^relu: argument 'x' is a GPU array .* refuses to "
                                        r"share its memory: RuntimeError: Can't export tensors "
                                        r"that require gradient") as err:
        F.relu(t)
    assert isinstance(err.value.__cause__, RuntimeError)


@fake_only
def test_a_parameter_of_a_torch_like_tensor_is_a_cupy_array_over_its_memory(cp):
    """Parameter(tensor) kept the tensor: the optimisers' buffers (cupy.zeros_like of it)
    then failed with 'Unsupported type'. It is now taken as F takes it, without a copy."""
    from cugrad import nn, optim
    host = np.ones((2, 3), np.float32)
    p = nn.Parameter(_TorchLikeCudaTensor(host))
    assert p.device == "cuda" and p.data.data.ptr == host.ctypes.data, "the import copied"
    for opt in (optim.SGD([p], lr=0.5, momentum=0.9), optim.Adam([p], lr=0.5)):
        p.grad = cp.ones((2, 3), np.float32)
        opt.step()
    assert (host < 1).all()                   # updated in the tensor's own memory


class _NumbaLikeDeviceArray:
    """A GPU array with ``__cuda_array_interface__`` alone (Numba's device arrays)."""

    def __init__(self, host):
        self._host, self.shape, self.dtype = host, host.shape, host.dtype

    @property
    def __cuda_array_interface__(self):
        iface = self._host.__array_interface__
        return {"shape": iface["shape"], "typestr": iface["typestr"],
                "data": (iface["data"][0], False), "strides": None, "version": 3}


@fake_only
def test_to_numpy_and_asarray_take_any_gpu_array(cp):
    """to_numpy of a GPU array that is not CuPy's (it was a 0-d object array), and a DLPack
    export from CUDA managed memory (device type 13: it was refused as not an array)."""
    import cugrad
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = cugrad.to_numpy(_NumbaLikeDeviceArray(host))
    assert type(got) is np.ndarray and got.dtype == np.float32
    np.testing.assert_array_equal(got, host)
    np.testing.assert_array_equal(cugrad.to_numpy(_TorchLikeCudaTensor(host)), host)

    managed = _TorchLikeCudaTensor(host)
    managed.__dlpack_device__ = lambda: (13, 0)
    x = cugrad.asarray(managed)
    assert x.data.ptr == host.ctypes.data and managed.streams == [1]


@fake_only
@pytest.mark.parametrize("what,change", [("mask", {"mask": 1}), ("big-endian", {"typestr": ">f4"})])
def test_a_masked_or_big_endian_interface_is_a_type_error_naming_the_argument(cp, what, change):
    """A ``__cuda_array_interface__`` with a mask (its elements would be read unmasked) or
    big-endian data: CuPy refuses both with a bare ValueError (which the stand-in imitates);
    fails unless the op and ``asarray`` raise TypeError naming the argument and the reason."""
    import cugrad
    import cugrad.functional as F
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    x = _NumbaLikeDeviceArray(host)
    iface = {**x.__cuda_array_interface__, **change}
    odd = type("OddInterface", (_NumbaLikeDeviceArray,),
               {"__cuda_array_interface__": property(lambda self: iface)})(host)
    with pytest.raises(TypeError, match=rf"relu: argument 'x' is a GPU array .*{what}"):
        F.relu(odd)
    with pytest.raises(TypeError, match=rf"argument 'x' is a GPU array .*{what}"):
        cugrad.asarray(odd)
    import cupy
    with pytest.raises(ValueError, match="masked|big-endian"):   # the stand-in as CuPy
        cupy.asarray(odd)


class _JaxLikeDeviceArray(_NumbaLikeDeviceArray):
    """A GPU array exported read-only, as JAX's immutable arrays are: ``data = (ptr, True)``
    in ``__cuda_array_interface__`` (CuPy drops that flag when it wraps the pointer)."""

    @property
    def __cuda_array_interface__(self):
        return {**super().__cuda_array_interface__, "data": (self._host.ctypes.data, True)}


@fake_only
def test_an_array_exported_read_only_is_read_but_never_updated_in_place(cp):
    """A read-only export is a fine input, but as the state an optimiser or accumulate writes
    it is a ValueError naming the argument, before anything is written (CuPy would have
    wrapped it writable and the update would have changed the owner's immutable array);
    through an optimiser, the step names the parameter and updates none."""
    import cugrad.functional as F
    from cugrad import nn, optim
    host = np.arange(6, dtype=np.float32).reshape(2, 3)
    frozen = _JaxLikeDeviceArray(host)
    np.testing.assert_array_equal(F.relu(frozen).get(), np.maximum(host, 0))
    ones = cp.ones((2, 3), np.float32)
    for call, name in ((lambda: F.accumulate(frozen, ones), "total"),
                       (lambda: F.sgd_step(frozen, ones, lr=0.1), "param"),
                       (lambda: F.adam_step(ones.copy(), ones, frozen, cp.zeros((2, 3), np.float32),
                                            step=1, lr=0.1), "exp_avg")):
        with pytest.raises(ValueError, match=rf"argument '{name}' is updated in place .* its "
                                             r"__cuda_array_interface__ marks it read-only"):
            call()
    np.testing.assert_array_equal(host, np.arange(6, dtype=np.float32).reshape(2, 3))
    param = cp.zeros((2, 3), np.float32)
    F.sgd_step(param, frozen, lr=1.0)                    # read-only grad: only read
    np.testing.assert_array_equal(param.get(), -host)
    p = nn.Parameter(frozen)
    p.grad = ones
    with pytest.raises(ValueError, match="argument 'param' .* read-only") as info:
        optim.SGD([p], lr=0.1).step()
    assert "no parameter was updated" in "".join(getattr(info.value, "__notes__", []))
    np.testing.assert_array_equal(host, np.arange(6, dtype=np.float32).reshape(2, 3))
