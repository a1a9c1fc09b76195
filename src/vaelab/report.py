"""Self-contained HTML pages: everything inline (SVG figures, CSS), nothing from the network."""

from __future__ import annotations

import html
import re

import numpy as np

from vaelab import plots
from vaelab.explain import Explanation

CSS = """
body { font-family: system-ui, sans-serif; max-width: 980px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.formula { font-family: 'STIX Two Math', 'Cambria Math', 'Latin Modern Math', serif; font-size: 1.15em;
           background: #f6f6fa; padding: .35em .7em; border-radius: 4px; display: inline-block; }
table { border-collapse: collapse; font-size: .9em; margin: .6em 0; }
td, th { border-bottom: 1px solid #e4e4e4; padding: .3em .7em; text-align: right; }
th { background: #fafafa; } td.l, th.l { text-align: left; }
.ok { color: #1b7e3a; font-weight: 600; } .bad { color: #b00020; font-weight: 600; }
.note { color: #555; font-size: .88em; margin: .2em 0 1em; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figs svg { max-width: 100%; height: auto; }
"""


def page(title: str, body: str) -> str:
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


def math_html(formula: str) -> str:
    """Escape a plain-text formula and turn ``x_j`` / ``x_{ab}`` into subscripts."""
    text = html.escape(formula)
    text = re.sub(r"_\{([^}]*)\}", r"<sub>\1</sub>", text)
    return re.sub(r"_([A-Za-z0-9]+)", r"<sub>\1</sub>", text)


def explain_html(result: Explanation) -> str:
    """The derivation of ``vaelab explain`` as a page: steps, numbers, and figures."""
    e = html.escape
    m = result.model
    parts = [
        "<p>A linear-Gaussian model whose posterior is known exactly: "
        f"<span class='formula'>z ~ N(0, I<sub>{m.latent_dim}</sub>), "
        f"x | z ~ N(Wz + b, {m.noise_var} I<sub>{m.data_dim}</sub>)</span>, one x drawn from it, "
        "and an imperfect diagonal Gaussian q(z|x). Every identity below is computed with numbers; "
        "exact ones must agree to 1e-6 (float64), Monte Carlo ones to 4 standard errors "
        f"({result.samples} samples, seed {result.seed}).</p>",
        "<table><tr><th class='l'>quantity</th><th>value (nats)</th></tr>",
    ]
    for name, value in (
        ("log p(x) (exact)", result.log_px),
        ("ELBO = E<sub>q</sub>[log p(x|z)] − D<sub>KL</sub>[q ‖ p(z)]", result.elbo),
        ("D<sub>KL</sub>[q ‖ p(z)]", result.kl_q_prior),
        ("D<sub>KL</sub>[q ‖ p(z|x)] = log p(x) − ELBO", result.kl_q_posterior),
    ):
        parts.append(f"<tr><td class='l'>{name}</td><td>{value:.6f}</td></tr>")
    parts.append("</table><h2>The steps</h2>")
    for s in result.steps:
        verdict = "<span class='ok'>holds</span>" if s.holds else "<span class='bad'>FAILS</span>"
        tol = f"4 s.e. = {s.tolerance:.2e}" if s.method == "monte_carlo" else f"{s.tolerance:.0e} ({s.method})"
        parts.append(
            f"<h3>{e(s.name)}</h3><div class='formula'>{math_html(s.formula)}</div>"
            "<table><tr><th>lhs</th><th>rhs</th><th>|lhs − rhs|</th><th>tolerance</th><th></th></tr>"
            f"<tr><td>{s.lhs:.9f}</td><td>{s.rhs:.9f}</td><td>{s.abs_diff:.2e}</td><td>{tol}</td>"
            f"<td>{verdict}</td></tr></table>"
        )
        if s.note:
            parts.append(f"<p class='note'>{e(s.note)}</p>")
    parts.append("<h2>Pictures</h2><div class='figs'>")
    parts.append(plots.to_svg(_posterior_figure(result)))
    parts.append(plots.to_svg(plots.elbo_gap(result.elbo_trace, result.log_px, result.mean_field_gap)))
    parts.append("</div><h2>Intuition: the two prices of one latent dimension</h2>")
    parts.append(
        "<table><tr><th>μ</th><th>σ</th><th>μ²/2 (mean)</th><th>(σ² − 1 − log σ²)/2 (width)</th><th>KL</th></tr>"
    )
    for row in result.intuition:
        parts.append(
            f"<tr><td>{row['mu']:.1f}</td><td>{row['sigma']:.1f}</td><td>{row['mean_term']:.3f}</td>"
            f"<td>{row['width_term']:.3f}</td><td>{row['kl']:.3f}</td></tr>"
        )
    parts.append("</table>")
    return page("vaelab explain: from KL[q ‖ p(z|x)] to the ELBO", "".join(parts))


def _posterior_figure(result: Explanation):
    post_mean = result.posterior.mean.numpy()
    post_cov = result.posterior.covariance_matrix.numpy()
    q_var = np.exp(result.log_var.numpy())
    mu = result.mu.numpy()
    if result.model.latent_dim == 1:
        return plots.gaussians_1d(
            {"q": (mu[0], q_var[0]), "posterior": (post_mean[0], post_cov[0, 0]), "prior": (0.0, 1.0)},
            "q, the exact posterior and the prior",
        )
    return plots.gaussians_2d(
        {
            "q": (mu[:2], np.diag(q_var[:2])),
            "posterior": (post_mean[:2], post_cov[:2, :2]),
            "prior": (np.zeros(2), np.eye(2)),
        },
        "q, the exact posterior and the prior" + (" (first two dims)" if result.model.latent_dim > 2 else ""),
    )
