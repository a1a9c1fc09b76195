"""Looking at a trained model: decoded images, traversals, latent maps, a run's data.

Shared by ``vaelab report`` (static figures) and ``vaelab serve`` (the local web page).
Images are returned as numpy arrays (N, C, H, W) in [0, 1]: the mean of p(x|z).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from vaelab.config import Config
from vaelab.contract import given
from vaelab.errors import UserError
from vaelab.evaluation import (
    Evaluation,
    evaluate_trained,
    measure,
    open_trained,
    weights_sha256,
)
from vaelab.fileio import loads_finite
from vaelab.kl import KLResult
from vaelab.models.vq import vq_posterior_of
from vaelab.parts import POSTERIORS


@dataclass
class Run:
    """A trained run and its test split, ready to inspect."""

    path: Path
    model: torch.nn.Module
    config: Config
    test_x: torch.Tensor  # (N, C, H, W), binarised as in training
    test_y: torch.Tensor | None
    mu: torch.Tensor  # (N, D) posterior means of the test set
    log_var: torch.Tensor  # (N, D), of each marginal q(z_j|x)
    scale_tril: torch.Tensor | None  # (N, D, D), the Cholesky factors of a full-covariance q
    kl: KLResult  # the model's KL term per test image (every layer): per dimension where the prior factorises
    layer_means: dict[str, torch.Tensor]  # E_q[z_l | x] of each latent layer, (N, D_l), top first
    # the record of the test split that every number of the report and the page is read from: the run's
    # evaluation.json when it is of these weights, else measured here by the same function (no IWAE)
    measured: Evaluation
    measured_here: bool  # True: not from evaluation.json (run vaelab evaluate for log p(x))

    # mu, log_var and scale_tril are the top latent layer's (the only one of a one-layer model): the
    # layer that the traversals, the latent map and the page's sliders show
    @property
    def top_kl_per_dim(self) -> torch.Tensor | None:
        """The top layer's KL per dimension and test image, (N, D), or None where it does not factorise."""
        return None if self.kl.per_dim is None else self.kl.per_dim[:, : self.mu.shape[1]]

    @property
    def categories(self) -> int | None:
        """K, the categories of each variable of a categorical posterior; None for any other posterior."""
        return self.config.categories if POSTERIORS[self.config.posterior].discrete else None

    @property
    def vq(self):
        """The run's VQ-VAE posterior (its codebook, its codes' frequencies), or None."""
        return vq_posterior_of(self.model)

    def codes_of(self, x: torch.Tensor) -> torch.Tensor:
        """Discrete latents: each variable's most probable category (a VQ-VAE's code) for images x, (B, V)."""
        with torch.no_grad():
            return self.model.encode(x).probs.argmax(-1)

    def z_of(self, codes: torch.Tensor) -> torch.Tensor:
        """Discrete latents: the z the decoder sees for one code per variable, (n, V) -> a VQ-VAE's codebook
        vectors, or the categories one-hot."""
        if self.vq is not None:
            return self.vq.vectors(codes)
        return torch.nn.functional.one_hot(codes, self.categories).float().flatten(1)

    @property
    def layered(self) -> bool:
        return len(self.layer_means) > 1

    @property
    def model_y(self) -> torch.Tensor | None:
        """The labels a conditional model is given (the test labels); None for any other model."""
        return self.test_y if self.config.uses_labels else None

    @property
    def dims_by_kl(self) -> list[int]:
        """The top layer's dimensions, the largest average KL first; by activity (the variance of the
        posterior means) where the prior does not factorise, so that the KL has no per-dimension split."""
        per_dim = self.top_kl_per_dim
        score = self.mu.var(0) if per_dim is None else per_dim.mean(0)
        return torch.argsort(score, descending=True).tolist()

    def view(self, rows=slice(None)):
        """The model as the pictures see it: a conditional model with the labels of test images ``rows``
        bound (``contract.given``), any other model itself."""
        return given(self.model, None if self.model_y is None else self.model_y[rows])

    def metrics(self) -> list[dict]:
        path = self.path / "metrics.csv"
        if not path.exists():
            return []
        with open(path, newline="", errors="replace") as f:
            return [row for row in csv.DictReader(f) if _readable(row)]


def _readable(row: dict) -> bool:
    """A metrics.csv row the curves can draw: a whole epoch, a split, numbers (or blanks) for the terms.
    A row torn by a kill, or edited into something else, is left out of the figures."""
    try:
        int(row["epoch"])
        return row["split"] in ("train", "val") and all(
            row[k] == "" or math.isfinite(float(row[k])) for k in ("elbo", "reconstruction", "kl", "beta")
        )
    except (KeyError, TypeError, ValueError):
        return False


def read_evaluation(run_dir: Path) -> Evaluation | None:
    """The record ``vaelab evaluate`` wrote into ``run_dir``, or None if it has not run there."""
    path = Path(run_dir) / "evaluation.json"
    if not path.exists():
        return None
    try:
        return Evaluation.from_dict(loads_finite(path.read_text()))
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError) as err:
        raise UserError(
            f"{path} is torn or was edited ({type(err).__name__}); run vaelab evaluate {run_dir} to write it again"
        ) from None


def open_run(path: str | Path, max_examples: int = 2000) -> Run:
    """A trained run, its test split (at most ``max_examples`` images) and the record of it (:attr:`Run.measured`)."""
    path = Path(path)
    trained = open_trained(path)
    model, config, splits, pixels = trained.model, trained.config, trained.splits, trained.pixels
    test = trained.examples("test")[:max_examples]  # with the labels the model is given
    test_y = None if splits.test.y is None else splits.test.y[:max_examples]  # the data's, for the pictures
    one_pass = measure(model, test)  # the KL, the top layer's q and each layer's means, drawn as evaluate draws them
    (mu, log_var, scale_tril), means, kl = one_pass.top, one_pass.means, one_pass.kl
    measured = read_evaluation(path) if path.is_dir() else None
    here = measured is None or measured.split != "test" or measured.weights_sha256 not in (None, weights_sha256(path))
    if here:
        measured, _ = evaluate_trained(model, config, test, iwae_k=0, pixels=pixels)
        measured = replace(measured, data=splits.name, split="test", binarize=config.binarize, seed=0)
    return Run(path, model, config, test.x, test_y, mu, log_var, scale_tril, kl, means, measured, here)


KL_PARTS = ("mutual_information", "total_correlation", "dimension_wise_kl")


def kl_parts(run: Run) -> tuple[dict[str, float], list[float] | None] | None:
    """The test set's average KL taken apart, as the run's record has it (``evaluation.decompose_kl``,
    the full-data estimator): MI + TC + dimension-wise KL where the prior factorises, else MI +
    marginal KL; and the dimension-wise KL of each dimension (or None). With several latent layers
    these are the top layer's parts, and each lower layer's KL follows as one part (``kl_z1``), so
    the parts still add up to the KL term. None for a posterior that is not Gaussian (a flow), whose
    aggregate has no density to evaluate."""
    e = run.measured
    if e.mutual_information is None:
        return None
    names = KL_PARTS if e.total_correlation is not None else ("mutual_information", "marginal_kl")
    parts = {k: getattr(e, k) for k in names}
    for name in list(e.kl_per_layer or {})[1:]:  # the layers below the top, each one's KL
        parts[f"kl_{name}"] = e.kl_per_layer[name]
    return parts, e.dimension_wise_kl_per_dim


@torch.no_grad()
def decode_mean(model, z: torch.Tensor) -> np.ndarray:
    """The mean of p(x|z) for each z (N, D) of the top layer, as images (N, C, H, W) clipped to [0, 1]
    (for a hierarchical model, through the mean of p(z1|z2): ``HierarchicalVAE.decode``)."""
    return model.decode(z).mean.clamp(0, 1).numpy()


@torch.no_grad()
def traversals(model, z0: torch.Tensor, dims: list[int], values: np.ndarray) -> list[np.ndarray]:
    """For each dimension j: decoded images of z0 with z_j set to each value (in prior standard deviations)."""
    rows = []
    for j in dims:
        z = z0.repeat(len(values), 1)
        z[:, j] = torch.as_tensor(values, dtype=z.dtype)
        rows.append(decode_mean(model, z))
    return rows


@torch.no_grad()
def code_switches(model, z_of, codes0: torch.Tensor, variables: list[int], codes: list[int]) -> list[np.ndarray]:
    """Discrete latents (categorical variables, VQ-VAE's positions): for each variable j, decoded images of the
    codes ``codes0`` (1, V) with variable j switched to each code of ``codes`` in turn, the others kept;
    ``z_of`` turns codes into the z the decoder sees (:meth:`Run.z_of`)."""
    rows = []
    for j in variables:
        index = codes0.repeat(len(codes), 1)
        index[:, j] = torch.tensor(codes)
        rows.append(decode_mean(model, z_of(index)))
    return rows


def project_2d(mu: np.ndarray, method: str = "pca", seed: int = 0) -> tuple[np.ndarray, tuple[str, str]]:
    """2-D coordinates of posterior means: themselves when D = 2, else PCA (or t-SNE)."""
    if mu.shape[1] == 1:
        return np.stack([mu[:, 0], np.zeros(len(mu))], 1), ("z0", "")
    if mu.shape[1] == 2:
        return mu, ("z0", "z1")
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = min(30.0, max(2.0, (len(mu) - 1) / 3))
        return TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(mu), ("t-SNE 1", "t-SNE 2")
    from sklearn.decomposition import PCA

    pca = PCA(2, random_state=seed).fit(mu)
    share = pca.explained_variance_ratio_
    return pca.transform(mu), (f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%})")
