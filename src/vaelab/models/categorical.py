r"""Categorical latent variables: z is N variables of K categories each, q(z|x) a product of
categoricals and p(z) uniform, so the KL term has a closed form that is bounded,

    KL(q(z|x) || p(z)) = sum_j (log K - H(q(z_j|x))) <= N log K

(the classic 20 variables of 10 categories: at most 46.05 nats).

A discrete z has no reparametrisation: the model trains through the Gumbel-softmax relaxation
(Jang, Gu & Poole 2017; Maddison, Mnih & Teh 2017) at a temperature annealed with the step,
tau_t = max(tau_min, tau_0 exp(-r t)) (Jang et al.'s schedule, updated every step), and is
evaluated as what it is, a model of one-hot z: in eval mode q(z|x) draws one-hot vectors
(``distributions.Categoricals``). The train ELBO of the logs is the relaxed model's, the
validation ELBO and ``vaelab evaluate``'s the discrete model's; ``evaluate`` reports both
(:func:`relaxed`).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from vaelab.distributions import Categoricals


class CategoricalPosterior(nn.Module):
    """The ``categorical`` entry of ``parts.POSTERIORS``: the encoder's output (B, N K) -> q(z|x), N
    categoricals of K categories. In train mode its draws are relaxed at ``temperature``, a buffer the
    training loop sets every step (:func:`temperature_at`), so the weights carry the temperature they ended at;
    in eval mode they are one-hot."""

    def __init__(self, variables: int, categories: int, straight_through: bool = False, temperature: float = 1.0):
        super().__init__()
        self.variables, self.categories, self.straight_through = variables, categories, straight_through
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, h: Tensor) -> Categoricals:
        relaxation = (float(self.temperature), self.straight_through) if self.training else None
        return Categoricals(h.unflatten(-1, (self.variables, self.categories)), relaxation)


def categorical_posterior(config) -> CategoricalPosterior:
    """The ``categorical`` posterior that ``config`` describes."""
    return CategoricalPosterior(config.latent_dim, config.categories, config.straight_through, config.temperature)


class UniformPrior(nn.Module):
    """p(z) = prod_j Uniform(K): built as ``(variables, x_shape, categories, seed)`` (``parts.PRIORS``)."""

    def __init__(self, latent_dim: int, x_shape=None, components: int = 2, seed: int = 0):
        super().__init__()
        self.register_buffer("zeros", torch.zeros(latent_dim, components), persistent=False)

    def forward(self, encode) -> Categoricals:
        return Categoricals(self.zeros)


def temperature_at(config, step: int) -> float:
    """tau at optimiser step ``step``: max(temperature_min, temperature exp(-anneal_rate step))."""
    return max(config.temperature_min, config.temperature * math.exp(-config.anneal_rate * step))


def categorical_posterior_of(model) -> CategoricalPosterior | None:
    """The categorical posterior of ``model``, or None (any other model, or not an ``nn.Module``)."""
    modules = model.modules() if isinstance(model, nn.Module) else ()
    return next((m for m in modules if isinstance(m, CategoricalPosterior)), None)


@contextlib.contextmanager
def relaxed(model: nn.Module):
    """Within: the categorical posteriors of ``model`` draw relaxed z at their temperature (the model as it
    trained), whatever the model's mode; after: as they were."""
    posteriors = [m for m in model.modules() if isinstance(m, CategoricalPosterior)]
    modes = [m.training for m in posteriors]
    try:
        for m in posteriors:
            m.train()
        yield model
    finally:
        for m, mode in zip(posteriors, modes, strict=True):
            m.train(mode)
