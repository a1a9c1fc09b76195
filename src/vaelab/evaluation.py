"""Measuring a trained VAE the way papers do, and reading its KL term.

All values are nats per example unless named otherwise. Each metric is a function;
:func:`evaluate` gathers them into one record (a dict, written as JSON by the CLI).

- ELBO terms: the batch-mean reconstruction, KL, KL per dimension (as in training).
- ``log_likelihood``: the IWAE-k estimate (Burda et al. 2015)
  log p(x) ~ logsumexp_i [log p(x|z_i) + log p(z_i) - log q(z_i|x)] - log k, z_i ~ q(z|x);
  a lower bound in expectation that tightens as k grows. Computed in chunks of samples
  with a running logsumexp, so memory does not grow with k.
- ``active_units``: dimension j is active when Cov_x(E_q[z_j | x]) > 0.01 (Burda et al. 2015).
- The KL split (Hoffman & Johnson 2016): E_x KL(q(z|x) || p(z)) = I_q(x; z) + KL(q(z) || p(z)),
  q(z) = 1/N sum_n q(z|x_n) the aggregate posterior of the N evaluated examples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.distributions import Distribution, MultivariateNormal

from vaelab import distributed, rundir
from vaelab.checkpoint import check_identity, check_owner, load_run
from vaelab.config import Config
from vaelab.contract import Examples, examples, given
from vaelab.data import Splits, binarize_static, labels_for, prepare_data
from vaelab.data.batches import seeded, shard_rows
from vaelab.decomposition import KLParts, decompose_categorical, decompose_full_data, full_data_mixture
from vaelab.distributions import diag_normal, marginals
from vaelab.errors import UserError
from vaelab.fileio import atomic_write_text
from vaelab.gaps import families_for, posterior_gaps, refined
from vaelab.kl import (
    KLResult,
    correlation_kl,
    diag_normal_params,
    kl_closed_form,
    kl_monte_carlo,
    kl_normal_normal,
    rng_from,
)
from vaelab.memory import available
from vaelab.models.categorical import categorical_posterior_of, relaxed
from vaelab.models.m2 import m2_of
from vaelab.models.vq import vq_posterior_of
from vaelab.objectives import (
    bits_per_dim,
    collapse_warning,
    collapsed_layers,
    elbo,
    log_importance_weights,
    rsample,
)
from vaelab.parts import FAMILIES, POSTERIORS

ACTIVE_THRESHOLD = 0.01


# Pixels x samples x images per chunk of importance samples: 2^21 float32 (8 MiB), within a last-level cache.
# Measured (AMD EPYC family 26, 32 MiB L3, 2 threads, k=5000, 100 images of 784 pixels), against the
# straightforward estimator: 2,500 rows of logits 2.3x, 5,000 rows 2.4x, 10,000 1.6x, 50,000 (a fixed
# chunk of 500 samples, as before) 1.3-1.4x.
CHUNK_VALUES = 2**21


@torch.no_grad()
def iwae_chunk(x: Tensor, batch_size: int, k: int) -> int:
    """How many of the k samples :func:`iwae_log_likelihood` draws at once: on the CPU, chunk x batch x
    pixels about ``CHUNK_VALUES`` (the decoder's outputs stay in cache); on a GPU, as many as a quarter of
    its free memory holds at 32 bytes per sample, example and pixel (the decoder's output, the likelihood's
    terms and their gradients' room), at most k."""
    per_sample = max(1, min(batch_size, len(x))) * x.shape[1:].numel()
    if x.device.type != "cuda":
        return max(1, CHUNK_VALUES // per_sample)
    return max(1, min(k, available(x.device) // 4 // (32 * per_sample)))


@torch.no_grad()
def iwae_log_likelihood(
    model, data: Tensor | Examples, k: int, batch_size: int = 100, chunk: int | None = None
) -> Tensor:
    """IWAE-k estimate of log p(x) per example of ``data`` (images, or :class:`contract.Examples`: of
    log p(x|y) for a conditional model given the labels y), shape (N,), float64.

    Draws the k samples ``chunk`` at a time (the joint weights over every latent layer,
    :func:`objectives.log_importance_weights`) and folds each chunk into a running
    logsumexp: memory is O(batch_size * chunk * pixels), whatever k. By default chunk x batch x
    pixels is about ``CHUNK_VALUES`` (the decoder's outputs, for a likelihood with one parameter per
    pixel), so that the decoder's last matrix product writes them, and the likelihood reads them,
    in the CPU's cache. Without gradients, whoever calls it: a graph kept across the chunks and batches
    would hold every decoder output, memory growing with N x k.
    """
    data = examples(data)
    if chunk is None:
        chunk = iwae_chunk(data.x, batch_size, k)
    out = []
    for xb, model_b in data.batches(model, batch_size):
        # float64 from here: log p(x) is hundreds of nats, where float32's spacing is 6e-5
        running = torch.full((xb.shape[0],), -math.inf, device=xb.device, dtype=torch.float64)
        done = 0
        while done < k:
            n = min(chunk, k - done)
            log_w = log_importance_weights(model_b, xb, lambda q, n=n: q.sample((n,)))  # (n, B)
            running = torch.logaddexp(running, torch.logsumexp(log_w.double(), 0))
            done += n
        out.append(running - math.log(k))
    return torch.cat(out)


@torch.no_grad()
def kl_per_example(
    model, data: Tensor | Examples, samples: int = 256, seed: int = 0, batch_size: int = 100
) -> KLResult:
    """The model's own KL term for each example of ``data`` (images, or :class:`contract.Examples` with
    a conditional model's labels), drawn from a generator seeded by ``seed``.

    One latent layer, KL(q(z|x) || p(z)): the closed form where the pair has one (per dimension too
    where both factorise), else the mean of ``samples`` draws of log q(z|x) - log p(z) with its
    standard error (sd / sqrt(samples)).

    Several layers, sum_l E_q KL(q(z_l | x, z_>l) || p(z_l | z_>l)): each layer's KL in closed form
    (Monte Carlo where its pair has none) at each of ``samples`` draws of the layers above, averaged;
    ``std_error`` is the standard error of that average, ``per_layer`` each layer's part.
    """
    generator = torch.Generator().manual_seed(seed)
    data = examples(data)
    layers = list(given(model, data.y).layer_dims)
    return _cat_kl([_kl_of_batch(m, xb, samples, generator, layers) for xb, m in data.batches(model, batch_size)])


def _kl_of_batch(
    model, x: Tensor, samples: int, generator: torch.Generator, layers: list[str], q: Distribution | None = None
) -> KLResult:
    """:func:`kl_per_example` of one batch (``model``: its labels bound; ``layers``: the names of the layers
    the measure sees, top first; ``q``: q(z|x) of a one-layer model where the caller has it), each layer's part
    by name: one entry for one layer."""
    if len(layers) > 1:
        return _kl_of_layers(model, x, samples, generator)
    q_z, p_z = model.encode(x) if q is None else q, model.prior()
    part = kl_closed_form(q_z, p_z)
    if part is None:
        value, std_error = kl_monte_carlo(q_z, p_z, samples, generator)
        part = KLResult(value, "monte_carlo", std_error=std_error)
    return replace(part, per_layer={layers[0]: part.value})


def _cat_kl(parts: list[KLResult]) -> KLResult:
    """The KL of every example from the batches' ``parts`` (each with its layers' parts)."""

    def cat(name: str) -> Tensor | None:
        return None if getattr(parts[0], name) is None else torch.cat([getattr(r, name) for r in parts])

    layers = {k: torch.cat([r.per_layer[k] for r in parts]) for k in parts[0].per_layer}
    return KLResult(cat("value"), parts[0].method, cat("per_dim"), cat("std_error"), layers)


def _kl_of_layers(model, x: Tensor, samples: int, generator: torch.Generator) -> KLResult:
    """Each layer's KL at ``samples`` draws of the layers above it (:func:`kl_per_example`)."""
    with rng_from(generator):
        layers = model.latents(x, lambda q: q.sample((samples,)))
    B = x.shape[0]
    kls = {layer.name: layer.kl() for layer in layers}  # (B,) for the top, (samples, B) below
    values = {name: k.value.expand(samples, B) for name, k in kls.items()}
    total = torch.stack(list(values.values())).sum(0)
    factorises = all(k.per_dim is not None for k in kls.values())
    return KLResult(
        total.mean(0),
        "analytic" if all(k.method == "analytic" for k in kls.values()) else "monte_carlo",
        torch.cat([k.per_dim.expand(samples, *k.per_dim.shape[-2:]).mean(0) for k in kls.values()], -1)
        if factorises
        else None,
        total.std(0) / math.sqrt(samples),
        {name: v.mean(0) for name, v in values.items()},
    )


@torch.no_grad()
def layer_means(
    model, data: Tensor | Examples, top: Tensor, samples: int = 16, batch_size: int = 1000
) -> dict[str, Tensor]:
    """E_q[z_l | x] of each latent layer for every example of ``data``, (N, D_l) each, by name, top first:
    ``top`` for the top layer (its posterior means, :func:`posterior_params`), and for each layer below the
    mean of q(z_l | x, z_>l) averaged over ``samples`` draws of the layers above (global RNG)."""
    data = examples(data)
    top_name, *below = given(model, data.y).layer_dims  # given labels, M2's layers are the conditional VAE's
    parts = [_lower_means(m, xb, samples) for xb, m in data.batches(model, batch_size)] if below else []
    return {top_name: top, **{name: torch.cat([p[name] for p in parts]) for name in below}}


def _lower_means(model, x: Tensor, samples: int) -> dict[str, Tensor]:
    """E_q[z_l | x] of each layer below the top, (B, D_l), averaged over ``samples`` draws of the layers above."""
    layers = model.latents(x, lambda q: q.sample((samples,)))[1:]
    return {layer.name: marginals(layer.q)[0].mean(0) for layer in layers}  # (samples, B, D) -> (B, D)


@torch.no_grad()
def posterior_params(model, data: Tensor | Examples, batch_size: int = 1000) -> tuple[Tensor, Tensor, Tensor | None]:
    """(mu, log_var) of each marginal q(z_j|x) (of the top latent layer; q(z_j|x, y) given labels) for
    every example of ``data``, each (N, D), and the Cholesky factors (N, D, D) of a full-covariance q
    (None for a diagonal one)."""
    return _cat_params([_posterior_params(m.encode(xb)) for xb, m in examples(data).batches(model, batch_size)])


def _posterior_params(q: Distribution) -> tuple[Tensor, Tensor, Tensor | None]:
    """(mu, log_var) of q's marginals, (B, D) each, and its Cholesky factors (B, D, D) (None: diagonal)."""
    mu, var = marginals(q)
    return mu, var.log(), q.scale_tril if isinstance(q, MultivariateNormal) else None


def _cat_params(parts: list[tuple[Tensor, Tensor, Tensor | None]]) -> tuple[Tensor, Tensor, Tensor | None]:
    mus, log_vars, trils = zip(*parts, strict=True)
    return torch.cat(mus), torch.cat(log_vars), None if trils[0] is None else torch.cat(trils)


@dataclass(frozen=True)
class Measured:
    """What :func:`measure` takes from one pass over the examples, per example."""

    reconstruction: Tensor  # E_q[log p(x|z)] at one z ~ q, (N,)
    kl: KLResult  # the model's KL term (:func:`kl_per_example`)
    top: tuple[Tensor, Tensor, Tensor | None] | None  # the top layer's (mu, log_var, scale_tril); None: not asked
    means: dict[str, Tensor] | None  # E_q[z_l | x] of each layer, top first; None: not asked


@torch.no_grad()
def measure(
    model, data: Tensor | Examples, seed: int = 0, posteriors: bool = True, batch_size: int = 1024, samples: int = 256
) -> Measured:
    """One pass over ``data`` (each batch's labels bound once) for the per-example measures of a model:
    the reconstruction at one z ~ q (drawn from the global RNG seeded by ``seed``), the KL term
    (:func:`kl_per_example`, its ``samples`` draws from a generator seeded by ``seed``) and, with
    ``posteriors``, the top layer's posterior parameters (:func:`posterior_params`) and each layer's mean
    (:func:`layer_means`), drawn from the named stream ``posterior``. Each measure draws from its own
    stream; the caller's RNG and the model's mode are left as they were."""
    data, was_training = examples(data), model.training
    kl_draws, posterior_draws = torch.Generator().manual_seed(seed), seeded(seed, "posterior")
    layers = list(given(model, data.y).layer_dims)
    reconstruction, kls, params, means = [], [], [], []
    model.eval()
    try:
        with torch.random.fork_rng(devices=[data.x.device] if data.x.device.type == "cuda" else []):
            torch.manual_seed(seed)
            for xb, model_b in data.batches(model, batch_size):
                drawn = model_b.latents(xb, rsample)  # the ELBO's z, one per example
                reconstruction.append(model_b.log_px_given_z(drawn, xb))
                q = drawn[0].q if len(layers) == 1 else None  # one layer: the q the KL and posteriors read
                kls.append(_kl_of_batch(model_b, xb, samples, kl_draws, layers, q))
                if posteriors:
                    with rng_from(posterior_draws):  # a flow's moments; the layers below the top
                        params.append(_posterior_params(model_b.encode(xb) if q is None else q))
                        means.append(_lower_means(model_b, xb, 16))
    finally:
        model.train(was_training)
    top = _cat_params(params) if posteriors else None
    layer_means = {layers[0]: top[0], **{n: torch.cat([m[n] for m in means]) for n in layers[1:]}} if top else None
    return Measured(torch.cat(reconstruction), _cat_kl(kls), top, layer_means)


def activity(mu: Tensor) -> Tensor:
    """Cov_x(E_q[z_j | x]) per dimension: the variance over examples of the posterior means."""
    return mu.var(0, unbiased=len(mu) > 1)  # (one example: 0, nothing varies)


@torch.no_grad()
def decompose_kl(
    model, mu: Tensor, log_var: Tensor, chunk: int = 256, scale_tril: Tensor | None = None
) -> tuple[KLSplit, Tensor]:
    r"""Take the average KL apart, with one sample z_n ~ q(z|x_n) per example and the aggregate
    posterior q(z) = 1/N sum_m q(z|x_m) over all N evaluated examples (``decomposition.py``):

        I_q(x; z)        ~ 1/N sum_n [log q(z_n|x_n) - log q(z_n)]             (Hoffman & Johnson 2016)
        KL(q(z) || p(z)) ~ 1/N sum_n [log q(z_n) - log p(z_n)]
                         = total correlation + dimension-wise KL               (Chen et al. 2018)

    the last split where the prior factorises (a diagonal Gaussian). The parts add up exactly to
    the Monte Carlo estimate 1/N sum_n [log q(z_n|x_n) - log p(z_n)] of the average KL. Bias: I is
    at most log N (it saturates when the encoder separates examples well), and log q(z_n)
    includes the example's own component; both fade as N grows. Cost O(N^2 D), in chunks.

    ``scale_tril``: the Cholesky factors of full-covariance posteriors (mu, log_var then hold
    their marginals): the joint densities come from them, the marginal mixtures from the marginals.

    Returns the :class:`KLSplit` and the per-example single-sample KL ``log q(z_n|x_n) - log p(z_n)``.
    """
    q_all = diag_normal(mu, log_var) if scale_tril is None else MultivariateNormal(mu, scale_tril=scale_tril)
    z = q_all.sample()  # (N, D), one z_n per example
    log_q_pairs = None if scale_tril is None else (lambda rows: q_all.log_prob(z[rows].unsqueeze(1)))
    p_z = model.prior()
    prior = diag_normal_params(p_z)

    if prior is not None:  # p(z) = prod_j p(z_j): MI + TC + dimension-wise KL
        parts = decompose_full_data(z, mu, log_var, chunk, tuple(t.expand_as(z) for t in prior), log_q_pairs)
        return KLSplit.of(parts.mutual_information, parts.kl, parts), parts.kl
    # a prior that does not factorise: MI + marginal KL
    log_q_own = q_all.log_prob(z)
    log_q_z, _, _ = full_data_mixture(z, mu, log_var, chunk, log_q_pairs)
    total = log_q_own - p_z.log_prob(z)
    return KLSplit.of(log_q_own - log_q_z, total), total


@torch.no_grad()
def decompose_kl_categorical(log_probs: Tensor, chunk: int = 256) -> tuple[KLSplit, Tensor]:
    """:func:`decompose_kl` for categorical posteriors, log q(z_j = k | x_n) (N, V, K), against the uniform
    prior: one z_n ~ q(z|x_n) per example (global RNG), q(z) the mixture of the N posteriors, its
    marginals q(z_j) exact (``decomposition.decompose_categorical``): MI + TC + dimension-wise KL."""
    index = torch.distributions.Categorical(logits=log_probs).sample()  # (N, V)
    parts = decompose_categorical(index, log_probs, log_probs, chunk)
    return KLSplit.of(parts.mutual_information, parts.kl, parts), parts.kl


@dataclass(frozen=True)
class KLSplit:
    """The average KL of N examples taken apart (:func:`decompose_kl`): each part's mean and its standard
    error over the examples. ``total_correlation`` and ``dimension_wise_kl`` (they add up to
    ``marginal_kl``) only where the prior factorises."""

    mutual_information: float
    mutual_information_std_error: float
    marginal_kl: float
    marginal_kl_std_error: float
    kl_monte_carlo: float  # the single-sample estimate of the average KL that the parts add up to
    kl_monte_carlo_std_error: float
    examples: int
    total_correlation: float | None = None
    total_correlation_std_error: float | None = None
    dimension_wise_kl: float | None = None
    dimension_wise_kl_std_error: float | None = None
    dimension_wise_kl_per_dim: list[float] | None = None

    @property
    def adds_up(self) -> bool:
        """MI + TC + dimension-wise KL (MI + marginal KL without them) = the single-sample KL, to 1e-3 nats."""
        rest = self.marginal_kl if self.total_correlation is None else self.total_correlation + self.dimension_wise_kl
        return abs(self.mutual_information + rest - self.kl_monte_carlo) < 1e-3

    @classmethod
    def of(cls, mi: Tensor, total: Tensor, parts: KLParts | None = None) -> KLSplit:
        """From each example's MI and single-sample KL, and, where the prior factorises, the
        :class:`KLParts` that add up to them."""
        N = len(total)

        def se(t: Tensor) -> float:
            return t.std(correction=min(1, N - 1)).item() / math.sqrt(N)  # (one example: 0, no spread to see)

        terms = {}
        if parts is not None:
            tc, dwkl = parts.total_correlation, parts.dimension_wise_kl_per_dim
            terms = dict(
                total_correlation=tc.mean().item(),
                total_correlation_std_error=se(tc),
                dimension_wise_kl=dwkl.sum(-1).mean().item(),
                dimension_wise_kl_std_error=se(dwkl.sum(-1)),
                dimension_wise_kl_per_dim=dwkl.mean(0).tolist(),
            )
        marginal = total - mi
        return cls(
            mi.mean().item(), se(mi), marginal.mean().item(), se(marginal), total.mean().item(), se(total), N, **terms
        )


@torch.no_grad()
def categorical_log_probs(model, x: Tensor, batch_size: int = 1000) -> Tensor:
    """log q(z_j = k | x) of a categorical posterior for every example, (N, V, K)."""
    return torch.cat([model.encode(x[i : i + batch_size]).log_probs for i in range(0, len(x), batch_size)])


@dataclass
class Evaluation:
    """Every metric of one split, nats per example unless named otherwise; ``evaluation.json``."""

    examples: int
    elbo: float
    reconstruction: float
    kl: float
    kl_method: str  # "analytic", or "monte_carlo" where the prior has no closed-form KL
    kl_per_dim: list[float] | None  # None where the prior does not factorise
    activity: list[float]  # Cov_x(E_q[z_j | x]) per dimension (of every layer, top first)
    active_units: int
    active_threshold: float = ACTIVE_THRESHOLD
    # several latent layers: each one's KL and active units, and the layers whose KL is ~0
    kl_per_layer: dict[str, float] | None = None
    active_units_per_layer: dict[str, int] | None = None
    collapsed_layers: list[str] | None = None
    # the KL split (of the top layer's KL), where the posterior is Gaussian
    mutual_information: float | None = None  # I_q(x; z)
    marginal_kl: float | None = None  # KL(q(z) || p(z)) = total correlation + dimension-wise KL
    kl_split: dict | None = None  # the decomposition's estimator, its checks and their standard errors
    kl_estimator: dict | None = None  # the analytic KL beside a single-sample Monte Carlo one
    # a full-covariance q against a diagonal prior: KL = sum_j KL(q(z_j|x) || p(z_j)) + correlation_kl
    kl_of_marginals_per_dim: list[float] | None = None
    correlation_kl: float | None = None
    total_correlation: float | None = None  # KL(q(z) || prod_j q(z_j)), where the prior factorises
    dimension_wise_kl: float | None = None  # sum_j KL(q(z_j) || p(z_j))
    dimension_wise_kl_per_dim: list[float] | None = None
    kl_std_error: float | None = None  # a Monte Carlo KL's standard error
    bits_per_dim: float | None = None  # discrete likelihoods
    log_likelihood: float | None = None  # the IWAE-k estimate of log p(x)
    log_likelihood_std_error: float | None = None
    iwae_k: int | None = None
    log_likelihood_bits_per_dim: float | None = None
    # what was evaluated (set by evaluate_run)
    data: str | None = None
    split: str | None = None
    binarize: str | None = None
    seed: int | None = None
    likelihood: str | None = None
    prior: str | None = None
    conditional: bool | None = None  # given the labels: log p(x|y), KL(q(z|x, y) || p(z))
    weights_sha256: str | None = None  # of the model.safetensors evaluated: a record of other weights is stale
    kl_per_image_quantiles: dict[str, float] | None = None  # the per-image KL's 10%, 50% and 90% quantiles
    # --posterior categorical: the metrics above are the discrete model's (one-hot z); the relaxed model that
    # trained, at the temperature its weights ended at, has this ELBO (None for --straight-through, which
    # trained on one-hot z); the KL is at most kl_ceiling = N log K
    relaxed_elbo: float | None = None
    temperature: float | None = None
    categories: int | None = None
    kl_ceiling: float | None = None
    # --posterior vq: the codes' frequencies over the evaluated images (every position), the number of codes
    # they amount to, exp(entropy), and the codes no image uses
    codebook_usage: list[float] | None = None
    codebook_perplexity: float | None = None
    dead_codes: int | None = None
    # semi-supervised M2 (scored without labels, y summed out): its classifier's accuracy on these images'
    # labels, and how many training labels it had
    accuracy: float | None = None
    labelled: int | None = None
    # `evaluate --gaps N`: the posterior gap of the first N images split into approximation and amortization
    # (gaps.Gaps.summary: L[q], L[q*] per family, log p(x), each gap, each with its standard error)
    gaps: dict | None = None
    # `evaluate --refine K`: the ELBO after K steps of optimising q per image from the encoder's output, beside
    # the encoder's, the gain with its standard error, and the cost (gaps.refined)
    refined: dict | None = None

    RUN_FIELDS = ("data", "split", "binarize", "seed", "likelihood", "prior", "conditional", "weights_sha256")

    def to_dict(self) -> dict:
        """The record for JSON: what was evaluated first, then the metrics; absent values left out."""
        optional = {f.name for f in fields(self) if f.default is None}
        values = {k: v for k, v in asdict(self).items() if v is not None or k not in optional}
        return {**{k: values[k] for k in self.RUN_FIELDS if k in values}, **values}

    @classmethod
    def from_dict(cls, values: dict) -> Evaluation:
        """The record from its JSON, each field checked against its type (a hand-edited or torn file
        raises TypeError naming the field)."""
        hints = typing.get_type_hints(cls)
        kept = {f.name: values[f.name] for f in fields(cls) if f.name in values}
        for name, value in kept.items():
            if not _is(value, hints[name]):
                raise TypeError(f"{name} is {value!r}")
        return cls(**kept)


def _is(value, kind) -> bool:
    """Whether a JSON value fits a field's type (float takes an int; bool is not a number)."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if origin in (str, bool, dict) and isinstance(value, origin):
            return True
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(option) or (object,)
            return item is object or all(_is(v, item) for v in value)
    return False


@torch.no_grad()
def evaluate(
    model,
    data: Tensor | Examples,
    *,
    iwae_k: int = 5000,
    batch_size: int = 100,
    seed: int = 0,
    pixels: int | None = None,
    take_kl_apart: bool = True,
) -> tuple[Evaluation, dict[str, Tensor]]:
    """Every metric for ``data``: images (already binarised where the likelihood needs it), or
    :class:`contract.Examples` with the labels a conditional model is given (then the likelihood is
    log p(x|y) and the KL is of q(z|x, y)).

    ``take_kl_apart``: take the KL apart (:func:`decompose_kl`, :func:`decompose_kl_categorical`); it needs Gaussian
    or categorical posteriors, whose aggregate has a density (not a flow's); a VQ-VAE's constant KL is
    never split. With several latent layers it takes apart the top layer's KL, KL(q(z_top|x) || p(z_top)),
    where inference is top-down (bottom-up, q(z2|x) is a mixture over z1 without a density to split).

    Returns the record and per-example tensors (elbo, reconstruction, kl, kl_std_error,
    log_likelihood, kl_per_dim, where the run has them) for ``--per-example``.
    """
    data, was_training = examples(data), model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[data.x.device] if data.x.device.type == "cuda" else []):
            return _evaluate(model, data, iwae_k, batch_size, seed, pixels, take_kl_apart)
    finally:  # the caller's RNG state (forked above) and the model's mode are as they were
        model.train(was_training)


def _evaluate(
    model, data: Examples, iwae_k, batch_size, seed, pixels, take_kl_apart
) -> tuple[Evaluation, dict[str, Tensor]]:
    """:func:`evaluate`'s measures, each drawing from its own stream: the ELBO's terms and the KL from
    ``seed``; the IWAE estimate from ``seed`` + rank; the posteriors' parameters and the KL split from
    the named streams ``posterior`` and ``kl-split``, so that neither depends on ``--iwae-k`` or on
    the number of processes."""
    torch.manual_seed(seed)
    N, x = len(data), data.x
    if vq_posterior_of(model) is not None:  # a point-mass q: every importance weight is the same, IWAE = ELBO
        iwae_k = 0
    posterior, vq, m2 = categorical_posterior_of(model), vq_posterior_of(model), m2_of(model)
    # one pass: E_q[log p(x|z)] at one z per example; the KL in closed form, or from many samples where it has
    # none; a Gaussian top layer's posteriors and each layer's means
    measured = measure(model, data, seed, posteriors=posterior is None and vq is None and m2 is None)
    reconstruction, kl = measured.reconstruction, measured.kl
    per = {"elbo": reconstruction - kl.value, "reconstruction": reconstruction, "kl": kl.value}
    per |= {name: v for name, v in (("kl_std_error", kl.std_error), ("kl_per_dim", kl.per_dim)) if v is not None}
    per |= {f"kl_{name}": value for name, value in kl.per_layer.items()} if kl.layered else {}
    likelihood = {}
    if iwae_k > 0:
        per["log_likelihood"] = ll = _shared_iwae(model, data, iwae_k, batch_size, seed)
        likelihood = dict(
            log_likelihood=ll.mean().item(),
            log_likelihood_std_error=ll.std().item() / math.sqrt(N) if N > 1 else None,  # one image: no spread
            iwae_k=iwae_k,
            log_likelihood_bits_per_dim=bits_per_dim(ll.mean().item(), pixels) if pixels else None,
        )
    act, acts, means, top, log_probs, codebook = _activities(model, data, seed, measured)
    layered = {}
    if len(means) > 1:  # each layer's KL and active units; a layer whose KL is ~0 has collapsed
        kl_layers = {name: v.mean().item() for name, v in kl.per_layer.items()}
        layered = dict(
            kl_per_layer=kl_layers,
            active_units_per_layer={name: int((a > ACTIVE_THRESHOLD).sum()) for name, a in acts.items()},
            collapsed_layers=collapsed_layers(kl_layers),
        )
    split_parts, relaxation = {}, {}
    # VQ-VAE's KL is N log K for every image: nothing to take apart; bottom-up inference has no q(z2|x) to split
    if take_kl_apart and vq is None and getattr(model, "inference", "top-down") == "top-down":
        with rng_from(seeded(seed, "kl-split")):
            split_parts = (  # a categorical top layer (categorical variables, M2's label) by its own estimator
                _decompose_top_layer(model, x, kl, top)
                if posterior is None and m2 is None
                else _decomposition_fields(kl, *decompose_kl_categorical(log_probs))
            )
    if posterior is not None:  # the relaxed model that trained, beside the discrete one evaluated
        relaxation = _relaxation(model, x, posterior, seed)
    mean_kl = per["kl"].mean().item()
    quantiles = torch.quantile(per["kl"].double().cpu(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    record = Evaluation(
        examples=N,
        elbo=per["elbo"].mean().item(),
        reconstruction=per["reconstruction"].mean().item(),
        kl=mean_kl,
        kl_method=kl.method,
        kl_per_dim=per["kl_per_dim"].mean(0).tolist() if "kl_per_dim" in per else None,
        # the Monte Carlo error of the mean KL: independent draws per example
        kl_std_error=None if kl.std_error is None else (kl.std_error.square().sum().sqrt() / N).item(),
        bits_per_dim=bits_per_dim(per["elbo"].mean().item(), pixels) if pixels else None,
        activity=act.tolist(),
        active_units=int((act > ACTIVE_THRESHOLD).sum()),
        kl_per_image_quantiles=dict(zip(("10%", "50%", "90%"), quantiles, strict=True)),
        **likelihood,
        **layered,
        **split_parts,
        **relaxation,
        **codebook,
    )
    return record, per


def _activities(model, data: Examples, seed: int, measured: Measured):
    """Each latent's activity Cov_x(E_q[z | x]) for the kind of latent the model has (categorical
    variables, VQ-VAE's positions, M2's label over z, or Gaussian layers), drawn from the ``posterior``
    stream: (activity of every unit, of each layer's units by name, each layer's means (None where the
    latent is discrete), the top layer's posterior parameters (Gaussian), the categorical log
    probabilities, and a VQ-VAE's codebook fields)."""
    posterior, vq, m2 = categorical_posterior_of(model), vq_posterior_of(model), m2_of(model)
    x, acts, top, log_probs, codebook = data.x, {}, None, None, {}
    N = len(x)
    if posterior is not None:  # q(z_j = k | x), no draws; a variable's activity is the sum of its categories'
        log_probs = categorical_log_probs(model, x)
        act = activity(log_probs.exp().flatten(1)).view(log_probs.shape[1:]).sum(-1)
        means = {"z": None}
    elif vq is not None:  # each position's code; its activity, the variance of its vector over the examples
        codes = torch.cat([model.encode(x[i : i + 1000]).index for i in range(0, N, 1000)])  # (N, positions)
        act = activity(vq.vectors(codes)).view(vq.variables, vq.code_dim).sum(-1)
        means = {"z": None}
        used = torch.bincount(codes.flatten(), minlength=vq.categories).double()
        codebook = dict(
            categories=vq.categories,
            kl_ceiling=vq.variables * math.log(vq.categories),
            codebook_usage=(used / used.sum()).tolist(),
            codebook_perplexity=vq.perplexity(used),
            dead_codes=int((used == 0).sum()),
        )
    elif m2 is not None:  # the label y on top, one categorical variable: its activity sums its classes'
        log_probs = categorical_log_probs(model, x)
        with rng_from(seeded(seed, "posterior")):
            means = layer_means(model, x, log_probs.exp().flatten(1))
        acts = {"y": activity(means["y"]).sum(-1, keepdim=True), "z": activity(means["z"])}
        act = torch.cat(list(acts.values()))
    else:  # the top layer's q (its means, and the KL split's parameters) and E_q[z_l | x] per layer: measured
        top, means = measured.top, measured.means
        acts = {name: activity(m) for name, m in means.items()}
        act = torch.cat(list(acts.values()))
    return act, acts, means, top, log_probs, codebook


def _shared_iwae(model, data: Examples, k: int, batch_size: int, seed: int) -> Tensor:
    """The IWAE-k estimate of every example's log p(x); under torchrun each rank estimates its share of the
    examples (drawing from ``seed`` + rank) and all gather them."""
    ctx = distributed.current()
    torch.manual_seed(seed + ctx.rank)
    ll = iwae_log_likelihood(model, data[shard_rows(len(data), ctx.rank, ctx.world)], k, batch_size)
    return distributed.all_gather_cat(ll)


def _relaxation(model, x: Tensor, posterior, seed: int) -> dict:
    """A categorical posterior's record fields: the relaxed model's ELBO (the model that trained; none for
    straight-through, which trained on one-hot z), its temperature, categories and the KL's ceiling."""
    relaxed_elbo = None
    if not posterior.straight_through:
        with relaxed(model), rng_from(seeded(seed, "relaxed")):
            values = torch.cat([elbo(model, x[i : i + 1024]).elbo for i in range(0, x.shape[0], 1024)])
        relaxed_elbo = values.mean().item()
    return dict(
        relaxed_elbo=relaxed_elbo,
        temperature=float(posterior.temperature),
        categories=posterior.categories,
        kl_ceiling=posterior.variables * math.log(posterior.categories),
    )


def _decompose_top_layer(model, x: Tensor, kl: KLResult, top: tuple[Tensor, Tensor, Tensor | None]) -> dict:
    """The KL split's fields of the evaluation record, for the top latent layer (the only one of a
    one-layer model; ``top``: its :func:`posterior_params`), checked against that layer's KL on the
    same examples."""
    mu, log_var, scale_tril = top
    full_split = {}
    prior = diag_normal_params(model.prior())
    if scale_tril is not None and prior is not None:  # eq. 7's KL = its marginals' KLs + the correlations' part
        full_split = dict(
            kl_of_marginals_per_dim=kl_normal_normal(mu, log_var, *prior).mean(0).tolist(),
            correlation_kl=correlation_kl(scale_tril).mean().item(),
        )
    split, single = decompose_kl(
        model, mu, log_var, scale_tril=scale_tril
    )  # single: one-sample Monte Carlo KL per example
    return _decomposition_fields(kl, split, single, full_split)


def _decomposition_fields(kl: KLResult, split: KLSplit, single: Tensor, full_split: dict | None = None) -> dict:
    """The evaluation record's fields of a KL split (:func:`decompose_kl`'s ``split`` and per-example
    single-sample KL ``single``), checked against the layer's KL ``kl`` on the same examples: the parts, and
    ``kl_split``, the estimator with its standard errors and checks."""
    N = len(single)
    top = next(iter(kl.per_layer.values()))  # the top layer's KL: the one taken apart
    # paired on the same examples: the single-sample KL minus the layer's KL; its mean is 0 in expectation
    difference = single.double() - top.double()
    difference_std_error = (difference.std() / math.sqrt(N)).item()
    errors = [f"{name}_std_error" for name in ("mutual_information", "marginal_kl", "total_correlation")]
    errors += ["dimension_wise_kl_std_error"]
    estimator = {name: getattr(split, name) for name in errors if getattr(split, name) is not None}
    estimator |= dict(
        kl_monte_carlo=split.kl_monte_carlo,
        kl_monte_carlo_std_error=split.kl_monte_carlo_std_error,
        estimator="full data: q(z) over the N evaluated examples, one z per example",
        examples=split.examples,
        upper_bound_log_n=math.log(split.examples),
        adds_up=split.adds_up,
        **({"layer": next(iter(kl.per_layer))} if kl.layered else {}),
        difference_std_error=difference_std_error,
        # |mean| <= 4 standard errors: a false alarm about 6e-5 of the time (normal approximation)
        agrees_with_kl_within_4_std_errors=abs(difference.mean().item()) <= 4 * difference_std_error,
    )
    return dict(
        mutual_information=split.mutual_information,
        marginal_kl=split.marginal_kl,
        total_correlation=split.total_correlation,
        dimension_wise_kl=split.dimension_wise_kl,
        dimension_wise_kl_per_dim=split.dimension_wise_kl_per_dim,
        kl_split=estimator,
        kl_estimator={
            "analytic": kl.value.mean().item() if kl.method == "analytic" and not kl.layered else None,
            "single_sample_monte_carlo": single.mean().item(),
            "single_sample_std_dev": single.std().item(),
            "single_sample_std_error": single.std().item() / math.sqrt(N),
        },
        **(full_split or {}),
    )


@dataclass(frozen=True)
class Row:
    """One line of an evaluation's table: a name, its value (a number, or None for a remark), the unit,
    its depth in the tree of terms (the KL under the ELBO, the KL's parts under the KL) and a note."""

    name: str
    value: float | int | None
    unit: str = "nats"
    depth: int = 0
    note: str = ""


def evaluation_rows(r: Evaluation) -> list[Row]:
    """The rows that the command line, the report and the page show of one evaluation, in one order.
    A new metric is a field of :class:`Evaluation`, its measure in :func:`evaluate` and one row here."""
    given = "x, y" if r.conditional else "x"
    of = "" if not r.kl_split or r.kl_split.get("layer") is None else f" of {r.kl_split['layer']}"
    kl_name = f"KL(q(z|{given}) || p(z))" if r.kl_per_layer is None else "KL, every layer"
    rows = [
        Row("ELBO", r.elbo),
        Row(f"reconstruction E_q[log p(x|{'z, y' if r.conditional else 'z'})]", r.reconstruction, depth=1),
        Row(
            f"{kl_name} [{r.kl_method}]",
            r.kl,
            depth=1,
            note=f"± {r.kl_std_error:.3f} (s.e.)"
            if r.kl_std_error
            else f"= N log K for every image: a rate of {r.kl_ceiling / math.log(2):.2f} bits"
            if r.codebook_usage is not None
            else f"at most N log K = {r.kl_ceiling:.2f}"
            if r.kl_ceiling
            else "",
        ),
    ]
    if r.kl_per_image_quantiles is not None:  # how unequally the images pay for z
        q = r.kl_per_image_quantiles
        rows.append(Row("KL per image, median", q["50%"], depth=2, note=f"10% {q['10%']:.3f}, 90% {q['90%']:.3f}"))
    for name, value in (r.kl_per_layer or {}).items():
        rows.append(Row(f"KL of layer {name}", value, depth=2, note=f"{r.active_units_per_layer[name]} active units"))
    if r.mutual_information is not None:
        v = "y" if of == " of y" else "z"  # M2's top layer is the label
        rows += [
            Row(f"mutual information I(x; {v}){of}", r.mutual_information, depth=2, note=mi_ceiling(r)),
            Row(f"marginal KL(q({v}) || p({v})){of}", r.marginal_kl, depth=2),
        ]
    if r.total_correlation is not None:
        rows += [
            Row("total correlation", r.total_correlation, depth=3, note="KL(q(z) || prod_j q(z_j))"),
            Row("dimension-wise KL", r.dimension_wise_kl, depth=3, note="sum_j KL(q(z_j) || p(z_j))"),
        ]
    if r.relaxed_elbo is not None:
        rows.append(
            Row(
                f"ELBO of the relaxed model, temperature {r.temperature:.3f}",
                r.relaxed_elbo,
                note="what training maximised; the rows above are of the discrete model, one-hot z",
            )
        )
    if r.accuracy is not None:
        rows.append(
            Row(
                "classifier accuracy, argmax q(y|x)",
                r.accuracy,
                "",
                note=f"error {100 * (1 - r.accuracy):.2f} %, trained with {r.labelled} labels",
            )
        )
    if r.log_likelihood is not None:
        rows += [
            Row(
                f"log p({'x|y' if r.conditional else 'x'}), IWAE k={r.iwae_k}",
                r.log_likelihood,
                note="" if r.log_likelihood_std_error is None else f"± {r.log_likelihood_std_error:.3f} (s.e.)",
            ),
            Row("gap log p(x) − ELBO", r.log_likelihood - r.elbo, depth=1, note="KL(q || p(z|x)), estimated"),
        ]
    if r.gaps is not None:
        rows += gap_rows(r.gaps)
    if r.refined is not None:
        f = r.refined
        rows.append(
            Row(
                f"ELBO after {f['steps']} steps refining q per image",
                f["elbo_refined"],
                note=f"+{f['gain']:.3f} ± {f['gain_std_error']:.3f} over the encoder's on the same draws, "
                f"{f['examples']} images, {f['decoder_calls_per_image']} decoder calls each",
            )
        )
    if r.bits_per_dim is not None:
        rows.append(Row("ELBO in bits/dim", r.bits_per_dim, "bits/dim"))
    if r.log_likelihood_bits_per_dim is not None:
        rows.append(Row("log p(x) in bits/dim", r.log_likelihood_bits_per_dim, "bits/dim"))
    if r.kl_estimator is not None:
        est = r.kl_estimator
        rows.append(
            Row(
                f"KL, single-sample Monte Carlo{of}",
                est["single_sample_monte_carlo"],
                note=f"sd {est['single_sample_std_dev']:.3f} per example",
            )
        )
    return rows + _unit_rows(r)


def _unit_rows(r: Evaluation) -> list[Row]:
    """:func:`evaluation_rows`' last rows: the active units (variables, positions), the KL per dimension, a
    VQ-VAE's codebook, what was not measured and why, and the collapsed layers."""
    rows, D = [], len(r.activity)
    if r.codebook_usage is not None:
        rows.append(Row(f"active positions (sum_d Var_x z_q[j,d] > {r.active_threshold})", r.active_units, f"of {D}"))
    elif r.categories:
        rows.append(Row(f"active variables (sum_k Var_x q(z_j=k|x) > {r.active_threshold})", r.active_units, f"of {D}"))
    else:
        rows.append(Row(f"active units (Cov_x E[z_j|x] > {r.active_threshold})", r.active_units, f"of {D}"))
    if r.kl_per_dim is not None and r.kl_per_layer is None and r.codebook_usage is None:
        order = sorted(range(D), key=lambda j: -r.kl_per_dim[j])
        top = ", ".join(f"z{j}: {r.kl_per_dim[j]:.2f}" for j in order[:8])
        what = f"variable, each at most log K = {math.log(r.categories):.2f}" if r.categories else "dimension"
        rows.append(Row(f"KL per {what} (largest first)", None, "", note=top))
    if r.codebook_usage is not None:
        K = len(r.codebook_usage)
        rows += [
            Row("codebook perplexity, exp(H) of the codes' frequencies", r.codebook_perplexity, f"of {K} codes"),
            Row("dead codes (used by no image)", r.dead_codes, f"of {K}"),
            Row("log p(x) is not estimated: q(z|x) is a point mass, so every importance weight is the ELBO's", None),
            Row("the KL is N log K for every image: nothing to take apart into MI, TC and dimension-wise KL", None),
        ]
    elif r.mutual_information is None:
        rows.append(
            Row(
                "the KL split (MI + TC + dimension-wise KL) needs a density of q(z|x)'s top layer: a Gaussian or "
                "categorical one, not a flow's nor bottom-up inference's (a mixture over the layer below)",
                None,
            )
        )
    for name in r.collapsed_layers or ():
        rows.append(Row(collapse_warning(name, r.kl_per_layer[name]), None))
    return rows


MI_CEILING_MARGIN = 0.1  # nats: an MI estimate this close to log N has reached what N examples can show


def mi_ceiling(r: Evaluation) -> str:
    """The full-data MI estimate on N examples is at most log N, the entropy of the empirical data
    distribution: say so, and say when the estimate has reached it (it then measures N, not the model)."""
    ceiling = math.log(r.examples)
    if r.mutual_information >= ceiling - MI_CEILING_MARGIN:
        return f"at its ceiling log N = {ceiling:.2f} (N = {r.examples}): the encoder tells the examples apart"
    return f"at most log N = {ceiling:.2f} on N = {r.examples} examples"


def gap_rows(g: dict) -> list[Row]:
    """The rows of ``evaluate --gaps`` (:meth:`gaps.Gaps.summary`): the encoder's bound, the best q per image,
    log p(x), and the gap between them in two parts; a richer family's q* beside them."""

    def se(name: str) -> str:
        return f"± {g[name + '_std_error']:.3f} (s.e. over the images)"

    proposal = "the encoder's q" if g["proposal"] == "encoder" else f"the {g['proposal']} q*"
    how = f"IWAE k={g['iwae_k']}"
    if g["proposal"] == "grid":  # 2 latent dimensions: by quadrature
        how, proposal = "quadrature", None
    rows = [
        Row(
            f"posterior gap of the first {g['examples']} images",
            None,
            note="log p(x) − L[q] = approximation + amortization (Cremer et al. 2018)",
        ),
        Row("L[q]: the encoder's ELBO", g["elbo_encoder"], depth=1, note=se("elbo_encoder")),
        Row(f"L[q*]: the best {g['family']} q, per image", g["elbo_optimal"], depth=1, note=se("elbo_optimal")),
        Row(
            f"log p(x), {how}",
            g["gaps_log_likelihood"],
            depth=1,
            note="p(x|z) p(z) summed on a grid around q and q*"
            if proposal is None
            else f"proposal {proposal}, the one of the highest ELBO",
        ),
        Row("approximation gap log p(x) − L[q*]", g["approximation_gap"], depth=2, note=se("approximation_gap")),
        Row("amortization gap L[q*] − L[q]", g["amortization_gap"], depth=2, note=se("amortization_gap")),
    ]
    for key in [k for k in g if k.startswith("elbo_optimal_") and not k.endswith("_std_error")]:
        family = key.removeprefix("elbo_optimal_")
        rows += [
            Row(f"L[q*]: the best {family} q, per image (a richer family)", g[key], depth=1, note=se(key)),
            Row(
                f"approximation gap of the {family} family",
                g[f"approximation_gap_{family}"],
                depth=2,
                note=se(f"approximation_gap_{family}"),
            ),
        ]
    return rows


def format_table(record: Evaluation) -> str:
    """The evaluation's rows as text, one per line."""
    lines = []
    for row in evaluation_rows(record):
        name = "  " * row.depth + row.name
        if row.value is None:
            lines.append(f"{name:<40} {row.note}".rstrip())
            continue
        value = f"{row.value:12d}" if isinstance(row.value, int) else f"{row.value:12.4f}"
        lines.append(f"{name:<40} {value}  {row.unit}" + (f"  ({row.note})" if row.note else ""))
    return "\n".join(lines)


def per_example_csv(per: dict[str, Tensor]) -> str:
    """One row per example: index, elbo, reconstruction, kl, each layer's KL (``kl_z2``, ``kl_z1``:
    several layers), then kl_std_error (Monte Carlo KL),
    log_likelihood (when estimated) and kl_dim_j (a factorising prior) where the run has them."""
    layers = [k for k in per if k.startswith("kl_z")]  # several latent layers: each one's KL
    gap_columns = [k for k in per if k.startswith(("elbo_encoder", "elbo_optimal", "gaps_", "approximation_gap"))]
    gap_columns += ["amortization_gap"] if "amortization_gap" in per else []
    columns = [k for k in ("elbo", "reconstruction", "kl", *layers, "kl_std_error", "log_likelihood") if k in per]
    columns += gap_columns
    D = per["kl_per_dim"].shape[1] if "kl_per_dim" in per else 0
    header = ["index", *columns] + [f"kl_dim_{j}" for j in range(D)]
    table = torch.stack([per[k].double() for k in columns], 1)
    if D:
        table = torch.cat([table, per["kl_per_dim"].double()], 1)
    lines = [",".join(header)]
    lines += [",".join([str(i)] + [f"{v:.6g}" if v == v else "" for v in row]) for i, row in enumerate(table.tolist())]
    return "\n".join(lines) + "\n"


def evaluate_trained(model, config: Config, data: Examples, **options) -> tuple[Evaluation, dict[str, Tensor]]:
    """:func:`evaluate` of a trained run's examples (images with the labels its model is given), as the run's
    config says: the KL split wherever q is Gaussian or discrete (not a flow); M2 scored without the labels
    (y summed out), which grade its classifier instead. ``options``: :func:`evaluate`'s."""
    posterior = POSTERIORS[config.posterior]
    take_kl_apart = posterior.gaussian or posterior.discrete
    if not config.labelled:
        return evaluate(model, data, take_kl_apart=take_kl_apart, **options)
    record, per = evaluate(model, data.x, take_kl_apart=take_kl_apart, **options)
    return replace(record, **classifier_accuracy(model, data, config.labelled)), per


@torch.no_grad()
def classifier_accuracy(model, data: Examples, labelled: int) -> dict:
    """M2's classifier on labelled examples: the share whose most probable class under q(y|x) is theirs."""
    predicted = torch.cat([model.classify(xb).probs[:, 0].argmax(-1) for xb, _ in data.batches(model, 1000)])
    return dict(accuracy=(predicted == data.y).double().mean().item(), labelled=labelled)


def weights_sha256(run_dir: Path) -> str:
    """The SHA-256 of a run's model.safetensors: which weights an evaluation record is of."""
    return hashlib.sha256((Path(run_dir) / "model.safetensors").read_bytes()).hexdigest()


@dataclass(frozen=True)
class Trained:
    """A trained run, opened once: its model (in eval mode), its config, its data split as it trained
    on them (images as the model sees them: binarised where it was) and whether these are its own data."""

    path: Path
    model: torch.nn.Module
    config: Config
    splits: Splits | None  # None: opened without its data (``open_trained(with_data=False)``)
    images: dict[str, Tensor]  # "train", "val", "test"
    pixels: int | None  # per image, for bits/dim (a discrete likelihood), else None
    own_data: bool  # False: other data given on purpose (evaluate --data)

    def examples(self, name: str) -> Examples:
        """The images of data split ``name`` and the labels the model is given (none unless it takes them)."""
        x = self.images[name]
        if not len(x):
            raise UserError(f"the run has no {name} images (it trained with --val-size 0); use --split test")
        return Examples(x, labels_for(self.config, getattr(self.splits, name), self.splits.name))


def open_trained(
    path: str | Path, data: str | None = None, data_dir: str | None = None, with_data: bool = True
) -> Trained:
    """The one opener of a trained run (a run directory, model.safetensors or a checkpoint): its model,
    and its data prepared as it trained on them, or ``data`` / ``data_dir`` given instead; the data's
    identity and shape are checked against the weights' (``checkpoint.check_identity``). ``with_data``
    False: the model alone (its ``splits`` None), for work that needs no data set (decoding a file)."""
    path = Path(path)
    model, config = load_run(path)
    if not with_data:
        check_owner(path)
        return Trained(path, model, config, None, {}, None, True)
    changes = {k: v for k, v in (("data", data), ("data_dir", data_dir)) if v is not None}
    config = config.replace(**changes)
    splits, train_x, val_x, test_x, pixels = prepare_data(config, "cpu")
    if splits.x_shape != model.x_shape:
        raise UserError(
            f"{splits.name} has images of shape {splits.x_shape}, the model was trained on "
            f"{model.x_shape}; evaluate on data of the same shape"
        )
    own = check_identity(path, config, splits, given_data=bool(changes))
    return Trained(path, model, config, splits, {"train": train_x, "val": val_x, "test": test_x}, pixels, own)


def evaluate_run(
    run,
    *,
    data=None,
    data_dir=None,
    split="test",
    iwae_k=5000,
    batch_size=100,
    seed=0,
    per_example=False,
    device: str = "auto",
    keep: bool = True,
    gaps: int | None = None,
    refine: int | None = None,
) -> tuple[Evaluation, str | None]:
    """``vaelab evaluate``: load the run's model and data the way it was trained; evaluate one split on
    ``device`` (auto, cpu or cuda). The record is kept as RUN/evaluation.json when ``keep`` and the data
    are the run's own. ``gaps``: the posterior gaps of the split's first ``gaps`` images too (:mod:`gaps`);
    ``refine``: the ELBO after that many steps of refining q per image, beside the encoder's (:func:`gaps.refined`)."""
    if iwae_k < 0:
        raise UserError(f"--iwae-k must be >= 0, got {iwae_k}")
    if gaps is not None and gaps < 1:
        raise UserError(f"--gaps must be at least 1 image, got {gaps}")
    if refine is not None and refine < 1:
        raise UserError(f"--refine must be at least 1 step, got {refine}")
    run, device = Path(run), distributed.resolve_device(device)
    with distributed.session(device.type) as ctx, contextlib.ExitStack() as held:
        device = distributed.rank_device(device, ctx)
        trained = open_trained(run, data=data, data_dir=data_dir)
        model, config, splits, pixels, own_data = (
            trained.model,
            trained.config,
            trained.splits,
            trained.pixels,
            trained.own_data,
        )
        data = trained.examples(split)
        if split == "train" and config.binarized_per_batch:  # the static draw a static run trains on
            data = replace(data, x=binarize_static(data.x, config.seed, "train"))
        if gaps is not None or refine is not None:
            families = _gap_families(config, len(data.x), gaps or 1, ctx.world, "--gaps" if gaps else "--refine")
        writes = keep and run.is_dir() and ctx.is_main and own_data  # the run's record is of the run's own data
        if writes:  # held from here: a run being trained (or evaluated) elsewhere is refused before the work
            held.enter_context(rundir.lock(run, "evaluating"))
        record, per = evaluate_trained(
            model.to(device), config, data.to(device), iwae_k=iwae_k, batch_size=batch_size, seed=seed, pixels=pixels
        )
        per = {name: values.cpu() for name, values in per.items()}
        record = replace(
            record,
            data=splits.name,
            split=split,
            binarize=config.binarize,
            seed=seed,
            likelihood=config.likelihood,
            prior=config.prior,
            conditional=FAMILIES[config.family].labels or None,
            weights_sha256=weights_sha256(run) if run.is_dir() else None,
        )
        if gaps is not None:
            k = min(iwae_k, GAPS_IWAE_K) if iwae_k else GAPS_IWAE_K
            found = posterior_gaps(model.cpu(), data.x[:gaps].cpu(), families, iwae_k=k, seed=seed)
            record = replace(record, gaps=found.summary(k))
            per |= {name: _padded(values, len(data.x)) for name, values in found.per_image().items()}
        if refine is not None:
            record = replace(record, refined=refined(model.cpu(), data.x.cpu(), families[0], refine, seed=seed))
        if writes:
            atomic_write_text(run / "evaluation.json", json.dumps(record.to_dict(), indent=1))
    return record, per_example_csv(per) if per_example else None


GAPS_IWAE_K = 1000  # --gaps: importance samples per proposal for log p(x), at most (or --iwae-k, if fewer)


def _gap_families(config: Config, images: int, gaps: int, world: int, option: str) -> tuple[str, ...]:
    """The families q* is sought in for ``evaluate --gaps`` (``--refine``: the first), or one line saying why
    it does not apply."""
    if gaps > images:
        raise UserError(f"--gaps {gaps} asks for more images than the split holds ({images}); use --gaps {images}")
    if world > 1:
        raise UserError(f"{option} runs in one process; drop --nproc")
    if FAMILIES[config.family].layers > 1 or config.uses_labels:
        raise UserError(
            f"{option} optimises one latent layer's q per image without labels; this run has "
            + (f"{FAMILIES[config.family].layers} layers" if FAMILIES[config.family].layers > 1 else "labels")
            + ", where q* would have to be defined layer by layer (or per label)"
        )
    return families_for(config.posterior, option)


def _padded(values: Tensor, n: int) -> Tensor:
    """A per-image column of the first images, NaN for the rest (the CSV leaves them empty)."""
    return torch.cat([values.double(), torch.full((n - len(values),), float("nan"), dtype=torch.float64)])
