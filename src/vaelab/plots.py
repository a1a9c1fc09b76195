"""Figures as pure functions: arrays and results in, a matplotlib Figure out.

Uses the Agg backend (no display needed). Embedding is the caller's job (:func:`to_svg`).
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

COLORS = {"q": "#d95f02", "posterior": "#1b9e77", "prior": "#7570b3", "elbo": "#d95f02", "log_px": "#1b9e77"}
LABELS = {"q": "q(z|x)", "posterior": "exact posterior p(z|x)", "prior": "prior p(z) = N(0, I)"}


def to_svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _ellipse(mean: np.ndarray, cov: np.ndarray, n_std: float) -> np.ndarray:
    """Points on the n_std contour of a 2-D Gaussian, (200, 2)."""
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, 200)
    circle = np.stack([np.cos(t), np.sin(t)], 1)
    return mean + n_std * circle * np.sqrt(np.maximum(vals, 0)) @ vecs.T


def gaussians_2d(named: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Figure:
    """1- and 2-standard-deviation contours of 2-D Gaussians given as {name: (mean, cov)},
    name one of "q", "posterior", "prior"."""
    fig, ax = plt.subplots(figsize=(5, 4.6))
    for name, (mean, cov) in named.items():
        color = COLORS[name]
        for n_std, style in ((1, "-"), (2, ":")):
            pts = _ellipse(mean, cov, n_std)
            ax.plot(pts[:, 0], pts[:, 1], style, color=color, label=LABELS[name] if n_std == 1 else None)
        ax.plot(*mean, "o", color=color, ms=4)
    ax.set_xlabel("z₁")
    ax.set_ylabel("z₂")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8, title="solid: 1σ, dotted: 2σ", title_fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def gaussians_1d(named: dict[str, tuple[float, float]], title: str) -> Figure:
    """Densities of 1-D Gaussians given as {name: (mean, variance)}."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    lo = min(m - 4 * v**0.5 for m, v in named.values())
    hi = max(m + 4 * v**0.5 for m, v in named.values())
    t = np.linspace(lo, hi, 400)
    for name, (m, v) in named.items():
        density = np.exp(-0.5 * (t - m) ** 2 / v) / np.sqrt(2 * np.pi * v)
        ax.plot(t, density, color=COLORS[name], label=LABELS[name])
    ax.set_xlabel("z")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def elbo_gap(elbo: list[float], log_px: float, mean_field_gap: float) -> Figure:
    """ELBO during maximisation over q against the fixed log p(x) (left), and the gap (right, log scale)."""
    gap = np.maximum(log_px - np.asarray(elbo), 1e-16)
    last = int(np.argmax(np.abs(np.diff(elbo, append=elbo[-1])) < 1e-12)) + 3  # a few steps past convergence
    steps = np.arange(min(len(elbo), max(last, 5)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(steps, np.asarray(elbo)[steps], "o-", ms=3, color=COLORS["elbo"], label="ELBO(q)")
    ax1.axhline(log_px, color=COLORS["log_px"], label="log p(x), exact and fixed")
    ax1.set_ylabel("nats")
    ax1.set_title("ELBO rises towards log p(x)", fontsize=10)
    ax1.legend(fontsize=8, loc="lower right")
    ax2.semilogy(steps, gap[steps], "o-", ms=3, color=COLORS["elbo"], label="gap = log p(x) − ELBO = KL[q ‖ p(z|x)]")
    if mean_field_gap > 1e-12:
        ax2.axhline(mean_field_gap, color="grey", ls="--", label=f"mean-field gap {mean_field_gap:.4f}")
        ax2.set_title("the gap stops at the mean-field gap, not 0", fontsize=10)
    else:  # a diagonal q can equal a diagonal posterior (e.g. one latent dimension)
        ax2.set_title("p(z|x) is diagonal here: the gap closes to 0", fontsize=10)
    ax2.set_ylabel("nats (log scale)")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xlabel("L-BFGS step over a diagonal q")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


# -- figures of a trained run (vaelab report) -------------------------------------------------------
def to_png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def training_curves(rows: list[dict]) -> Figure:
    """Reconstruction, KL, ELBO and beta per epoch, train and validation, from metrics.csv rows."""
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.3))
    panels = [("reconstruction", "E_q[log p(x|z)]"), ("kl", "KL(q(z|x) ‖ p(z))"), ("elbo", "ELBO"), ("beta", "β")]
    for ax, (key, title) in zip(axes, panels, strict=True):
        for split, style in (("train", "-"), ("val", "--")):
            pts = [(int(r["epoch"]) + 1, float(r[key])) for r in rows if r["split"] == split and r[key] != ""]
            if pts and (key != "beta" or split == "train"):
                ax.plot(*zip(*pts, strict=True), style, label=split if key != "beta" else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per example" if key != "beta" else "weight of the KL")
        ax.grid(alpha=0.3)
        if key != "beta":
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def kl_per_dimension(
    kl: np.ndarray,
    active: np.ndarray | None,
    ylabel: str = "average KL (nats)",
    names: list[str] | None = None,
    ceiling: float | None = None,
) -> Figure:
    """Bars of the average KL of each latent dimension (or another per-dimension score, named by
    ``ylabel``), largest first; active units coloured. ``names``: the dimensions' labels (z0, z1, ...);
    ``ceiling``: the most a dimension's KL can be (log K for a categorical variable), a dashed line."""
    names = names or [f"z{j}" for j in range(len(kl))]
    order = np.argsort(-kl)
    fig, ax = plt.subplots(figsize=(max(5, 0.3 * len(kl) + 2), 3.2))
    colors = ["#d95f02" if active is None or active[j] else "#bbbbbb" for j in order]
    ax.bar(range(len(kl)), kl[order], color=colors)
    ax.set_xticks(range(len(kl)), [names[j] for j in order], rotation=90, fontsize=7)
    ax.set_ylabel(ylabel)
    if ceiling is not None:
        ax.axhline(ceiling, color="#555555", ls="--", lw=1, label=f"log K = {ceiling:.2f}, the most a variable costs")
        ax.legend(fontsize=8, loc="upper right")
    title = f"{ylabel.split(' (')[0]} per latent {'variable' if ceiling is not None else 'dimension'}, sorted"
    if active is not None:
        title += f": {int(active.sum())} active (orange), {int((~active).sum())} inactive (grey)"
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig


def _show(ax, image: np.ndarray) -> None:
    """One image (C, H, W) in [0, 1]."""
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(np.clip(image.transpose(1, 2, 0), 0, 1))
    ax.set_xticks([])
    ax.set_yticks([])


def image_rows(rows: list[tuple[str, np.ndarray]], title: str) -> Figure:
    """Rows of images (N, C, H, W), each row labelled on its left."""
    n = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(0.9 * n + 1, 0.95 * len(rows) + 0.5), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for c in range(n):
            ax = axes[r, c]
            if c < len(images):
                _show(ax, images[c])
            else:
                ax.axis("off")
        axes[r, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    fig.suptitle(title, fontsize=10)
    return fig


def latent_scatter(points: np.ndarray, labels: np.ndarray | None, xlabel: str, ylabel: str, title: str) -> Figure:
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.7)
    else:
        sc = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=6, alpha=0.8)
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def manifold(images: np.ndarray, values: np.ndarray) -> Figure:
    """Decoded images over a grid of (z1, z2); images (n, n, C, H, W), rows from high z2 to low."""
    n = images.shape[0]
    fig, axes = plt.subplots(n, n, figsize=(0.6 * n + 1, 0.6 * n + 1))
    for r in range(n):
        for c in range(n):
            _show(axes[r, c], images[r, c])
    for c in range(n):
        axes[-1, c].set_xlabel(f"{values[c]:.1f}", fontsize=7)
    for r in range(n):
        axes[r, 0].set_ylabel(f"{values[n - 1 - r]:.1f}", fontsize=7, rotation=0, ha="right")
    fig.suptitle("decoded means over the 2-D latent space (z0 across, z1 up)", fontsize=10)
    return fig


def posterior_against_prior(
    images: np.ndarray,
    mu: np.ndarray,
    log_var: np.ndarray,
    dims: list[int],
    prior_samples: np.ndarray | None = None,
    row_titles: list[str] | None = None,
) -> Figure:
    """For each image (row): the image, then q(z_j|x) for each dimension j in ``dims`` against the prior.

    With ``prior_samples`` None the prior is N(0, I) and each panel says its closed-form
    KL_j = mu^2/2 + (sigma^2 - 1 - log sigma^2)/2. Otherwise (a prior that does not factorise)
    each panel shows the prior's marginal p(z_j) as a histogram of ``prior_samples`` (S, D),
    and the KL, which has no per-dimension split, goes in ``row_titles``.
    """
    n, d = len(images), len(dims)
    fig, axes = plt.subplots(n, d + 1, figsize=(1.7 * (d + 1), 1.35 * n + 0.4), squeeze=False)
    t = np.linspace(-4, 4, 300)
    prior = np.exp(-0.5 * t**2) / np.sqrt(2 * np.pi)
    for r in range(n):
        _show(axes[r, 0], images[r])
        if row_titles is not None:
            axes[r, 0].set_title(row_titles[r], fontsize=6)
        for c, j in enumerate(dims):
            ax = axes[r, c + 1]
            m, v = mu[r, j], np.exp(log_var[r, j])
            q = np.exp(-0.5 * (t - m) ** 2 / v) / np.sqrt(2 * np.pi * v)
            if prior_samples is None:
                ax.plot(t, prior, color=COLORS["prior"], lw=1)
                kl = 0.5 * (m * m + v - 1 - log_var[r, j])
                ax.set_title(f"z{j}: KL {kl:.2f}", fontsize=7)
            else:
                ax.hist(prior_samples[:, j], bins=60, range=(-4, 4), density=True, color=COLORS["prior"], alpha=0.5)
                ax.set_title(f"z{j}", fontsize=7)
            ax.plot(t, q, color=COLORS["q"], lw=1)
            ax.set_xticks([-3, 0, 3])
            ax.set_yticks([])
            ax.tick_params(labelsize=6)
    prior_name = "the prior N(0, 1)" if prior_samples is None else "the prior's marginal p(z_j)"
    fig.suptitle(f"q(z_j|x) (orange) against {prior_name} (purple), dimensions with the most KL", fontsize=9)
    fig.tight_layout()
    return fig


def codebook_usage(frequencies: np.ndarray, perplexity: float, dead: int) -> Figure:
    """Bars of each code's share of the evaluated images' positions, most used first; dead codes grey."""
    order = np.argsort(-frequencies)
    fig, ax = plt.subplots(figsize=(max(5, 0.12 * len(frequencies) + 2), 3.2))
    colors = ["#d95f02" if frequencies[k] > 0 else "#bbbbbb" for k in order]
    ax.bar(range(len(frequencies)), frequencies[order], color=colors)
    ax.axhline(1 / len(frequencies), color=COLORS["prior"], lw=1, label="uniform: 1/K")
    ax.set_xlabel("codes, most used first")
    ax.set_ylabel("share of the positions")
    ax.set_title(f"codebook usage: perplexity {perplexity:.1f} of {len(frequencies)} codes, {dead} dead", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return fig


def categorical_posteriors(images: np.ndarray, probs: np.ndarray, variables: list[int], kl: np.ndarray) -> Figure:
    """For each image (row): the image, then q(z_j = k|x) over the K categories of each variable j in
    ``variables`` as bars against the uniform prior 1/K, titled with its KL, log K - H(q(z_j|x))."""
    n, d, K = len(images), len(variables), probs.shape[-1]
    fig, axes = plt.subplots(n, d + 1, figsize=(1.7 * (d + 1), 1.35 * n + 0.4), squeeze=False)
    for r in range(n):
        _show(axes[r, 0], images[r])
        for c, j in enumerate(variables):
            ax = axes[r, c + 1]
            ax.bar(range(K), probs[r, j], color=COLORS["q"], width=0.8)
            ax.axhline(1 / K, color=COLORS["prior"], lw=1)
            ax.set_ylim(0, 1)
            ax.set_title(f"z{j}: KL {kl[r, j]:.2f}", fontsize=7)
            ax.set_xticks(range(K) if K <= 10 else [0, K - 1])
            ax.set_yticks([])
            ax.tick_params(labelsize=6)
    fig.suptitle(
        f"q(z_j = k|x) (orange) against the uniform prior 1/{K} (purple), variables with the most KL", fontsize=9
    )
    fig.tight_layout()
    return fig


def kl_decomposition(parts: dict[str, float], reconstruction: float, kl: float, per_dim: np.ndarray | None) -> Figure:
    """Left: the negative ELBO as a stacked bar, -E_q[log p(x|z)] + KL (``kl``: the model's own KL term),
    and below it, on its own scale, the KL's estimate from its parts (``parts``: name -> nats, in order) as
    a stacked bar. Right, where given: the dimension-wise KL of each dimension, largest first."""
    fig = plt.figure(figsize=(11 if per_dim is not None else 6, 3.4))
    grid = fig.add_gridspec(2, 2 if per_dim is not None else 1, width_ratios=[1, 1] if per_dim is not None else [1])
    estimate = sum(parts.values())
    colors = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"]
    for row, (title, pieces, palette) in enumerate(
        (
            (
                f"−ELBO = {kl - reconstruction:.2f} nats",
                {"−reconstruction": -reconstruction, "KL": kl},
                ["#bbbbbb", "#444444"],
            ),
            (f"KL taken apart: its parts add up to {estimate:.2f} nats, a one-z-per-image estimate", parts, colors),
        )
    ):
        ax = fig.add_subplot(grid[row, 0])
        left = 0.0
        for (name, value), color in zip(pieces.items(), palette, strict=False):
            ax.barh([0], [value], left=left, color=color, label=f"{name} {value:.2f}")
            left += value
        ax.set_yticks([])
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set_xlabel("nats per example")
    if per_dim is not None:
        ax = fig.add_subplot(grid[:, 1])
        order = np.argsort(-per_dim)
        ax.bar(range(len(per_dim)), per_dim[order], color=colors[2])
        ax.set_xticks(range(len(per_dim)), [f"z{j}" for j in order], rotation=90, fontsize=7)
        ax.set_ylabel("KL(q(z_j) ‖ p(z_j)) (nats)")
        ax.set_title("dimension-wise KL of the aggregate posterior, sorted", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def correlation_matrices(images: np.ndarray, correlations: np.ndarray) -> Figure:
    """For each image (column): the image, and the correlation matrix of its q(z|x), (n, D, D) in [-1, 1]."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.2 * n, 4.6), squeeze=False)
    for i in range(n):
        _show(axes[0, i], images[i])
        im = axes[1, i].imshow(correlations[i], cmap="RdBu_r", vmin=-1, vmax=1)
        axes[1, i].set_xticks([])
        axes[1, i].set_yticks([])
    fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="corr(z_i, z_j)")
    fig.suptitle("q(z|x) with a full covariance: the correlations a diagonal q cannot have", fontsize=10)
    return fig


def bits_back(kl: np.ndarray, z_net: np.ndarray, neg_elbo: np.ndarray, net: np.ndarray, latents: str = "z") -> Figure:
    """Per image, in bits: left the net bits bits-back coding paid for the latents (``latents``: their
    names, "z" for one layer) against the analytic KL, right the net code length against -ELBO; the
    identity line on both."""
    kl_of = "KL(q(z|x) ‖ p(z))" if latents == "z" else f"KL of {latents}, summed"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (x, y, xlabel, ylabel, title) in zip(
        axes,
        (
            (
                kl,
                z_net,
                f"analytic {kl_of}, bits",
                f"net bits for {latents} (pushed − got back)",
                "the KL term as bits",
            ),
            (neg_elbo, net, "−ELBO, bits", "net code length, bits", "the code length is −ELBO"),
        ),
        strict=True,
    ):
        ax.scatter(x, y, s=6, alpha=0.5, color=COLORS["q"])
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        ax.plot([lo, hi], [lo, hi], color="#444444", lw=1, label="y = x")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: means {y.mean():.2f} against {x.mean():.2f}", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def latent_bits_sweep(bits: np.ndarray, z_net: np.ndarray, pixels: np.ndarray, kl: float, neg_elbo: float) -> Figure:
    """Bits per image against the latent grid's bits per dimension: left z's net bits against the analytic
    KL, right x's bits and the total against -ELBO."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    left, right = axes
    left.plot(bits, z_net, "o-", color=COLORS["q"], label="net bits for z (fair coin flips)")
    left.axhline(kl, color="#444444", lw=1, ls="--", label=f"analytic KL {kl:.2f}")
    left.set_title("z: coarse buckets are cheap", fontsize=9)
    right.plot(bits, pixels, "o-", color=COLORS["posterior"], label="bits for x at a z drawn from q")
    right.plot(bits, pixels + z_net, "s-", color="#444444", label="x + z")
    right.axhline(neg_elbo, color="#444444", lw=1, ls="--", label=f"−ELBO {neg_elbo:.2f}")
    right.set_title("x: coarse buckets make pixels dear", fontsize=9)
    for ax in axes:
        ax.set_xlabel("latent bits per dimension (2^b buckets)")
        ax.set_ylabel("bits per image")
        ax.set_xticks(bits)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def rate_distortion(
    labels: list[str],
    distortion: list[float],
    rate: list[float],
    information: list[float | None],
    bits_back: list[tuple[float, float] | None],
) -> Figure:
    """Runs on the rate-distortion plane (nats): distortion D across, rate R up; each run's diagonal
    D + R = -ELBO; its mutual information below its rate (R - MI: rate that carries no information
    about x); where given, the bits-back code's (pixels, z) split of the same images."""
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    D, R = np.asarray(distortion), np.asarray(rate)
    top = max(R.max(), 1.0) * 1.15
    right = D.max() * 1.1
    cmap = plt.get_cmap("viridis")
    for i, label in enumerate(labels):
        color = cmap(i / max(1, len(labels) - 1))
        total = D[i] + R[i]
        ax.plot([total - top, total], [top, 0], color=color, lw=0.8, ls="--", alpha=0.5)
        ax.plot(D[i], R[i], "o", color=color, ms=7, label=f"{label}: −ELBO {total:.1f}")
        if information[i] is not None:
            ax.plot([D[i], D[i]], [information[i], R[i]], color=color, lw=2, alpha=0.6)
            ax.plot(D[i], information[i], "v", color=color, ms=6, mfc="white")
        if bits_back[i] is not None:
            ax.plot(*bits_back[i], "x", color=color, ms=8, mew=2)
    ax.plot([], [], "v", color="#444444", mfc="white", label="mutual information I(x; z) (R − I: marginal KL)")
    if any(b is not None for b in bits_back):
        ax.plot([], [], "x", color="#444444", mew=2, label="bits-back code: x's bits and z's net bits")
    ax.plot([], [], "--", color="#444444", lw=0.8, label="D + R = −ELBO, equal ELBO")
    ax.set_xlim(0, right)
    ax.set_ylim(0, top)
    ax.annotate(
        "auto-decoding: R = 0,\nz ignored",
        (right * 0.98, 0),
        xytext=(right * 0.98, top * 0.1),
        ha="right",
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "#666666"},
    )
    ax.annotate(
        "auto-encoding: D = 0",
        (0, top * 0.98),
        xytext=(right * 0.05, top * 0.9),
        fontsize=8,
        arrowprops={"arrowstyle": "->", "color": "#666666"},
    )
    ax.set_xlabel("distortion D = −E log p(x|z)  (nats per image)")
    ax.set_ylabel("rate R = E KL(q(z|x) ‖ p(z))  (nats per image)")
    ax.set_title("the rate-distortion plane", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _contours(ax, mean: np.ndarray, cov: np.ndarray, color: str, label: str) -> None:
    """The 1 and 2 standard-deviation contours of a 2-D Gaussian (:func:`_ellipse`), labelled once."""
    for n_std, style in ((1, "-"), (2, "--")):
        points = _ellipse(mean, cov, n_std)
        ax.plot(points[:, 0], points[:, 1], style, color=color, lw=1, label=label if n_std == 1 else None)


def true_posterior(images: np.ndarray, views: list, titles: list[str]) -> Figure:
    """For each image (a column): the image, and below it the true posterior p(z|x) in two latent dimensions
    (shaded: a grid's density, or resampled draws), with the encoder's q(z|x) and the best q* of its family
    for this image as ellipses of 1 and 2 standard deviations (``views``: ``gaps.PosteriorView``)."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 3.9), squeeze=False, gridspec_kw={"height_ratios": [1, 2.2]})
    for c, view in enumerate(views):
        _show(axes[0, c], images[c])
        axes[0, c].set_title(titles[c], fontsize=7)
        ax = axes[1, c]
        if view.density is not None:
            u, v = (a.numpy() for a in view.axes)
            ax.contourf(u, v, view.density.numpy().T, levels=12, cmap="Greys")
        else:
            draws = view.samples.numpy()
            ax.scatter(draws[:, 0], draws[:, 1], s=1, color="0.35", alpha=0.3, label="p(z|x), resampled")
        _contours(ax, view.q[0].numpy(), view.q[1].numpy(), COLORS["q"], "q(z|x), the encoder's")
        _contours(ax, view.q_star[0].numpy(), view.q_star[1].numpy(), COLORS["posterior"], "q*, the best for this x")
        i, j = view.dims
        ax.set_xlabel(f"z{i}", fontsize=7)
        ax.set_ylabel(f"z{j}", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[1, 0].legend(fontsize=6, loc="upper left")
    fig.suptitle("The true posterior p(z|x) (grey) against q(z|x) and q* (ellipses: 1 and 2 s.d.)", fontsize=9)
    fig.tight_layout()
    return fig
