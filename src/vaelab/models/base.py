"""The VAE: an encoder, a decoder, a likelihood and a prior, each returning a distribution.

    encode(x) -> q(z|x) = N(mu, diag exp(log_var))        Independent(Normal, 1)
    decode(z) -> p(x|z)                                    Independent(<likelihood>, 3)
    prior()   -> p(z)                                      N(0, I), a mixture, or a VampPrior

The encoder is any ``nn.Module`` mapping x (B, C, H, W) to (B, 2 D) (mu, then log_var);
the decoder any ``nn.Module`` mapping z (B, D) to (B, P C, H, W), P the number of
parameters per pixel the likelihood needs. ``log_var`` is clamped to
[LOG_VAR_MIN, LOG_VAR_MAX] (see ``distributions.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from vaelab import distributions as dist
from vaelab import parts
from vaelab.contract import Draw, LatentLayer


# -- likelihoods p(x|z) ------------------------------------------------------------------------
class PixelLikelihood(nn.Module):
    """Turns the decoder's output (B, P C, H, W) into p(x|z); P and the likelihood's other facts
    are its entry in ``parts.LIKELIHOODS``. Built as ``cls(x_shape)``."""

    def __init__(self, x_shape=None):
        super().__init__()

    def __call__(self, out: Tensor) -> Distribution:
        """p(x|z) from the decoder's output, taken through the float32 boundary first
        (``distributions.at_least_float32``): under bf16 autocast the likelihood is float32 too."""
        return super().__call__(dist.at_least_float32(out))

    def forward(self, out: Tensor) -> Distribution:
        raise NotImplementedError

    def pmf(self, out: Tensor, at: Tensor | None = None) -> Tensor:
        """The probability of every pixel value, (B, pixels, levels) in float64, for a discrete
        likelihood (``parts.Likelihood.discrete``): what an entropy coder needs (``vaelab compress``).
        Level i is the pixel value i / (levels - 1). With ``at`` (B or 1, pixels) of levels, only those
        values' probabilities, (B, pixels), the same numbers. A density has none."""
        raise NotImplementedError(f"{type(self).__name__} is a density: it gives no probability to a pixel value")

    def log_prob_samples(self, out: Tensor, x: Tensor) -> Tensor:
        """log p(x | z_i) for decoder outputs ``out`` (B, n, P C, H, W) of n samples per example
        against ``x`` (B, C, H, W); shape (B, n)."""
        B, n = out.shape[:2]
        x_rep = x.unsqueeze(1).expand(B, n, *x.shape[1:]).reshape(B * n, *x.shape[1:])
        return self(out.flatten(0, 1)).log_prob(x_rep).view(B, n)


class BernoulliLikelihood(PixelLikelihood):
    def forward(self, out):
        return dist.bernoulli(out, 3)

    def log_prob_samples(self, out: Tensor, x: Tensor) -> Tensor:
        r"""log Bern(x | sigmoid(l)) = sum_i [x_i l_i - softplus(l_i)]: the first sum is a matrix
        product of x with the logits of all n samples, so x is never copied n times and the
        only elementwise pass over the (n, B, pixels) logits is the softplus."""
        logits = dist.at_least_float32(out).flatten(2)  # (B, n, P), contiguous: bmm needs no copy
        x_dot_l = torch.bmm(logits, x.flatten(1).unsqueeze(-1)).squeeze(-1)  # (B, n)
        # sums of hundreds of terms accumulate in float64, so the result does not depend on their order
        log_p = x_dot_l.double() - torch.nn.functional.softplus(logits).sum(-1, dtype=torch.float64)
        return log_p.to(logits.dtype)

    def pmf(self, out: Tensor, at: Tensor | None = None) -> Tensor:
        logits = out.flatten(1).double()
        table = torch.stack([torch.sigmoid(-logits), torch.sigmoid(logits)], -1)  # P(0) without 1 - P(1)'s rounding
        return table if at is None else table.gather(-1, at.expand(len(table), -1).unsqueeze(-1)).squeeze(-1)


class ContinuousBernoulliLikelihood(PixelLikelihood):
    def forward(self, out):
        return dist.continuous_bernoulli(out, 3)


class GaussianLikelihood(PixelLikelihood):
    """N(mean, sigma^2) per pixel with a learned per-pixel log-variance shared across examples."""

    def __init__(self, x_shape):
        super().__init__(x_shape)
        self.log_var = nn.Parameter(torch.full(x_shape, math.log(0.1)))

    def forward(self, out):
        return dist.gaussian(out, self.log_var, 3)


class LogisticLikelihood(PixelLikelihood):
    """Discretised logistic over 256 levels: the decoder outputs a location and a log-scale per pixel."""

    def forward(self, out):
        loc, log_scale = out.chunk(2, dim=1)
        return dist.discretized_logistic(torch.sigmoid(loc), log_scale, 3)

    def pmf(self, out: Tensor, at: Tensor | None = None) -> Tensor:
        """P(x = i / 255) = sigmoid((x + h - loc) / s) - sigmoid((x - h - loc) / s), the end bins
        reaching to -inf and +inf (``distributions.DiscretizedLogistic``), in float64; with ``at``
        the same arithmetic on the two edges of each given level only."""
        p = self(out).base_dist
        loc, inv_s = p.loc.flatten(1).double().unsqueeze(-1), torch.exp(-p.log_scale.flatten(1).double()).unsqueeze(-1)
        inner = (torch.arange(1, p.bins, dtype=torch.float64) - 0.5) / (p.bins - 1)  # between the levels
        inf = torch.tensor([math.inf], dtype=torch.float64)
        edges = torch.cat([-inf, inner, inf])
        if at is None:
            a = (edges - loc) * inv_s  # (B, pixels, bins + 1)
            lo, hi = a[..., :-1], a[..., 1:]
        else:
            lo, hi = ((edges[at + i].unsqueeze(-1) - loc) * inv_s for i in (0, 1))  # (B, pixels, 1)
            lo, hi = lo.squeeze(-1), hi.squeeze(-1)
        # above the location from the survival function, so a far bin is not 1 - 1 but its own small mass
        return torch.where(lo > 0, torch.sigmoid(-lo) - torch.sigmoid(-hi), torch.sigmoid(hi) - torch.sigmoid(lo))


def make_likelihood(name: str, x_shape) -> PixelLikelihood:
    """The likelihood registered as ``name`` in ``parts.LIKELIHOODS``."""
    return parts.LIKELIHOODS[name].constructor()(tuple(x_shape))


# -- priors p(z) --------------------------------------------------------------------------------
# Each prior is built as cls(latent_dim, x_shape, components, seed) from its entry in parts.PRIORS.
class StandardNormalPrior(nn.Module):
    def __init__(self, latent_dim: int, x_shape=None, components: int = 0, seed: int = 0):
        super().__init__()
        self.register_buffer("zeros", torch.zeros(latent_dim))

    def forward(self, encode) -> Distribution:
        return dist.standard_normal_like(self.zeros)


class MixturePrior(nn.Module):
    """A learnable mixture of K diagonal Gaussians; the KL against it has no closed form."""

    def __init__(self, latent_dim: int, x_shape, components: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.logits = nn.Parameter(torch.zeros(components))
        self.mu = nn.Parameter(torch.randn(components, latent_dim, generator=g))
        self.log_var = nn.Parameter(torch.zeros(components, latent_dim))

    def forward(self, encode) -> Distribution:
        return dist.gaussian_mixture(self.logits, self.mu, self.log_var)


class VampPrior(nn.Module):
    """p(z) = 1/K sum_k q(z | u_k) with learned pseudo-inputs u_k (Tomczak & Welling 2018)."""

    def __init__(self, latent_dim: int, x_shape, components: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.pseudo_logits = nn.Parameter(0.1 * torch.randn(components, *x_shape, generator=g))

    def forward(self, encode) -> Distribution:
        q_u = encode(torch.sigmoid(self.pseudo_logits))  # pseudo-inputs kept in [0, 1]
        mu, log_var = q_u.base_dist.loc, 2.0 * q_u.base_dist.scale.log()
        return dist.gaussian_mixture(torch.zeros(mu.shape[0], device=mu.device), mu, log_var)


def make_prior(name: str, latent_dim: int, x_shape, components: int, seed: int = 0) -> nn.Module:
    """The prior registered as ``name`` in ``parts.PRIORS``."""
    return parts.PRIORS[name].constructor()(latent_dim, tuple(x_shape), components, seed)


# -- the model ---------------------------------------------------------------------------------
class VAE(nn.Module):
    """A VAE assembled from parts; final (compose, don't subclass)."""

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent_dim: int,
        x_shape: tuple[int, int, int],
        likelihood: PixelLikelihood,
        prior: nn.Module,
        posterior: Callable[[Tensor], Distribution] = dist.diagonal_posterior,
    ):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.latent_dim, self.x_shape = latent_dim, tuple(x_shape)
        self.layer_dims = {"z": latent_dim}  # the latent layers of latents(), by name
        self.likelihood, self.prior_module = likelihood, prior
        self.posterior = posterior

    def encode(self, x: Tensor) -> Distribution:
        # the encoder's output (B, outputs(D)) -> q(z|x); float32 from here, whatever autocast ran the network in
        return self.posterior(self.encoder(x))

    def decode(self, z: Tensor) -> Distribution:
        return self.likelihood(self.decoder(z))  # (B, P C, H, W) -> p(x|z), in float32 under bf16 too

    def prior(self) -> Distribution:
        return self.prior_module(self.encode)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The mean of p(x|z) at z = the mean of q(z|x) (for categorical variables, their most probable
        categories: a z the model has), (B, C, H, W): what the report and the page show."""
        q = self.encode(x)
        return self.decode(q.mode if isinstance(q, dist.Categoricals) else dist.marginals(q)[0]).mean

    # -- the contract with the objectives (contract.LatentVariableModel) ----------------------
    def latents(self, x: Tensor, draw: Draw) -> list[LatentLayer]:
        """One latent layer: q(z|x), p(z) and z = draw(q(z|x))."""
        q_z = self.encode(x)
        return [LatentLayer("z", q_z, self.prior(), draw(q_z))]

    def log_px_given_z(self, layers: list[LatentLayer], x: Tensor) -> Tensor:
        """log p(x|z) at the layer's sample: (B,) for z (B, D); (n, B) for n samples per example."""
        (layer,) = layers
        return decoder_log_prob(self.decoder, self.likelihood, layer.z, x)


def decoder_log_prob(decoder: nn.Module, likelihood: PixelLikelihood, z: Tensor, x: Tensor) -> Tensor:
    """log p(x | z) summed over pixels, p(x|z) = likelihood(decoder(z)): (B,) for z (B, D), and for n
    samples per example, z (n, B, D), (n, B), the n decoded as one batch and scored by the
    likelihood's ``log_prob_samples`` (x is not copied n times for the Bernoulli)."""
    if z.dim() == 2:
        return likelihood(decoder(z)).log_prob(x)
    n, B = z.shape[:2]
    out = decoder(z.transpose(0, 1).reshape(B * n, -1))  # example-major: (B n, ...)
    return likelihood.log_prob_samples(out.view(B, n, *out.shape[1:]), x).T
