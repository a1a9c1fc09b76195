r"""The KL term taken apart (Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs").

Averaged over the data, with q(z) = E_x q(z|x) the aggregate posterior, q(z_j) its marginals
and a prior that factorises, p(z) = prod_j p(z_j):

    E_x KL(q(z|x) || p(z)) = I_q(x; z)                     index-code mutual information
                           + KL(q(z) || prod_j q(z_j))     total correlation (TC)
                           + sum_j KL(q(z_j) || p(z_j))    dimension-wise KL

Each term is an expectation over x and z ~ q(z|x) of a log-ratio,

    MI   = E[log q(z|x) - log q(z)]
    TC   = E[log q(z) - sum_j log q(z_j)]
    DWKL = E[sum_j (log q(z_j) - log p(z_j))]

so the three add up, sample by sample and exactly, to log q(z|x) - log p(z): a Monte Carlo
estimate of the average KL. (The first two terms together are Hoffman & Johnson's split,
I_q(x; z) + KL(q(z) || p(z)).)

q(z) = sum_m w_m q(z|x_m) is a mixture over examples; the estimators differ only in which
examples and which weights:

- **full data** (evaluation): every one of the N evaluated examples, w = 1/N. Biases: MI is at
  most log N, and each log q(z_n) includes the example's own component; both fade as N grows.
- **minibatch weighted sampling** (MWS, Chen et al. 2018): the M examples of a batch, each with
  w = 1/(N M), for q(z) and, per dimension, for every q(z_j). The weights sum to 1/N, not 1.
- **minibatch stratified sampling** (MSS): the mixture split into the example's own component,
  weight 1/N, and the N - 1 others, estimated by the batch's other M - 1 examples (drawn
  uniformly, without replacement), weight (N - 1) / (N (M - 1)) each. Each row sums to 1, the
  estimate of q(z) itself is unbiased, and at M = N it is the full-data estimator.

The weights multiply each component once: log w is added to log q(z|x_m) after the sum over
dimensions for q(z), and inside each dimension's mixture for q(z_j) (adding it per dimension
and then summing over dimensions counts it D times, a known bug of some implementations).
The minibatch estimators' bias, measured against the exact linear-Gaussian oracle
(``linear_gaussian.LinearEncoderOracle``), is stated in ``tests/test_decomposition.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vaelab.kl import LOG_2PI


def gaussian_log_density(z: Tensor, mu: Tensor, log_var: Tensor) -> Tensor:
    """log N(z | mu, exp(log_var)) per dimension (no sum), broadcasting."""
    return -0.5 * (LOG_2PI + log_var + (z - mu).square() * torch.exp(-log_var))


@dataclass(frozen=True)
class KLParts:
    """Per-example log densities at z_n ~ q(z|x_n), shapes (B,) and (B, D); the terms are properties."""

    log_q_z_given_x: Tensor  # log q(z_n | x_n), (B,)
    log_q_z: Tensor  # log q(z_n), the aggregate posterior's estimate, (B,)
    log_q_zj: Tensor  # log q(z_nj), its marginals, (B, D)
    log_p_zj: Tensor  # log p(z_nj), the prior's factors, (B, D)

    @property
    def mutual_information(self) -> Tensor:
        return self.log_q_z_given_x - self.log_q_z

    @property
    def total_correlation(self) -> Tensor:
        return self.log_q_z - self.log_q_zj.sum(-1)

    @property
    def dimension_wise_kl_per_dim(self) -> Tensor:
        return self.log_q_zj - self.log_p_zj

    @property
    def dimension_wise_kl(self) -> Tensor:
        return self.dimension_wise_kl_per_dim.sum(-1)

    @property
    def kl(self) -> Tensor:
        """log q(z|x) - log p(z): the single-sample estimate of the KL that the three terms add up to."""
        return self.log_q_z_given_x - self.log_p_zj.sum(-1)


def mixture_log_densities(
    z: Tensor, mu: Tensor, log_var: Tensor, log_w: Tensor, log_q_pairs: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """log q(z_i) = logsumexp_m [log q(z_i | x_m) + log w_im] and each marginal's
    log q(z_ij) = logsumexp_m [log q(z_ij | x_m) + log w_im].

    z (B, D) the samples; mu, log_var (M, D) the components' diagonal Gaussians (their marginals,
    for components with a full covariance, whose joint log densities log q(z_i | x_m) are then
    given as ``log_q_pairs`` (B, M)); log_w (B, M), or a scalar for equal weights. Returns (B,)
    and (B, D). Memory O(B M D).
    """
    per_dim = gaussian_log_density(z[:, None, :], mu[None], log_var[None])  # (B, M, D)
    joint = per_dim.sum(-1) if log_q_pairs is None else log_q_pairs
    log_w = torch.as_tensor(log_w, dtype=per_dim.dtype, device=per_dim.device)
    log_w = log_w.expand(z.shape[0], mu.shape[0])  # (B, M)
    log_q_z = torch.logsumexp(joint + log_w, dim=1)  # the weight once per component ...
    log_q_zj = torch.logsumexp(per_dim + log_w[:, :, None], dim=1)  # ... and once in each marginal
    return log_q_z, log_q_zj


DiagonalPrior = tuple[Tensor, Tensor] | None  # a diagonal Gaussian prior's (loc, log_var); None: N(0, I)


def _parts(z, mu_own, log_var_own, log_q_z, log_q_zj, prior: DiagonalPrior, log_q_own: Tensor | None = None) -> KLParts:
    loc, log_var = (torch.zeros_like(z), torch.zeros_like(z)) if prior is None else prior
    log_q_z_given_x = gaussian_log_density(z, mu_own, log_var_own).sum(-1) if log_q_own is None else log_q_own
    return KLParts(log_q_z_given_x, log_q_z, log_q_zj, gaussian_log_density(z, loc, log_var))


PairDensities = Callable[[slice], Tensor] | None  # rows -> log q(z_rows | x_m) for every m, (rows, M)


def decompose_full_data(
    z: Tensor,
    mu: Tensor,
    log_var: Tensor,
    chunk: int = 256,
    prior: DiagonalPrior = None,
    log_q_pairs: PairDensities = None,
) -> KLParts:
    """The full-data estimator: z_n ~ q(z|x_n) (N, D), and q(z) the mixture of all N posteriors
    with weights 1/N. O(N^2 D) time, in chunks of rows. ``log_q_pairs``: the joint densities of
    full-covariance posteriors (mu, log_var then hold their marginals)."""
    log_q_z, log_q_zj, log_q_own = full_data_mixture(z, mu, log_var, chunk, log_q_pairs)
    return _parts(z, mu, log_var, log_q_z, log_q_zj, prior, log_q_own)


def full_data_mixture(
    z: Tensor, mu: Tensor, log_var: Tensor, chunk: int = 256, log_q_pairs: PairDensities = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """log q(z_n) and log q(z_nj) with q the mixture of all N posteriors, weights 1/N, in chunks of
    rows; and, with ``log_q_pairs``, each sample's own log q(z_n | x_n) from the same pass."""
    log_w = torch.tensor(-math.log(mu.shape[0]), dtype=mu.dtype)  # 1/N in the inputs' precision (float64: exact)
    log_q_z, log_q_zj, log_q_own = [], [], []
    for i in range(0, z.shape[0], chunk):
        pairs = None if log_q_pairs is None else log_q_pairs(slice(i, i + chunk))  # (rows, N)
        joint, marginal = mixture_log_densities(z[i : i + chunk], mu, log_var, log_w, pairs)
        log_q_z.append(joint)
        log_q_zj.append(marginal)
        if pairs is not None:
            log_q_own.append(pairs.diagonal(offset=i))
    return torch.cat(log_q_z), torch.cat(log_q_zj), torch.cat(log_q_own) if log_q_own else None


def mws_log_weights(batch_size: int, dataset_size: int) -> Tensor:
    """Minibatch weighted sampling: every entry log(1 / (N M)), (M, M), in float64 (the caller rounds
    it once to its own precision)."""
    return torch.full((batch_size, batch_size), -math.log(dataset_size * batch_size), dtype=torch.float64)


def mss_log_weights(batch_size: int, dataset_size: int) -> Tensor:
    """Minibatch stratified sampling, (M, M): row i is sample i's mixture; its own component on the
    diagonal with weight 1/N, each of the M - 1 others (N - 1) / (N (M - 1)). Rows sum to 1."""
    M, N = batch_size, dataset_size
    if M < 2 or N < M:
        raise ValueError(f"stratified sampling needs 2 <= batch size <= data set size, got M={M}, N={N}")
    weights = torch.full((M, M), (N - 1) / (N * (M - 1)), dtype=torch.float64)  # rounded once by the caller
    weights.fill_diagonal_(1.0 / N)
    return weights.log()


MINIBATCH_ESTIMATORS = {"mss": mss_log_weights, "mws": mws_log_weights}


def decompose_minibatch(
    z: Tensor, mu: Tensor, log_var: Tensor, dataset_size: int, method: str, prior: DiagonalPrior = None
) -> KLParts:
    """The minibatch estimator ``method`` ('mss' or 'mws') for a batch: z (M, D) with z_i ~ q(z|x_i),
    the batch's own posteriors (mu, log_var) as the mixture's components."""
    log_w = MINIBATCH_ESTIMATORS[method](z.shape[0], dataset_size).to(z)
    return _parts(z, mu, log_var, *mixture_log_densities(z, mu, log_var, log_w), prior)


def decompose_categorical(index: Tensor, own_log_probs: Tensor, log_probs: Tensor, chunk: int = 256) -> KLParts:
    """The full-data estimator for categorical posteriors against a uniform prior: z_n (B, V) the
    categories drawn from each example's own q(z|x_n) (log probabilities ``own_log_probs`` (B, V, K)),
    q(z) the mixture of all M posteriors ``log_probs`` (M, V, K) with weights 1/M. Its marginals
    q(z_j) = 1/M sum_m q(z_j|x_m) are exact (K numbers per variable); log q(z_n) sums over the M
    components, O(B M V) in chunks of rows. The parts add up to log q(z_n|x_n) - log p(z_n) as for
    Gaussians (:class:`KLParts`); the dimensions are the V variables."""
    M, V, K = log_probs.shape
    log_m = math.log(M)
    flat = log_probs.flatten(1)  # (M, V K)
    at = index + torch.arange(V, device=index.device) * K  # (B, V): z_nj's column of the flattened table
    log_q_z = torch.cat(
        [torch.logsumexp(flat[:, at[i : i + chunk]].sum(-1), 0) - log_m for i in range(0, index.shape[0], chunk)]
    )
    marginal = (torch.logsumexp(log_probs, 0) - log_m).flatten()  # log q(z_j = k), (V K)
    log_q_own = own_log_probs.flatten(1).gather(1, at).sum(-1)
    log_p = torch.full(index.shape, -math.log(K), dtype=log_probs.dtype, device=log_probs.device)
    return KLParts(log_q_own, log_q_z, marginal[at], log_p)
