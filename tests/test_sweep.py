"""`vaelab sweep` (one ordinary run per value, resumable, --jobs side by side, --print) and
`vaelab rd` (the runs on the rate-distortion plane, from their evaluation records)."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import train_options
from vaelab.cli import main
from vaelab.evaluation import Evaluation
from vaelab.sweep import finished

QUICK = train_options(data="digits", hidden=16)


def test_print_writes_one_train_command_per_point(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["sweep", "--beta=0.5,4", "--latent-dim", "2,10", *QUICK, "--epochs", "3", "--out", str(out), "--print"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    threads = max(1, len(os.sched_getaffinity(0)))
    assert lines[0].endswith(
        "-m vaelab train --data digits --hidden 16 --epochs 3 --beta 0.5 --latent-dim 2 "
        f"--out {out}/beta-0.5_latent-dim-2 --auto-resume --threads {threads}"
    )
    assert [line.split("--out ")[1].split()[0].rsplit("/", 1)[1] for line in lines] == [
        "beta-0.5_latent-dim-2",
        "beta-0.5_latent-dim-10",
        "beta-4_latent-dim-2",
        "beta-4_latent-dim-10",
    ]
    assert not out.exists()  # --print trains nothing


def test_jobs_divide_the_cores_and_a_given_thread_count_stays(tmp_path, capsys):
    assert main(["sweep", "--seed", "0,1", "--jobs", "2", "--out", str(tmp_path / "s"), "--print"]) == 0
    cores = len(os.sched_getaffinity(0))
    assert all(line.endswith(f"--threads {max(1, cores // 2)}") for line in capsys.readouterr().out.splitlines())
    assert main(["sweep", "--seed", "0,1", "--threads", "3", "--out", str(tmp_path / "s"), "--print"]) == 0
    assert all(line.count("--threads") == 1 for line in capsys.readouterr().out.splitlines())


def test_a_sweep_killed_in_the_middle_resumes_where_it_stopped(tmp_path):
    """SIGTERM to the sweep stops its training process, which writes its checkpoint; the same sweep
    started again resumes that run (its epochs once each, none lost before the checkpoint) and then
    finds it finished."""
    out = tmp_path / "sweep"
    argv = ["sweep", "--beta", "1", *QUICK, "--epochs", "150", "--checkpoint-every", "0", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "vaelab", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run = out / "beta-1"
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 143, text
    from vaelab.checkpoint import config_from_dict, load_checkpoint

    state = load_checkpoint(run / "checkpoints" / "last.pt")
    config = config_from_dict(state["config"], "the run")
    assert not finished(run, config)
    stopped_at = state["epoch"]
    assert 0 < stopped_at < 150
    assert main(argv) == 0
    assert finished(run, config)
    with open(run / "metrics.csv") as f:
        val = [int(row["epoch"]) for row in csv.DictReader(f) if row["split"] == "val"]
    assert val == list(range(150))  # each epoch once: resumed, not restarted
    mtime = (run / "model.safetensors").stat().st_mtime
    assert main(argv) == 0  # finished: skipped
    assert (run / "model.safetensors").stat().st_mtime == mtime


@pytest.fixture(scope="module")
def beta_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("rd") / "beta"
    assert main(["sweep", "--beta", "0.5,4", *QUICK, "--epochs", "4", "--out", str(out), "--jobs", "2"]) == 0
    return out


def test_rd_reads_rate_and_distortion_from_each_run_record(beta_sweep, tmp_path, capsys):
    figure, table = tmp_path / "plane.png", tmp_path / "plane.json"
    assert main(["rd", str(beta_sweep), "--figure", str(figure), "--json", str(table)]) == 0
    printed = capsys.readouterr().out
    points = json.loads(table.read_text())
    assert [p["label"] for p in points] == ["beta 0.5", "beta 4.0"]
    for p in points:
        record = Evaluation.from_dict(
            json.loads((beta_sweep / p["run"].rsplit("/", 1)[1] / "evaluation.json").read_text())
        )
        assert p["rate"] == record.kl and p["distortion"] == -record.reconstruction
        assert p["neg_elbo"] == pytest.approx(-record.elbo, rel=1e-6)  # -ELBO = D + R (the record's means in float32)
        assert p["marginal_kl"] == pytest.approx(p["rate"] - p["mutual_information"])
        assert f"{p['rate']:.2f}" in printed
    assert points[0]["rate"] > points[1]["rate"]  # beta 4 buys a lower rate
    assert figure.read_bytes().startswith(b"\x89PNG")


def test_rd_draws_the_bits_back_code_where_compress_has_run(beta_sweep, tmp_path):
    run = beta_sweep / "beta-0.5"
    assert main(["compress", str(run), "-o", str(tmp_path / "c.vbb"), "--iwae-k", "0"]) == 0
    assert main(["rd", str(run), str(beta_sweep / "beta-4"), "--json", str(tmp_path / "p.json")]) == 0
    points = json.loads((tmp_path / "p.json").read_text())
    record = json.loads((run / "compression.json").read_text())
    assert points[0]["bits_back_code_length"] == pytest.approx(record["bits_per_image"]["net"] * math.log(2))
    assert points[1]["bits_back_code_length"] is None


def test_report_of_a_sweep_folder_is_its_plane(beta_sweep, tmp_path, capsys):
    page = tmp_path / "plane.html"
    assert main(["report", str(beta_sweep), "--out", str(page)]) == 0
    text = page.read_text()
    assert text.count("<tr>") == 1 + 2 and "data:image/png;base64," in text and "beta 0.5" in text
    assert main(["report", str(beta_sweep)]) == 2  # a folder of runs needs --out: nothing is written into it
    assert "give --out" in capsys.readouterr().err


def test_serve_of_a_sweep_folder_shows_its_plane(beta_sweep):
    from fastapi.testclient import TestClient

    from vaelab.web.app import create_runs_app

    client = TestClient(create_runs_app(beta_sweep), base_url="http://127.0.0.1")
    page = client.get("/")
    assert page.status_code == 200 and "the rate-distortion plane" in page.text and "beta 4.0" in page.text
    points = client.get("/api/rd").json()
    assert [p["label"] for p in points] == ["beta 0.5", "beta 4.0"]
    assert points[0]["neg_elbo"] == pytest.approx(points[0]["rate"] + points[0]["distortion"])
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400  # the same host check as a run's


def test_a_failed_run_is_reported_and_the_sweep_writes_no_file_of_its_own(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = ["sweep", "--seed", "0,1", "--data", str(tmp_path / "missing.npy"), "--out", str(out), "--jobs", "2"]
    assert main(argv) == 1
    printed = capsys.readouterr().out
    assert printed.count("failed with exit 2") == 2 and "missing.npy does not exist" in printed
    assert not out.exists() or not any(
        out.iterdir()
    )  # no log or marker of the sweep's: the output went to the terminal
