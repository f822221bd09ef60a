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
