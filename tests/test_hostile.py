"""What vaelab does when its files and folders are used as a careless or hostile user would (the
one-line refusals are in test_bad_input.py's catalogue): files that lie, pipelines fed odd names,
runs shared, moved, copied or read-only."""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from conftest import train_options
from vaelab import rundir
from vaelab.cli import main
from vaelab.compress import MAGIC
from vaelab.errors import UserError
from vaelab.sweep import PIPELINE

FAST = train_options(hidden=16, latent_dim=2, epochs=1)


def make_run(path, *options):
    assert main(["train", *FAST, *options, "--out", str(path)]) == 0
    return path


def with_header(file, **changes):
    """``file`` with its header changed and its checksum computed again (anyone can)."""
    import hashlib

    blob = file.read_bytes()
    (n,) = struct.unpack("<I", blob[len(MAGIC) : len(MAGIC) + 4])
    header = {**json.loads(blob[len(MAGIC) + 4 : len(MAGIC) + 4 + n]), **changes}
    raw = json.dumps(header).encode()
    body = MAGIC + struct.pack("<I", len(raw)) + raw + blob[len(MAGIC) + 4 + n : -32]
    file.write_bytes(body + hashlib.sha256(body).digest())


def test_a_header_claiming_more_images_stops_where_the_message_ends(tmp_path, capsys):
    """750 images coded, 100,000 claimed: decoding stops once the message is used up (it went on for an
    hour, decoding made-up images from an exhausted stack), and writes nothing."""
    run = make_run(tmp_path / "run")
    file = tmp_path / "f.vbb"
    assert main(["compress", str(run), "-o", str(file), "--iwae-k", "0"]) == 0
    with_header(file, images=100_000)
    capsys.readouterr()
    assert main(["decompress", str(file), "-o", str(tmp_path / "back.npy")]) == 2
    assert "the message ends with" in capsys.readouterr().err and not (tmp_path / "back.npy").exists()


def test_a_model_and_its_file_are_enough_to_decode(tmp_path, monkeypatch):
    """Decoding opens the model, not its training data: the data moved away, and run from another folder,
    the file still decodes (it named its run relative to itself)."""
    data = tmp_path / "data" / "x.npy"
    data.parent.mkdir()
    np.save(data, (np.random.default_rng(0).random((60, 8, 8)) > 0.5).astype(np.float32))
    run = make_run(tmp_path / "run", "--data", str(data), "--batch-size", "8")
    assert main(["compress", str(run), str(data), "-o", str(tmp_path / "f.vbb"), "--iwae-k", "0"]) == 0
    data.rename(tmp_path / "gone.npy")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["decompress", "../f.vbb", "-o", "back.npy"]) == 0
    assert np.array_equal(np.load("back.npy"), np.load(tmp_path / "gone.npy"))


def test_decompress_over_its_own_folder_of_pngs_leaves_none_of_the_other_file(tmp_path):
    run = make_run(tmp_path / "run")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(1000):
        (pngs / f"{i:06d}.png").write_bytes(b"an older decode")
    assert main(["compress", str(run), "-o", str(tmp_path / "f.vbb"), "--iwae-k", "0"]) == 0
    assert main(["decompress", str(tmp_path / "f.vbb"), "-o", str(pngs), "--overwrite"]) == 0
    assert len(list(pngs.iterdir())) == 750  # the test split's images, and nothing of the older decode


def test_the_printed_commands_run_through_the_documented_pipeline_expand_nothing(tmp_path):
    """Names with $(...), spaces, quotes and commas reach vaelab train exactly as given (xargs stripped the
    quotes that --print wrote, and sh -c ran what was inside them)."""
    hostile = tmp_path / "d" / "$(touch PWNED) it's a,b.npz"
    printed = subprocess.run(
        [sys.executable, "-m", "vaelab", "sweep", "--beta", "1", "--data", str(hostile), "--out", "my runs", "--print"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    ).stdout
    assert printed.count("\n") == 1
    done = subprocess.run(
        ["sh", "-c", PIPELINE.replace("-P 3", "-P 1")], input=printed, capture_output=True, text=True, cwd=tmp_path
    )
    assert not (tmp_path / "PWNED").exists()
    assert f"vaelab: error: {hostile} does not exist" in done.stderr  # the name arrived whole
    assert PIPELINE in subprocess.run(
        [sys.executable, "-m", "vaelab", "sweep", "--help"], capture_output=True, text=True
    ).stdout.replace("\\\n      ", "")


def test_a_second_sweep_into_a_folder_in_use_is_refused_at_once(tmp_path, capsys):
    (tmp_path / "S").mkdir()
    with rundir.folder_lock(tmp_path / "S", "vaelab sweep"):
        assert main(["sweep", "--beta", "1", "--data", "digits", "--epochs", "1", "--out", str(tmp_path / "S")]) == 2
    assert "in use by another vaelab sweep" in capsys.readouterr().err
    assert list((tmp_path / "S").iterdir()) == []


def test_the_lock_names_its_holder_only_while_it_is_held(tmp_path):
    run = make_run(tmp_path / "run")
    with rundir.lock(run, "testing"):
        assert f"process {os.getpid()}" in (run / rundir.LOCK).read_text()
    assert (run / rundir.LOCK).read_text() == ""  # nothing of this host travels with the run


def test_rd_keeps_the_run_s_record_of_another_split(tmp_path):
    run = make_run(tmp_path / "run")
    assert main(["evaluate", str(run), "--split", "val", "--iwae-k", "10"]) == 0
    before = (run / "evaluation.json").read_text()
    assert main(["rd", str(run)]) == 0
    assert (run / "evaluation.json").read_text() == before


def test_a_run_that_cannot_be_written_is_compressed_and_plotted_without_its_lock(tmp_path, monkeypatch):
    """A read-only run (a mount, another user's): compress and rd write nothing into it, so they take no lock."""
    run = make_run(tmp_path / "run")
    (run / rundir.LOCK).unlink()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if mode == os.W_OK else real(p, mode))

    def refused(*args, **kwargs):
        raise UserError("the lock was taken")

    monkeypatch.setattr(rundir, "lock", refused)
    assert main(["compress", str(run), "-o", str(tmp_path / "f.vbb"), "--iwae-k", "0"]) == 0
    assert main(["rd", str(run)]) == 0
    assert not (run / "compression.json").exists() and not (run / "evaluation.json").exists()


def test_a_sweep_folder_and_data_path_may_hold_commas(tmp_path, capsys):
    argv = ["sweep", "--beta", "1,2", "--data", "d/my,data.npz", "--out", str(tmp_path / "a,b"), "--print"]
    assert main(argv) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize("right_check", [True, False])
def test_a_file_of_the_last_format_still_decodes(tmp_path, right_check):
    """Version 1 files (the run's absolute path, the images' plain SHA-256) decode as they did; with a
    check that is not the images', they are refused."""
    import hashlib

    run = make_run(tmp_path / "run")
    file = tmp_path / "f.vbb"
    assert main(["compress", str(run), "-o", str(file), "--iwae-k", "0"]) == 0
    assert main(["decompress", str(file), "-o", str(tmp_path / "a.npy")]) == 0
    images = np.load(tmp_path / "a.npy")
    plain = hashlib.sha256(images.tobytes()).hexdigest() if right_check else "0" * 64
    with_header(file, version=1, run=str(run.resolve()), images_sha256=plain)
    code = main(["decompress", str(file), "-o", str(tmp_path / "b.npy")])
    assert code == (0 if right_check else 2)
