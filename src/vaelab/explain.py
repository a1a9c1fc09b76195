r"""The derivation from KL(q(z|x) || p(z|x)) to the ELBO, as a program.

Each step states an identity, computes its left and right sides with numbers on a
linear-Gaussian model (whose p(x) and p(z|x) are exact, see ``linear_gaussian.py``)
and an imperfect diagonal-Gaussian q(z|x), and checks they agree: to 1e-6 for exact
identities in float64, to 4 standard errors for Monte Carlo ones.

    1. D_KL[q || p(z|x)] = E_q[log q(z|x) - log p(z|x)]                  definition
    2. log p(z|x) = log p(x|z) + log p(z) - log p(x)                        Bayes' rule
    3. log p(x) - D_KL[q || p(z|x)] = E_q[log p(x|z)] - D_KL[q || p(z)]     substitute 2 into 1;
                                                                            log p(x) leaves E_q
    4. D_KL[q || N(0, I)] = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)
    5. D_KL >= 0, so ELBO <= log p(x); the gap is D_KL[q || p(z|x)]
    6. per dimension: mu^2/2 + (sigma^2 - 1 - log sigma^2)/2
    7. averaged over the data: E_x D_KL[q(z|x) || p(z)] = I_q(x; z) + TC + sum_j D_KL[q(z_j) || p(z_j)]
       on a linear Gaussian encoder, where each part has a closed form (Chen et al. 2018)
    8. what the next model families change: a second latent layer gives one KL per layer, each at
       the sample of the layer above (on a two-level linear-Gaussian model); a label y conditions
       every term, and the KL keeps its closed form
    9. the KL as bits (bits-back coding, ``vaelab compress``): with z on a grid of buckets of equal
       prior mass, the expected bits pushed for z minus those got back is the KL, and the expected
       code length is -ELBO, both in bits, exact sums over the grid
   10. beta chooses a point on the rate-distortion curve: the optimum of D + beta R of a linear VAE
       in closed form against numerical optimisation, and the dimensions that collapse
   11. a discrete latent: on a mixture of Gaussians with known components, q the exact posterior over
       the component gives ELBO = log p(x); a shifted q leaves a gap equal to the categorical KL to the
       exact posterior; the KL to the uniform prior is log K - H(q), at most log K
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from torch.distributions import MultivariateNormal

from vaelab import memory
from vaelab.bitsback import interval_masses
from vaelab.decomposition import decompose_full_data
from vaelab.distributions import diag_normal
from vaelab.errors import UserError
from vaelab.kl import kl_categorical, kl_mvn, kl_normal_std_normal, normal_entropy
from vaelab.linear_gaussian import (
    LinearEncoderOracle,
    LinearGaussian,
    TwoLevelLinearGaussian,
    amortization_gap,
    approximation_gap,
    beta_vae_optimum,
    expected_log_likelihood,
    linear_vae_rate_distortion,
    linear_vae_terms,
    mean_field_kl,
)
from vaelab.objectives import elbo, iwae_log_weights

EXACT_TOL = 1e-6
# Step 7 estimates a mixture density from N = 4000 examples; its bias grows with the dimension of z
# (measured on these oracles: below 0.03 nats up to 3 dimensions, 0.23 nats on MI at 6), so step 7
# runs on at most 3 latent dimensions and allows 4 standard errors plus 0.05 nats for the bias.
DECOMPOSITION_EXAMPLES = 4000
DECOMPOSITION_MAX_DIM = 3
ESTIMATOR_BIAS_ALLOWANCE = 0.05
N_STD_ERRORS = 4.0
F64 = torch.float64


@dataclass(frozen=True)
class Step:
    name: str
    formula: str
    lhs: float
    rhs: float
    tolerance: float
    # "exact" (float64 arithmetic), "monte_carlo" (tolerance = 4 standard errors), "optimisation",
    # "estimator" (4 standard errors plus the estimator's bias allowance)
    method: str
    note: str = ""
    std_error: float | None = None

    @property
    def abs_diff(self) -> float:
        return abs(self.lhs - self.rhs)

    @property
    def holds(self) -> bool:
        return self.abs_diff <= self.tolerance

    def as_dict(self) -> dict:
        return {**asdict(self), "abs_diff": self.abs_diff, "holds": self.holds}


@dataclass
class Explanation:
    model: LinearGaussian
    x: Tensor  # (d,)
    mu: Tensor  # q's mean, (k,)
    log_var: Tensor  # q's log-variance, (k,)
    posterior: MultivariateNormal
    log_px: float
    elbo: float
    kl_q_prior: float
    kl_q_posterior: float
    steps: list[Step] = field(default_factory=list)
    elbo_trace: list[float] = field(default_factory=list)  # step 5: ELBO during optimisation over q
    intuition: list[dict] = field(default_factory=list)  # step 6: the table
    mean_field_gap: float = 0.0  # step 5: min over diagonal q of D_KL[q || p(z|x)]
    samples: int = 0
    seed: int = 0
    mixture: dict = field(default_factory=dict)  # step 11: the mixture's means, s^2, x and the shifted q

    @property
    def failed(self) -> list[Step]:
        return [s for s in self.steps if not s.holds]

    def as_dict(self) -> dict:
        return {
            "seed": self.seed,
            "samples": self.samples,
            "model": {"W": self.model.W.tolist(), "b": self.model.b.tolist(), "noise_var": self.model.noise_var},
            "x": self.x.tolist(),
            "q": {"mu": self.mu.tolist(), "log_var": self.log_var.tolist()},
            "log_px": self.log_px,
            "elbo": self.elbo,
            "kl_q_prior": self.kl_q_prior,
            "kl_q_posterior": self.kl_q_posterior,
            "posterior": {"mu": self.posterior.mean.tolist(), "cov": self.posterior.covariance_matrix.tolist()},
            "steps": [s.as_dict() for s in self.steps],
            "optimisation": {"elbo": self.elbo_trace, "log_px": self.log_px, "mean_field_gap": self.mean_field_gap},
            "intuition": self.intuition,
            "mixture": self.mixture,
        }


def _mc(name, formula, exact: float, samples: Tensor, note="") -> Step:
    """A Monte Carlo step: lhs exact, rhs the sample mean; tolerance 4 standard errors."""
    n = samples.numel()
    se = samples.std().item() / math.sqrt(n)
    return Step(name, formula, exact, samples.mean().item(), N_STD_ERRORS * se, "monte_carlo", note, se)


@dataclass(frozen=True)
class Problem:
    """The numbers every step reads: the model, x, the exact posterior, an imperfect q, and
    ``samples`` draws z ~ q with their log densities (one set of draws for every Monte Carlo step)."""

    model: LinearGaussian
    x: Tensor  # (d,)
    posterior: MultivariateNormal
    log_px: float
    mu: Tensor  # q's mean, (k,)
    log_var: Tensor  # q's log-variance, (k,)
    kl_q_posterior: float  # closed form
    kl_q_prior: float  # closed form
    reconstruction: float  # E_q[log p(x|z)] in closed form
    log_q: Tensor  # (N,) at the draws z_n ~ q
    log_p_z: Tensor
    log_posterior: Tensor
    log_px_given_z: Tensor

    @property
    def elbo(self) -> float:
        return self.reconstruction - self.kl_q_prior


def explain(seed: int = 0, latent_dim: int = 2, data_dim: int = 5, samples: int = 20_000) -> Explanation:
    """Run the derivation on a random linear-Gaussian model and a deliberately imperfect q. Its draws
    come from the global RNG seeded by ``seed`` inside a fork: the caller's RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _explain(seed, latent_dim, data_dim, samples)


def _explain(seed: int, latent_dim: int, data_dim: int, samples: int) -> Explanation:
    if latent_dim < 1 or data_dim < 1:
        raise UserError("--latent-dim and --data-dim must be at least 1")
    if samples < 2:
        raise UserError("--samples must be at least 2: Monte Carlo steps report a standard error")
    width = latent_dim + data_dim  # float64 draws of z and x, a few arrays of each, and the d x d covariances
    memory.require(
        8 * (16 * samples * width + 8 * width * width),
        f"{samples:,} samples of {latent_dim} + {data_dim} dimensions",
        "use fewer --samples or dimensions",
    )
    p = _problem(seed, latent_dim, data_dim, samples)
    gap_steps, trace, mean_field_gap = _gap_steps(p)
    per_dimension, table = _per_dimension_step()
    steps = [
        *_definition_steps(p),
        *_elbo_steps(p),
        *_closed_form_steps(p),
        *gap_steps,
        per_dimension,
        *_decomposition_steps(
            seed, min(latent_dim, DECOMPOSITION_MAX_DIM), data_dim, min(samples, DECOMPOSITION_EXAMPLES)
        ),
        *_family_steps(p, seed, samples),
        *_bits_steps(p),
        *_rate_distortion_steps(seed, latent_dim, data_dim),
    ]
    discrete_steps, mixture = _discrete_steps(seed, data_dim, samples)
    steps += discrete_steps
    return Explanation(
        model=p.model,
        x=p.x,
        mu=p.mu,
        log_var=p.log_var,
        posterior=p.posterior,
        log_px=p.log_px,
        elbo=p.elbo,
        kl_q_prior=p.kl_q_prior,
        kl_q_posterior=p.kl_q_posterior,
        steps=steps,
        elbo_trace=trace,
        intuition=table,
        mean_field_gap=mean_field_gap,
        samples=samples,
        seed=seed,
        mixture=mixture,
    )


def _problem(seed: int, latent_dim: int, data_dim: int, samples: int) -> Problem:
    g = torch.Generator().manual_seed(seed)
    model = LinearGaussian.random(data_dim, latent_dim, seed=seed)
    z_true = torch.randn(latent_dim, generator=g, dtype=F64)
    x = model.decode(z_true).mean + model.noise_var**0.5 * torch.randn(data_dim, generator=g, dtype=F64)
    post = model.posterior(x)
    # an imperfect q: the posterior's mean, shifted, and its marginal variances, widened
    mu = post.mean + 0.5 * torch.randn(latent_dim, generator=g, dtype=F64)
    log_var = post.covariance_matrix.diagonal().log() + 0.7
    q = diag_normal(mu, log_var)
    cov_q = torch.diag(log_var.exp())
    torch.manual_seed(seed)  # the Monte Carlo draws are a function of --seed
    z = q.sample((samples,))  # (N, k)
    return Problem(
        model=model,
        x=x,
        posterior=post,
        log_px=model.log_px(x).item(),
        mu=mu,
        log_var=log_var,
        kl_q_posterior=kl_mvn(mu, cov_q, post.mean, post.covariance_matrix).item(),
        kl_q_prior=kl_normal_std_normal(mu, log_var).sum().item(),
        reconstruction=expected_log_likelihood(model, x, mu, cov_q).item(),
        log_q=q.log_prob(z),
        log_p_z=model.prior().log_prob(z),
        log_posterior=post.log_prob(z),
        log_px_given_z=model.decode(z).log_prob(x),
    )


def _definition_steps(p: Problem) -> list[Step]:
    """1. the definition of the KL to the posterior; 2. Bayes' rule at the sampled z."""
    bayes = p.log_px_given_z + p.log_p_z - p.log_px
    worst = int((p.log_posterior - bayes).abs().argmax())
    return [
        _mc(
            "1. KL to the posterior is an expectation under q",
            "D_KL[q(z|x) ‖ p(z|x)] = E_q[log q(z|x) − log p(z|x)]",
            p.kl_q_posterior,
            p.log_q - p.log_posterior,
            "lhs: closed form for two Gaussians (Cholesky); rhs: mean over samples z ~ q",
        ),
        Step(
            "2. Bayes' rule at sampled z",
            "log p(z|x) = log p(x|z) + log p(z) − log p(x)",
            p.log_posterior[worst].item(),
            bayes[worst].item(),
            EXACT_TOL,
            "exact",
            f"checked at all {len(bayes)} sampled z; shown at the one with the largest difference",
        ),
    ]


def _elbo_steps(p: Problem) -> list[Step]:
    """3. substitute 2 into 1: D_KL = E_q[log q - log p(x|z) - log p(z)] + log p(x), so
    log p(x) - D_KL[q || p(z|x)] = E_q[log p(x|z)] - D_KL[q || p(z)]."""
    return [
        Step(
            "3. Substitute and rearrange: the ELBO",
            "log p(x) − D_KL[q ‖ p(z|x)] = E_q[log p(x|z)] − D_KL[q ‖ p(z)]",
            p.log_px - p.kl_q_posterior,
            p.elbo,
            EXACT_TOL,
            "exact",
            "log p(x) does not depend on z, so it leaves the expectation; rhs in closed form",
        ),
        _mc(
            "3b. The ELBO's reconstruction term by sampling",
            "E_q[log p(x|z)] ≈ (1/N) Σ_n log p(x|z_n)",
            p.reconstruction,
            p.log_px_given_z,
            "this is how a VAE computes it: sampled z, closed form only for the KL",
        ),
    ]


def _closed_form_steps(p: Problem) -> list[Step]:
    """4. the closed form of D_KL[q || N(0, I)], term by term."""
    k = p.mu.shape[0]
    neg_entropy = -normal_entropy(p.log_var).sum().item()
    cross = -0.5 * (k * math.log(2 * math.pi) + (p.mu.square() + p.log_var.exp()).sum()).item()
    return [
        _mc("4a. The entropy part", "E_q[log q(z|x)] = −H(q) = −Σ_j ½(log 2π + 1 + log σ_j²)", neg_entropy, p.log_q),
        _mc("4b. The cross-entropy part", "E_q[log p(z)] = −Σ_j ½(log 2π + μ_j² + σ_j²)", cross, p.log_p_z),
        Step(
            "4c. Subtract: the closed form",
            "E_q[log q] − E_q[log p(z)] = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)",
            neg_entropy - cross,
            0.5 * (p.mu.square() + p.log_var.exp() - 1 - p.log_var).sum().item(),
            EXACT_TOL,
            "exact",
            "the log 2π terms cancel; what remains is the formula",
        ),
        _mc(
            "4d. The closed form against sampling",
            "½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²) = E_q[log q(z|x) − log p(z)]",
            p.kl_q_prior,
            p.log_q - p.log_p_z,
        ),
    ]


def _gap_steps(p: Problem) -> tuple[list[Step], list[float], float]:
    """5. the gap log p(x) - ELBO, by maximising the ELBO over a diagonal q; returns the steps,
    the ELBO's trace during the optimisation, and the mean-field gap."""
    post, k = p.posterior, p.mu.shape[0]
    trace, mu_opt, log_var_opt = _maximise_elbo_diagonal(p.model, p.x, p.mu, p.log_var)
    best_kl_post = kl_mvn(mu_opt, torch.diag(log_var_opt.exp()), post.mean, post.covariance_matrix).item()
    mean_field_gap = mean_field_kl(post)
    exact_elbo = (
        expected_log_likelihood(p.model, p.x, post.mean, post.covariance_matrix)
        - kl_mvn(post.mean, post.covariance_matrix, torch.zeros_like(p.mu), torch.eye(k, dtype=F64))
    ).item()
    steps = [
        Step(
            "5a. ELBO ≤ log p(x): the gap is the KL to the posterior",
            "log p(x) − ELBO(q) = D_KL[q ‖ p(z|x)] ≥ 0",
            p.log_px - trace[-1],
            best_kl_post,
            EXACT_TOL,
            "exact",
            f"after {len(trace) - 1} L-BFGS gradient steps on a diagonal q; log p(x) = {p.log_px:.6f} stayed fixed",
        ),
        Step(
            "5b. A diagonal q stops at the mean-field gap",
            "max_{q diagonal} ELBO = log p(x) − D_KL[N(m, diag(1/Λ_jj)) ‖ p(z|x)]",
            p.log_px - trace[-1],
            mean_field_gap.item(),
            1e-5,
            "optimisation",
            "the best diagonal q has the posterior mean and variances 1/Λ_jj (Λ the posterior precision; "
            "Bishop 2006, §10.1.2); it cannot represent the posterior's correlations, so the gap stays "
            "> 0 unless p(z|x) is itself diagonal. Tolerance: the optimiser's convergence, not an identity",
        ),
        Step(
            "5c. With q = p(z|x) (full covariance) the gap is zero",
            "ELBO(p(z|x)) = log p(x)",
            exact_elbo,
            p.log_px,
            EXACT_TOL,
            "exact",
            "the bound is tight exactly when q is the true posterior",
        ),
        *_gap_split_steps(p, trace[-1]),
    ]
    return steps, trace, mean_field_gap.item()


def _gap_split_steps(p: Problem, best_elbo: float) -> list[Step]:
    """5d-f. The gap of an encoder's q in two (Cremer et al. 2018): approximation (the diagonal family cannot
    do better) and amortization (this q is not the family's best for this x), each in closed form."""
    post, k = p.posterior, p.mu.shape[0]
    precision = torch.linalg.inv(post.covariance_matrix)
    approximation = approximation_gap(precision).item()
    amortization = amortization_gap(p.mu, p.log_var.exp(), post.mean, precision).item()
    W = p.model.W
    Q, _ = torch.linalg.qr(W)  # the columns of W made orthogonal, their lengths kept: W' = Q diag(|w_j|)
    orthogonal = LinearGaussian(Q * W.norm(dim=0), p.model.b, p.model.noise_var)
    orthogonal_precision = torch.eye(k, dtype=F64) + orthogonal.W.T @ orthogonal.W / orthogonal.noise_var
    return [
        Step(
            "5d. Approximation gap: what the diagonal family cannot reach",
            "log p(x) − max_{q diagonal} ELBO = ½ (Σ_i log Λ_ii − log det Λ),  Λ = I + WᵀW/s²",
            p.log_px - best_elbo,
            approximation,
            1e-5,
            "optimisation",
            "Cremer, Li & Duvenaud 2018; the lhs from the optimiser of 5a, the rhs in closed form (> 0 here: W's "
            "columns are not orthogonal, so the posterior's dimensions are correlated)",
        ),
        Step(
            "5e. Amortization gap: what this q loses to the best diagonal q for this x",
            "ELBO(q*) − ELBO(q) = ½ Σ_i (Λ_ii v_i − 1 − log Λ_ii v_i) + ½ (m − μ)ᵀ Λ (m − μ)",
            best_elbo - p.elbo,
            amortization,
            1e-5,
            "optimisation",
            "q = N(m, diag v) the imperfect q of steps 1-4 (an encoder's output), q* = N(μ, diag 1/Λ_ii); an encoder "
            "that output q* would have no amortization gap",
        ),
        Step(
            "5f. The two add up to the whole gap",
            "log p(x) − ELBO(q) = D_KL[q ‖ p(z|x)] = approximation + amortization",
            p.kl_q_posterior,
            approximation + amortization,
            EXACT_TOL,
            "exact",
            "the lhs by the closed form of the KL between two Gaussians",
        ),
        Step(
            "5g. Orthogonal columns of W leave no approximation gap",
            "WᵀW diagonal ⇒ Λ diagonal ⇒ ½ (Σ_i log Λ_ii − log det Λ) = 0",
            approximation_gap(orthogonal_precision).item(),
            0.0,
            EXACT_TOL,
            "exact",
            "W's columns made orthogonal (QR), their lengths kept: p(z|x) is then diagonal and a diagonal q can be "
            "exact; what is left of any encoder's gap is amortization",
        ),
    ]


def _per_dimension_step() -> tuple[Step, list[dict]]:
    """6. intuition: the two prices per dimension, over a table of (mu, sigma)."""
    table = []
    worst_diff = 0.0
    for m in (0.0, 1.0, 2.0):
        for s in (0.5, 1.0, 2.0):
            mean_term, width_term = 0.5 * m * m, 0.5 * (s * s - 1 - math.log(s * s))
            total = kl_normal_std_normal(torch.tensor(m, dtype=F64), torch.tensor(math.log(s * s), dtype=F64))
            worst_diff = max(worst_diff, abs(total.item() - mean_term - width_term))
            table.append({"mu": m, "sigma": s, "mean_term": mean_term, "width_term": width_term, "kl": total.item()})
    step = Step(
        "6. Per dimension: a price for the mean and a price for the width",
        "KL_j = μ_j²/2 + (σ_j² − 1 − log σ_j²)/2",
        worst_diff,
        0.0,
        EXACT_TOL,
        "exact",
        "lhs: the largest |KL_j − mean term − width term| over the table",
    )
    return step, table


def _decomposition_steps(seed: int, latent_dim: int, data_dim: int, examples: int) -> list[Step]:
    """7. the KL averaged over the data, taken apart: a linear Gaussian encoder q(z|x) = N(A x + c, S) on
    Gaussian data x ~ N(m, Sigma) has a Gaussian aggregate posterior, so every part has a closed form
    (``LinearEncoderOracle``); the full-data estimator that ``vaelab evaluate`` uses is checked against it."""
    oracle = LinearEncoderOracle.random(data_dim, latent_dim, seed=seed)
    g = torch.Generator().manual_seed(seed)
    root = torch.linalg.cholesky(oracle.cov_x)
    x = oracle.m + torch.randn(examples, data_dim, generator=g, dtype=F64) @ root.T
    mu, log_var = oracle.posterior_params(x)
    z = mu + (0.5 * log_var).exp() * torch.randn(mu.shape, generator=g, dtype=F64)
    parts = decompose_full_data(z, mu, log_var)
    mi, tc, dwkl = oracle.mutual_information, oracle.total_correlation, oracle.dimension_wise_kl_per_dim.sum().item()
    added = parts.mutual_information + parts.total_correlation + parts.dimension_wise_kl

    def estimated(name: str, formula: str, exact: float, samples: Tensor) -> Step:
        se = samples.std().item() / math.sqrt(examples)
        tol = N_STD_ERRORS * se + ESTIMATOR_BIAS_ALLOWANCE
        note = f"{examples} examples x_n, one z_n ~ q(z|x_n) each; q(z) = (1/N) Σ_m q(z|x_m) over all of them"
        return Step(name, formula, exact, samples.mean().item(), tol, "estimator", note, se)

    return [
        Step(
            "7a. Averaged over the data, the KL takes apart into three",
            "E_x D_KL[q(z|x) ‖ p(z)] = I_q(x; z) + KL(q(z) ‖ Π_j q(z_j)) + Σ_j KL(q(z_j) ‖ p(z_j))",
            oracle.average_kl,
            mi + tc + dwkl,
            EXACT_TOL,
            "exact",
            "q(z|x) = N(Ax + c, S) on x ~ N(m, Σ): q(z) = N(Am + c, AΣAᵀ + S); lhs the closed form averaged "
            "over x, rhs ½(log|C| − log|S|) + ½(Σ_j log C_jj − log|C|) + Σ_j KL(N(μ_j, C_jj) ‖ N(0, 1))",
        ),
        Step(
            "7b. The sampled parts add up to the sampled KL, sample by sample",
            "[log q(z|x) − log q(z)] + [log q(z) − Σ_j log q(z_j)] + Σ_j [log q(z_j) − log p(z_j)] "
            "= log q(z|x) − log p(z)",
            (added - parts.kl).abs().max().item(),
            0.0,
            EXACT_TOL,
            "exact",
            "lhs: the largest difference over the samples",
        ),
        estimated(
            "7c. Index-code mutual information", "I_q(x; z) = E[log q(z|x) − log q(z)]", mi, parts.mutual_information
        ),
        estimated(
            "7d. Total correlation", "KL(q(z) ‖ Π_j q(z_j)) = E[log q(z) − Σ_j log q(z_j)]", tc, parts.total_correlation
        ),
        estimated(
            "7e. Dimension-wise KL",
            "Σ_j KL(q(z_j) ‖ p(z_j)) = E[Σ_j log q(z_j) − log p(z_j)]",
            dwkl,
            parts.dimension_wise_kl,
        ),
    ]


def _maximise_elbo_diagonal(
    model: LinearGaussian, x: Tensor, mu: Tensor, log_var: Tensor, steps: int = 60
) -> tuple[list[float], Tensor, Tensor]:
    """Maximise the exact ELBO over a diagonal q's (mu, log_var) by L-BFGS gradient steps; returns the trace."""
    mu = mu.clone().requires_grad_()
    log_var = log_var.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [mu, log_var],
        lr=1.0,
        max_iter=5,
        history_size=20,
        tolerance_grad=1e-14,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def neg_elbo():
        opt.zero_grad()
        value = -(
            expected_log_likelihood(model, x, mu, torch.diag(log_var.exp())) - kl_normal_std_normal(mu, log_var).sum()
        )
        value.backward()
        return value

    trace = [-neg_elbo().item()]
    for _ in range(steps):
        opt.step(neg_elbo)
        trace.append(-neg_elbo().item())
    return trace, mu.detach(), log_var.detach()


def _family_steps(p: Problem, seed: int, samples: int) -> list[Step]:
    """8a-b. Two latent layers, top-down (``linear_gaussian.TwoLevelLinearGaussian``); 8c. a label y."""
    two = TwoLevelLinearGaussian.random(p.x.shape[0], seed=seed)
    q_shifted = dataclasses.replace(two, posterior_shift=0.3)
    torch.manual_seed(seed)
    x2 = two.marginal().sample()
    terms = elbo(q_shifted, x2.expand(samples, -1))  # one (z2, z1) draw per row
    log_w = iwae_log_weights(two, x2[None], samples)[:, 0]  # the exact posterior as q
    worst = int((log_w - two.log_px(x2)).abs().argmax())
    # a label y moves the mean of p(x|z, y) by V y: the model of steps 1-6 for the data x - V y
    V = torch.randn(p.x.shape[0], 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    y = torch.nn.functional.one_hot(torch.tensor(1), 3).to(F64)
    given_y = LinearGaussian(p.model.W, p.model.b + V @ y, p.model.noise_var)
    post_y = given_y.posterior(p.x)
    cov_q = torch.diag(p.log_var.exp())
    return [
        _mc(
            "8a. Two latent layers: one KL per layer",
            "log p(x) − D_KL[q(z1,z2|x) ‖ p(z1,z2|x)] = E_q[log p(x|z1)] − D_KL[q(z2|x) ‖ p(z2)] "
            "− E_q(z2|x) D_KL[q(z1|x,z2) ‖ p(z1|z2)]",
            (two.log_px(x2) - q_shifted.kl_q_posterior(x2[None])[0]).item(),
            terms.elbo,
            "z2 ~ N(0, I), z1|z2 ~ N(A z2 + a, s1² I), x|z1 ~ N(W z1 + b, s² I); q the exact posterior with every "
            "mean shifted by 0.3; rhs: each layer's KL in closed form at the sampled z2 (what --family "
            "hierarchical computes), averaged over draws",
        ),
        Step(
            "8b. With the exact posterior of both layers every importance weight is p(x)",
            "log p(x, z1, z2) − log q(z1, z2|x) = log p(x)  for q(z2|x) q(z1|x,z2) = p(z2|x) p(z1|x,z2)",
            two.log_px(x2).item(),
            log_w[worst].item(),
            EXACT_TOL,
            "exact",
            f"checked at all {samples} joint draws; shown at the one with the largest difference",
        ),
        Step(
            "8c. Given a label y, the same identity and the same closed form",
            "log p(x|y) − D_KL[q(z|x,y) ‖ p(z|x,y)] = E_q[log p(x|z,y)] − D_KL[q(z|x,y) ‖ p(z)]",
            (given_y.log_px(p.x) - kl_mvn(p.mu, cov_q, post_y.mean, post_y.covariance_matrix)).item(),
            (expected_log_likelihood(given_y, p.x, p.mu, cov_q) - kl_normal_std_normal(p.mu, p.log_var).sum()).item(),
            EXACT_TOL,
            "exact",
            "p(x|z,y) = N(Wz + b + V y, s² I): conditioning moves p(x|z) and p(z|x,y); the KL to p(z) is still "
            "½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²), μ and σ now functions of (x, y) (what --family conditional computes)",
        ),
    ]


GRID_BITS = (4, 8, 12, 16)  # step 9: 2^b buckets per dimension across q's mean +- 10 sigma; the last is checked
GRID_TOL = 1e-4  # bits: what the finest grid may still differ by (at most 1.1e-6 on seeds 0-24, k up to 12)


def _bits_steps(p: Problem) -> list[Step]:
    """9a. the expected net bits for z on a grid (bits-back: pushed with P, got back with Q) against
    KL(q || p(z)) in bits; 9b. the expected code length of x and z against -ELBO in bits. Both are
    sums over every bucket, no sampling: E_Q of the quadratic -log p(x|z) needs only Q's means and
    variances per dimension. The grid: 2^b equal buckets across mu_j +- 10 sigma_j and one beyond
    each end, so it resolves q wherever q is (vaelab compress's buckets of equal prior mass resolve
    it only where the prior has mass)."""
    W, b, s2 = p.model.W, p.model.b, p.model.noise_var
    sigma, d = (0.5 * p.log_var).exp(), p.x.shape[0]
    z_bits, code = {}, {}
    inf = torch.tensor([math.inf], dtype=F64)
    for bits in GRID_BITS:
        net, mean, var = 0.0, torch.zeros_like(p.mu), torch.zeros_like(p.mu)
        for j in range(len(p.mu)):
            inner = p.mu[j] + sigma[j] * torch.linspace(-10, 10, 2**bits + 1, dtype=F64)
            edges = torch.cat([-inf, inner, inf])
            centres = torch.cat([inner[:1], (inner[1:] + inner[:-1]) / 2, inner[-1:]])
            q = interval_masses(edges, p.mu[j], sigma[j])
            prior = interval_masses(edges, torch.zeros((), dtype=F64), torch.ones((), dtype=F64))
            kept = q > 0
            net += float((q[kept] * (q[kept].log2() - prior[kept].log2())).sum())
            mean[j] = (q * centres).sum()
            var[j] = (q * (centres - mean[j]).square()).sum()
        residual = p.x - W @ mean - b
        neg_log_px_z = 0.5 * d * math.log(2 * math.pi * s2) + float(
            (residual.square().sum() + (var * W.square().sum(0)).sum()) / (2 * s2)
        )
        z_bits[bits], code[bits] = net, neg_log_px_z / math.log(2) + net
    finest = GRID_BITS[-1]

    def approach(values: dict) -> str:
        return ", ".join(f"{v:.5f} with 2^{b}" for b, v in values.items())

    return [
        Step(
            "9a. The KL as bits: what z costs in a bits-back code",
            "E_Q[−log2 P(ẑ)] − E_Q[−log2 Q(ẑ|x)] = D_KL[q ‖ p(z)] / ln 2   (ẑ: z's bucket on a grid)",
            p.kl_q_prior / math.log(2),
            z_bits[finest],
            GRID_TOL,
            "discretised",
            "bits-back coding pops ẑ from the message with Q(ẑ|x), the bucket masses of q (getting −log2 Q bits "
            "back), and pushes it with P(ẑ), those of p(z) (paying −log2 P); rhs summed over every bucket of 2^b "
            f"across μ ± 10σ per dimension: {approach(z_bits)}. vaelab compress does this with a trained model",
        ),
        Step(
            "9b. The code length is −ELBO",
            "E_Q[−log2 p(x|ẑ)] + E_Q[log2 Q(ẑ|x) − log2 P(ẑ)] = −ELBO / ln 2",
            -p.elbo / math.log(2),
            code[finest],
            GRID_TOL,
            "discretised",
            "x is continuous here, so its bits are −log2 of a density (a code at precision δ adds −log2 δ per "
            f"dimension to both sides); rhs: {approach(code)}",
        ),
    ]


MIXTURE_COMPONENTS = 4  # step 11: K, the categories of the discrete latent


def _discrete_steps(seed: int, data_dim: int, samples: int) -> tuple[list[Step], dict]:
    """11. A discrete latent c ~ Uniform(K), x|c ~ N(m_c, s^2 I) with known components: p(x) and the exact
    posterior p(c|x) are finite sums. 11a. q = p(c|x) gives ELBO = log p(x); 11b. a shifted q leaves the gap
    KL(q || p(c|x)), the categorical KL; 11c. the KL to the uniform prior, E_q[log q(c|x) - log p(c)] by
    Monte Carlo, against log K - H(q), which never exceeds log K (what --posterior categorical computes)."""
    K, s2 = MIXTURE_COMPONENTS, 1.0
    g = torch.Generator().manual_seed(seed)
    # components about sqrt(2) apart in any dimension: x could have come from several, so p(c|x) is not one-hot
    means = torch.randn(K, data_dim, generator=g, dtype=F64) / math.sqrt(data_dim)
    x = means[1] + math.sqrt(s2) * torch.randn(data_dim, generator=g, dtype=F64)
    log_px_c = -0.5 * (data_dim * math.log(2 * math.pi * s2) + (x - means).square().sum(-1) / s2)  # (K,)
    log_px = torch.logsumexp(log_px_c, 0) - math.log(K)
    exact = log_px_c - math.log(K) - log_px  # log p(c|x)

    def elbo_of(log_q: Tensor) -> Tensor:  # E_q[log p(x|c)] - KL(q || Uniform(K)), the KL as log K - H(q)
        q = log_q.exp()
        return (q * log_px_c).sum() - kl_categorical(log_q, torch.zeros(K, dtype=F64))

    log_q = torch.log_softmax(exact + 0.8 * torch.randn(K, generator=g, dtype=F64), 0)  # a shifted q
    torch.manual_seed(seed)
    c = torch.distributions.Categorical(logits=log_q).sample((samples,))
    kl_prior = kl_categorical(log_q, torch.zeros(K, dtype=F64)).item()
    mixture = f"c ~ Uniform({K}), x|c ~ N(m_c, {s2} I) in {data_dim} dimensions, x drawn from component 1"
    numbers = {"means": means.tolist(), "noise_var": s2, "x": x.tolist(), "q": log_q.exp().tolist()}
    return [
        Step(
            "11a. A discrete latent: with q the exact posterior, the ELBO is log p(x)",
            "E_q[log p(x|c)] − D_KL[q(c|x) ‖ p(c)] = log p(x)  for q(c|x) = p(c|x)",
            log_px.item(),
            elbo_of(exact).item(),
            EXACT_TOL,
            "exact",
            f"{mixture}: log p(x) = log (1/K) Σ_c p(x|c), p(c|x) ∝ p(x|c), sums over the K components",
        ),
        Step(
            "11b. A shifted q: the gap is the categorical KL to the exact posterior",
            "log p(x) − ELBO(q) = D_KL[q(c|x) ‖ p(c|x)] = Σ_c q(c|x) log (q(c|x) / p(c|x))",
            (log_px - elbo_of(log_q)).item(),
            kl_categorical(log_q, exact).item(),
            EXACT_TOL,
            "exact",
            "q: the exact posterior's logits moved by 0.8 N(0, 1) each; q = "
            + ", ".join(f"{v:.3f}" for v in log_q.exp()),
        ),
        _mc(
            "11c. The KL to the uniform prior is log K − H(q), at most log K",
            "E_q[log q(c|x) − log p(c)] = log K − H(q(c|x)) ≤ log K",
            kl_prior,
            log_q[c] + math.log(K),
            f"lhs in closed form ({kl_prior:.4f} ≤ log {K} = {math.log(K):.4f}); rhs: the mean over {samples} draws "
            "c ~ q. One-hot q reaches the ceiling, a uniform q costs nothing; N variables cost at most N log K",
        ),
    ], numbers


RD_BETAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
RD_NOISE_VAR = 0.3  # s^2: with eigenvalues 4, 2, 1, 0.5, ... no beta s^2 above ties with one
RD_TOL = 1e-5  # nats: L-BFGS on a smooth problem of a few dozen numbers


def _rate_distortion_steps(seed: int, latent_dim: int, data_dim: int) -> list[Step]:
    """10. beta chooses a point on the rate-distortion curve: on a linear VAE (p(x|z) = N(W z + m, s^2 I),
    q(z|x) = N(V (x - m), diag), data of covariance eigenvalues 4, 2, 1, 0.5, ...), the optimum of
    D + beta R in closed form (``linear_gaussian.beta_vae_optimum``) against numerical optimisation
    from random starts; a dimension collapses (rate 0) exactly when its eigenvalue is at most beta s^2."""
    g = torch.Generator().manual_seed(seed)
    lam = 4.0 * 0.5 ** torch.arange(data_dim, dtype=F64)
    Q, _ = torch.linalg.qr(torch.randn(data_dim, data_dim, generator=g, dtype=F64))
    cov = Q @ torch.diag(lam) @ Q.T
    steps, predicted, found = [], 0, 0
    for i, beta in enumerate(RD_BETAS):
        exact = beta_vae_optimum(cov, RD_NOISE_VAR, beta, latent_dim)
        fitted = _minimise_rate_distortion(cov, beta, latent_dim, g)
        collapsed = (exact.rate_per_dim < 1e-9).sum().item(), (fitted.rate_per_dim < 1e-4).sum().item()
        predicted, found = predicted + collapsed[0], found + collapsed[1]
        steps.append(
            Step(
                f"10{'abcdef'[i]}. β = {beta:g}: the optimum of D + βR",
                "R = Σ_i ½ log(λ_i / βs²) over the λ_i > βs²   (D + R = −ELBO; β sets the slope −β)",
                exact.rate,
                fitted.rate,
                RD_TOL,
                "optimisation",
                f"distortion D = {exact.distortion:.6f} closed form, {fitted.distortion:.6f} optimised; −ELBO = "
                f"D + R = {exact.distortion + exact.rate:.4f}; collapsed dimensions (λ_i ≤ βs² = "
                f"{beta * RD_NOISE_VAR:g}): {collapsed[0]} predicted, {collapsed[1]} found",
            )
        )
    steps.append(
        Step(
            "10g. The collapse of each dimension",
            "dimension i carries rate ⇔ λ_i > βs²",
            float(predicted),
            float(found),
            0.0,
            "optimisation",
            f"collapsed dimensions over β = {', '.join(f'{b:g}' for b in RD_BETAS)}, predicted against found "
            "(rate below 1e-4 nats after optimisation)",
        )
    )
    return steps


def _minimise_rate_distortion(cov: Tensor, beta: float, k: int, g: torch.Generator, restarts: int = 3):
    """min over (W, V, log_var) of D + beta R, by L-BFGS from ``restarts`` random starts (the best kept)."""
    d, best = cov.shape[0], None
    for _ in range(restarts):
        params = [
            (0.5 * torch.randn(d, k, generator=g, dtype=F64)).requires_grad_(),
            (0.5 * torch.randn(k, d, generator=g, dtype=F64)).requires_grad_(),
            torch.zeros(k, dtype=F64, requires_grad=True),
        ]
        opt = torch.optim.LBFGS(
            params,
            max_iter=500,
            history_size=50,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )

        def objective(opt=opt, params=params):
            opt.zero_grad()
            rate, distortion = linear_vae_terms(*params, cov, RD_NOISE_VAR)
            loss = distortion + beta * rate.sum()
            loss.backward()
            return loss

        for _ in range(20):
            opt.step(objective)
        fitted = linear_vae_rate_distortion(*(t.detach() for t in params), cov, RD_NOISE_VAR)
        if best is None or fitted.distortion + beta * fitted.rate < best.distortion + beta * best.rate:
            best = fitted
    return best


def format_text(result: Explanation) -> str:
    lines = [
        f"Linear-Gaussian model: z ~ N(0, I_{result.model.latent_dim}), "
        f"x|z ~ N(Wz + b, {result.model.noise_var} I_{result.model.data_dim}); one x drawn from it.",
        f"q(z|x) = N(μ, diag σ²) with μ = {_fmt(result.mu)}, σ² = {_fmt(result.log_var.exp())}",
        f"exact: log p(x) = {result.log_px:.6f}   ELBO = {result.elbo:.6f}   "
        f"D_KL[q‖p(z)] = {result.kl_q_prior:.6f}   D_KL[q‖p(z|x)] = {result.kl_q_posterior:.6f}",
        "",
    ]
    for s in result.steps:
        mark = "holds" if s.holds else "FAILS"
        lines.append(s.name)
        lines.append(f"    {s.formula}")
        tol = {"monte_carlo": f"4 s.e. = {s.tolerance:.2e}", "estimator": f"4 s.e. + bias = {s.tolerance:.2e}"}.get(
            s.method, f"tol {s.tolerance:.0e}"
        )
        lines.append(f"    lhs = {s.lhs:.9f}   rhs = {s.rhs:.9f}   |diff| = {s.abs_diff:.2e}   ({tol})  {mark}")
        if s.note:
            lines.append(f"    {s.note}")
        lines.append("")
    lines.append("    μ     σ    μ²/2   (σ²−1−log σ²)/2   KL")
    for row in result.intuition:
        lines.append(
            f"  {row['mu']:4.1f}  {row['sigma']:4.1f}  {row['mean_term']:6.3f}  {row['width_term']:15.3f}   "
            f"{row['kl']:6.3f}"
        )
    return "\n".join(lines)


def _fmt(t: Tensor) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in t.tolist()) + "]"
