"""VQ-VAE (``--posterior vq``): each of N positions the nearest of K codebook vectors; as a VAE, q(z|x) a
point mass and p(z) uniform over the codes, so KL = N log K for every image, a constant rate.

Witnesses: the nearest code by brute force, the straight-through gradient by autograd against its
definition, the codebook's moving average against the k-means step it becomes at decay 0, the KL
against log K per position, and the bits `compress` spends on z against N log2 K."""

import json
import math

import numpy as np
import pytest
import torch

import vaelab
from conftest import round_trip
from vaelab.bitsback import model_coder
from vaelab.cli import main
from vaelab.config import Config
from vaelab.distributions import Categoricals
from vaelab.errors import UserError
from vaelab.evaluation import open_trained
from vaelab.kl import kl_q_p
from vaelab.models import build
from vaelab.models.vq import VQPosterior
from vaelab.objectives import elbo, elbo_objective


def posterior(positions=3, codes=5, dim=2, decay=0.99):
    return VQPosterior(positions, codes, dim, commitment=0.25, decay=decay, seed=0)


def test_each_position_takes_its_nearest_code_and_the_gradient_goes_straight_through():
    vq = posterior().eval()
    z_e = torch.randn(4, 3 * 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    q = vq(z_e)
    nearest = torch.cdist(z_e.detach().view(4, 3, 2), vq.codebook.expand(4, 5, 2)).argmin(-1)
    assert torch.equal(q.index, nearest)
    torch.testing.assert_close(q.rsample(), vq.codebook[nearest].flatten(1))  # z_q, the codebook vectors
    weights = torch.randn(6)
    (grad,) = torch.autograd.grad((q.rsample() * weights).sum(), z_e)
    torch.testing.assert_close(grad, weights.expand(4, 6))  # dz_q / dz_e = I: straight through
    expected = 0.25 * (z_e.detach().view(4, 3, 2) - vq.codebook[nearest]).square().sum((1, 2))
    torch.testing.assert_close(q.auxiliary_loss.detach(), expected)  # the commitment term, per example
    kl = kl_q_p(q, Categoricals(torch.zeros(3, 5)))
    assert kl.method == "analytic"
    torch.testing.assert_close(kl.value, torch.full((4,), 3 * math.log(5)))
    torch.testing.assert_close(kl.per_dim, torch.full((4, 3), math.log(5)))


def test_at_decay_zero_the_codebook_update_is_a_k_means_step():
    vq = posterior(positions=2, codes=4, dim=3, decay=0.0).train()
    z_e = torch.randn(50, 6, generator=torch.Generator().manual_seed(2))
    before = vq.codebook.clone()
    with torch.no_grad():
        vq.eval()
        index = vq(z_e).index  # eval mode: no update
    assert torch.equal(vq.codebook, before)
    vq.train()
    vq(z_e)  # train mode, gradients on: one moving-average step
    vectors = z_e.view(50, 2, 3)
    for k in range(4):
        chosen = vectors[index == k]
        if len(chosen):
            torch.testing.assert_close(vq.codebook[k], chosen.mean(0), rtol=1e-4, atol=1e-5)  # the mean of its own
        else:
            assert torch.equal(vq.codebook[k], torch.zeros(3))  # a dead code's sum decays to 0
    frequencies = torch.stack([torch.bincount(index[:, j], minlength=4) for j in range(2)]).float() / 50
    torch.testing.assert_close(vq.usage, frequencies)  # each position's code frequencies


def test_the_loss_is_the_negative_elbo_plus_the_commitment_and_the_codebook_gets_no_gradient():
    torch.manual_seed(3)
    model = build(Config(posterior="vq", latent_dim=3, categories=5, code_dim=2, hidden=(16,)), (1, 8, 8))
    x = (torch.rand(6, 1, 8, 8) > 0.5).float()
    loss, terms = elbo_objective(model, x, None, 1.0, Config(posterior="vq"), 6)
    torch.testing.assert_close(terms.kl, torch.full((6,), 3 * math.log(5)))
    torch.testing.assert_close(loss, -terms.elbo.mean() + terms.auxiliary.mean())
    loss.backward()
    assert all(
        p.grad is not None for p in model.encoder.parameters()
    )  # through the straight-through z and the commitment
    assert not any(b.requires_grad for b in model.posterior.buffers())
    model.eval()
    with torch.no_grad():
        a, b = elbo(model, x).elbo, elbo(model, x).elbo
    assert torch.equal(a, b)  # a point mass: no noise in the ELBO


def test_the_options_of_vq():
    assert Config(posterior="vq").prior == "uniform"
    for message, options in {
        "nothing to hold": dict(posterior="vq", free_bits=0.5),
        "--latent-dim and --categories set the rate": dict(posterior="vq", target_rate=10.0),
        "--ema-decay must be in": dict(posterior="vq", ema_decay=1.0),
        "--code-dim is read only with --posterior vq": dict(code_dim=4),
        "no density for --objective iwae": dict(posterior="vq", objective="iwae"),
    }.items():
        with pytest.raises(UserError, match=message):
            Config(**options)


VQ = ["--data", "digits", "--lr-schedule", "constant", "--posterior", "vq", "--latent-dim", "4", "--categories", "8"]
VQ += ["--code-dim", "3", "--hidden", "64"]


def test_a_vq_vae_trains_evaluates_reports_resumes_and_compresses(tmp_path, capsys):
    out = tmp_path / "vq"
    assert main(["train", *VQ, "--epochs", "2", "--out", str(out)]) == 0
    assert main(["train", *VQ, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert main(["train", *VQ, "--epochs", "3", "--out", str(tmp_path / "fresh")]) == 0
    resumed, fresh = vaelab.load_model(out).state_dict(), vaelab.load_model(tmp_path / "fresh").state_dict()
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)  # the codebook's moving averages too
    capsys.readouterr()
    assert main(["evaluate", str(out), "--iwae-k", "50"]) == 0
    text = capsys.readouterr().out
    assert "a rate of 12.00 bits" in text and "codebook perplexity" in text and "point mass" in text
    record = json.loads((out / "evaluation.json").read_text())
    assert record["kl"] == pytest.approx(4 * math.log(8)) and "log_likelihood" not in record
    assert sum(record["codebook_usage"]) == pytest.approx(1.0)
    assert 1 <= record["codebook_perplexity"] <= 8 and record["dead_codes"] == record["codebook_usage"].count(0.0)
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Codebook usage" in page and "Code switches" in page and "Samples from the fitted prior" in page
    assert main(["evaluate", str(tmp_path / "fresh"), "--iwae-k", "0"]) == 0
    assert main(["report", str(out), "--compare", str(tmp_path / "fresh"), "--out", str(tmp_path / "c.html")]) == 0
    assert "not defined: q(z|x) is a point mass" in (tmp_path / "c.html").read_text()  # no IWAE to ask for
    t = open_trained(out)
    x = t.examples("test").x
    symbols = x.flatten(1).round().int().numpy()
    coder = model_coder(t.model, 2, 8)
    message, costs = round_trip(coder, symbols)
    np.testing.assert_allclose(costs.z_pushed, 4 * math.log2(8))  # the rate, N log2 K
    assert (costs.z_back < 1e-5).all()  # a point mass gives (almost: the other codes' floors) nothing back


def test_the_page_of_a_vq_vae_picks_codes(tmp_path):
    from fastapi.testclient import TestClient

    from vaelab.web.app import create_app

    out = tmp_path / "vq"
    assert main(["train", *VQ, "--epochs", "1", "--out", str(out)]) == 0
    client = TestClient(create_app(out), base_url="http://127.0.0.1")
    described = client.get("/api/model").json()
    assert described["categories"] == 8 and described["codebook"]
    assert client.get("/api/decode?z=0,1,2,7").status_code == 200
    assert client.get("/api/decode?z=0,1,2,8").status_code == 422
    inspected = client.get("/api/test/0").json()
    assert len(inspected["mode"]) == 4 and inspected["p_mode"] == [1.0] * 4


def test_a_vq_vae_from_python():
    x = (torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(8)) > 0.5).float()
    config = Config(posterior="vq", latent_dim=3, categories=6, code_dim=2, hidden=(16,), epochs=2, batch_size=50)
    model = build(config, (1, 8, 8))
    before = model.posterior.codebook.clone()
    state = vaelab.fit(model, x, x[:50], config, progress=False)
    assert all(r.kl == pytest.approx(3 * math.log(6)) for r in state.history)  # the rate, every epoch
    assert not torch.equal(model.posterior.codebook, before)  # the moving averages moved it


def test_a_vq_vae_on_a_conv_grid_quantises_each_position(tmp_path):
    """--model conv-grid: the encoder's H/4 x W/4 feature map, one code per position (8 x 8 digits: 2 x 2)."""
    x = torch.rand(3, 1, 8, 8)
    model = build(Config(posterior="vq", model="conv-grid", latent_dim=4, categories=8, code_dim=3), (1, 8, 8))
    features = model.encoder.net(x)  # (B, code_dim, 2, 2)
    q = model.encode(x)
    torch.testing.assert_close(q.z_e, features.permute(0, 2, 3, 1).reshape(3, 4, 3))  # position by position
    assert model.decode(q.mean).mean.shape == (3, 1, 8, 8)
    with pytest.raises(UserError, match="give --latent-dim 4"):
        build(Config(posterior="vq", model="conv-grid", latent_dim=5), (1, 8, 8))
    out = tmp_path / "grid"
    grid = ["--data", "digits", "--posterior", "vq", "--model", "conv-grid", "--latent-dim", "4", "--categories", "8"]
    assert main(["train", *grid, "--code-dim", "3", "--hidden", "16", "--epochs", "1", "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--iwae-k", "0"]) == 0
    record = json.loads((out / "evaluation.json").read_text())
    assert record["kl"] == pytest.approx(4 * math.log(8)) and len(record["activity"]) == 4
