r"""The linear-Gaussian latent model: an exact oracle for the VAE's identities.

    z ~ N(0, I_k),      x | z ~ N(W z + b, s^2 I_d)          (probabilistic PCA)

Everything is Gaussian, so the quantities a VAE can only bound are known exactly:

    p(x)     = N(b, W W^T + s^2 I_d)
    p(z | x) = N(m, C),  C = (I_k + W^T W / s^2)^{-1},  m = C W^T (x - b) / s^2

(Bishop, *Pattern Recognition and Machine Learning*, eqs. 2.113-2.117 and 12.42).
It has the same interface as a VAE (``encode`` is absent: q is whatever the caller
chooses), so objectives written for VAEs run on it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Independent, MultivariateNormal, Normal

from vaelab.distributions import standard_normal


@dataclass(frozen=True)
class LinearGaussian:
    W: Tensor  # (d, k)
    b: Tensor  # (d,)
    noise_var: float

    @classmethod
    def random(
        cls, data_dim: int, latent_dim: int, seed: int = 0, noise_var: float = 0.5, dtype=torch.float64
    ) -> LinearGaussian:
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(data_dim, latent_dim, generator=g, dtype=dtype)
        b = 0.5 * torch.randn(data_dim, generator=g, dtype=dtype)
        return cls(W, b, noise_var)

    @property
    def data_dim(self) -> int:
        return self.W.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.W.shape[1]

    def prior(self) -> Independent:
        return standard_normal(self.latent_dim, dtype=self.W.dtype)

    def decode(self, z: Tensor) -> Independent:
        """p(x | z) = N(W z + b, s^2 I)."""
        mean = z @ self.W.T + self.b
        return Independent(Normal(mean, self.noise_var**0.5), 1)

    def marginal(self) -> MultivariateNormal:
        """p(x) = N(b, W W^T + s^2 I)."""
        cov = self.W @ self.W.T + self.noise_var * torch.eye(self.data_dim, dtype=self.W.dtype)
        return MultivariateNormal(self.b, covariance_matrix=cov)

    def log_px(self, x: Tensor) -> Tensor:
        return self.marginal().log_prob(x)

    def posterior(self, x: Tensor) -> MultivariateNormal:
        """p(z | x) = N(C W^T (x - b) / s^2, C) with C = (I + W^T W / s^2)^{-1}."""
        precision = torch.eye(self.latent_dim, dtype=self.W.dtype) + self.W.T @ self.W / self.noise_var
        cov = torch.cholesky_inverse(torch.linalg.cholesky(precision))
        mean = (x - self.b) @ self.W @ cov / self.noise_var  # C symmetric: (C W^T (x-b))^T
        return MultivariateNormal(mean, covariance_matrix=cov)


def expected_log_likelihood(model: LinearGaussian, x: Tensor, mu_q: Tensor, cov_q: Tensor) -> Tensor:
    r"""E_{q(z)}[log p(x|z)] in closed form for q = N(mu_q, cov_q):

    .. math:: -\tfrac d2 \log(2\pi s^2) - \frac{1}{2 s^2}\big(\|x - W\mu_q - b\|^2
              + \operatorname{tr}(W \Sigma_q W^\top)\big)

    (the expected squared error splits into the error at the mean plus the variance
    that q's spread induces through W).
    """
    d, s2 = model.data_dim, model.noise_var
    residual = x - mu_q @ model.W.T - model.b
    spread = torch.einsum("ij,...jk,ik->...", model.W, cov_q, model.W)  # tr(W S W^T)
    return -0.5 * d * math.log(2 * math.pi * s2) - 0.5 / s2 * (residual.square().sum(-1) + spread)


@dataclass(frozen=True)
class LinearEncoderOracle:
    r"""The KL term's decomposition in closed form, for a linear Gaussian encoder on Gaussian data.

    With x ~ N(m, Sigma) and q(z|x) = N(A x + c, S), S diagonal, the aggregate posterior is
    Gaussian: q(z) = N(mu, C), mu = A m + c, C = A Sigma A^T + S (a linear map of a Gaussian plus
    independent Gaussian noise). Its marginals are q(z_j) = N(mu_j, C_jj). Entropies of
    Gaussians, H = 1/2 log det(2 pi e Cov), then give each term of
    E_x KL(q(z|x) || N(0, I)) = I + TC + sum_j KL_j:

        I    = H(z) - E_x H(z|x)         = 1/2 (log det C - log det S)
        TC   = sum_j H(z_j) - H(z)       = 1/2 (sum_j log C_jj - log det C)
        KL_j = KL(N(mu_j, C_jj) || N(0, 1)) = 1/2 (mu_j^2 + C_jj - 1 - log C_jj)

    and their sum is E_x of the closed-form KL of Kingma & Welling, App. B:
    1/2 E_x[tr S + |A x + c|^2 - D - log det S] = 1/2 (tr C + |mu|^2 - D - log det S).
    """

    A: Tensor  # (D, d)
    c: Tensor  # (D,)
    log_var: Tensor  # (D,), S = diag(exp(log_var))
    m: Tensor  # (d,), the data's mean
    cov_x: Tensor  # (d, d), the data's covariance

    def data(self) -> MultivariateNormal:
        return MultivariateNormal(self.m, covariance_matrix=self.cov_x)

    def posterior_params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log_var) of q(z|x) for each row of x (N, d): each (N, D)."""
        return x @ self.A.T + self.c, self.log_var.expand(x.shape[0], -1)

    @property
    def aggregate_mean(self) -> Tensor:
        return self.A @ self.m + self.c

    @property
    def aggregate_cov(self) -> Tensor:
        return self.A @ self.cov_x @ self.A.T + torch.diag(self.log_var.exp())

    @property
    def mutual_information(self) -> float:
        return 0.5 * (torch.logdet(self.aggregate_cov) - self.log_var.sum()).item()

    @property
    def total_correlation(self) -> float:
        C = self.aggregate_cov
        return 0.5 * (C.diagonal().log().sum() - torch.logdet(C)).item()

    @property
    def dimension_wise_kl_per_dim(self) -> Tensor:
        mu, var = self.aggregate_mean, self.aggregate_cov.diagonal()
        return 0.5 * (mu.square() + var - 1 - var.log())

    @property
    def average_kl(self) -> float:
        """E_x KL(q(z|x) || N(0, I)), from the closed form of the KL averaged over x."""
        C, mu = self.aggregate_cov, self.aggregate_mean
        return 0.5 * (C.trace() + mu.square().sum() - mu.shape[0] - self.log_var.sum()).item()

    @classmethod
    def random(cls, data_dim: int, latent_dim: int, seed: int = 0, scale: float = 0.6) -> LinearEncoderOracle:
        """Correlated data and an encoder that mixes its inputs, so I, TC and the KL_j are all > 0."""
        g = torch.Generator().manual_seed(seed)
        F64 = torch.float64
        root = torch.randn(data_dim, data_dim, generator=g, dtype=F64)
        cov_x = root @ root.T / data_dim + 0.1 * torch.eye(data_dim, dtype=F64)
        A = scale * torch.randn(latent_dim, data_dim, generator=g, dtype=F64)
        c = 0.3 * torch.randn(latent_dim, generator=g, dtype=F64)
        log_var = -1.0 + 0.3 * torch.randn(latent_dim, generator=g, dtype=F64)
        m = torch.randn(data_dim, generator=g, dtype=F64)
        return cls(A, c, log_var, m, cov_x)
