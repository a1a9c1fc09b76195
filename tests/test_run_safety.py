"""What vaelab promises about the user's files and runs (docs/reference/promises.md):
it deletes only what it wrote, one process writes a run at a time, links are never written
through, a resume continues the run it resumes, and a stop (Ctrl-C, SIGTERM) keeps the last
checkpoint. The one-line refusals are in test_bad_input.py's catalogue; these are the cases
that need more than one command, a second process or a signal."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from conftest import train_options
from vaelab import rundir
from vaelab.checkpoint import load_checkpoint
from vaelab.cli import main
from vaelab.config import read_toml
from vaelab.fileio import atomic_write_text
from vaelab.training import signals_held

FAST = train_options(data="digits", hidden=16, latent_dim=2, epochs=1, threads=1)


def train(out, *options):
    return main(["train", *FAST, "--out", str(out), *options])


def test_overwrite_removes_only_what_vaelab_wrote(tmp_path):
    run = tmp_path / "run"
    assert train(run) == 0
    first = rundir.run_id(run)
    (run / "notes.txt").write_text("mine")
    (run / "data").mkdir()
    (run / "data" / "x.npy").write_bytes(b"mine too")
    assert train(run, "--overwrite") == 0
    assert (run / "notes.txt").read_text() == "mine" and (run / "data" / "x.npy").read_bytes() == b"mine too"
    assert rundir.run_id(run) not in (None, first)  # a new run, with an identity of its own
    assert (run / "model.safetensors").exists()


def test_auto_resume_restarts_a_run_killed_before_its_first_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run) == 0
    for name in ("checkpoints/last.pt", "checkpoints/best.pt", "model.safetensors"):
        (run / name).unlink()  # what a kill -9 before the first write leaves: marker, config, metrics
    (run / "notes.txt").write_text("mine")
    assert train(run, "--auto-resume") == 0
    assert (run / "checkpoints" / "last.pt").exists() and (run / "notes.txt").read_text() == "mine"


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run) == 0
    before = (run / "metrics.csv").read_text()
    with rundir.lock(run, "training"):  # another open file description: flock refuses it as another process
        capsys.readouterr()
        assert train(run, "--resume", "--epochs", "2") == 2
        err = capsys.readouterr().err
        assert f"process {os.getpid()} on " in err and "is being written" in err, err
        assert main(["evaluate", str(run), "--iwae-k", "0"]) == 2
    assert (run / "metrics.csv").read_text() == before  # the refused writer changed nothing


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    assert train(run) == 0
    holder = "from vaelab import rundir; import os, pathlib\nwith rundir.lock(pathlib.Path(%r)):\n    os._exit(0)\n"
    subprocess.run([sys.executable, "-c", holder % str(run)], check=True)
    assert "process" in (run / rundir.LOCK).read_text()  # its note is still there ...
    assert train(run, "--resume", "--epochs", "2") == 0  # ... and the lock went with the process


def test_a_link_in_a_run_is_never_written_through(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run) == 0
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").symlink_to(notes)
    assert train(run, "--resume", "--epochs", "2") == 2
    assert "symbolic link" in capsys.readouterr().err
    assert notes.read_text() == "my notes"


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640  # mkstemp alone gives 0600


def test_resume_continues_the_run_options_and_records_what_it_changes(tmp_path, capsys):
    run = tmp_path / "run"
    options = ["--beta", "4", "--objective", "tc", "--tc-weight", "6", "--lr", "1e-3", "--lr-schedule", "constant"]
    assert train(run, *options, "--batch-size", "64", "--checkpoint-every", "0") == 0
    capsys.readouterr()
    # the README's resume example: only the run directory and the new length
    assert main(["train", "--out", str(run), "--resume", "--epochs", "2", "--threads", "1"]) == 0
    assert "resume changes epochs 1 -> 2" in capsys.readouterr().out
    resumed = load_checkpoint(run / "checkpoints" / "last.pt")["config"]
    expected = {"beta": 4.0, "objective": "tc", "tc_weight": 6.0, "lr": 1e-3, "lr_schedule": "constant"}
    assert {k: resumed[k] for k in expected} == expected and resumed["batch_size"] == 64
    assert resumed["data"] == "digits" and resumed["epochs"] == 2
    config = read_toml(run / "config.toml")  # still a valid --config file: the history is not an option
    assert config["beta"] == 4.0 and config["epochs"] == 2
    assert "[[resumed]]" in (run / "config.toml").read_text() or "resumed = [" in (run / "config.toml").read_text()
    assert 'epochs = "1 -> 2"' in (run / "config.toml").read_text()


def test_signals_held_delays_a_stop_until_the_write_is_done():
    done = []
    with pytest.raises(KeyboardInterrupt), signals_held():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        done.append("the write finished")  # not interrupted: the signal waits for the block's end
    assert done == ["the write finished"]


def _tiny_fit(**options):
    import vaelab
    from vaelab.training import TrainState

    model = vaelab.build_model(vaelab.Config(hidden=(8,), latent_dim=2), (1, 8, 8))
    state = TrainState()
    options = {"epochs": 3, "batch_size": 20, "progress": False, **options}
    return state, lambda: vaelab.fit(model, torch.rand(60, 1, 8, 8), state=state, **options)


def test_a_stop_during_a_hook_is_acted_on_when_the_hooks_are_done():
    """A Ctrl-C that arrives while a hook writes (TensorBoard's writer, a checkpoint) does not cut it off: it
    stops the run after the hooks, before the next epoch. Raised inside TensorBoard's writer, a stop could
    leave its queue's lock held and the run's last flush waiting for ever."""
    done = []

    def hook(records, model, state):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        done.append(state.epoch)

    state, fit = _tiny_fit(hooks=[hook])
    with pytest.raises(KeyboardInterrupt):
        fit()
    assert done == [1] and state.epoch == 1 and state.step == 3


def test_a_stop_during_a_step_is_acted_on_after_its_update(monkeypatch):
    """A Ctrl-C in the middle of an optimiser step lets the step finish (the model updated, the step counted),
    then stops the run: nothing else runs between two steps."""
    from vaelab import training

    real = training.OptimiserStep.__call__
    steps = []

    def interrupted(self, *args):
        os.kill(os.getpid(), signal.SIGINT)
        result = real(self, *args)
        steps.append("finished")
        return result

    monkeypatch.setattr(training.OptimiserStep, "__call__", interrupted)
    state, fit = _tiny_fit()
    with pytest.raises(KeyboardInterrupt):
        fit()
    assert steps == ["finished"] and state.step == 1 and not state.history


def test_a_held_sigterm_with_no_handler_ends_the_process_between_steps():
    """A Python program that calls fit() without handling SIGTERM: the signal ends it as before, by the
    signal, but after the step it arrived in (the step's line after the kill runs)."""
    script = textwrap.dedent(
        """
        import os, signal, torch, vaelab
        from vaelab import training
        real = training.OptimiserStep.__call__
        def step(self, *args):
            os.kill(os.getpid(), signal.SIGTERM)
            result = real(self, *args)
            print("the step finished", flush=True)
            return result
        training.OptimiserStep.__call__ = step
        model = vaelab.build_model(vaelab.Config(hidden=(8,), latent_dim=2), (1, 8, 8))
        vaelab.fit(model, torch.rand(60, 1, 8, 8), epochs=3, batch_size=20, progress=False)
        print("fit returned")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGTERM, done.stderr
    assert done.stdout == "the step finished\n"


def test_sigterm_stops_like_ctrl_c_and_keeps_the_checkpoint(tmp_path):
    """SIGTERM (kill, docker stop, Slurm, torchrun) during a run whose checkpoints are written only at
    its end: exit 143, and last.pt holds the epochs done, from which the run resumes."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "vaelab", "train", *FAST[:-4], "--epochs", "100000", "--threads", "1"]
    cmd += ["--checkpoint-every", "100000", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for two epochs in metrics.csv
        if (run / "metrics.csv").exists() and (run / "metrics.csv").read_text().count("\n") > 4:
            break
        time.sleep(0.2)
    assert not (run / "checkpoints" / "last.pt").exists()  # nothing written yet: --checkpoint-every
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "stopped by SIGTERM" in err
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] >= 2


def test_report_elsewhere_leaves_the_run_untouched(tmp_path):
    run = tmp_path / "run"
    assert train(run) == 0
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    out = tmp_path / "pages" / "mine.html"
    out.parent.mkdir()
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert out.exists() and list((tmp_path / "pages" / "mine-figures").glob("01-*.png"))


def test_a_report_never_writes_into_a_folder_it_did_not_make(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run) == 0
    (tmp_path / "mine-figures").mkdir()
    (tmp_path / "mine-figures" / "01-holiday.png").write_bytes(b"a photo")
    assert main(["report", str(run), "--out", str(tmp_path / "mine.html")]) == 2
    assert (tmp_path / "mine-figures" / "01-holiday.png").read_bytes() == b"a photo"
    assert "not made by vaelab report" in capsys.readouterr().err


def test_the_run_directory_promises_are_in_the_pages_the_readme_links():
    from pathlib import Path

    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    assert "docs/reference/promises.md" in readme and "lock" in readme and "link" in readme
    promises = (root / "docs" / "reference" / "promises.md").read_text()
    for words in (".vaelab-run", "--overwrite", "symbolic link", "lock", "SIGTERM"):
        assert words in promises, words


@pytest.mark.parametrize(
    "holder_code",
    [
        textwrap.dedent("""\
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"process 4242 on elsewhere (training)")
    print("locked", flush=True)
    sys.stdin.read()
    """)
    ],
)
def test_a_live_writer_in_another_process_is_named(tmp_path, capsys, holder_code):
    run = tmp_path / "run"
    assert train(run) == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(run / rundir.LOCK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == b"locked"
        capsys.readouterr()
        assert train(run, "--overwrite") == 2
        assert "process 4242 on elsewhere (training)" in capsys.readouterr().err
        assert (run / "model.safetensors").exists()  # the live run was not deleted
    finally:
        holder.communicate(b"", timeout=10)


def test_a_report_draws_the_readable_rows_of_an_edited_metrics_csv(tmp_path):
    run = tmp_path / "run"
    assert train(run, "--epochs", "2") == 0
    with open(run / "metrics.csv", "a") as f:
        f.write("3,val,oops,nan\ngarbage\n")  # a hand edit, and a row torn by a kill
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").exists()


def test_a_run_from_before_the_marker_can_be_overwritten_but_not_a_fake_one(tmp_path, capsys):
    """`make demo` run again over a runs/demo written by an earlier vaelab: its checkpoints/last.pt loads as
    a vaelab checkpoint, so it is a run (adopted, then replaced); a folder whose last.pt is not one is not."""
    run = tmp_path / "run"
    assert train(run) == 0
    (run / rundir.MARKER).unlink()
    (run / "notes.txt").write_text("mine")
    assert train(run, "--overwrite") == 0
    assert rundir.is_run(run) and (run / "notes.txt").read_text() == "mine"
    fake = tmp_path / "fake"
    (fake / "checkpoints").mkdir(parents=True)
    (fake / "checkpoints" / "last.pt").write_bytes(b"PK not a checkpoint")
    (fake / "config.toml").write_text("")
    assert train(fake, "--overwrite") == 2
    assert "no .vaelab-run marker" in capsys.readouterr().err and (fake / "checkpoints" / "last.pt").exists()


def test_overwrite_keeps_what_the_user_put_in_vaelabs_folders(tmp_path):
    """A checkpoint copied aside into checkpoints/ to keep, a note among the figures: --overwrite removes
    vaelab's own names there (last.pt, best.pt, the event files, the numbered figures) and nothing else."""
    run = tmp_path / "run"
    assert train(run) == 0
    assert main(["report", str(run)]) == 0
    (run / "checkpoints" / "epoch1-keep.pt").write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    (run / "report" / "notes.md").write_text("mine")
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and list((run / "report").glob("01-*.png"))
    assert train(run, "--overwrite") == 0
    assert (run / "checkpoints" / "epoch1-keep.pt").exists() and (run / "report" / "notes.md").read_text() == "mine"
    assert not list((run / "report").glob("01-*.png")) and not any(p.exists() for p in events)
    assert not (run / "report.html").exists()  # the old run's page went with it
