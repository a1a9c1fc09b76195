"""`--target-rate`: the KL's weight as a multiplier that holds the rate at a target."""

import csv
import math

import pytest

from vaelab.checkpoint import load_checkpoint
from vaelab.cli import main
from vaelab.training import RateTarget

DIGITS = ["--data", "digits", "--hidden", "64", "--latent-dim", "4", "--checkpoint-every", "0"]


def train_rows(run):
    with open(run / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r["split"] == "train"]


def test_the_multiplier_follows_the_moving_average_of_the_relative_constraint():
    r = RateTarget(target=10.0, beta=1.0)
    r.update(15.0)  # c = 0.5: m = 0.05, beta = exp(0.02 * 0.05)
    assert r.average == pytest.approx(0.05) and r.beta == pytest.approx(math.exp(0.001))
    r.update(5.0)  # c = -0.5: m = 0.9 * 0.05 - 0.05 = -0.005
    assert r.average == pytest.approx(-0.005) and r.beta == pytest.approx(math.exp(0.001 - 0.0001))
    low = RateTarget(target=1.0, beta=1e-3)
    low.update(0.0)
    assert low.beta == 1e-3  # kept in [1e-3, 1e3]


def test_the_rate_moves_to_its_target_from_either_side(tmp_path):
    """A target of half the rate the model ends at free (beta 1) drives the weight up and the rate down;
    twice that rate, the weight down and the rate up; each run ends nearer its target than the free
    run is, and within 10 % of it."""
    free = tmp_path / "free"
    assert main(["train", *DIGITS, "--epochs", "40", "--out", str(free)]) == 0
    free_rate = float(train_rows(free)[-1]["kl"])
    for target, direction in ((round(free_rate / 2, 2), 1), (round(2 * free_rate, 2), -1)):
        run = tmp_path / f"target-{target:g}"
        assert main(["train", *DIGITS, "--epochs", "40", "--target-rate", str(target), "--out", str(run)]) == 0
        last = train_rows(run)[-1]
        assert direction * (float(last["beta"]) - 1.0) > 0  # the weight moved the right way
        assert abs(float(last["kl"]) - target) < 0.5 * abs(free_rate - target), (last["kl"], free_rate)
        assert abs(float(last["kl"]) - target) < 0.1 * target


def test_a_resumed_run_continues_the_multiplier_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = [*DIGITS, "--target-rate", "3", "--lr-schedule", "constant"]  # a cosine rate depends on --epochs
    assert main(["train", *common, "--epochs", "4", "--out", str(straight)]) == 0
    assert main(["train", *common, "--epochs", "2", "--out", str(resumed)]) == 0
    state = load_checkpoint(resumed / "checkpoints" / "last.pt")["rate"]
    assert state["target"] == 3.0 and state["beta"] != 1.0
    assert main(["train", "--epochs", "4", "--out", str(resumed), "--resume"]) == 0
    assert [r["beta"] for r in train_rows(resumed)] == [r["beta"] for r in train_rows(straight)]
    assert [r["kl"] for r in train_rows(resumed)] == [r["kl"] for r in train_rows(straight)]


def test_a_tiny_target_moves_the_weight_to_its_ceiling_without_overflow():
    """A target of 1e-10 nats makes the relative constraint about 1e11: the step in log beta is clipped."""
    r = RateTarget(target=1e-10, beta=1.0)
    r.update(50.0)
    assert r.beta == pytest.approx(1e3)
    r.update(0.0)  # below the target now: the average stays huge, the weight stays at its ceiling
    assert 1e-3 <= r.beta <= 1e3
