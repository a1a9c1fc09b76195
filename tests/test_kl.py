"""The closed forms of vaelab.kl against independent witnesses.

Witnesses: torch.distributions.kl_divergence (a separate implementation), Monte Carlo
(kl_monte_carlo with a tolerance in standard errors) and gradcheck in float64.

Statistical tests use a fixed seed; a tolerance of 4 standard errors has a two-sided
false-alarm rate of 6e-5 per comparison under the normal approximation, so with the
fixed seeds below a failure means a wrong formula, not bad luck.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Bernoulli, Categorical, MultivariateNormal, Normal, kl_divergence

from vaelab import kl

F64 = torch.float64
floats = st.floats(-3.0, 3.0, allow_nan=False)
log_vars = st.floats(-6.0, 6.0, allow_nan=False)


def normal(mu, log_var):
    return Normal(mu, torch.exp(0.5 * log_var))


def random_spd(g, *batch, k, dtype=F64):
    A = torch.randn(*batch, k, k, generator=g, dtype=dtype)
    return A @ A.transpose(-1, -2) + 0.1 * torch.eye(k, dtype=dtype)


# -- agreement with torch.distributions ------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(mu=floats, log_var=log_vars)
def test_std_normal_matches_torch(mu, log_var):
    mu, log_var = torch.tensor([mu], dtype=F64), torch.tensor([log_var], dtype=F64)
    ours = kl.kl_normal_std_normal(mu, log_var)
    ref = kl_divergence(normal(mu, log_var), Normal(torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64)))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(mu_q=floats, lv_q=log_vars, mu_p=floats, lv_p=log_vars)
def test_normal_normal_matches_torch(mu_q, lv_q, mu_p, lv_p):
    t = lambda v: torch.tensor([v], dtype=F64)  # noqa: E731
    ours = kl.kl_normal_normal(t(mu_q), t(lv_q), t(mu_p), t(lv_p))
    ref = kl_divergence(normal(t(mu_q), t(lv_q)), normal(t(mu_p), t(lv_p)))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-12)


def test_formula_of_the_question():
    """1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2), written out independently."""
    mu = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    sigma = torch.tensor([0.5, 1.0, 1.7], dtype=F64)
    expected = 0.5 * sum(m**2 + s**2 - 1 - math.log(s**2) for m, s in zip(mu.tolist(), sigma.tolist(), strict=True))
    assert kl.kl_normal_std_normal(mu, torch.log(sigma**2)).sum().item() == pytest.approx(expected, rel=1e-12)


def test_mvn_matches_torch_batched():
    g = torch.Generator().manual_seed(0)
    k = 4
    mu_q, mu_p = torch.randn(3, k, generator=g, dtype=F64), torch.randn(3, k, generator=g, dtype=F64)
    cov_q, cov_p = random_spd(g, 3, k=k), random_spd(g, 3, k=k)
    ours = kl.kl_mvn(mu_q, cov_q, mu_p, cov_p)
    ref = kl_divergence(MultivariateNormal(mu_q, cov_q), MultivariateNormal(mu_p, cov_p))
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-10)


def test_mvn_reduces_to_diagonal_formula():
    g = torch.Generator().manual_seed(1)
    mu_q, mu_p = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    lv_q, lv_p = torch.randn(5, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    full = kl.kl_mvn(mu_q, torch.diag(lv_q.exp()), mu_p, torch.diag(lv_p.exp()))
    torch.testing.assert_close(full, kl.kl_normal_normal(mu_q, lv_q, mu_p, lv_p).sum(), rtol=1e-10, atol=0)


@settings(max_examples=60, deadline=None)
@given(lq=st.floats(-15, 15), lp=st.floats(-15, 15))
def test_bernoulli_matches_torch(lq, lp):
    lq, lp = torch.tensor([lq], dtype=F64), torch.tensor([lp], dtype=F64)
    ref = kl_divergence(Bernoulli(logits=lq), Bernoulli(logits=lp))
    torch.testing.assert_close(kl.kl_bernoulli(lq, lp), ref, rtol=1e-5, atol=1e-10)


def test_categorical_matches_torch():
    g = torch.Generator().manual_seed(2)
    lq, lp = 3 * torch.randn(4, 6, generator=g, dtype=F64), 3 * torch.randn(4, 6, generator=g, dtype=F64)
    ref = kl_divergence(Categorical(logits=lq), Categorical(logits=lp))
    torch.testing.assert_close(kl.kl_categorical(lq, lp), ref, rtol=1e-5, atol=1e-12)


def test_kl_is_cross_entropy_minus_entropy():
    g = torch.Generator().manual_seed(3)
    args = [torch.randn(10, generator=g, dtype=F64) for _ in range(4)]
    H_q = kl.normal_entropy(args[1])
    torch.testing.assert_close(H_q, normal(args[0], args[1]).entropy(), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        kl.kl_normal_normal_via_entropies(*args), kl.kl_normal_normal(*args), rtol=1e-9, atol=1e-12
    )


# -- Monte Carlo witness (4 standard errors) -------------------------------------------
N_MC = 20_000


def _mc_agrees(q, p, closed_form, seed):
    est, se = kl.kl_monte_carlo(q, p, N_MC, generator=torch.Generator().manual_seed(seed))
    assert est.shape == closed_form.shape
    assert bool(((est - closed_form).abs() <= 4 * se + 1e-12).all()), (est, closed_form, se)


def test_monte_carlo_agrees_with_every_closed_form():
    g = torch.Generator().manual_seed(4)
    mu, lv = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    mu_p, lv_p = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    std = Normal(torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64))
    _mc_agrees(normal(mu, lv), std, kl.kl_normal_std_normal(mu, lv), seed=10)
    _mc_agrees(normal(mu, lv), normal(mu_p, lv_p), kl.kl_normal_normal(mu, lv, mu_p, lv_p), seed=11)
    cov_q, cov_p = random_spd(g, 2, k=3), random_spd(g, 2, k=3)
    m_q, m_p = torch.randn(2, 3, generator=g, dtype=F64), torch.randn(2, 3, generator=g, dtype=F64)
    _mc_agrees(
        MultivariateNormal(m_q, cov_q), MultivariateNormal(m_p, cov_p), kl.kl_mvn(m_q, cov_q, m_p, cov_p), seed=12
    )
    lq, lp = torch.randn(6, generator=g, dtype=F64), torch.randn(6, generator=g, dtype=F64)
    _mc_agrees(Bernoulli(logits=lq), Bernoulli(logits=lp), kl.kl_bernoulli(lq, lp), seed=13)
    cq, cp = torch.randn(3, 5, generator=g, dtype=F64), torch.randn(3, 5, generator=g, dtype=F64)
    _mc_agrees(Categorical(logits=cq), Categorical(logits=cp), kl.kl_categorical(cq, cp), seed=14)


def test_monte_carlo_is_reproducible_and_restores_global_rng():
    q, p = Normal(torch.tensor(1.0), torch.tensor(0.5)), Normal(torch.tensor(0.0), torch.tensor(1.0))
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = kl.kl_monte_carlo(q, p, 100, generator=torch.Generator().manual_seed(7))
    after = torch.rand(1)
    b = kl.kl_monte_carlo(q, p, 100, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(before, after)


# -- KL >= 0, and == 0 exactly at equality ----------------------------------------------
@settings(max_examples=80, deadline=None)
@given(mu_q=floats, lv_q=st.floats(-30, 30), mu_p=floats, lv_p=st.floats(-30, 30))
def test_nonnegative_and_zero_at_equality(mu_q, lv_q, mu_p, lv_p):
    t = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    assert kl.kl_normal_normal(t(mu_q), t(lv_q), t(mu_p), t(lv_p)).item() >= 0
    assert kl.kl_normal_normal(t(mu_q), t(lv_q), t(mu_q), t(lv_q)).item() == 0.0
    assert kl.kl_normal_std_normal(t(mu_q), t(lv_q)).item() >= 0
    assert kl.kl_bernoulli(t(mu_q), t(mu_q)).item() == 0.0


def test_zero_at_equality_full_and_categorical():
    assert kl.kl_normal_std_normal(torch.zeros(3), torch.zeros(3)).eq(0).all()
    g = torch.Generator().manual_seed(5)
    cov = random_spd(g, k=3)
    mu = torch.randn(3, generator=g, dtype=F64)
    assert abs(kl.kl_mvn(mu, cov, mu, cov).item()) < 1e-12
    logits = torch.randn(4, 5, generator=g)
    assert kl.kl_categorical(logits, logits).eq(0).all()


# -- gradients ------------------------------------------------------------------------------
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(6)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64, requires_grad=True)  # noqa: E731
    assert torch.autograd.gradcheck(kl.kl_normal_std_normal, (r(4), r(4)))
    assert torch.autograd.gradcheck(kl.kl_normal_normal, (r(4), r(4), r(4), r(4)))
    assert torch.autograd.gradcheck(kl.kl_bernoulli, (r(4), r(4)))
    assert torch.autograd.gradcheck(kl.kl_categorical, (r(2, 4), r(2, 4)))
    A = torch.randn(3, 3, generator=g, dtype=F64)
    B = torch.randn(3, 3, generator=g, dtype=F64)

    def mvn(m_q, a, m_p, b):  # gradients flow through the covariances' square roots
        return kl.kl_mvn(m_q, a @ a.T + 0.5 * torch.eye(3, dtype=F64), m_p, b @ b.T + 0.5 * torch.eye(3, dtype=F64))

    assert torch.autograd.gradcheck(mvn, (r(3), A.requires_grad_(), r(3), B.requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_log_var_is_finite_with_finite_gradients(dtype):
    lv = torch.tensor([-30.0, -10.0, 0.0, 10.0, 30.0], dtype=dtype, requires_grad=True)
    mu = torch.tensor([0.0, 5.0, -5.0, 100.0, 1e-3], dtype=dtype, requires_grad=True)
    lv_p = torch.tensor([30.0, -30.0, 0.0, -30.0, 30.0], dtype=dtype, requires_grad=True)
    total = kl.kl_normal_std_normal(mu, lv).sum() + kl.kl_normal_normal(mu, lv, mu.flip(0), lv_p).sum()
    total.backward()
    assert torch.isfinite(total)
    for t in (mu, lv, lv_p):
        assert torch.isfinite(t.grad).all()


def test_near_singular_covariance_is_finite():
    k = 3
    U = torch.linalg.qr(torch.randn(k, k, generator=torch.Generator().manual_seed(8), dtype=F64))[0]
    cov_q = U @ torch.diag(torch.tensor([1e-10, 1.0, 2.0], dtype=F64)) @ U.T
    cov_q = (0.5 * (cov_q + cov_q.T)).requires_grad_()
    mu = torch.zeros(k, dtype=F64, requires_grad=True)
    value = kl.kl_mvn(mu, cov_q, torch.ones(k, dtype=F64), torch.eye(k, dtype=F64))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(cov_q.grad).all() and torch.isfinite(mu.grad).all()
    # and it agrees with the eigenvalue form: 1/2 (tr S + |m|^2 - k - log det S)
    expected = 0.5 * (1e-10 + 3.0 + k - k - math.log(1e-10 * 2.0))
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_not_positive_definite_is_a_clear_error():
    with pytest.raises(ValueError, match="positive definite"):
        kl.kl_mvn(torch.zeros(2), -torch.eye(2), torch.zeros(2), torch.eye(2))


# -- dispatch ---------------------------------------------------------------------------------
def test_dispatch_says_how_kl_was_computed():
    from vaelab.distributions import diag_normal, gaussian_mixture, standard_normal

    g = torch.Generator().manual_seed(9)
    mu, lv = torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g)
    q = diag_normal(mu, lv)
    res = kl.kl_q_p(q, standard_normal(2))
    assert res.method == "analytic"
    torch.testing.assert_close(res.value, kl.kl_normal_std_normal(mu, lv).sum(-1))
    mix = gaussian_mixture(torch.zeros(3), torch.randn(3, 2, generator=g), torch.zeros(3, 2))
    z = q.rsample()
    res = kl.kl_q_p(q, mix, z)
    assert res.method == "monte_carlo" and res.per_dim is None
    torch.testing.assert_close(res.value, q.log_prob(z) - mix.log_prob(z))
    # a pair torch knows in closed form but which does not factorise
    mvn_q = MultivariateNormal(mu, torch.diag_embed(lv.exp()))
    res = kl.kl_q_p(mvn_q, MultivariateNormal(torch.zeros(2), torch.eye(2)))
    assert res.method == "analytic"
    torch.testing.assert_close(res.value, kl.kl_normal_std_normal(mu, lv).sum(-1), rtol=1e-4, atol=1e-5)
