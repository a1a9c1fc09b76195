r"""The conditional VAE (Sohn, Lee & Yan 2015; Kingma et al. 2014's M2 with the label observed):
labels y in 0 .. C-1 condition both networks,

    encode(x, y) -> q(z | x, y),     decode(z, y) -> p(x | z, y),     prior() -> p(z) = N(0, I)

    ELBO(x | y) = E_q[log p(x | z, y)] - KL(q(z | x, y) || p(z))   <=   log p(x | y)

The KL term is conditioned on y and is otherwise the same: for a diagonal Gaussian q against
N(0, I), 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2) with mu and sigma functions of (x, y).
Since the decoder is told y, z need not encode the class: it keeps what y leaves open (style,
slant, thickness), which is why a conditional VAE's KL is usually smaller than an unconditional
one's on the same data.

y enters as a one-hot vector concatenated to the encoder's input and to z. The objectives see the
plain contract through ``contract.given(model, y)``, which binds a batch's labels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.nn.functional import one_hot

from vaelab import distributions as dist
from vaelab import parts
from vaelab.contract import Draw, LatentLayer
from vaelab.models import make_posterior
from vaelab.models.base import decoder_log_prob, make_likelihood
from vaelab.models.mlp import MLPDecoder, mlp


class ConditionalVAE(nn.Module):
    """q(z|x, y), p(x|z, y), p(z) = N(0, I), MLPs; final. ``posterior`` turns the encoder's output into
    q(z|x, y) (any family of ``parts.POSTERIORS``)."""

    def __init__(
        self,
        x_shape: tuple[int, int, int],
        hidden: tuple[int, ...],
        latent_dim: int,
        classes: int,
        likelihood: nn.Module,
        posterior,
        encoder_width: int,
        params_per_pixel: int = 1,
        activation: str = "relu",
    ):
        super().__init__()
        self.x_shape, self.latent_dim, self.classes = tuple(x_shape), latent_dim, classes
        self.layer_dims = {"z": latent_dim}
        self.encoder = mlp([math.prod(x_shape) + classes, *hidden, encoder_width], activation)
        self.decoder = MLPDecoder(x_shape, hidden, latent_dim + classes, params_per_pixel, activation)
        self.likelihood, self.posterior = likelihood, posterior
        self.register_buffer("zeros", torch.zeros(latent_dim))

    def _one_hot(self, y: Tensor, like: Tensor) -> Tensor:
        """one_hot(y) (B, C) beside ``like`` (B, F); a single label (1,) serves every row of ``like``."""
        return one_hot(y, self.classes).to(like.dtype).expand(*like.shape[:-1], self.classes)

    def _decoder_out(self, z: Tensor, y: Tensor) -> Tensor:
        return self.decoder(torch.cat([z, self._one_hot(y, z)], -1))

    def encode(self, x: Tensor, y: Tensor) -> Distribution:
        """q(z | x, y)."""
        x = x.flatten(1)
        h = self.encoder(torch.cat([x, self._one_hot(y, x)], -1))
        return self.posterior(h)

    def decode(self, z: Tensor, y: Tensor) -> Distribution:
        """p(x | z, y), z (B, D) and y (B,)."""
        return self.likelihood(self._decoder_out(z, y))

    def prior(self) -> Distribution:
        return dist.standard_normal_like(self.zeros)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, y: Tensor) -> Tensor:
        mu, _ = dist.marginals(self.encode(x, y))
        return self.decode(mu, y).mean

    # -- the contract, with the labels (contract.given binds them) -----------------------------------
    def latents(self, x: Tensor, draw: Draw, y: Tensor) -> list[LatentLayer]:
        q_z = self.encode(x, y)
        return [LatentLayer("z", q_z, self.prior(), draw(q_z))]

    def log_px_given_z(self, layers: list[LatentLayer], x: Tensor, y: Tensor) -> Tensor:
        """log p(x | z, y): (B,) for z (B, D), (n, B) for n samples per example (decoded example-major)."""
        (layer,) = layers
        n = 1 if layer.z.dim() == 2 else layer.z.shape[0]
        rows = y.repeat_interleave(n)  # decoder_log_prob decodes (B n, D), example-major
        return decoder_log_prob(lambda z: self._decoder_out(z, rows), self.likelihood, layer.z, x)


def build_conditional(config, x_shape) -> ConditionalVAE:
    """The conditional VAE (family ``conditional``) that ``config`` describes (``config.classes`` labels)."""
    return ConditionalVAE(
        x_shape,
        config.hidden,
        config.latent_dim,
        config.classes,
        make_likelihood(config.likelihood, x_shape),
        make_posterior(config),
        parts.POSTERIORS[config.posterior].outputs(config),
        parts.LIKELIHOODS[config.likelihood].params_per_pixel,
        config.activation,
    )
