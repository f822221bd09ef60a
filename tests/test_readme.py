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
