r"""Kullback-Leibler divergences: closed forms, and a Monte Carlo witness.

    KL(q || p) = E_q[log q(z) - log p(z)] = H(q, p) - H(q)        (cross-entropy minus entropy)

Every function is a pure tensor function, batched over leading dimensions and
differentiable. Diagonal Gaussians are parametrised by ``(mu, log_var)``, never by
sigma, so that ``log_var`` in [-30, 30] stays finite in float32 and float64.
Each closed form is checked in ``tests/test_kl.py`` against ``torch.distributions``
and against :func:`kl_monte_carlo`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal
from torch.nn.functional import softplus

from vaelab.distributions import Categoricals, Quantised

LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------
# Diagonal Gaussians (per dimension: the result has the shape of mu; .sum(-1) is the total)
# --------------------------------------------------------------------------------------
def kl_normal_std_normal(mu: Tensor, log_var: Tensor) -> Tensor:
    r"""KL(N(mu, diag exp(log_var)) || N(0, I)) per dimension.

    .. math:: \tfrac12 (\mu^2 + \sigma^2 - 1 - \log\sigma^2)

    ``mu**2 / 2`` is the price of moving the mean away from the prior; the rest,
    ``(sigma**2 - 1 - log sigma**2) / 2``, the price of a width other than 1. The
    width term is written ``expm1(log_var) - log_var`` so it keeps its precision
    when q is close to the prior (sigma near 1), where ``exp(x) - 1`` would cancel.
    """
    mean_term = 0.5 * mu.square()
    width_term = 0.5 * (torch.expm1(log_var) - log_var)
    return mean_term + width_term


def kl_normal_normal(mu_q: Tensor, log_var_q: Tensor, mu_p: Tensor, log_var_p: Tensor) -> Tensor:
    r"""KL(N(mu_q, diag exp(log_var_q)) || N(mu_p, diag exp(log_var_p))) per dimension.

    .. math:: \tfrac12 \Big(\frac{\sigma_q^2}{\sigma_p^2} - 1 - \log\frac{\sigma_q^2}{\sigma_p^2}
              + \frac{(\mu_q - \mu_p)^2}{\sigma_p^2}\Big)
    """
    log_ratio = log_var_q - log_var_p  # log(sigma_q^2 / sigma_p^2)
    t1 = torch.expm1(log_ratio) - log_ratio  # ratio - 1 - log ratio, >= 0
    t2 = (mu_q - mu_p).square() * torch.exp(-log_var_p)
    return 0.5 * (t1 + t2)


def normal_entropy(log_var: Tensor) -> Tensor:
    r"""Entropy H(q) = -E_q[log q] of N(mu, exp(log_var)) per dimension: 1/2 (log 2 pi e + log_var)."""
    return 0.5 * (LOG_2PI + 1.0 + log_var)


def normal_cross_entropy(mu_q: Tensor, log_var_q: Tensor, mu_p: Tensor, log_var_p: Tensor) -> Tensor:
    r"""Cross-entropy H(q, p) = -E_q[log p] of two Gaussians per dimension.

    .. math:: \tfrac12 \Big(\log 2\pi + \log\sigma_p^2 + \frac{\sigma_q^2 + (\mu_q - \mu_p)^2}{\sigma_p^2}\Big)
    """
    t1 = LOG_2PI + log_var_p
    t2 = (torch.exp(log_var_q) + (mu_q - mu_p).square()) * torch.exp(-log_var_p)
    return 0.5 * (t1 + t2)


def kl_normal_normal_via_entropies(mu_q: Tensor, log_var_q: Tensor, mu_p: Tensor, log_var_p: Tensor) -> Tensor:
    """KL = H(q, p) - H(q), per dimension: the definition as code (less precise than
    :func:`kl_normal_normal` when q is close to p, where the two large terms cancel)."""
    return normal_cross_entropy(mu_q, log_var_q, mu_p, log_var_p) - normal_entropy(log_var_q)


# --------------------------------------------------------------------------------------
# Full-covariance Gaussians
# --------------------------------------------------------------------------------------
def kl_mvn(mu_q: Tensor, cov_q: Tensor, mu_p: Tensor, cov_p: Tensor) -> Tensor:
    r"""KL(N(mu_q, cov_q) || N(mu_p, cov_p)) for full covariances (last two dims the matrix).

    .. math:: \tfrac12 \big[\operatorname{tr}(\Sigma_p^{-1}\Sigma_q)
              + (\mu_p - \mu_q)^\top \Sigma_p^{-1} (\mu_p - \mu_q) - k
              + \log\det\Sigma_p - \log\det\Sigma_q\big]

    Computed through Cholesky factors ``cov = L L^T`` and triangular solves, never an
    explicit inverse: ``tr(S_p^-1 S_q) = ||L_p^-1 L_q||_F^2`` and the Mahalanobis term
    is ``||L_p^-1 (mu_p - mu_q)||^2``.
    """
    k = mu_q.shape[-1]
    L_q = _cholesky(cov_q, "cov_q")
    L_p = _cholesky(cov_p, "cov_p")
    L_q, L_p = torch.broadcast_tensors(L_q, L_p)
    diff = (mu_p - mu_q).unsqueeze(-1)  # (..., k, 1)
    diff, _ = torch.broadcast_tensors(diff, L_p[..., :1])
    t1 = torch.linalg.solve_triangular(L_p, L_q, upper=False).square().sum((-2, -1))
    t2 = torch.linalg.solve_triangular(L_p, diff, upper=False).square().sum((-2, -1))
    log_det_p = 2.0 * torch.diagonal(L_p, dim1=-2, dim2=-1).log().sum(-1)
    log_det_q = 2.0 * torch.diagonal(L_q, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (t1 + t2 - k + log_det_p - log_det_q)


def kl_full_normal_diag_normal(mu_q: Tensor, scale_tril_q: Tensor, mu_p: Tensor, log_var_p: Tensor) -> Tensor:
    r"""KL(N(mu_q, L L^T) || N(mu_p, diag exp(log_var_p))), q with a full covariance given by its
    Cholesky factor L (lower-triangular, positive diagonal). For p = N(0, I) this is Doersch's eq. 7
    (Kingma & Welling App. B), :math:`\tfrac12(\operatorname{tr}\Sigma + \mu^\top\mu - k - \log\det\Sigma)`;
    with a diagonal p = diag(s^2):

    .. math:: \tfrac12 \big[\textstyle\sum_{ij} L_{ij}^2 / s_i^2 + \sum_i (\mu_{p,i} - \mu_{q,i})^2 / s_i^2
              - k + \sum_i \log s_i^2 - 2 \sum_i \log L_{ii}\big]

    (tr(S^-1 Sigma) = sum_i Sigma_ii / s_i^2 and Sigma_ii = sum_j L_ij^2; log det Sigma = 2 sum_i log L_ii).
    """
    k = mu_q.shape[-1]
    var_p = torch.exp(log_var_p)
    t1 = (scale_tril_q.square() / var_p.unsqueeze(-1)).sum((-2, -1))  # tr(S_p^-1 Sigma_q)
    t2 = ((mu_p - mu_q).square() / var_p).sum(-1)  # the Mahalanobis term
    log_det_q = 2.0 * torch.diagonal(scale_tril_q, dim1=-2, dim2=-1).log().sum(-1)
    return 0.5 * (t1 + t2 - k + log_var_p.sum(-1) - log_det_q)


def correlation_kl(scale_tril: Tensor) -> Tensor:
    r"""What a full covariance's correlations add to the KL beyond its marginals:

    .. math:: \tfrac12 \big(\textstyle\sum_j \log\Sigma_{jj} - \log\det\Sigma\big)
              = \mathrm{KL}(N(\mu, \Sigma) \,\|\, N(\mu, \operatorname{diag}\Sigma)) \ge 0

    so KL(N(mu, Sigma) || N(0, I)) = sum_j KL(N(mu_j, Sigma_jj) || N(0, 1)) + this (Hadamard's
    inequality makes it non-negative; it is 0 exactly when Sigma is diagonal).
    """
    var = scale_tril.square().sum(-1)  # Sigma_jj = sum_k L_jk^2
    return 0.5 * (var.log().sum(-1) - 2.0 * torch.diagonal(scale_tril, dim1=-2, dim2=-1).log().sum(-1))


def _cholesky(cov: Tensor, name: str) -> Tensor:
    L, info = torch.linalg.cholesky_ex(cov)
    if bool((info != 0).any()):
        raise ValueError(
            f"{name} is not positive definite (Cholesky failed); pass a symmetric positive-definite matrix"
        )
    return L


# --------------------------------------------------------------------------------------
# Discrete distributions
# --------------------------------------------------------------------------------------
def kl_bernoulli(logits_q: Tensor, logits_p: Tensor) -> Tensor:
    r"""KL(Bern(sigmoid(logits_q)) || Bern(sigmoid(logits_p))) per element.

    .. math:: \pi_q (\log\pi_q - \log\pi_p) + (1 - \pi_q)(\log(1-\pi_q) - \log(1-\pi_p))

    in logit space: ``log sigmoid(l) = -softplus(-l)``, ``log(1 - sigmoid(l)) = -softplus(l)``.
    """
    pi_q = torch.sigmoid(logits_q)
    t1 = pi_q * (softplus(-logits_p) - softplus(-logits_q))
    t2 = (1.0 - pi_q) * (softplus(logits_p) - softplus(logits_q))
    return t1 + t2


def kl_categorical(logits_q: Tensor, logits_p: Tensor) -> Tensor:
    r"""KL(Cat(softmax(logits_q)) || Cat(softmax(logits_p))) per distribution (sums the last dim).

    Against the uniform distribution over K categories (equal logits) it is
    :math:`\log K - H(q)`: at most log K, reached by a one-hot q, and 0 for a uniform q."""
    log_q = torch.log_softmax(logits_q, dim=-1)
    log_p = torch.log_softmax(logits_p, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


# --------------------------------------------------------------------------------------
# Monte Carlo, and the dispatch used by the objectives
# --------------------------------------------------------------------------------------
def kl_monte_carlo(
    q: Distribution, p: Distribution, n_samples: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    r"""Monte Carlo estimate of KL(q || p) = E_q[log q(z) - log p(z)] over q's batch shape.

    Returns ``(estimate, std_error)``, with ``std_error = std / sqrt(n_samples)`` of the
    per-sample log-ratio. Samples are reparametrised when q allows it, so the estimate is
    differentiable. With a ``generator``, the draws are a pure function of its state
    (the global RNG is forked, seeded from it, and restored).
    """
    if n_samples < 2:
        raise ValueError("kl_monte_carlo needs n_samples >= 2 to report a standard error")
    log_ratio = log_ratio_samples(q, p, n_samples, generator)  # (n_samples, *batch)
    estimate = log_ratio.mean(0)
    std_error = log_ratio.std(0) / math.sqrt(n_samples)
    return estimate, std_error


def log_ratio_samples(
    q: Distribution, p: Distribution, n_samples: int, generator: torch.Generator | None = None
) -> Tensor:
    """log q(z) - log p(z) at ``n_samples`` draws z ~ q, (n_samples, *batch): the terms whose mean is
    the Monte Carlo KL (reparametrised when q allows it; with ``generator``, a pure function of it)."""
    with rng_from(generator):
        z = q.rsample((n_samples,)) if q.has_rsample else q.sample((n_samples,))
    return q.log_prob(z) - p.log_prob(z)


class rng_from:
    """Context manager: draw from the global RNG (the CPU's, and the GPU's where one is in use) seeded by
    ``generator`` (no-op for None); on leaving, both are as they were."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self._fork = None

    def __enter__(self):
        if self.generator is None:
            return None
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
        # torch.manual_seed below seeds the GPU's generator too: fork it as well, so that draws on the GPU
        # after this block are the caller's, whichever generator seeded the block
        devices = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []
        self._fork = torch.random.fork_rng(devices=devices)
        self._fork.__enter__()
        torch.manual_seed(seed)
        return None

    def __exit__(self, *exc):
        if self._fork is not None:
            self._fork.__exit__(*exc)
        return False


@dataclass(frozen=True)
class KLResult:
    """A KL value per example, and how it was obtained.

    ``per_dim`` is present when both distributions factorise over latent dimensions;
    ``std_error`` when ``value`` is a Monte Carlo mean over several samples.
    """

    value: Tensor  # (B,)
    method: str  # "analytic" or "monte_carlo"
    per_dim: Tensor | None = None  # (B, D)
    std_error: Tensor | None = None  # (B,)
    per_layer: dict[str, Tensor] | None = None  # (B,) each, by layer name, top first; one entry for one layer

    @property
    def layered(self) -> bool:
        """Several latent layers, each with its part of the KL."""
        return self.per_layer is not None and len(self.per_layer) > 1

    def __getitem__(self, index) -> KLResult:
        """The same record for the examples ``index`` selects (an int keeps a batch of one)."""
        index = slice(index, index + 1) if isinstance(index, int) else index

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[index]

        layers = None if self.per_layer is None else {k: v[index] for k, v in self.per_layer.items()}
        return KLResult(self.value[index], self.method, pick(self.per_dim), pick(self.std_error), layers)


def diag_normal_params(d: Distribution) -> tuple[Tensor, Tensor] | None:
    """``(mu, log_var)`` when ``d`` is ``Independent(Normal, 1)``, else None."""
    if isinstance(d, Independent) and isinstance(d.base_dist, Normal) and d.reinterpreted_batch_ndims == 1:
        return d.base_dist.loc, 2.0 * d.base_dist.scale.log()
    return None


def kl_closed_form(q: Distribution, p: Distribution) -> KLResult | None:
    """KL(q || p) per example in closed form, or None when the pair has none.

    - Both diagonal Gaussians: :func:`kl_normal_normal` per dimension.
    - q with a full covariance, p a diagonal Gaussian: :func:`kl_full_normal_diag_normal` (eq. 7).
    - Both products of categoricals (``distributions.Categoricals``): :func:`kl_categorical` per variable.
    - VQ-VAE's point mass (``distributions.Quantised``) against the uniform prior: log K per position.
    - Otherwise a pair registered in ``torch.distributions.kl_divergence``: the total.
    """
    if isinstance(q, Quantised) and isinstance(p, Categoricals):  # one-hot q, uniform p: log K per position
        per_dim = torch.full(q.index.shape, math.log(q.categories), dtype=q.z_e.dtype, device=q.z_e.device)
        return KLResult(per_dim.sum(-1), "analytic", per_dim=per_dim)
    if isinstance(q, Categoricals) and isinstance(p, Categoricals):  # per variable: log K - H(q_j) for a uniform p
        per_dim = kl_categorical(q.logits, p.logits.expand_as(q.logits))
        return KLResult(per_dim.sum(-1), "analytic", per_dim=per_dim)
    q_params, p_params = diag_normal_params(q), diag_normal_params(p)
    if q_params is not None and p_params is not None:
        per_dim = kl_normal_normal(*q_params, *torch.broadcast_tensors(*p_params))
        return KLResult(per_dim.sum(-1), "analytic", per_dim=per_dim)
    if isinstance(q, MultivariateNormal) and p_params is not None:  # full covariance against a diagonal p
        mu_p, log_var_p = (t.expand_as(q.loc) for t in p_params)
        return KLResult(kl_full_normal_diag_normal(q.loc, q.scale_tril, mu_p, log_var_p), "analytic")
    try:
        return KLResult(torch.distributions.kl_divergence(q, p), "analytic")
    except NotImplementedError:
        return None


def kl_sampled(q: Distribution, p: Distribution, z: Tensor) -> KLResult:
    """The single-sample estimate log q(z) - log p(z) at ``z``, per dimension too where both are
    diagonal Gaussians: for a pair whose closed form would be biased because p was chosen after z
    was drawn (bottom-up inference: p(z1|z2) at z2 ~ q(z2|z1), ``models.hierarchical``)."""
    per_dim = None
    if _diagonal(q) and _diagonal(p):
        per_dim = q.base_dist.log_prob(z) - p.base_dist.log_prob(z)
        return KLResult(per_dim.sum(-1), "monte_carlo", per_dim)
    return KLResult(q.log_prob(z) - p.log_prob(z), "monte_carlo")


def _diagonal(d: Distribution) -> bool:
    return isinstance(d, Independent) and isinstance(d.base_dist, Normal) and d.reinterpreted_batch_ndims == 1


def kl_q_p(q: Distribution, p: Distribution, z: Tensor | None = None) -> KLResult:
    """KL(q || p) per example, analytic where a closed form exists (:func:`kl_closed_form`), else Monte Carlo.

    Without a closed form (mixture and VampPrior priors): the single-sample estimate
    ``log q(z) - log p(z)`` at the reparametrised sample ``z`` that the reconstruction
    term uses. It is unbiased for KL, so its batch mean is an unbiased estimate of the
    mean KL and valid inside a stochastic-gradient ELBO; it is not a closed form, and the
    result says so.
    """
    closed = kl_closed_form(q, p)
    if closed is not None:
        return closed
    if z is None:
        z = q.rsample()
    return KLResult(q.log_prob(z) - p.log_prob(z), "monte_carlo")


@torch.distributions.kl.register_kl(Categoricals, Categoricals)
def _kl_categoricals(q: Categoricals, p: Categoricals) -> Tensor:
    return kl_categorical(q.logits, p.logits.expand_as(q.logits)).sum(-1)
