"""Run directories written before the table of parts and the latent-layer interface still load
and give the same numbers. tests/data/run-0.1.0 was written by vaelab 0.1.0 (mixture prior, so
the prior's parameters load too); expected.json holds what that version computed for a fixed
batch. Tolerance 1e-5: CPU kernels may differ in the last bits between machines."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from vaelab.checkpoint import load_checkpoint, load_model
from vaelab.cli import main

RUN = Path(__file__).parent / "data" / "run-0.1.0"


def test_an_old_run_directory_loads_with_the_same_numbers():
    expected = json.loads((RUN / "expected.json").read_text())
    g = torch.Generator().manual_seed(expected["x_seed"])  # the draws that made the reference numbers
    x = (torch.rand(4, 1, 8, 8, generator=g) > 0.5).float()
    eps = torch.randn(4, 2, generator=g)
    for model in (load_model(RUN), load_model(RUN / "checkpoints" / "last.pt")):
        with torch.no_grad():
            (layer,) = model.latents(x, lambda q: q.base_dist.loc + q.base_dist.scale * eps)
            torch.testing.assert_close(layer.q.base_dist.loc, torch.tensor(expected["mu"]), atol=1e-5, rtol=0)
            torch.testing.assert_close(layer.q.base_dist.scale, torch.tensor(expected["sigma"]), atol=1e-5, rtol=0)
            log_px_given_z = model.log_px_given_z([layer], x)
            log_prior = layer.p.log_prob(layer.z)
        torch.testing.assert_close(log_px_given_z, torch.tensor(expected["log_px_given_z"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(log_prior, torch.tensor(expected["log_prior"]), atol=1e-5, rtol=0)
    assert load_checkpoint(RUN / "checkpoints" / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("command", [["evaluate", "--iwae-k", "10"], ["report"]])
def test_evaluate_and_report_an_old_run(tmp_path, command):
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    assert main([command[0], str(run), *command[1:]]) == 0
