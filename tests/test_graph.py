"""cugrad.capture_train_step: a whole training step captured as a CUDA graph and replayed.

CPU tests (always run): argument validation, the clear error where the CUDA backend is
unavailable, the value checks that capture skips, the demo's ``--graph`` and
``--optimizer`` options.

GPU tests (``@pytest.mark.gpu``, skipped with the reason where no CUDA device works):
replays give bit for bit the parameters, momentum buffers, gradients and losses of eager
steps (SGD with momentum and weight decay, cross-entropy and MSE, float32 and float64);
capture leaves the model as it was; inputs of the wrong shape, dtype or device are refused;
the default memory pool does not grow over 100 replays; Adam, CPU data, a step that
synchronises the host, replaced parameters and changed hyperparameters are clear errors;
the demo trains in graph mode exactly as eagerly.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import cugrad
import cugrad.functional as F
from cugrad import _checks, nn, optim

BATCH, N_IN, N_OUT = 37, 20, 7


def build_model(device="cpu", dtype="float32", seed=0):
    """Fused ReLU, a separate Tanh and a bias-less Linear: every kind of layer backward."""
    rng = np.random.default_rng(seed)
    return nn.Sequential(
        nn.Linear(N_IN, 48, rng=rng, dtype=dtype, activation="relu"),
        nn.Linear(48, 33, rng=rng, dtype=dtype),
        nn.Tanh(),
        nn.Linear(33, N_OUT, bias=False, rng=rng, dtype=dtype),
    ).to(device)


def make_sgd(model):
    return optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)


def host_batches(n, loss, dtype="float32", seed=1):
    """n (x, y) pairs on the host: class indices for "xent", float targets for "mse"."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.standard_normal((BATCH, N_IN)).astype(dtype)
        y = (rng.integers(0, N_OUT, BATCH) if loss == "xent"
             else rng.standard_normal((BATCH, N_OUT)).astype(dtype))
        out.append((x, y))
    return out


def loss_module(loss):
    return nn.CrossEntropyLoss() if loss == "xent" else nn.MSELoss()


# ------------------------------------------------------------------------ CPU: arguments

def _cpu_setup():
    model = build_model()
    x, y = host_batches(1, "xent")[0]
    return model, nn.CrossEntropyLoss(), make_sgd(model), x, y


class _CustomOptimizer(optim.Optimizer):
    def _check(self, p, state):
        return lambda: None


@pytest.mark.parametrize("change,error,words", [
    ("model", TypeError, "model must be a cugrad.nn.Module"),
    ("loss_fn", TypeError, "loss_fn must be a cugrad.nn.Module"),
    ("optimizer", TypeError, "optimizer must be a cugrad.optim.Optimizer"),
    ("adam", NotImplementedError, "Adam cannot be captured"),
    ("custom", NotImplementedError, "only optim.SGD"),
    ("warmup=0", ValueError, "warmup must be an integer >= 1"),
    ("warmup=True", ValueError, "warmup must be an integer >= 1"),
    ("warmup=1.5", ValueError, "warmup must be an integer >= 1"),
])
def test_arguments_are_checked_before_any_device_work(change, error, words):
    model, loss_fn, opt, x, y = _cpu_setup()
    kwargs = {}
    if change == "model":
        model = lambda v: v                                    # noqa: E731
    elif change == "loss_fn":
        loss_fn = F.cross_entropy
    elif change == "optimizer":
        opt = "sgd"
    elif change == "adam":
        opt = optim.Adam(model.parameters())
    elif change == "custom":
        opt = _CustomOptimizer(model.parameters())
    else:
        kwargs["warmup"] = {"warmup=0": 0, "warmup=True": True, "warmup=1.5": 1.5}[change]
    with pytest.raises(error, match=words):
        cugrad.capture_train_step(model, loss_fn, opt, x, y, **kwargs)


def test_adam_error_says_why():
    model, loss_fn, _, x, y = _cpu_setup()
    with pytest.raises(NotImplementedError) as info:
        cugrad.capture_train_step(model, loss_fn, optim.Adam(model.parameters()), x, y)
    assert "step count" in str(info.value) and "capturable=True" in str(info.value)


@pytest.mark.skipif(cugrad.cuda_available(), reason="checks the error where CUDA is "
                    "unavailable; test_cpu_data_is_refused_on_a_gpu_machine covers a GPU")
def test_numpy_backend_is_a_clear_error():
    model, loss_fn, opt, x, y = _cpu_setup()
    before = [p.data.copy() for p in model.parameters()]
    with pytest.raises(cugrad.BackendUnavailableError,
                       match="CUDA graphs need the CUDA backend") as info:
        cugrad.capture_train_step(model, loss_fn, opt, x, y)
    assert cugrad.cuda_unavailable_reason() in str(info.value)
    assert all(np.array_equal(b, p.data) for b, p in zip(before, model.parameters()))


def test_train_step_graph_is_built_only_by_capture():
    with pytest.raises(TypeError, match="capture_train_step"):
        cugrad.TrainStepGraph()


# --------------------------------------------------------------- CPU: value checks skipped

class _Unreadable:
    """Stands for a device array of class indices whose values must not be read (that
    would synchronise)."""

    dtype = np.dtype(np.int64)

    def min(self):
        raise AssertionError("a value was read")

    max = min

    def view(self, dtype):
        return self


def test_value_checks_run_normally():
    with pytest.raises(ValueError, match="class index 9, out of range for 7 classes"):
        F.cross_entropy(np.zeros((2, 7), np.float32), np.array([0, 9]))
    with pytest.raises(ValueError, match="contains NaN"):
        F.mse_loss(np.zeros(3, np.float32), np.array([0, np.nan, 0], np.float32))


def test_value_checks_skipped_inside_the_block_only_and_only_in_its_thread():
    nan_target = np.array([0, np.nan, 0], np.float32)
    seen_in_other_thread = []

    def other_thread():
        try:
            _checks.check_no_nan("op", "target", nan_target, np)
        except ValueError:
            seen_in_other_thread.append("checked")

    with _checks.device_value_checks_skipped():
        _checks.check_class_indices("op", "target", _Unreadable(), 7)
        _checks.check_no_nan("op", "target", nan_target, np)
        with _checks.device_value_checks_skipped():       # nesting keeps it off
            pass
        _checks.check_class_indices("op", "target", _Unreadable(), 7)
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen_in_other_thread == ["checked"]
    with pytest.raises(AssertionError, match="a value was read"):
        _checks.check_class_indices("op", "target", _Unreadable(), 7)


# -------------------------------------------------------------------------- CPU: the demo

@pytest.fixture
def demo():
    pytest.importorskip("sklearn", reason="the demo's data set ships with scikit-learn "
                        "(pip install 'cugrad[examples]')")
    import cugrad.demo
    return cugrad.demo


def test_demo_graph_needs_a_gpu(demo):
    with pytest.raises(SystemExit, match="--graph needs the CUDA backend"):
        demo.train(epochs=1, graph=True, device="cpu", progress=False)


def test_demo_graph_builds_a_capturable_adam(demo):
    opt, text = demo.make_optimizer("adam", build_model().parameters(), 1e-3, graph=True)
    assert isinstance(opt, optim.Adam) and opt.capturable and "capturable" in text
    opt, _ = demo.make_optimizer("adam", build_model().parameters(), 1e-3)
    assert not opt.capturable


def test_demo_sgd_option_trains(demo, capsys):
    result = demo.train(epochs=8, optimizer="sgd", device="cpu", progress=False)
    assert result["test_accuracy"] > 0.95
    assert result["losses"][-1] < 0.1 * result["losses"][0]
    assert "SGD lr=0.05 momentum=0.9" in capsys.readouterr().out


# --------------------------------------------------------------------------------- GPU

@pytest.fixture
def cp(gpu):
    """CuPy with poisoned outputs (conftest's ``gpu``); the poisoning fills are captured into
    the graph as well."""
    return gpu


def on_gpu(batches, dtype="float32"):
    return [(cugrad.asarray(x, device="cuda"),
             cugrad.asarray(y, device="cuda", dtype=np.int64 if y.dtype.kind == "i" else dtype))
            for x, y in batches]


def host(a):
    return None if a is None else cugrad.to_numpy(a).copy()


def snapshot(model, opt):
    """Host copies of every parameter, gradient and momentum buffer."""
    return {"data": [host(p.data) for p in model.parameters()],
            "grad": [host(p.grad) for p in model.parameters()],
            "buf": [host(opt.state[id(p)].get("momentum_buf")) for p in model.parameters()]}


def eager_step(model, opt, loss_fn, x, y):
    """One training step run op by op (what a captured step replays)."""
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    opt.step()
    return loss


def assert_replays_match_eager(step, graph_model, eager_model, eager_opt, batches):
    """Replay ``step`` and run an eager step on each batch: the parameters bitwise equal
    after every one."""
    eager_loss = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(batches):
        step(x, y)
        eager_step(eager_model, eager_opt, eager_loss, x, y)
        for p, q in zip(graph_model.parameters(), eager_model.parameters()):
            assert np.array_equal(host(p.data), host(q.data)), f"step {i}: replay != eager"


def assert_bitwise_equal(a, b, what):
    for i, (u, v) in enumerate(zip(a, b)):
        if u is None or v is None:
            assert u is None and v is None, f"{what}[{i}]: one is None"
        else:
            assert u.dtype == v.dtype and np.array_equal(u, v), \
                f"{what}[{i}] differs: max |diff| {np.abs(u - v).max()}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_replays_equal_eager_steps_bitwise(cp, loss, dtype):
    batches = on_gpu(host_batches(6, loss, dtype), dtype)
    eager_model, graph_model = build_model("cuda", dtype), build_model("cuda", dtype)
    eager_opt, graph_opt = make_sgd(eager_model), make_sgd(graph_model)
    eager_loss, graph_loss = loss_module(loss), loss_module(loss)
    initial = snapshot(graph_model, graph_opt)

    step = cugrad.capture_train_step(graph_model, graph_loss, graph_opt, *batches[0])
    # Capture changed nothing: the warm-up steps were undone.
    after_capture = snapshot(graph_model, graph_opt)
    assert_bitwise_equal(after_capture["data"], initial["data"], "parameter after capture")
    assert all(g is None for g in after_capture["grad"])
    assert all(b is not None and not b.any() for b in after_capture["buf"])

    for i, (x, y) in enumerate(batches):
        expected = eager_step(eager_model, eager_opt, eager_loss, x, y)
        got = step(x, y)
        assert got.shape == () and got.dtype == np.dtype(dtype)
        assert host(got) == host(expected), f"loss of step {i}"
        now_eager, now_graph = snapshot(eager_model, eager_opt), snapshot(graph_model, graph_opt)
        for what in ("data", "grad", "buf"):
            assert_bitwise_equal(now_graph[what], now_eager[what], f"step {i}: {what}")


@pytest.mark.gpu
def test_a_frozen_layers_gradient_is_one_steps_not_accumulated(cp):
    """The optimiser updates only the last layer: the first layer's gradient after a replay
    is that step's gradient (as eagerly after zero_grad), not the sum of the warm-ups, the
    capture and every replay; a gradient it held before capture is left untouched."""
    batches = on_gpu(host_batches(3, "xent"))
    eager_model, graph_model = build_model("cuda"), build_model("cuda")
    frozen = graph_model[0].weight
    before = cugrad.asarray(np.full(frozen.shape, 7.0, np.float32), device="cuda")
    frozen.grad = before
    step = cugrad.capture_train_step(graph_model, nn.CrossEntropyLoss(),
                                     optim.SGD(graph_model[3].parameters(), lr=0.05), *batches[0])
    assert frozen.grad is before and (host(before) == 7.0).all()
    eager_opt = optim.SGD(eager_model[3].parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(batches):
        eager_model.zero_grad()
        crit(eager_model(x), y)
        eager_model.backward(crit.backward(), input_grad=False)
        eager_opt.step()
        step(x, y)
        assert_bitwise_equal([host(p.grad) for p in graph_model.parameters()],
                             [host(p.grad) for p in eager_model.parameters()], f"step {i}: grad")
        assert_bitwise_equal([host(p.data) for p in graph_model.parameters()],
                             [host(p.data) for p in eager_model.parameters()], f"step {i}: data")


@pytest.mark.gpu
def test_loss_is_a_static_buffer_and_outlives_the_graph(cp):
    (x1, y1), (x2, y2) = on_gpu(host_batches(2, "xent"))
    model = build_model("cuda")
    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(), make_sgd(model), x1, y1)
    first = step(x1, y1)
    value = float(first)
    assert np.isfinite(value)
    second = step(x2, y2)
    assert second is first                      # the same buffer, overwritten
    kept = float(second.copy())
    grads = [p.grad for p in model.parameters()]
    del step
    gc.collect()
    cp.get_default_memory_pool().free_all_blocks()
    # The loss and the gradients still read the graph's memory, kept alive by them.
    assert float(second) == kept
    assert all(np.isfinite(host(g)).all() for g in grads)


@pytest.mark.gpu
def test_replay_follows_the_current_stream(cp):
    batches = on_gpu(host_batches(3, "xent"))
    reference, model = build_model("cuda"), build_model("cuda")
    ref_opt, opt = make_sgd(reference), make_sgd(model)
    ref_step = cugrad.capture_train_step(reference, nn.CrossEntropyLoss(), ref_opt, *batches[0])
    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(), opt, *batches[0])
    expected = [float(ref_step(x, y)) for x, y in batches]
    user_stream = cp.cuda.Stream(non_blocking=True)
    got = []
    with user_stream:
        for x, y in batches:
            x, y = x.copy(), y.copy()            # produced on this stream
            got.append(step(x, y).copy())
    user_stream.synchronize()
    assert [float(v) for v in got] == expected
    assert_bitwise_equal(snapshot(model, opt)["data"], snapshot(reference, ref_opt)["data"],
                         "parameter")


@pytest.mark.gpu
def test_inputs_are_validated(cp):
    (x, y), = on_gpu(host_batches(1, "xent"))
    model = build_model("cuda")
    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(), make_sgd(model), x, y)
    cases = [
        (x[:-1], y, ValueError, r"argument 'x' has shape \(36, 20\).*expected \(37, 20\)"),
        (x, y[:-1], ValueError, r"argument 'y' has shape \(36,\).*expected \(37,\)"),
        (x.astype(cp.float64), y, TypeError, "argument 'x' has dtype float64.*expected float32"),
        (x, y.astype(cp.int32), TypeError, "argument 'y' has dtype int32.*expected int64"),
        (cugrad.to_numpy(x), y, ValueError, "argument 'x' is on the CPU.*cugrad.asarray"),
        (x, cugrad.to_numpy(y), ValueError, "argument 'y' is on the CPU"),
        (x.tolist(), y, TypeError, "argument 'x' must be a NumPy or CuPy array"),
    ]
    for bad_x, bad_y, error, words in cases:
        with pytest.raises(error, match=words):
            step(bad_x, bad_y)
    assert np.isfinite(float(step(x, y)))       # still usable
    assert np.isfinite(float(step(cp.asfortranarray(x), y)))   # any layout is copied in


@pytest.mark.gpu
def test_default_pool_does_not_grow_over_100_replays(cp):
    (x, y), = on_gpu(host_batches(1, "xent"))
    model = build_model("cuda")
    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(), make_sgd(model), x, y)
    step(x, y)
    cp.cuda.Device().synchronize()
    default_pool = cp.get_default_memory_pool()
    used, private = default_pool.used_bytes(), step._pool.used_bytes()
    for _ in range(100):
        step(x, y)
    cp.cuda.Device().synchronize()
    assert default_pool.used_bytes() == used
    assert step._pool.used_bytes() == private
    assert np.isfinite(float(step(x, y)))


@pytest.mark.gpu
def test_adam_is_refused_on_the_gpu_too(cp):
    (x, y), = on_gpu(host_batches(1, "xent"))
    model = build_model("cuda")
    with pytest.raises(NotImplementedError, match="Adam cannot be captured"):
        cugrad.capture_train_step(model, nn.CrossEntropyLoss(),
                                  optim.Adam(model.parameters()), x, y)


@pytest.mark.gpu
def test_cpu_data_is_refused_on_a_gpu_machine(cp):
    (x, y), = host_batches(1, "xent")
    model = build_model("cuda")
    with pytest.raises(ValueError, match="argument 'x_example' is on the CPU"):
        cugrad.capture_train_step(model, nn.CrossEntropyLoss(), make_sgd(model), x, y)
    cpu_model = build_model("cpu")
    (xd, yd), = on_gpu([(x, y)])
    with pytest.raises(ValueError, match=r"parameter '0\.weight' is on cpu.*model\.to"):
        cugrad.capture_train_step(cpu_model, nn.CrossEntropyLoss(), make_sgd(cpu_model),
                                  xd, yd)


@pytest.mark.gpu
def test_examples_are_value_checked_and_a_failed_capture_changes_nothing(cp):
    (x, y), = host_batches(1, "xent")
    y[3] = N_OUT                                  # out of range
    (x, y), = on_gpu([(x, y)])
    model = build_model("cuda")
    opt = make_sgd(model)
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="class index 7, out of range for 7 classes"):
        cugrad.capture_train_step(model, nn.CrossEntropyLoss(), opt, x, y)
    assert_bitwise_equal(snapshot(model, opt)["data"], before["data"], "parameter")


@pytest.mark.gpu
def test_replayed_out_of_range_class_gives_nan_loss(cp):
    (x, y), = on_gpu(host_batches(1, "xent"))
    model = build_model("cuda")
    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(), make_sgd(model), x, y)
    bad = y.copy()
    bad[0] = N_OUT + 5
    assert np.isnan(float(step(x, bad)))          # documented: no host check, NaN instead


class _SynchronisingLoss(nn.CrossEntropyLoss):
    """A loss whose forward waits for the device: legal eagerly, fatal to a capture."""

    def forward(self, logits, target):
        import cupy
        cupy.cuda.get_current_stream().synchronize()
        return super().forward(logits, target)


@pytest.mark.gpu
def test_a_step_that_synchronises_cannot_be_captured(cp):
    (x, y), = on_gpu(host_batches(1, "xent"))
    model = build_model("cuda")
    opt = make_sgd(model)
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="(?s)failed during CUDA graph capture.*must not wait"):
        cugrad.capture_train_step(model, _SynchronisingLoss(), opt, x, y)
    assert_bitwise_equal(snapshot(model, opt)["data"], before["data"], "parameter")
    # The device and the model are fine: a correct step captures and trains.
    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(), opt, x, y)
    assert np.isfinite(float(step(x, y)))


@pytest.mark.gpu
def test_replaced_parameters_and_changed_hyperparameters_are_errors(cp):
    (x, y), = on_gpu(host_batches(1, "xent"))
    model = build_model("cuda")
    opt = make_sgd(model)
    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(), opt, x, y)
    opt.lr = 0.01
    with pytest.raises(RuntimeError, match=r"\(lr, momentum, weight_decay\) changed"):
        step(x, y)
    opt.lr = 0.05
    step(x, y)
    model.load_state_dict({k: cugrad.to_numpy(v) for k, v in model.state_dict().items()})
    with pytest.raises(RuntimeError, match="parameter '0.weight' was replaced since capture"):
        step(x, y)


@pytest.mark.gpu
def test_capture_refused_while_profiling(cp):
    (x, y), = on_gpu(host_batches(1, "xent"))
    model = build_model("cuda")
    with cugrad.profile():
        with pytest.raises(RuntimeError, match="profile"):
            cugrad.capture_train_step(model, nn.CrossEntropyLoss(), make_sgd(model), x, y)
    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(), make_sgd(model), x, y)
    with cugrad.profile() as prof:
        step(x, y)
    assert "graph.replay" in str(prof)


@pytest.mark.gpu
def test_demo_graph_mode_trains_as_eager_sgd(cp, demo, capsys):
    graph = demo.train(epochs=8, optimizer="sgd", graph=True, device="cuda", progress=False)
    eager = demo.train(epochs=8, optimizer="sgd", device="cuda", progress=False)
    out = capsys.readouterr().out
    assert "captured as a CUDA graph" in out and "runs eagerly" in out
    assert graph["test_accuracy"] > 0.95
    np.testing.assert_allclose(graph["losses"], eager["losses"], rtol=1e-6)
    assert graph["test_accuracy"] == eager["test_accuracy"]


@pytest.mark.gpu
def test_demo_graph_mode_trains_with_capturable_adam(cp, demo):
    """The demo's default optimiser in graph mode: fails if it does not learn the digits."""
    result = demo.train(epochs=8, graph=True, device="cuda", progress=False)
    assert result["test_accuracy"] > 0.95


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_capturable_adam_replays_equal_eager_steps(cp, dtype):
    """Replays of a captured Adam(capturable=True) step against the same optimiser run
    eagerly: parameters and moments bitwise equal after every step (the same kernels, the
    step counted on the device), and the device step counters hold the number of steps.
    Against a default (host-count) Adam: equal to float rounding. The device's pow and the
    host's may differ by an ulp or two (CUDA documents 2 for double pow): relative 2e-13 in
    sqrt(1 - 0.999^t) at t = 1, so up to lr * |m/sqrt(v)| (<= ~3.2) * 2e-13 = 7e-15 a step
    on each element whatever its size; hence an absolute term beside the relative one (with
    atol=0 a weight near 0 failed rtol=1e-12 in a simulation with the pow one ulp off). Fails
    if the replays froze t (the bias corrections of step 1 replayed) or if the warm-up steps
    were counted."""
    batches = on_gpu(host_batches(6, "xent", dtype), dtype)
    models = [build_model("cuda", dtype) for _ in range(3)]
    graph_opt, eager_opt, host_opt = (
        optim.Adam(models[0].parameters(), lr=1e-2, weight_decay=1e-3, capturable=True),
        optim.Adam(models[1].parameters(), lr=1e-2, weight_decay=1e-3, capturable=True),
        optim.Adam(models[2].parameters(), lr=1e-2, weight_decay=1e-3))
    losses = [nn.CrossEntropyLoss() for _ in range(3)]
    step = cugrad.capture_train_step(models[0], losses[0], graph_opt, *batches[0])
    for p in models[0].parameters():
        assert int(graph_opt.state[id(p)]["step"]) == 0, "warm-up steps were counted"

    for i, (x, y) in enumerate(batches):
        step(x, y)
        eager_step(models[1], eager_opt, losses[1], x, y)
        eager_step(models[2], host_opt, losses[2], x, y)
        for p, q, r in zip(*(m.parameters() for m in models)):
            assert np.array_equal(host(p.data), host(q.data)), f"step {i}: replay != eager"
            for name in ("exp_avg", "exp_avg_sq"):
                assert np.array_equal(host(graph_opt.state[id(p)][name]),
                                      host(eager_opt.state[id(q)][name])), f"step {i}: {name}"
            np.testing.assert_allclose(host(p.data), host(r.data),
                                       rtol=1e-5 if dtype == "float32" else 1e-12,
                                       atol=1e-7 if dtype == "float32" else 1e-13)
    for p in models[0].parameters():
        assert int(graph_opt.state[id(p)]["step"]) == len(batches)


@pytest.mark.gpu
def test_an_optimiser_state_loaded_after_capture_is_what_the_replays_use(cp):
    """Capture a capturable Adam step, then load a checkpoint (another run's moments and
    step count) into its optimiser: the load writes into the captured buffers, so the
    replays must equal eager steps of an optimiser given the same checkpoint, bitwise. Fails
    if load_state_dict swapped in new arrays (the graph would go on with the old state)."""
    batches = on_gpu(host_batches(5, "xent"))
    donor, graph_model, eager_model = (build_model("cuda") for _ in range(3))
    donor_opt = optim.Adam(donor.parameters(), lr=1e-2, capturable=True)
    loss_fn = nn.CrossEntropyLoss()
    for x, y in batches[:3]:                      # the checkpoint: 3 steps of another run
        eager_step(donor, donor_opt, loss_fn, x, y)
    checkpoint = donor_opt.state_dict()
    graph_opt = optim.Adam(graph_model.parameters(), lr=1e-2, capturable=True)
    eager_opt = optim.Adam(eager_model.parameters(), lr=1e-2, capturable=True)
    step = cugrad.capture_train_step(graph_model, nn.CrossEntropyLoss(), graph_opt, *batches[0])
    graph_opt.load_state_dict(checkpoint)
    eager_opt.load_state_dict(checkpoint)
    assert_replays_match_eager(step, graph_model, eager_model, eager_opt, batches[3:])
    assert all(int(v) == 5 for k, v in graph_opt.state_dict().items() if k.endswith(".step"))


@pytest.mark.gpu
def test_an_empty_optimiser_state_loaded_after_capture_restarts_the_replays(cp):
    """After 2 replays, load_state_dict({}) (every parameter starts afresh): the next
    replays must equal eager steps of a fresh SGD from the same weights. Fails if the load
    dropped the buffers from the optimiser's dict while the graph kept its momentum."""
    batches = on_gpu(host_batches(5, "xent"))
    graph_model, eager_model = build_model("cuda"), build_model("cuda")
    graph_opt = make_sgd(graph_model)
    step = cugrad.capture_train_step(graph_model, nn.CrossEntropyLoss(), graph_opt, *batches[0])
    for x, y in batches[:2]:
        step(x, y)
    graph_opt.load_state_dict({})
    for p, q in zip(eager_model.parameters(), graph_model.parameters()):
        cp.copyto(p.data, q.data)
    assert_replays_match_eager(step, graph_model, eager_model, make_sgd(eager_model), batches[2:])


# ------------------- from a mutation probe of the CUDA backend's host code (session 13)
# Each test below fails on a mutant that every other test let live.


def _graph_setup(cp, opt_factory):
    import cugrad
    from cugrad import nn
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(6, 5, rng=rng), nn.Tanh(), nn.Linear(5, 3, rng=rng)).to("cuda")
    x = cugrad.asarray(rng.standard_normal((4, 6)).astype(np.float32), device="cuda")
    y = cugrad.asarray(rng.integers(0, 3, 4), device="cuda", dtype=np.int64)
    opt = opt_factory(model)
    step = cugrad.capture_train_step(model, nn.CrossEntropyLoss(), opt, x, y)
    return model, opt, step, x, y


@pytest.mark.gpu
@pytest.mark.parametrize("name,value", [("lr", 0.02), ("betas", (0.8, 0.999)), ("eps", 1e-6),
                                        ("weight_decay", 0.1)])
def test_a_changed_adam_hyperparameter_is_an_error_at_replay(gpu, name, value):
    """Every Adam hyperparameter baked into the captured launches is checked at replay
    (kills: eps left out of _hyperparameters)."""
    from cugrad import optim
    model, opt, step, x, y = _graph_setup(gpu, lambda m: optim.Adam(m.parameters(), lr=1e-2,
                                                                   capturable=True))
    step(x, y)
    setattr(opt, name, value)
    with pytest.raises(RuntimeError, match=r"\(lr, betas, eps, weight_decay, capturable\) "
                                           r"changed"):
        step(x, y)


@pytest.mark.gpu
def test_adam_capturable_switched_after_capture_is_an_error_at_replay(gpu):
    """capturable=False after capture: the next eager step made the count a host int and the
    graph went on counting on the old device counter (a probe on the stand-in: count 3
    against 4, weights 2.7e-3 off). Switched off, it is a changed hyperparameter; switched
    off and on around an eager step, the counter is a new array: both refused at replay."""
    from cugrad import nn, optim
    model, opt, step, x, y = _graph_setup(gpu, lambda m: optim.Adam(m.parameters(), lr=1e-2,
                                                                   capturable=True))
    step(x, y)
    opt.capturable = False
    with pytest.raises(RuntimeError, match=r"capturable\) changed .* to \(.*, False\)"):
        step(x, y)
    loss_fn = nn.CrossEntropyLoss()
    opt.zero_grad()
    loss_fn(model(x), y)
    model.backward(loss_fn.backward())
    opt.step()                              # eager, counted on the host
    opt.capturable = True
    with pytest.raises(RuntimeError, match=r"the optimiser's state '0\.step' was replaced "
                                           r"since capture"):
        step(x, y)


@pytest.mark.gpu
def test_an_optimised_parameter_outside_the_model_is_checked_too(gpu):
    """A parameter the optimiser updates that is not the model's is on the capture's checks:
    on the CPU it is refused at capture, replaced after capture it is an error at replay
    (kills: _labelled_parameters without the optimiser's extra parameters)."""
    import cugrad
    from cugrad import nn, optim
    extra_cpu = nn.Parameter(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=r"optimizer.params\[4\] is on cpu"):
        _graph_setup(gpu, lambda m: optim.SGD(m.parameters() + [extra_cpu], lr=0.1))
    extra = nn.Parameter(cugrad.asarray(np.ones(3, np.float32), device="cuda"))
    model, opt, step, x, y = _graph_setup(gpu, lambda m: optim.SGD(m.parameters() + [extra], lr=0.1))
    step(x, y)
    extra.data = cugrad.asarray(np.ones(3, np.float32), device="cuda")
    with pytest.raises(RuntimeError, match=r"optimizer.params\[4\] was replaced since capture"):
        step(x, y)


@pytest.mark.gpu
def test_capture_releases_its_side_streams_cached_blocks(gpu, monkeypatch):
    """After capture, the default pool's blocks cached for the capture's private side stream
    (the warm-up's and the snapshot's temporaries) are released: nothing else can reuse
    them. White-box (the stand-in's pool caches nothing, so only the call is visible):
    kills the free_all_blocks(stream=...) call dropped."""
    from cugrad import optim
    pool = gpu.get_default_memory_pool()
    calls = []
    real = pool.free_all_blocks
    monkeypatch.setattr(pool, "free_all_blocks",
                        lambda stream=None: (calls.append(stream), real(stream=stream))[1])
    _graph_setup(gpu, lambda m: optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    current = gpu.cuda.get_current_stream()
    assert any(s is not None and s != current for s in calls), calls


@pytest.mark.gpu
def test_capture_orders_its_side_stream_after_the_callers_stream(gpu, monkeypatch):
    """The capture's side stream waits for an event of the caller's stream before copying
    the examples in (they may still be written there). White-box: the stand-in runs every
    stream in order, so only the wait itself is visible (kills: the wait_event dropped)."""
    from cugrad import optim
    waits = []
    real_stream = gpu.cuda.Stream

    class Spy(real_stream):
        def wait_event(self, event):
            waits.append(event)
            return super().wait_event(event)
    monkeypatch.setattr(gpu.cuda, "Stream", Spy)
    _graph_setup(gpu, lambda m: optim.SGD(m.parameters(), lr=0.1))
    assert waits, "the capture stream never waited for the caller's stream"
