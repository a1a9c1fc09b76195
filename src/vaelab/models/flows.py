r"""A flow posterior: a diagonal Gaussian pushed through inverse autoregressive flow steps.

Inverse autoregressive flow (Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling 2016, eqs. 10-14):
the encoder gives mu, sigma and a context h; z_0 = mu + sigma * eps, then for t = 1 .. K

    [m_t, s_t] = AutoregressiveNN_t(z_{t-1}, h)        (output j depends on z_{t-1, <j} only)
    g_t        = sigmoid(s_t)
    z_t        = g_t * z_{t-1} + (1 - g_t) * m_t

The Jacobian of each step is triangular with diagonal g_t, so the change of variables gives

    log q(z_K | x) = log N(z_0; mu, diag sigma^2) - sum_t sum_j log g_{t, j}

Its KL to any prior has no closed form: the ELBO uses the single-sample estimate
log q(z|x) - log p(z) at the reparametrised sample, and ``vaelab evaluate`` a many-sample mean
with its standard error (``kl.kl_q_p``, ``kl.kl_monte_carlo``), marked ``monte_carlo``.

The steps alternate the order of the dimensions (step t reads them reversed when t is even), so
every dimension can depend on every other after two steps. Sampling and log q at the sample are
one pass each; log q at any other z needs the inverse, D passes per step (the inverse of an
autoregressive step is sequential), which ``torch.distributions`` calls only for such z.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, TransformedDistribution, constraints
from torch.distributions.transforms import Transform
from torch.nn.functional import linear, logsigmoid

from vaelab import distributions as dist


class MADE(nn.Module):
    """An autoregressive network (Germain et al. 2015) with a context: z (*, D) and h (*, C) ->
    (m, s), each (*, D), where output j depends on z_i for i < j in ``order`` and on all of h."""

    def __init__(self, latent_dim: int, context_dim: int, hidden: int, reverse: bool):
        super().__init__()
        D = latent_dim
        degree_in = torch.arange(1, D + 1).flip(0) if reverse else torch.arange(1, D + 1)  # position in the order
        degree_hidden = torch.arange(hidden) % max(D - 1, 1) + 1 if D > 1 else torch.zeros(hidden, dtype=torch.long)
        self.register_buffer("mask_in", (degree_hidden[:, None] >= degree_in[None, :]).float())  # (H, D)
        self.register_buffer("mask_out", (degree_in[:, None] > degree_hidden[None, :]).float().repeat(2, 1))  # (2D, H)
        self.w_in = nn.Linear(D, hidden)
        self.w_context = nn.Linear(context_dim, hidden, bias=False)
        self.w_out = nn.Linear(hidden, 2 * D)
        with torch.no_grad():  # start close to the identity: g = sigmoid(2) = 0.88, m = 0
            self.w_out.weight.mul_(0.01)
            self.w_out.bias.zero_()
            self.w_out.bias[D:] = 2.0

    def forward(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.relu(linear(z, self.w_in.weight * self.mask_in, self.w_in.bias) + self.w_context(h))
        out = linear(hidden, self.w_out.weight * self.mask_out, self.w_out.bias).float()
        return out.chunk(2, dim=-1)  # m, s


class IAFStep(Transform):
    """z -> g * z + (1 - g) * m with (m, s) = made(z, h), g = sigmoid(s); event dimension 1.

    The forward pass keeps log g for ``log_abs_det_jacobian`` at that input; ``cache_size=1`` keeps
    the last (input, output) pair, so log q at a sample just drawn needs no inverse."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True

    def __init__(self, made: MADE, context: Tensor):
        super().__init__(cache_size=1)
        self.made, self.context = made, context
        self._last: tuple[Tensor, Tensor] | None = None  # (input, log g at it)

    def _gate(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self.made(z, self.context.expand(*z.shape[:-1], self.context.shape[-1]))

    def _call(self, z: Tensor) -> Tensor:
        m, s = self._gate(z)
        self._last = (z, logsigmoid(s))
        g = torch.sigmoid(s)
        return g * z + (1 - g) * m

    def _inverse(self, y: Tensor) -> Tensor:
        # sequential: output j needs inputs < j in the order; after pass i the first i inputs are exact
        z = y.clone()
        for _ in range(y.shape[-1]):
            m, s = self._gate(z)
            g = torch.sigmoid(s)
            z = (y - (1 - g) * m) / g
        return z

    def log_abs_det_jacobian(self, z: Tensor, y: Tensor) -> Tensor:
        if self._last is not None and self._last[0] is z:
            return self._last[1].sum(-1)
        return logsigmoid(self._gate(z)[1]).sum(-1)


class IAFPosterior(nn.Module):
    """The ``iaf`` entry of ``parts.POSTERIORS``: the encoder's output (B, 3 D) = (mu, log_var, h)
    -> q(z|x), a ``TransformedDistribution`` of N(mu, diag exp(log_var)) through ``steps`` IAF steps."""

    def __init__(self, latent_dim: int, steps: int, hidden: int | None = None):
        super().__init__()
        D = latent_dim
        hidden = hidden or max(4 * D, 16)
        self.latent_dim = D
        self.steps = nn.ModuleList(MADE(D, D, hidden, reverse=t % 2 == 1) for t in range(steps))

    def forward(self, h: Tensor) -> Distribution:
        D = self.latent_dim
        base = dist.diagonal_posterior(h[..., : 2 * D])  # log_var clamped as for the diagonal family
        context = h[..., 2 * D :]
        return TransformedDistribution(base, [IAFStep(made, context) for made in self.steps], validate_args=False)


def iaf_posterior(config) -> IAFPosterior:
    """The ``iaf`` posterior that ``config`` describes: ``latent_dim`` dimensions, ``flow_steps`` steps."""
    return IAFPosterior(config.latent_dim, config.flow_steps)
