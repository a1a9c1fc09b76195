"""Categorical latent variables (``--posterior categorical``): N variables of K categories, a uniform
prior, KL = sum_j (log K - H(q(z_j|x))) <= N log K; trained through the Gumbel-softmax relaxation,
evaluated as the discrete model.

Witnesses that do not trust the code: torch.distributions' Categorical (its KL and entropy), Monte
Carlo with a stated tolerance, and exact enumeration of every z of a model small enough to enumerate
(3 variables of 4 categories: 64 states): its log p(x), its ELBO and the KL split's three parts.
Randomised checks use fixed seeds and 4 standard errors (a false alarm about 6e-5 of the time each,
normal approximation).
"""

import itertools
import json
import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import vaelab
from vaelab.cli import main
from vaelab.config import Config
from vaelab.decomposition import decompose_categorical
from vaelab.distributions import Categoricals
from vaelab.errors import UserError
from vaelab.evaluation import iwae_log_likelihood
from vaelab.kl import kl_q_p
from vaelab.models import build
from vaelab.models.base import decoder_log_prob
from vaelab.models.categorical import temperature_at

F64 = torch.float64


# -- the KL term ------------------------------------------------------------------------------------------
def test_the_categorical_kl_is_torchs_and_is_bounded_by_log_k():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(50, 6, 5, generator=g, dtype=F64)
    logits[0, 0] = torch.tensor([40.0, 0, 0, 0, 0])  # one-hot q: the ceiling log K
    logits[0, 1] = 0.0  # uniform q: nothing
    q, p = Categoricals(logits), Categoricals(torch.zeros(6, 5, dtype=F64))
    kl = kl_q_p(q, p)
    reference = kl_divergence(Categorical(logits=logits), Categorical(logits=torch.zeros(5, dtype=F64)))
    assert kl.method == "analytic"
    torch.testing.assert_close(kl.per_dim, reference)
    torch.testing.assert_close(kl.per_dim, math.log(5) - Categorical(logits=logits).entropy())
    torch.testing.assert_close(kl.value, reference.sum(-1))
    torch.testing.assert_close(kl_divergence(q, p), reference.sum(-1))  # registered with torch.distributions
    assert (kl.per_dim >= -1e-12).all() and (kl.per_dim <= math.log(5) + 1e-12).all()
    assert kl.per_dim[0, 0].item() == pytest.approx(math.log(5), abs=1e-12) and kl.per_dim[0, 1].item() == 0.0
    assert (kl.value <= 6 * math.log(5) + 1e-12).all()


def test_the_categorical_kl_is_the_mean_of_log_q_minus_log_p():
    torch.manual_seed(0)
    logits = 2 * torch.randn(4, 3, 5, dtype=F64)
    q, p = Categoricals(logits), Categoricals(torch.zeros(3, 5, dtype=F64))
    z = q.sample((200_000,))  # one-hot draws
    assert ((z.unflatten(-1, (3, 5)).sum(-1)) == 1).all()
    ratio = q.log_prob(z) - p.log_prob(z)
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(len(ratio))
    assert ((mean - kl_q_p(q, p).value).abs() <= 4 * se).all()


def test_the_gumbel_max_draws_follow_q():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, dtype=F64)
    n = 100_000
    z = Categoricals(logits).from_normal(torch.randn(n, 2, 12, dtype=F64)).unflatten(-1, (3, 4))
    frequency, p = z.mean(0), torch.softmax(logits, -1)
    assert ((frequency - p).abs() <= 4 * (p * (1 - p) / n).sqrt()).all()


def test_the_relaxation_and_the_straight_through_gradient():
    torch.manual_seed(2)
    logits = torch.randn(5, 3, 4, dtype=F64, requires_grad=True)
    eps = torch.randn(5, 12, dtype=F64)
    hard = Categoricals(logits).from_normal(eps)
    soft = Categoricals(logits, (0.5, False)).from_normal(eps).unflatten(-1, (3, 4))
    assert (soft > 0).all() and torch.allclose(soft.sum(-1), torch.ones(5, 3, dtype=F64))  # on the simplex
    assert torch.equal(soft.argmax(-1), hard.unflatten(-1, (3, 4)).argmax(-1))  # the same Gumbel draw
    cold = Categoricals(logits, (1e-3, False)).from_normal(eps)
    assert (cold - hard).abs().max() < 1e-6  # tau -> 0: the one-hot draw
    weights = torch.randn(12, dtype=F64)
    straight = Categoricals(logits, (0.5, True)).from_normal(eps)
    torch.testing.assert_close(straight.detach(), hard, rtol=0, atol=1e-15)  # one-hot forward (to rounding) ...
    (g_straight,) = torch.autograd.grad((straight * weights).sum(), logits)
    (g_soft,) = torch.autograd.grad((soft.flatten(-2) * weights).sum(), logits)
    torch.testing.assert_close(g_straight, g_soft)  # ... the relaxed gradient backward


def test_the_temperature_schedule():
    config = Config(posterior="categorical", temperature=2.0, temperature_min=0.5, anneal_rate=0.01)
    assert temperature_at(config, 0) == 2.0
    assert temperature_at(config, 50) == pytest.approx(2.0 * math.exp(-0.5))
    assert temperature_at(config, 10_000) == 0.5


# -- the discrete model against exact enumeration -----------------------------------------------------------
def small_model():
    torch.manual_seed(3)
    return build(Config(posterior="categorical", latent_dim=3, categories=4, hidden=(16,)), (1, 8, 8)).eval()


def every_z(variables: int = 3, categories: int = 4) -> torch.Tensor:
    states = torch.tensor(list(itertools.product(range(categories), repeat=variables)))  # (64, 3)
    return torch.nn.functional.one_hot(states, categories).float().flatten(1)  # (64, 12)


@torch.no_grad()
def enumerated(model, x):
    """log p(x, z) and log q(z|x) for every z, (B, 64), by enumeration."""
    z = every_z()
    log_px_z = torch.stack([decoder_log_prob(model.decoder, model.likelihood, z, xi.expand(64, *xi.shape)) for xi in x])
    log_joint = log_px_z + model.prior().log_prob(z)
    log_q = torch.stack([model.encode(xi[None]).log_prob(z) for xi in x])
    log_q = log_q.double()  # float32 networks (vaelab's), sums over z in float64, q renormalised there
    return log_joint.double(), log_q - torch.logsumexp(log_q, 1, keepdim=True)


def test_the_iwae_estimate_of_a_categorical_model_against_enumeration():
    model = small_model()
    x = (torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    log_joint, log_q = enumerated(model, x)
    log_px = torch.logsumexp(log_joint, 1)
    k = 20_000
    torch.manual_seed(5)
    estimate = iwae_log_likelihood(model, x, k)
    # the relative standard error of the mean weight: Var_q(w) / p(x)^2 = E_q[w^2] / p(x)^2 - 1, exactly
    relative_var = torch.exp(torch.logsumexp(2 * log_joint - log_q, 1) - 2 * log_px) - 1
    tolerance = 4 * (relative_var / k).sqrt() + 1e-4  # and float32's rounding of log weights of ~40 nats
    assert ((estimate - log_px).abs() <= tolerance).all(), (estimate - log_px, tolerance)


def test_the_elbo_of_a_categorical_model_against_enumeration():
    """E_q[log p(x|z)] - KL with the closed-form KL equals sum_z q(z|x) (log p(x, z) - log q(z|x)), and
    log p(x) - ELBO is KL(q || p(z|x)), each by enumeration."""
    model = small_model()
    x = (torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(6)) > 0.5).float()
    log_joint, log_q = enumerated(model, x)
    q = log_q.exp()
    elbo = (q * (log_joint - log_q)).sum(1)
    z = every_z()
    with torch.no_grad():
        log_px_z = torch.stack(
            [decoder_log_prob(model.decoder, model.likelihood, z, xi.expand(64, *xi.shape)) for xi in x]
        )
        kl = kl_q_p(model.encode(x), model.prior()).value
    torch.testing.assert_close((q * log_px_z.double()).sum(1) - kl.double(), elbo, rtol=1e-6, atol=1e-4)
    log_px = torch.logsumexp(log_joint, 1)
    posterior_kl = (q * (log_q - (log_joint - log_px[:, None]))).sum(1)
    torch.testing.assert_close(log_px - elbo, posterior_kl)
    assert (posterior_kl > 0).all()


def test_the_kl_split_of_categoricals_against_enumeration():
    g = torch.Generator().manual_seed(7)
    M, V, K, S = 5, 3, 4, 20_000
    log_probs = torch.log_softmax(1.5 * torch.randn(M, V, K, generator=g, dtype=F64), -1)
    # exact: q(z) = 1/M sum_m q(z|x_m) over all 64 z, its marginals, and the three parts
    z = every_z()
    log_q = torch.stack([Categoricals(lp).log_prob(z) for lp in log_probs])  # (M, 64)
    log_agg = torch.logsumexp(log_q, 0) - math.log(M)
    marginals = log_probs.exp().mean(0)  # (V, K)
    log_marginal_z = (z.unflatten(-1, (V, K)) * marginals.log()).sum((-2, -1))
    mi = (log_q.exp() * (log_q - log_agg)).sum(1).mean()
    tc = (log_agg.exp() * (log_agg - log_marginal_z)).sum()
    dwkl = (marginals * (marginals.log() + math.log(K))).sum()
    # the estimator: S draws of z_n ~ q(z|x_n) for each example
    own = log_probs.repeat_interleave(S, 0)
    index = torch.distributions.Categorical(logits=own).sample()
    parts = decompose_categorical(index, own, log_probs)
    for estimate, exact in (
        (parts.mutual_information, mi),
        (parts.total_correlation, tc),
        (parts.dimension_wise_kl, dwkl),
    ):
        assert abs(estimate.mean() - exact) <= 4 * estimate.std() / math.sqrt(len(estimate)), (estimate.mean(), exact)
    added = parts.mutual_information + parts.total_correlation + parts.dimension_wise_kl
    own_log_q = Categoricals(own).log_prob(torch.nn.functional.one_hot(index, K).double().flatten(1))
    torch.testing.assert_close(added, own_log_q + V * math.log(K), rtol=0, atol=1e-10)  # sample by sample


# -- options ----------------------------------------------------------------------------------------------
def test_the_prior_follows_the_posterior_and_the_rules_hold():
    assert Config().prior == "normal" and Config(posterior="categorical").prior == "uniform"
    assert Config().replace(posterior="categorical").prior == "uniform"
    assert Config(posterior="categorical").replace(posterior="diagonal").prior == "normal"
    assert Config(prior="mixture").replace(posterior="full").prior == "mixture"
    refused = {
        "uniform prior over its categories": dict(posterior="categorical", prior="normal"),
        "over the categories of --posterior categorical": dict(prior="uniform"),
        "no density for --objective iwae": dict(posterior="categorical", objective="iwae"),
        "no density for --objective tc": dict(posterior="categorical", objective="tc"),
        "above log K = 2.3026": dict(posterior="categorical", free_bits=2.5),
        "categories must be at least 2": dict(posterior="categorical", categories=1),
        "temperature must be above 0": dict(posterior="categorical", temperature=0.0),
        "is above --temperature 1.0": dict(posterior="categorical", temperature_min=2.0),
        "--categories is read only with --posterior categorical": dict(categories=5),
    }
    for message, options in refused.items():
        with pytest.raises(UserError, match=message):
            Config(**options)


# -- every command ------------------------------------------------------------------------------------------
CAT = ["--data", "digits", "--lr-schedule", "constant", "--posterior", "categorical", "--latent-dim", "6"]
CAT += ["--categories", "4", "--hidden", "64", "--anneal-rate", "0.01"]


def rows_of(path):
    lines = path.read_text().splitlines()
    return [dict(zip(lines[0].split(","), line.split(","), strict=True)) for line in lines[1:]]


def test_a_categorical_vae_trains_evaluates_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "cat"
    assert main(["train", *CAT, "--epochs", "2", "--out", str(out)]) == 0
    assert "categorical posterior" in capsys.readouterr().out
    for row in rows_of(out / "metrics.csv"):
        kls = [float(v) for k, v in row.items() if k.startswith("kl_dim_")]
        assert len(kls) == 6 and all(0 <= v <= math.log(4) + 1e-6 for v in kls)
        assert sum(kls) == pytest.approx(float(row["kl"]), rel=1e-5)
        if row["split"] == "train":  # the relaxed model's terms, at the temperature of the epoch's last step
            assert float(row["temperature"]) == pytest.approx(max(0.5, math.exp(-0.01 * (int(row["step"]) - 1))))
        else:
            assert row["temperature"] == ""  # validation scores the discrete model
    model = vaelab.load_model(out)
    last = int(rows_of(out / "metrics.csv")[-1]["step"])
    assert model.posterior.temperature.item() == pytest.approx(max(0.5, math.exp(-0.01 * (last - 1))), rel=1e-6)
    assert main(["train", *CAT, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert main(["train", *CAT, "--epochs", "3", "--out", str(tmp_path / "fresh")]) == 0
    resumed, fresh = vaelab.load_model(out).state_dict(), vaelab.load_model(tmp_path / "fresh").state_dict()
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)  # the temperature buffer too
    capsys.readouterr()
    assert main(["evaluate", str(out), "--iwae-k", "50"]) == 0
    text = capsys.readouterr().out
    assert "ELBO of the relaxed model" in text and "at most N log K = 8.32" in text and "active variables" in text
    record = json.loads((out / "evaluation.json").read_text())
    assert record["categories"] == 4 and record["kl_ceiling"] == pytest.approx(6 * math.log(4))
    assert record["kl"] <= record["kl_ceiling"] and len(record["kl_per_dim"]) == len(record["activity"]) == 6
    assert math.isfinite(record["relaxed_elbo"]) and 0.5 <= record["temperature"] <= 1.0
    assert record["kl_split"]["adds_up"] and record["total_correlation"] is not None
    assert record["log_likelihood"] >= record["elbo"] - 4 * record["log_likelihood_std_error"]
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "KL per categorical variable" in page and "Category switches" in page and "uniform prior" in page
    straight = tmp_path / "st"
    assert main(["train", *CAT, "--straight-through", "--epochs", "1", "--out", str(straight)]) == 0
    assert main(["evaluate", str(straight), "--iwae-k", "0"]) == 0
    record = json.loads((straight / "evaluation.json").read_text())
    assert "relaxed_elbo" not in record and record["categories"] == 4  # it trained on one-hot z: no relaxed model


def test_a_categorical_vae_from_python():
    x = (torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(8)) > 0.5).float()
    config = Config(posterior="categorical", latent_dim=4, categories=3, hidden=(16,), epochs=2, batch_size=50)
    model = build(config, (1, 8, 8))
    state = vaelab.fit(model, x, x[:50], config, progress=False)
    assert math.isfinite(state.history[-1].elbo) and len(state.history[-1].kl_per_dim) == 4
    assert state.history[0].temperature is not None and state.history[1].temperature is None  # train, then val


def test_the_page_of_a_categorical_model_picks_categories(tmp_path):
    from fastapi.testclient import TestClient

    from vaelab.web.app import create_app, parse_z

    out = tmp_path / "cat"
    assert main(["train", *CAT, "--epochs", "1", "--out", str(out)]) == 0
    client = TestClient(create_app(out), base_url="http://127.0.0.1")
    described = client.get("/api/model").json()
    assert described["categories"] == 4 and described["latent_dim"] == 6
    assert client.get("/api/decode?z=0,1,2,3,0,1").status_code == 200
    for bad in ("0,1,2,3,0,4", "0,1,2,3,0,0.5", "0,1,2,3,0", "0,1,2,3,0,nan"):
        assert client.get(f"/api/decode?z={bad}").status_code == 422, bad
    assert torch.equal(parse_z("2,0", 2, 3), torch.tensor([[2, 0]]))
    from vaelab.inspection import open_run

    assert torch.equal(
        open_run(out).z_of(torch.tensor([[2, 0, 1, 3, 0, 0]]))[0, :8], torch.tensor([0.0, 0, 1, 0, 1, 0, 0, 0])
    )
    inspected = client.get("/api/test/0").json()
    assert len(inspected["mode"]) == len(inspected["p_mode"]) == len(inspected["kl"]) == 6
    assert all(1 / 4 <= p <= 1 for p in inspected["p_mode"])  # the most probable of 4 has at least 1/4
