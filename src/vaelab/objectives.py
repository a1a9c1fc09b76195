r"""The VAE objective, returned as its terms.

For one example x, with q = q(z|x), p(x|z) the decoder and p(z) the prior:

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))        (reconstruction - KL)
    log p(x) = ELBO(x) + KL(q(z|x) || p(z|x))               (so ELBO <= log p(x))

Reductions (the classic VAE bug is a hidden one): each term is **summed** over pixels
and latent dimensions inside :func:`elbo`, giving one number per example in nats; the
mean over the batch happens once, in :func:`loss`. beta multiplies the KL there and
nowhere else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor
from torch.distributions import Distribution

from vaelab.kl import diag_normal_params, kl_q_p


class LatentVariableModel(Protocol):
    def encode(self, x: Tensor) -> Distribution: ...
    def decode(self, z: Tensor) -> Distribution: ...
    def prior(self) -> Distribution: ...


@dataclass(frozen=True)
class ElboTerms:
    """Per-example terms of the ELBO, in nats. Shapes: (B,), and (B, D) for ``kl_per_dim``.

    ``kl_method`` is ``"analytic"`` (closed form) or ``"monte_carlo"`` (single-sample
    estimate at the same z as the reconstruction). ``kl_per_dim`` is None when the
    prior does not factorise over dimensions (mixture, VampPrior).
    """

    reconstruction: Tensor  # E_q[log p(x|z)], (B,)
    kl: Tensor  # KL(q(z|x) || p(z)), (B,)
    kl_per_dim: Tensor | None  # (B, D)
    kl_method: str

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl


@dataclass(frozen=True)
class Noise:
    """Where the standard-normal noise of the reparametrisation z = mu + sigma * eps comes from.

    The noise of a whole (global) batch of ``total`` examples is drawn from ``generator``
    and this process takes rows ``start:start + B``: one process, or several sharing a
    batch (DistributedDataParallel), see the same eps for the same example, and a step's
    noise is a pure function of the generator's seed.
    """

    generator: torch.Generator
    total: int
    start: int = 0

    def sample(self, q_z: Distribution, sample_shape: tuple[int, ...] = ()) -> Tensor:
        params = diag_normal_params(q_z)
        if params is None:
            raise ValueError("explicit noise needs a diagonal Gaussian q(z|x)")
        mu, log_var = params  # (B, D)
        B, D = mu.shape
        eps = torch.randn((*sample_shape, self.total, D), generator=self.generator, device=mu.device, dtype=mu.dtype)[
            ..., self.start : self.start + B, :
        ]
        return mu + torch.exp(0.5 * log_var) * eps


def elbo(model: LatentVariableModel, x: Tensor, noise: Noise | None = None) -> ElboTerms:
    """The ELBO's terms for a batch ``x``, one reparametrised sample z ~ q(z|x) per example
    (from the global RNG, or from ``noise``)."""
    q_z = model.encode(x)
    z = q_z.rsample() if noise is None else noise.sample(q_z)  # (B, D)
    p_x = model.decode(z)
    log_px_given_z = p_x.log_prob(x)  # (B,): the likelihood's event dims are summed
    kl = kl_q_p(q_z, model.prior(), z)
    return ElboTerms(log_px_given_z, kl.value, kl.per_dim, kl.method)


def iwae_log_weights(model: LatentVariableModel, x: Tensor, k: int, noise: Noise | None = None) -> Tensor:
    """log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x), z_i ~ q(z|x), shape (k, B)."""
    q_z = model.encode(x)
    z = q_z.rsample((k,)) if noise is None else noise.sample(q_z, (k,))  # (k, B, D)
    B = x.shape[0]
    flat = z.reshape(k * B, -1)
    p_x = model.decode(flat)
    x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(k * B, *x.shape[1:])
    log_px_given_z = p_x.log_prob(x_rep).reshape(k, B)
    return log_px_given_z + model.prior().log_prob(z) - q_z.log_prob(z)


def iwae_bound(model: LatentVariableModel, x: Tensor, k: int, noise: Noise | None = None) -> Tensor:
    r"""The IWAE bound (Burda et al. 2015), per example:

    .. math:: \mathcal L_k(x) = \mathbb E\big[\log \tfrac1k \textstyle\sum_i w_i\big] \le \log p(x)

    with k = 1 the ELBO; L_k increases with k and tends to log p(x).
    """
    log_w = iwae_log_weights(model, x, k, noise)
    return torch.logsumexp(log_w, 0) - math.log(k)


# -- training loss: beta, free bits, and the one batch mean -----------------------------
def loss(terms: ElboTerms, beta: float = 1.0, free_bits: float = 0.0) -> Tensor:
    r"""Scalar loss = mean over the batch of -(reconstruction - beta * KL).

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
    return -(terms.reconstruction.mean() - beta * kl)


def iwae_loss(model: LatentVariableModel, x: Tensor, k: int, noise: Noise | None = None) -> Tensor:
    return -iwae_bound(model, x, k, noise).mean()


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
