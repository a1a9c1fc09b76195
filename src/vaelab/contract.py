r"""The contract between a model and everything that measures it: its latent layers, the noise they
are drawn from, and the terms of the ELBO they give. Types only, no estimator: ``models/`` builds on
this module, ``objectives.py`` (the ELBO, the IWAE bound, the losses) reads it.

A model (:class:`LatentVariableModel`) hands over its latent layers, each with q, p and the sample z
(:class:`LatentLayer`), and log p(x|z) for them; the measures and the pictures use its views too
(:class:`ModelViews`: the layers' sizes, the image shape, the top layer's q, p(x|z), p(z) and a
reconstruction). ``OneLayer`` makes the contract of a model written as encode / decode / prior;
``Given`` binds a conditional model's labels, so nothing downstream sees them: the data travel as
:class:`Examples` (images and the labels the model is given), whose :meth:`Examples.batches` binds
each batch's labels, the one place a measure meets them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, final, runtime_checkable

import torch
from torch import Tensor
from torch.distributions import Distribution

from vaelab.distributions import base_loc, reparametrize
from vaelab.kl import KLResult, diag_normal_params, kl_q_p, kl_sampled

Draw = Callable[[Distribution], Tensor]  # q -> a reparametrised sample z ~ q (maybe with leading sample dims)


@dataclass(frozen=True)
class LatentLayer:
    """One stochastic layer of a model on one batch: q(z_l | x, z_>l), p(z_l | z_>l), and the
    sample z_l ~ q that the reconstruction term and the layers below it use. (B, D_l), or
    (n, B, D_l) with n samples per example."""

    name: str
    q: Distribution
    p: Distribution
    z: Tensor
    # False where p(z_l | ...) is evaluated at a layer drawn *after* z_l (bottom-up inference: p(z1|z2) with
    # z2 ~ q(z2|z1)): there the closed form at that draw is biased, and the KL is log q(z_l) - log p(z_l)
    closed_form: bool = True

    def kl(self) -> KLResult:
        """This layer's KL term per example: :func:`kl.kl_q_p`, or :func:`kl.kl_sampled` at z."""
        return kl_q_p(self.q, self.p, self.z) if self.closed_form else kl_sampled(self.q, self.p, self.z)


@runtime_checkable
class LatentVariableModel(Protocol):
    """What the objectives ask of a model (vaelab's VAE, or any class with these two methods)."""

    def latents(self, x: Tensor, draw: Draw) -> list[LatentLayer]:
        """Inference on ``x``: the latent layers, top first, each sample drawn with ``draw(q)``."""
        ...

    def log_px_given_z(self, layers: list[LatentLayer], x: Tensor) -> Tensor:
        """log p(x | z) for the layers' samples, summed over pixels: (B,), or (n, B) for n samples."""
        ...


@runtime_checkable
class ModelViews(Protocol):
    """What the measures (``evaluation``) and the pictures (``report``, the page) read of a trained model
    besides the contract: every family in ``parts.FAMILIES`` has these (tested), and ``Given`` keeps them."""

    layer_dims: dict[str, int]  # the latent layers by name, top first
    latent_dim: int  # the top layer's dimensions (categorical variables or VQ positions: their number)
    x_shape: tuple[int, ...]  # (C, H, W)

    def encode(self, x: Tensor) -> Distribution:
        """q(z_top | x)."""
        ...

    def decode(self, z: Tensor) -> Distribution:
        """p(x | z_top) (with several layers: through the means of the layers below)."""
        ...

    def prior(self) -> Distribution:
        """p(z_top)."""
        ...

    def reconstruct(self, x: Tensor) -> Tensor:
        """The mean of p(x|z) at the posterior's mean: what the report and the page show."""
        ...


@final
class OneLayer:
    """A model with ``encode(x) -> q(z|x)``, ``decode(z) -> p(x|z)`` and ``prior() -> p(z)``, wrapped
    into the contract: one latent layer named ``z``. For models written in that classic form."""

    def __init__(self, model):
        self.model = model

    def latents(self, x: Tensor, draw: Draw) -> list[LatentLayer]:
        q_z = self.model.encode(x)
        return [LatentLayer("z", q_z, self.model.prior(), draw(q_z))]

    def log_px_given_z(self, layers: list[LatentLayer], x: Tensor) -> Tensor:
        (layer,) = layers
        if layer.z.dim() == 2:
            return self.model.decode(layer.z).log_prob(x)
        n, B = layer.z.shape[:2]  # n samples per example: decode them as one batch
        x_rep = x.unsqueeze(0).expand(n, *x.shape).reshape(n * B, *x.shape[1:])
        return self.model.decode(layer.z.flatten(0, 1)).log_prob(x_rep).view(n, B)


@final
class Given:
    """A conditional model (``latents(x, draw, y)``, ``encode(x, y)``, ``decode(z, y)``) with the labels
    ``y`` of one batch bound: the plain contract and views, for the objectives and the pictures."""

    def __init__(self, model, y: Tensor):
        self.model, self.y = model, y
        # the layers given the labels (M2's label is a layer of its own only where it is missing)
        self.layer_dims = getattr(model, "given_layer_dims", model.layer_dims)
        self.latent_dim, self.x_shape = model.latent_dim, model.x_shape

    def latents(self, x: Tensor, draw: Draw) -> list[LatentLayer]:
        return self.model.latents(x, draw, self.y)

    def log_px_given_z(self, layers: list[LatentLayer], x: Tensor) -> Tensor:
        return self.model.log_px_given_z(layers, x, self.y)

    def encode(self, x: Tensor) -> Distribution:
        return self.model.encode(x, self.y)

    def decode(self, z: Tensor) -> Distribution:
        return self.model.decode(z, self.y)

    def prior(self) -> Distribution:
        return self.model.prior()

    def reconstruct(self, x: Tensor) -> Tensor:
        return self.model.reconstruct(x, self.y)


def given(model, y: Tensor | None):
    """``model`` with the labels ``y`` bound (:class:`Given`), or ``model`` itself when there are none
    (every model that is not conditional)."""
    return model if y is None else Given(model, y)


@final
@dataclass(frozen=True)
class Examples:
    """Images (N, ...) and the labels (N,) the model is given with them; ``y`` None for a model that takes
    none. What the measures and the training loop take: the labels travel with their images."""

    x: Tensor
    y: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, rows) -> Examples:
        return Examples(self.x[rows], None if self.y is None else self.y[rows])

    def to(self, device) -> Examples:
        return Examples(self.x.to(device), None if self.y is None else self.y.to(device))

    def batches(self, model, size: int) -> Iterator[tuple[Tensor, object]]:
        """``(x, model)`` for each batch of ``size`` in order, the model with the batch's labels bound."""
        for start in range(0, len(self), size):
            part = self[start : start + size]
            yield part.x, given(model, part.y)


def examples(data: Tensor | Examples) -> Examples:
    """``data`` as :class:`Examples`: images alone have no labels."""
    return data if isinstance(data, Examples) else Examples(data)


@dataclass(frozen=True)
class ElboTerms:
    """Per-example terms of the ELBO, in nats. Shapes: (B,), and (B, D) for ``kl_per_dim``.

    ``kl`` is the total over latent layers and ``kl_per_layer`` each layer's part, by name.
    ``kl_method`` is ``"analytic"`` (closed form) or ``"monte_carlo"`` (single-sample
    estimate at the same z as the reconstruction) when any layer has no closed form.
    ``kl_per_dim`` (the layers' dimensions in order) is None when a layer's KL does not
    factorise over dimensions (mixture, VampPrior).
    """

    reconstruction: Tensor  # E_q[log p(x|z)], (B,)
    kl: Tensor  # KL(q(z|x) || p(z)), (B,)
    kl_per_dim: Tensor | None  # (B, D)
    kl_method: str
    kl_per_layer: dict[str, Tensor] = field(default_factory=dict)  # (B,) each
    # the KL taken apart by the minibatch estimator of --objective tc: mutual_information,
    # total_correlation, dimension_wise_kl, (B,) each; empty for the other objectives
    kl_parts: dict[str, Tensor] = field(default_factory=dict)
    # a loss that trains the model and is not part of the ELBO, (B,): VQ-VAE's commitment term; None without
    auxiliary: Tensor | None = None

    @property
    def elbo(self) -> Tensor:
        return self.reconstruction - self.kl

    @classmethod
    def of_layers(cls, reconstruction: Tensor, kls: dict[str, KLResult]) -> ElboTerms:
        """The terms from log p(x|z) and each layer's KL."""
        parts = list(kls.values())
        total = parts[0].value if len(parts) == 1 else torch.stack([k.value for k in parts]).sum(0)
        factorises = all(k.per_dim is not None for k in parts)
        per_dim = (
            (parts[0].per_dim if len(parts) == 1 else torch.cat([k.per_dim for k in parts], -1)) if factorises else None
        )
        method = "analytic" if all(k.method == "analytic" for k in parts) else "monte_carlo"
        return cls(reconstruction, total, per_dim, method, {name: k.value for name, k in kls.items()})


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
        """A reparametrised z ~ q_z, (*sample_shape, B, D), from this process's rows of the noise."""
        B = q_z.batch_shape[0]
        (D,) = q_z.event_shape
        loc = base_loc(q_z)  # for the device and dtype
        eps = torch.randn((*sample_shape, self.total, D), generator=self.generator, device=loc.device, dtype=loc.dtype)
        eps = eps[..., self.start : self.start + B, :]
        params = diag_normal_params(q_z)
        if params is not None:
            mu, log_var = params  # (B, D)
            return mu + torch.exp(0.5 * log_var) * eps
        return reparametrize(q_z, eps)
