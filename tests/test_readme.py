"""README.md's example runs as written (on the CPU here; on the GPU where there is one)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    if not README.is_file():
        pytest.skip(f"README.md not found at {README} (installed-package test run)")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README.md has no python example"
    exec(compile(blocks[0], "README.md example", "exec"), {"__name__": "readme_example"})
    loss = float(capsys.readouterr().out.split()[-1])
    # 32 random labels, 100 Adam steps: memorised (0.014 here; ln 10 = 2.3 at the start)
    assert 0.0 <= loss < 0.5, f"README example: loss after 100 steps is {loss}"


def test_overflow_is_inf_and_numpy_warns_on_the_cpu():
    """README: a result too large for the dtype is ±inf, and NumPy says so with a
    RuntimeWarning on the CPU. Fails if the overflow is masked (a finite or NaN result), the
    call raises, or the warning is swallowed."""
    import numpy as np

    import cugrad.functional as F
    x = np.full((2, 3), 1e30, np.float32)
    w = np.stack([np.full(3, 1e30), np.full(3, -1e30)]).astype(np.float32)
    with pytest.warns(RuntimeWarning, match="overflow"):
        y = F.linear(x, w)
    assert np.array_equal(y, np.array([[np.inf, -np.inf]] * 2, np.float32)), y


def test_backward_sees_in_place_changes_to_what_forward_saved():
    """README: what a forward saves are references, not copies (a Linear's input x and, with a
    fused activation, its output; an activation's output), so an in-place change between
    forward and backward changes the gradients: `y = layer(x); x[:] = 0; layer.backward(g)`
    gives a zero weight gradient. Fails if README drops that warning, or if a layer starts
    saving copies (then the warning is wrong and README must say what is saved instead)."""
    import numpy as np

    from cugrad import nn
    if README.is_file():
        text = " ".join(README.read_text(encoding="utf-8").split())
        assert "What a forward saves for its backward are references, not copies" in text
        assert "`y = layer(x); x[:] = 0; layer.backward(g)` gives a zero weight gradient" in text
        assert "Copy first" in text
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    g = rng.standard_normal((4, 2)).astype(np.float32)

    layer = nn.Linear(3, 2, rng=0)           # the README's example: the input, zeroed
    layer(x)
    x[:] = 0
    layer.backward(g)
    assert np.array_equal(layer.weight.grad, np.zeros((2, 3), np.float32))
    np.testing.assert_allclose(layer.bias.grad, g.sum(axis=0), rtol=1e-6)

    x = rng.standard_normal((4, 3)).astype(np.float32)
    fused = nn.Linear(3, 2, rng=0, activation="tanh")    # the fused activation's output
    y = fused(x)
    y[:] = 0                                             # tanh' = 1 - y² = 1: dY = g
    fused.backward(g, input_grad=False)
    np.testing.assert_allclose(fused.weight.grad, g.T @ x, rtol=1e-5, atol=1e-6)

    for act, set_to, grad in [(nn.ReLU(), -1.0, np.zeros_like(g)),       # relu' = [y > 0]
                              (nn.Sigmoid(), 0.5, 0.25 * g),            # σ' = y(1 - y)
                              (nn.Tanh(), 0.0, g)]:                     # tanh' = 1 - y²
        out = act(rng.standard_normal((4, 2)).astype(np.float32) + 3)   # the model's output,
        out[:] = set_to                                                 # changed in place
        np.testing.assert_allclose(act.backward(g), grad, rtol=1e-6, err_msg=repr(act))
