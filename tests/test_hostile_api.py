"""Hostile use of the layer, optimiser and functional API (found by trying to break it):
ndarray subclasses, aliased optimiser state, tied and repeated parameters and modules,
weights on disk, failed backwards, messages in the layer's terms, out-of-range scalars.
Each case is correct or a clear TypeError/ValueError; none changes state before it raises."""

from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import cugrad.functional as F
from cugrad import _checks, nn, optim
from cugrad._arrays import to_numpy

from conftest import randn, rel_err

f32 = np.float32


def _linear(rng_seed=0, n_in=5, n_out=3, **kw):
    return nn.Linear(n_in, n_out, rng=rng_seed, **kw)


# ------------------------------------------------------------------ ndarray subclasses

matrix_ok = pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")


@matrix_ok
def test_np_matrix_inputs_are_plain_arrays_to_the_ops(rng):
    a, b = randn(rng, 4, 3), randn(rng, 3, 5)
    out = F.matmul(np.matrix(a), np.matrix(b))
    assert type(out) is np.ndarray and rel_err(out, a.astype(np.float64) @ b) < 1e-5
    g = randn(rng, 6, 4)
    db = F.bias_grad(np.matrix(g))
    assert db.shape == (4,) and rel_err(db, g.astype(np.float64).sum(axis=0)) < 1e-5
    z = randn(rng, 3, 4)
    assert rel_err(F.softmax(np.matrix(z)), F.softmax(z)) == 0
    s = F.sigmoid(z)
    assert rel_err(F.sigmoid_backward(np.matrix(z), np.matrix(s)), F.sigmoid_backward(z, s)) == 0
    assert float(F.mse_loss(np.matrix(z), np.matrix(s))) == float(F.mse_loss(z, s))


def test_np_memmap_is_still_accepted_and_updated_in_place(tmp_path, rng):
    p = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=f32, shape=(3, 4))
    p[:] = 1.0
    F.sgd_step(p, np.full((3, 4), 2.0, f32), lr=0.25)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), np.full((3, 4), 0.5, f32))


@pytest.mark.parametrize("call", [
    lambda m: F.relu(m),
    lambda m: F.matmul(m, np.ones((3, 2), f32)),
    lambda m: F.mse_loss(np.ones((2, 3), f32), m),
    lambda m: F.adam_step(np.ones((2, 3), f32), m, np.zeros((2, 3), f32),
                          np.zeros((2, 3), f32), step=1, lr=0.1),
])
def test_masked_arrays_are_refused_not_unmasked(call):
    masked = np.ma.masked_invalid(np.array([[1, np.nan, 1], [1, 1, 1]], f32))
    with pytest.raises(TypeError, match=r"masked array.*filled"):
        call(masked)


def test_masked_class_indices_are_refused():
    target = np.ma.masked_array([0, 1, 9], mask=[0, 0, 1])
    with pytest.raises(TypeError, match="masked array"):
        F.cross_entropy(np.zeros((3, 4), f32), target)


# ---------------------------------------------------------------- aliased optimiser state

@pytest.mark.parametrize("which", ["momentum_buf_is_param", "grad_is_param", "buf_view"])
def test_sgd_state_sharing_memory_is_refused_before_any_update(backend, which):
    p = backend.put(np.ones((4, 3), f32))
    g = backend.put(np.full((4, 3), 0.5, f32))
    if which == "momentum_buf_is_param":
        args = (p, g, p)
    elif which == "grad_is_param":
        args = (p, p, backend.put(np.zeros((4, 3), f32)))
    else:
        big = backend.put(np.zeros((8, 3), f32))
        args = (big[2:6], g, big[4:8])      # overlapping rows
    before = [backend.get(a).copy() for a in args]
    with pytest.raises(ValueError, match="share memory"):
        F.sgd_step(*args, lr=0.1, momentum=0.9)
    for a, b in zip(args, before):
        np.testing.assert_array_equal(backend.get(a), b)


def test_adam_moments_sharing_memory_are_refused(backend):
    p, g = backend.put(np.ones((2, 3), f32)), backend.put(np.ones((2, 3), f32))
    m = backend.put(np.zeros((2, 3), f32))
    with pytest.raises(ValueError, match="'exp_avg' and 'exp_avg_sq' share memory"):
        F.adam_step(p, g, m, m, step=1, lr=0.1)
    np.testing.assert_array_equal(backend.get(m), 0)


def test_disjoint_halves_of_one_buffer_are_not_an_overlap():
    buf = np.zeros((2, 4, 3), f32)
    F.sgd_step(buf[0], np.ones((4, 3), f32), buf[1], lr=0.5, momentum=0.9)
    np.testing.assert_array_equal(buf[0], -0.5)
    np.testing.assert_array_equal(buf[1], 1.0)


def _update_candidates():
    """NumPy arrays an in-place update may be handed, the awkward ones included."""
    buf = np.zeros((8, 3), f32)
    read_only = np.ones((4, 3), f32)
    read_only.flags.writeable = False
    swapped = np.ones((4, 3), ">f4" if np.little_endian else "<f4")
    c = {"own": np.ones((4, 3), f32), "own2": np.ones((4, 3), f32),
         "own3": np.ones((4, 3), f32), "f64": np.ones((4, 3)), "other shape": np.ones((3, 4), f32),
         "view": buf[:4], "overlapping view": buf[2:6], "fortran": np.ones((4, 3), f32, order="F"),
         "transposed": np.ones((3, 4), f32).T, "read-only": read_only,
         "float16": np.ones((4, 3), np.float16), "int32": np.ones((4, 3), np.int32),
         "byte-swapped": swapped, "byte-swapped2": swapped.copy(),    # one dtype object
         "from bytes": np.frombuffer(bytearray(48), f32).reshape(4, 3),
         "matrix": np.matrix(np.ones((4, 3), f32)), "1-d": np.ones(12, f32), "None": None}
    return c


@matrix_ok
def test_the_in_place_fast_path_takes_only_what_the_full_checks_accept():
    """``plain_numpy_update`` lets an optimiser's arrays skip ``_inplace_args``'s checks one
    by one: every combination it lets through (param, grad, momentum_buf; one object may
    come twice) must be accepted as is by the full checks, and the plain case must take it."""
    c = _update_candidates()
    taken = 0
    for pn in c:
        for gn in c:
            for bn in c:
                arrays = {"param": c[pn], "grad": c[gn], "momentum_buf": c[bn]}
                if not _checks.plain_numpy_update(arrays, ("momentum_buf",)):
                    continue
                taken += 1
                _, arr = F._checked_inplace_args("sgd_step", dict(arrays), ("momentum_buf",))
                assert all(arr[k] is arrays[k] for k in arrays), (pn, gn, bn)
    # own, own2, own3 in distinct places (6 with a buffer, 6 without), and a read-only or
    # Fortran-order grad (only read) beside each param and each other buffer or None (18)
    assert taken == 6 + 6 + 18, taken
    plain = {"param": c["own"], "grad": c["transposed"]}      # grad is only read
    assert not _checks.plain_numpy_update(plain)               # but must own its memory
    F.sgd_step(c["own"], c["transposed"], lr=0.5)               # the full checks take it
    np.testing.assert_array_equal(c["own"], 0.5)


def test_device_extent_of_strided_arrays():
    # The CuPy side of the overlap check works on pointers, shapes and strides.
    def arr(ptr, shape, strides, itemsize=4):
        return SimpleNamespace(data=SimpleNamespace(ptr=ptr), shape=shape, strides=strides,
                               itemsize=itemsize, size=int(np.prod(shape)))
    assert _checks._extent(arr(1000, (4, 3), (12, 4))) == (1000, 1048)
    assert _checks._extent(arr(1000, (4,), (-4,))) == (988, 1004)     # a reversed view
    assert _checks._extent(arr(1000, (3, 2), (4, 12))) == (1000, 1024)  # a transposed view
    a, b = arr(1000, (4, 3), (12, 4)), arr(1048, (4, 3), (12, 4))
    _checks.check_no_overlap("op", {"a": a, "b": b})                    # touching, not sharing
    with pytest.raises(ValueError, match="'a' and 'c' share memory"):
        _checks.check_no_overlap("op", {"a": a, "b": None, "c": arr(1044, (1,), (4,))})


# --------------------------------------------------------------- tied and repeated things

def test_tied_weights_are_one_parameter_updated_once(rng):
    a, b = _linear(0, 4, 4), _linear(1, 4, 4)
    b.weight = a.weight
    model = nn.Sequential(a, b)
    assert len(model.parameters()) == 3
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.bias"]
    w0 = a.weight.data.copy()
    x = randn(rng, 6, 4)
    model(x)
    model.backward(np.ones((6, 4), f32))
    grad = a.weight.grad.copy()           # both uses accumulate into one gradient
    optim.SGD(model.parameters(), lr=0.1).step()
    np.testing.assert_allclose(a.weight.data, w0 - 0.1 * grad, rtol=1e-6)


class _Tied(nn.Module):
    """Two layers sharing one weight, and one layer held under two names, PyTorch-style."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _linear(0, 3, 3), _linear(1, 3, 3)
        self.b.weight = self.a.weight
        self.c = self.d = nn.ReLU()


def test_tied_weights_are_in_the_state_dict_under_each_name_and_load_from_any():
    """state_dict() listed a tied weight once ('a.weight'), where PyTorch lists 'b.weight' too:
    a PyTorch state dict of the same model did not load (unexpected key 'b.weight')."""
    model = _Tied()
    state = model.state_dict()
    assert list(state) == ["a.weight", "a.bias", "b.weight", "b.bias"]
    assert state["b.weight"] is state["a.weight"]
    other = _Tied()
    for p in other.parameters():
        p.data = p.data + 1
    first_names = {k: v for k, v in other.state_dict().items() if k != "b.weight"}
    for given in (other.state_dict(), first_names):           # all names, or the first only
        model.load_state_dict(given)
        assert model.b.weight is model.a.weight
        for k, v in other.state_dict().items():
            assert np.array_equal(model.state_dict()[k], v), k
    before = {k: v.copy() for k, v in model.state_dict().items()}
    clash = {**other.state_dict(), "b.weight": other.state_dict()["a.weight"] + 1}
    with pytest.raises(ValueError, match=r"keys 'a.weight' and 'b.weight' name one Parameter"):
        model.load_state_dict(clash)
    with pytest.raises(KeyError, match=r"missing keys \['a.weight'\], unexpected keys \[\]"):
        model.load_state_dict({k: v for k, v in first_names.items() if k != "a.weight"})
    for k, v in model.state_dict().items():                    # nothing changed
        assert np.array_equal(v, before[k]), k


def test_tied_weights_save_and_load(tmp_path):
    model, other = _Tied(), _Tied()
    for p in other.parameters():
        p.data = p.data * 2
    other.save(tmp_path / "w.npz")
    model.load(tmp_path / "w.npz")
    assert model.b.weight is model.a.weight
    assert all(np.array_equal(model.state_dict()[k], v) for k, v in other.state_dict().items())


def test_named_parameters_and_modules_take_pytorchs_arguments():
    """prefix="net" gave 'netweight' (PyTorch: 'net.weight'); named_modules and
    named_children listed a module held twice twice (PyTorch: once)."""
    model = _Tied()
    assert [n for n, _ in model.named_parameters()] == ["a.weight", "a.bias", "b.bias"]
    assert [n for n, _ in model.named_parameters(remove_duplicate=False)] == [
        "a.weight", "a.bias", "b.weight", "b.bias"]
    assert [n for n, _ in model.named_parameters(prefix="net")] == [
        "net.a.weight", "net.a.bias", "net.b.bias"]
    assert [n for n, _ in model.a.named_parameters("fc", False)] == ["fc.weight", "fc.bias"]
    assert list(model.named_parameters(recurse=False)) == []
    assert [n for n, _ in model.named_modules()] == ["", "a", "b", "c"]
    assert [n for n, _ in model.named_modules(remove_duplicate=False)] == ["", "a", "b", "c", "d"]
    assert [n for n, _ in model.named_modules(prefix="m")] == ["m", "m.a", "m.b", "m.c"]
    assert [n for n, _ in model.named_children()] == ["a", "b", "c"]
    assert len(list(model.children())) == 3 and len(list(model.modules())) == 4
    assert "(c): ReLU()" in repr(model) and "(d): ReLU()" in repr(model)   # as PyTorch's repr
    with pytest.raises(TypeError, match=r"^named_parameters: prefix must be a str, got int 3"):
        list(model.named_parameters(3))
    with pytest.raises(TypeError, match=r"^named_modules: remove_duplicate must be a bool"):
        list(model.named_modules(remove_duplicate="no"))


@pytest.mark.parametrize("owner", ["module", "optimiser"])
def test_zero_grad_takes_pytorchs_set_to_none(owner):
    """zero_grad(set_to_none=False), PyTorch's spelling, was a TypeError (no such argument)."""
    layer = _linear(0, 3, 2)
    clear = layer.zero_grad if owner == "module" else optim.SGD(layer.parameters(), 0.1).zero_grad
    layer.weight.grad = held = np.ones((2, 3), f32)
    clear(set_to_none=False)
    assert layer.weight.grad is held and (held == 0).all() and layer.bias.grad is None
    held[...] = 1
    layer.bias.grad = np.ones(2, f32)
    layer.bias.grad.flags.writeable = False
    bias = "bias" if owner == "module" else r"params\[1\]"
    with pytest.raises(ValueError, match=rf"zero_grad: {bias}\.grad is read-only .*use "
                                         r"zero_grad\(\)"):
        clear(set_to_none=False)
    assert (held == 1).all()                     # checked before any was written
    layer.bias.grad = [1.0, 2.0]                 # not an array: was a bare TypeError, after
    with pytest.raises(TypeError, match=rf"zero_grad: {bias}\.grad is builtins.list object, not an array"):
        clear(set_to_none=False)                 # the weight's gradient had been zeroed
    assert (held == 1).all()
    with pytest.raises(TypeError, match=r"zero_grad: set_to_none must be a bool"):
        clear(set_to_none=None)
    clear()
    assert layer.weight.grad is None and layer.bias.grad is None


def test_linear_dtype_none_is_float32_as_in_pytorch():
    """np.dtype(None) is float64: Linear(..., dtype=None) made a float64 layer (PyTorch's is
    float32, its default dtype), as device=None already meant the default device."""
    layer = nn.Linear(2, 3, dtype=None, device=None)
    assert layer.weight.dtype == np.float32 and layer.bias.dtype == np.float32
    assert layer.device == "cpu"


@pytest.mark.parametrize("opt", [lambda ps: optim.SGD(ps, lr=0.1), lambda ps: optim.Adam(ps)])
def test_the_same_parameter_twice_is_refused(opt):
    p = nn.Parameter(np.ones(3, f32))
    with pytest.raises(ValueError, match=r"params\[1\] is the same Parameter as params\[0\]"):
        opt([p, p])


@pytest.mark.parametrize("params", [_linear(), nn.Parameter(np.ones(3, f32))],
                         ids=["module", "parameter"])
def test_optimiser_given_a_module_or_a_parameter_says_what_to_pass(params):
    with pytest.raises(TypeError, match=r"model\.parameters\(\)"):
        optim.SGD(params, lr=0.1)


def test_a_module_instance_twice_in_a_model_is_refused():
    lin = _linear(0, 3, 3)
    with pytest.raises(ValueError, match="module at 1 .*same instance as the one at 0"):
        nn.Sequential(lin, lin)
    inner = nn.Sequential(_linear(1, 3, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"module at 1\.0 .*one at 0"):
        nn.Sequential(inner[0], inner)


def test_parameter_needs_an_array():
    with pytest.raises(TypeError, match=r"Parameter: data must be an array.*cugrad\.asarray"):
        nn.Parameter([1.0])


# -------------------------------------------------------------------------- weights

def test_load_state_dict_stores_own_c_contiguous_arrays(rng):
    lin = _linear(0, 3, 2)
    w = np.asfortranarray(randn(rng, 2, 3, dtype=np.float64))
    b = randn(rng, 2)
    lin.load_state_dict({"weight": w, "bias": b})
    assert lin.weight.data.flags.c_contiguous and lin.weight.data.dtype == f32
    assert lin.bias.data is not b and not np.shares_memory(lin.bias.data, b)
    b[:] = 7.0                                    # the caller's array is not the parameter
    assert not (lin.bias.data == 7.0).any()
    lin(randn(rng, 4, 3))
    lin.backward(np.ones((4, 2), f32))
    optim.SGD(lin.parameters(), lr=0.1).step()    # in place: needs a C-contiguous parameter


@matrix_ok
def test_load_state_dict_accepts_a_matrix_and_refuses_masks_and_non_mappings(rng):
    lin = _linear(0, 3, 2)
    w, b = randn(rng, 2, 3), randn(rng, 2)
    lin.load_state_dict({"weight": np.matrix(w), "bias": b})
    assert type(lin.weight.data) is np.ndarray
    np.testing.assert_array_equal(lin.weight.data, w)
    before = lin.weight.data.copy()
    with pytest.raises(TypeError, match="key 'weight' is a masked array"):
        lin.load_state_dict({"weight": np.ma.masked_array(w), "bias": b})
    with pytest.raises(TypeError, match="state must be a mapping"):
        lin.load_state_dict([("weight", w), ("bias", b)])
    np.testing.assert_array_equal(lin.weight.data, before)


def test_load_state_dict_refuses_values_that_overflow_the_parameter_dtype():
    lin = _linear(0, 3, 2)
    before = lin.weight.data.copy()
    w = np.zeros((2, 3))
    w[1, 2] = 1e300
    with pytest.raises(ValueError, match="key 'weight' holds values beyond float32's range"):
        lin.load_state_dict({"weight": w, "bias": np.zeros(2)})
    np.testing.assert_array_equal(lin.weight.data, before)
    w[1, 2] = np.inf                      # already infinite: loaded as it is
    lin.load_state_dict({"weight": w, "bias": np.zeros(2)})
    assert lin.weight.data[1, 2] == np.inf


class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.file = nn.Parameter(np.arange(3, dtype=f32))
        self.allow_pickle = nn.Parameter(np.arange(4, dtype=f32))


def test_save_round_trips_any_parameter_name(tmp_path):
    m = _Named()
    m.save(tmp_path / "w")                # exactly this name, no suffix added
    assert os.listdir(tmp_path) == ["w"]
    other = _Named()
    other.file.data[:] = 0
    other.allow_pickle.data[:] = 0
    other.load(tmp_path / "w")
    np.testing.assert_array_equal(other.file.data, np.arange(3))
    np.testing.assert_array_equal(other.allow_pickle.data, np.arange(4))


def test_save_creates_the_file_as_open_would(tmp_path):
    """Permissions from the umask, as numpy.savez's file would have (not owner-only)."""
    old = os.umask(0o022)
    try:
        _linear(0).save(tmp_path / "w.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "w.npz").stat().st_mode & 0o777 == 0o644


def test_a_failed_save_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "w.npz"
    _linear(0).save(path)
    good = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(np.lib.format, "write_array", broken)
    with pytest.raises(OSError, match="disk full"):
        _linear(1).save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["w.npz"]


def test_load_of_a_single_npy_is_a_clear_error(tmp_path):
    np.save(tmp_path / "x.npy", np.ones(3))
    lin = _linear(0)
    before = lin.weight.data.copy()
    with pytest.raises(ValueError, match=r"x\.npy.*not an \.npz archive"):
        lin.load(tmp_path / "x.npy")
    np.testing.assert_array_equal(lin.weight.data, before)


# ------------------------------------------------------------------ forward / backward

def test_linear_dtype_mismatch_names_the_input_and_the_layer():
    lin = _linear(0, 3, 2)
    with pytest.raises(TypeError, match=r"Linear\.forward: argument 'x' has dtype float64 .*"
                                        r"layer's parameters are float32"):
        lin(np.ones((4, 3)))
    model = nn.Sequential(_linear(0, 3, 2), nn.ReLU(), _linear(1, 2, 2))
    model(np.ones((4, 3), f32))
    with pytest.raises(TypeError, match=r"2:Linear\.backward: argument 'grad_out' has dtype "
                                        r"float64"):
        model.backward(np.ones((4, 2)))


def test_linear_backward_names_grad_out_and_the_shape_it_wanted():
    """Fails if a wrong-shaped grad_out to a layer is reported as F.linear_backward's
    'grad_y' (a name the layer's user never wrote) or as a shape of another argument."""
    model = nn.Sequential(_linear(0, 3, 2), nn.ReLU(), _linear(1, 2, 5))
    model(np.ones((4, 3), f32))
    with pytest.raises(ValueError, match=r"^2:Linear\.backward: argument 'grad_out' is "
                                         r"numpy\.ndarray of shape \(4, 2\).*expected shape "
                                         r"\(4, 5\) \(the forward's batch of 4 rows, "
                                         r"out_features 5\)"):
        model.backward(np.ones((4, 2), f32))
    model.backward(np.ones((4, 5), f32))        # nothing was consumed by the failed call


def test_a_failed_backward_can_be_retried(rng):
    lin = _linear(0, 3, 4)
    x = randn(rng, 5, 3)
    lin(x)
    with pytest.raises(ValueError, match="'grad_out'"):
        lin.backward(np.ones((5, 3), f32))
    assert lin.weight.grad is None
    g = randn(rng, 5, 4)
    gx = lin.backward(g)
    ref = g.astype(np.float64) @ lin.weight.data
    assert rel_err(gx, ref) < 1e-5
    with pytest.raises(RuntimeError, match="only once per forward"):
        lin.backward(g)


@pytest.mark.parametrize("bad", ["bias", "weight"])
def test_a_backward_that_cannot_accumulate_changes_no_gradient(rng, bad):
    """A .grad that the new gradient cannot be added to (here float64 in a float32 layer) is
    found before either gradient is added: the error names it, no .grad changes, and the
    retry after mending it counts each gradient once."""
    lin = _linear(0, 4, 3)
    x, g = randn(rng, 5, 4), randn(rng, 5, 3)
    lin(x)
    held = np.zeros((3, 4) if bad == "weight" else 3)        # float64
    getattr(lin, bad).grad = held
    with pytest.raises(TypeError, match=rf"^Linear\.backward: {bad}\.grad holds numpy.ndarray of "
                                        r"shape .*, dtype float64, on cpu but the gradient to "
                                        r"add to it is .* dtype float32"):
        lin.backward(g)
    other = "weight" if bad == "bias" else "bias"
    assert getattr(lin, other).grad is None and getattr(lin, bad).grad is held
    assert not held.any()
    getattr(lin, bad).grad = None
    lin.backward(g)
    ref_w = g.astype(np.float64).T @ x
    assert rel_err(lin.weight.grad, ref_w) < 1e-5
    assert rel_err(lin.bias.grad, g.astype(np.float64).sum(axis=0)) < 1e-5


def test_a_failed_sequential_forward_leaves_nothing_to_differentiate(rng):
    """Layer 0 saw the failed batch, layer 2 the previous one: a backward would mix the
    two. After a failed forward every layer has nothing saved, so backward raises."""
    class NoNaN(nn.Module):
        def forward(self, x):
            if np.isnan(x).any():
                raise ValueError("NaN input")
            self._save(x.shape)
            return x

        def backward(self, g, *, input_grad=True):
            self._take_saved()
            return g

    inner = nn.Sequential(_linear(2, 3, 3))
    model = nn.Sequential(_linear(0, 4, 3), inner, NoNaN(), _linear(1, 3, 2))
    x = randn(rng, 5, 4)
    model(x)
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN input"):
        model(bad)
    with pytest.raises(RuntimeError, match="nothing saved to differentiate"):
        model.backward(np.ones((5, 2), f32))
    assert all(p.grad is None for p in model.parameters())
    model(x)                                   # the next forward saves again
    model.backward(np.ones((5, 2), f32))
    assert np.isfinite(model[0].weight.grad).all()


def test_linear_bias_must_be_a_bool():
    with pytest.raises(TypeError, match=r"^Linear: bias must be a bool, got str 'no'"):
        nn.Linear(3, 2, bias="no")


def test_an_empty_sequential_checks_the_gradient_it_passes():
    with pytest.raises(TypeError, match=r"Sequential\.backward: argument 'grad_out' must be"):
        nn.Sequential().backward([1.0, 2.0])
    g = np.ones((2, 3), f32)
    assert nn.Sequential().backward(g) is g
    assert nn.Sequential().backward(g, input_grad=False) is None


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_sequential_says_which_layer_failed():
    model = nn.Sequential(_linear(0, 3, 4), nn.ReLU(), _linear(1, 5, 2))
    with pytest.raises(ValueError) as info:
        model(np.ones((2, 3), f32))
    assert any("Sequential layer 2" in note for note in info.value.__notes__)


@pytest.mark.parametrize("layer", [nn.ReLU(), nn.Sigmoid(), nn.Tanh(),
                                   nn.Sequential(nn.ReLU())], ids=repr)
def test_input_grad_must_be_a_bool(layer):
    layer(np.ones((2, 3), f32))
    with pytest.raises(TypeError, match="input_grad must be a bool"):
        layer.backward(np.ones((2, 3), f32), input_grad="no")


@pytest.mark.parametrize("kwargs, pieces", [
    ({"rng": 1.5}, ["rng", "float"]), ({"rng": "seed"}, ["rng", "str"]),
    ({"rng": -1}, ["rng", "-1"]), ({"dtype": "banana"}, ["dtype", "banana"]),
])
def test_linear_constructor_arguments_are_named(kwargs, pieces):
    with pytest.raises(TypeError) as info:
        nn.Linear(3, 2, **kwargs)
    assert all(p in str(info.value) for p in pieces), str(info.value)


# ------------------------------------------------------------------------ scalars

def test_huge_integer_hyperparameters_are_a_value_error():
    with pytest.raises(ValueError, match=r"lr=1000.* is out of range"):
        optim.SGD([nn.Parameter(np.ones(3, f32))], lr=10**400)


def test_adam_step_out_of_range_changes_nothing():
    p, g = np.ones(3, f32), np.ones(3, f32)
    m, v = np.zeros(3, f32), np.zeros(3, f32)
    with pytest.raises(ValueError, match=r"step must be an integer in \[1, 2\*\*63 - 1\]"):
        F.adam_step(p, g, m, v, step=10**400, lr=0.1)
    counter = np.array(-1, dtype=np.int64)
    with pytest.raises(ValueError, match=r"step counter holds -1, expected .* >= 0"):
        F.adam_step(p, g, m, v, step=counter, lr=0.1)
    assert (m == 0).all() and (v == 0).all() and (p == 1).all() and int(counter) == -1
    F.adam_step(p, g, m, v, step=2**63 - 1, lr=0.1)     # the largest step is fine
    assert np.isfinite(p).all()


def test_a_step_counter_stops_at_the_largest_int64():
    """A counter at 2**63 - 1 was refused (it would have wrapped, and the GPU's kernel wrapped
    it to t = -2**63, whose bias corrections are NaN); it now stays there, where both bias
    corrections are 1 in float64: the same update as step=2**63 - 1 given as an int."""
    rng = np.random.default_rng(7)
    p, g = rng.standard_normal(5), rng.standard_normal(5)
    for start in (2**63 - 2, 2**63 - 1):
        counter = np.array(start, dtype=np.int64)
        ours, by_int = p.copy(), p.copy()
        m, v, m2, v2 = (np.zeros(5) for _ in range(4))
        for _ in range(2):
            F.adam_step(ours, g, m, v, step=counter, lr=0.1)
            F.adam_step(by_int, g, m2, v2, step=2**63 - 1, lr=0.1)
            assert int(counter) == 2**63 - 1
        assert np.array_equal(ours, by_int) and np.isfinite(ours).all()


@pytest.mark.parametrize("target", [np.zeros((4, 1), np.int64), np.array(0)],
                         ids=["N-by-1", "0-d"])
def test_integer_target_of_the_wrong_shape_says_shape(target):
    with pytest.raises(ValueError, match=r"must be 1-D, one per row of logits \(N,\)"):
        F.cross_entropy(np.zeros((4, 3), f32), target)


def test_results_never_alias_inputs(rng):
    x = randn(rng, 3, 4)
    for out in (F.relu(x), F.sigmoid(x), F.softmax(x), F.matmul(x, x, trans_b=True)):
        assert not np.shares_memory(to_numpy(out), x)


# ------------------------------------------------------------- None for a required array

def _none_cases():
    """(op, name of the argument given None, call with that argument None): array
    arguments of every public op that have no default of None (linear_backward's ``out``
    with an activation has its own message: test_functional)."""
    m, v, i = np.ones((2, 3), f32), np.ones(3, f32), np.array([0, 2])
    w = np.ones((3, 3), f32)
    cases = [
        ("matmul", "a", lambda n: F.matmul(n, m.T)), ("matmul", "b", lambda n: F.matmul(m, n)),
        ("matmul_backward", "grad_c", lambda n: F.matmul_backward(n, m, w)),
        ("matmul_backward", "b", lambda n: F.matmul_backward(m, m, n)),
        ("linear", "x", lambda n: F.linear(n, w, v)), ("linear", "weight", lambda n: F.linear(m, n)),
        ("linear_backward", "grad_y", lambda n: F.linear_backward(n, m, w)),
        ("linear_backward", "x", lambda n: F.linear_backward(m, n, w)),
        ("bias_grad", "grad_y", lambda n: F.bias_grad(n)),
        ("log_softmax", "x", lambda n: F.log_softmax(n)),
        ("tanh_backward", "grad_out", lambda n: F.tanh_backward(n, m)),
        ("sigmoid_backward", "out", lambda n: F.sigmoid_backward(m, n)),
        ("mse_loss_backward", "pred", lambda n: F.mse_loss_backward(n, m)),
        ("cross_entropy", "logits", lambda n: F.cross_entropy(n, i)),
        ("cross_entropy_backward", "target", lambda n: F.cross_entropy_backward(m, n)),
        ("accumulate", "total", lambda n: F.accumulate(n, m)),
        ("sgd_step", "grad", lambda n: F.sgd_step(m.copy(), n, lr=0.1)),
        ("adam_step", "exp_avg_sq", lambda n: F.adam_step(m.copy(), m, m * 0, n, step=1,
                                                          lr=0.1)),
    ]
    return cases


@pytest.mark.parametrize("op, name, call", _none_cases(),
                         ids=lambda c: c if isinstance(c, str) else "")
def test_none_for_a_required_array_names_the_argument(op, name, call):
    """None where an array is required is a TypeError naming the op and the argument (it
    was an AttributeError, an IndexError or NumPy's object-dtype error from inside)."""
    with pytest.raises(TypeError, match=rf"^{op}: argument {name!r} is required: expected a "
                                        r"NumPy or CuPy array, got None$"):
        call(None)


def test_the_optional_arrays_may_be_none(rng):
    x, w = randn(rng, 4, 3), randn(rng, 2, 3)
    assert F.linear(x, w, None).shape == (4, 2)
    gx, gw, gb = F.linear_backward(randn(rng, 4, 2), x, w, bias=False, out=None)
    assert gb is None and gw.shape == (2, 3)
    p = np.ones((2, 3), f32)
    F.sgd_step(p, np.ones((2, 3), f32), None, lr=0.5)
    np.testing.assert_array_equal(p, np.full((2, 3), 0.5, f32))


def test_linear_backward_with_an_activation_needs_the_saved_output(rng):
    with pytest.raises(ValueError, match=r"^linear_backward: activation='relu' needs out=, the "
                                         r"saved forward output"):
        F.linear_backward(randn(rng, 4, 2), randn(rng, 4, 3), randn(rng, 2, 3),
                          activation="relu")


_BOUNDS = [dict(), dict(low_open=True), dict(high=1.0, high_open=True), dict(high=1.0),
           dict(low=-1.0, high=1.0), dict(low=-np.inf), dict(low=1.0, high=1.0)]
_SCALARS = [0.0, -0.0, 1.0, -1.0, 0.5, 5e-324, -5e-324, 1e308, np.inf, -np.inf, np.nan,
            np.nextafter(1.0, 2.0), np.nextafter(1.0, 0.0), 2.0]


@pytest.mark.parametrize("bounds", _BOUNDS, ids=str)
@pytest.mark.parametrize("value", _SCALARS, ids=repr)
def test_check_scalar_accepts_exactly_the_finite_values_in_its_interval(value, bounds):
    """Hyper-parameters (lr, momentum, betas, eps): a float is accepted, unchanged, exactly
    when it is finite and inside the interval (its fast path for plain floats included)."""
    low, high = bounds.get("low", 0.0), bounds.get("high", np.inf)
    ok = (np.isfinite(value) and (low < value or (value == low and not bounds.get("low_open")))
          and (value < high or (value == high and not bounds.get("high_open"))))
    if ok:
        got = _checks.check_scalar("op", "lr", value, **bounds)
        assert type(got) is float and got == value and np.signbit(got) == np.signbit(value)
    else:
        with pytest.raises(ValueError, match=r"^op: lr=.* is out of range; expected a finite"):
            _checks.check_scalar("op", "lr", value, **bounds)


# ------------------------------------------------------- optimiser steps that raise

@pytest.mark.parametrize("capturable", [False, True])
def test_a_failed_adam_step_does_not_count_as_a_step(capturable):
    """The bias corrections use t = the steps actually taken: a step that raised (lr set to
    NaN) leaves the count where it was, so the first real update is lr·sign(g) (t = 1)."""
    p = nn.Parameter(np.zeros(3, f32))
    p.grad = np.ones(3, f32)
    opt = optim.Adam([p], lr=0.1, capturable=capturable)
    opt.lr = float("nan")
    with pytest.raises(ValueError, match="lr=nan is out of range"):
        opt.step()
    assert int(opt.state[id(p)].get("step", 0)) == 0
    opt.lr = 0.1
    opt.step()
    np.testing.assert_allclose(p.data, np.full(3, -0.1, f32), rtol=1e-6)
    assert int(opt.state[id(p)]["step"]) == 1


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
def test_sequential_backward_says_whether_any_gradient_changed():
    """A wrong grad_out fails in the last layer, before any gradient is added (the note said
    the layers after it had accumulated theirs); a failure further down follows layers that
    did. The first layer's failure is named too."""
    model = nn.Sequential(_linear(0, 3, 4), nn.ReLU(), _linear(1, 4, 2))
    model(np.ones((5, 3), f32))
    with pytest.raises(ValueError) as info:
        model.backward(np.ones((5, 3), f32))
    assert info.value.__notes__ == [
        f"(in Sequential layer 2: {model[2]!r}; its last layer: none of this Sequential's "
        "layers had run their backward)"]
    assert all(p.grad is None for p in model.parameters())

    model(np.ones((5, 3), f32))
    model[0].weight.data = np.ones((4, 3), np.float64)      # only the first layer fails
    with pytest.raises(TypeError) as info:
        model.backward(np.ones((5, 2), f32))
    assert any(n.startswith("(in Sequential layer 0: ") and "layers 1..2 of this Sequential "
               "have already run their backward and accumulated their parameter gradients" in n
               for n in info.value.__notes__)
    assert model[2].weight.grad is not None and model[0].weight.grad is None

    inner = nn.Sequential(nn.ReLU(), _linear(2, 4, 4))      # nested: each note its own
    outer = nn.Sequential(_linear(0, 3, 4), inner, _linear(1, 4, 2))
    outer(np.ones((5, 3), f32))
    inner[1].weight.data = np.ones((4, 4), np.float64)
    with pytest.raises(TypeError) as info:
        outer.backward(np.ones((5, 2), f32))
    assert [n.split(";")[1] for n in info.value.__notes__] == [
        " its last layer: none of this Sequential's layers had run their backward)",
        " layers 2..2 of this Sequential have already run their backward and accumulated "
        "their parameter gradients)"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes need Python 3.11")
@pytest.mark.parametrize("crit, op, target", [
    (nn.CrossEntropyLoss(), "cross_entropy_with_grad", [0, 1]),
    (nn.MSELoss(), "mse_loss_with_grad", np.zeros((2, 4), f32)),
], ids=["CrossEntropyLoss", "MSELoss"])
def test_a_loss_module_error_names_the_module_the_user_called(crit, op, target):
    with pytest.raises((TypeError, ValueError), match=rf"^{op}: ") as info:
        crit(np.zeros((2, 3), f32), target)
    assert info.value.__notes__ == [
        f"(in {type(crit).__name__}.forward, which computes the loss and its gradient with "
        f"F.{op})"]


def test_a_sliced_sequential_is_a_sequential_of_the_same_layers(rng):
    model = nn.Sequential(_linear(0, 3, 4), nn.ReLU(), _linear(1, 4, 2))
    head = model[:2]
    assert type(head) is nn.Sequential and len(head) == 2
    assert head[0] is model[0] and head[1] is model[1]
    x = randn(rng, 5, 3)
    np.testing.assert_array_equal(head(x), model[1](model[0](x)))
    assert type(model[::-1]) is nn.Sequential and model[-1] is model[2]


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=1.0, momentum=0.9),
                                  lambda ps: optim.Adam(ps, lr=0.1)], ids=["SGD", "Adam"])
def test_a_step_that_fails_on_a_later_parameter_updates_none(make):
    """Every parameter is checked before any is updated: a bad gradient on the second
    leaves the first as it was (a retry would have updated it twice), and the error says
    which parameter it was."""
    a, b = nn.Parameter(np.zeros((2, 2), f32)), nn.Parameter(np.zeros((2, 2), f32))
    a.grad, b.grad = np.ones((2, 2), f32), np.ones((2, 2), np.float64)
    opt = make([a, b])
    with pytest.raises(TypeError, match="dtype float64") as info:
        opt.step()
    np.testing.assert_array_equal(a.data, np.zeros((2, 2), f32))
    assert "step" not in opt.state[id(a)]
    if sys.version_info >= (3, 11):
        assert any("params[1]" in n and "no parameter was updated" in n
                   for n in info.value.__notes__)
    b.grad = np.ones((2, 2), f32)
    opt.step()
    assert np.array_equal(a.data, b.data) and (a.data < 0).all()


@pytest.mark.parametrize("make, buffers", [
    (lambda ps: optim.SGD(ps, lr=0.5, momentum=0.5), ["momentum_buf"]),
    (lambda ps: optim.Adam(ps, lr=0.1), ["exp_avg", "exp_avg_sq"])], ids=["SGD", "Adam"])
def test_optimiser_state_follows_a_dtype_change_and_refuses_a_shape_change(make, buffers):
    p = nn.Parameter(np.ones((2, 2), f32))
    p.grad = np.ones((2, 2), f32)
    opt = make([p])
    opt.step()
    before = {k: opt.state[id(p)][k].copy() for k in buffers}
    p.data, p.grad = p.data.astype(np.float64), np.ones((2, 2))
    opt.step()                                  # the state is converted, not refused
    for k in buffers:
        assert opt.state[id(p)][k].dtype == np.float64, k
    assert p.data.dtype == np.float64 and np.isfinite(p.data).all()
    # the same two steps in float64 from the start give the same parameter
    q = nn.Parameter(np.ones((2, 2)))
    q.grad = np.ones((2, 2))
    ref = make([q])
    ref.step()
    for k in buffers:
        assert np.array_equal(ref.state[id(q)][k].astype(f32), before[k]), k
    p.data, p.grad = np.ones((3, 3)), np.ones((3, 3))
    with pytest.raises(ValueError, match=r"changed shape since its state was made; create a "
                                         r"new optimiser"):
        opt.step()


@pytest.mark.parametrize("call", [
    lambda v: F.linear(np.ones((3, 4), f32), np.ones((2, 4), f32), activation=v),
    lambda v: F.mse_loss(np.ones(3, f32), np.ones(3, f32), reduction=v),
    lambda v: F.cross_entropy(np.ones((2, 3), f32), np.array([0, 1]), reduction=v),
    lambda v: nn.Linear(4, 2, activation=v),
    lambda v: nn.MSELoss(reduction=v),
])
@pytest.mark.parametrize("value", [np.array(["relu", "tanh"]), np.array("relu"), ["mean"], 3],
                         ids=["array", "0-d array", "list", "int"])
def test_a_choice_that_is_not_a_string_is_refused_by_name(call, value):
    """activation= / reduction= take a string: an array is not compared element-wise (that
    raised NumPy's 'truth value ... is ambiguous', or kept the array in the layer)."""
    with pytest.raises(ValueError, match=r"^\w+: (activation|reduction)=.* is not supported; "
                                         r"expected one of"):
        call(value)


def test_linear_keeps_a_numpy_string_activation_as_a_str():
    lin = nn.Linear(4, 2, activation=np.str_("relu"))
    assert type(lin.activation) is str and "activation='relu'" in repr(lin)


def test_linear_backward_refuses_out_without_its_activation(rng):
    """out= without activation= was ignored, so a forgotten activation gave the gradient of
    the linear map silently."""
    x, w = randn(rng, 3, 4), randn(rng, 2, 4)
    y = F.linear(x, w, activation="sigmoid")
    with pytest.raises(ValueError, match=r"^linear_backward: out= is the saved output of an "
                                         r"activation and is used only with activation="):
        F.linear_backward(np.ones_like(y), x, w, out=y)


def test_cross_entropy_with_grad_names_itself():
    with pytest.raises(ValueError, match=r"^cross_entropy_with_grad: reduction='x'"):
        F.cross_entropy_with_grad(np.ones((2, 3), f32), np.array([0, 1]), reduction="x")


def _npy_bytes(shape, payload: bytes, descr="<f4") -> bytes:
    """A .npy member by hand: a header that may lie about the data that follows."""
    h = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    h += b" " * (64 - (10 + len(h) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(h).to_bytes(2, "little") + h + payload


@pytest.mark.parametrize("weight_member, says", [
    (_npy_bytes((10 ** 12,), b"\0" * 4), r"key 'weight'.*shape \(1000000000000,\) in the file, "
                                         r"expected \(2, 2\)"),
    (_npy_bytes((2, 2), b"\0" * 4), r"key 'weight'.*holds 4 bytes of data, its header "
                                    r"declares 16"),
    (_npy_bytes((2, 2), b"\0" * 16, descr="|O"), r"key 'weight'.*dtype object is not a real "
                                                 r"numeric dtype"),
], ids=["4 TB claimed", "short data", "object dtype"])
def test_load_reads_each_header_before_its_data(tmp_path, weight_member, says):
    """A few hundred bytes claiming a huge array made NumPy allocate it (a MemoryError, or
    the allocation of whatever smaller size was claimed) before finding the data missing."""
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("weight.npy", weight_member)
        zf.writestr("bias.npy", _npy_bytes((2,), b"\0" * 8))
    lin = nn.Linear(2, 2, rng=0)
    before = lin.weight.data.copy()
    with pytest.raises(ValueError, match=rf"^Linear\.load: cannot read weights from .*{says}"):
        lin.load(path)
    np.testing.assert_array_equal(lin.weight.data, before)


# ------------------------------------------------- GPU arrays that refuse to export

class _RefusingGpuTensor:
    """Like a PyTorch CUDA tensor that requires grad: its __cuda_array_interface__ raises
    RuntimeError (not AttributeError, so hasattr() lets it through)."""
    shape, dtype, ndim = (2, 3), np.dtype(np.float32), 2

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires "
                           "grad. If gradients aren't needed, use var.detach()")


def test_a_gpu_array_refusing_its_interface_is_seen_as_a_gpu_array():
    from cugrad import _backend
    x = _RefusingGpuTensor()
    assert _backend.is_gpu_array(x) and _backend.device_of(x) == "cuda"
    assert "on cuda" in _checks.describe(x)


def test_a_refusing_gpu_array_without_the_cuda_backend_is_the_usual_error():
    import cugrad
    if cugrad.cuda_available():
        pytest.skip("the CUDA backend works here: see the gpu-marked case")
    with pytest.raises(cugrad.BackendUnavailableError, match="argument 'x' is a GPU array"):
        F.relu(_RefusingGpuTensor())


@pytest.mark.gpu
def test_a_refusing_gpu_array_is_a_type_error_naming_the_argument():
    """On the CUDA backend: the exporter's own words, in a TypeError that names the op and
    the argument (it was torch's RuntimeError from inside hasattr)."""
    import cugrad
    if not cugrad.cuda_available():
        pytest.skip(f"CUDA backend not tested: {cugrad.cuda_unavailable_reason()}")
    for call, where in ((lambda x: F.relu(x), "relu: argument 'x'"),
                        (lambda x: cugrad.asarray(x), "asarray: argument 'x'")):
        with pytest.raises(TypeError, match=where) as err:
            call(_RefusingGpuTensor())
        assert "refuses to share its memory" in str(err.value)
        assert "requires grad" in str(err.value)
        assert isinstance(err.value.__cause__, RuntimeError)


# ------------------------------------------------------------ a PyTorch user's habits

@pytest.mark.parametrize("bad, what", [
    ([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], r"data must be an array, got builtins\.list"),
    (None, r"data must be an array, got builtins\.NoneType"),
    (nn.Parameter(np.zeros((3, 5), f32)), r"data is a Parameter .*pass p\.data\.copy\(\)"),
], ids=["list", "None", "Parameter"])
def test_parameter_data_takes_arrays_only(bad, what):
    """``p.data = ...`` is refused as the constructor refuses it (a list or None was kept,
    and the next forward failed with AttributeError: 'list' object has no attribute
    'dtype'); a Parameter is refused by both (it was wrapped: Parameter(a.weight) held a
    Parameter, which the ops then refused as not an array)."""
    layer = _linear()
    before = layer.weight.data
    with pytest.raises(TypeError, match=r"^Parameter\.data: " + what):
        layer.weight.data = bad
    assert layer.weight.data is before
    if isinstance(bad, nn.Parameter):
        with pytest.raises(TypeError, match=r"^Parameter: " + what):
            nn.Parameter(bad)


def test_a_parameter_into_an_op_is_told_to_pass_its_data():
    layer = _linear()
    with pytest.raises(TypeError, match=r"linear: argument 'weight' .*got cugrad\.Parameter "
                                        r"of shape \(3, 5\).*; pass its \.data$"):
        F.linear(np.ones((2, 5), f32), layer.weight, layer.bias.data)


@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("weight, bias, kind", [
    (np.zeros((3, 5)), None, TypeError),                   # float64 weight, float32 bias
    (None, np.zeros(3), TypeError),                        # float32 weight, float64 bias
    (np.float32(0), None, ValueError),                     # 0-d weight (was an IndexError)
    (np.zeros((3, 4), f32), None, ValueError),             # another width
], ids=["f64-weight", "f64-bias", "0-d-weight", "narrow-weight"])
def test_a_linear_whose_parameters_were_replaced_says_so_first(where, weight, bias, kind):
    """A weight or bias replaced through ``.data`` by an array of another dtype or shape:
    the layer says its parameters do not fit together (it told a float32 input to become
    float64, and the float64 input was then refused for the float32 bias)."""
    layer = _linear()
    x = np.ones((2, 5), f32)
    if where == "backward":
        layer(x)
    if weight is not None:
        layer.weight.data = weight
    if bias is not None:
        layer.bias.data = bias
    call = (lambda: layer(x)) if where == "forward" else (
        lambda: layer.backward(np.ones((2, 3), f32)))
    with pytest.raises(kind, match=rf"^Linear\.{where}: the layer's parameters do not fit "
                                   r"together: weight .* and bias .*; expected weight of "
                                   r"shape \(3, 5\) and bias of shape \(3,\)"):
        call()
    layer = _linear()               # both float64: a consistent layer, no complaint
    layer.weight.data, layer.bias.data = np.zeros((3, 5)), np.zeros(3)
    assert layer(x.astype(np.float64)).dtype == np.float64


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.ReLU])
def test_an_activation_backward_names_grad_out_in_its_own_terms(act):
    """The wrong gradient for an activation's output: F's message named 'out' (the saved
    output, which the caller never passed) and gave the expected shape backwards."""
    model = nn.Sequential(_linear(0, 4, 1), act())
    model(np.ones((5, 4), f32))
    name = act.__name__
    with pytest.raises(ValueError, match=rf"^1:{name}\.backward: argument 'grad_out' "
                                         r"\(numpy\.ndarray of shape \(5,\).*\) must have the "
                                         r"shape of the forward's output, \(5, 1\)"):
        model.backward(np.ones(5, f32))
    with pytest.raises(TypeError, match=rf"^1:{name}\.backward: argument 'grad_out' .*dtype "
                                        r"float64.* must have the dtype of the forward's "
                                        r"output, float32; convert it \(\.astype\('float32'\)\)"):
        model.backward(np.ones((5, 1)))
    assert all(p.grad is None for p in model.parameters())
    model.backward(np.ones((5, 1), f32))            # the right one still works after them


def test_adam_betas_and_capturable_are_checked_when_set_later():
    """``opt.betas = 0.9`` failed at the next step with "'float' object is not subscriptable"
    (a one-element tuple: IndexError), and ``opt.capturable = 'yes'`` was taken."""
    p = nn.Parameter(np.ones(3, f32))
    opt = optim.Adam([p], lr=0.1)
    for bad, kind, what in ((0.9, ValueError, r"betas must be a pair"),
                            ((0.9,), ValueError, r"betas must be a pair"),
                            ((0.9, 1.0), ValueError, r"betas\[1\]"),
                            ((0.9, "x"), TypeError, r"betas\[1\]")):
        with pytest.raises(kind, match=r"^Adam: " + what):
            opt.betas = bad
    assert opt.betas == (0.9, 0.999)
    opt.betas = [0.5, 0.75]
    assert opt.betas == (0.5, 0.75)
    with pytest.raises(TypeError, match=r"^Adam: capturable must be a bool, got str 'yes'"):
        opt.capturable = "yes"
    assert opt.capturable is False
    opt.capturable = np.True_               # a NumPy bool, as every other flag takes it
    assert opt.capturable is True
    opt.capturable = False
    assert repr(opt).startswith("Adam(lr=0.1, betas=(0.5, 0.75), eps=1e-08")


def test_an_optimisers_parameters_are_fixed():
    """``opt.params.append(p)`` was taken and the next step raised KeyError: <an id>."""
    p, q = nn.Parameter(np.ones(3, f32)), nn.Parameter(np.ones(2, f32))
    opt = optim.SGD([p], lr=0.1)
    assert opt.params == (p,)
    with pytest.raises(AttributeError):
        opt.params.append(q)


def test_a_subclass_without_state_names_is_told_how_to_load_its_state():
    class Momentum(optim.Optimizer):
        def __init__(self, params, lr):
            super().__init__(params)
            self.lr = lr

        def _check(self, p, state):
            buf = self._buffer(p, state, "buf")

            def update():
                buf[...] = 0.9 * buf + p.grad
                p.data -= self.lr * buf
            return update

    p = nn.Parameter(np.ones(3, f32))
    p.grad = np.ones(3, f32)
    opt = Momentum([p], lr=0.1)
    opt.step()
    assert repr(opt) == "Momentum(1 parameter)"             # was 'Momentum(; 1 parameter)'
    with pytest.raises(ValueError, match=r"unexpected key '0\.buf'.*\(Momentum declares no "
                                         r"state names: a subclass lists .* in _state_names"):
        opt.load_state_dict(opt.state_dict())
    Momentum._state_names = ("buf",)
    opt.load_state_dict(opt.state_dict())


def test_float_class_indices_are_told_about_asarray():
    y = __import__("cugrad").asarray(np.array([0, 2, 1]))          # float32, as documented
    with pytest.raises(TypeError, match=r"class-index target must be an integer array .*"
                                        r"dtype float32.*cugrad\.asarray\(y, dtype='int64'\)"):
        nn.CrossEntropyLoss()(np.zeros((3, 4), f32), y)


# ------------------------------------------------- a researcher's use of F, found by a probe

@contextlib.contextmanager
def _warnings_as_errors():
    with warnings.catch_warnings(), np.errstate(all="warn"):
        warnings.simplefilter("error")
        yield


# The two ways NumPy may stop an update midway, after writing its output: set to raise
# (FloatingPointError), or set to warn while warnings are errors (python -W error, pytest -W
# error, warnings.simplefilter("error"): RuntimeWarning; an update left half written there
# until session 17).
RAISING = {"errstate": (lambda: np.errstate(all="raise"), FloatingPointError),
           "warnings": (_warnings_as_errors, RuntimeWarning)}


def test_warnings_filters_are_read_in_order_for_whether_numpy_may_raise():
    """`-W error -W ignore::RuntimeWarning` (the later option comes first) cannot raise, and
    was taken as raising (every update copied, a step 2x slower); an "error" filter with a
    message pattern may apply, so it counts as raising."""
    cases = [([("error", {})], True),
             ([("error", {}), ("ignore", {"category": RuntimeWarning})], False),
             ([("ignore", {"category": RuntimeWarning, "message": "overflow"}), ("error", {})],
              True),
             ([("error", {"message": "overflow"})], True),
             ([("error", {"category": DeprecationWarning})], False),
             ([], False)]
    for filters, raises in cases:
        with warnings.catch_warnings(), np.errstate(all="warn"):
            warnings.resetwarnings()
            for action, kwargs in filters:
                warnings.filterwarnings(action, **kwargs)
            assert F._numpy_may_raise() is raises, filters
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert F._numpy_may_raise() is False        # NumPy says nothing: nothing to raise


@pytest.mark.parametrize("mode", sorted(RAISING))
@pytest.mark.parametrize("call", ["adam", "adam-counter", "sgd-momentum", "sgd", "accumulate"])
def test_an_update_that_numpy_stops_midway_changes_nothing(call, mode):
    """Where NumPy raises on an overflow it reports it after writing the output: adam_step
    left exp_avg updated and the counter counted, sgd_step its momentum buffer, accumulate
    its total (inf), when the op raised."""
    raising, error = RAISING[mode]
    p, m, v = np.ones(3, f32), np.full(3, 0.5, f32), np.full(3, 0.25, f32)
    g, counter = np.full(3, 3e38, f32), np.array(4, np.int64)
    total = np.full(3, 3e38, f32)
    state = [p, m, v, counter, total]
    before = [a.copy() for a in state]
    run = {"adam": lambda: F.adam_step(p, g, m, v, step=5, lr=0.1),
           "adam-counter": lambda: F.adam_step(p, g, m, v, step=counter, lr=0.1),
           "sgd-momentum": lambda: F.sgd_step(p, g, m, lr=10.0, momentum=0.9),
           "sgd": lambda: F.sgd_step(p, g, lr=3.0),
           "accumulate": lambda: F.accumulate(total, g)}[call]
    with raising(), pytest.raises(error):
        run()
    for a, b in zip(state, before):
        assert np.array_equal(a, b)
    with raising():                         # a clean update is made, as without the setting
        F.adam_step(p, np.ones(3, f32), m, v, step=counter, lr=0.1)
    assert int(counter) == 5 and not np.array_equal(p, before[0])


_OPTIMISERS = pytest.mark.parametrize(
    "make", [lambda ps: optim.Adam(ps, lr=0.1), lambda ps: optim.Adam(ps, capturable=True),
             lambda ps: optim.SGD(ps, lr=10.0, momentum=0.9)],
    ids=["Adam", "Adam-capturable", "SGD"])


@pytest.mark.parametrize("mode", sorted(RAISING))
@_OPTIMISERS
def test_an_optimiser_step_that_numpy_stops_puts_back_the_earlier_updates(make, mode):
    """The first parameter's update was kept when the second one's raised."""
    raising, error = RAISING[mode]
    a, b = nn.Parameter(np.ones(3, f32)), nn.Parameter(np.ones(2, f32))
    opt = make([a, b])
    a.grad, b.grad = np.ones(3, f32), np.ones(2, f32)
    opt.step()
    before = [a.data.copy(), b.data.copy(), opt.state_dict()]
    a.grad, b.grad = np.ones(3, f32), np.full(2, 3e38, f32)
    with raising(), pytest.raises(error) as info:
        opt.step()
    assert info.value.__notes__[-1].endswith("step: no parameter was updated)")
    assert np.array_equal(a.data, before[0]) and np.array_equal(b.data, before[1])
    after = opt.state_dict()
    assert after.keys() == before[2].keys()
    assert all(np.array_equal(after[k], before[2][k]) for k in after)


@pytest.mark.parametrize("mode", sorted(RAISING))
@_OPTIMISERS
def test_a_step_where_numpy_may_raise_snapshots_once(monkeypatch, make, mode):
    """Under a raising NumPy the step snapshots every array, and each update also ran on
    copies of its arrays (F._deferred_update's guard for a direct call): 24 copies a step of
    a two-layer MLP, 12x the step's time under -W error. The backend op now gets the
    parameter's own arrays inside a step (a direct F call still gets copies)."""
    raising, _ = RAISING[mode]
    from cugrad import _backend
    ops = _backend.numpy_backend().ops
    name = ("adam_step" if isinstance(make([nn.Parameter(np.ones(1, f32))]), optim.Adam)
            else "sgd_step")
    real, seen = getattr(ops, name), []
    monkeypatch.setattr(ops, name, lambda *args: (seen.append(args[0]), real(*args))[1])
    p = nn.Parameter(np.ones(3, f32))
    p.grad = np.ones(3, f32)
    with raising():
        make([p]).step()
        assert seen[-1] is p.data
        F.sgd_step(p.data, p.grad, lr=0.1) if name == "sgd_step" else F.adam_step(
            p.data, p.grad, np.zeros(3, f32), np.zeros(3, f32), step=1, lr=0.1)
        assert seen[-1] is not p.data               # a direct call: on copies first
    assert len(seen) == 2


@pytest.mark.parametrize("mode", sorted(RAISING))
@_OPTIMISERS
def test_a_first_step_that_numpy_stops_leaves_no_state(make, mode):
    """A first step that raised midway kept the buffers its checks had made (Adam's moments
    without its count): state_dict() held ['0.exp_avg', '0.exp_avg_sq'], which Adam's own
    load_state_dict refuses ("its entries come together")."""
    raising, error = RAISING[mode]
    a, b = nn.Parameter(np.ones(3, f32)), nn.Parameter(np.ones(2, f32))
    opt = make([a, b])
    a.grad, b.grad = np.ones(3, f32), np.full(2, 3e38, f32)
    with raising(), pytest.raises(error):
        opt.step()
    assert opt.state_dict() == {} and (a.data == 1).all() and (b.data == 1).all()
    make([a, b]).load_state_dict(opt.state_dict())
    b.grad = np.ones(2, f32)
    opt.step()                              # and the next step is a first step
    fresh_a, fresh_b = nn.Parameter(np.ones(3, f32)), nn.Parameter(np.ones(2, f32))
    fresh = make([fresh_a, fresh_b])
    fresh_a.grad, fresh_b.grad = np.ones(3, f32), np.ones(2, f32)
    fresh.step()
    assert np.array_equal(a.data, fresh_a.data) and np.array_equal(b.data, fresh_b.data)


class _ListOfLayers(nn.Module):
    """Children kept in a list and listed by overriding named_children, as Sequential once
    did (and PyTorch's ModuleList users might)."""

    def __init__(self):
        super().__init__()
        self.items = [_linear(0, 2, 3), _linear(1, 3, 1)]
        self._has_children = True

    def named_children(self):
        for i, m in enumerate(self.items):
            yield str(i), m


def test_a_module_that_lists_its_children_by_named_children_keeps_its_parameters():
    """When parameters came to be read through Module._child_items (session 17), a module
    overriding named_children reported no parameters, an empty state_dict, a repr without
    children, and train(False) left the children in training mode; no error said so."""
    model = _ListOfLayers()
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.weight",
                                                       "1.bias"]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert [n for n, _ in model.named_modules()] == ["", "0", "1"]
    assert "(1): Linear(in_features=3" in repr(model)
    model.train(False)
    assert [m.training for m in model.items] == [False, False]


@pytest.mark.parametrize("mode", sorted(RAISING))
@pytest.mark.parametrize("weight_grad", ["held", "none"])
def test_a_linear_backward_that_numpy_stops_leaves_the_weight_gradient(mode, weight_grad):
    """The weight's gradient was added before the bias's, whose sum overflowed: the backward
    raised with the weight's gradient counted, and a retry would count it twice."""
    raising, error = RAISING[mode]
    layer = nn.Linear(3, 2, rng=0)
    x, g = np.ones((4, 3), f32), np.full((4, 2), 2e37, f32)   # dW, db 8e37: finite
    layer(x)
    held = np.full((2, 3), 0.5, f32) if weight_grad == "held" else None
    layer.weight.grad = None if held is None else held.copy()
    layer.bias.grad = np.full(2, 3e38, f32)
    with raising(), pytest.raises(error):
        layer.backward(g, input_grad=False)      # bias.grad + db overflows
    if held is None:
        assert layer.weight.grad is None
    else:
        assert np.array_equal(layer.weight.grad, held)
    assert np.array_equal(layer.bias.grad, np.full(2, 3e38, f32))


def test_adams_step_counter_may_not_share_memory_with_the_update():
    """The counter was left out of the overlap check: one over grad's bytes changed grad (read
    only by contract), one over exp_avg's counted to 4453159313439771853."""
    p, g, m, v = (np.ones(3, f32) for _ in range(4))
    g2, m2 = np.ones(4, f32), np.zeros(4, f32)
    for name, counter, args in (("grad", g2[:2].view(np.int64).reshape(()), (g2[1:], m, v)),
                                ("exp_avg", m2[:2].view(np.int64).reshape(()), (g, m2[1:], v))):
        saved = [a.copy() for a in (p, *args)]
        with pytest.raises(ValueError, match=rf"adam_step: the step counter .* shares memory "
                                             rf"with argument {name!r}"):
            F.adam_step(p, *args, step=counter, lr=0.1)
        assert all(np.array_equal(a, s) for a, s in zip((p, *args), saved))


def test_a_hyperparameter_too_small_for_a_float_is_not_zero():
    """Fraction(1, 10**400) became lr = 0 (no update, no error); eps of that size was told
    to be "> 0.0"."""
    from fractions import Fraction
    p, g = np.ones(3, f32), np.ones(3, f32)
    for call in (lambda: F.sgd_step(p, g, lr=Fraction(1, 10**400)),
                 lambda: F.sgd_step(p, g, lr=1.0, weight_decay=np.longdouble("1e-400"))
                 if np.finfo(np.longdouble).tiny < 1e-400 else pytest.skip("no wide longdouble"),
                 lambda: optim.Adam([nn.Parameter(p)], eps=Fraction(1, 10**400))):
        with pytest.raises(ValueError, match=r"is too small to tell from 0 \(it rounds to 0 "
                                             r"in float64\)"):
            call()
    assert np.array_equal(p, np.ones(3, f32))


def test_numpy_scalars_are_0d_arrays_to_the_ops():
    """F.relu(x.sum()) was refused as not an array, though the 0-d array it stands for is
    taken."""
    assert F.sigmoid(np.float64(0.0)) == 0.5 and F.sigmoid(np.float64(0.0)).shape == ()
    assert F.relu(np.float32(-2.0)).dtype == f32
    with pytest.raises(TypeError, match=r"relu: argument 'x' has dtype int64"):
        F.relu(np.int64(3))


def test_a_parameter_into_gradcheck_is_its_data():
    """gradcheck(fn, param) raised AttributeError: 'Parameter' object has no attribute
    'astype' (the ops' own message says to pass .data; the conversions take it as its
    data, as to_numpy and asarray do)."""
    import cugrad
    w = _linear().weight
    assert cugrad.gradcheck(lambda v: v * 3.0, w, backward=lambda g, v: 3.0 * g)
    assert cugrad.to_numpy(w) is w.data


def test_a_masked_array_is_refused_as_a_parameters_data():
    """It was taken and refused only at the next forward, step or .to()."""
    data = np.ma.masked_array(np.ones(2, f32), mask=[0, 1])
    with pytest.raises(TypeError, match=r"^Parameter: data is a masked array"):
        nn.Parameter(data)
    p = nn.Parameter(np.ones(2, f32))
    with pytest.raises(TypeError, match=r"^Parameter\.data: data is a masked array"):
        p.data = data

