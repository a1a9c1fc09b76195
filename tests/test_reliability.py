"""Nothing lost under a kill, a full disk or a numerical blow-up.

The kill tests run `vaelab train` as a real subprocess, send it SIGKILL, `--resume` it and
compare the final parameters bit for bit with an uninterrupted run (CPU, deterministic).
"""

import errno
import hashlib
import io
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from vaelab import contract, fileio, objectives
from vaelab.checkpoint import load_checkpoint
from vaelab.cli import main

ARGS = [
    "--hidden",
    "48",
    "--latent-dim",
    "3",
    "--batch-size",
    "32",
    "--seed",
    "1",
    "--checkpoint-every",  # every epoch: the kills below land between, or inside, epochs' writes
    "0",
    "--epochs",
    "8",
    "--binarize",
    "dynamic",
]


def train_cmd(out, *extra, prelude=None):
    if prelude is None:
        return [sys.executable, "-m", "vaelab", "train", *ARGS, "--out", str(out), *extra]
    code = prelude + "\nimport sys\nfrom vaelab.cli import main\nraise SystemExit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, "train", *ARGS, "--out", str(out), *extra]


def val_rows(out):
    path = out / "metrics.csv"
    return path.read_text().count(",val,") if path.exists() else 0


def final_params(out):
    return load_checkpoint(out / "checkpoints" / "last.pt")["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(train_cmd(out), check=True, capture_output=True, timeout=300)
    return final_params(out)


def kill_when(proc, condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the kill point: {proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("kill point not reached")
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def resume_and_compare(out, reference):
    r = subprocess.run(train_cmd(out, "--resume"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    resumed = final_params(out)
    for name, value in reference.items():
        assert torch.equal(value, resumed[name]), name
    assert not list((out / "checkpoints").glob(f".*{fileio.TMP_SUFFIX}"))


@pytest.mark.parametrize("epochs_done,seed", [(1, 0), (3, 1), (5, 2)])
def test_kill_at_a_random_step_then_resume_is_exact(tmp_path, reference, epochs_done, seed):
    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    delay = random.Random(seed).uniform(0.0, 0.08)  # somewhere inside the next epoch

    def ready():
        if val_rows(out) >= epochs_done:
            time.sleep(delay)
            return True
        return False

    kill_when(proc, ready)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] >= epochs_done - 1  # csv row comes first
    resume_and_compare(out, reference)


SLOW_CHECKPOINT = textwrap.dedent(
    """
    import os, time, pathlib
    real_replace = os.replace
    marker = pathlib.Path(os.environ["VAELAB_TEST_MARKER"])
    writes = {"n": 0}
    def slow_replace(src, dst):
        if str(dst).endswith("last.pt"):
            writes["n"] += 1
            if writes["n"] == 3:  # the third epoch's checkpoint: temp file written, not yet renamed
                marker.touch()
                time.sleep(60)
        return real_replace(src, dst)
    os.replace = slow_replace
    """
)


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, reference):
    out, marker = tmp_path / "run", tmp_path / "writing"
    env = {**os.environ, "VAELAB_TEST_MARKER": str(marker)}
    proc = subprocess.Popen(
        train_cmd(out, prelude=SLOW_CHECKPOINT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    kill_when(proc, marker.exists)
    assert list((out / "checkpoints").glob(f".last.pt.*{fileio.TMP_SUFFIX}"))  # the write was under way
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2  # the previous one, intact
    resume_and_compare(out, reference)


def test_disk_full_while_writing_a_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert main(["train", *ARGS[:-4], "--epochs", "1", "--out", str(out)]) == 0
    before = hashlib.sha256((out / "checkpoints" / "last.pt").read_bytes()).hexdigest()

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fsync", full)
    code = main(["train", *ARGS[:-4], "--epochs", "2", "--out", str(out), "--resume"])
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "free some space" in err and "Traceback" not in err
    assert hashlib.sha256((out / "checkpoints" / "last.pt").read_bytes()).hexdigest() == before
    assert not list((out / "checkpoints").glob(f".*{fileio.TMP_SUFFIX}"))


def _poison_steps(monkeypatch, steps):
    real, calls = objectives.elbo, {"n": 0}

    def poisoned(model, x, noise=None):
        terms = real(model, x, noise)
        if model.training:
            calls["n"] += 1
            if calls["n"] in steps:
                return contract.ElboTerms(terms.reconstruction, terms.kl * float("inf"), terms.kl_per_dim, "analytic")
        return terms

    monkeypatch.setattr(objectives, "elbo", poisoned)


def test_skip_nonfinite_skips_and_counts(tmp_path, monkeypatch, capsys):
    _poison_steps(monkeypatch, {5, 9})
    out = tmp_path / "run"
    assert main(["train", *ARGS[:-4], "--epochs", "2", "--skip-nonfinite", "2", "--out", str(out)]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    skipped = [int(r.split(",")[header.index("skipped")] or 0) for r in rows[1:] if ",train," in r]
    assert skipped == [2, 0]
    assert torch.isfinite(torch.cat([p.flatten() for p in final_params(out).values()])).all()


def test_more_bad_batches_than_allowed_stop_the_run(tmp_path, monkeypatch, capsys):
    _poison_steps(monkeypatch, {5, 9})
    out = tmp_path / "run"
    assert main(["train", *ARGS[:-4], "--epochs", "2", "--skip-nonfinite", "1", "--out", str(out)]) == 2
    assert "the KL term became NaN or infinite at epoch 1, step 8" in capsys.readouterr().err


def _val_record(epoch: int, elbo: float, elapsed: float):
    from vaelab.training import EpochRecord

    return EpochRecord(epoch, "val", elbo, elbo, 0.0, [], "analytic", 1.0, 1.0, 0.1, elapsed=elapsed)


def test_checkpoints_are_taken_every_epoch_and_written_every_n_seconds(tmp_path, monkeypatch):
    """RunWriter serialises a checkpoint after every validation and writes what it holds when
    checkpoint_every seconds of the run have passed since its last write, the best weights before
    last.pt; close() (the run's end, a stop, an error) writes the rest."""
    from vaelab import runs
    from vaelab.config import Config
    from vaelab.models import build
    from vaelab.training import TrainState, make_optimizer

    config = Config(hidden=(8,), latent_dim=2, checkpoint_every=2.0)
    model = build(config, (1, 8, 8))
    state = TrainState()
    optimizer = make_optimizer(model, config)
    identity = {"fingerprint": "f"}
    writer = runs.RunWriter(tmp_path, config, optimizer, (1, 8, 8), identity, model.layer_dims, state, val_images=5)
    writes = []

    def write(path, blob):
        name = os.path.relpath(path, tmp_path)
        epoch = None if name.endswith(".safetensors") else torch.load(io.BytesIO(blob), weights_only=True)["epoch"]
        writes.append((name, epoch))

    monkeypatch.setattr(runs, "atomic_write_bytes", write)
    # (val ELBO, elapsed seconds): the best epochs are 1, 2, 4 and 6
    for epoch, (elbo, elapsed) in enumerate([(-100, 0.5), (-90, 1.0), (-95, 2.1), (-80, 2.5), (-85, 3.0), (-70, 4.2)]):
        state.epoch, state.elapsed = epoch + 1, elapsed
        writer(records=[_val_record(epoch, elbo, elapsed)], model=model, state=state)
        if epoch == 2:  # 2.1 s: the first write, with the best of epoch 2
            assert writes == [("checkpoints/best.pt", 2), ("model.safetensors", None), ("checkpoints/last.pt", 3)]
    # 4.2 s: 2.1 s since the last write; epoch 4's best was overtaken by epoch 6's before it was written
    assert writes[3:] == [("checkpoints/best.pt", 6), ("model.safetensors", None), ("checkpoints/last.pt", 6)]
    state.epoch, state.elapsed = 7, 5.0
    writer(records=[_val_record(6, -75, 5.0)], model=model, state=state)
    assert len(writes) == 6  # 0.8 s since the last write: taken, not written
    writer.close()
    assert writes[6:] == [("checkpoints/last.pt", 7)]
    assert state.best_elbo == -70


def test_a_run_written_at_its_end_only_equals_one_written_every_epoch(tmp_path):
    """The cadence changes when checkpoints reach the disk, not what they hold."""
    from vaelab.checkpoint import read_trained

    runs_ = {}
    for every in ("0", "3600"):
        out = tmp_path / every
        args = ["--data", "digits", "--hidden", "32", "--latent-dim", "3", "--epochs", "4", "--checkpoint-every", every]
        assert main(["train", *args, "--out", str(out)]) == 0
        runs_[every] = [load_checkpoint(out / "checkpoints" / name) for name in ("last.pt", "best.pt")] + [
            read_trained(out)[2]
        ]
    for a, b in zip(runs_["0"][:2], runs_["3600"][:2], strict=True):
        assert (a["epoch"], a["step"], a["best_elbo"]) == (b["epoch"], b["step"], b["best_elbo"])
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(runs_["0"][2][k], runs_["3600"][2][k]) for k in runs_["0"][2])
