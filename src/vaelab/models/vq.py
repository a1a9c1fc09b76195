r"""VQ-VAE (van den Oord, Vinyals & Kavukcuoglu 2017): the encoder's output is N positions of D numbers,
z_e; each position takes the nearest of K codebook vectors, z_q. Seen as a VAE, q(z|x) is one-hot on
that code (a point mass) and p(z) is uniform over the K codes of each position, so

    KL(q(z|x) || p(z)) = sum_j (log K - H(one-hot)) = N log K,

the same for every x: a rate of N log2 K bits chosen by design, constant, so absent from the
gradient. The loss is -log p(x|z_q) + commitment ||z_e - sg(z_q)||^2 with the straight-through
gradient z_q = z_e + sg(z_q - z_e); the codebook follows exponential moving averages of the
encoder outputs assigned to each code (the paper's appendix A.1), not the gradient.

Sampling needs a prior over codes that fits the data (the paper fits a PixelCNN). vaelab keeps the
simplest: a categorical per position of the codes' frequencies in training (``usage``, an
exponential moving average over the training batches with the codebook's decay), from which
``sample_codes`` draws.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional

from vaelab import distributed
from vaelab.distributions import Quantised

EMA_EPSILON = 1e-5  # Laplace smoothing of the codes' counts (the paper's Sonnet implementation)


class VQPosterior(nn.Module):
    """The ``vq`` entry of ``parts.POSTERIORS``: the encoder's output (B, N D) -> q(z|x), each of the N
    positions on its nearest code. In train mode each call also moves the codebook (and the codes'
    frequencies) by their moving averages, summed over every process under torchrun."""

    def __init__(self, positions: int, codes: int, code_dim: int, commitment: float, decay: float, seed: int = 0):
        super().__init__()
        self.variables, self.categories, self.code_dim = positions, codes, code_dim
        self.commitment, self.decay = commitment, decay
        g = torch.Generator().manual_seed(seed)
        codebook = torch.randn(codes, code_dim, generator=g)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(codes))  # moving average of each code's count
        self.register_buffer("code_sum", torch.zeros(codes, code_dim))  # ... and of the vectors assigned to it
        self.register_buffer("usage", torch.full((positions, codes), 1.0 / codes))  # codes' frequencies per position

    def forward(self, h: Tensor) -> Quantised:
        z_e = h.unflatten(-1, (self.variables, self.code_dim))
        distance = z_e.square().sum(-1, keepdim=True) - 2 * z_e @ self.codebook.T + self.codebook.square().sum(-1)
        index = distance.argmin(-1)  # (B, N)
        if self.training and torch.is_grad_enabled():
            self._update(z_e.detach(), index)
        return Quantised(z_e, index, self.codebook, self.commitment)

    @torch.no_grad()
    def _update(self, z_e: Tensor, index: Tensor) -> None:
        K, N, D = self.categories, self.variables, self.code_dim
        one_hot = functional.one_hot(index, K).to(z_e.dtype)  # (B, N, K)
        counts = torch.cat(
            [one_hot.sum((0, 1)), torch.einsum("bnk,bnd->kd", one_hot, z_e).flatten(), one_hot.sum(0).flatten()]
        )
        total = distributed.all_reduce_sum(torch.cat([counts, counts.new_tensor([len(z_e)])]))  # every rank's rows
        size, sums, per_position, examples = total[:K], total[K : K + K * D], total[K + K * D : -1], total[-1]
        keep = self.decay
        self.cluster_size.mul_(keep).add_(size, alpha=1 - keep)
        self.code_sum.mul_(keep).add_(sums.view(K, D), alpha=1 - keep)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + EMA_EPSILON) / (n + K * EMA_EPSILON) * n
        self.codebook.copy_(self.code_sum / smoothed.unsqueeze(-1))
        self.usage.mul_(keep).add_(per_position.view(N, K) / examples, alpha=1 - keep)

    def vectors(self, index: Tensor) -> Tensor:
        """z_q for codes ``index`` (..., N): the codebook vectors, flattened to (..., N D)."""
        return self.codebook[index].flatten(-2)

    def sample_codes(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of the N codes from the fitted prior, each position's frequencies: (n, N)."""
        return torch.multinomial(self.usage, n, replacement=True, generator=generator).T

    @staticmethod
    def perplexity(frequencies: Tensor) -> float:
        """exp(H) of the codes' frequencies (K,): the number of codes used, counted by their entropy."""
        p = frequencies / frequencies.sum()
        return math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())


def vq_posterior(config) -> VQPosterior:
    """The ``vq`` posterior that ``config`` describes: latent_dim positions, categories codes of code_dim."""
    return VQPosterior(
        config.latent_dim, config.categories, config.code_dim, config.commitment, config.ema_decay, config.seed
    )


def vq_posterior_of(model) -> VQPosterior | None:
    modules = model.modules() if isinstance(model, nn.Module) else ()
    return next((m for m in modules if isinstance(m, VQPosterior)), None)
