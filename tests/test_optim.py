"""Optimiser steps against PyTorch's update rules, written out in float64."""

import numpy as np
import pytest

import cugrad.functional as F
from cugrad import nn, optim
from conftest import randn, rel_err


def sgd_reference(p, grads, lr, momentum, wd):
    """torch.optim.SGD (dampening 0, no Nesterov): first step buf = g, then
    buf = momentum·buf + g; p -= lr·buf."""
    p, buf = p.astype(np.float64), None
    for g in grads:
        g = g + wd * p
        if momentum:
            buf = g.copy() if buf is None else momentum * buf + g
            g = buf
        p = p - lr * g
    return p


def adam_reference(p, grads, lr, b1, b2, eps, wd):
    """torch.optim.Adam (amsgrad off): L2 decay into g, bias-corrected moments."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def run(backend, opt_cls, kwargs, p0, grads):
    param = nn.Parameter(backend.put(p0.copy()))   # updated in place
    opt = opt_cls([param], **kwargs)
    for g in grads:
        param.grad = backend.put(g)
        opt.step()
    return param.data


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 0.0), (0.0, 0.01), (0.5, 0.1)])
def test_sgd_matches_pytorch_rule(backend, dtype, rng, momentum, wd):
    p0 = randn(rng, 7, 33, dtype=dtype)
    grads = [randn(rng, 7, 33, dtype=dtype) for _ in range(5)]
    out = run(backend, optim.SGD, dict(lr=0.1, momentum=momentum, weight_decay=wd), p0, grads)
    ref = sgd_reference(p0, grads, 0.1, momentum, wd)
    assert out.dtype == dtype
    assert rel_err(out, ref) < (1e-6 if dtype == np.float32 else 1e-14)


@pytest.mark.parametrize("lr,betas,eps,wd", [(1e-3, (0.9, 0.999), 1e-8, 0.0),
                                             (1e-2, (0.8, 0.99), 1e-6, 0.05)])
def test_adam_matches_pytorch_rule(backend, dtype, rng, lr, betas, eps, wd):
    p0 = randn(rng, 127, dtype=dtype)
    grads = [randn(rng, 127, dtype=dtype) for _ in range(6)]
    out = run(backend, optim.Adam, dict(lr=lr, betas=betas, eps=eps, weight_decay=wd), p0, grads)
    ref = adam_reference(p0, grads, lr, *betas, eps, wd)
    assert rel_err(out, ref) < (1e-6 if dtype == np.float32 else 1e-13)


def test_capturable_adam_matches_the_host_count(backend, dtype, rng):
    """Adam(capturable=True) counts steps in a 0-d int64 array on the parameter's device and
    forms the bias corrections from it: fails if its parameters drift from the default
    Adam's beyond rounding (the device's pow may differ from the host's in the last bit;
    the NumPy backend computes the same floats exactly), if a parameter without a gradient
    is counted, or if the counter does not hold the number of steps taken."""
    p0 = randn(rng, 127, dtype=dtype)
    grads = [randn(rng, 127, dtype=dtype) for _ in range(6)]
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    host_count = run(backend, optim.Adam, kwargs, p0, grads)
    param, idle = nn.Parameter(backend.put(p0.copy())), nn.Parameter(backend.put(p0.copy()))
    opt = optim.Adam([param, idle], capturable=True, **kwargs)
    for g in grads:
        param.grad = backend.put(g)
        opt.step()
    counter = opt.state[id(param)]["step"]
    assert counter.shape == () and counter.dtype == np.int64 and int(counter) == len(grads)
    assert "step" not in opt.state[id(idle)]
    if backend.name == "numpy":
        assert np.array_equal(backend.get(param.data), backend.get(host_count))
    else:
        rel = rel_err(param.data, backend.get(host_count).astype(np.float64))
        assert rel < (1e-6 if dtype == np.float32 else 1e-14)
    with pytest.raises(TypeError, match="capturable"):
        optim.Adam([param], capturable=1)


@pytest.mark.parametrize("first", [False, True], ids=["host-then-device", "device-then-host"])
def test_switching_capturable_between_steps_keeps_the_count(backend, rng, first):
    """``opt.capturable`` flipped after 2 of 6 steps (as the graph's error message suggests)
    gives the updates of 6 counted steps: the host count became the device counter's start
    (it was taken as the counter itself and stayed 2: 0.12 off after 6 steps), and a device
    counter went back to a host int (it was incremented twice a step on the GPU)."""
    kwargs = dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)
    p0 = randn(rng, 5, 3, dtype=np.float64)
    grads = [randn(rng, 5, 3, dtype=np.float64) for _ in range(6)]
    param = nn.Parameter(backend.put(p0.copy()))
    opt = optim.Adam([param], capturable=first, **kwargs)
    for t, g in enumerate(grads):
        if t == 2:
            opt.capturable = not first
        param.grad = backend.put(g)
        opt.step()
    ref = adam_reference(p0, grads, kwargs["lr"], *kwargs["betas"], kwargs["eps"], 0.0)
    assert rel_err(param.data, ref) < 1e-13
    step = opt.state[id(param)]["step"]
    assert isinstance(step, int) == first, type(step)   # the form the final setting keeps
    assert int(backend.get(step)) == 6



def test_adam_step_counter_argument(backend):
    """F.adam_step(step=<0-d int64 array>) increments the counter in place and uses the new
    value as t (equal to step=t); a counter of another dtype, shape or device, or (on the
    CPU) a negative one, is a ValueError naming the step counter."""
    p = backend.put(np.linspace(-1, 1, 10).astype(np.float32))
    g = backend.put(np.linspace(2, -3, 10).astype(np.float32))
    out = {}
    for kind in ("int", "counter"):
        q, m, v = p.copy(), p * 0, p * 0
        counter = backend.put(np.array(2, np.int64)) if kind == "counter" else None
        F.adam_step(q, g, m, v, step=counter if kind == "counter" else 3, lr=0.1)
        out[kind] = backend.get(q)
        if counter is not None:
            assert int(backend.get(counter)) == 3
    np.testing.assert_allclose(out["counter"], out["int"], rtol=1e-6, atol=0)
    for bad in (np.array(2, np.int32), np.array([2], np.int64), np.array(2.0)):
        with pytest.raises(ValueError, match="step counter"):
            F.adam_step(p, g, p * 0, p * 0, step=backend.put(bad, dtype=bad.dtype), lr=0.1)
    if backend.name == "numpy":
        with pytest.raises(ValueError, match="step counter holds -1"):
            F.adam_step(p, g, p * 0, p * 0, step=np.array(-1, np.int64), lr=0.1)
    else:
        with pytest.raises(ValueError, match="step counter"):
            F.adam_step(p, g, p * 0, p * 0, step=np.array(2, np.int64), lr=0.1)


def test_parameters_without_grad_are_skipped(backend):
    a = nn.Parameter(backend.put(np.ones(3, np.float32)))
    b = nn.Parameter(backend.put(np.ones(3, np.float32)))
    a.grad = backend.put(np.full(3, 2.0, np.float32))
    opt = optim.SGD([a, b], lr=0.5)
    opt.step()
    assert np.array_equal(backend.get(a.data), np.zeros(3, np.float32))
    assert np.array_equal(backend.get(b.data), np.ones(3, np.float32))
    opt.zero_grad()
    assert a.grad is None


@pytest.mark.parametrize("make", [lambda ps: optim.SGD(ps, lr=0.5, momentum=0.9),
                                  lambda ps: optim.Adam(ps, lr=0.5)], ids=["sgd", "adam"])
def test_a_parameter_without_grad_first_does_not_stop_the_step(backend, make):
    """A frozen or unused first layer: the parameters after it are still updated (a `break`
    for the `continue` passed the test above, whose gradient-less parameter came last)."""
    a = nn.Parameter(backend.put(np.ones(3, np.float32)))
    b = nn.Parameter(backend.put(np.ones(3, np.float32)))
    b.grad = backend.put(np.full(3, 2.0, np.float32))
    make([a, b]).step()
    assert np.array_equal(backend.get(a.data), np.ones(3, np.float32))
    assert (backend.get(b.data) < 1).all()


def test_sgd_step_refuses_a_momentum_buffer_without_momentum():
    p, buf = np.ones(3, np.float32), np.full(3, 7.0, np.float32)
    with pytest.raises(ValueError, match="momentum_buf must be given exactly when momentum > 0"):
        F.sgd_step(p, np.ones(3, np.float32), buf, lr=0.1, momentum=0.0)
    assert (buf == 7).all() and (p == 1).all()


@pytest.mark.parametrize("bad", [dict(lr=float("nan")), dict(lr=-1.0), dict(momentum=-0.1),
                                 dict(weight_decay=float("inf")), dict(lr="fast")])
def test_sgd_rejects_bad_hyperparameters(bad):
    kwargs = {"lr": 0.1, **bad}
    with pytest.raises((ValueError, TypeError), match=next(iter(bad))):
        optim.SGD(nn.Linear(2, 2).parameters(), **kwargs)


@pytest.mark.parametrize("bad,name", [(dict(betas=(1.0, 0.9)), "betas"),
                                      (dict(betas=(0.9, float("nan"))), "betas"),
                                      (dict(betas=(0.9,)), "betas"), (dict(eps=-1e-8), "eps"),
                                      (dict(lr=float("nan")), "lr")])
def test_adam_rejects_bad_hyperparameters(bad, name):
    with pytest.raises((ValueError, TypeError), match=name):
        optim.Adam(nn.Linear(2, 2).parameters(), **bad)


def test_optimizer_rejects_non_parameters():
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match="Parameter"):
        optim.SGD([np.ones(3)], lr=0.1)


def test_functional_steps_validate_in_place_arrays():
    p = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        F.sgd_step(p[:, ::2], np.ones((4, 2), np.float32), lr=0.1)
    with pytest.raises(ValueError, match="momentum_buf"):
        F.sgd_step(p, p.copy(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="step"):
        F.adam_step(p, p.copy(), p.copy(), p.copy(), step=0, lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        F.adam_step(p, p.copy(), p.copy(), np.ones(3, np.float32), step=1, lr=0.1)


def test_an_optimiser_subclass_with_the_update_hook_still_steps():
    """A subclass written for ``_update(p, state)`` (check and update in one) keeps working."""
    class Halve(optim.Optimizer):
        def _update(self, p, state):
            p.data *= 0.5

    p = nn.Parameter(np.ones(3, np.float32))
    p.grad = np.ones(3, np.float32)
    Halve([p]).step()
    np.testing.assert_array_equal(p.data, np.full(3, 0.5, np.float32))
    with pytest.raises(NotImplementedError, match="defines neither _check nor _update"):
        optim.Optimizer([p]).step()


@pytest.mark.parametrize("op,kwargs,name", [
    ("sgd", dict(lr=0.1, momentum=0.9, weight_decay=1e-50), "weight_decay"),
    ("sgd", dict(lr=1e-40), "lr"),                           # a float32 subnormal
    ("sgd", dict(lr=1e39), "lr"),                            # inf in float32
    ("sgd", dict(lr=0.1, momentum=1e-45), "momentum"),
    ("adam", dict(lr=0.1, eps=1e-46), "eps"),                # 0 in float32: 0/0
    ("adam", dict(lr=0.1, weight_decay=1e-50), "weight_decay"),
    ("adam", dict(lr=0.1, beta1=1e-39), "beta1"),
])
def test_hyperparameters_must_be_normal_numbers_of_the_parameters_dtype(backend, op, kwargs,
                                                                        name):
    """In float32, weight_decay=1e-50 is 0: the NumPy backend still multiplied 0·inf = NaN
    where the kernel skipped the term, so NaN positions differed (p = [inf, nan, 1]); an eps
    of 0 gives 0/0. Refused, naming the value and the dtype, before anything changes; the
    same values are normal float64 numbers and work there."""
    def arrays(dtype):
        p = backend.put(np.array([np.inf, np.nan, 1.0], dtype), dtype=dtype)
        return p, backend.put(np.ones(3, dtype), dtype=dtype), [backend.put(np.zeros(3, dtype),
                                                                          dtype=dtype)
                                                              for _ in range(2)]
    p, g, (m, v) = arrays(np.float32)
    before = backend.get(p).copy()
    with pytest.raises(ValueError, match=rf"{name}=.* normal float32 number") as err:
        if op == "sgd":
            F.sgd_step(p, g, m if kwargs.get("momentum") else None, **kwargs)
        else:
            F.adam_step(p, g, m, v, step=1, **kwargs)
    assert "param is" in str(err.value)
    np.testing.assert_array_equal(backend.get(p), before)
    if kwargs.get("lr") == 1e39 or kwargs.get("lr") == 1e-40:
        return
    p, g, (m, v) = arrays(np.float64)
    with np.errstate(invalid="ignore"):           # inf - inf: the NaN the update must give
        if op == "sgd":
            F.sgd_step(p, g, m if kwargs.get("momentum") else None, **kwargs)
        else:
            F.adam_step(p, g, m, v, step=1, **kwargs)
    out = backend.get(p)
    assert np.isnan(out[1]) and np.isfinite(out[2])
    assert np.isnan(out[0]) == (name == "weight_decay")     # inf + wd·inf, then inf - inf


def test_an_optimiser_refuses_a_subnormal_weight_decay_for_float32_parameters():
    layer = nn.Linear(3, 2, rng=0)
    for p in layer.parameters():
        p.grad = np.ones_like(p.data)
    before = [p.data.copy() for p in layer.parameters()]
    opt = optim.SGD(layer.parameters(), lr=0.1, weight_decay=1e-50)
    with pytest.raises(ValueError, match="weight_decay=1e-50"):
        opt.step()
    for p, b in zip(layer.parameters(), before):
        np.testing.assert_array_equal(p.data, b)
