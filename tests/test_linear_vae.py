"""The linear beta-VAE: models trained by vaelab's sampled ELBO land on the closed-form optimum of
D + beta R (``linear_gaussian.beta_vae_optimum``), dimensions collapsing exactly where predicted."""

import pytest
import torch

from vaelab.linear_gaussian import LinearVAE, beta_vae_optimum
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
