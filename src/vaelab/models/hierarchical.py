r"""The hierarchical VAE: two latent layers, with top-down or bottom-up inference.

    generative model:  p(z2) = N(0, I),   p(z1 | z2) = N(mu_p(z2), diag var_p(z2)),   p(x | z1)
    inference, top-down (default):   q(z2 | x),  q(z1 | x, z2)
    inference, bottom-up:            q(z1 | x),  q(z2 | z1)

Top-down, both factor in the same order, top first, so each layer's KL is between two diagonal
Gaussians and has a closed form at the sample of the layer above it:

    ELBO(x) = E_q[log p(x|z1)] - KL(q(z2|x) || p(z2)) - E_{q(z2|x)}[ KL(q(z1|x, z2) || p(z1|z2)) ]
                                 \_______ KL2 ________/   \______________ KL1 _______________/

(log p(x) - ELBO(x) = KL(q(z1, z2|x) || p(z1, z2|x)) as for one layer.) One deterministic bottom-up
path serves both posteriors: h1 = f1(x) (``hidden``), h2 = f2(h1) (``top_hidden``); q(z2|x) is read
from h2 and q(z1|x, z2) from (h1, z2), the top-down order of the ladder VAE (Sønderby et al. 2016)
and NVAE (Vahdat & Kautz 2020), here without their merging of the two directions' estimates.

Bottom-up (``--inference bottom-up``), q(z1|x) from h1 and q(z2|z1) from z1, the order of Burda et
al. 2015 and of Bit-Swap (Kingma, Abbeel & Ho 2019), whose coder pops z2 only after pushing x
(``bitsback.BitSwap``). The same ELBO, with the layers' KLs taken apart the other way:

    KL2 = E_{q(z1|x)} KL(q(z2|z1) || p(z2))          closed form at the sample of z1
    KL1 = E_q[log q(z1|x) - log p(z1|z2)]            no closed form: p(z1|z2) is read at a z2 drawn
                                                     from z1, so the KL at that z2 would be biased

KL1 is the single-sample estimate at the ELBO's own samples (``LatentLayer.closed_form`` False). The
exact posterior of two linear-Gaussian layers has this form (x depends on z2 only through z1), which
``linear_gaussian.TwoLevelLinearGaussian`` makes the oracle of both orders.

Burda et al. 2015's two-layer sizes, 784-[200-200]-100-[100-100]-50 tanh, are ``hidden`` (200, 200),
``latent_dim`` 100 (z1), ``top_hidden`` (100, 100) and ``top_latent_dim`` 50 (z2) (the preset
``burda2015-vae-2layer``, which keeps vaelab's top-down inference unless ``--inference bottom-up``).

The known failure is the top layer collapsing (KL2 -> 0: q(z2|x) = p(z2), z2 unused); free bits
(per dimension, on every layer) and KL warm-up counter it (Sønderby et al. call warm-up crucial).
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from vaelab import distributions as dist
from vaelab import parts
from vaelab.contract import Draw, LatentLayer
from vaelab.models.base import PixelLikelihood, decoder_log_prob, make_likelihood
from vaelab.models.mlp import MLPDecoder, activation_module, mlp


class HierarchicalVAE(nn.Module):
    """Two latent layers, z2 (top) and z1, inferred ``inference`` "top-down" or "bottom-up" (module
    docstring); final. Implements ``contract.LatentVariableModel``.

    For the report and the page (which look at one latent layer) the model shows its top layer:
    ``encode(x)`` is q(z2|x), ``prior()`` is p(z2) and ``decode(z2)`` is p(x|z1) at z1 = the mean of
    p(z1|z2); ``reconstruct(x)`` goes through both posteriors' means.
    """

    def __init__(
        self,
        x_shape: tuple[int, int, int],
        hidden: tuple[int, ...],
        latent_dim: int,
        top_hidden: tuple[int, ...],
        top_latent_dim: int,
        likelihood: PixelLikelihood,
        params_per_pixel: int = 1,
        activation: str = "relu",
        inference: str = "top-down",
    ):
        super().__init__()
        D1, D2 = latent_dim, top_latent_dim
        act = partial(activation_module, activation)
        self.x_shape, self.latent_dim = tuple(x_shape), D2  # the layer that encode / decode / prior show
        self.layer_dims = {"z2": D2, "z1": D1}  # in the order of latents(): top first
        self.inference = inference
        self.bottom_up1 = nn.Sequential(mlp([math.prod(x_shape), *hidden], activation), act())  # h1
        if inference == "bottom-up":
            self.q_bottom = nn.Linear(hidden[-1], 2 * D1)  # q(z1|x) from h1
            self.q_top = mlp([D1, *top_hidden, 2 * D2], activation)  # q(z2|z1) from z1
        else:
            self.bottom_up2 = nn.Sequential(mlp([hidden[-1], *top_hidden], activation), act())  # h2
            self.q_top = nn.Linear(top_hidden[-1], 2 * D2)  # q(z2|x) from h2
            self.q_bottom = mlp([hidden[-1] + D2, *top_hidden, 2 * D1], activation)  # q(z1|x, z2) from (h1, z2)
        self.p_bottom = mlp([D2, *reversed(top_hidden), 2 * D1], activation)  # p(z1|z2)
        self.decoder = MLPDecoder(x_shape, hidden, D1, params_per_pixel, activation)  # p(x|z1)
        self.likelihood = likelihood
        self.register_buffer("zeros", torch.zeros(D2))

    def _bottom_up(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h1 = self.bottom_up1(x.flatten(1))  # (B, hidden[-1])
        return h1, self.bottom_up2(h1)  # (B, top_hidden[-1])

    def _q_bottom(self, h1: Tensor, z2: Tensor) -> Distribution:
        """q(z1 | x, z2), batch (*S, B) for z2 (*S, B, D2)."""
        h1 = h1.expand(*z2.shape[:-1], h1.shape[-1])
        return dist.diagonal_posterior(self.q_bottom(torch.cat([h1, z2.to(h1.dtype)], -1)))

    def _q_z1(self, x: Tensor) -> Distribution:
        """Bottom-up: q(z1 | x), batch (B,)."""
        return dist.diagonal_posterior(self.q_bottom(self.bottom_up1(x.flatten(1))))

    def _q_z2(self, z1: Tensor) -> Distribution:
        """Bottom-up: q(z2 | z1), batch (*S, B) for z1 (*S, B, D1)."""
        return dist.diagonal_posterior(self.q_top(z1))

    def _p_bottom(self, z2: Tensor) -> Distribution:
        """p(z1 | z2), its log-variance clamped as the posteriors' are."""
        return dist.diagonal_posterior(self.p_bottom(z2))

    # -- the contract with the objectives --------------------------------------------------------
    def latents(self, x: Tensor, draw: Draw) -> list[LatentLayer]:
        """z2 ~ q(z2|x), then z1 ~ q(z1|x, z2) at that z2; top first. z1 is reparametrised from
        standard-normal noise that ``draw`` makes, so that n samples of z2 get n of z1 (one each)
        and explicit noise (``contract.Noise``) covers both layers."""
        if self.inference == "bottom-up":
            return self._latents_bottom_up(x, draw)
        h1, h2 = self._bottom_up(x)
        q2 = dist.diagonal_posterior(self.q_top(h2))
        z2 = draw(q2)  # (B, D2), or (n, B, D2)
        q1, p1 = self._q_bottom(h1, z2), self._p_bottom(z2)
        loc = q2.base_dist.loc
        eps = draw(dist.standard_normal(self.layer_dims["z1"], loc.device, loc.dtype, (x.shape[0],)))  # (n,) B, D1
        z1 = dist.reparametrize(q1, eps)
        return [LatentLayer("z2", q2, self.prior(), z2), LatentLayer("z1", q1, p1, z1)]

    def _latents_bottom_up(self, x: Tensor, draw: Draw) -> list[LatentLayer]:
        """z1 ~ q(z1|x), then z2 ~ q(z2|z1) at that z1 (reparametrised from noise ``draw`` makes, as z1 is
        top-down); p(z1|z2) at that z2, so z1's KL is the single-sample estimate (module docstring)."""
        q1 = self._q_z1(x)
        z1 = draw(q1)  # (B, D1), or (n, B, D1)
        q1 = q1.expand(z1.shape[:-1])  # its batch that of the samples, as the lower layer's is top-down
        q2 = self._q_z2(z1)
        loc = q1.base_dist.loc
        eps = draw(dist.standard_normal(self.layer_dims["z2"], loc.device, loc.dtype, (x.shape[0],)))
        z2 = dist.reparametrize(q2, eps)
        return [
            LatentLayer("z2", q2, self.prior(), z2),
            LatentLayer("z1", q1, self._p_bottom(z2), z1, closed_form=False),
        ]

    def log_px_given_z(self, layers: list[LatentLayer], x: Tensor) -> Tensor:
        """log p(x | z1) at the bottom layer's sample: (B,), or (n, B) for n samples per example."""
        return decoder_log_prob(self.decoder, self.likelihood, layers[-1].z, x)

    # -- the top layer, for the report and the page ---------------------------------------------
    def encode(self, x: Tensor) -> Distribution:
        """q(z2|x); bottom-up, q(z2|z1) at z1 = the mean of q(z1|x) (q(z2|x) itself is a mixture over z1,
        with no closed form: the pictures show this plug-in, and ``evaluate`` takes no KL split of it)."""
        if self.inference == "bottom-up":
            return self._q_z2(self._q_z1(x).base_dist.loc)
        return dist.diagonal_posterior(self.q_top(self._bottom_up(x)[1]))

    def prior(self) -> Distribution:
        """p(z2) = N(0, I)."""
        return dist.standard_normal_like(self.zeros)

    def decode(self, z2: Tensor) -> Distribution:
        """p(x | z1) at z1 = the mean of p(z1 | z2): a picture of what z2 encodes (not p(x | z2),
        which is an integral over z1)."""
        z1 = self._p_bottom(z2).base_dist.loc
        return self.likelihood(self.decoder(z1))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The mean of p(x|z1) at z1 = the mean of q(z1 | x, z2), z2 = the mean of q(z2|x); bottom-up, at
        z1 = the mean of q(z1|x)."""
        if self.inference == "bottom-up":
            return self.likelihood(self.decoder(self._q_z1(x).base_dist.loc)).mean
        h1, h2 = self._bottom_up(x)
        z2 = dist.diagonal_posterior(self.q_top(h2)).base_dist.loc
        z1 = self._q_bottom(h1, z2).base_dist.loc
        return self.likelihood(self.decoder(z1)).mean


def build_hierarchical(config, x_shape) -> HierarchicalVAE:
    """The ``hierarchical`` entry of ``parts.FAMILIES``: MLPs, diagonal posteriors, p(z2) = N(0, I)."""
    return HierarchicalVAE(
        x_shape,
        config.hidden,
        config.latent_dim,
        config.top_hidden,
        config.top_latent_dim,
        make_likelihood(config.likelihood, x_shape),
        parts.LIKELIHOODS[config.likelihood].params_per_pixel,
        config.activation,
        config.inference,
    )
