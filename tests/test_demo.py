"""The demo trains: > 95% test accuracy on the digits, and --plot writes the loss curve."""

import os
import io
import sys
from pathlib import Path

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


def test_progress_bar_redraws_a_terminal_at_most_every_min_interval():
    """The demo asks due() before it reads the running loss (a wait for the GPU): on a
    terminal only when min_interval has passed since the last draw, and always at the end."""
    now = [0.0]
    stream = _Terminal()
    bar = ProgressBar(6, "epoch 1/1", width=6, stream=stream, min_interval=1.0, clock=lambda: now[0])
    drawn = []
    for b, t in zip(range(1, 7), [0.0, 0.5, 1.0, 1.2, 2.5, 2.6]):
        now[0] = t
        if bar.due(b):
            bar.update(b)
            drawn.append(b)
    assert drawn == [1, 3, 5, 6]
    assert stream.getvalue().count("\r") == 4


def test_progress_bar_is_due_only_at_the_end_in_a_log():
    bar = ProgressBar(3, "epoch 1/1", stream=io.StringIO())
    assert [bar.due(b) for b in (1, 2, 3)] == [False, False, True]


def test_demo_epoch_loss_is_the_mean_of_its_batch_losses(monkeypatch):
    """The loss summed on the device (F.accumulate) equals the mean of the per-batch losses
    read one by one: the demo reads it once per epoch, not after every batch."""
    need_sklearn()
    import cugrad
    from cugrad import demo
    seen = []
    real = cugrad.nn.CrossEntropyLoss.__call__

    def spy(self, logits, target):
        loss = real(self, logits, target)
        seen.append(float(loss))
        return loss

    monkeypatch.setattr(cugrad.nn.CrossEntropyLoss, "__call__", spy)
    result = demo.train(epochs=2, progress=False, device="cpu", log=lambda *a: None)
    batches = len(seen) // 2
    for epoch, loss in enumerate(result["losses"]):
        per_batch = seen[epoch * batches:(epoch + 1) * batches]
        assert loss == pytest.approx(sum(per_batch) / batches, rel=1e-6)


@pytest.mark.parametrize("option, value, says", [
    ("--epochs", "0", "expected a positive integer, got 0"),
    ("--batch-size", "-4", "expected a positive integer, got -4"),
    ("--hidden", "0", "expected a positive integer, got 0"),
    ("--seed", "-1", "expected an integer >= 0, got -1"),
    ("--lr", "nan", "expected a finite number > 0, got nan"),
    ("--lr", "-0.1", "expected a finite number > 0, got -0.1"),
    ("--plot", "curve", "expected a file name ending in .png, got 'curve'"),
    ("--plot", "", "expected a file name ending in .png, got ''"),
    ("--plot", "no/such/folder/c.png", "the folder 'no/such/folder' does not exist"),
])
def test_demo_refuses_bad_options_before_training(capsys, option, value, says):
    """A usage error naming the option (exit 2), before any data is loaded: they were
    tracebacks from inside the library, or (--plot) a file of another name written after the
    whole run."""
    from cugrad.demo import main
    with pytest.raises(SystemExit) as info:
        main([option, value, "--device", "cpu", "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {says}" in err, err


def test_demo_stops_with_an_error_when_training_diverges():
    """SGD at lr 0.05 and batch 1 diverges (the loss becomes NaN): the demo says so and
    exits non-zero instead of reporting a NaN curve as a success."""
    need_sklearn()
    from cugrad.demo import main
    with pytest.warns(RuntimeWarning), pytest.raises(SystemExit) as info:
        main(["--optimizer", "sgd", "--batch-size", "1", "--epochs", "2", "--device", "cpu",
              "--no-progress"])
    assert "training diverged" in str(info.value.code) and "--lr" in str(info.value.code)


def _no_training(monkeypatch):
    from cugrad import demo

    def train(**kwargs):
        raise AssertionError("the demo trained before refusing --plot")
    monkeypatch.setattr(demo, "train", train)


def test_demo_plot_without_matplotlib_is_a_usage_error_before_training(monkeypatch, capsys):
    """--plot where matplotlib cannot be imported: exit 2 naming --plot, before training.
    Fails on the old demo, which trained every epoch first and only then said so."""
    from cugrad.demo import main
    _no_training(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib fails
    with pytest.raises(SystemExit) as info:
        main(["--epochs", "3", "--plot", "curve.png", "--no-progress", "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --plot: needs matplotlib" in err and "cugrad[examples]" in err, err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_demo_plot_that_cannot_be_written_is_a_usage_error_before_training(monkeypatch, capsys):
    """--plot /proc/x.png (a folder that exists, where no file can be created, even by root):
    exit 2 naming --plot and the reason, before training. Fails on the old demo, which
    trained, then failed in savefig with a FileNotFoundError traceback."""
    from cugrad.demo import main
    _no_training(monkeypatch)
    with pytest.raises(SystemExit) as info:
        main(["--epochs", "1", "--plot", "/proc/cugrad-x.png", "--no-progress", "--device", "cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --plot: cannot write '/proc/cugrad-x.png': " in err, err


def test_new_file_write_check_leaves_no_trace(tmp_path):
    """new_file's write check removes the file it created to check, and leaves an existing
    file's content alone (the work writes it later)."""
    from cugrad._cli import new_file
    fresh = tmp_path / "new.png"
    assert new_file(".png")(str(fresh)) == fresh and not fresh.exists()
    old = tmp_path / "old.png"
    old.write_bytes(b"kept")
    assert new_file(".png")(str(old)) == old and old.read_bytes() == b"kept"


def test_new_file_takes_a_fifo_and_a_dangling_link_without_opening_them(tmp_path):
    """A FIFO named as the output (a reader waiting on it) must not be opened by the check:
    with no reader the open blocked the command line forever, with one the reader got an
    early end of file. A dangling symlink is accepted (writing creates its target; the
    check's exclusive create said "File exists")."""
    import threading

    from cugrad._cli import new_file
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    fifo = tmp_path / "out.png"
    os.mkfifo(fifo)
    result = []
    t = threading.Thread(target=lambda: result.append(new_file(".png")(str(fifo))), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the check blocked opening a FIFO"
    assert result == [fifo]
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "target.png")
    assert new_file(".png")(str(link)) == link and not (tmp_path / "target.png").exists()
