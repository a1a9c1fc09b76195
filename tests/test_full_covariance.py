"""The full-covariance posterior q(z|x) = N(mu, L L^T): Doersch's eq. 7 in full, its split into the
marginals' KLs plus a correlation term, and the family end to end."""

import json
import math

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from vaelab.cli import main
from vaelab.distributions import diagonal_posterior, full_posterior, marginals, standard_normal
from vaelab.kl import correlation_kl, kl_full_normal_diag_normal, kl_normal_normal, kl_q_p
from vaelab.linear_gaussian import LinearGaussian, expected_log_likelihood

F64 = torch.float64


def random_tril(B, D, g):
    return torch.randn(B, D, D, generator=g, dtype=F64).tril(-1) + torch.diag_embed(
        torch.rand(B, D, generator=g, dtype=F64) + 0.3
    )


def test_eq7_against_torch_distributions():
    g = torch.Generator().manual_seed(0)
    B, D = 6, 4
    mu, L = torch.randn(B, D, generator=g, dtype=F64), random_tril(B, D, g)
    mu_p, log_var_p = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, D, generator=g, dtype=F64)
    p = MultivariateNormal(mu_p, covariance_matrix=torch.diag_embed(log_var_p.exp()))
    expected = kl_divergence(MultivariateNormal(mu, scale_tril=L), p)
    torch.testing.assert_close(kl_full_normal_diag_normal(mu, L, mu_p, log_var_p), expected, rtol=1e-10, atol=1e-10)
    # against N(0, I): 1/2 (tr Sigma + mu^T mu - k - log det Sigma), written out
    Sigma = L @ L.transpose(-1, -2)
    eq7 = 0.5 * (Sigma.diagonal(dim1=-2, dim2=-1).sum(-1) + mu.square().sum(-1) - D - torch.logdet(Sigma))
    zeros = torch.zeros_like(mu)
    torch.testing.assert_close(kl_full_normal_diag_normal(mu, L, zeros, zeros), eq7, rtol=1e-10, atol=1e-10)


def test_eq7_against_monte_carlo():
    """4 standard errors of a 200,000-sample mean: a false alarm about 6e-5 of the time."""
    g = torch.Generator().manual_seed(1)
    mu, L = torch.randn(1, 3, generator=g, dtype=F64), random_tril(1, 3, g)
    q = MultivariateNormal(mu, scale_tril=L)
    torch.manual_seed(2)
    z = q.sample((200_000,))
    log_ratio = q.log_prob(z) - standard_normal(3, dtype=F64).log_prob(z)
    exact = kl_full_normal_diag_normal(mu, L, torch.zeros(1, 3, dtype=F64), torch.zeros(1, 3, dtype=F64))
    assert abs(log_ratio.mean() - exact).item() <= 4 * log_ratio.std().item() / math.sqrt(len(log_ratio))


def test_the_kl_splits_into_the_marginals_and_the_correlations():
    g = torch.Generator().manual_seed(3)
    mu, L = torch.randn(5, 4, generator=g, dtype=F64), random_tril(5, 4, g)
    q = MultivariateNormal(mu, scale_tril=L)
    m, var = marginals(q)
    zeros = torch.zeros_like(mu)
    total = kl_full_normal_diag_normal(mu, L, zeros, zeros)
    of_marginals = kl_normal_normal(m, var.log(), zeros, zeros).sum(-1)
    torch.testing.assert_close(of_marginals + correlation_kl(L), total, rtol=0, atol=1e-10)
    assert (correlation_kl(L) > 0).all()
    diagonal = torch.diag_embed(torch.rand(5, 4, generator=g, dtype=F64) + 0.5)
    torch.testing.assert_close(correlation_kl(diagonal), torch.zeros(5, dtype=F64), rtol=0, atol=1e-12)
    # and KL(N(mu, Sigma) || N(mu, diag Sigma)) is what the term says it is
    diag_q = MultivariateNormal(mu, covariance_matrix=torch.diag_embed(var))
    torch.testing.assert_close(kl_divergence(q, diag_q), correlation_kl(L), rtol=1e-9, atol=1e-10)
    assert torch.autograd.gradcheck(
        lambda L_: correlation_kl(L_.tril(-1) + torch.diag_embed(L_.diagonal(dim1=-2, dim2=-1).abs() + 0.3)),
        (L.clone().requires_grad_(),),
    )


def test_the_full_family_with_no_correlation_is_the_diagonal_family():
    g = torch.Generator().manual_seed(4)
    D = 3
    mu, log_var = torch.randn(2, D, generator=g), torch.randn(2, D, generator=g)
    rows, cols = torch.tril_indices(D, D)
    tril_entries = torch.zeros(2, D * (D + 1) // 2)
    tril_entries[:, rows == cols] = log_var
    full, diag = full_posterior(torch.cat([mu, tril_entries], 1)), diagonal_posterior(torch.cat([mu, log_var], 1))
    torch.testing.assert_close(full.loc, diag.mean)
    torch.testing.assert_close(marginals(full)[1], diag.variance)
    torch.testing.assert_close(kl_q_p(full, standard_normal(D)).value, kl_q_p(diag, standard_normal(D)).value)


def test_a_full_covariance_q_closes_the_gap_a_diagonal_one_cannot():
    """On the linear-Gaussian model, with q the exact posterior (a full covariance), the ELBO in closed
    form, through vaelab's KL dispatch, is log p(x); a diagonal q stops at the mean-field gap (explain, 5b)."""
    lg = LinearGaussian.random(5, 3, seed=2)
    x = lg.marginal().sample((4,))
    post = lg.posterior(x)
    kl = kl_q_p(post, lg.prior())
    assert kl.method == "analytic"
    elbo = expected_log_likelihood(lg, x, post.mean, post.covariance_matrix) - kl.value
    torch.testing.assert_close(elbo, lg.log_px(x), rtol=0, atol=1e-9)


def test_train_evaluate_report_and_serve_a_full_covariance_run(tmp_path, capsys):
    from fastapi.testclient import TestClient

    from vaelab.web.app import create_app

    out = tmp_path / "run"
    args = ["--posterior", "full", "--latent-dim", "3", "--hidden", "32", "--epochs", "2"]
    assert main(["train", *args, "--out", str(out)]) == 0
    js = tmp_path / "e.json"
    assert main(["evaluate", str(out), "--iwae-k", "20", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    assert r["kl_method"] == "analytic" and r["kl_per_dim"] is None
    assert sum(r["kl_of_marginals_per_dim"]) + r["correlation_kl"] == pytest.approx(r["kl"], abs=1e-4)
    assert r["kl_split"]["agrees_with_kl_within_4_std_errors"]
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "q(z|x) has a full covariance" in page and "diagonal posterior" not in page
    image = TestClient(create_app(out), base_url="http://127.0.0.1").get("/api/test/0").json()
    assert image["kl"] is None and image["kl_method"] == "analytic" and len(image["sigma"]) == 3


def test_the_low_rank_family_against_torch():
    """--posterior lowrank: N(mu, diag(sigma^2) + W W^T) through its Cholesky factor; its KL (eq. 7) against
    torch.distributions' own low-rank Gaussian."""
    from torch.distributions import LowRankMultivariateNormal

    from vaelab.distributions import lowrank_posterior

    g = torch.Generator().manual_seed(5)
    B, D, R = 4, 5, 2
    h = torch.randn(B, D * (2 + R), generator=g, dtype=F64)
    q = lowrank_posterior(h, latent_dim=D)
    mu, log_var, W = h[:, :D], h[:, D : 2 * D], h[:, 2 * D :].view(B, D, R)
    reference = LowRankMultivariateNormal(mu, W, log_var.exp())
    torch.testing.assert_close(q.covariance_matrix, reference.covariance_matrix, rtol=1e-10, atol=1e-10)
    p = MultivariateNormal(torch.zeros(D, dtype=F64), torch.eye(D, dtype=F64))
    torch.testing.assert_close(
        kl_q_p(q, standard_normal(D, dtype=F64)).value, kl_divergence(reference, p), rtol=1e-9, atol=1e-9
    )


def test_train_a_low_rank_run(tmp_path):
    out = tmp_path / "run"
    args = ["--posterior", "lowrank", "--posterior-rank", "2", "--latent-dim", "4", "--hidden", "32", "--epochs", "1"]
    assert main(["train", *args, "--out", str(out)]) == 0
    assert main(["evaluate", str(out), "--iwae-k", "10"]) == 0
    r = json.loads((out / "evaluation.json").read_text())
    assert sum(r["kl_of_marginals_per_dim"]) + r["correlation_kl"] == pytest.approx(r["kl"], abs=1e-4)
    assert (
        main(["train", *args[:2], "--posterior-rank", "3", *args[4:], "--epochs", "2", "--out", str(out), "--resume"])
        == 2
    )
