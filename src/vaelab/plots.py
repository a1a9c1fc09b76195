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
