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
