"""cugrad against PyTorch on the CPU, where PyTorch is installed (skipped elsewhere: CI has
no PyTorch; the GPU machines and any machine with a CPU build do).

Two things only a real PyTorch can check: that cugrad's layers, losses and optimisers follow
PyTorch's rules step for step (README: "PyTorch's layout", "PyTorch's rules"), from a
PyTorch model's own state dict; and that PyTorch's CPU tensors come in through DLPack as
README says, or are refused with cugrad's words where PyTorch refuses to export them or
would export the wrong values. The float64 references of the other tests stay the
specification; this is a second, independent opinion.
"""

import numpy as np
import pytest

import cugrad
import cugrad.functional as F
from cugrad import nn, optim

torch = pytest.importorskip("torch")

IN, HIDDEN, MID, CLASSES, BATCH = 13, 17, 9, 5, 31


def _models(activation):
    """The same MLP in both libraries, cugrad's loaded from PyTorch's state dict."""
    t_act, c_act = {"relu": (torch.nn.ReLU, nn.ReLU),
                    "sigmoid": (torch.nn.Sigmoid, nn.Sigmoid)}[activation]
    theirs = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), t_act(),
                                 torch.nn.Linear(HIDDEN, MID), torch.nn.Tanh(),
                                 torch.nn.Linear(MID, CLASSES)).double()
    ours = nn.Sequential(nn.Linear(IN, HIDDEN, dtype="float64"), c_act(),
                         nn.Linear(HIDDEN, MID, dtype="float64"), nn.Tanh(),
                         nn.Linear(MID, CLASSES, dtype="float64"))
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def _data(loss):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((BATCH, IN))
    if loss == "xent_indices":
        target = rng.integers(0, CLASSES, BATCH)
    elif loss == "xent_probabilities":
        target = rng.dirichlet(np.ones(CLASSES), BATCH)
    else:
        target = rng.standard_normal((BATCH, CLASSES))
    return x, target


def _losses(loss):
    if loss.startswith("xent"):
        return torch.nn.CrossEntropyLoss(), nn.CrossEntropyLoss()
    reduction = loss.split("_")[1]
    return torch.nn.MSELoss(reduction=reduction), nn.MSELoss(reduction=reduction)


OPTIMISERS = {
    "sgd": (torch.optim.SGD, optim.SGD, dict(lr=0.05)),
    "sgd_momentum_wd": (torch.optim.SGD, optim.SGD, dict(lr=0.05, momentum=0.9,
                                                          weight_decay=1e-3)),
    "adam": (torch.optim.Adam, optim.Adam, dict(lr=1e-2)),
    "adam_betas_eps_wd": (torch.optim.Adam, optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99),
                                                              eps=1e-7, weight_decay=1e-2)),
}


@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("loss", ["xent_indices", "xent_probabilities", "mse_mean", "mse_sum"])
@pytest.mark.parametrize("opt", list(OPTIMISERS))
def test_forty_training_steps_follow_pytorch_in_float64(activation, loss, opt):
    """Forward, loss, backward and step, forty times, from the same weights: every parameter
    within 1e-12 (relative to its largest element) of PyTorch's, and the losses alike. Seen
    on PyTorch 2.13.0: at most 1.2e-14. A wrong rule (weight decay after momentum, Adam's
    eps inside the square root, a mean over the wrong count) is off by 1e-3 or more within
    a few steps."""
    theirs, ours = _models(activation)
    t_opt_cls, c_opt_cls, kwargs = OPTIMISERS[opt]
    if loss == "mse_sum":       # a sum over 155 elements: a step 155x a mean's (kept stable)
        kwargs = {**kwargs, "lr": kwargs["lr"] / 20}
    t_opt, c_opt = t_opt_cls(theirs.parameters(), **kwargs), c_opt_cls(ours.parameters(), **kwargs)
    t_loss, c_loss = _losses(loss)
    x, target = _data(loss)
    tx, ttarget = torch.from_numpy(x), torch.from_numpy(target)
    for _ in range(40):
        t_opt.zero_grad()
        t_value = t_loss(theirs(tx), ttarget)
        t_value.backward()
        t_opt.step()
        c_opt.zero_grad()
        c_value = c_loss(ours(x), target)
        ours.backward(c_loss.backward())
        c_opt.step()
        assert abs(float(c_value) - t_value.item()) <= 1e-12 * max(1.0, abs(t_value.item()))
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        q = q.detach().numpy()
        assert np.abs(p.data - q).max() <= 1e-12 * np.abs(q).max(), name


def test_one_float32_step_matches_pytorch_gradients_within_the_float32_tolerance():
    """float32 through the fused layers (activation= on Linear): the input and parameter
    gradients within MATH.md §7's 1e-4 of PyTorch's own float32 autograd."""
    torch.manual_seed(3)
    theirs = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(),
                                 torch.nn.Linear(HIDDEN, CLASSES), torch.nn.Sigmoid())
    ours = nn.Sequential(nn.Linear(IN, HIDDEN, activation="relu"),
                         nn.Linear(HIDDEN, CLASSES, activation="sigmoid"))
    ours.load_state_dict({k.replace("2.", "1."): v for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(1).standard_normal((BATCH, IN)).astype(np.float32)
    target = np.random.default_rng(2).random((BATCH, CLASSES)).astype(np.float32)
    tx = torch.from_numpy(x).requires_grad_()
    torch.nn.MSELoss()(theirs(tx), torch.from_numpy(target)).backward()
    loss = nn.MSELoss()
    loss(ours(x), target)
    dx = ours.backward(loss.backward())

    def rel(a, b):
        return np.abs(a - b).max() / np.abs(b).max()

    assert rel(dx, tx.grad.numpy()) < 1e-4
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert p.grad.dtype == np.float32 and rel(p.grad, q.grad.numpy()) < 1e-4


def test_cpu_tensors_come_in_without_a_copy_and_a_step_updates_them():
    """README: a CPU tensor with DLPack runs on the NumPy backend; nn.Parameter(tensor) is a
    NumPy array over the tensor's memory, so that a step updates the tensor."""
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    param = nn.Parameter(w)
    assert isinstance(param.data, np.ndarray) and np.shares_memory(param.data, w.numpy())
    param.grad = np.ones((2, 3), np.float32)
    optim.SGD([param], lr=0.5).step()
    assert torch.equal(w, torch.arange(6, dtype=torch.float32).reshape(2, 3) - 0.5)
    x = torch.randn(4, 3)
    assert np.array_equal(F.linear(x, w), x.numpy() @ w.numpy().T)
    assert np.array_equal(cugrad.to_numpy(x), x.numpy())


@pytest.mark.parametrize("make, words", [
    (lambda: torch.nn.Parameter(torch.ones(2, 3)), r"refuses to share its memory: .*detach"),
    (lambda: torch.ones(2, 3, dtype=torch.bfloat16), r"cannot be read through DLPack"),
    (lambda: torch.conj(torch.ones(2, 3, dtype=torch.complex64) * (1 + 2j)).imag,
     r"lazily negated view .*resolve_neg"),
])
def test_tensors_pytorch_will_not_export_as_they_are_get_cugrads_words(make, words):
    """A tensor that requires grad, a bfloat16 tensor and a lazily negated view (whose DLPack
    export, on PyTorch 2.13.0, carries the memory without the negation: -2 read as +2) are
    TypeErrors naming the argument, from the ops and from the conversions."""
    tensor = make()
    for call in (lambda: F.relu(tensor), lambda: nn.Parameter(tensor),
                 lambda: cugrad.asarray(tensor), lambda: cugrad.to_numpy(tensor)):
        with pytest.raises(TypeError, match=words):
            call()
    # what PyTorch's own remedy gives is taken, with the values the tensor holds
    fixed = tensor.detach().float().resolve_neg()
    assert np.array_equal(F.relu(fixed), np.maximum(fixed.numpy(), 0))


def test_module_names_and_a_tied_state_dict_are_pytorchs():
    """The same tied model in both libraries (one weight shared by two layers, one module held
    under two names): parameter, module and state-dict names equal PyTorch's, with its
    arguments (prefix, recurse, remove_duplicate); PyTorch's state dict loads."""

    class Theirs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.c = self.d = torch.nn.ReLU()

    class Ours(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3, dtype=None), nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.c = self.d = nn.ReLU()

    theirs, ours = Theirs(), Ours()

    def names(pairs):
        return [name for name, _ in pairs]

    for kwargs in ({}, {"prefix": "net"}, {"recurse": False}, {"remove_duplicate": False}):
        assert names(ours.named_parameters(**kwargs)) == names(theirs.named_parameters(**kwargs))
    for kwargs in ({}, {"prefix": "m"}, {"remove_duplicate": False}):
        assert names(ours.named_modules(**kwargs)) == names(theirs.named_modules(**kwargs))
    assert names(ours.named_children()) == names(theirs.named_children())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert ours.b.weight is ours.a.weight and ours.a.weight.dtype == np.float32
    x = np.random.default_rng(3).standard_normal((4, 3)).astype(np.float32)
    with torch.no_grad():
        want = theirs.c(theirs.b(theirs.a(torch.from_numpy(x)))).numpy()
    np.testing.assert_allclose(ours.c(ours.b(ours.a(x))), want, rtol=1e-6, atol=1e-7)


def test_gradients_held_as_tensors_are_put_back_and_zeroed_or_refused_whole():
    """A weight gradient held as a PyTorch tensor (F.accumulate writes through it) was not
    put back when the bias's sum overflowed under warnings made errors; zero_grad(
    set_to_none=False) zeroed the weight's gradient, then raised PyTorch's own error on a
    bias gradient that requires grad."""
    import warnings

    layer = nn.Linear(2, 2, rng=0)
    layer(np.ones((1, 2), np.float32))
    layer.weight.grad = torch.zeros(2, 2)
    layer.bias.grad = np.full(2, 3e38, np.float32)
    with warnings.catch_warnings(), np.errstate(all="warn"):
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning):
            layer.backward(np.full((1, 2), 2e38, np.float32), input_grad=False)
    assert torch.equal(layer.weight.grad, torch.zeros(2, 2))
    layer.weight.grad = torch.ones(2, 2)
    layer.bias.grad = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError, match=r"^Linear\.zero_grad: .*bias\.grad"):
        layer.zero_grad(set_to_none=False)
    assert torch.equal(layer.weight.grad, torch.ones(2, 2))
    layer.bias.grad = torch.ones(2)
    layer.zero_grad(set_to_none=False)
    assert torch.equal(layer.weight.grad, torch.zeros(2, 2))
    assert torch.equal(layer.bias.grad, torch.zeros(2))
