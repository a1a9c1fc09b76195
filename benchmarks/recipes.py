"""Training recipes against the textbook loop at a fixed wall-clock budget, on real digits.

    python -m benchmarks.recipes --budget 60 --seeds 0 1            # every recipe, two seeds
    python -m benchmarks.recipes --budget 30 --recipes textbook defaults cosine-2e-3-fp32
    python -m benchmarks.recipes --budget 600 --threads 1 --recipes textbook &   # side by side,
    python -m benchmarks.recipes --budget 600 --threads 1 --recipes defaults     # a core each
    python -m benchmarks.recipes --mnist DIR --budget 120 240 --seeds 0 --recipes textbook defaults   # full MNIST

Data: the bundled mnist-5k (5,000 real MNIST digits, 28 x 28): vaelab's own split for each seed
(seeded 15 % test, 1/12 of the rest for validation), its test images binarised once and shared by
every run of that seed; with ``--mnist DIR``, full MNIST from its IDX files in DIR (60,000 training
images, 1,000 of them for validation, its 10,000 test images; a line says so and nothing runs when
the files are not there). Each recipe runs ``vaelab train --time-budget BUDGET`` (its run directory, its
validation and checkpoints counted in its time; the best weights by validation ELBO are scored);
the textbook loop (``references.py``: DataLoader, sigmoid + BCE, Adam 1e-3, ``loss.item()`` per
step, dynamically binarised batches) trains on train + validation for the same wall time. Both are
scored by one estimator, vaelab's IWAE with k = 1000, on the same test images. 2 threads, or
``--threads``. Given several budgets, it ends with the two goals: each recipe's lead over the
textbook at equal time, and its time to target, whether it reaches the textbook's NLL at B in half
the time (its run of budget B / 2, where that budget was run too).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.__main__ import TextbookAsLatentModel, cpu_name
from benchmarks.references import textbook_for
from vaelab.checkpoint import load_run
from vaelab.config import Config
from vaelab.contract import OneLayer
from vaelab.data import binarize_static, load
from vaelab.evaluation import iwae_log_likelihood
from vaelab.runs import train_run

RECIPES = {  # each names every knob it measures, so that a change of the defaults does not change it
    "defaults": {},
    "constant-1e-3-fp32": {"lr": 1e-3, "lr_schedule": "constant", "precision": "fp32"},  # the defaults before
    "cosine-1e-3-fp32": {"lr": 1e-3, "lr_schedule": "cosine", "precision": "fp32"},
    "cosine-2e-3-fp32": {"lr": 2e-3, "lr_schedule": "cosine", "precision": "fp32"},
    "cosine-3e-3-fp32": {"lr": 3e-3, "lr_schedule": "cosine", "precision": "fp32"},
    "cosine-2e-3-bf16": {"lr": 2e-3, "lr_schedule": "cosine", "precision": "bf16"},
    "cosine-2e-3-fp32-batch-256": {"lr": 2e-3, "lr_schedule": "cosine", "precision": "fp32", "batch_size": 256},
    "cosine-3e-3-bf16": {"lr": 3e-3, "lr_schedule": "cosine", "precision": "bf16"},
    "cosine-3e-3-bf16-batch-256": {"lr": 3e-3, "lr_schedule": "cosine", "precision": "bf16", "batch_size": 256},
    # for small data: AdamW's decay, a smaller network, the IWAE bound with two samples
    "cosine-2e-3-fp32-wd-0.01": {"lr": 2e-3, "lr_schedule": "cosine", "precision": "fp32", "weight_decay": 0.01},
    "cosine-2e-3-fp32-wd-0.1": {"lr": 2e-3, "lr_schedule": "cosine", "precision": "fp32", "weight_decay": 0.1},
    "cosine-2e-3-fp32-hidden-200": {"lr": 2e-3, "lr_schedule": "cosine", "precision": "fp32", "hidden": (200,)},
    "cosine-2e-3-bf16-wd-0.01": {"lr": 2e-3, "lr_schedule": "cosine", "precision": "bf16", "weight_decay": 0.01},
    "cosine-2e-3-fp32-iwae-k2": {"lr": 2e-3, "lr_schedule": "cosine", "precision": "fp32", "objective": "iwae", "k": 2},
    "checkpoint-every-epoch": {"checkpoint_every": 0.0},  # the cadence before: every epoch written
    "no-validation": {"val_size": 0},  # every training image, the last weights
}
K = 1000


def data_config(mnist: str | None) -> Config:
    """The data every run of the study trains on: mnist-5k, or full MNIST from the IDX files in ``mnist``."""
    return Config() if mnist is None else Config(data="mnist", data_dir=mnist)


def test_set(seed: int, base: Config) -> torch.Tensor:
    """The test split of seed ``seed``'s split (the seed splits the data too), binarised once."""
    return binarize_static(load(base.replace(seed=seed)).test.x, 0, "test")


def nll(model, x: torch.Tensor) -> float:
    torch.manual_seed(5)
    return -iwae_log_likelihood(model, x, K).mean().item()


def textbook(budget: float, seed: int, test: torch.Tensor, base: Config) -> tuple[float, int]:
    """The textbook loop on vaelab's training and validation images (it holds none out)."""
    splits = load(base.replace(seed=seed))
    model, epochs = textbook_for(torch.cat([splits.train.x, splits.val.x]), budget, seed)
    return nll(OneLayer(TextbookAsLatentModel(model.eval())), test), epochs


def recipe(name: str, budget: float, seed: int, test: torch.Tensor, base: Config) -> tuple[float, int]:
    if name == "textbook":
        return textbook(budget, seed, test, base)
    knobs = dict(time_budget=budget, epochs=100_000, seed=seed, threads=torch.get_num_threads(), **RECIPES[name])
    config = base.replace(**knobs)
    with tempfile.TemporaryDirectory() as tmp:
        out, record = train_run(config, Path(tmp) / "run", log=lambda line: None)
        model, _ = load_run(out)
    return nll(model.eval(), test), record.epoch


Results = dict[float, dict[str, list[tuple[float, int]]]]  # budget -> recipe -> (test NLL, epochs) per seed


def table(results: dict[str, list[tuple[float, int]]]) -> None:
    """One budget's recipes: NLL per seed, the mean, the lead over the textbook's mean, epochs per seed."""
    reference = statistics.mean(v for v, _ in results["textbook"]) if "textbook" in results else math.nan
    print(f"{'recipe':<26} {'test NLL per seed (nats)':<28} {'mean':>8} {'vs textbook':>12}  epochs")
    for name, runs in results.items():
        values = " / ".join(f"{v:.2f}" for v, _ in runs)
        mean = statistics.mean(v for v, _ in runs)
        epochs = " / ".join(str(e) for _, e in runs)
        print(f"{name:<26} {values:<28} {mean:8.2f} {reference - mean:+12.2f}  {epochs}")


def goals(results: Results) -> list[str]:
    """The two goals per recipe, in lines: at least 1.5 nats better than the textbook at equal
    time, and the textbook's NLL at budget B reached in B / 2 (where both budgets ran)."""
    lines = []
    for budget, runs in results.items():
        if "textbook" not in runs:
            continue
        target = statistics.mean(v for v, _ in runs["textbook"])
        half = results.get(budget / 2, {})
        for name in (n for n in runs if n != "textbook"):
            lead = target - statistics.mean(v for v, _ in runs[name])
            line = f"{name} at {budget:g} s: {lead:+.2f} nats at equal time ({'met' if lead >= 1.5 else 'missed'})"
            if name in half:
                short = target - statistics.mean(v for v, _ in half[name])
                verdict = "met" if short >= 0 else "missed"
                line += f"; in {budget / 2:g} s {short:+.2f} against the textbook's {budget:g} s ({verdict})"
            lines.append(line)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.recipes", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--budget", type=float, nargs="+", default=[60.0], help="seconds of training per run, one or more (default 60)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    names = ["textbook", *RECIPES]
    parser.add_argument("--recipes", nargs="+", choices=names, default=names)
    parser.add_argument("--threads", type=int, default=2, help="threads per run (default 2)")
    parser.add_argument("--mnist", metavar="DIR", help="full MNIST: the folder of its IDX files")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = data_config(args.mnist)
    if args.mnist is not None and not any(Path(args.mnist).glob("train-images-idx3-ubyte*")):
        print(f"full MNIST: skipped, {args.mnist} holds no train-images-idx3-ubyte[.gz] (and t10k-…)")
        return 0
    budgets = " and ".join(f"{b:g}" for b in args.budget)
    print(
        f"CPU: {cpu_name()}; torch {torch.__version__}, {args.threads} thread(s); {base.data}, {budgets} s per "
        f"run, k = {K}"
    )
    results: Results = {}
    for seed in args.seeds:  # interleaved: each seed runs every budget's recipes in turn
        test = test_set(seed, base)
        for budget in args.budget:
            for name in args.recipes:
                runs = results.setdefault(budget, {}).setdefault(name, [])
                runs.append(recipe(name, budget, seed, test, base))
                print(f"  seed {seed}, {budget:g} s: {name} {runs[-1][0]:.2f} nats, {runs[-1][1]} epochs", flush=True)
    for budget, runs in results.items():
        print(f"{budget:g} s per run:")
        table(runs)
    for line in goals(results):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
