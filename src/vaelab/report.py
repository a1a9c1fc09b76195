"""Self-contained HTML pages: everything inline (SVG figures, CSS), nothing from the network."""

from __future__ import annotations

import base64
import contextlib
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaelab import plots, rundir
from vaelab.checkpoint import read_trained
from vaelab.compress import coder_name, latent_code, read_record
from vaelab.contract import given
from vaelab.errors import UserError
from vaelab.evaluation import Evaluation, evaluation_rows, mi_ceiling
from vaelab.explain import Explanation
from vaelab.fileio import atomic_write_bytes, atomic_write_text
from vaelab.gaps import GRID, PROPOSED, RESAMPLED, WIDEN, posterior_views
from vaelab.inspection import (
    code_switches,
    decode_mean,
    kl_parts,
    open_run,
    project_2d,
    read_evaluation,
    traversals,
)
from vaelab.kl import correlation_kl
from vaelab.objectives import collapse_warning, collapsed_layers
from vaelab.parts import POSTERIORS, PRIORS

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
.warn { color: #a33; font-weight: 600; }
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


# -- vaelab report RUN ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    title: str
    caption: str
    figure: plots.Figure


def run_report(run_dir, out=None, projection: str = "pca", examples: int = 8, compare=None) -> tuple[Path, list[Path]]:
    """Write RUN/report/*.png and a self-contained HTML page (default RUN/report.html).

    ``compare``: another run directory on the same data; the page gains a table of both runs'
    ELBO, IWAE log-likelihood and the gap between them (from their ``evaluation.json``).

    Draws from the prior (samples, marginals) use the global RNG seeded with 0 inside a fork,
    so a report is reproducible and the caller's RNG state is left as it was.
    """
    run = open_run(run_dir)
    out = Path(out) if out else run.path / "report.html"
    rundir.check_output(out, "--out", also=(run.path / "checkpoints" / "last.pt",), may_be="report.html")
    figures_dir = figures_folder(out, run.path)  # checked before any figure is drawn
    comparison = _comparison(run, Path(compare)) if compare is not None else None
    coded = read_record(run.path)  # read (and a torn one refused) before the run is locked
    inside = {out.parent.resolve(), figures_dir.parent.resolve()} & {run.path.resolve()}
    with rundir.lock(run.path, "reporting") if inside else contextlib.nullcontext():  # one writer of a run
        return _write_report(run, out, figures_dir, comparison, projection, examples, coded)


def runs_report(folder, out) -> Path:
    """The page of several runs (a sweep's folder): the rate-distortion plane and its table (``vaelab.rd``),
    each run linked to its own report where it has one. Written to ``out`` only (a single HTML file)."""
    from vaelab import rd

    if out is None:
        raise UserError(f"{folder} is a folder of runs: give --out FILE.html for their page")
    out = Path(out)
    rundir.check_output(out, "--out")
    atomic_write_text(out, runs_page(folder, rd.plane([Path(folder)])))
    return out


def runs_page(folder, points) -> str:
    """The HTML page of several runs' points on the rate-distortion plane (``rd.Point``)."""
    from vaelab import rd

    png = base64.b64encode(plots.to_png_bytes(rd.figure(points))).decode()
    head = "<tr><th>run</th><th>β</th><th>rate R</th><th>distortion D</th><th>−ELBO</th><th>MI</th><th>R − MI</th>"
    head += "<th>bits-back code</th></tr>"
    rows = []
    for p in points:
        own = p.path / "report.html"
        name = html.escape(p.label)
        if own.exists():
            name = f"<a href='{html.escape(own.resolve().as_uri())}'>{name}</a>"
        cells = [p.config.beta, p.rate, p.distortion, p.neg_elbo, p.mutual_information]
        cells += [None if p.mutual_information is None else p.rate - p.mutual_information, p.code_length]
        rows.append(
            f"<tr><td>{name}</td>" + "".join(f"<td>{'' if v is None else f'{v:.2f}'}</td>" for v in cells) + "</tr>"
        )
    best = min(points, key=lambda p: p.neg_elbo)
    body = (
        f"<p>{len(points)} runs in <code>{html.escape(str(folder))}</code>, nats per image on their test split. "
        "The rate R is the KL term, E<sub>x</sub> KL(q(z|x) ‖ p(z)); the distortion D is minus the reconstruction "
        "term; −ELBO = D + R, so runs of equal ELBO lie on one dashed diagonal, and a β-VAE lands where the best "
        "achievable curve has slope −β. Below each rate, the mutual information I(x; z) (at most log N on N test "
        "images): the rest of the rate, the marginal KL, tells nothing about x. A cross: the bits-back code of "
        f"<code>vaelab compress</code>, where it has run. Best ELBO: {html.escape(best.label)}.</p>"
        f"<img alt='the rate-distortion plane' src='data:image/png;base64,{png}' style='max-width:100%'>"
        f"<table>{head}{''.join(rows)}</table>"
    )
    return page(f"vaelab: the rate-distortion plane of {Path(folder).name}", body)


def _write_report(run, out: Path, figures_dir: Path, comparison, projection: str, examples: int, coded):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sections = [
            _training(run),
            _kl_per_dimension(run),
            _kl_decomposition(run),
            _bits_back(run, coded),
            _latent_grids(run, coded),
            _correlations(run),
            _reconstructions(run, examples),
            _prior_samples(run, examples),
            _traversals(run),
            _latent_space(run, projection),
            _manifold(run),
            _posteriors(run),
            _true_posterior(run),
        ]
    parts = [_summary(run)]
    parts.append("<h2>Evaluation</h2>" + _evaluation_table(run.measured))
    if run.measured_here:
        parts.append(
            f"<p class='note'>Measured for this page on {run.measured.examples} test images, without log p(x): run "
            "<code>vaelab evaluate</code> on this run for the IWAE bound (and this table reads its record).</p>"
        )
    if comparison:
        parts.append(comparison)
    try:
        figures_dir.mkdir(exist_ok=True)
        (figures_dir / FIGURES_MARKER).touch()
    except OSError as err:
        raise UserError(f"cannot write the figures into {figures_dir} ({err.strerror}); give another --out") from None
    written = []
    for i, section in enumerate(s for s in sections if s is not None):
        png = plots.to_png_bytes(section.figure)
        name = f"{i + 1:02d}-{re.sub(r'[^a-z0-9]+', '-', section.title.lower()).strip('-')}.png"
        atomic_write_bytes(figures_dir / name, png)  # replaces a path, never writes through a link
        written.append(figures_dir / name)
        data = base64.b64encode(png).decode()
        title = html.escape(section.title)
        parts.append(
            f"<h2>{title}</h2><p class='note'>{html.escape(section.caption)}</p>"
            f"<img alt='{title}' src='data:image/png;base64,{data}' style='max-width:100%'>"
        )
    for stale in set(figures_dir.glob("[0-9][0-9]-*.png")) - set(written):  # figures of an earlier report
        stale.unlink()
    atomic_write_text(out, page(f"vaelab report: {run.path.name}", "".join(parts)))
    return out, written


def figures_folder(out: Path, run_path: Path) -> Path:
    """Where the report's PNG figures go: RUN/report/ beside the default RUN/report.html, else
    OUT's name without .html plus ``-figures`` beside it (a read-only run can be reported elsewhere).
    A folder that exists must be one a report made (it holds :data:`FIGURES_MARKER`): its old
    figures are replaced, and nothing else in it is touched."""
    folder = run_path / "report" if out.resolve() == (run_path / "report.html").resolve() else None
    folder = folder or out.with_name(out.stem + "-figures")
    if folder.is_symlink():
        raise UserError(f"{folder} is a symbolic link; vaelab writes its figures only into a folder of its own")
    made_by_report = (folder / FIGURES_MARKER).exists() or folder.parent.resolve() == run_path.resolve()
    if folder.exists() and any(folder.iterdir()) and not made_by_report:  # RUN/report/ is vaelab's, marked or not
        raise UserError(f"{folder} exists and was not made by vaelab report; move it, or give another --out")
    return folder


FIGURES_MARKER = ".vaelab-report"


def _summary(run) -> str:
    D = run.mu.shape[1]
    kl = run.kl.value.mean().item()
    if run.vq is not None:
        vq = run.vq
        latents = (
            f"{vq.variables} positions, each one of {vq.categories} codebook vectors of {vq.code_dim} numbers (VQ-VAE)"
        )
        kl_text = (
            f"KL(q(z|x) ‖ p(z)) = N log K = {kl:.3f} nats for every image, a rate of "
            f"{vq.variables * np.log2(vq.categories):.2f} bits"
        )
    elif run.categories:
        V, K = D // run.categories, run.categories
        latents = f"{V} categorical variables of {K} categories each (z one-hot, {D} numbers)"
        kl_text = f"average KL(q(z|x) ‖ p(z)) {kl:.3f} nats (closed form), at most N log K = {V * np.log(K):.2f}"
    elif not run.layered:
        latents = f"{D} latent dimensions, {html.escape(run.config.posterior)} posterior"
        kl_text = f"average KL(q(z|x) ‖ p(z)) {kl:.3f} nats ({run.kl.method.replace('_', ' ')})"
    else:
        layers = {name: run.kl.per_layer[name].mean().item() for name in run.layer_means}
        latents = "latent layers " + ", ".join(f"{n} ({m.shape[1]} dimensions)" for n, m in run.layer_means.items())
        kl_text = f"average KL {kl:.3f} nats, by layer " + ", ".join(f"{n} {v:.3f}" for n, v in layers.items())
        kl_text += ". The figures below show the top layer " + list(layers)[0]
        warnings = [collapse_warning(name, layers[name]) for name in collapsed_layers(layers)]
        kl_text += "".join(f"</p><p class='warn'>{html.escape(w)}" for w in warnings)
    return (
        f"<p>Run <code>{html.escape(str(run.path))}</code>: {html.escape(run.config.data)}, "
        f"{latents}, {html.escape(run.config.likelihood)} likelihood, "
        f"{html.escape(run.config.prior)} prior; {len(run.test_x)} test images; {kl_text}.</p>"
    )


def _kl_avg(run) -> np.ndarray | None:
    """The average KL of each dimension of the top latent layer over the test set; None where the
    KL does not factorise."""
    per_dim = run.top_kl_per_dim
    return None if per_dim is None else per_dim.mean(0).numpy()


def _training(run) -> Section | None:
    rows = run.metrics()
    if not rows:
        return None
    caption = "Terms of the ELBO per epoch, in nats per example (validation dashed)."
    if run.config.posterior == "categorical" and not run.config.straight_through:
        caption += (
            " The training terms are the relaxed model's (Gumbel-softmax at the annealed temperature, in "
            "metrics.csv's temperature column), the validation terms the discrete model's (one-hot z)."
        )
    return Section("Training", caption, plots.training_curves(rows))


def _kl_per_dimension(run) -> Section:
    """Each dimension's average KL (and which are active), as the run's record has them."""
    e = run.measured
    activity = np.array(e.activity)
    active = activity > e.active_threshold
    if len(run.model.layer_dims) > 1 and e.kl_per_dim is not None:  # every layer's dimensions: z2_j, z1_j; y_0, z_j
        names = [f"{layer}_{j}" for layer, dims in run.model.layer_dims.items() for j in range(dims)]
        parts_of = (
            "the label's KL(q(y|x) ‖ Uniform(C)) = log C − H(q(y|x)) and, at draws of y, KL(q(z_j|x, y) ‖ p(z_j))"
            if "y" in run.model.layer_dims
            else "the top layer's KL(q(z2_j|x) ‖ p(z2_j)) and, at draws of z2, the lower layer's "
            "KL(q(z1_j|x, z2) ‖ p(z1_j|z2))"
        )
        return Section(
            "KL per latent dimension, every layer",
            f"Average KL of each dimension over the test set, {parts_of}. Active units (the variance over the "
            f"test set of E_q[z_j|x] above {e.active_threshold}): "
            + ", ".join(f"{n} {a} of {run.model.layer_dims[n]}" for n, a in e.active_units_per_layer.items())
            + ".",
            plots.kl_per_dimension(np.array(e.kl_per_dim), active, names=names),
        )
    if e.codebook_usage is not None:
        return Section(
            "Codebook usage",
            f"How often each of the {len(e.codebook_usage)} codes is the nearest to an encoder output, over every "
            f"position of the test images: {e.codebook_perplexity:.1f} codes by their entropy (perplexity), "
            f"{e.dead_codes} used by none. The KL term is N log K whatever the usage; a used code is what "
            "the rate buys.",
            plots.codebook_usage(np.array(e.codebook_usage), e.codebook_perplexity, e.dead_codes),
        )
    if run.categories:
        ceiling = float(np.log(run.categories))
        return Section(
            "KL per categorical variable",
            f"Average KL(q(z_j|x) ‖ Uniform({run.categories})) = log K − H(q(z_j|x)) over the test set, in closed "
            f"form; a variable costs at most log K = {ceiling:.3f} nats (dashed), reached when q(z_j|x) is one-hot. "
            "A variable is active when the variance over the test set of its probabilities q(z_j = k|x), summed "
            f"over k, exceeds {e.active_threshold}: {e.active_units} of {len(activity)}.",
            plots.kl_per_dimension(np.array(e.kl_per_dim), active, ceiling=ceiling),
        )
    if e.kl_per_dim is not None:
        return Section(
            "KL per latent dimension",
            "Average KL(q(z_j|x) ‖ p(z_j)) over the test set. A dimension is active when the variance "
            f"of its posterior mean over the test set exceeds {e.active_threshold} (Burda et al. 2015): "
            f"{e.active_units} of {len(activity)}.",
            plots.kl_per_dimension(np.array(e.kl_per_dim), active),
        )
    whole = (
        f"{run.config.prior} prior" if not PRIORS[run.config.prior].factorises else f"{run.config.posterior} posterior"
    )
    return Section(
        "Activity per latent dimension",
        f"The {whole} does not factorise over dimensions, so the KL has no split into "
        "dimensions; the bars show each dimension's activity, the variance of its posterior mean over "
        f"the test set (active above {e.active_threshold}, Burda et al. 2015): {e.active_units} of {len(activity)}.",
        plots.kl_per_dimension(activity, active, ylabel="activity Cov_x(E[z_j|x])"),
    )


KL_PART_LABELS = {
    "mutual_information": "mutual information",
    "total_correlation": "total correlation",
    "dimension_wise_kl": "dimension-wise KL",
    "marginal_kl": "marginal KL",
}


def _bits_back(run, record: dict | None) -> Section | None:
    """What ``vaelab compress`` measured on the run's test split (RUN/compression.json), when it has run
    on these weights: the KL term as the bits z cost, per image, and the code length against -ELBO."""
    if record is None:
        return None  # compress has not run on these weights
    try:
        per, b, P = record["per_image"], record["bits_per_image"], record["dimensions"]
        kl, z_net, neg_elbo, net = (np.array(per[k], dtype=float) for k in ("kl", "z_net", "neg_elbo", "net"))
        others = record["general_purpose_bits"]
        best = min(others, key=others.get)
        coder, images = coder_name(record), record["images"]
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise UserError(
            f"{run.path / 'compression.json'} is torn or was edited ({type(err).__name__}); run vaelab compress "
            f"{run.path} -o FILE again"
        ) from None
    on = "" if record.get("categories") else " on this grid"
    names = list(run.model.layer_dims)  # one layer z; two (z2, z1); M2's label and z
    z = "z" if names == ["z"] else " and ".join(names)
    # several latents (two layers, M2's label and z) have no single sum over one grid to expect
    expected = f" ({b['z_net_expected']:.2f} expected for fair coin flips{on})" if "z_net_expected" in b else ""
    return Section(
        "The KL term as bits",
        f"vaelab compress coded the {images} {record['split']} images losslessly by bits-back coding ({coder}, "
        f"{latent_code(record)}): it pops {z} from the message with q, getting bits back, and pushes x with "
        f"p(x|{z}) and {z} with p. The net bits for {z} average {b['z_net']:.2f} against the analytic KL's "
        f"{b['kl']:.2f}{' (every latent)' * (z != 'z')}{expected}; "
        f"the code is {b['net'] / P:.4f} bits per dimension against the model's −ELBO of {b['neg_elbo'] / P:.4f}"
        + (f" and −log2 p(x) of {b['neg_log2_px'] / P:.4f} (IWAE)" if "neg_log2_px" in b else "")
        + f"; the best general-purpose coder, {best}, needs {others[best] / images / P:.4f}.",
        plots.bits_back(kl, z_net, neg_elbo, net, z),
    )


def _latent_grids(run, record: dict | None) -> Section | None:
    """The latent-bits sweep ``compress`` recorded (one Gaussian layer): z's and x's costs on coarser and
    finer grids, against the analytic KL and -ELBO."""
    sweep = None if record is None else record.get("latent_bits_sweep")
    if not sweep:
        return None
    try:
        b = record["bits_per_image"]
        bits, z_net, pixels = (
            np.array([row[k] for row in sweep], dtype=float) for k in ("latent_bits", "z_net", "pixels")
        )
        kl, neg_elbo = float(b["kl"]), float(b["neg_elbo"])
    except (ValueError, TypeError, KeyError) as err:
        raise UserError(
            f"{run.path / 'compression.json'} is torn or was edited ({type(err).__name__}); run vaelab compress "
            f"{run.path} -o FILE again"
        ) from None
    coarse, fine = sweep[0], sweep[-1]
    return Section(
        "The latent's grid: a cheap z, dear pixels",
        f"What bits-back coding pays on grids of 2^b buckets per latent dimension (--latent-bits b; the file used "
        f"{record['latent_bits']}), means over the {record['images']} images: z's net bits as fair coin flips pay them "
        f"(exact) and x's at a z drawn from each image's discretised q (one draw each). At {coarse['latent_bits']} "
        f"bits z costs {coarse['z_net']:.2f} and x {coarse['pixels']:.2f}; at {fine['latent_bits']}, "
        f"{fine['z_net']:.2f} and {fine['pixels']:.2f}. The grids are nested, so z's cost climbs with b towards "
        f"the analytic KL ({kl:.2f}) and never past it, while their sum falls to −ELBO ({neg_elbo:.2f}).",
        plots.latent_bits_sweep(bits, z_net, pixels, kl, neg_elbo),
    )


def _kl_decomposition(run) -> Section | None:
    """The KL over the test set taken apart (``inspection.kl_parts``: the full-data estimator)."""
    taken_apart = kl_parts(run)
    if taken_apart is None:  # a flow: no density of the aggregate posterior to evaluate
        return None
    parts, per_dim = taken_apart
    e = run.measured
    # the full-data MI estimate on N examples is at most log N; the caption says when it has reached it
    labels = KL_PART_LABELS | {"mutual_information": f"mutual information (≤ log N = {math.log(e.examples):.2f})"}
    parts = {labels.get(name, f"KL of {name.removeprefix('kl_')}"): value for name, value in parts.items()}
    if per_dim is not None:
        per_dim = np.array(per_dim)
        caption = (
            "The negative ELBO over the test set: the reconstruction term, then the KL taken apart into "
            "I_q(x; z) + KL(q(z) ‖ Π_j q(z_j)) + Σ_j KL(q(z_j) ‖ p(z_j)) (Chen et al. 2018), estimated with "
            "one z per image and the aggregate posterior of all test images; right, each dimension's part "
            "of the last term (estimates: a part near 0 can come out slightly below it)."
        )
    else:
        caption = (
            f"The negative ELBO over the test set: the reconstruction term, then the KL taken apart into "
            f"I_q(x; z) + KL(q(z) ‖ p(z)) (Hoffman & Johnson 2016); the {run.config.prior} prior does not "
            "factorise, so the marginal KL has no split into dimensions."
        )
    if run.layered:
        top = next(iter(run.layer_means))
        caption += (
            f" With several latent layers the split is of the top layer {top}'s KL; each layer below adds its "
            "own KL as one more part."
        )
    caption += (
        f" The top bar is the evaluation's: its KL ({e.kl:.2f} nats) is the model's own term; the parts below "
        "estimate it with one z per image, so their sum differs from it by their Monte Carlo error. The mutual "
        f"information is {mi_ceiling(e)}."
    )
    return Section("The KL taken apart", caption, plots.kl_decomposition(parts, e.reconstruction, e.kl, per_dim))


def _correlations(run) -> Section | None:
    if run.scale_tril is None:
        return None
    L = run.scale_tril[:4]
    cov = L @ L.transpose(-1, -2)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    corr = cov / (sd[:, :, None] * sd[:, None, :])
    return Section(
        "Posterior correlations",
        "For four test images, the correlation matrix of q(z|x) = N(μ, L Lᵀ). Their part of the KL is "
        "½(Σ_j log Σ_jj − log det Σ), shown in the next section's row titles.",
        plots.correlation_matrices(run.test_x[:4].numpy(), corr.numpy()),
    )


def _reconstructions(run, examples: int) -> Section:
    x = run.test_x[:examples].numpy()
    recon = run.view(slice(0, examples)).reconstruct(run.test_x[:examples]).clamp(0, 1).numpy()
    at = (
        "the nearest codebook vectors"
        if run.vq is not None
        else "each variable's most probable category (one-hot)"
        if run.categories
        else "the posterior mean"
    )
    return Section(
        "Reconstructions",
        f"Test images and the mean of p(x|z) at z = {at}"
        + (" (of q(z2|x), then of q(z1|x, z2))." if run.layered else "."),
        plots.image_rows([("test image", x), ("reconstruction", recon)], "reconstructions"),
    )


def _prior_samples(run, examples: int) -> Section:
    if run.model_y is not None:  # conditional, and M2 given a label
        return _samples_per_class(run, examples)
    if run.vq is not None:
        codes = run.vq.sample_codes(2 * examples, torch.Generator().manual_seed(0))
        samples = decode_mean(run.model, run.z_of(codes))
        return Section(
            "Samples from the fitted prior",
            "Means of p(x|z) for codes drawn from each position's code frequencies in training (a categorical "
            "per position, independent across positions: the simplest fitted prior; the paper fits a PixelCNN). "
            "The uniform p(z) of the KL term is not a model of the data's codes.",
            plots.image_rows([("", samples[:examples]), ("", samples[examples:])], "codes ~ their frequencies"),
        )
    samples = decode_mean(run.model, run.model.prior().sample((2 * examples,)))
    return Section(
        "Samples from the prior",
        "Means of p(x|z1) for z2 ~ p(z2) and z1 the mean of p(z1|z2)."
        if run.layered
        else "Means of p(x|z) for z ~ p(z)" + (", each variable's category uniform." if run.categories else "."),
        plots.image_rows([("", samples[:examples]), ("", samples[examples:])], "z ~ p(z)"),
    )


def _samples_per_class(run, examples: int) -> Section:
    """A conditional model: the same draws z ~ p(z) decoded with each label y, one row per class."""
    z = run.model.prior().sample((examples,))
    classes = range(min(run.config.classes, 10))
    rows = [(f"y = {c}", decode_mean(given(run.model, torch.full((examples,), c)), z)) for c in classes]
    return Section(
        "Samples from the prior, per class",
        "Means of p(x|z, y) for the same draws z ~ p(z) (columns) and each label y (rows): y sets the class, "
        "z what the label leaves open (style).",
        plots.image_rows(rows, "z ~ p(z), one row per label"),
    )


def _traversals(run) -> Section:
    kl_avg = _kl_avg(run)
    if run.vq is not None:
        vq, usage = run.vq, np.array(run.measured.codebook_usage)
        codes = np.argsort(-usage)[: min(10, vq.categories)].tolist()
        positions = np.argsort(-np.array(run.measured.activity))[: min(6, vq.variables)].tolist()  # most varied
        rows = code_switches(run.model, run.z_of, run.codes_of(run.test_x[:1]), positions, codes)
        return Section(
            "Code switches",
            f"Starting from the first test image's codes, one position at a time (those whose codes vary most over "
            f"the test set) is switched to each of the {len(codes)} most used codes (columns, most used first).",
            plots.image_rows([(f"position {j}", r) for j, r in zip(positions, rows, strict=True)], "one code switched"),
        )
    if run.categories:
        top = run.dims_by_kl[: min(6, len(kl_avg))]
        categories = list(range(run.categories))
        rows = code_switches(run.model, run.z_of, run.codes_of(run.test_x[:1]), top, categories)
        return Section(
            "Category switches",
            "Starting from the first test image's most probable categories, one variable at a time is switched "
            f"to each of its {run.categories} categories (columns 0 … {run.categories - 1}); the variables with "
            "the most KL first.",
            plots.image_rows(
                [(f"z{j} ({kl_avg[j]:.2f} nats)", r) for j, r in zip(top, rows, strict=True)],
                "one variable's category switched",
            ),
        )
    top = run.dims_by_kl[: min(6, run.mu.shape[1])]
    rows = traversals(run.view(slice(0, 1)), run.mu[:1], top, np.linspace(-3, 3, 9))
    labels = [f"z{j}" if kl_avg is None else f"z{j} ({kl_avg[j]:.2f} nats)" for j in top]
    return Section(
        "Latent traversals",
        "Starting from the first test image's posterior mean, one dimension at a time is set to "
        "−3 … 3 (prior standard deviations); the dimensions with the most KL first.",
        plots.image_rows(list(zip(labels, rows, strict=True)), "traversals from −3 to 3"),
    )


def _latent_space(run, projection: str) -> Section:
    D = run.mu.shape[1]
    points, (xl, yl) = project_2d(run.mu.numpy(), projection)
    labels = None if run.test_y is None else run.test_y.numpy()
    how = "directly" if D <= 2 else ("by PCA" if projection == "pca" else "by t-SNE")
    what = (
        "Codebook vectors z_q"
        if run.vq is not None
        else "Posterior probabilities q(z_j = k|x) (the mean of a one-hot z)"
        if run.categories
        else "Posterior means"
    )
    return Section(
        "The latent space",
        f"{what} of the test set, shown {how}, coloured by label.",
        plots.latent_scatter(points, labels, xl, yl, "posterior means of the test set"),
    )


def _manifold(run) -> Section | None:
    """For a 2-D latent space: the decoded means over a grid of prior quantiles."""
    if run.mu.shape[1] != 2 or run.categories:
        return None
    grid = torch.distributions.Normal(0, 1).icdf(torch.linspace(0.05, 0.95, 10))
    zz = torch.stack(torch.meshgrid(grid, grid.flip(0), indexing="xy"), -1).reshape(-1, 2)
    images = decode_mean(run.view(slice(0, 1)), zz).reshape(10, 10, *run.test_x.shape[1:])
    return Section(
        "The decoded manifold",
        "Decoded means over a grid of prior quantiles 5 % … 95 %.",
        plots.manifold(images, grid.numpy()),
    )


def _posteriors(run) -> Section | None:
    if run.vq is not None:  # a point mass on the nearest codes: nothing to draw against the prior
        return None
    if run.categories:
        probs = run.mu[:4].unflatten(-1, (-1, run.categories)).numpy()
        return Section(
            "q(z|x) against the prior",
            "For four test images, each variable's q(z_j = k|x) against the uniform prior and its KL, "
            "log K − H(q(z_j|x)): 0 when q is uniform, log K when it is one-hot.",
            plots.categorical_posteriors(
                run.test_x[:4].numpy(), probs, run.dims_by_kl[:6], run.top_kl_per_dim[:4].numpy()
            ),
        )
    flow = not POSTERIORS[run.config.posterior].gaussian
    if not PRIORS[run.config.prior].factorises or flow:  # the prior's marginals from samples; the KL by Monte Carlo
        prior_samples = run.model.prior().sample((20_000,)).numpy()
        kl, se = run.kl.value[:4].tolist(), run.kl.std_error[:4].tolist()
        row_titles = [f"KL {v:.2f} ± {e:.2f}" for v, e in zip(kl, se, strict=True)]
        caption = (
            "For four test images, each dimension's posterior against the prior's marginal (a histogram of "
            "20,000 prior samples), and each image's KL(q(z|x) ‖ p(z)): a Monte Carlo estimate ± its standard "
            "error, since this " + ("flow posterior" if flow else "prior") + " has no closed-form KL."
        )
        if flow:
            caption += (
                " The flow's q(z_j|x) is not Gaussian: each curve is the Gaussian with its marginal's mean and "
                "variance (from 256 draws)."
            )
    else:
        prior_samples, row_titles = None, None
        caption = (
            "For four test images, each dimension's posterior against N(0, 1) and its KL: "
            "μ²/2 for moving the mean, (σ² − 1 − log σ²)/2 for a width other than 1."
        )
        if run.scale_tril is not None:  # a full covariance: its marginals, and what its correlations add
            extra = correlation_kl(run.scale_tril[:4]).tolist()
            row_titles = [f"+ {c:.2f} nats of correlation" for c in extra]
            caption += (
                " q(z|x) has a full covariance: the panels show its marginals, and the row title what its "
                "correlations add, ½(Σ_j log Σ_jj − log det Σ)."
            )
    figure = plots.posterior_against_prior(
        run.test_x[:4].numpy(),
        run.mu[:4].numpy(),
        run.log_var[:4].numpy(),
        run.dims_by_kl[: min(6, run.mu.shape[1])],
        prior_samples,
        row_titles,
    )
    return Section("q(z|x) against the prior", caption, figure)


def _true_posterior(run) -> Section | None:
    """For four test images: p(z|x) itself beside q(z|x) and q*, where ``evaluate --gaps`` defines q* (one
    Gaussian layer, no labels): the approximation gap is how far q* is from p(z|x), the amortization gap how far
    q is from q*."""
    families = POSTERIORS[run.config.posterior].optimal_families
    if not families or len(run.model.layer_dims) > 1 or run.config.uses_labels:
        return None
    x = run.test_x[:4]
    dims = [int(d) for d in run.dims_by_kl[:2]] if run.mu.shape[1] > 2 else [0, 1]
    if len(dims) < 2:
        return None  # one latent dimension: no plane to draw
    views = posterior_views(run.model, x, families[0], dims, seed=0)
    if views[0].log_px is not None:
        titles = [
            f"log p(x) {v.log_px:.2f}\napprox. {v.log_px - v.elbo_optimal:.2f} + amort. "
            f"{v.elbo_optimal - v.elbo_encoder:.2f} nats"
            for v in views
        ]
        how = (
            f"drawn on a grid of {GRID} × {GRID} points around q and q*; log p(x) summed as evaluate --gaps sums it, "
            "on a grid that also covers the prior's bulk"
        )
    else:
        titles = [
            f"L[q*] − L[q] = {v.elbo_optimal - v.elbo_encoder:.2f} nats\n{v.effective_draws:,.0f} effective draws"
            for v in views
        ]
        how = (
            f"as {RESAMPLED} draws resampled by importance weights from {PROPOSED:,} draws of q* widened "
            f"{WIDEN}× (each title says how many effective draws its weights amount to), in the two dimensions "
            f"with the most KL (z{dims[0]}, z{dims[1]})"
        )
    caption = (
        f"For four test images, the true posterior p(z|x) ∝ p(x|z) p(z), {how}; the encoder's q(z|x) (orange) and "
        f"q*, the best {families[0]} Gaussian for this image alone (green, as vaelab evaluate --gaps finds it). "
        "How far q* is from p(z|x) is the approximation gap (the family cannot do better), how far q is from q* "
        "the amortization gap (one encoder for every image)."
    )
    return Section("The true posterior p(z|x)", caption, plots.true_posterior(x.numpy(), views, titles))


def _comparison(run, other: Path) -> str:
    """Both runs' ELBO, log p(x) (IWAE) and gap log p(x) - ELBO = KL(q || p(z|x)) (estimated), as HTML."""
    if other.resolve() == run.path.resolve():
        raise UserError(f"--compare {other} is the run being reported; compare it with another run")
    records = {}
    for path, evaluation in ((run.path, read_evaluation(run.path)), (other, read_evaluation(other))):
        point_mass = evaluation is not None and evaluation.codebook_usage is not None  # VQ-VAE: no IWAE to run
        if evaluation is None or (evaluation.log_likelihood is None and not point_mass):
            raise UserError(f"--compare: {path} has no IWAE evaluation; run vaelab evaluate {path} first")
        records[path] = evaluation
    mine, theirs = records.values()
    if (mine.data, mine.split, mine.examples) != (theirs.data, theirs.split, theirs.examples):
        raise UserError(
            f"--compare: {other} was evaluated on {theirs.data} ({theirs.split}, {theirs.examples} examples), this run "
            f"on {mine.data} ({mine.split}, {mine.examples}); compare runs evaluated on the same data"
        )
    rows = []
    for path, e in records.items():
        config = read_trained(path)[0]
        model = f"{config.family}, {config.posterior} posterior"
        if e.log_likelihood is None:  # a point-mass q (VQ-VAE): the IWAE estimate would be its ELBO
            estimate, gap = "not defined: q(z|x) is a point mass", ""
        else:
            estimate = f"{e.log_likelihood:.3f} ± {e.log_likelihood_std_error:.3f} (k = {e.iwae_k})"
            gap = f"{e.log_likelihood - e.elbo:.3f}"
        cells = (path.name, model, f"{e.elbo:.3f}", estimate, gap)
        rows.append("<tr>" + "".join(f"<td class='l'>{html.escape(c)}</td>" for c in cells) + "</tr>")
    given_y = any(e.conditional for e in records.values())  # a conditional model's bound is on log p(x|y)
    log_p = "log p(x|y), IWAE" if given_y else "log p(x), IWAE"
    head = "".join(f"<th class='l'>{h}</th>" for h in ("run", "model", "ELBO", log_p, "gap"))
    return (
        "<h2>Compared</h2><p class='note'>The gap log p(x) − ELBO is KL(q(z|x) ‖ p(z|x)), the price of the posterior "
        "family, estimated with the IWAE log-likelihood (a lower bound itself, so the gap is under-estimated by "
        "what k samples miss). A flow posterior is there to make it smaller.</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    )


def _evaluation_table(e: Evaluation) -> str:
    """The evaluation's rows (``evaluation.evaluation_rows``, as the command line prints them) as HTML."""
    cells = [f"<tr><td class='l'>{html.escape(f'{e.data}, {e.split}')}</td><td>{e.examples} examples</td></tr>"]
    for row in evaluation_rows(e):
        name = "&nbsp;" * 4 * row.depth + html.escape(row.name)
        if row.value is None:
            value = html.escape(row.note)
        else:
            number = str(row.value) if isinstance(row.value, int) else f"{row.value:.3f}"
            value = html.escape(f"{number} {row.unit}" + (f" ({row.note})" if row.note else ""))
        cells.append(f"<tr><td class='l'>{name}</td><td>{value}</td></tr>")
    return f"<table>{''.join(cells)}</table>"
