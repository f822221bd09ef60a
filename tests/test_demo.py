"""The demo trains: > 95% test accuracy on the digits, and --plot writes the loss curve."""

import io

import pytest

from cugrad.demo import ProgressBar


def need_sklearn():
    pytest.importorskip("sklearn", reason="the demo's data set ships with scikit-learn "
                        "(pip install 'cugrad[examples]')")


def test_demo_reaches_95_percent(capsys):
    need_sklearn()
    from cugrad.demo import train
    result = train(epochs=15, progress=False, device="cpu")
    assert result["test_accuracy"] > 0.95
    assert result["losses"][-1] < 0.1 * result["losses"][0]
    assert "test accuracy" in capsys.readouterr().out


def test_demo_command_line_with_plot(tmp_path, capsys):
    need_sklearn()
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib")
    from cugrad.__main__ import main
    path = tmp_path / "loss.png"
    assert main(["demo", "--epochs", "2", "--no-progress", "--device", "cpu",
                 "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "backend NumPy (CPU)" in out and "ms per epoch" in out


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run_bar(stream, epochs=2, batches=5):
    for epoch in range(1, epochs + 1):
        bar = ProgressBar(batches, f"epoch {epoch}/{epochs}", width=10, stream=stream)
        for b in range(1, batches + 1):
            bar.update(b, f"loss {b / 10:.1f}")
    return stream.getvalue()


def test_progress_bar_redraws_on_a_terminal():
    out = _run_bar(_Terminal())
    assert out.count("\r") == 10 and out.count("\n") == 2
    assert out.endswith("\repoch 2/2 [##########] 5/5 loss 0.5\n")


def test_progress_bar_writes_one_line_per_epoch_to_a_log():
    # A pipe or a file (CI, a GPU run's log): no carriage returns, only finished epochs.
    assert _run_bar(io.StringIO()) == ("epoch 1/2 [##########] 5/5 loss 0.5\n"
                                       "epoch 2/2 [##########] 5/5 loss 0.5\n")
