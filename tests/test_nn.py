"""cugrad.nn: layers against MATH.md's hand-computed results and finite differences."""

import numpy as np
import pytest

import cugrad
import cugrad.functional as F
from cugrad import gradcheck, nn, optim
from conftest import randn, rel_err


def test_seed002_layer_by_hand(backend):
    """MATH.md §5 on one sample: X = [1, 2], W = [0.5, −0.5], b = 0, label 1, sigmoid,
    loss Σ(Z − label)²/2. Y = −0.5, Z = σ(−0.5), A = (Z − 1) Z (1 − Z)."""
    layer = nn.Linear(2, 1, dtype="float64", device=backend.device)
    layer.load_state_dict({"weight": np.array([[0.5, -0.5]]), "bias": np.array([0.0])})
    act, crit = nn.Sigmoid(), nn.MSELoss(reduction="half_sum")
    x = backend.put(np.array([[1.0, 2.0]]))
    z = act(layer(x))
    loss = crit(z, backend.put(np.array([[1.0]])))
    grad_x = layer.backward(act.backward(crit.backward()))
    assert float(backend.get(z)[0, 0]) == pytest.approx(0.3775406687981454, rel=1e-14)
    assert float(loss) == pytest.approx(0.19372780950013005, rel=1e-14)
    a = -0.14628025352695762
    assert backend.get(layer.weight.grad) == pytest.approx(np.array([[a, 2 * a]]), rel=1e-13)
    assert backend.get(layer.bias.grad) == pytest.approx(np.array([a]), rel=1e-13)
    assert backend.get(grad_x) == pytest.approx(np.array([[0.5 * a, -0.5 * a]]), rel=1e-13)


def test_seed002_matrix_form(backend, rng):
    """MATH.md §5 over a batch: dW, dB, dX from A = (Z − Label) ⊙ Z ⊙ (1 − Z)."""
    layer = nn.Linear(7, 5, rng=1, dtype="float64", device=backend.device)
    act, crit = nn.Sigmoid(), nn.MSELoss(reduction="half_sum")
    x, label = randn(rng, 9, 7, dtype=np.float64), rng.random((9, 5))
    z = act(layer(backend.put(x)))
    crit(z, backend.put(label))
    grad_x = layer.backward(act.backward(crit.backward()))
    w, b = backend.get(layer.weight.data), backend.get(layer.bias.data)
    z64 = 1 / (1 + np.exp(-(x @ w.T + b)))
    a = (z64 - label) * z64 * (1 - z64)
    assert rel_err(layer.weight.grad, a.T @ x) < 1e-12        # W (out, in): dW = Aᵀ X
    assert rel_err(layer.bias.grad, a.sum(axis=0)) < 1e-12
    assert rel_err(grad_x, a @ w) < 1e-12


def two_layer(backend, activation_module, fused):
    act = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}[activation_module]
    if fused:
        return nn.Sequential(nn.Linear(4, 6, rng=0, dtype="float64", activation=activation_module),
                             nn.Linear(6, 3, rng=1, dtype="float64")).to(backend.device)
    return nn.Sequential(nn.Linear(4, 6, rng=0, dtype="float64"), act(),
                         nn.Linear(6, 3, rng=1, dtype="float64")).to(backend.device)


@pytest.mark.parametrize("fused", [False, True], ids=["module", "fused"])
@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu"])
@pytest.mark.parametrize("loss", ["mse", "xent"])
def test_two_layer_network_gradients_match_finite_differences(backend, rng, activation, fused,
                                                              loss):
    model = two_layer(backend, activation, fused)
    x = backend.put(randn(rng, 5, 4, dtype=np.float64))
    if loss == "mse":
        crit, target = nn.MSELoss(), backend.put(randn(rng, 5, 3, dtype=np.float64))
    else:
        crit, target = nn.CrossEntropyLoss(), backend.put(rng.integers(0, 3, size=5))
    params = model.parameters()

    def loss_of(x, *arrays):
        for p, a in zip(params, arrays):
            p.data = a
        return crit(model(x), target)

    def backward(g, x, *arrays):
        loss_of(x, *arrays)
        model.zero_grad()
        gx = model.backward(crit.backward())
        return (gx * g,) + tuple(p.grad * g for p in params)

    gradcheck(loss_of, x, *[p.data for p in params], backward=backward)


def test_gradients_accumulate_until_zero_grad(backend, rng):
    layer = nn.Linear(3, 2, rng=0, device=backend.device)
    x, g = backend.put(randn(rng, 4, 3)), backend.put(randn(rng, 4, 2))
    layer(x)
    layer.backward(g)
    first = backend.get(layer.weight.grad).copy()
    layer(x)
    layer.backward(g)
    assert rel_err(layer.weight.grad, 2 * first) < 1e-6
    layer.zero_grad()
    assert layer.weight.grad is None and layer.bias.grad is None


def test_zero_grad_of_a_model_clears_every_layer(backend, rng):
    """Sequential.zero_grad reaches the layers' parameters (a module's own alone would leave
    a model's gradients piling up over the steps)."""
    model = nn.Sequential(nn.Linear(3, 4, rng=0, device=backend.device), nn.Tanh(),
                          nn.Linear(4, 2, rng=1, device=backend.device))
    model(backend.put(randn(rng, 5, 3)))
    model.backward(backend.put(randn(rng, 5, 2)))
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_accumulation_is_the_exact_sum_through_the_accumulate_op(backend, rng):
    """A second backward before zero_grad adds its gradients with F.accumulate (cugrad's
    own kernel on the GPU, not the array library's +=): bitwise the sum of the two
    backwards' gradients, one accumulate range per parameter."""
    layer = nn.Linear(5, 3, rng=0, device=backend.device)
    xs = [backend.put(randn(rng, 4, 5)) for _ in range(2)]
    gs = [backend.put(randn(rng, 4, 3)) for _ in range(2)]
    alone = []
    for x, g in zip(xs, gs):
        layer.zero_grad()
        layer(x)
        layer.backward(g)
        alone.append([backend.get(p.grad).copy() for p in layer.parameters()])
    layer.zero_grad()
    with cugrad.profile() as prof:
        for x, g in zip(xs, gs):
            layer(x)
            layer.backward(g)
    assert prof["accumulate"].calls == 2
    for p, a, b in zip(layer.parameters(), *alone):
        np.testing.assert_array_equal(backend.get(p.grad), a + b)


def test_parameter_accumulate_stores_a_copy_of_the_first_gradient(backend):
    """The first gradient is stored as a copy, whatever its layout: the caller's array (a
    plain one, a read-only array, a transposed view, a view of the weights) is never added
    to later, and one array handed to two parameters gives each its own gradient."""
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    p = nn.Parameter(backend.put(data.copy()))
    q = nn.Parameter(backend.put(data.copy()))
    for _ in range(2):           # y = x + p + q: the same gradient array for both, twice
        g = backend.put(np.ones((3, 4), np.float32))
        p.accumulate(g)
        q.accumulate(g)
        assert p.grad is not g and q.grad is not g and p.grad is not q.grad
        np.testing.assert_array_equal(backend.get(g), np.ones((3, 4), np.float32))
    np.testing.assert_array_equal(backend.get(p.grad), np.full((3, 4), 2.0, np.float32))
    np.testing.assert_array_equal(backend.get(q.grad), np.full((3, 4), 2.0, np.float32))
    cases = {"transposed view": backend.put(np.ones((4, 3), np.float32)).T,
             "view of the weights": p.data}
    if backend.device == "cpu":
        readonly = np.ones((3, 4), np.float32)
        readonly.flags.writeable = False
        cases["read-only"] = readonly
    for what, first in cases.items():
        p.grad = None
        before = backend.get(first).copy()
        p.accumulate(first)
        p.accumulate(backend.put(np.full((3, 4), 2.0, np.float32)))
        np.testing.assert_array_equal(backend.get(p.grad), before + 2.0, err_msg=what)
        np.testing.assert_array_equal(backend.get(first), before, err_msg=what)
    np.testing.assert_array_equal(backend.get(p.data), data)


def test_second_backward_without_forward_raises(backend, rng):
    model = nn.Sequential(nn.Linear(3, 2, rng=0), nn.ReLU()).to(backend.device)
    crit = nn.MSELoss()
    crit(model(backend.put(randn(rng, 4, 3))), backend.put(randn(rng, 4, 2)))
    model.backward(crit.backward())
    with pytest.raises(RuntimeError, match="backward"):
        model.backward(backend.put(randn(rng, 4, 2)))
    with pytest.raises(RuntimeError, match="MSELoss.backward"):
        crit.backward()
    with pytest.raises(RuntimeError, match="forward call first"):
        nn.Linear(2, 2).backward(np.ones((1, 2), np.float32))


def test_linear_initialisation_follows_pytorch():
    layer = nn.Linear(400, 300, rng=np.random.default_rng(7))
    bound = 1 / np.sqrt(400)
    w, b = layer.weight.data, layer.bias.data
    assert w.shape == (300, 400) and b.shape == (300,) and w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    # uniform on ±bound: mean ≈ 0, variance bound²/3
    assert abs(w.mean()) < 0.01 * bound and abs(w.var() / (bound ** 2 / 3) - 1) < 0.02
    # reproducible from an int seed, different for another seed
    assert np.array_equal(nn.Linear(4, 3, rng=5).weight.data, nn.Linear(4, 3, rng=5).weight.data)
    assert not np.array_equal(nn.Linear(4, 3, rng=5).weight.data,
                              nn.Linear(4, 3, rng=6).weight.data)
    assert nn.Linear(4, 3, bias=False).bias is None
    assert [n for n, _ in nn.Linear(4, 3).named_parameters()] == ["weight", "bias"]


def test_sequential_parameters_and_state_dict_names():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2, bias=False))
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.weight"]
    assert len(model.parameters()) == 3 and len(model) == 3
    assert isinstance(model[1], nn.Tanh)
    assert "Linear(in_features=4, out_features=5, bias=True)" in repr(model)


def test_save_load_round_trip_is_bit_exact(backend, tmp_path, rng):
    model = nn.Sequential(nn.Linear(5, 7, rng=0), nn.ReLU(), nn.Linear(7, 3, rng=1)) \
        .to(backend.device)
    path = tmp_path / "weights.npz"
    model.save(path)
    other = nn.Sequential(nn.Linear(5, 7, rng=2), nn.ReLU(), nn.Linear(7, 3, rng=3)) \
        .to(backend.device)
    other.load(path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k == k2 and np.array_equal(backend.get(a), backend.get(b))
        assert cugrad._backend.device_of(b) == backend.device
    x = backend.put(randn(rng, 2, 5))
    assert np.array_equal(backend.get(model(x)), backend.get(other(x)))


def _weights(model):
    return {k: np.array(cugrad.to_numpy(v)) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing_key", "extra_key",
                                    "shape", "pickled_object"])
def test_bad_weight_files_leave_the_model_untouched(tmp_path, damage):
    model = nn.Sequential(nn.Linear(5, 7, rng=0), nn.ReLU(), nn.Linear(7, 3, rng=1))
    before = _weights(model)
    path = tmp_path / "w.npz"
    good = {k: v + 1 for k, v in before.items()}
    if damage == "truncated":
        np.savez(path, **good)
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"not an npz file at all")
    elif damage == "missing_key":
        np.savez(path, **{k: v for k, v in good.items() if k != "2.bias"})
    elif damage == "extra_key":
        np.savez(path, **good, **{"9.weight": np.ones(3)})
    elif damage == "shape":
        np.savez(path, **{**good, "2.weight": np.ones((3, 8), np.float32)})
    elif damage == "pickled_object":
        np.savez(path, **{**good, "0.bias": np.array([{"x": 1}], dtype=object)})
    with pytest.raises((ValueError, KeyError, TypeError)) as info:
        model.load(path)
    if damage in ("missing_key", "shape"):
        assert "2." in str(info.value)
    after = _weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_loss_modules(backend, rng):
    z, t = randn(rng, 6, 4), rng.integers(0, 4, size=6)
    crit = nn.CrossEntropyLoss(reduction="sum")
    loss = crit(backend.put(z), backend.put(t))
    ref = F.cross_entropy(z, t, reduction="sum")
    assert rel_err(loss, ref) < 1e-6
    assert rel_err(crit.backward(), F.cross_entropy_backward(z, t, reduction="sum")) < 1e-6
    with pytest.raises(ValueError, match="reduction"):
        nn.CrossEntropyLoss(reduction="half_sum")
    with pytest.raises(ValueError, match="reduction"):
        nn.MSELoss(reduction="avg")


def test_to_cuda_without_a_gpu_says_why():
    if cugrad.cuda_available():
        pytest.skip("a CUDA device works here")
    with pytest.raises(cugrad.BackendUnavailableError, match="CUDA backend is unavailable"):
        nn.Linear(3, 2).to("cuda")
    with pytest.raises(ValueError, match="device"):
        nn.Linear(3, 2).to("tpu")


def test_training_reduces_the_loss(backend, rng):
    x = randn(rng, 64, 10)
    t = (x[:, :3].sum(axis=1) > 0).astype(np.int64)
    model = nn.Sequential(nn.Linear(10, 16, rng=0, activation="tanh"), nn.Linear(16, 2, rng=1)) \
        .to(backend.device)
    crit, opt = nn.CrossEntropyLoss(), optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    xs, ts = backend.put(x), backend.put(t)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        losses.append(float(crit(model(xs), ts)))
        model.backward(crit.backward())
        opt.step()
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("first", ["linear", "linear_fused", "activation"])
def test_backward_without_input_grad_gives_the_same_parameter_gradients(backend, rng, first):
    """input_grad=False: the same parameter gradients (bitwise), None for the input, and the
    first layer's dX product is not computed (its range does not appear)."""
    def make():
        head = {"linear": [nn.Linear(6, 8, rng=0), nn.ReLU()],
                "linear_fused": [nn.Linear(6, 8, rng=0, activation="tanh")],
                "activation": [nn.Sigmoid(), nn.Linear(6, 8, rng=0)]}[first]
        return nn.Sequential(*head, nn.Linear(8, 3, rng=1)).to(backend.device)
    x, y = backend.put(randn(rng, 11, 6)), backend.put(rng.integers(0, 3, 11))
    grads = []
    for input_grad in (True, False):
        model, crit = make(), nn.CrossEntropyLoss()
        crit(model(x), y)
        with cugrad.profile() as prof:
            gx = model.backward(crit.backward(), input_grad=input_grad)
        if input_grad:
            assert gx is not None and gx.shape == (11, 6)
        else:
            assert gx is None
        n_linear = sum(isinstance(m, nn.Linear) for m in model.layers)
        dx_calls = prof["linear.backward.dX"].calls if "linear.backward.dX" in prof else 0
        skipped = not input_grad and isinstance(model[0], nn.Linear)
        assert dx_calls == n_linear - skipped
        grads.append([backend.get(p.grad) for p in model.parameters()])
    for with_dx, without_dx in zip(*grads):
        assert np.array_equal(with_dx, without_dx)


def test_linear_backward_input_grad_flag(backend, rng):
    x, w, gy = (backend.put(randn(rng, *s)) for s in ((5, 4), (3, 4), (5, 3)))
    full = F.linear_backward(gy, x, w)
    gx, gw, gb = F.linear_backward(gy, x, w, input_grad=False)
    assert gx is None
    assert np.array_equal(backend.get(gw), backend.get(full[1]))
    assert np.array_equal(backend.get(gb), backend.get(full[2]))
    with pytest.raises(TypeError, match="input_grad must be a bool"):
        F.linear_backward(gy, x, w, input_grad="no")


def test_sequential_input_grad_false_with_a_user_module_first(rng):
    """A user module whose backward has no input_grad still works first in a Sequential:
    its input gradient is computed and dropped."""
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

        def backward(self, grad_out):
            return 2 * grad_out

    model = nn.Sequential(Double(), nn.Linear(4, 2, rng=0))
    model(randn(rng, 3, 4))
    assert model.backward(randn(rng, 3, 2), input_grad=False) is None
    assert model[1].weight.grad is not None
