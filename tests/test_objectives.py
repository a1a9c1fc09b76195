"""The objective's terms: reductions, likelihoods, priors, schedules, free bits, IWAE ordering."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import ContinuousBernoulli, Normal

from vaelab import contract, kl, objectives
from vaelab import distributions as dist
from vaelab.config import Config
from vaelab.linear_gaussian import LinearGaussian
from vaelab.models import build
from vaelab.models.base import decoder_log_prob
from vaelab.training import TermSums

F64 = torch.float64


class FixedEncoderModel:
    """A hand-built model: q(z|x) has the given (mu, log_var), p(x|z) Bernoulli with logits z @ A."""

    def __init__(self, mu, log_var, A):
        self.mu, self.log_var, self.A = mu, log_var, A

    def encode(self, x):
        return dist.diag_normal(self.mu, self.log_var)

    def decode(self, z):
        return dist.bernoulli((z @ self.A).view(z.shape[0], 1, 2, 2), 3)

    def prior(self):
        return dist.standard_normal(self.mu.shape[-1])


def test_reductions_sum_inside_terms_mean_over_batch_once():
    g = torch.Generator().manual_seed(0)
    B, D = 6, 3
    mu, log_var = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    A = torch.randn(D, 4, generator=g)
    x = (torch.rand(B, 1, 2, 2, generator=g) > 0.5).float()
    model = FixedEncoderModel(mu, log_var, A)
    torch.manual_seed(1)
    terms = objectives.elbo(contract.OneLayer(model), x)
    # KL: summed over latent dimensions per example, the formula of the question
    torch.testing.assert_close(terms.kl, kl.kl_normal_std_normal(mu, log_var).sum(-1))
    assert terms.kl_method == "analytic" and terms.kl_per_dim.shape == (B, D)
    # reconstruction: summed over all pixels per example, at the same z
    torch.manual_seed(1)
    z = mu + torch.exp(0.5 * log_var) * torch.randn(B, D)
    logits = (z @ A).view(B, 1, 2, 2)
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(terms.reconstruction, expected)
    # the reported KL is the batch mean of the per-example sums
    sums = TermSums()
    sums.add(terms)
    record = sums.record(0, "train", 1.0, 1.0, None, 0)
    assert record.kl == pytest.approx(kl.kl_normal_std_normal(mu, log_var).sum(-1).mean().item(), rel=1e-6)
    assert record.elbo == pytest.approx((expected.mean() - terms.kl.mean()).item(), rel=1e-6)
    # beta multiplies the KL in the loss and nowhere else
    loss = objectives.loss(terms, beta=4.0)
    torch.testing.assert_close(loss, -(expected.mean() - 4.0 * terms.kl.mean()))


def test_free_bits_floor_each_dimension():
    kl_per_dim = torch.tensor([[0.1, 2.0], [0.3, 4.0]])
    terms = contract.ElboTerms(torch.zeros(2), kl_per_dim.sum(-1), kl_per_dim, "analytic")
    # batch means per dimension: 0.2 and 3.0; floor at 0.5 -> 0.5 + 3.0
    assert objectives.loss(terms, free_bits=0.5).item() == pytest.approx(3.5)
    assert objectives.loss(terms).item() == pytest.approx(3.2)


def test_beta_schedules():
    assert objectives.beta_at(5, "constant", 2.0, 100) == 2.0
    assert objectives.beta_at(25, "linear", 2.0, 100) == pytest.approx(0.5)
    assert objectives.beta_at(500, "linear", 2.0, 100) == 2.0
    # cyclical: ramp over the first half of each cycle, then flat
    assert objectives.beta_at(125, "cyclical", 1.0, 100) == pytest.approx(0.5)
    assert objectives.beta_at(170, "cyclical", 1.0, 100) == 1.0
    assert objectives.beta_at(200, "cyclical", 1.0, 100) == 0.0


# -- likelihoods ------------------------------------------------------------------------------
def test_discretized_logistic_is_a_distribution_over_256_levels():
    loc = torch.tensor([0.0, 0.3, 0.99, 1.2])
    log_scale = torch.tensor([-3.0, -1.0, -4.0, -2.0])
    d = dist.DiscretizedLogistic(loc[:, None], log_scale[:, None])
    levels = torch.arange(256.0)[None, :] / 255
    total = d.log_prob(levels).exp().sum(-1)
    torch.testing.assert_close(total, torch.ones(4), atol=1e-4, rtol=0)
    s = d.sample()
    assert ((s * 255 - (s * 255).round()).abs() < 1e-4).all()


def test_continuous_bernoulli_and_gaussian_match_references():
    logits = torch.tensor([[-2.0, 0.0, 3.0]])
    x = torch.tensor([[0.1, 0.5, 0.9]])
    ref = ContinuousBernoulli(logits=logits).log_prob(x).sum(-1)
    torch.testing.assert_close(dist.continuous_bernoulli(logits, 1).log_prob(x), ref)
    mean, log_var = torch.tensor([[0.2, 0.4, 0.6]]), torch.tensor([-1.0, 0.0, 1.0])
    ref = Normal(mean, torch.exp(0.5 * log_var)).log_prob(x).sum(-1)
    torch.testing.assert_close(dist.gaussian(mean, log_var, 1).log_prob(x), ref)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian", "logistic"])
@pytest.mark.parametrize("prior", ["normal", "mixture", "vamp"])
def test_every_likelihood_and_prior_gives_finite_terms_and_gradients(likelihood, prior):
    torch.manual_seed(0)
    model = build(Config(likelihood=likelihood, prior=prior, latent_dim=3, hidden=(16,)), (1, 8, 8))
    x = torch.randint(0, 256, (4, 1, 8, 8)).float() / 255
    if likelihood == "bernoulli":
        x = x.round()
    terms = objectives.elbo(model, x)
    assert terms.kl_method == ("analytic" if prior == "normal" else "monte_carlo")
    assert (terms.kl_per_dim is None) == (prior != "normal")
    objectives.loss(terms).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_monte_carlo_kl_against_a_mixture_is_unbiased():
    """The single-sample KL used for mixture priors averages to kl_monte_carlo's estimate (4 s.e.)."""
    g = torch.Generator().manual_seed(0)
    q = dist.diag_normal(torch.randn(1, 2, generator=g), torch.randn(1, 2, generator=g) * 0.3)
    p = dist.gaussian_mixture(torch.zeros(3), torch.randn(3, 2, generator=g), torch.zeros(3, 2))
    torch.manual_seed(0)
    singles = torch.stack([kl.kl_q_p(q, p).value for _ in range(4000)])
    reference, se = kl.kl_monte_carlo(q, p, 40_000, generator=torch.Generator().manual_seed(1))
    combined_se = math.hypot(singles.std().item() / math.sqrt(4000), se.item())
    assert abs(singles.mean().item() - reference.item()) < 4 * combined_se


def test_encoder_driven_to_extremes_keeps_the_loss_finite():
    model = build(Config(latent_dim=4, hidden=(8,)), (1, 4, 4))
    with torch.no_grad():
        last = model.encoder.net[-1]
        last.bias.copy_(torch.tensor([0.0] * 4 + [1e4] * 2 + [-1e4] * 2))
    terms = objectives.elbo(model, torch.ones(2, 1, 4, 4))
    assert torch.isfinite(objectives.loss(terms))


# -- IWAE on the exact model ----------------------------------------------------------------------
class LinearGaussianWithQ:
    """The linear-Gaussian model of `vaelab explain` with a fixed, imperfect diagonal q."""

    def __init__(self, model: LinearGaussian, mu, log_var):
        self.model, self.mu, self.log_var = model, mu, log_var

    def encode(self, x):
        return dist.diag_normal(self.mu, self.log_var)

    def decode(self, z):
        return self.model.decode(z)

    def prior(self):
        return self.model.prior()


def test_iwae_bounds_are_ordered_and_below_log_px():
    lg = LinearGaussian.random(5, 2, seed=3)
    x = torch.randn(1, 5, dtype=F64, generator=torch.Generator().manual_seed(0)) + lg.b
    post = lg.posterior(x[0])
    mu = (post.mean + 0.4).expand(1, 2)
    log_var = (post.covariance_matrix.diagonal().log() + 0.5).expand(1, 2)
    torch.manual_seed(0)
    R = 4000  # replicates of each bound; compare means within 4 standard errors
    xs = x.expand(R, 5)
    m_rep = LinearGaussianWithQ(lg, mu.expand(R, 2), log_var.expand(R, 2))
    bounds = {k: objectives.iwae_bound(contract.OneLayer(m_rep), xs, k) for k in (1, 5, 50)}
    log_px = lg.log_px(x[0]).item()

    def below(a, b):
        diff = b - a
        assert diff.mean().item() > -4 * diff.std().item() / math.sqrt(R)

    below(bounds[1], bounds[5])
    below(bounds[5], bounds[50])
    assert bounds[5].mean().item() > bounds[1].mean().item()  # strictly, here: q is imperfect
    assert bounds[50].mean().item() < log_px + 4 * bounds[50].std().item() / math.sqrt(R)
    # k = 1 is the ELBO, whose exact value is log p(x) - KL(q || p(z|x))
    exact_elbo = log_px - kl.kl_mvn(mu[0], torch.diag(log_var[0].exp()), post.mean, post.covariance_matrix).item()
    assert abs(bounds[1].mean().item() - exact_elbo) < 4 * bounds[1].std().item() / math.sqrt(R)


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian", "logistic"])
def test_log_prob_of_many_samples_matches_decode_log_prob(likelihood):
    """The batched path used by the IWAE estimator (matrix product for Bernoulli) equals decode(z).log_prob(x)."""
    torch.manual_seed(0)
    model = build(Config(likelihood=likelihood, latent_dim=3, hidden=(16,)), (1, 4, 4))
    x = torch.randint(0, 256, (5, 1, 4, 4)).float() / 255
    if likelihood == "bernoulli":
        x = x.round()
    z = torch.randn(7, 5, 3)
    fast = decoder_log_prob(model.decoder, model.likelihood, z, x)
    slow = torch.stack([model.decode(z[i]).log_prob(x) for i in range(7)])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-4)
