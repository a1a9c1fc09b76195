r"""The posterior gap taken apart (Cremer, Li & Duvenaud 2018, "Inference Suboptimality in VAEs").

The gap between log p(x) and the encoder's bound is KL(q(z|x) || p(z|x)). For each image x, let q*
be the best member of the run's own posterior family for that image alone (its parameters optimised
directly, starting at the encoder's output). Then

    log p(x) - L[q] = (log p(x) - L[q*])  +  (L[q*] - L[q])
                      approximation gap      amortization gap

the first what the family itself cannot reach, the second what one network for every x loses to
each x's best member. A richer family's q* (a full covariance for a diagonal run) shows what more
flexible inference would reach for the same image.

How it is estimated, per image (every image of a batch at once, each its own parameters):

- q* maximises the ELBO by Adam, ``STEPS`` steps of ``SAMPLES`` fresh draws each (z = mu + L eps, the KL in
  closed form where there is one, else at the same draws), its rate decaying to 0 on a cosine; q* of a
  richer family starts at the last family's q* (which it contains).
- L[q], L[q*] are then estimated on the same fresh draws (``EVAL_SAMPLES`` of them, a stream of their own);
  L[q*] >= L[q] holds within their error.
- log p(x) is the IWAE estimate with k samples from q and from q*; the proposal whose ELBO is highest on
  average over the images is kept (chosen on the fresh draws, not on the IWAE estimates themselves, whose
  highest would be biased upwards). With 2 latent
  dimensions it is p(x|z) p(z) summed over a grid around q and q* instead (:func:`_quadrature_log_px`):
  no bound, and no IWAE noise.

Each gap's mean over the images comes with its standard error over the images. q* is the best member
the optimiser finds, which may fall short of the family's best: L[q*] is then estimated low, the
approximation gap high and the amortization gap low (by 0.04 nats against 400 steps of 32 draws on the
default model; the tests hold it to a deterministic quadrature optimum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution, MultivariateNormal

from vaelab.contract import LatentLayer
from vaelab.data.batches import seeded
from vaelab.distributions import diag_normal, reparametrize, scale_tril
from vaelab.errors import UserError
from vaelab.kl import diag_normal_params, kl_q_p
from vaelab.parts import POSTERIORS

# Adam on fresh draws: L-BFGS on a fixed set of draws stalled on ReLU decoders (the bound of finitely many
# draws has kinks where its line search fails: q* ended 16 nats below the quadrature optimum on a 2-D model)
# and fitted the draws it had (6 nats short with a full covariance). Measured on the default model, 50 test
# images of mnist-5k: these settings end 0.04 nats below 400 steps of 32 draws, in a quarter of the time.
STEPS = 200
LR = 0.05  # at the first step, decaying to 0 on a cosine
SAMPLES = 16  # draws per step
EVAL_SAMPLES = 256  # fresh draws for L[q] and L[q*]


# -- the families q* is sought in: parameters from the encoder's q, and the distribution they give ---------
def _diagonal_start(q: Distribution) -> list[Tensor]:
    mu, log_var = _gaussian(q)
    return [mu, log_var]


def _diagonal(params: list[Tensor]) -> Distribution:
    mu, log_var = params
    return diag_normal(mu, log_var)


def _full_start(q: Distribution) -> list[Tensor]:
    """mu and the Cholesky factor's free entries: the diagonal's log and the strict lower triangle."""
    tril = scale_tril(q)
    return [q.mean, tril.diagonal(dim1=-2, dim2=-1).log(), torch.tril(tril, -1)]


def _full(params: list[Tensor]) -> Distribution:
    mu, log_diag, lower = params
    return MultivariateNormal(mu, scale_tril=torch.tril(lower, -1) + torch.diag_embed(log_diag.exp()))


def _gaussian(q: Distribution) -> tuple[Tensor, Tensor]:
    params = diag_normal_params(q)
    if params is None:
        raise UserError("--gaps starts q* at the encoder's q(z|x), which is not a Gaussian of this run's family")
    return params


FAMILIES = {"diagonal": (_diagonal_start, _diagonal), "full": (_full_start, _full)}


@dataclass(frozen=True)
class Gaps:
    """Per image (N,): the encoder's bound, q*'s in each family (the run's own first), log p(x)."""

    elbo_encoder: Tensor
    elbo_optimal: dict[str, Tensor]  # family -> L[q*]
    log_likelihood: Tensor
    proposal: str  # "encoder" or the family of the q* whose IWAE estimate was kept
    parameters: dict[str, list[Tensor]]  # family -> q*'s parameters, per image (FAMILIES' own form)

    @property
    def own(self) -> str:
        return next(iter(self.elbo_optimal))

    def per_image(self) -> dict[str, Tensor]:
        """Each quantity per image, in float64 (so that the gaps add up to the whole to rounding)."""
        own, log_px, encoder = self.elbo_optimal[self.own].double(), self.log_likelihood.double(), self.elbo_encoder
        out = {
            "elbo_encoder": encoder.double(),
            "elbo_optimal": own,
            "gaps_log_likelihood": log_px,
            "approximation_gap": log_px - own,
            "amortization_gap": own - encoder.double(),
        }
        for family, values in list(self.elbo_optimal.items())[1:]:
            out[f"elbo_optimal_{family}"] = values.double()
            out[f"approximation_gap_{family}"] = log_px - values.double()
        return out

    def summary(self, iwae_k: int) -> dict:
        """The record's ``gaps``: each per-image quantity's mean and standard error over the images."""
        N = len(self.elbo_encoder)
        out = {"examples": N, "family": self.own, "iwae_k": iwae_k, "proposal": self.proposal, "steps": STEPS}
        for name, values in self.per_image().items():
            out[name] = values.mean().item()
            out[f"{name}_std_error"] = values.std(correction=min(1, N - 1)).item() / math.sqrt(N)
        return out


def families_for(posterior: str, option: str = "--gaps") -> tuple[str, ...]:
    """The families q* is sought in for a run of ``posterior``, its own first; refused where none is defined."""
    families = POSTERIORS[posterior].optimal_families
    if not families:
        raise UserError(
            f"{option} optimises q in the run's own posterior family, and for --posterior {posterior} vaelab defines "
            "none (a flow's q* would be a flow per image; a point mass or categories have no Gaussian to move); "
            "use a run of --posterior diagonal or full"
        )
    return families


def posterior_gaps(
    model, x: Tensor, families: tuple[str, ...], *, iwae_k: int, seed: int, batch_size: int = 100
) -> Gaps:
    """:class:`Gaps` of the images ``x`` (N, C, H, W) under a one-layer model, q* sought in ``families``."""
    encoder, optimal, iwae = [], {f: [] for f in families}, {f: [] for f in ("encoder", *families)}
    found: dict[str, list[list[Tensor]]] = {f: [] for f in families}
    grids: list[Tensor] = []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        (layer,) = _layer(model, xb)
        quadrature = layer.z.shape[-1] == 2  # log p(x) by a sum over a grid, not by IWAE
        # every purpose draws from a stream of its own, per batch: no number depends on another's draws (or on
        # --iwae-k), and --gaps changes no other number of the evaluation
        g = {what: seeded(seed, "gaps", start, i) for i, what in enumerate(("fresh", "encoder", *families))}
        fresh = torch.randn(EVAL_SAMPLES, *layer.z.shape, generator=g["fresh"], dtype=layer.z.dtype)
        with torch.no_grad():
            encoder.append(_bound(model, xb, layer, layer.q, fresh))
            if not quadrature:
                iwae["encoder"].append(_iwae(model, xb, layer, layer.q, iwae_k, g["encoder"]))
        q_star = layer.q  # the run's own family starts at the encoder's output; a richer one at the last q*,
        for family in families:  # which it contains, so that it ends no lower
            start_of, build = FAMILIES[family]
            params = _optimise(model, xb, layer, start_of(q_star), build, g[family])
            q_star = build(params)
            found[family].append(params)
            with torch.no_grad():
                optimal[family].append(_bound(model, xb, layer, q_star, fresh))
                if not quadrature:
                    iwae[family].append(_iwae(model, xb, layer, q_star, iwae_k, g[family]))
        if quadrature:
            with torch.no_grad():
                grids.append(_quadrature_log_px(model, xb, layer, [layer.q, q_star]))
    estimates = {"grid": torch.cat(grids)} if grids else {name: torch.cat(v) for name, v in iwae.items()}
    # the proposal whose ELBO is highest on the fresh draws: chosen on numbers independent of the IWAE draws (the
    # highest of several noisy IWAE estimates would be biased upwards, past log p(x))
    bounds = {"encoder": torch.cat(encoder), **{f: torch.cat(v) for f, v in optimal.items()}}
    best = "grid" if grids else max(estimates, key=lambda name: bounds[name].mean().item())
    parameters = {f: [torch.cat(p) for p in zip(*batches, strict=True)] for f, batches in found.items()}
    optimal_cat = {f: torch.cat(v) for f, v in optimal.items()}
    return Gaps(torch.cat(encoder), optimal_cat, estimates[best], best, parameters)


def refined(model, x: Tensor, family: str, steps: int, *, seed: int, batch_size: int = 100) -> dict:
    """Test-time refinement (semi-amortized inference): the ELBO of the encoder's q and of q after ``steps``
    Adam steps from it in the run's own ``family`` (the optimiser of q*, cut short), per image on the same
    ``EVAL_SAMPLES`` fresh draws; their means, the gain and its standard error, and the cost in decoder
    evaluations per image."""
    start_of, build = FAMILIES[family]
    before, after = [], []
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        (layer,) = _layer(model, xb)
        g = seeded(seed, "refine", start, 0)  # per batch: no image's numbers depend on another batch's draws
        fresh = torch.randn(EVAL_SAMPLES, *layer.z.shape, generator=g, dtype=layer.z.dtype)
        params = _optimise(model, xb, layer, start_of(layer.q), build, seeded(seed, "refine", start, 1), steps)
        with torch.no_grad():
            before.append(_bound(model, xb, layer, layer.q, fresh).double())
            after.append(_bound(model, xb, layer, build(params), fresh).double())
    before, after = torch.cat(before), torch.cat(after)
    gain, N = after - before, len(before)
    return {
        "steps": steps,
        "examples": N,
        "elbo_encoder": before.mean().item(),
        "elbo_refined": after.mean().item(),
        "gain": gain.mean().item(),
        "gain_std_error": gain.std(correction=min(1, N - 1)).item() / math.sqrt(N),
        "decoder_calls_per_image": steps * SAMPLES,
    }


@dataclass(frozen=True)
class PosteriorView:
    """What the pictures draw of one image in two latent dimensions ``dims``: the true posterior p(z|x), the
    encoder's q and the best q* of its family (their means (2,) and covariances (2, 2) in those dimensions).
    With 2 latent dimensions p(z|x) is on a grid (``axes``, ``density`` (G, G), normalised by quadrature,
    which gives ``log_px`` too); otherwise ``samples`` (n, 2) of p(z|x) by importance resampling."""

    dims: tuple[int, int]
    q: tuple[Tensor, Tensor]
    q_star: tuple[Tensor, Tensor]
    elbo_encoder: float  # L[q] and L[q*] of the image, on EVAL_SAMPLES fresh draws
    elbo_optimal: float
    axes: tuple[Tensor, Tensor] | None = None
    density: Tensor | None = None
    log_px: float | None = None
    samples: Tensor | None = None
    effective_draws: float | None = None  # of the importance weights the samples were resampled with


GRID = 160  # points per axis of a 2-D posterior's grid
RESAMPLED = 2000  # draws of p(z|x) shown for more dimensions, resampled from ...
PROPOSED = 50_000  # ... this many draws of q* widened by WIDEN
WIDEN = 1.5


@torch.no_grad()
def _marginal(q: Distribution, dims: list[int]) -> tuple[Tensor, Tensor]:
    """q's mean and covariance in ``dims``, for one image: (2,), (2, 2)."""
    tril = scale_tril(q)[0]
    return q.mean[0, dims], (tril @ tril.T)[dims][:, dims]


def posterior_views(model, x: Tensor, family: str, dims: list[int], *, seed: int) -> list[PosteriorView]:
    """A :class:`PosteriorView` of each image of ``x``: q* found as ``evaluate --gaps`` finds it, p(z|x) on a
    grid around q and q* (2 latent dimensions) or resampled from a widened q* (more)."""
    g = seeded(seed, "posterior-view")
    start_of, build = FAMILIES[family]
    views = []
    for i in range(len(x)):
        xi = x[i : i + 1]
        (layer,) = _layer(model, xi)
        q_star = build(_optimise(model, xi, layer, start_of(layer.q), build, g))
        q, star = _marginal(layer.q, dims), _marginal(q_star, dims)
        with torch.no_grad():
            fresh = torch.randn(EVAL_SAMPLES, *layer.z.shape, generator=g, dtype=layer.z.dtype)
            bounds = (_bound(model, xi, layer, layer.q, fresh).item(), _bound(model, xi, layer, q_star, fresh).item())
            if layer.z.shape[-1] == 2:
                axes, density = _on_a_grid(model, xi, layer, (q, star))
                log_px = _quadrature_log_px(model, xi, layer, [layer.q, q_star]).item()  # as --gaps sums it
                views.append(PosteriorView(tuple(dims), q, star, *bounds, axes, density, log_px))
            else:
                drawn, effective = _resampled(model, xi, layer, q_star, dims, g)
                views.append(PosteriorView(tuple(dims), q, star, *bounds, samples=drawn, effective_draws=effective))
    return views


def _on_a_grid(model, x, layer, gaussians) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """p(z|x) ∝ p(x|z) p(z) to draw, on a GRID x GRID grid covering each Gaussian's mean ± 5 s.d., normalised
    over the grid (log p(x) is :func:`_quadrature_log_px`'s, whose grid also covers the prior's bulk)."""
    lows, highs = [], []
    for mean, cov in gaussians:
        sd = cov.diagonal().sqrt()
        lows.append(mean - 5 * sd)
        highs.append(mean + 5 * sd)
    low, high = torch.stack(lows).min(0).values, torch.stack(highs).max(0).values
    u, v = (torch.linspace(low[i].item(), high[i].item(), GRID, dtype=layer.z.dtype) for i in (0, 1))
    z = torch.cartesian_prod(u, v)[:, None, :]  # (G², 1, 2): u varies slowest
    log_joint = (
        model.log_px_given_z([LatentLayer(layer.name, layer.q, layer.p, z)], x)[:, 0] + layer.p.log_prob(z)[:, 0]
    )
    cell = (u[1] - u[0]).item() * (v[1] - v[0]).item()
    return (u, v), torch.softmax(log_joint, 0).reshape(GRID, GRID) / cell


QUADRATURE = 100, 300  # points per axis of the grid that gives a 2-D model's log p(x) in `evaluate --gaps`
PRIOR_REACH = 5.0  # the grid covers [-5, 5]^2, where a standard normal prior has its mass, ...
REACH = 6  # ... and q and q* ± 6 standard deviations, wherever they are


def _quadrature_log_px(model, x: Tensor, layer: LatentLayer, qs: list[Distribution], chunk: int = 400) -> Tensor:
    """log p(x) of each image of a model with 2 latent dimensions, (B,): the Riemann sum of p(x|z) p(z) over a
    grid covering [-5, 5]^2 and every Gaussian of ``qs`` ± REACH standard deviations (a second mode of p(z|x)
    far from both q and q* is counted too), its spacing the smallest standard deviation of ``qs`` (at least
    QUADRATURE[0] and at most QUADRATURE[1] points per axis): a Gaussian's Riemann sum at that spacing is off
    by 2 exp(-2 pi^2), 5e-9, of itself, and a smooth density's by far less than the estimates' other errors."""
    sds = [scale_tril(q).diagonal(dim1=-2, dim2=-1) for q in qs]  # (B, 2) each
    low = (
        torch.stack([q.mean - REACH * sd for q, sd in zip(qs, sds, strict=True)]).min(0).values.clamp(max=-PRIOR_REACH)
    )
    high = (
        torch.stack([q.mean + REACH * sd for q, sd in zip(qs, sds, strict=True)]).max(0).values.clamp(min=PRIOR_REACH)
    )
    finest = torch.stack(sds).min().item()
    P = int(min(max(math.ceil((high - low).max().item() / finest) + 1, QUADRATURE[0]), QUADRATURE[1]))
    t = torch.linspace(0, 1, P, dtype=low.dtype)[:, None]
    u, v = low[:, 0] + (high[:, 0] - low[:, 0]) * t, low[:, 1] + (high[:, 1] - low[:, 1]) * t  # (P, B) each
    B = u.shape[1]
    z = torch.stack([u[:, None].expand(P, P, B), v[None, :].expand(P, P, B)], -1).reshape(P * P, B, 2)
    log_joint = torch.cat(
        [
            model.log_px_given_z([LatentLayer(layer.name, layer.q, layer.p, c)], x) + layer.p.log_prob(c)
            for c in z.split(chunk)
        ]
    )
    cell = ((high - low) / (P - 1)).log().sum(-1)
    return torch.logsumexp(log_joint, 0) + cell


def _resampled(model, x, layer, q_star: Distribution, dims: list[int], g: torch.Generator) -> tuple[Tensor, float]:
    """RESAMPLED draws of p(z|x) in ``dims`` by sampling-importance-resampling from q* widened by WIDEN, and
    the weights' effective number of draws, (sum w)^2 / sum w^2: how many of them the picture really rests on."""
    mean, tril = q_star.mean[0], WIDEN * scale_tril(q_star)[0]
    proposal = MultivariateNormal(mean, scale_tril=tril)
    eps = torch.randn(PROPOSED, 1, mean.shape[0], generator=g, dtype=mean.dtype)
    z = mean + eps @ tril.T
    log_w = model.log_px_given_z([LatentLayer(layer.name, layer.q, layer.p, z)], x)[:, 0]
    log_w = log_w + layer.p.log_prob(z)[:, 0] - proposal.log_prob(z[:, 0])
    w = torch.softmax(log_w, 0)
    picks = torch.multinomial(w, RESAMPLED, replacement=True, generator=g)
    return z[picks, 0][:, dims], 1.0 / w.square().sum().item()


@torch.no_grad()
def _layer(model, x: Tensor) -> list[LatentLayer]:
    """The encoder's q and the prior of ``x``, constants of every optimisation here (a VampPrior's p is a
    function of the model's parameters: built with gradients, one backward pass would free it)."""
    return model.latents(x, lambda q: q.mean)


def _bound(model, x: Tensor, layer: LatentLayer, q: Distribution, eps: Tensor) -> Tensor:
    """The ELBO of q for each image, averaged over the draws ``eps`` (S, B, D): (B,)."""
    z = reparametrize(q, eps)
    reconstruction = model.log_px_given_z([LatentLayer(layer.name, q, layer.p, z)], x).mean(0)
    kl = kl_q_p(q, layer.p, z).value
    return reconstruction - (kl.mean(0) if kl.dim() > 1 else kl)


def _optimise(
    model, x, layer, params: list[Tensor], build, g: torch.Generator, steps: int | None = None
) -> list[Tensor]:
    """q* by Adam on the ELBO of ``SAMPLES`` fresh draws per step, each image its own parameters (the bound is a
    sum over images, so each image's gradient is its own), ``steps`` steps (default ``STEPS``) with the rate
    decaying from ``LR`` to 0 on a cosine. Returns q*'s parameters (detached)."""
    steps = STEPS if steps is None else steps
    params = [p.detach().clone().requires_grad_() for p in params]
    opt = torch.optim.Adam(params, lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # the model stays as it is; only q's parameters move
    try:
        for _ in range(steps):
            eps = torch.randn(SAMPLES, *layer.z.shape, generator=g, dtype=layer.z.dtype)
            opt.zero_grad()
            (-_bound(model, x, layer, build(params), eps).sum()).backward()
            opt.step()
            schedule.step()
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    return [p.detach() for p in params]


def _iwae(model, x, layer, q: Distribution, k: int, g: torch.Generator, chunk: int = 100) -> Tensor:
    """log (1/k) sum_i p(x, z_i) / q(z_i) with z_i ~ q, in chunks with a running logsumexp: (B,)."""
    total = None
    for done in range(0, k, chunk):
        n = min(chunk, k - done)
        eps = torch.randn(n, len(x), layer.z.shape[-1], generator=g, dtype=layer.z.dtype)
        z = reparametrize(q, eps)
        log_w = model.log_px_given_z([LatentLayer(layer.name, q, layer.p, z)], x)
        log_w = log_w + layer.p.log_prob(z) - q.log_prob(z)
        part = torch.logsumexp(log_w, 0)
        total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(k)
