"""Builders that return ``torch.distributions`` objects: posteriors, likelihoods, priors.

Models return distributions; the ELBO is then written once with ``log_prob`` and
``kl_divergence``, whatever the likelihood or prior (see ``objectives.py``).

Posterior parametrisation: q(z|x) = N(mu, diag exp(log_var)) with ``log_var`` clamped
to [LOG_VAR_MIN, LOG_VAR_MAX] = [-12, 8] (sigma from 0.0025 to 55): exp() cannot
overflow and the KL's ``log sigma^2`` term cannot reach -inf, whatever the encoder
outputs. Outside the range the gradient through the clamp is zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import (
    Bernoulli,
    Categorical,
    ContinuousBernoulli,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    constraints,
)
from torch.nn import functional as nn_functional

LOG_VAR_MIN = -12.0
LOG_VAR_MAX = 8.0


def at_least_float32(t: Tensor) -> Tensor:
    """``t`` in float32 where autocast left it in bfloat16 (or float16); float32 and float64 as they are.
    The float32 boundary: every builder of a posterior, a likelihood or a categorical takes a network's
    output through it, so the densities, the KL and the sums are never computed in bf16, whatever the
    model family (a new one gets this without knowing about it)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def diag_normal(mu: Tensor, log_var: Tensor, clamp: bool = False) -> Independent:
    """N(mu, diag exp(log_var)) with the last dimension as the event dimension."""
    if clamp:
        log_var = log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX)
    return Independent(Normal(mu, torch.exp(0.5 * log_var), validate_args=False), 1, validate_args=False)


def diagonal_posterior(h: Tensor, latent_dim: int | None = None) -> Independent:
    """q(z|x) = N(mu, diag exp(log_var)) from the encoder's output h = (mu, log_var), (B, 2 D);
    log_var clamped (module docstring). The ``diagonal`` entry of ``parts.POSTERIORS``."""
    mu, log_var = at_least_float32(h).chunk(2, dim=-1)
    return diag_normal(mu, log_var, clamp=True)


def full_posterior(h: Tensor, latent_dim: int | None = None) -> MultivariateNormal:
    """q(z|x) = N(mu, L L^T) from the encoder's output h (B, D + D (D + 1) / 2): mu, then the
    lower triangle of L row by row; L's diagonal is exp(log_var / 2) with log_var clamped as for
    the diagonal posterior, so a zero off-diagonal gives back exactly the diagonal family.
    The ``full`` entry of ``parts.POSTERIORS``."""
    h = at_least_float32(h)
    B, width = h.shape
    D = int((math.isqrt(9 + 8 * width) - 3) // 2)  # width = D + D (D + 1) / 2
    mu, flat = h[:, :D], h[:, D:]
    rows, cols = torch.tril_indices(D, D, device=h.device)
    L = torch.zeros(B, D * D, dtype=h.dtype, device=h.device).index_copy(1, rows * D + cols, flat).view(B, D, D)
    log_var = torch.diagonal(L, dim1=-2, dim2=-1).clamp(LOG_VAR_MIN, LOG_VAR_MAX)
    L = L.tril(-1) + torch.diag_embed(torch.exp(0.5 * log_var))
    return MultivariateNormal(mu, scale_tril=L, validate_args=False)


def lowrank_posterior(h: Tensor, latent_dim: int) -> MultivariateNormal:
    """q(z|x) = N(mu, diag exp(log_var) + W W^T), W (D, R), from the encoder's output h (B, D (2 + R)):
    mu, log_var (clamped as for the diagonal family), then W row by row. Returned through the
    Cholesky factor of its covariance, so it reparametrises and has the closed-form KL of a full
    covariance. The ``lowrank`` entry of ``parts.POSTERIORS``."""
    h = at_least_float32(h)
    B, width = h.shape
    D = latent_dim
    R = width // D - 2
    mu, log_var, W = h[:, :D], h[:, D : 2 * D].clamp(LOG_VAR_MIN, LOG_VAR_MAX), h[:, 2 * D :].view(B, D, R)
    cov = torch.diag_embed(torch.exp(log_var)) + W @ W.transpose(-1, -2)
    return MultivariateNormal(mu, scale_tril=torch.linalg.cholesky(cov), validate_args=False)


class Categoricals(Distribution):
    r"""N independent categorical variables of K categories each, q(z) = prod_j Cat(z_j | softmax(l_j)),
    with z written as one flattened one-hot vector (..., N K): variable j is the block j K .. j K + K - 1.
    ``logits`` (..., N, K); ``log_prob`` of a one-hot z is sum_j log q(z_j), the mean is the
    probabilities, flattened. Zero logits are the uniform prior (``models.categorical.UniformPrior``).

    ``relaxation`` (temperature tau, straight_through): draws are the Gumbel-softmax relaxation
    (Jang, Gu & Poole 2017; Maddison, Mnih & Teh 2017), softmax((l + g) / tau) with g Gumbel noise,
    differentiable in l; straight-through, the one-hot of the same draw in the forward pass with the
    relaxed gradient. None: the discrete z, the one-hot argmax_k (l_k + g_k) (the Gumbel-max trick),
    what the model is evaluated as. The relaxed vector's ``log_prob`` is not a density: the ELBO of a
    categorical model uses the closed-form KL (``kl.kl_closed_form``), never log q(z) of a relaxed z.
    """

    arg_constraints = {"logits": constraints.real}
    has_enumerate_support = False

    def __init__(self, logits: Tensor, relaxation: tuple[float, bool] | None = None):
        self.logits = logits = at_least_float32(logits)
        self.relaxation = relaxation
        self.variables, self.categories = logits.shape[-2:]
        super().__init__(logits.shape[:-2], torch.Size([self.variables * self.categories]), validate_args=False)

    @property
    def has_rsample(self) -> bool:
        return self.relaxation is not None

    @property
    def log_probs(self) -> Tensor:
        """log q(z_j = k), (..., N, K)."""
        return torch.log_softmax(self.logits, -1)

    @property
    def probs(self) -> Tensor:
        return torch.softmax(self.logits, -1)

    @property
    def mean(self) -> Tensor:
        return self.probs.flatten(-2)

    @property
    def variance(self) -> Tensor:
        p = self.probs.flatten(-2)
        return p * (1 - p)

    @property
    def mode(self) -> Tensor:
        """The one-hot of each variable's most probable category, flattened."""
        return nn_functional.one_hot(self.logits.argmax(-1), self.categories).to(self.logits.dtype).flatten(-2)

    def entropy(self) -> Tensor:
        log_p = self.log_probs
        return -(log_p.exp() * log_p).sum((-2, -1))

    def log_prob(self, z: Tensor) -> Tensor:
        """log q(z) = sum_j log q(z_j) of a one-hot z (..., N K), broadcast against the batch."""
        return (z.unflatten(-1, (self.variables, self.categories)) * self.log_probs).sum((-2, -1))

    def from_normal(self, eps: Tensor) -> Tensor:
        """The draw for standard-normal noise ``eps`` (..., N K): Gumbel noise g = -log(-log Phi(eps)),
        Phi(eps) uniform on (0, 1) (``contract.Noise`` supplies eps), then relaxed or discrete."""
        gumbel = -torch.log(-torch.special.log_ndtr(eps.unflatten(-1, (self.variables, self.categories))))
        scores = self.logits + gumbel
        hard = nn_functional.one_hot(scores.argmax(-1), self.categories).to(scores.dtype)
        if self.relaxation is None:
            return hard.flatten(-2)
        temperature, straight_through = self.relaxation
        soft = torch.softmax(scores / temperature, -1)
        return (hard + soft - soft.detach() if straight_through else soft).flatten(-2)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        eps = torch.randn(self._extended_shape(sample_shape), dtype=self.logits.dtype, device=self.logits.device)
        return self.from_normal(eps)

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)


class Quantised(Distribution):
    r"""VQ-VAE's q(z|x) (``models.vq``): a point mass on z_q, each of the N positions of the encoder's output
    z_e (..., N, D) replaced by its nearest codebook vector; z flattened to (..., N D). Draws are z_q with the
    straight-through gradient, z_e + sg(z_q - z_e); ``log_prob`` of its own z is 0. Against the uniform
    prior over the K codes its KL is N log K (``kl.kl_closed_form``). ``auxiliary_loss``: the commitment
    term ``commitment`` ||z_e - sg(z_q)||^2 per example, a loss that is not part of the ELBO."""

    arg_constraints = {}
    has_rsample = True

    def __init__(self, z_e: Tensor, index: Tensor, codebook: Tensor, commitment: float = 0.25):
        self.z_e, self.index, self.codebook = z_e, index, codebook
        self.variables, self.categories = index.shape[-1], codebook.shape[0]
        z_q = codebook[index]
        self.z_q = z_e + (z_q - z_e).detach()
        self.auxiliary_loss = commitment * (z_e - z_q.detach()).square().sum((-2, -1))
        super().__init__(index.shape[:-1], torch.Size([z_e.shape[-2] * z_e.shape[-1]]), validate_args=False)

    @property
    def probs(self) -> Tensor:
        """q(z_j = k|x): one-hot, (..., N, K)."""
        return nn_functional.one_hot(self.index, self.categories).to(self.z_e.dtype)

    @property
    def mean(self) -> Tensor:
        return self.z_q.flatten(-2)

    mode = mean

    @property
    def variance(self) -> Tensor:
        return torch.zeros_like(self.mean)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        return self.mean.expand(*sample_shape, *self.mean.shape)

    def log_prob(self, z: Tensor) -> Tensor:
        return torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)


def marginals(q: Distribution, samples: int = 256) -> tuple[Tensor, Tensor]:
    """(mean, variance) of each q(z_j|x), (B, D): for a diagonal Gaussian its parameters, for a full
    covariance the diagonal of Sigma; for a flow, which has no closed-form moments, the moments of
    ``samples`` draws (from the global RNG)."""
    if isinstance(q, MultivariateNormal):
        return q.loc, q.scale_tril.square().sum(-1)
    if isinstance(q, TransformedDistribution):
        z = q.sample((samples,))
        return z.mean(0), z.var(0)
    return q.mean, q.variance


def scale_tril(q: Distribution) -> Tensor:
    """The Cholesky factor L (B, D, D) of a Gaussian q = N(mu, L L^T): a full covariance's own, or diag(sigma)
    for a diagonal Gaussian."""
    if isinstance(q, MultivariateNormal):
        return q.scale_tril
    return torch.diag_embed(q.stddev)


def base_loc(q: Distribution) -> Tensor:
    """The location parameter of ``q``'s base Gaussian (through Independent and transforms); a
    categorical's logits."""
    while isinstance(q, (Independent, TransformedDistribution)):
        q = q.base_dist
    return q.logits if isinstance(q, Categoricals) else q.z_e if isinstance(q, Quantised) else q.loc


def reparametrize(q: Distribution, eps: Tensor) -> Tensor:
    """z = the reparametrised sample of ``q`` for standard-normal noise ``eps`` of its event shape:
    mu + sigma eps (diagonal Gaussian), mu + L eps (full covariance, L the Cholesky factor), and
    through the transforms of a flow; a categorical's Gumbel-softmax draw (``Categoricals.from_normal``).
    This is what lets the noise come from outside (``Noise``)."""
    if isinstance(q, Categoricals):
        return q.from_normal(eps)
    if isinstance(q, Quantised):  # a point mass: no noise moves it
        return q.rsample(eps.shape[:-2])
    if isinstance(q, Independent):
        return reparametrize(q.base_dist, eps)
    if isinstance(q, Normal):
        return q.loc + q.scale * eps
    if isinstance(q, MultivariateNormal):
        return q.loc + (q.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
    if isinstance(q, TransformedDistribution):
        z = reparametrize(q.base_dist, eps)
        for transform in q.transforms:
            z = transform(z)
        return z
    raise TypeError(f"no reparametrisation from standard-normal noise for {type(q).__name__}")


def standard_normal(latent_dim: int, device=None, dtype=None, batch: tuple[int, ...] = ()) -> Independent:
    """N(0, I) over ``latent_dim`` dimensions with batch shape ``batch``: the prior p(z), and the noise a
    lower layer reparametrises (``draw(standard_normal(D, batch=(B,)))``). vaelab's one builder of it."""
    zeros = torch.zeros(*batch, latent_dim, device=device, dtype=dtype)
    return diag_normal(zeros, zeros)


def standard_normal_like(t: Tensor) -> Independent:
    """:func:`standard_normal` with the shape (batch..., D), device and dtype of ``t``."""
    return standard_normal(t.shape[-1], t.device, t.dtype, tuple(t.shape[:-1]))


def gaussian_mixture(logits: Tensor, mu: Tensor, log_var: Tensor) -> MixtureSameFamily:
    """sum_k softmax(logits)_k N(mu_k, diag exp(log_var_k)); ``mu`` and ``log_var`` are (K, D)."""
    mixing = Categorical(logits=logits, validate_args=False)
    return MixtureSameFamily(mixing, diag_normal(mu, log_var), validate_args=False)


# -- likelihoods p(x|z): event dimensions are every dimension after the batch ---------
def bernoulli(logits: Tensor, event_dims: int) -> Independent:
    return Independent(Bernoulli(logits=logits, validate_args=False), event_dims, validate_args=False)


def continuous_bernoulli(logits: Tensor, event_dims: int) -> Independent:
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on [0, 1]."""
    base = ContinuousBernoulli(logits=logits, validate_args=False)
    return Independent(base, event_dims, validate_args=False)


def gaussian(mean: Tensor, log_var: Tensor, event_dims: int) -> Independent:
    log_var = log_var.clamp(LOG_VAR_MIN, LOG_VAR_MAX).expand_as(mean)
    return Independent(Normal(mean, torch.exp(0.5 * log_var), validate_args=False), event_dims, validate_args=False)


def discretized_logistic(loc: Tensor, log_scale: Tensor, event_dims: int, bins: int = 256) -> Independent:
    return Independent(DiscretizedLogistic(loc, log_scale, bins), event_dims, validate_args=False)


class DiscretizedLogistic(Distribution):
    r"""Logistic distribution discretised to ``bins`` levels on [0, 1] (Salimans et al. 2017).

    For a pixel value x = i / (bins - 1):
    P(x) = sigmoid((x + h - loc) / s) - sigmoid((x - h - loc) / s) with h = 1 / (2 (bins - 1)),
    the lowest bin extended to -inf and the highest to +inf, so the probabilities sum to 1.
    """

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = constraints.unit_interval
    has_rsample = False

    def __init__(self, loc: Tensor, log_scale: Tensor, bins: int = 256):
        self.loc, self.log_scale = torch.broadcast_tensors(loc, log_scale.clamp(min=-7.0))
        self.bins = bins
        super().__init__(self.loc.shape, validate_args=False)

    @property
    def mean(self) -> Tensor:
        return self.loc.clamp(0.0, 1.0)

    def log_prob(self, x: Tensor) -> Tensor:
        half_bin = 0.5 / (self.bins - 1)
        inv_s = torch.exp(-self.log_scale)
        centred = x - self.loc
        upper = inv_s * (centred + half_bin)
        lower = inv_s * (centred - half_bin)
        # log(sigmoid(upper) - sigmoid(lower)), in a stable form for the interior bins
        log_cdf_upper = torch.nn.functional.logsigmoid(upper)
        log_one_minus_cdf_lower = torch.nn.functional.logsigmoid(-lower)
        delta = torch.sigmoid(upper) - torch.sigmoid(lower)
        # when the bin is far in a tail, delta underflows: use the density times the bin width
        mid = inv_s * centred
        log_pdf_mid = mid - self.log_scale - 2.0 * torch.nn.functional.softplus(mid)
        log_interior = torch.where(
            delta > 1e-5, torch.log(delta.clamp(min=1e-12)), log_pdf_mid + math.log(2 * half_bin)
        )
        eps = 0.25 / (self.bins - 1)
        return torch.where(x < eps, log_cdf_upper, torch.where(x > 1.0 - eps, log_one_minus_cdf_lower, log_interior))

    def sample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, device=self.loc.device, dtype=self.loc.dtype).clamp(1e-5, 1 - 1e-5)
            x = self.loc + torch.exp(self.log_scale) * (torch.log(u) - torch.log1p(-u))
            return torch.round(x.clamp(0.0, 1.0) * (self.bins - 1)) / (self.bins - 1)
