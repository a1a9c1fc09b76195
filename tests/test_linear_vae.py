"""The linear beta-VAE: models trained by vaelab's sampled ELBO land on the closed-form optimum of
D + beta R (``linear_gaussian.beta_vae_optimum``), dimensions collapsing exactly where predicted."""

import pytest
import torch
from torch.distributions import MultivariateNormal

from vaelab.linear_gaussian import LinearGaussian, LinearVAE, beta_vae_optimum
from vaelab.objectives import elbo

F64 = torch.float64


@pytest.mark.parametrize("beta", [0.5, 2.0, 8.0])
def test_sgd_trained_linear_vaes_reach_the_closed_form(beta):
    """20,000 draws from N(0, Q diag(4, 2, 1, 0.5, 0.25, 0.125) Q^T), s^2 = 0.3, k = 3: at beta 8 two of
    the three latent dimensions collapse (lambda <= beta s^2 = 2.4). Adam with one sampled z per example,
    2,500 steps of 256; R and D are then computed exactly over the sample covariance. Tolerances from
    runs of 4,000 steps (R within 0.2 %, D within 0.1 %) with room for the shorter run's noise."""
    g = torch.Generator().manual_seed(0)
    d, k, noise_var = 6, 3, 0.3
    spectrum = 4.0 * 0.5 ** torch.arange(d, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    x = torch.randn(20_000, d, generator=g, dtype=F64) @ (Q * spectrum.sqrt()).T
    cov = torch.cov(x.T, correction=0)
    torch.manual_seed(1)
    model = LinearVAE(x.mean(0), k, noise_var)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = 2500
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        terms = elbo(model, x[torch.randint(0, len(x), (256,), generator=g)])
        loss = -(terms.reconstruction - beta * terms.kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    exact, fitted = beta_vae_optimum(cov, noise_var, beta, k), model.rate_distortion(cov)
    assert fitted.rate == pytest.approx(exact.rate, rel=0.02, abs=0.01)
    assert fitted.distortion == pytest.approx(exact.distortion, rel=0.005)
    torch.testing.assert_close(fitted.rate_per_dim.sort().values, exact.rate_per_dim.sort().values, atol=0.03, rtol=0)
    assert int((fitted.rate_per_dim < 0.01).sum()) == int((exact.rate_per_dim == 0).sum()) == (2 if beta == 8 else 0)


@pytest.mark.parametrize("seed", range(5))
def test_the_gap_splits_into_approximation_and_amortization_in_closed_form(seed):
    """Cremer et al. 2018's two gaps on linear-Gaussian models with correlated columns of W: the closed
    forms against the best diagonal q found by gradient ascent on the exact ELBO (L-BFGS, float64) and
    against KL(q || p(z|x)) between two Gaussians (torch.distributions); both gaps of q* itself are 0."""
    from torch.distributions import kl_divergence

    from vaelab.linear_gaussian import amortization_gap, approximation_gap, expected_log_likelihood

    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian.random(6, 3, seed=seed)
    x = torch.randn(6, generator=g, dtype=torch.float64)
    post = model.posterior(x)
    precision = torch.linalg.inv(post.covariance_matrix)
    m, log_v = post.mean + torch.randn(3, generator=g, dtype=torch.float64), torch.randn(3, generator=g).double()

    def elbo_of(mu, log_var):
        cov = torch.diag_embed(log_var.exp())
        prior = MultivariateNormal(torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64))
        return expected_log_likelihood(model, x, mu, cov) - kl_divergence(MultivariateNormal(mu, cov), prior)

    mu, log_var = m.clone().requires_grad_(), log_v.clone().requires_grad_()
    opt = torch.optim.LBFGS([mu, log_var], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -elbo_of(mu, log_var)
        loss.backward()
        return loss

    opt.step(closure)
    best = elbo_of(mu, log_var).item()
    log_px = model.log_px(x).item()
    assert approximation_gap(precision).item() > 1e-3  # W's columns are correlated here
    assert log_px - best == pytest.approx(approximation_gap(precision).item(), abs=1e-7)
    assert best - elbo_of(m, log_v).item() == pytest.approx(
        amortization_gap(m, log_v.exp(), post.mean, precision).item(), abs=1e-7
    )
    whole = kl_divergence(MultivariateNormal(m, torch.diag_embed(log_v.exp())), post).item()
    split = (approximation_gap(precision) + amortization_gap(m, log_v.exp(), post.mean, precision)).item()
    assert whole == pytest.approx(split, abs=1e-10)
    q_star_v = 1 / precision.diagonal()
    assert amortization_gap(post.mean, q_star_v, post.mean, precision).item() == pytest.approx(0, abs=1e-12)
    Q, _ = torch.linalg.qr(model.W)
    assert approximation_gap(torch.eye(3, dtype=torch.float64) + Q.T @ Q * 2.0).item() == pytest.approx(0, abs=1e-12)
