r"""Semi-supervised M2 (Kingma, Rezende, Mohamed & Welling 2014): the label y is a latent variable where
it is missing. p(y) = Uniform(C), p(z) = N(0, I), p(x|y, z); q(y|x) a classifier, q(z|x, y).

A labelled image bounds log p(x, y):

    -L(x, y) = E_q(z|x,y)[log p(x|y, z)] + log p(y) - KL(q(z|x, y) || p(z))

An unlabelled one bounds log p(x), the label summed out exactly (not sampled) under q(y|x):

    -U(x) = sum_y q(y|x) (E_q(z|x,y)[log p(x|y, z)] - KL(q(z|x, y) || p(z))) - KL(q(y|x) || Uniform(C))

with KL(q(y|x) || Uniform(C)) = log C - H(q(y|x)) in closed form: it falls as the classifier grows
confident. The loss adds alpha times the classifier's cross-entropy on the labelled images, per image:
the paper's alpha = 0.1 N over a sum of N bounds, written per example.

Given a label (``contract.given(model, y)``), the model is the conditional VAE it contains
(``ConditionalVAE``): q(z|x, y), p(x|z, y), what the report and the page draw per class. Without one,
its contract is the unlabelled model's, two layers top first, y ~ q(y|x) and z ~ q(z|x, y): the ELBO
with y drawn estimates -U(x) without bias, and the IWAE bound over (y, z) estimates log p(x).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vaelab import distributed, parts
from vaelab import distributions as dist
from vaelab.contract import Draw, ElboTerms, LatentLayer, Noise
from vaelab.kl import kl_categorical, kl_q_p
from vaelab.models.base import decoder_log_prob, make_likelihood
from vaelab.models.conditional import ConditionalVAE
from vaelab.models.mlp import mlp


class SemiSupervisedVAE(ConditionalVAE):
    """M2: the conditional VAE and a classifier q(y|x); final."""

    def __init__(self, x_shape, hidden, latent_dim: int, classes: int, likelihood, params_per_pixel: int, activation):
        super().__init__(
            x_shape,
            hidden,
            latent_dim,
            classes,
            likelihood,
            dist.diagonal_posterior,
            2 * latent_dim,
            params_per_pixel,
            activation,
        )
        self.classifier = mlp([math.prod(x_shape), *hidden, classes], activation)
        self.layer_dims = {"y": 1, "z": latent_dim}  # the unlabelled model's layers: y one variable of C
        self.given_layer_dims = {"z": latent_dim}  # given y (contract.Given): the conditional VAE's one layer

    def classify(self, x: Tensor) -> dist.Categoricals:
        """q(y|x), one categorical variable of C classes."""
        return dist.Categoricals(self.classifier(x.flatten(1)).unsqueeze(-2))

    def label_prior(self) -> dist.Categoricals:
        return dist.Categoricals(self.zeros.new_zeros(1, self.classes))

    def encode(self, x: Tensor, y: Tensor | None = None):
        """q(z|x, y) given labels; q(y|x) without (the unlabelled model's top layer)."""
        return self.classify(x) if y is None else super().encode(x, y)

    # -- the contract: with labels the conditional VAE's; without, two layers, y then z --------------
    def latents(self, x: Tensor, draw: Draw, y: Tensor | None = None) -> list[LatentLayer]:
        if y is not None:
            return super().latents(x, draw, y)
        q_y = self.classify(x)
        y_draw = draw(q_y)  # one-hot (B, C), or (n, B, C)
        h = self.encoder(torch.cat([x.flatten(1).expand(*y_draw.shape[:-1], -1), y_draw.to(x.dtype)], -1))
        q_z = self.posterior(h)
        eps = draw(dist.standard_normal_like(self.zeros.expand(x.shape[0], -1)))  # n draws of y get n of z, one each
        return [
            LatentLayer("y", q_y, self.label_prior(), y_draw),
            LatentLayer("z", q_z, self.prior(), dist.reparametrize(q_z, eps)),
        ]

    def log_px_given_z(self, layers: list[LatentLayer], x: Tensor, y: Tensor | None = None) -> Tensor:
        if y is not None:
            return super().log_px_given_z(layers, x, y)
        y_draw, z = layers[0].z, layers[1].z
        return decoder_log_prob(self.decoder, self.likelihood, torch.cat([z, y_draw.to(z.dtype)], -1), x)

    # -- training: labelled and unlabelled images in one batch ------------------------------------
    def training_loss(self, x: Tensor, noise: Noise, beta: float, config, dataset_size: int, y: Tensor):
        """The M2 loss of a batch whose labels ``y`` are -1 where missing, and the bound's terms (per
        image: the labelled bound on log p(x, y), the unlabelled one on log p(x)). Each image's bound is
        computed for every label at once, with the step's noise for z: C draws of z per image."""
        B, C = x.shape[0], self.classes
        labels = torch.arange(C, device=x.device)
        flat = x.flatten(1)
        every = torch.nn.functional.one_hot(labels, C).to(flat.dtype)[:, None].expand(C, B, C)  # each label, each row
        h = self.encoder(torch.cat([flat.expand(C, -1, -1), every], -1))
        q_z = self.posterior(h)  # batch (C, B)
        eps = noise.sample(dist.standard_normal_like(self.zeros.expand(B, -1)), (C,))
        z = dist.reparametrize(q_z, eps)  # (C, B, D)
        out = self.decoder(torch.cat([z, every.to(z.dtype)], -1).flatten(0, 1))  # (C B, ...), label-major
        reconstruction = self.likelihood(out).log_prob(x.repeat(C, 1, 1, 1)).view(C, B)
        kl_z = kl_q_p(q_z, self.prior())  # (C, B), per dimension (C, B, D)
        q_y = self.classify(x)
        log_q_y = q_y.log_probs[:, 0]  # (B, C)
        known = y >= 0
        weight = torch.where(known[:, None], self._one_hot(y.clamp(min=0), log_q_y), log_q_y.exp())  # (B, C)
        kl_y = torch.where(known, torch.full_like(log_q_y[:, 0], math.log(C)), kl_categorical(log_q_y, log_q_y * 0))
        terms = ElboTerms(
            reconstruction=(weight * reconstruction.T).sum(1),
            kl=(weight * kl_z.value.T).sum(1) + kl_y,
            kl_per_dim=torch.cat([kl_y[:, None], (weight.T[..., None] * kl_z.per_dim).sum(0)], -1),
            kl_method="analytic",
            kl_per_layer={"y": kl_y, "z": (weight * kl_z.value.T).sum(1)},
        )
        # the classifier's loss on the labelled images, over the whole batch's labelled count (every process's)
        labelled = distributed.all_reduce_sum(known.sum().to(x.dtype)).clamp(min=1)
        cross_entropy = -(log_q_y.gather(1, y.clamp(min=0)[:, None])[:, 0] * known).sum()
        classification = config.alpha * cross_entropy * distributed.current().world / labelled
        loss = -(terms.reconstruction - beta * terms.kl).mean() + classification
        return loss, terms


def build_m2(config, x_shape) -> SemiSupervisedVAE:
    """The M2 model that ``config`` describes (``config.classes`` labels; MLPs, a diagonal q(z|x, y))."""
    return SemiSupervisedVAE(
        x_shape,
        config.hidden,
        config.latent_dim,
        config.classes,
        make_likelihood(config.likelihood, x_shape),
        parts.LIKELIHOODS[config.likelihood].params_per_pixel,
        config.activation,
    )


def m2_of(model) -> SemiSupervisedVAE | None:
    return model if isinstance(model, SemiSupervisedVAE) else None
