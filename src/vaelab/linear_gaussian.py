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

from vaelab.contract import Draw, LatentLayer
from vaelab.distributions import diag_normal, reparametrize, standard_normal
from vaelab.kl import kl_mvn


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


def mean_field_kl(posterior: MultivariateNormal) -> Tensor:
    r"""min over diagonal Gaussians q of KL(q || p) for a Gaussian p = N(m, C): the mean-field gap, where
    maximising the ELBO over a diagonal q stops. The minimiser has p's mean and the variances
    1 / (C^-1)_jj, the inverse of the precision's diagonal (Bishop, PRML section 10.1.2), so

    .. math:: \min_q \mathrm{KL} = \tfrac12 \big(\textstyle\sum_j \log (C^{-1})_{jj} - \log\det C^{-1}\big)

    which is 0 exactly when C is diagonal."""
    precision = torch.linalg.inv(posterior.covariance_matrix)
    best = torch.diag_embed(1.0 / precision.diagonal(dim1=-2, dim2=-1))
    return kl_mvn(posterior.mean, best, posterior.mean, posterior.covariance_matrix)


def approximation_gap(precision: Tensor) -> Tensor:
    r"""log p(x) - max over diagonal Gaussians q of ELBO(q): what the diagonal family itself cannot reach
    (Cremer et al. 2018's approximation gap) for a Gaussian posterior of precision Λ (k, k),

    .. math:: \tfrac12 \big(\textstyle\sum_i \log \Lambda_{ii} - \log\det \Lambda\big)

    (Hadamard's inequality makes it >= 0; it is 0 exactly when Λ is diagonal, which for the linear-Gaussian
    model, Λ = I + W^T W / s^2, means W's columns are orthogonal). :func:`mean_field_kl` reaches the same
    number through the best q itself."""
    return 0.5 * (precision.diagonal(dim1=-2, dim2=-1).log().sum(-1) - torch.logdet(precision))


def amortization_gap(m: Tensor, v: Tensor, mean: Tensor, precision: Tensor) -> Tensor:
    r"""ELBO(q*) - ELBO(q) for a diagonal q = N(m, diag v) against the best diagonal q* = N(μ, diag 1/Λ_ii),
    for a Gaussian posterior N(μ, Λ^{-1}): what an encoder that outputs (m, v) loses to the best member of
    its own family (Cremer et al. 2018's amortization gap),

    .. math:: \tfrac12 \textstyle\sum_i (\Lambda_{ii} v_i - 1 - \log \Lambda_{ii} v_i)
              + \tfrac12 (m - \mu)^\top \Lambda (m - \mu)

    KL(q || p(z|x)) = ½ [tr(Λ V) + (m-μ)ᵀΛ(m-μ) - k - log det Λ - Σ log v_i], less its minimum over v and m
    (the approximation gap). Each term is >= 0 and both vanish at q = q*."""
    lv = precision.diagonal(dim1=-2, dim2=-1) * v
    d = m - mean
    return 0.5 * (lv - 1 - lv.log()).sum(-1) + 0.5 * torch.einsum("...i,...ij,...j->...", d, precision, d)


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


@dataclass(frozen=True)
class TwoLevelLinearGaussian:
    r"""Two latent layers, all linear and Gaussian: the exact oracle of the hierarchical VAE.

        z2 ~ N(0, I_k2),    z1 | z2 ~ N(A z2 + a, s1^2 I_k1),    x | z1 ~ N(W z1 + b, s^2 I_d)

    z1 is a linear-Gaussian function of z2 and x of z1, so everything is Gaussian again:

        p(x)         = N(W a + b,  W (A A^T + s1^2 I) W^T + s^2 I)
        p(z2 | x)    : z2 -> x is linear-Gaussian with weights W A and noise N = s1^2 W W^T + s^2 I,
                       C2 = (I + (W A)^T N^-1 W A)^-1,  m2 = C2 (W A)^T N^-1 (x - W a - b)
        p(z1 | x, z2) ∝ p(z1 | z2) p(x | z1):
                       C1 = (I / s1^2 + W^T W / s^2)^-1,  m1 = C1 ((A z2 + a) / s1^2 + W^T (x - b) / s^2)

    (Bishop, PRML eqs. 2.113-2.117 for each step.) ``posterior_shift`` moves the means of the
    model's own q away from these, for an imperfect q.

    The same posterior factors bottom-up too (``inference`` "bottom-up"), since x depends on z2 only
    through z1:

        p(z1 | x)    : z1 ~ N(a, S1), S1 = A A^T + s1^2 I, -> x linear-Gaussian:
                       C1' = (S1^-1 + W^T W / s^2)^-1,  m1' = C1' (S1^-1 a + W^T (x - b) / s^2)
        p(z2 | z1)   : C2' = (I + A^T A / s1^2)^-1,  m2' = C2' A^T (z1 - a) / s1^2
    """

    A: Tensor  # (k1, k2)
    a: Tensor  # (k1,)
    var1: float  # s1^2
    W: Tensor  # (d, k1)
    b: Tensor  # (d,)
    var: float  # s^2
    posterior_shift: float = 0.0
    inference: str = "top-down"  # or "bottom-up": the order in which latents() infers the layers

    @classmethod
    def random(cls, data_dim: int = 5, dims: tuple[int, int] = (3, 2), seed: int = 0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        k1, k2 = dims
        A = torch.randn(k1, k2, generator=g, dtype=dtype)
        a = 0.5 * torch.randn(k1, generator=g, dtype=dtype)
        W = torch.randn(data_dim, k1, generator=g, dtype=dtype)
        b = 0.5 * torch.randn(data_dim, generator=g, dtype=dtype)
        return cls(A, a, 0.4, W, b, 0.5)

    def _eye(self, n: int) -> Tensor:
        return torch.eye(n, dtype=self.W.dtype)

    def marginal(self) -> MultivariateNormal:
        cov_z1 = self.A @ self.A.T + self.var1 * self._eye(self.A.shape[0])
        cov = self.W @ cov_z1 @ self.W.T + self.var * self._eye(self.W.shape[0])
        return MultivariateNormal(self.W @ self.a + self.b, covariance_matrix=cov)

    def log_px(self, x: Tensor) -> Tensor:
        return self.marginal().log_prob(x)

    def posterior_top(self, x: Tensor) -> MultivariateNormal:
        """p(z2 | x), batch (B,)."""
        WA = self.W @ self.A
        N = self.var1 * self.W @ self.W.T + self.var * self._eye(self.W.shape[0])
        N_inv_WA = torch.linalg.solve(N, WA)
        C2 = torch.linalg.inv(self._eye(self.A.shape[1]) + WA.T @ N_inv_WA)
        m2 = (x - self.W @ self.a - self.b) @ N_inv_WA @ C2  # C2 symmetric
        return MultivariateNormal(m2 + self.posterior_shift, covariance_matrix=C2)

    def posterior_bottom(self, x: Tensor, z2: Tensor) -> MultivariateNormal:
        """p(z1 | x, z2), batch (*S, B) for z2 (*S, B, k2)."""
        C1 = torch.linalg.inv(self._eye(self.A.shape[0]) / self.var1 + self.W.T @ self.W / self.var)
        m1 = ((z2 @ self.A.T + self.a) / self.var1 + (x - self.b) @ self.W / self.var) @ C1
        return MultivariateNormal(m1 - self.posterior_shift, covariance_matrix=C1)

    def posterior_z1(self, x: Tensor) -> MultivariateNormal:
        """p(z1 | x), batch (B,): bottom-up inference's first step."""
        k1 = self.A.shape[0]
        S1_inv = torch.linalg.inv(self.A @ self.A.T + self.var1 * self._eye(k1))
        C = torch.linalg.inv(S1_inv + self.W.T @ self.W / self.var)
        m = (S1_inv @ self.a + (x - self.b) @ self.W / self.var) @ C
        return MultivariateNormal(m + self.posterior_shift, covariance_matrix=C)

    def posterior_z2(self, z1: Tensor) -> MultivariateNormal:
        """p(z2 | z1) = p(z2 | x, z1), batch (*S, B) for z1 (*S, B, k1): bottom-up inference's second step."""
        C = torch.linalg.inv(self._eye(self.A.shape[1]) + self.A.T @ self.A / self.var1)
        m = ((z1 - self.a) @ self.A / self.var1) @ C
        return MultivariateNormal(m + self.posterior_shift, covariance_matrix=C)

    def kl_q_posterior(self, x: Tensor) -> Tensor:
        r"""KL(q(z1, z2|x) || p(z1, z2|x)) of the model's own q, exactly: with every mean shifted by delta,
        1/2 delta^2 (1^T C2^-1 1 + 1^T C1^-1 1) (the two layers' shifts of equal-covariance Gaussians; the
        second does not depend on z2). So E_q[ELBO] = log p(x) - this."""
        z2, z1 = x.new_zeros(self.A.shape[1]), x.new_zeros(self.A.shape[0])
        quad = 0.0
        pair = (
            (self.posterior_z1(x[:1]), self.posterior_z2(z1[None]))
            if self.inference == "bottom-up"
            else (self.posterior_top(x[:1]), self.posterior_bottom(x[:1], z2))
        )
        for q in pair:  # covariances do not depend on x
            C = q.covariance_matrix[0]
            delta = torch.full(C.shape[:1], self.posterior_shift, dtype=C.dtype)
            quad = quad + delta @ torch.linalg.solve(C, delta)
        return (0.5 * quad).expand(x.shape[:-1])

    # -- the model contract (contract.LatentVariableModel), q = the exact posterior (shifted) --------
    def latents(self, x: Tensor, draw: Draw) -> list[LatentLayer]:
        if self.inference == "bottom-up":
            q1 = self.posterior_z1(x)
            z1 = draw(q1)
            q2 = self.posterior_z2(z1)
            z2 = reparametrize(q2, draw(standard_normal(self.A.shape[1], dtype=x.dtype, batch=(x.shape[0],))))
            p1 = Independent(Normal(z2 @ self.A.T + self.a, self.var1**0.5), 1)
            return [
                LatentLayer("z2", q2, standard_normal(self.A.shape[1], dtype=x.dtype), z2),
                LatentLayer("z1", q1, p1, z1, closed_form=False),
            ]
        q2 = self.posterior_top(x)
        z2 = draw(q2)
        q1 = self.posterior_bottom(x, z2)
        p1 = Independent(Normal(z2 @ self.A.T + self.a, self.var1**0.5), 1)
        z1 = reparametrize(q1, draw(standard_normal(self.A.shape[0], dtype=x.dtype, batch=(x.shape[0],))))
        return [
            LatentLayer("z2", q2, standard_normal(self.A.shape[1], dtype=x.dtype), z2),
            LatentLayer("z1", q1, p1, z1),
        ]

    def log_px_given_z(self, layers: list[LatentLayer], x: Tensor) -> Tensor:
        mean = layers[-1].z @ self.W.T + self.b
        return Independent(Normal(mean, self.var**0.5), 1).log_prob(x)


# -- the linear beta-VAE: its optimum in closed form ------------------------------------------
@dataclass(frozen=True)
class RateDistortion:
    """Rate R = E_x KL(q(z|x) || p(z)) and distortion D = -E_x E_q log p(x|z), nats per example."""

    rate_per_dim: Tensor  # (k,)
    distortion: float

    @property
    def rate(self) -> float:
        return float(self.rate_per_dim.sum())


def linear_vae_terms(W: Tensor, V: Tensor, log_var: Tensor, cov: Tensor, noise_var: float) -> tuple[Tensor, Tensor]:
    """(rate per dimension (k,), distortion) of the linear VAE p(x|z) = N(W z + m, s^2 I),
    q(z|x) = N(V (x - m), diag exp(log_var)), exactly, over data of mean m and covariance ``cov``
    (differentiable): E m m^T = V cov V^T, and
    E ||x - m - W z||^2 = tr((I - W V) cov (I - W V)^T) + sum_j ||w_j||^2 exp(log_var_j)."""
    d = cov.shape[0]
    var = log_var.exp()
    mean_sq = torch.einsum("jd,de,je->j", V, cov, V)  # E_x [m_j(x)^2]
    rate_per_dim = 0.5 * (mean_sq + var - 1 - log_var)
    A = torch.eye(d, dtype=cov.dtype) - W @ V
    squared = torch.trace(A @ cov @ A.T) + (W.square().sum(0) * var).sum()
    return rate_per_dim, 0.5 * d * math.log(2 * math.pi * noise_var) + squared / (2 * noise_var)


def linear_vae_rate_distortion(W: Tensor, V: Tensor, log_var: Tensor, cov: Tensor, noise_var: float) -> RateDistortion:
    rate_per_dim, distortion = linear_vae_terms(W, V, log_var, cov, noise_var)
    return RateDistortion(rate_per_dim.detach(), float(distortion))


def beta_vae_optimum(cov: Tensor, noise_var: float, beta: float, latent_dim: int) -> RateDistortion:
    """The global optimum of D + beta R for the linear VAE with a diagonal posterior and a fixed noise
    variance s^2 (Lucas et al. 2019, "Don't Blame the ELBO!", with their beta = 1 solution at s^2 -> beta s^2:
    dividing D + beta R by beta leaves the beta = 1 objective of noise variance beta s^2).

    With cov's eigenvalues lambda_1 >= ... and eigenvectors u_i, dimension i of z keeps
    w_i = u_i sqrt(lambda_i - beta s^2), q's variance beta s^2 / lambda_i and rate 1/2 log(lambda_i / (beta s^2))
    where lambda_i > beta s^2, and collapses (w_i = 0, q = p(z_i), rate 0) where lambda_i <= beta s^2."""
    lam, U = torch.linalg.eigh(cov)
    lam, U = lam.flip(0)[:latent_dim], U.flip(1)[:, :latent_dim]
    if len(lam) < latent_dim:  # more latent dimensions than data dimensions: the rest collapse
        pad = latent_dim - len(lam)
        lam = torch.cat([lam, lam.new_zeros(pad)])
        U = torch.cat([U, U.new_zeros(U.shape[0], pad)], 1)
    floor = beta * noise_var
    active = lam > floor
    W = U * torch.where(active, lam - floor, torch.zeros_like(lam)).clamp(min=0).sqrt()
    var = torch.where(active, floor / lam.clamp(min=floor), torch.ones_like(lam))
    V = (var / floor).unsqueeze(1) * W.T  # the posterior mean of the model of noise variance beta s^2
    return linear_vae_rate_distortion(W, V, var.log(), cov, noise_var)


class LinearVAE(torch.nn.Module):
    """The linear VAE of Lucas et al. 2019 as a model vaelab trains (``contract.LatentVariableModel``):
    q(z|x) = N(V (x - m), diag exp(log_var)) (a variance that does not depend on x), p(z) = N(0, I),
    p(x|z) = N(W z + m, s^2 I) with s^2 fixed; m is the data's mean."""

    def __init__(self, mean: Tensor, latent_dim: int, noise_var: float, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = mean.shape[0]
        self.register_buffer("mean", mean.clone())
        self.W = torch.nn.Parameter(0.1 * torch.randn(d, latent_dim, generator=g, dtype=mean.dtype))
        self.V = torch.nn.Parameter(0.1 * torch.randn(latent_dim, d, generator=g, dtype=mean.dtype))
        self.log_var = torch.nn.Parameter(torch.zeros(latent_dim, dtype=mean.dtype))
        self.noise_var = noise_var

    def latents(self, x: Tensor, draw: Draw) -> list[LatentLayer]:
        q = diag_normal((x - self.mean) @ self.V.T, self.log_var.expand(x.shape[0], -1))
        return [LatentLayer("z", q, standard_normal(self.log_var.shape[0], dtype=self.mean.dtype), draw(q))]

    def log_px_given_z(self, layers: list[LatentLayer], x: Tensor) -> Tensor:
        loc = layers[0].z @ self.W.T + self.mean
        return Normal(loc, self.noise_var**0.5).log_prob(x).sum(-1)

    def rate_distortion(self, cov: Tensor) -> RateDistortion:
        """R and D exactly, over data of this mean and covariance ``cov``."""
        return linear_vae_rate_distortion(self.W.detach(), self.V.detach(), self.log_var.detach(), cov, self.noise_var)
