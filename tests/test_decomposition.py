"""The KL term taken apart: MI + TC + dimension-wise KL, against exact oracles.

The oracle (``LinearEncoderOracle``): x ~ N(m, Sigma), q(z|x) = N(A x + c, S), so q(z) is
Gaussian and every term has a closed form. Everything here is float64.
"""

import math

import pytest
import torch

from vaelab.decomposition import (
    decompose_full_data,
    decompose_minibatch,
    mixture_log_densities,
    mss_log_weights,
    mws_log_weights,
)
from vaelab.distributions import diag_normal, standard_normal
from vaelab.kl import kl_normal_std_normal
from vaelab.linear_gaussian import LinearEncoderOracle

F64 = torch.float64


def sample(oracle, N, seed):
    """N data points, their posteriors and one z_n ~ q(z|x_n) each."""
    g = torch.Generator().manual_seed(seed)
    x = (
        oracle.data().mean
        + torch.randn(N, oracle.m.shape[0], generator=g, dtype=F64) @ torch.linalg.cholesky(oracle.cov_x).T
    )
    mu, log_var = oracle.posterior_params(x)
    z = mu + (0.5 * log_var).exp() * torch.randn(mu.shape, generator=g, dtype=F64)
    return mu, log_var, z


@pytest.fixture(scope="module")
def oracle():
    return LinearEncoderOracle.random(4, 3, seed=1)


def test_the_oracle_adds_up_to_the_averaged_closed_form(oracle):
    """I + TC + sum_j KL_j = E_x KL(q(z|x) || N(0, I)), and that average against Monte Carlo over x."""
    total = oracle.mutual_information + oracle.total_correlation + oracle.dimension_wise_kl_per_dim.sum().item()
    assert total == pytest.approx(oracle.average_kl, abs=1e-12)
    assert oracle.mutual_information > 0.1 and oracle.total_correlation > 0.1  # every term is there to find
    mu, log_var, _ = sample(oracle, 200_000, seed=0)
    kl = kl_normal_std_normal(mu, log_var).sum(-1)
    # 4 standard errors: a false alarm about 6e-5 of the time
    assert abs(kl.mean().item() - oracle.average_kl) <= 4 * kl.std().item() / math.sqrt(len(kl))


def test_the_mixture_adds_each_weight_once():
    """Against the mixture density written out with torch.distributions: a weight added per dimension
    and then summed over dimensions (counted D times) would miss it."""
    g = torch.Generator().manual_seed(0)
    B, M, D = 5, 7, 3
    z, mu, log_var = (torch.randn(n, D, generator=g, dtype=F64) for n in (B, M, M))
    log_w = torch.log_softmax(torch.randn(B, M, generator=g, dtype=F64), 1)
    log_q_z, log_q_zj = mixture_log_densities(z, mu, log_var, log_w)
    components = torch.distributions.Normal(mu, (0.5 * log_var).exp())  # (M, D)
    density = components.log_prob(z[:, None, :]).exp()  # (B, M, D)
    expected_joint = (log_w.exp() * density.prod(-1)).sum(1).log()
    expected_marginals = (log_w.exp()[:, :, None] * density).sum(1).log()
    torch.testing.assert_close(log_q_z, expected_joint, rtol=0, atol=1e-12)
    torch.testing.assert_close(log_q_zj, expected_marginals, rtol=0, atol=1e-12)


def test_the_terms_add_up_exactly_for_every_estimator(oracle):
    mu, log_var, z = sample(oracle, 300, seed=1)
    for parts in (
        decompose_full_data(z, mu, log_var, chunk=64),
        decompose_minibatch(z[:50], mu[:50], log_var[:50], 300, "mss"),
        decompose_minibatch(z[:50], mu[:50], log_var[:50], 300, "mws"),
    ):
        total = parts.mutual_information + parts.total_correlation + parts.dimension_wise_kl
        torch.testing.assert_close(total, parts.kl, rtol=0, atol=1e-10)
        # and that is log q(z|x) - log p(z), by torch.distributions
        n = len(total)
        q, p = diag_normal(mu[:n], log_var[:n]), standard_normal(3, dtype=F64)
        torch.testing.assert_close(parts.kl, q.log_prob(z[:n]) - p.log_prob(z[:n]), rtol=0, atol=1e-10)


def test_the_full_data_estimator_matches_the_oracle(oracle):
    """N = 4000 examples. The estimator's own bias, measured over 20 seeds here, is about half a
    standard error (MI -0.010, TC +0.005, DWKL -0.007 nats at N = 4000; MI -0.074 at N = 500): the
    tolerance is 4 standard errors of the per-example mean plus 0.02 nats for it. A false alarm
    happens about 1e-4 of the time."""
    N = 4000
    mu, log_var, z = sample(oracle, N, seed=2)
    parts = decompose_full_data(z, mu, log_var)
    for estimate, exact in (
        (parts.mutual_information, oracle.mutual_information),
        (parts.total_correlation, oracle.total_correlation),
        (parts.dimension_wise_kl, oracle.dimension_wise_kl_per_dim.sum().item()),
    ):
        se = estimate.std().item() / math.sqrt(N)
        assert abs(estimate.mean().item() - exact) <= 4 * se + 0.02, (estimate.mean().item(), exact, se)
    per_dim = parts.dimension_wise_kl_per_dim
    se = per_dim.std(0) / math.sqrt(N)
    assert ((per_dim.mean(0) - oracle.dimension_wise_kl_per_dim).abs() <= 4 * se + 0.02).all()


def test_mss_weights_put_1_over_n_on_the_diagonal_and_sum_to_one():
    """rtqichen/beta-tcvae (and pythae, which copied it) write W.view(-1)[::M+1] = 1/N with M the
    batch size minus 1: a step of the batch size walks down column 0, not the diagonal."""
    B, N = 6, 1000
    W = mss_log_weights(B, N).exp()
    assert W.dtype == torch.float64  # exact weights, rounded once to the data's precision by the caller
    torch.testing.assert_close(W.diagonal(), torch.full((B,), 1 / N, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(W.sum(1), torch.ones(B, dtype=F64), rtol=0, atol=1e-14)  # each row a proper mixture
    buggy = torch.full((B, B), 1 / (B - 1))
    buggy.view(-1)[:: (B - 1) + 1] = 1 / N  # the reference's line
    assert torch.equal(buggy[:, 0], torch.full((B,), 1 / N)) and not torch.allclose(
        buggy.diagonal().double(), W.diagonal()
    )
    assert torch.equal(mws_log_weights(B, N), torch.full((B, B), -math.log(N * B), dtype=F64))  # MWS: its -log(N M)


def test_mss_on_the_whole_data_set_is_the_full_data_estimator(oracle):
    mu, log_var, z = sample(oracle, 256, seed=3)
    full, mss = decompose_full_data(z, mu, log_var), decompose_minibatch(z, mu, log_var, 256, "mss")
    for name in ("log_q_z", "log_q_zj", "log_q_z_given_x"):
        torch.testing.assert_close(getattr(mss, name), getattr(full, name), rtol=0, atol=1e-12)


def minibatch_bias(oracle, method, M, N=4096, draws=8192, seed=4):
    """The estimator's mean over draws / M batches of a data set of N, minus the exact terms."""
    mu, log_var, _ = sample(oracle, N, seed)
    g = torch.Generator().manual_seed(seed)
    sums = torch.zeros(3, dtype=F64)
    batches = draws // M
    for _ in range(batches):
        idx = torch.randperm(N, generator=g)[:M]
        m, lv = mu[idx], log_var[idx]
        z = m + (0.5 * lv).exp() * torch.randn(m.shape, generator=g, dtype=F64)
        p = decompose_minibatch(z, m, lv, N, method)
        sums += torch.stack([p.mutual_information.mean(), p.total_correlation.mean(), p.dimension_wise_kl.mean()])
    exact = torch.tensor(
        [oracle.mutual_information, oracle.total_correlation, oracle.dimension_wise_kl_per_dim.sum().item()],
        dtype=F64,
    )
    return sums / batches - exact


def test_the_stratified_estimator_s_bias_shrinks_with_the_batch(oracle):
    """MSS, data set of 4096, batch M, 8192 samples each; bias (MI, TC, DWKL) in nats, seed 4:
    M = 16: (+0.89, -0.42, -0.50), M = 64: (+0.28, -0.18, -0.15), M = 256: (+0.09, -0.05, +0.01),
    M = 1024: (+0.04, -0.02, +0.03); the last within the sampling noise of 8192 draws.
    A small batch overestimates MI and underestimates TC: each sample's own component weighs 1/N
    while the M - 1 others stand for all N - 1, so q(z) is noisier (and log q(z) biased low by Jensen)."""
    small, large = minibatch_bias(oracle, "mss", 64), minibatch_bias(oracle, "mss", 1024)
    assert small[0] > 0.1 and small[1] < -0.05  # the direction stated above
    assert (large[:2].abs() < small[:2].abs()).all()
    assert (large.abs() < 0.05).all(), large


def test_the_weighted_estimator_is_offset_by_log_n(oracle):
    """MWS's weights 1/(N M) sum to 1/N, not 1: where the batch's posteriors overlap (as here) it
    estimates log q(z) - log N and each log q(z_j) - log N, so MI is high by log N, TC by (D - 1) log N
    and the dimension-wise KL low by D log N, whatever the batch size (measured, N = 4096, log N = 8.32:
    M = 16: (+7.66, +16.94, -24.64), M = 1024: (+8.32, +16.64, -24.92)). Where the encoder separates
    the examples the offset tends to log M instead. The three still add up to the KL."""
    N, D = 4096, 3
    for M in (64, 1024):
        bias = minibatch_bias(oracle, "mws", M, N=N)
        offsets = torch.tensor([math.log(N), (D - 1) * math.log(N), -D * math.log(N)], dtype=F64)
        assert ((bias - offsets).abs() < 0.5).all(), (M, bias)


def blobs(n: int, seed: int, side: int = 12) -> torch.Tensor:
    """Binary images of a 4 x 4 square at an independent, uniform x and y: two known independent factors."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = (torch.randint(0, side - 3, (n,), generator=g) for _ in range(2))
    rows, cols = torch.arange(side)[None, :, None], torch.arange(side)[None, None, :]
    in_rows = (rows >= ys[:, None, None]) & (rows < ys[:, None, None] + 4)  # (n, side, 1)
    in_cols = (cols >= xs[:, None, None]) & (cols < xs[:, None, None] + 4)  # (n, 1, side)
    return (in_rows & in_cols).float()[:, None]


def test_beta_tcvae_total_correlation_falls_as_its_weight_grows(tmp_path):
    """--objective tc on data with two independent factors: the full-data TC of the learned posterior,
    measured here 1.9-2.0 nats at weight 1 and 0.4-0.6 at weight 4 (two seeds each, 25 epochs); this
    test's runs: 1.89 (weight 1), 0.35 (weight 6, MSS), 0.23 (weight 6, MWS), standard errors 0.01-0.03.
    It asserts weight 6 ends more than 8 combined standard errors below weight 1."""
    import vaelab
    from vaelab.config import Config
    from vaelab.evaluation import decompose_kl, posterior_params

    x = blobs(3000, seed=0)
    tc = {}
    for weight, estimator in ((1.0, "mss"), (6.0, "mss"), (6.0, "mws")):
        config = Config(objective="tc", tc_weight=weight, tc_estimator=estimator, latent_dim=4, hidden=(128,))
        torch.manual_seed(0)
        model = vaelab.build_model(config, (1, 12, 12))
        state = vaelab.fit(model, x, None, config, epochs=25, binarize="none", progress=False)
        record = state.history[-1]  # the objective's own minibatch estimates are logged
        parts = record.mutual_information + record.total_correlation + record.dimension_wise_kl
        assert record.total_correlation is not None and math.isfinite(parts)
        mu, log_var, _ = posterior_params(model.eval(), x[:2000])
        torch.manual_seed(0)
        split, _ = decompose_kl(model, mu, log_var)
        tc[weight, estimator] = split.total_correlation, split.total_correlation_std_error
    (low, low_se), (high, high_se) = tc[6.0, "mss"], tc[1.0, "mss"]
    assert low < high - 8 * math.hypot(low_se, high_se), tc
    assert tc[6.0, "mws"][0] < high, tc  # the weighted estimator pushes the same way


def test_the_full_data_mixture_is_exact_in_float64():
    """log q(z_n) with q = 1/N sum_m q(z|x_m), against a direct float64 logsumexp: the weight 1/N is
    taken in the inputs' precision (in float32 each log q was 8.4e-8 nats off here, summed over the 20
    marginals 1.7e-6)."""
    from vaelab.decomposition import full_data_mixture

    g = torch.Generator().manual_seed(0)
    N, D = 300, 20
    mu, log_var = (
        torch.randn(N, D, generator=g, dtype=torch.float64),
        0.3 * torch.randn(N, D, generator=g, dtype=torch.float64),
    )
    z = mu + (0.5 * log_var).exp() * torch.randn(N, D, generator=g, dtype=torch.float64)
    log_q_z, log_q_zj, _ = full_data_mixture(z, mu, log_var, chunk=64)
    per_dim = -0.5 * (math.log(2 * math.pi) + log_var[None] + (z[:, None] - mu[None]) ** 2 / log_var[None].exp())
    direct = torch.logsumexp(per_dim.sum(-1), dim=1) - math.log(N)
    direct_j = torch.logsumexp(per_dim, dim=1) - math.log(N)
    assert torch.allclose(log_q_z, direct, rtol=0, atol=1e-11) and torch.allclose(
        log_q_zj, direct_j, rtol=0, atol=1e-11
    )
