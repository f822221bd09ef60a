"""cugrad.nn's module state: the device a module reports, .to(), load_state_dict, save/load
and the messages of their errors (each raising call leaves the module as it was)."""

import os
import re
import zipfile

import numpy as np
import pytest

import cugrad
from cugrad import nn, optim
from conftest import randn

f32 = np.float32


class Block(nn.Module):
    """A user's module: a Linear held as an attribute."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.fc = nn.Linear(4, 4, rng=0, device=device)

    def forward(self, x):
        return self.fc(x)

    def backward(self, grad_out, *, input_grad=True):
        return self.fc.backward(grad_out, input_grad=input_grad)


class Mixed(nn.Module):
    """Parameters of several dtypes, float and not."""

    def __init__(self):
        super().__init__()
        self.w32 = nn.Parameter(np.arange(6, dtype=f32).reshape(2, 3))
        self.w64 = nn.Parameter(np.arange(3, dtype=np.float64))
        self.half = nn.Parameter(np.arange(4, dtype=np.float16))
        self.count = nn.Parameter(np.arange(5, dtype=np.int64))


def _dtypes(m):
    return {name: (str(p.data.dtype), None if p.grad is None else str(p.grad.dtype))
            for name, p in m.named_parameters()}


# ------------------------------------------------------------------------- Module.device

def test_a_user_module_on_the_cpu_reports_cpu_and_composes():
    block = Block()
    assert block.device == "cpu"
    model = nn.Sequential(Block(), nn.ReLU(), nn.Linear(4, 2, rng=1))
    assert model.device == "cpu" and model[0].device == "cpu"
    y = model(np.ones((3, 4), f32))
    assert y.shape == (3, 2)
    assert model.backward(np.ones((3, 2), f32)).shape == (3, 4)


@pytest.mark.gpu
def test_a_user_module_reports_the_device_of_its_parameters(gpu):
    block = Block("cuda")
    assert block.device == "cuda" and block.fc.device == "cuda"
    moved_inside = Block()
    moved_inside.fc.to("cuda")            # its parameters moved without the module knowing
    assert moved_inside.device == "cuda"
    assert nn.ReLU().to("cuda").device == "cuda"    # no parameters: what it was moved to
    assert nn.ReLU().device == "cpu"
    assert Block("cuda").to("cpu").device == "cpu"


@pytest.mark.gpu
def test_sequential_accepts_one_device_and_refuses_two(gpu):
    model = nn.Sequential(Block("cuda"), nn.Linear(4, 2, rng=1, device="cuda"))
    assert model.device == "cuda"
    y = model(gpu.ones((3, 4), dtype=f32))
    assert cugrad._backend.device_of(y) == "cuda"
    with pytest.raises(ValueError, match=r"different devices \['cpu', 'cuda'\]"):
        nn.Sequential(Block("cuda"), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"different devices \['cpu', 'cuda'\]"):
        nn.Sequential(Block(), nn.Linear(4, 2, device="cuda"))


# ------------------------------------------------------------------------------ Module.to

def test_to_keeps_every_parameter_dtype():
    m = Mixed()
    m.half.grad = np.ones(4, np.float16)
    m.count.grad = np.ones(5, np.int64)
    before = _dtypes(m)
    assert m.to("cpu") is m
    assert _dtypes(m) == before
    assert m.half.data.dtype == np.float16 and m.count.data.dtype == np.int64


@pytest.mark.gpu
def test_to_cuda_and_back_keeps_every_parameter_dtype(gpu):
    m = Mixed()
    m.half.grad = np.ones(4, np.float16)
    before = _dtypes(m)
    m.to("cuda")
    assert m.device == "cuda" and _dtypes(m) == before
    assert all(p.device == "cuda" for p in m.parameters())
    m.to("cpu")
    assert m.device == "cpu" and _dtypes(m) == before
    np.testing.assert_array_equal(m.count.data, np.arange(5))


def _failing_on_call(monkeypatch, n):
    """nn's conversion function, copying (so a conversion that was kept shows) and raising
    at its n-th call."""
    real = nn.asarray
    calls = []

    def convert(x, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise MemoryError("out of memory (simulated)")
        out = real(x, **kwargs)
        return out.copy() if out is x else out
    monkeypatch.setattr(nn, "asarray", convert)
    return calls


@pytest.mark.parametrize("fail_at", [2, 3])
def test_a_failed_to_changes_nothing(monkeypatch, fail_at):
    model = nn.Sequential(nn.Linear(3, 2, rng=0), nn.ReLU())
    model.zero_grad()
    model[0].weight.grad = np.ones((2, 3), f32)
    held = [(p, p.data, p.grad) for p in model.parameters()]
    x = np.ones((4, 3), f32)
    model(x)                              # something saved for a backward
    calls = _failing_on_call(monkeypatch, fail_at)
    with pytest.raises(MemoryError):
        model.to("cpu")
    assert len(calls) == fail_at
    assert all(p.data is data and p.grad is grad for p, data, grad in held)
    monkeypatch.undo()
    assert model.backward(np.ones((4, 2), f32)).shape == (4, 3)   # the saved batch is kept


@pytest.mark.gpu
def test_a_failed_to_cuda_leaves_everything_on_the_cpu(gpu, monkeypatch):
    model = nn.Sequential(Block(), nn.Linear(4, 2, rng=1))
    held = [(p, p.data) for p in model.parameters()]
    _failing_on_call(monkeypatch, 3)
    with pytest.raises(MemoryError):
        model.to("cuda")
    assert all(p.data is data and p.device == "cpu" for p, data in held)
    assert model.device == "cpu" and model[0].device == "cpu"


# ---------------------------------------------------------------------- load_state_dict

def test_load_state_dict_says_what_the_value_cannot_become():
    m = Mixed()
    state = {k: np.array(v) for k, v in m.state_dict().items()}
    state["count"] = np.array([0, 1, 2.5, 3, 4])
    with pytest.raises(ValueError, match=r"key 'count'.*int64.*a fraction") as info:
        m.load_state_dict(state)
    assert "beyond" not in str(info.value) and "inf" not in str(info.value)
    state["count"] = np.array([0, 1, np.nan, 3, 4])
    with pytest.raises(ValueError, match=r"key 'count'.*NaN"):
        m.load_state_dict(state)
    state["count"] = np.array([0, 1, 2, 3, 4])
    state["half"] = np.array([1.0, 1e6, 0, 0])          # beyond float16's range
    with pytest.raises(ValueError, match=r"key 'half' holds values beyond float16's range"):
        m.load_state_dict(state)
    np.testing.assert_array_equal(m.count.data, np.arange(5))


def test_load_state_dict_of_a_list_says_it_is_not_an_array():
    lin = nn.Linear(2, 2, rng=0)
    before = {k: v.copy() for k, v in lin.state_dict().items()}
    with pytest.raises(TypeError, match=r"key 'weight' holds builtins\.list object, not an "
                                        r"array.*asarray"):
        lin.load_state_dict({"weight": [[1, 2], [3, 4]], "bias": np.zeros(2, f32)})
    with pytest.raises(TypeError, match=r"key 'bias' holds builtins\.float object"):
        lin.load_state_dict({"weight": np.eye(2, dtype=f32), "bias": 0.5})
    assert all(np.array_equal(before[k], v) for k, v in lin.state_dict().items())


# ----------------------------------------------------------- modules, Parameter messages

class NoInit(nn.Module):
    def __init__(self):                   # forgets super().__init__()
        self.scale = nn.Parameter(np.ones(2, f32))

    def forward(self, x):
        return x * self.scale.data


def test_a_module_without_super_init_says_so():
    m = NoInit()
    with cugrad.profile():                # ranges on: the call names the module's range
        with pytest.raises(AttributeError, match=r"NoInit.*super\(\)\.__init__\(\)"):
            m(np.ones((1, 2), f32))
    with pytest.raises(AttributeError, match=r"NoInit.*super\(\)\.__init__\(\)"):
        m._take_saved()
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        m.nothing
    assert not hasattr(m, "nothing") and m.device == "cpu"


def test_parameter_accumulate_errors_name_the_parameter():
    p = nn.Parameter(np.zeros((2, 2), f32))
    p.accumulate(np.ones((2, 2), f32))
    for bad, kind in ((np.ones((3, 2), f32), ValueError),
                      (np.ones((2, 2), np.float64), TypeError),
                      ([[1.0, 2.0], [3.0, 4.0]], TypeError)):
        with pytest.raises(kind, match="^Parameter.accumulate: ") as info:
            p.accumulate(bad)
        assert "total" not in str(info.value)
        np.testing.assert_array_equal(p.grad, np.ones((2, 2)))
    p.accumulate(np.ones((2, 2), f32))
    np.testing.assert_array_equal(p.grad, np.full((2, 2), 2.0))


def test_parameters_docstrings_give_the_order_the_code_uses():
    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(2, 2)
            self.own = nn.Parameter(np.ones(2, f32))
    assert [n for n, _ in Outer().named_parameters()] == ["own", "inner.weight",
                                                          "inner.bias"]
    for doc in (nn.Module.__doc__, nn.Module.named_parameters.__doc__):
        assert "own Parameters first" in " ".join(doc.split())


# ------------------------------------------------------------------------- save and load

def _patched_member(path, local_offset, central_offset, value):
    """Rewrite a 2-byte field of the first member's local and central headers."""
    data = bytearray(path.read_bytes())
    local = data.index(b"PK\x03\x04")
    central = data.index(b"PK\x01\x02")
    data[local + local_offset:local + local_offset + 2] = value.to_bytes(2, "little")
    data[central + central_offset:central + central_offset + 2] = value.to_bytes(2, "little")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["encrypted", "unknown_compression", "bad_deflate"])
def test_load_of_an_unreadable_member_is_the_usual_value_error(tmp_path, damage):
    path = tmp_path / "w.npz"
    lin = nn.Linear(2, 2, rng=0)
    if damage == "bad_deflate":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("weight.npy", b"\0" * 200)
            zf.writestr("bias.npy", b"\0" * 200)
        data = bytearray(path.read_bytes())
        start = data.index(b"PK\x03\x04") + 30 + len("weight.npy")
        data[start:start + 4] = b"\xff\xff\xff\xff"      # not a deflate stream
        path.write_bytes(bytes(data))
    else:
        nn.Linear(2, 2, rng=1).save(path)
        if damage == "encrypted":
            _patched_member(path, 6, 8, 0x1)           # general purpose flag: encrypted
        else:
            _patched_member(path, 8, 10, 99)           # compression method 99
    before = lin.weight.data.copy()
    with pytest.raises(ValueError, match="^" + re.escape(
            f"Linear.load: cannot read weights from {str(path)!r} (key 'weight'): ")):
        lin.load(path)
    np.testing.assert_array_equal(lin.weight.data, before)


def test_load_with_a_missing_key_names_the_file(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, weight=np.ones((2, 2), f32))
    lin = nn.Linear(2, 2, rng=0)
    with pytest.raises(KeyError, match=r"Linear\.load.*w\.npz.*missing keys \['bias'\]") \
            as info:
        lin.load(path)
    assert "load_state_dict" not in str(info.value)


def test_save_and_load_take_bytes_paths(tmp_path):
    path = os.fsencode(tmp_path / "w.npz")
    nn.Linear(2, 2, rng=0).save(path)
    assert os.listdir(tmp_path) == ["w.npz"]
    other = nn.Linear(2, 2, rng=1)
    other.load(path)
    np.testing.assert_array_equal(other.weight.data, nn.Linear(2, 2, rng=0).weight.data)
    with pytest.raises(TypeError, match=r"Linear\.save: path must be .*got builtins\.int"):
        other.save(3)
    with pytest.raises(TypeError, match=r"Linear\.load: path must be .*got builtins\.int"):
        other.load(3)


def test_save_into_a_missing_directory_names_the_path_given(tmp_path):
    path = tmp_path / "missing" / "w.npz"
    with pytest.raises(FileNotFoundError, match=r"Linear\.save: cannot write weights to "
                                                r".*missing/w\.npz") as info:
        nn.Linear(2, 2).save(path)
    assert ".tmp" not in str(info.value)
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------------------- parameter slots, reprs, ...

def test_an_array_assigned_to_a_parameter_slot_is_a_type_error():
    """``layer.weight = array`` dropped the weight from parameters() and state_dict() without
    a word and failed in the next forward with an unrelated AttributeError: fails unless the
    assignment raises TypeError naming the slot and changes nothing. A Parameter (tied
    weights) and None (no bias) are still accepted."""
    lin = nn.Linear(3, 2, rng=0)
    before = lin.weight
    for value in (np.ones((2, 3), f32), [[1.0] * 3] * 2, 0.5):
        with pytest.raises(TypeError, match=r"Linear: cannot assign .* to 'weight', a Parameter's slot"):
            lin.weight = value
        assert lin.weight is before and [n for n, _ in lin.named_parameters()] == ["weight", "bias"]
    other = nn.Linear(3, 2, rng=1)
    other.weight = lin.weight                       # tying
    assert other.weight is lin.weight
    lin.bias = None
    assert [n for n, _ in lin.named_parameters()] == ["weight"]
    assert lin(np.ones((4, 3), f32)).shape == (4, 2)
    lin.extra = np.ones(2)                          # not a Parameter slot: a plain attribute
    assert [n for n, _ in lin.named_parameters()] == ["weight"]
    # a declared slot holding None (bias=False, or set to None) takes a Parameter only
    for layer in (lin, nn.Linear(3, 2, bias=False)):
        with pytest.raises(TypeError, match=r"to 'bias', a Parameter's slot"):
            layer.bias = np.full(2, 5.0, f32)
        assert layer.bias is None
    lin.bias = nn.Parameter(np.zeros(2, f32))
    assert [n for n, _ in lin.named_parameters()] == ["weight", "bias"]


def test_a_linear_input_of_the_wrong_width_is_named_in_the_layers_terms():
    """Fails unless the error names the layer, x and the width it takes (the op's message
    told a layer user to make the weight (*, 4))."""
    lin = nn.Linear(5, 2, rng=0)
    with pytest.raises(ValueError, match=r"Linear.forward: argument 'x' has 4 features .* "
                                         r"takes 5 .* expected x of shape \(batch, 5\)"):
        lin(np.ones((3, 4), f32))


def test_device_none_is_the_default_device():
    """PyTorch code passes device=None for "the default": fails unless Linear takes it."""
    assert nn.Linear(3, 2, device=None).device == "cpu"


def test_numpy_asarray_of_a_parameter_is_its_data():
    """np.asarray(param) was a 0-d object array holding the Parameter."""
    p = nn.Parameter(np.arange(6, dtype=f32).reshape(2, 3))
    a = np.asarray(p)
    assert a.dtype == f32 and a.shape == (2, 3) and np.shares_memory(a, p.data)
    assert np.asarray(p, dtype=np.float64).dtype == np.float64
    c = np.array(p, copy=True)
    assert np.array_equal(c, p.data) and not np.shares_memory(c, p.data)
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":      # copy=False: never a copy
        assert np.shares_memory(np.array(p, copy=False), p.data)
        with pytest.raises(ValueError):
            np.array(p, dtype=np.float64, copy=False)


def test_reprs_show_a_user_modules_children_and_an_optimisers_settings():
    """A user module printed as 'Block()' and an optimiser as '<... object at 0x...>'."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4, rng=0)
            self.body = nn.Sequential(nn.ReLU(), nn.Sequential(nn.Tanh()))

    assert repr(Net()) == (
        "Net(\n"
        "  (fc): Linear(in_features=3, out_features=4, bias=True)\n"
        "  (body): Sequential(\n"
        "    (0): ReLU()\n"
        "    (1): Sequential(\n"
        "      (0): Tanh()\n"
        "    )\n"
        "  )\n"
        ")")
    assert repr(nn.ReLU()) == "ReLU()" and repr(nn.Sequential()) == "Sequential()"
    params = Net().parameters()
    assert repr(optim.SGD(params, lr=0.1, momentum=0.9)) == \
        "SGD(lr=0.1, momentum=0.9, weight_decay=0.0; 2 parameters)"
    assert repr(optim.Adam(params[:1])) == ("Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08, "
                                            "weight_decay=0.0, capturable=False; 1 parameter)")


def test_children_and_modules_walk_the_tree_in_pytorchs_order():
    """Fails unless children() lists the direct submodules and (named_)modules() the whole
    tree, parents first, with dotted paths (the names named_parameters() uses)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4, rng=0)
            self.body = nn.Sequential(nn.ReLU(), nn.Linear(4, 2, rng=1))

    net = Net()
    assert list(net.children()) == [net.fc, net.body]
    assert [(name, type(m).__name__) for name, m in net.named_modules()] == [
        ("", "Net"), ("fc", "Linear"), ("body", "Sequential"), ("body.0", "ReLU"),
        ("body.1", "Linear")]
    assert list(net.modules())[0] is net and len(list(net.modules())) == 5
    assert {n.rsplit(".", 1)[0] for n, _ in net.named_parameters()} <= {
        n for n, _ in net.named_modules()}


def test_train_and_eval_set_the_flag_on_the_whole_tree_and_change_nothing_else():
    """Fails unless train()/eval() exist as in PyTorch (flag on every module below, self
    returned, a bool only) and leave the computation as it was (no cugrad layer has an
    evaluation mode)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(5, 7, rng=0), nn.Tanh(), nn.Linear(7, 3, rng=1))

    net = Net()
    assert all(m.training for m in net.modules())
    x = np.random.default_rng(2).standard_normal((4, 5)).astype(np.float32)
    before = net.body(x).copy()
    assert net.eval() is net
    assert [m.training for m in net.modules()] == [False] * 5
    np.testing.assert_array_equal(net.body(x), before)
    assert net.body[0].train() is net.body[0]
    assert [m.training for m in net.modules()] == [False, False, True, False, False]
    assert net.train(np.True_) is net and all(m.training for m in net.modules())
    with pytest.raises(TypeError, match=r"Net\.train: mode must be a bool, got str 'no'"):
        net.train("no")
    assert all(m.training for m in net.modules())

    class Forgot(nn.Module):
        def __init__(self):
            pass

    with pytest.raises(AttributeError, match="must call super"):
        Forgot().training


# -------------------------------------------- from a mutation probe of nn.py (session 13)
# Behaviours the docstrings promise that no test pinned: each test below fails on a mutant
# the suite let live.

def _linear(seed=0, n_in=4, n_out=3):
    return nn.Linear(n_in, n_out, rng=seed)


def test_accumulate_into_a_grad_that_cannot_take_it_is_refused_in_the_parameters_terms():
    """A later accumulate checks the held .grad itself (C-contiguous, writable, not the new
    gradient's memory) and says so as Parameter.accumulate, not as F.accumulate."""
    p = nn.Parameter(np.zeros((2, 3), f32))
    p.grad = np.zeros((3, 2), f32).T                   # the right shape, not C-contiguous
    with pytest.raises(ValueError, match=r"^Parameter\.accumulate: the parameter's \.grad is "
                                         r"added to in place and must be a writable "
                                         r"C-contiguous array"):
        p.accumulate(np.ones((2, 3), f32))
    assert not p.grad.any()
    p.grad = None
    p.accumulate(np.ones((2, 3), f32))
    with pytest.raises(ValueError, match=r"^Parameter\.accumulate: the parameter's \.grad "
                                         r"shares memory with the new gradient"):
        p.accumulate(p.grad)
    np.testing.assert_array_equal(p.grad, np.ones((2, 3)))


@pytest.mark.parametrize("held", ["shape", "strided", "read-only"])
def test_a_bias_grad_that_cannot_take_the_gradient_leaves_the_weight_grad_alone(rng, held):
    """Linear.backward checks weight.grad and bias.grad before adding to either: a bias.grad
    of the wrong shape, or not a writable C-contiguous array, raises naming it and the
    weight's .grad is untouched; mended, the retry counts each gradient once."""
    lin = _linear()
    x, g = randn(rng, 5, 4), randn(rng, 5, 3)
    lin(x)
    bad = {"shape": np.zeros((1, 3), f32),
           "strided": np.zeros(6, f32)[::2],
           "read-only": np.zeros(3, f32)}[held]
    if held == "read-only":
        bad.flags.writeable = False
    lin.bias.grad = bad
    with pytest.raises(ValueError, match=r"^Linear\.backward: bias\.grad "):
        lin.backward(g)
    assert lin.weight.grad is None and lin.bias.grad is bad and not bad.any()
    lin.bias.grad = None
    lin.backward(g)
    g64, x64 = g.astype(np.float64), x.astype(np.float64)
    np.testing.assert_allclose(lin.weight.grad, g64.T @ x64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin.bias.grad, g64.sum(axis=0), rtol=1e-5, atol=1e-6)


def test_to_drops_what_the_forward_saved_in_every_layer(rng):
    """Module docstring: moving the module with .to() drops what its forward saved (in the
    module and every module below it), so the backward raises until the next forward."""
    for model in (_linear(), nn.Sequential(_linear(), nn.ReLU(), _linear(1, 3, 2))):
        x = randn(rng, 5, 4)
        out = model(x)
        model.to("cpu")
        with pytest.raises(RuntimeError, match="nothing saved to differentiate"):
            model.backward(np.ones_like(out))
        assert all(p.grad is None for p in model.parameters())
        model(x)
        model.backward(np.ones_like(out))           # a new forward: backward works again
        assert all(p.grad is not None for p in model.parameters())


def test_to_gives_parameters_in_native_byte_order():
    """.to() keeps each parameter's dtype in native byte order (a big-endian array becomes
    the same values, same dtype, native)."""
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(np.arange(6, dtype=">f8").reshape(2, 3))
            self.k = nn.Parameter(np.arange(3, dtype=">i4"))

    m = Big().to("cpu")
    assert m.w.data.dtype == np.float64 and m.w.data.dtype.isnative
    assert m.k.data.dtype == np.int32 and m.k.data.dtype.isnative
    np.testing.assert_array_equal(m.w.data, np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(m.k.data, np.arange(3))


def test_load_state_dict_refuses_unexpected_and_missing_keys_and_changes_nothing():
    """Every key must be present and no other (KeyError naming them); nothing is loaded."""
    lin = _linear()
    before = {k: v.copy() for k, v in lin.state_dict().items()}
    good = {k: v + 1 for k, v in before.items()}
    with pytest.raises(KeyError, match=r"unexpected keys \['extra'\]"):
        lin.load_state_dict({**good, "extra": np.ones(3, f32)})
    with pytest.raises(KeyError, match=r"missing keys \['bias'\], unexpected keys \[\]"):
        lin.load_state_dict({"weight": good["weight"]})
    for k, v in lin.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_refuses_a_member_that_is_not_a_npy_array(tmp_path):
    """Module.load takes only <name>.npy members: a member of another name, even one that
    holds a valid .npy array for a parameter, is a ValueError and loads nothing."""
    lin = _linear()
    before = {k: v.copy() for k, v in lin.state_dict().items()}
    path = tmp_path / "w.npz"
    _linear(1).save(path)
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("weight.npy", members["weight.npy"])
        zf.writestr("bias.bin", members["bias.npy"])        # four characters: ".bin"
    with pytest.raises(ValueError, match=r"member 'bias\.bin' is not a \.npy array"):
        lin.load(path)
    for k, v in lin.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_reads_npy_format_2_members(tmp_path):
    """Module.load takes .npy members of format 1.0 or 2.0 (both are what NumPy writes)."""
    src, dst = _linear(1), _linear(0)
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for name, a in src.state_dict().items():
            with zf.open(f"{name}.npy", "w") as member:
                np.lib.format.write_array(member, a, version=(2, 0), allow_pickle=False)
    dst.load(path)
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[k], v)


def test_a_parameter_needs_an_array_with_a_dtype():
    class ShapeOnly:
        shape = (2, 3)

    with pytest.raises(TypeError, match=r"^Parameter: data must be an array"):
        nn.Parameter(ShapeOnly())


def test_a_failed_forward_clears_the_saved_state_of_nested_layers(rng):
    """After a failed Sequential forward nothing is saved anywhere below it (nested
    Sequentials included): the backward raises and accumulates no gradient."""
    inner = nn.Sequential(_linear(1, 3, 3))
    model = nn.Sequential(_linear(0, 4, 3), inner)
    model(randn(rng, 5, 4))                      # every layer saves this batch
    with pytest.raises(ValueError):
        model(randn(rng, 5, 7))                  # the first layer refuses 7 features
    with pytest.raises(RuntimeError, match="nothing saved to differentiate"):
        model.backward(randn(rng, 5, 3))
    assert all(p.grad is None for p in model.parameters())


def test_a_sequentials_layers_carry_their_names_from_the_start():
    """Sequential names its layers "0:Linear", ... when it is made, so a layer called on its
    own before the model ever ran reports its place in the model."""
    model = nn.Sequential(_linear(0, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"^0:Linear\.forward: argument 'x' has 5 features"):
        model[0](np.ones((2, 5), f32))


@pytest.mark.gpu
def test_a_module_with_parameters_on_two_devices_has_no_device(gpu):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2, rng=0)
            self.b = nn.Linear(2, 2, rng=1, device="cuda")

    with pytest.raises(ValueError, match=r"different devices \['cpu', 'cuda'\]"):
        Two().device
    assert Two().to("cuda").device == "cuda"


@pytest.mark.gpu
def test_a_loss_reports_the_device_of_its_last_forward(gpu):
    for crit in (nn.MSELoss(), nn.CrossEntropyLoss()):
        assert crit.device == "cpu"
        pred = np.arange(6, dtype=f32).reshape(2, 3)
        target = pred if isinstance(crit, nn.MSELoss) else np.array([0, 2])
        crit(gpu.asarray(pred), gpu.asarray(target))
        assert crit.device == "cuda"
        crit(pred, target)
        assert crit.device == "cpu"
