"""``vaelab rd``: runs on the rate-distortion plane (Alemi et al. 2018, "Fixing a Broken ELBO").

The two terms of the loss read as a rate R = E_x KL(q(z|x) || p(z)), the KL term, and a
distortion D = -E_x E_q log p(x|z), minus the reconstruction term; -ELBO = D + R, so runs of
equal ELBO lie on the diagonal D + R = c, and a beta-VAE (minimising D + beta R) lands where the
best achievable curve has slope -beta. The rate splits into the mutual information I(x; z), the
part that carries information about x, and the marginal KL(q(z) || p(z)), which carries none.

Every number comes from the run's evaluation record (``vaelab evaluate``'s, of the run's weights);
a run without one is evaluated here (without the IWAE bound), and its record kept.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from vaelab import plots
from vaelab.config import Config
from vaelab.errors import UserError
from vaelab.evaluation import Evaluation, evaluate_run, weights_sha256
from vaelab.inspection import read_evaluation

# config fields that say nothing about the model or how it trained: never a run's label
NOT_LABELS = {"out", "data_dir", "download", "threads", "device", "checkpoint_every", "skip_nonfinite"}


@dataclass(frozen=True)
class Point:
    """One run on the plane, nats per example."""

    path: Path
    label: str
    rate: float  # E_x KL(q(z|x) || p(z))
    distortion: float  # -E_x E_q log p(x|z)
    mutual_information: float | None  # I_q(x; z) on the test images (at most log N)
    code_length: float | None  # vaelab compress's net length of the same images, where it has run
    code_rate: float | None  # of it, the net bits for z, in nats
    pixels: int | None  # per image, where bits/dim apply
    config: Config

    @property
    def neg_elbo(self) -> float:
        return self.rate + self.distortion

    def to_dict(self) -> dict:
        return {
            "run": str(self.path),
            "label": self.label,
            "rate": self.rate,
            "distortion": self.distortion,
            "neg_elbo": self.neg_elbo,
            "mutual_information": self.mutual_information,
            "marginal_kl": None if self.mutual_information is None else self.rate - self.mutual_information,
            "bits_back_code_length": self.code_length,
            "bits_back_rate": self.code_rate,
            "beta": self.config.beta,
        }


def runs_in(paths: list[Path]) -> list[Path]:
    """The runs named: a run directory itself, or every run directly inside a folder (a sweep's)."""
    found = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise UserError(f"{path} is not a run directory or a folder of runs")
        if (path / "model.safetensors").exists():
            found.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if p.is_dir() and (p / "model.safetensors").exists())
        if not inside:
            raise UserError(f"{path} holds no trained run (no model.safetensors in it or in its folders)")
        found += inside
    if len({p.resolve() for p in found}) != len(found):
        raise UserError("a run is named twice; name each run, or the folder of a sweep, once")
    return found


def measured(run: Path, sha: str) -> Evaluation:
    """The run's test-split record, of these weights (``sha``); evaluated here (no IWAE) where there is none,
    and kept only where the run has no record of these weights (one of another split stays) and is writable."""
    record = read_evaluation(run)
    if record is None or record.split != "test" or record.weights_sha256 != sha:
        current = record is not None and record.weights_sha256 == sha
        record, _ = evaluate_run(run, iwae_k=0, keep=not current and os.access(run, os.W_OK))
    return record


def _bits_back(run: Path, sha: str) -> tuple[float | None, float | None]:
    """The net code length and net bits for z of ``vaelab compress`` on the run's test split, in nats."""
    from vaelab.compress import read_record

    record = read_record(run, sha)
    if record is None or record["split"] != "test":
        return None, None
    b = record["bits_per_image"]
    return b["net"] * math.log(2), b["z_net"] * math.log(2)


def labels(configs: list[Config]) -> list[str]:
    """Each run named by what differs between the runs' configs (``beta 0.5, latent_dim 4``)."""
    dicts = [c.to_dict() for c in configs]
    keys = sorted({k for d in dicts for k in d} - NOT_LABELS)
    differ = [k for k in keys if len({json.dumps(d.get(k)) for d in dicts}) > 1]
    return [", ".join(f"{k} {d.get(k)}" for k in differ) or "the run" for d in dicts]


def plane(paths: list[Path]) -> list[Point]:
    """The runs of ``paths`` as points on the plane; runs of other data or another likelihood are
    refused (their distortions are not on one scale)."""
    from vaelab.checkpoint import read_trained

    runs = runs_in(paths)
    trained = [read_trained(run)[:2] for run in runs]  # (config, x_shape), read once
    configs = [config for config, _ in trained]
    kinds = {(c.data, c.likelihood, c.binarized) for c in configs}
    if len(kinds) > 1:
        first, other = sorted(kinds, key=str)[:2]
        raise UserError(
            f"the runs are of other data or likelihoods ({first[0]} with {first[1]} and {other[0]} with {other[1]}): "
            "their distortions are not on one scale; give runs of one data set and one likelihood"
        )
    points = []
    for run, (config, x_shape), label in zip(runs, trained, labels(configs), strict=True):
        sha = weights_sha256(run)
        code, code_rate = _bits_back(run, sha)  # a torn record is refused before anything is written
        record = measured(run, sha)  # evaluate_run holds the run's lock while it writes the record
        pixels = math.prod(x_shape) if record.bits_per_dim is not None else None
        points.append(
            Point(
                run,
                label,
                record.kl,
                -record.reconstruction,
                record.mutual_information,
                code,
                code_rate,
                pixels,
                config,
            )
        )
    return points


def format_table(points: list[Point]) -> str:
    bits = points[0].pixels is not None
    head = f"  {'run':<28} {'rate R':>9} {'distortion D':>13} {'-ELBO':>9} {'MI':>8} {'R - MI':>8}"
    head += f" {'bits-back':>10}" if any(p.code_length for p in points) else ""
    head += f" {'-ELBO bits/dim':>15}" if bits else ""
    lines = ["nats per image on the test split (MI: the full-data estimate, at most log N)", head]
    for p in points:
        mi = "" if p.mutual_information is None else f"{p.mutual_information:8.2f}"
        rest = "" if p.mutual_information is None else f"{p.rate - p.mutual_information:8.2f}"
        line = f"  {p.label[:28]:<28} {p.rate:9.2f} {p.distortion:13.2f} {p.neg_elbo:9.2f} {mi:>8} {rest:>8}"
        if any(q.code_length for q in points):
            line += f" {p.code_length:10.2f}" if p.code_length is not None else f" {'':>10}"
        if bits:
            line += f" {p.neg_elbo / math.log(2) / p.pixels:15.4f}"
        lines.append(line)
    best = min(points, key=lambda p: p.neg_elbo)
    lines.append(f"  best ELBO: {best.label} (-ELBO {best.neg_elbo:.2f})")
    return "\n".join(lines)


def figure(points: list[Point]):
    return plots.rate_distortion(
        [p.label for p in points],
        [p.distortion for p in points],
        [p.rate for p in points],
        [p.mutual_information for p in points],
        [(p.code_length - p.code_rate, p.code_rate) if p.code_length is not None else None for p in points],
    )
