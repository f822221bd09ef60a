"""The demo trains: > 95% test accuracy on the digits, and --plot writes the loss curve."""

import pytest

pytest.importorskip("sklearn", reason="the demo's data set ships with scikit-learn "
                    "(pip install 'cugrad[examples]')")


def test_demo_reaches_95_percent(capsys):
    from cugrad.demo import train
    result = train(epochs=15, progress=False, device="cpu")
    assert result["test_accuracy"] > 0.95
    assert result["losses"][-1] < 0.1 * result["losses"][0]
    assert "test accuracy" in capsys.readouterr().out


def test_demo_command_line_with_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    from cugrad.__main__ import main
    path = tmp_path / "loss.png"
    assert main(["demo", "--epochs", "2", "--no-progress", "--device", "cpu",
                 "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "backend NumPy (CPU)" in out and "ms per epoch" in out
