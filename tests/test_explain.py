"""`vaelab explain`: the steps hold, and its JSON numbers agree with an independent computation."""

import json
import math
import re

import numpy as np
import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vaelab import explain as explain_module
from vaelab.cli import main
from vaelab.explain import explain


@pytest.mark.parametrize("seed,k,d", [(0, 2, 5), (1, 1, 3), (2, 4, 10), (3, 3, 3)])
def test_every_step_holds(seed, k, d):
    result = explain(seed=seed, latent_dim=k, data_dim=d, samples=5000)
    assert [s.name for s in result.failed] == []
    assert len(result.steps) >= 10
    # the bound and the gap
    assert result.elbo <= result.log_px
    assert result.kl_q_posterior == pytest.approx(result.log_px - result.elbo, abs=1e-9)
    # the ELBO rises under optimisation and stops below log p(x)
    trace = result.elbo_trace
    assert trace[-1] > trace[0] and trace[-1] <= result.log_px + 1e-9


def test_json_numbers_agree_with_independent_computation(tmp_path):
    out = tmp_path / "explain.json"
    assert main(["explain", "--seed", "4", "--latent-dim", "3", "--data-dim", "6", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    W, b, s2 = np.array(r["model"]["W"]), np.array(r["model"]["b"]), r["model"]["noise_var"]
    x = np.array(r["x"])
    d, k = W.shape
    # p(x) = N(b, W W^T + s^2 I), and p(z|x) by conditioning the joint Gaussian of (z, x)
    # (covariance form, unlike vaelab's precision form)
    S = W @ W.T + s2 * np.eye(d)
    gain = W.T @ np.linalg.solve(S, np.eye(d))  # (k, d) = Cov(z, x) Cov(x)^-1
    post_mu, post_cov = gain @ (x - b), np.eye(k) - gain @ W
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    log_px = MultivariateNormal(t(b), t(S)).log_prob(t(x)).item()
    assert r["log_px"] == pytest.approx(log_px, abs=1e-9)
    np.testing.assert_allclose(r["posterior"]["mu"], post_mu, atol=1e-9)
    np.testing.assert_allclose(r["posterior"]["cov"], post_cov, atol=1e-9)
    mu, log_var = t(r["q"]["mu"]), t(r["q"]["log_var"])
    q = MultivariateNormal(mu, torch.diag(log_var.exp()))
    kl_post = kl_divergence(q, MultivariateNormal(t(post_mu), t(post_cov))).item()
    kl_prior = kl_divergence(Normal(mu, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum().item()
    assert r["kl_q_posterior"] == pytest.approx(kl_post, abs=1e-9)
    assert r["kl_q_prior"] == pytest.approx(kl_prior, abs=1e-9)
    assert r["elbo"] == pytest.approx(log_px - kl_post, abs=1e-9)
    for step in r["steps"]:
        assert set(step) >= {"name", "formula", "lhs", "rhs", "abs_diff", "tolerance", "holds"}
        assert step["holds"] and step["abs_diff"] == pytest.approx(abs(step["lhs"] - step["rhs"]))
    # step 6's table: the two prices add up to KL(N(mu, sigma^2) || N(0, 1))
    for row in r["intuition"]:
        ref = kl_divergence(Normal(t(row["mu"]), t(row["sigma"])), Normal(t(0.0), t(1.0))).item()
        assert row["mean_term"] + row["width_term"] == pytest.approx(ref, abs=1e-12)
        assert row["mean_term"] == pytest.approx(row["mu"] ** 2 / 2)
    assert r["optimisation"]["mean_field_gap"] > 0
    # step 9: the KL and -ELBO in bits; the grid sum again with scipy's normal distribution (and logs of
    # its survival function), on the same grid: 2^16 equal buckets across mu +- 10 sigma, one beyond each end
    from scipy.stats import norm

    steps = {step["name"][:2]: step for step in r["steps"]}
    assert steps["9a"]["lhs"] == pytest.approx(kl_prior / math.log(2), abs=1e-12)
    assert steps["9b"]["lhs"] == pytest.approx(-r["elbo"] / math.log(2), abs=1e-12)
    net = 0.0
    for m, s in zip(r["q"]["mu"], np.exp(0.5 * np.array(r["q"]["log_var"])), strict=True):
        edges = np.r_[-np.inf, m + s * np.linspace(-10, 10, 2**16 + 1), np.inf]
        q = np.diff(norm.cdf(edges, m, s))
        upper = edges[:-1] > 0
        prior = np.where(upper, -np.diff(norm.sf(edges)), np.diff(norm.cdf(edges)))
        net += float(np.sum(q[q > 0] * np.log2(q[q > 0] / prior[q > 0])))
    assert steps["9a"]["rhs"] == pytest.approx(net, abs=1e-7)
    # step 10: the linear beta-VAE's optimal rate from the spectrum alone (eigenvalues 4 * 2^-i of the data,
    # s^2 = 0.3): sum over the top k of 1/2 log(lambda_i / (beta s^2)) where lambda_i > beta s^2
    lam = 4.0 * 0.5 ** np.arange(d)
    for letter, beta in zip("abcdef", (0.5, 1, 2, 4, 8, 16), strict=True):
        top = lam[:k][lam[:k] > beta * 0.3]
        step = next(x for x in r["steps"] if x["name"].startswith(f"10{letter}."))
        assert step["lhs"] == pytest.approx(0.5 * np.log(top / (beta * 0.3)).sum(), abs=1e-9)
    collapse = next(x for x in r["steps"] if x["name"].startswith("10g."))
    expected = sum(int((lam[:k] <= b * 0.3).sum()) for b in (0.5, 1, 2, 4, 8, 16))
    assert collapse["lhs"] == collapse["rhs"] == expected


def test_a_wrong_formula_fails_a_step_and_exits_nonzero(monkeypatch, capsys):
    """If the closed form were wrong (here: log sigma instead of log sigma^2), explain catches it."""

    def wrong(mu, log_var):
        return 0.5 * (mu.square() + log_var.exp() - 1 - 0.5 * log_var)

    monkeypatch.setattr(explain_module, "kl_normal_std_normal", wrong)
    assert main(["explain", "--samples", "4000"]) == 1
    err = capsys.readouterr().err
    assert "4d." in err and "does not hold" in err


@pytest.mark.parametrize("latent_dim", ["1", "2"])
def test_html_is_self_contained(tmp_path, latent_dim):
    out = tmp_path / "explain.html"
    assert main(["explain", "--samples", "2000", "--latent-dim", latent_dim, "--html", str(out)]) == 0
    page = out.read_text()
    assert page.count("<svg") == 2
    assert "D<sub>KL</sub>[q(z|x) ‖ p(z|x)] = E<sub>q</sub>[log q(z|x) − log p(z|x)]" in page
    # nothing is loaded from elsewhere: no src/href to another host, no @import
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page) and "@import" not in page
    assert "FAILS" not in page


def test_bad_options_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["explain", "--latent-dim", "0"])
    assert e.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["explain", "--json", str(tmp_path / "missing" / "x.json")])
    assert e.value.code == 2


def test_mean_field_gap_is_zero_for_a_diagonal_posterior():
    """With orthogonal columns in W, p(z|x) is diagonal and a diagonal q can close the gap."""
    from vaelab.explain import _maximise_elbo_diagonal
    from vaelab.linear_gaussian import LinearGaussian

    W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    model = LinearGaussian(W, torch.zeros(3, dtype=torch.float64), 0.5)
    x = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)
    trace, _, _ = _maximise_elbo_diagonal(
        model, x, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    )
    assert model.log_px(x).item() - trace[-1] == pytest.approx(0.0, abs=1e-9)
    assert not math.isclose(trace[0], trace[-1])


def test_the_discrete_latent_steps_against_scipy(tmp_path):
    """Step 11's mixture of Gaussians recomputed with scipy from the numbers the JSON gives: log p(x), the
    exact posterior over the component, and the shifted q's ELBO and gap."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    out = tmp_path / "explain.json"
    assert main(["explain", "--seed", "5", "--data-dim", "4", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    m = r["mixture"]
    means, x, s2, q = np.array(m["means"]), np.array(m["x"]), m["noise_var"], np.array(m["q"])
    K = len(means)
    log_px_c = np.array([multivariate_normal(mu, s2 * np.eye(len(x))).logpdf(x) for mu in means])
    log_px = logsumexp(log_px_c) - np.log(K)
    posterior = np.exp(log_px_c - logsumexp(log_px_c))
    elbo = (q * log_px_c).sum() - (q * np.log(q * K)).sum()
    steps = {s["name"][:3]: s for s in r["steps"]}
    assert steps["11a"]["lhs"] == pytest.approx(log_px, abs=1e-9) and steps["11a"]["holds"]
    assert steps["11b"]["lhs"] == pytest.approx(log_px - elbo, abs=1e-9)
    assert steps["11b"]["rhs"] == pytest.approx((q * np.log(q / posterior)).sum(), abs=1e-9)
    assert 0 < steps["11c"]["lhs"] <= np.log(K) and steps["11c"]["holds"]
    assert 0.01 < posterior.max() < 0.99  # the components overlap: the exact posterior is not one-hot
