"""Every knob of a run in one place, as typed, frozen data; TOML in and out.

Precedence: defaults < the ``--config`` TOML file < command-line options. The resolved
config is saved in each run directory as ``config.toml`` and is what ``load_model`` and
``--resume`` read back.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import tomli_w

from vaelab import parts
from vaelab.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# The parts (likelihoods, priors, posteriors, objectives, architectures, activations) are the
# tables of parts.py; these are the loop's own options.
BINARIZE = ("none", "static", "dynamic")
WARMUPS = ("constant", "linear", "cyclical")
INFERENCE = ("top-down", "bottom-up")  # the hierarchical family's order of inference (models/hierarchical.py)
TC_ESTIMATORS = ("mss", "mws")  # decomposition.MINIBATCH_ESTIMATORS
PRECISIONS = ("fp32", "bf16", "auto")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("constant", "cosine", "burda2015")

# Published protocols. Burda, Grosse & Salakhutdinov 2015, "Importance Weighted Autoencoders",
# section 5: one stochastic layer, 784-200-200-50 tanh MLPs, dynamically binarised MNIST,
# Adam (beta1 0.9, beta2 0.999, eps 1e-4), batch 20, 3^i epochs at lr 0.001 * 10^(-i/7) for
# i = 0..7 (3280 epochs), evaluated with k = 5000.
_BURDA = {
    "data": "mnist",
    "binarize": "dynamic",
    "model": "mlp",
    "hidden": (200, 200),
    "activation": "tanh",
    "latent_dim": 50,
    "likelihood": "bernoulli",
    "prior": "normal",
    "batch_size": 20,
    "lr": 1e-3,
    "adam_eps": 1e-4,
    "lr_schedule": "burda2015",
    "precision": "fp32",  # the paper's arithmetic
    "epochs": 3280,
}
# The paper's two-stochastic-layer architecture, 784-[200-200]-100-[100-100]-50 tanh (here with
# top-down inference, q(z2|x) q(z1|x, z2), see models/hierarchical.py).
_BURDA_2 = {**_BURDA, "family": "hierarchical", "latent_dim": 100, "top_hidden": (100, 100), "top_latent_dim": 50}
PRESETS = {
    "burda2015-vae": {**_BURDA, "objective": "elbo"},
    "burda2015-iwae-k5": {**_BURDA, "objective": "iwae", "k": 5},
    "burda2015-iwae-k50": {**_BURDA, "objective": "iwae", "k": 50},
    "burda2015-vae-2layer": {**_BURDA_2, "objective": "elbo"},
    "burda2015-iwae-2layer-k50": {**_BURDA_2, "objective": "iwae", "k": 50},
}


# -- each field's command-line option: one source for Config, `vaelab train`'s options and their help ----
OPTION_GROUPS = ("data", "model", "objective", "optimisation", "run")  # of `vaelab train --help`, in order


def opt(default: Any, help: str | Callable[[], str], *, group: str, choices=None, at_least=None, metavar=None):
    """A Config field that is a command-line option of ``vaelab train``: ``--name-with-dashes``, with its help
    (a callable where it lists a table of parts), its group, its choices (a tuple, or a callable reading a
    table of ``parts``), the least value Config accepts (``at_least``), and its metavar. The option's type
    follows the field's: a flag for a bool, sizes like 200,200 for a tuple, a checked number where there is a
    least value."""
    meta = {"help": help, "group": group, "choices": choices, "at_least": at_least, "metavar": metavar}
    return dataclasses.field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """A field's allowed values, or None for any."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def help_of(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    return text() if callable(text) else text


def _described(what: str, table) -> str:
    """'what: name (its help), ...' from a table of parts."""
    return f"{what}: " + "; ".join(f"{part.name} ({part.help})" for part in table)


def _data_sets() -> str:
    bundled = [d.name for d in parts.DATASETS if "bundled" in d.help]
    named = [d.name for d in parts.DATASETS if d.name not in bundled]
    return f"{', '.join(bundled)} (bundled), {', '.join(named)}"


def positive_int(text: str) -> int:
    return _number(int, 1)(text)


FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.1754943508222875e-38  # float32's largest and least normal
SEED_LIMIT = 2**63  # a seed is a whole number in [0, 2^63): what torch and numpy both take


def seed_int(text: str) -> int:
    """A ``--seed``: every command's, and each value of a sweep's, checked by this one rule."""
    value = _number(int, 0)(text)
    if value >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"a seed is a whole number from 0 to 2^63 - 1, got {text}")
    return value


def _number(kind, least):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not value >= least:
            raise argparse.ArgumentTypeError(
                f"must be at least {least}, got {text}" if kind is int else f"must be >= {least}, got {text}"
            )
        return value

    return parse


def hidden_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 400 or 200,200, got {text!r}") from None
    if any(v < 1 for v in sizes):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return sizes


def option_parser(f: dataclasses.Field):
    """The command-line parser of a field's values, from its type and least value."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    least = f.metadata.get("at_least")
    if kind.startswith("tuple"):
        return hidden_sizes
    if kind in ("int", "float"):
        number = int if kind == "int" else float
        return _number(number, least) if least is not None and least >= 0 else number
    return str


@dataclass(frozen=True)
class Config:
    # data
    data: str = opt(
        "mnist-5k",
        lambda: f"{_data_sets()}, a .npy/.npz file or an image folder",
        group="data",
        metavar="NAME",
    )  # a data set name, or a path to .npy/.npz or a folder of images
    data_dir: str | None = opt(None, "folder holding the data set's files", group="data", metavar="DIR")
    download: bool = opt(
        False, "download the data set into the cache (~/.cache/vaelab, or $VAELAB_CACHE)", group="data"
    )
    binarize: str = opt(
        "dynamic", "binarise pixels: none, static (once) or dynamic (every batch)", group="data", choices=BINARIZE
    )
    # validation images held out of the training images: -1: 1/12 of them, at most 1,000 (data.sources.VAL_AT_MOST);
    # 0: none, train on all of them and keep the last weights
    val_size: int = opt(
        -1,
        "validation images held out of the training images; -1: 1/12 of them, at most 1,000; 0: none (train on "
        "all, keep the last weights)",
        group="data",
        at_least=-1,
        metavar="N",
    )
    # model
    family: str = opt(  # vae: one latent layer; conditional: given labels; hierarchical: two (parts.FAMILIES)
        "vae", lambda: _described("the model family", parts.FAMILIES), group="model", choices=parts.FAMILIES.names
    )
    classes: int = 0  # the number of labels of a model given labels (``uses_labels``), set from the data
    # semi-supervised M2 (models/m2.py): this many labelled training images, balanced over the classes, the rest
    # unlabelled; alpha weighs the classifier's loss per labelled image (Kingma et al. 2014's 0.1 N, per example)
    labelled: int = opt(
        0,
        "semi-supervised M2: keep N training labels (balanced over the classes), the rest latent; 0: off",
        group="model",
        at_least=0,
        metavar="N",
    )
    alpha: float = opt(
        0.1,
        "--labelled: the weight of the classifier's loss per labelled image",
        group="model",
        at_least=0,
        metavar="A",
    )
    model: str = opt(  # auto: conv for colour images, mlp otherwise
        "auto",
        "architecture; auto: conv for colour images, mlp otherwise",
        group="model",
        choices=lambda: ("auto", *parts.ARCHITECTURES.names()),
    )
    hidden: tuple[int, ...] = opt((400,), "hidden layer sizes, e.g. 400 or 200,200", group="model", metavar="SIZES")
    activation: str = opt("relu", "activation function", group="model", choices=parts.ACTIVATIONS.names)
    latent_dim: int = opt(  # of z (one layer), or of z1, the layer next to x (hierarchical)
        20,
        "dimension of z (hierarchical: of z1, the layer next to x; categorical: its variables)",
        group="model",
        at_least=1,
        metavar="D",
    )
    top_latent_dim: int = opt(
        10, "--family hierarchical: dimension of z2, the top layer", group="model", at_least=1, metavar="D"
    )
    top_hidden: tuple[int, ...] = opt(
        (100, 100), "--family hierarchical: hidden sizes between z1 and z2, both ways", group="model", metavar="SIZES"
    )
    # hierarchical: top-down, q(z2|x) q(z1|x, z2); bottom-up, q(z1|x) q(z2|z1), which Bit-Swap codes
    inference: str = opt(
        "top-down",
        "--family hierarchical: top-down, q(z2|x) q(z1|x,z2), or bottom-up, q(z1|x) q(z2|z1) (Bit-Swap codes it)",
        group="model",
        choices=INFERENCE,
    )
    posterior: str = opt(
        "diagonal", lambda: _described("q(z|x)", parts.POSTERIORS), group="model", choices=parts.POSTERIORS.names
    )
    posterior_rank: int = opt(1, "the rank R of --posterior lowrank", group="model", at_least=1, metavar="R")
    flow_steps: int = opt(2, "--posterior iaf: the number of flow steps K", group="model", at_least=1, metavar="K")
    # --posterior categorical: latent_dim variables of `categories` each, trained through the Gumbel-softmax
    # relaxation at temperature max(temperature_min, temperature exp(-anneal_rate step)) (Jang et al. 2017's
    # schedule, updated every step); straight_through: the one-hot draw forward, the relaxed gradient backward
    categories: int = opt(
        10,
        "--posterior categorical: the categories K of each of its --latent-dim variables; vq: the codes",
        group="model",
        at_least=2,
        metavar="K",
    )
    # --posterior vq (VQ-VAE): each of latent_dim positions a code_dim vector, the commitment loss's weight, and
    # the decay of the codebook's moving averages
    code_dim: int = opt(
        16, "--posterior vq: the numbers of each codebook vector", group="model", at_least=1, metavar="D"
    )
    commitment: float = opt(
        0.25, "--posterior vq: the weight of the commitment loss", group="model", at_least=0, metavar="W"
    )
    ema_decay: float = opt(
        0.99, "--posterior vq: the decay of the codebook's moving averages", group="model", metavar="G"
    )
    temperature: float = opt(
        1.0,
        "--posterior categorical: the Gumbel-softmax temperature at step 0, annealed to "
        "max(--temperature-min, T exp(-rate step)) (Jang et al. 2017)",
        group="model",
        metavar="T",
    )
    temperature_min: float = opt(0.5, "--posterior categorical: the temperature's floor", group="model", metavar="T")
    anneal_rate: float = opt(
        1e-3, "--posterior categorical: the temperature's decay per step", group="model", at_least=0, metavar="R"
    )
    straight_through: bool = opt(
        False, "--posterior categorical: one-hot z in the forward pass, the relaxed gradient backward", group="model"
    )
    likelihood: str = opt(
        "bernoulli", lambda: _described("p(x|z)", parts.LIKELIHOODS), group="model", choices=parts.LIKELIHOODS.names
    )
    prior: str = opt(  # auto: uniform for --posterior categorical, normal for every other posterior
        "auto",
        lambda: _described("p(z)", parts.PRIORS) + "; auto: uniform for --posterior categorical, else normal",
        group="model",
        choices=lambda: ("auto", *parts.PRIORS.names()),
    )
    prior_components: int = opt(  # mixture components / VampPrior pseudo-inputs
        10, "components of the mixture / VampPrior", group="model", at_least=1, metavar="K"
    )
    # objective
    objective: str = opt(
        "elbo", lambda: _described("the loss", parts.OBJECTIVES), group="objective", choices=parts.OBJECTIVES.names
    )
    k: int = opt(5, "importance samples for --objective iwae", group="objective", at_least=1)
    beta: float = opt(1.0, "weight of the KL term", group="objective", at_least=0)
    warmup: str = opt("constant", "beta schedule", group="objective", choices=WARMUPS)
    warmup_steps: int = opt(  # linear: steps of the ramp; cyclical: steps of one cycle
        0, "steps of the linear ramp, or of one cycle", group="objective", at_least=0, metavar="N"
    )
    free_bits: float = opt(  # nats per latent dimension
        0.0, "minimum KL per latent dimension, in nats", group="objective", at_least=0, metavar="NATS"
    )
    # nats per example: a multiplier of the KL term (in beta's place), adjusted every step, holds the rate
    # (the KL term) at this target (training.RateTarget); 0: off, beta as given
    target_rate: float = opt(
        0.0,
        "hold the rate (the KL term) at this many nats per example: the KL's weight, starting at --beta, is "
        "adjusted every step and logged as beta; 0: off",
        group="objective",
        at_least=0,
        metavar="NATS",
    )
    # --objective tc (beta-TCVAE): weights of the KL's three parts, and the minibatch estimator of q(z)
    mi_weight: float = opt(
        1.0, "--objective tc: weight of the mutual information", group="objective", at_least=0, metavar="W"
    )
    tc_weight: float = opt(
        1.0, "--objective tc: weight of the total correlation", group="objective", at_least=0, metavar="W"
    )
    dwkl_weight: float = opt(
        1.0, "--objective tc: weight of the dimension-wise KL", group="objective", at_least=0, metavar="W"
    )
    tc_estimator: str = opt(
        "mss",
        "--objective tc: q(z) from the minibatch, stratified (mss) or weighted (mws)",
        group="objective",
        choices=TC_ESTIMATORS,
    )
    # optimisation
    epochs: int = opt(30, "passes over the training set", group="optimisation", at_least=0)
    batch_size: int = opt(128, "examples per step", group="optimisation", at_least=1)
    # lr 2e-3 with cosine decay and bf16 where native: the fastest of the recipes measured on mnist-5k
    # at a fixed wall time (benchmarks/recipes.py, docs/explanation/performance.md)
    lr: float = opt(2e-3, "Adam learning rate", group="optimisation")
    lr_schedule: str = opt(  # cosine: to 0 at the end of the run; burda2015: 3^i epochs at lr 10^(-i/7)
        "cosine",
        "constant; cosine (to 0 at the end of the epochs, or of --time-budget); burda2015 (3^i epochs at lr 10^(-i/7))",
        group="optimisation",
        choices=LR_SCHEDULES,
    )
    adam_eps: float = opt(1e-8, "Adam's epsilon", group="optimisation", metavar="EPS")
    weight_decay: float = opt(  # AdamW's: the weights shrink by lr * weight_decay each step, apart from the gradient
        0.0, "decoupled weight decay (AdamW, Loshchilov & Hutter 2019); 0: off", group="optimisation", at_least=0
    )
    grad_clip: float = opt(  # max gradient norm; 0 turns clipping off
        0.0, "clip the gradient norm to this; 0: off", group="optimisation", at_least=0
    )
    skip_nonfinite: int = opt(  # batches with a NaN/Inf loss or gradient that may be skipped before stopping
        0,
        "skip up to N batches whose loss or gradient is NaN/Inf (counted in metrics.csv)",
        group="optimisation",
        at_least=0,
        metavar="N",
    )
    time_budget: float = opt(  # wall seconds (training, validation, checkpoints); ends after the step reaching it
        0.0,
        "train until the run has taken this many seconds, validation and checkpoints included (then test); "
        "--epochs, if given, caps it; 0: no budget",
        group="optimisation",
        at_least=0,
        metavar="SECONDS",
    )
    # wall seconds between checkpoint writes (taken after every epoch, written at most this often and at the
    # run's end or stop): what a killed process may lose, or its epoch; 0 writes every epoch
    checkpoint_every: float = opt(
        10.0,
        "write the checkpoints (taken after every epoch) at most this often, and at the run's end or stop; "
        "0: every epoch",
        group="run",
        at_least=0,
        metavar="SECONDS",
    )
    seed: int = opt(0, "seed of the split, the initialisation, the data order and every sample", group="optimisation")
    threads: int = opt(  # 0: vaelab's default policy (see runs.set_threads)
        0,
        "CPU threads; 0: one per core that other work leaves free (OMP_NUM_THREADS wins where set)",
        group="optimisation",
        at_least=0,
    )
    device: str = opt("auto", "where to train", group="optimisation", choices=DEVICES)
    # bf16: the networks' matrix products under bfloat16 autocast (log-likelihoods, KL, sums and the
    # optimiser in float32); auto: bf16 where the hardware has it natively (CUDA, or a CPU with
    # avx512_bf16 / AMX), else fp32
    precision: str = opt(
        "auto",
        "bf16: matrix products in bfloat16 (the likelihood, KL and optimiser stay float32); auto: bf16 where "
        "the CPU (avx512_bf16, AMX) or GPU has it natively",
        group="optimisation",
        choices=PRECISIONS,
    )

    def __post_init__(self) -> None:
        for f in fields(self):  # the choices and least values the fields declare (``opt``); every float finite
            value, allowed, least = getattr(self, f.name), choices_of(f), f.metadata.get("at_least")
            if allowed is not None and value not in allowed:
                raise UserError(f"{f.name} = {value!r} is not one of {', '.join(allowed)}")
            if least is not None and value < least:
                flag = f.name.replace("_", "-")
                raise UserError(
                    f"{flag} must be at least {least}, got {value}"
                    if isinstance(value, int)
                    else f"{flag} must be >= {least}, got {value}"
                )
            if f.type == "float" and not math.isfinite(value):
                raise UserError(f"{f.name.replace('_', '-')} must be a finite number, got {value}")
            if f.type == "float" and value != 0 and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
                raise UserError(  # every float knob reaches a float32 tensor: 1e300 overflows, 1e-300 becomes 0
                    f"{f.name.replace('_', '-')} = {value:g} is outside what float32 holds "
                    f"({FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}); give a value in that range"
                )
        for name in ("hidden", "top_hidden"):
            sizes = getattr(self, name)
            if not sizes or any(h < 1 for h in sizes):
                flag = name.replace("_", "-")
                raise UserError(f"{flag} sizes must be positive, got {','.join(map(str, sizes))}; e.g. --{flag} 400")
        if not self.lr > 0 or not self.adam_eps > 0:
            raise UserError(f"lr and adam-eps must be positive, got {self.lr} and {self.adam_eps}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise UserError(f"seed must be a whole number from 0 to 2^63 - 1, got {self.seed}")
        if self.prior == "auto":  # frozen: the one field resolved here, so config.toml records the prior used
            object.__setattr__(self, "prior", auto_prior(self.posterior))
        objective, prior = parts.OBJECTIVES[self.objective], parts.PRIORS[self.prior]
        posterior = parts.POSTERIORS[self.posterior]
        whole = [f"the {self.prior} prior"] * (not prior.factorises)
        whole += [f"the {self.posterior} posterior"] * (not posterior.factorises)
        if objective.splits_kl_by_dimension and whole:
            raise UserError(
                f"--objective {self.objective} splits the KL into dimensions, and {' and '.join(whole)} does not "
                "factorise over them; use --prior normal (and --posterior diagonal)"
            )
        if self.free_bits > 0 and not objective.uses_free_bits:
            raise UserError(
                f"free bits apply to --objective elbo, not {self.objective}; use --free-bits 0"
                + (" (--dwkl-weight weighs the dimension-wise KL)" if objective.splits_kl_by_dimension else "")
            )
        if self.free_bits > 0 and whole:
            raise UserError(
                f"free bits need a KL per latent dimension, and {' and '.join(whole)} does not factorise over them: "
                "use --prior normal and --posterior diagonal, or --free-bits 0"
            )
        if self.target_rate > 0:
            held = [("--objective", self.objective, "elbo"), ("--warmup", self.warmup, "constant")]
            held += [("--free-bits", self.free_bits, 0.0)]
            for flag, value, needed in held:
                if value != needed:
                    raise UserError(
                        f"--target-rate adjusts the KL's weight itself, so it needs {flag} {needed}, not {value}; "
                        f"drop {flag} or --target-rate"
                    )
        self._check_family(objective, posterior)
        self._check_discrete(prior, posterior)
        if prior.mixes_posteriors and not posterior.factorises:
            raise UserError(
                f"the {self.prior} prior is a mixture of the encoder's diagonal posteriors; with --posterior "
                f"{self.posterior} use --prior normal or mixture"
            )

    def _check_family(self, objective: parts.Objective, posterior: parts.Posterior) -> None:
        """The model family's rules, read from its entry in ``parts.FAMILIES``; and options that only
        one family or posterior reads."""
        family = parts.FAMILIES[self.family]
        defaults = {f.name: f.default for f in fields(Config)}
        if family.layers == 1:
            given = [n for n in ("top_latent_dim", "top_hidden", "inference") if getattr(self, n) != defaults[n]]
            if given:
                flag = given[0].replace("_", "-")
                raise UserError(f"--{flag} sets the layers of --family hierarchical; add --family hierarchical")
        for kind, value, allowed in (
            ("prior", self.prior, family.priors),
            ("posterior", self.posterior, family.posteriors),
            ("model", self.model, family.architectures),
        ):
            if allowed and value not in allowed and not (kind == "model" and value == "auto"):
                raise UserError(
                    f"--family {self.family} is built with --{kind} {' or '.join(allowed)}, not {value}; "
                    f"use --{kind} {allowed[0]} or --family vae"
                )
        if objective.splits_kl_by_dimension and family.layers > 1:
            raise UserError(
                f"--objective {self.objective} takes apart the KL of one latent layer; --family {self.family} has "
                f"{family.layers}: use --objective elbo or iwae"
            )
        if self.classes and not self.uses_labels:
            raise UserError(
                "classes is set from the data's labels for --family conditional or --labelled N; remove it, "
                "or use one of them"
            )
        self._check_labelled(defaults)
        # an option that only another part reads would be ignored: refuse it (a fact of each part, parts.py)
        for table, chosen in (
            (parts.OBJECTIVES, self.objective),
            (parts.POSTERIORS, self.posterior),
            (parts.PRIORS, self.prior),
        ):
            unread = {name for part in table for name in part.reads} - set(table[chosen].reads)
            for name in sorted(n for n in unread if getattr(self, n) != defaults[n]):
                flag, readers = name.replace("_", "-"), [p.name for p in table if name in p.reads]
                raise UserError(
                    f"--{flag} is read only with --{table.kind} {' or '.join(readers)}, which this run does not "
                    f"use; add --{table.kind} {readers[0]}, or drop --{flag}"
                )
        if objective.splits_kl_by_dimension and self.batch_size < 2:
            raise UserError(
                f"--objective {self.objective} estimates q(z) from the other examples of a batch; "
                "use --batch-size 2 or more"
            )

    def _check_labelled(self, defaults: dict) -> None:
        """Semi-supervised M2 (``--labelled N``): one layer of z beside the label, MLPs, N(0, I), the ELBO."""
        if not self.labelled:
            if self.alpha != defaults["alpha"]:
                raise UserError(
                    "--alpha weighs the classifier of semi-supervised M2; add --labelled N, or drop --alpha"
                )
            return
        if parts.FAMILIES[self.family].labels:
            raise UserError(
                f"--labelled trains semi-supervised M2, whose labels are latent where missing; --family "
                f"{self.family} needs every label: drop one of them"
            )
        held = [("--family", self.family, "vae"), ("--prior", self.prior, "normal")]
        held += [("--posterior", self.posterior, "diagonal"), ("--objective", self.objective, "elbo")]
        held += [("--model", self.model if self.model != "auto" else "mlp", "mlp")]
        for flag, value, needed in held:
            if value != needed:
                raise UserError(
                    f"--labelled trains M2, built with {flag} {needed}, not {value}; drop {flag} or --labelled"
                )
        if self.free_bits > 0 or self.target_rate > 0:
            raise UserError("--labelled trains M2 on its own bound: drop --free-bits and --target-rate")

    def _check_discrete(self, prior: parts.Prior, posterior: parts.Posterior) -> None:
        """A discrete posterior (categorical, VQ) and the uniform prior go together, and train on the ELBO; a
        conv grid is VQ-VAE's."""
        if self.model == "conv-grid" and self.posterior != "vq":
            raise UserError(
                f"--model conv-grid quantises each position of its grid (VQ-VAE); with --posterior {self.posterior} "
                "use --model conv, or add --posterior vq"
            )
        if posterior.discrete and not prior.discrete:
            raise UserError(
                f"--posterior {self.posterior} has a uniform prior over its categories, not the {self.prior} prior; "
                "use --prior uniform, or leave --prior out"
            )
        if prior.discrete and not posterior.discrete:
            raise UserError(
                f"the {self.prior} prior is over the categories of --posterior categorical; with --posterior "
                f"{self.posterior} use --prior normal, or leave --prior out"
            )
        if not posterior.discrete:
            return
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay must be in [0, 1), got {self.ema_decay}; e.g. --ema-decay 0.99")
        if self.posterior == "vq" and (self.free_bits > 0 or self.target_rate > 0):
            raise UserError(
                "--posterior vq's KL is N log K, the same for every image: --free-bits and --target-rate have "
                "nothing to hold; drop them (--latent-dim and --categories set the rate)"
            )
        if self.objective != "elbo":
            raise UserError(
                f"--posterior {self.posterior} trains on the ELBO through its relaxation, whose z has no density "
                f"for --objective {self.objective}; use --objective elbo (vaelab evaluate scores the discrete "
                "model's IWAE bound)"
            )
        if self.free_bits > math.log(self.categories):
            raise UserError(
                f"--free-bits {self.free_bits} is above log K = {math.log(self.categories):.4f} nats, the most a "
                f"variable of {self.categories} categories can cost; use --free-bits {math.log(self.categories):.2f} "
                "or less"
            )
        if not (self.temperature > 0 and self.temperature_min > 0):
            raise UserError(
                f"the relaxation's temperature must be above 0, got --temperature {self.temperature} and "
                f"--temperature-min {self.temperature_min}; e.g. --temperature 1 --temperature-min 0.5"
            )
        if self.temperature_min > self.temperature:
            raise UserError(
                f"--temperature-min {self.temperature_min} is above --temperature {self.temperature}, where the "
                "annealing starts; give a floor at or below the start"
            )

    # the loop's knobs as facts, each string compared here once
    @property
    def binarized(self) -> bool:
        """Pixels are binarised (``--binarize static`` or ``dynamic``)."""
        return self.binarize != "none"

    @property
    def binarized_per_batch(self) -> bool:
        """Training pixels are drawn anew for each batch (``--binarize dynamic``); static: once."""
        return self.binarize == "dynamic"

    @property
    def lr_per_step(self) -> bool:
        """The learning rate follows the share of the run done, step by step (``cosine``); else per epoch."""
        return self.lr_schedule == "cosine"

    @property
    def uses_labels(self) -> bool:
        """The model is given the data's labels: a family that takes them, or M2 (``--labelled``: its labels
        are latent where missing)."""
        return parts.FAMILIES[self.family].labels or self.labelled > 0

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes``; a prior that ``auto`` chose follows a new posterior (categorical or not)."""
        if "posterior" in changes and "prior" not in changes and self.prior == auto_prior(self.posterior):
            changes["prior"] = "auto"
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


def auto_prior(posterior: str) -> str:
    """The prior ``--prior auto`` means: uniform for a categorical posterior, N(0, I) for the others."""
    return "uniform" if parts.POSTERIORS[posterior].discrete else "normal"


FIELD_TYPES = typing.get_type_hints(Config)


def upgraded(values: dict, source: str) -> dict:
    """Option values as an earlier vaelab wrote them, in today's names: ``conditional = true`` was the
    conditional family before it was one (``family = "conditional"``)."""
    values = dict(values)
    if values.pop("conditional", False) is True:
        if values.get("family", "vae") != "vae":
            raise UserError(f"{source} sets both conditional and family {values['family']!r}; keep one")
        values["family"] = "conditional"
    return values


def coerce(name: str, value: Any, source: str) -> Any:
    """Check and convert one value to the type of field ``name``; ``source`` names where it came from."""
    if name not in FIELD_TYPES:
        known = ", ".join(sorted(FIELD_TYPES))
        raise UserError(f"unknown option {name!r} in {source}; known options: {known}")
    kind = FIELD_TYPES[name]
    bad = UserError(f"{name} in {source} must be {_describe(kind)}, got {value!r}")
    whole = isinstance(value, int) and not isinstance(value, bool)
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is int:
        if not whole:
            raise bad
        return value
    if kind is float:
        if not whole and not isinstance(value, float) or not math.isfinite(value):  # TOML has nan and inf
            raise bad
        return float(value)
    if typing.get_origin(kind) is tuple:  # tuple[int, ...]
        if whole:
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise bad
        return tuple(value)
    if not isinstance(value, str):  # str, and str | None
        raise bad
    return value


def _describe(kind) -> str:
    if typing.get_origin(kind) is tuple:
        return "a list of whole numbers, e.g. [200, 200]"
    return {bool: "true or false", int: "a whole number", float: "a number"}.get(kind, "a string")


def parse_toml(text: str, where: str) -> dict:
    """Checked option values from TOML text; ``where`` names the source in messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{where} is not valid TOML: {err}") from None
    except RecursionError:  # arrays nested thousands deep
        raise UserError(f"{where} nests arrays too deep for any option; check the file") from None
    # a run's config.toml ends with its history of resumes ([[resumed]] tables, runs.config_toml): not options
    # and what auto resolved to ([resolved], the record of one process): not options either
    raw = upgraded({name: value for name, value in raw.items() if name not in ("resumed", "resolved")}, where)
    return {name: coerce(name, value, where) for name, value in raw.items()}


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (UnicodeDecodeError, IsADirectoryError) as err:
        raise UserError(f"config file {path} is not a text file: {err}") from None
    return parse_toml(text, f"config file {path}")


def resolve(toml_path: str | Path | None, overrides: dict, preset: str | None = None) -> Config:
    """defaults < ``preset`` < TOML file < ``overrides`` (the options given on the command line). A run
    with a time budget and no ``epochs`` of its own trains until the budget ends."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values = dict(PRESETS[preset]) if preset else {}
    if toml_path:
        values.update(read_toml(toml_path))
    values.update(overrides)
    if values.get("time_budget", 0) > 0 and "epochs" not in values:  # the budget ends the run, not 30 epochs
        values["epochs"] = UNCAPPED_EPOCHS
    return Config(**values)


UNCAPPED_EPOCHS = 1_000_000  # the epochs of a --time-budget run that names none: the clock decides


def lr_at(config: Config, epoch: int, progress: float = 0.0) -> float:
    """The learning rate of an epoch, or, for ``cosine``, of the point ``progress`` in [0, 1] of the
    run (the share of its steps, or of its ``time_budget``, done): a pure function of its arguments.

    - ``constant``: lr throughout.
    - ``cosine``: lr (1 + cos(pi progress)) / 2, from lr to 0 at the end of the run (Loshchilov & Hutter 2017).
    - ``burda2015``: 3^i epochs at lr 10^(-i/7), i = 0 .. 7 (Burda et al. 2015).
    """
    if config.lr_per_step:
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    if config.lr_schedule == "burda2015":
        start = 0
        for i in range(8):
            start += 3**i
            if epoch < start:
                return config.lr * 10 ** (-i / 7)
        return config.lr * 10 ** (-7 / 7)
    return config.lr
