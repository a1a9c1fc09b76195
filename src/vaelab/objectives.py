r"""The VAE objective, returned as its terms.

For one example x, with q = q(z|x), p(x|z) the decoder and p(z) the prior:

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))        (reconstruction - KL)
    log p(x) = ELBO(x) + KL(q(z|x) || p(z|x))               (so ELBO <= log p(x))

A model with several latent layers z_1 .. z_L (top-down inference, q(z_l | x, z_>l) and
p(z_l | z_>l)) has one KL per layer, each at the sample of the layers above it:

    ELBO(x) = E_q[log p(x|z)] - sum_l E_q[KL(q(z_l | x, z_>l) || p(z_l | z_>l))]

The contract (``contract.py``: :class:`LatentVariableModel`): the model hands the objective its
latent layers, each with q, p and the sample z (:class:`LatentLayer`), and log p(x|z) for them.

Reductions (the classic VAE bug is a hidden one): each term is **summed** over pixels
and latent dimensions inside :func:`elbo`, giving one number per example in nats; the
mean over the batch happens once, in :func:`loss`. beta multiplies the KL there and
nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor
from torch.distributions import Distribution

from vaelab.contract import (  # the contract's types, re-exported for the objectives' callers
    Draw,
    ElboTerms,
    Examples,
    LatentVariableModel,
    Noise,
    examples,
)
from vaelab.decomposition import decompose_minibatch
from vaelab.kl import diag_normal_params


def rsample(q: Distribution) -> Tensor:
    """One reparametrised sample from the global RNG: the default ``draw``."""
    return q.rsample()


def elbo(model: LatentVariableModel, x: Tensor, noise: Noise | None = None) -> ElboTerms:
    """The ELBO's terms for a batch ``x``, one reparametrised sample per example and layer
    (from the global RNG, or from ``noise``)."""
    layers = model.latents(x, rsample if noise is None else noise.sample)
    log_px_given_z = model.log_px_given_z(layers, x)  # (B,): the likelihood's event dims are summed
    kls = {layer.name: layer.kl() for layer in layers}
    terms = ElboTerms.of_layers(log_px_given_z, kls)
    auxiliary = [layer.q.auxiliary_loss for layer in layers if hasattr(layer.q, "auxiliary_loss")]
    return replace(terms, auxiliary=sum(auxiliary)) if auxiliary else terms


@torch.no_grad()
def elbo_batches(
    model: LatentVariableModel, data: Tensor | Examples, batch_size: int, seed: int = 0
) -> list[ElboTerms]:
    """The ELBO's terms for a whole data set (images, or :class:`contract.Examples` with the labels a
    conditional model is given), batch by batch, in eval mode, one z per example drawn from the global RNG
    seeded by ``seed`` (forked: the caller's RNG state and the model's mode are restored)."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = [elbo(model_b, xb) for xb, model_b in examples(data).batches(model, batch_size)]
    model.train(was_training)
    return out


# A latent layer whose average KL is below this many nats carries almost nothing about x: it has
# collapsed onto its prior (the known failure of the top layers of hierarchical VAEs).
COLLAPSED_KL = 0.01


def collapsed_layers(kl_per_layer: dict[str, float]) -> list[str]:
    """The names of the layers whose average KL (nats per example) is below ``COLLAPSED_KL``."""
    return [name for name, kl in kl_per_layer.items() if kl < COLLAPSED_KL]


def collapse_warning(layer: str, kl: float) -> str:
    """What a user reads about a collapsed layer, and what to try."""
    return (
        f"layer {layer} has collapsed: its KL is {kl:.4f} nats, so q({layer}|x) is its prior and carries nothing "
        "about x; try --warmup linear --warmup-steps N or --free-bits NATS"
    )


def bits_per_dim(nats: float | Tensor, pixels: int) -> float | Tensor:
    """A log-likelihood (or ELBO) in nats per example as bits per pixel: -nats / (pixels ln 2).
    Meaningful for discrete likelihoods, where it is a code length."""
    return -nats / (pixels * math.log(2.0))


def log_importance_weights(model: LatentVariableModel, x: Tensor, draw: Draw) -> Tensor:
    """log w = log p(x|z) + sum_l [log p(z_l | z_>l) - log q(z_l | x, z_>l)] for the samples ``draw``
    makes (n per example): the joint importance weights over every latent layer, (n, B)."""
    layers = model.latents(x, draw)
    log_w = model.log_px_given_z(layers, x)
    for layer in layers:
        log_w = log_w + layer.p.log_prob(layer.z) - layer.q.log_prob(layer.z)
    return log_w


def iwae_log_weights(model: LatentVariableModel, x: Tensor, k: int, noise: Noise | None = None) -> Tensor:
    """log w_i for k reparametrised samples per example (from the global RNG, or ``noise``), (k, B)."""
    draw = (lambda q: q.rsample((k,))) if noise is None else (lambda q: noise.sample(q, (k,)))
    return log_importance_weights(model, x, draw)


def iwae_bound(model: LatentVariableModel, x: Tensor, k: int, noise: Noise | None = None) -> Tensor:
    r"""The IWAE bound (Burda et al. 2015), per example:

    .. math:: \mathcal L_k(x) = \mathbb E\big[\log \tfrac1k \textstyle\sum_i w_i\big] \le \log p(x)

    with k = 1 the ELBO; L_k increases with k and tends to log p(x).
    """
    log_w = iwae_log_weights(model, x, k, noise)
    return torch.logsumexp(log_w, 0) - math.log(k)


# -- training loss: beta, free bits, and the one batch mean -----------------------------
def loss(terms: ElboTerms, beta: float = 1.0, free_bits: float = 0.0) -> Tensor:
    r"""Scalar loss = mean over the batch of -(reconstruction - beta * KL), plus the mean of the terms'
    ``auxiliary`` loss where a posterior has one (VQ-VAE's commitment term).

    Free bits (Kingma et al. 2016, "Improved VI with IAF", eq. 15): each latent
    dimension's batch-mean KL counts as at least ``free_bits`` nats,
    ``sum_j max(free_bits, mean_B KL_j)``, so the optimiser gains nothing by pushing a
    dimension's KL below that floor. Needs per-dimension KL (a factorised prior).
    """
    if free_bits > 0.0:
        if terms.kl_per_dim is None:
            raise ValueError("free bits need a KL per latent dimension; use the 'normal' prior")
        kl = terms.kl_per_dim.mean(0).clamp(min=free_bits).sum()
    else:
        kl = terms.kl.mean()
    out = -(terms.reconstruction.mean() - beta * kl)
    return out if terms.auxiliary is None else out + terms.auxiliary.mean()


def iwae_loss(model: LatentVariableModel, x: Tensor, k: int, noise: Noise | None = None) -> Tensor:
    return -iwae_bound(model, x, k, noise).mean()


# -- the objectives of parts.OBJECTIVES: (model, x, noise, beta, config, dataset_size) -> (loss, terms) --
def elbo_objective(model: LatentVariableModel, x: Tensor, noise: Noise | None, beta: float, config, dataset_size: int):
    """The negative ELBO with ``beta`` and ``config.free_bits``, and its terms."""
    terms = elbo(model, x, noise)
    return loss(terms, beta, config.free_bits), terms


def iwae_objective(model: LatentVariableModel, x: Tensor, noise: Noise | None, beta: float, config, dataset_size: int):
    """The negative IWAE bound with ``config.k`` samples; the ELBO's terms (one more sample, no
    gradient) for the logs."""
    iwae = iwae_loss(model, x, config.k, noise)
    with torch.no_grad():
        return iwae, elbo(model, x, noise)


def tc_objective(model: LatentVariableModel, x: Tensor, noise: Noise | None, beta: float, config, dataset_size: int):
    r"""beta-TCVAE (Chen et al. 2018): the KL's three parts, each with its own weight,

    .. math:: \text{loss} = -\mathbb E[\log p(x|z)] + \beta_t\,(\alpha\,I + \beta\,TC + \gamma\,\text{DWKL})

    with alpha, beta, gamma = ``config.mi_weight``, ``tc_weight``, ``dwkl_weight`` and beta_t the
    warm-up schedule's factor; I, TC and DWKL are the minibatch estimates ``config.tc_estimator``
    (``decomposition.py``) at the batch's own samples, over a data set of ``dataset_size``. With
    every weight 1 the three add up to log q(z|x) - log p(z), and the loss is the negative ELBO
    with a single-sample KL. Under torchrun each rank's rows are the minibatch.
    """
    layers = model.latents(x, rsample if noise is None else noise.sample)
    (layer,) = layers  # one latent layer; Config checks that q and p factorise
    (mu, log_var), prior = diag_normal_params(layer.q), diag_normal_params(layer.p)
    prior = tuple(t.expand_as(layer.z) for t in prior)
    parts = decompose_minibatch(layer.z, mu, log_var, dataset_size, config.tc_estimator, prior)
    reconstruction = model.log_px_given_z(layers, x)
    penalty = (
        config.mi_weight * parts.mutual_information
        + config.tc_weight * parts.total_correlation
        + config.dwkl_weight * parts.dimension_wise_kl
    )
    terms = ElboTerms.of_layers(reconstruction, {layer.name: layer.kl()})
    kl_parts = {
        "mutual_information": parts.mutual_information.detach(),
        "total_correlation": parts.total_correlation.detach(),
        "dimension_wise_kl": parts.dimension_wise_kl.detach(),
    }
    return -(reconstruction - beta * penalty).mean(), replace(terms, kl_parts=kl_parts)


# -- beta schedules -----------------------------------------------------------------------
def beta_at(step: int, schedule: str, beta: float, warmup_steps: int) -> float:
    """beta at an optimiser step.

    - ``constant``: beta throughout.
    - ``linear``: 0 -> beta over ``warmup_steps`` (Bowman et al. 2016), then beta.
    - ``cyclical``: the linear ramp over the first half of each cycle of ``warmup_steps``
      steps, then beta for the second half (Fu et al. 2019, with R = 0.5).
    """
    if schedule == "constant" or warmup_steps <= 0:
        return beta
    if schedule == "linear":
        return beta * min(1.0, step / warmup_steps)
    if schedule == "cyclical":
        position = (step % warmup_steps) / warmup_steps
        return beta * min(1.0, position / 0.5)
    raise ValueError(f"unknown beta schedule {schedule!r}; choose constant, linear or cyclical")
