"""A training run on disk: the run directory and ``vaelab train``.

:func:`train_run` loads the data, builds the model, joins the process group under torchrun,
and trains with :func:`training.fit`, attaching :class:`RunWriter`, the hook that writes the
run directory (``config.toml``, ``metrics.csv``, TensorBoard events, atomic checkpoints,
``model.safetensors``). Resuming (``--resume``, ``--auto-resume``) is checked here.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import tomli_w
import torch

from vaelab import checkpoint, data, distributed, memory, models, parts, rundir
from vaelab.config import Config, tomllib
from vaelab.contract import Examples
from vaelab.data import prepare_data
from vaelab.errors import UserError
from vaelab.fileio import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from vaelab.training import (
    EpochRecord,
    RateTarget,
    TrainState,
    check_batch_size,
    evaluate_terms,
    fit,
    make_optimizer,
    resolved_precision,
    signals_held,
)

CSV_BASE = [
    "epoch",
    "split",
    "step",
    "elbo",
    "reconstruction",
    "kl",
    "beta",
    "examples_per_s",
    "seconds",
    "bits_per_dim",
    "kl_method",
    "skipped",
    "elapsed",
    "mutual_information",
    "total_correlation",
    "dimension_wise_kl",
    "temperature",
]


def kl_columns(layer_dims: dict[str, int]) -> tuple[list[str], list[str]]:
    """metrics.csv's KL columns, (each layer's KL, each dimension's KL): for one latent layer none and
    ``kl_dim_j``; for several ``kl_z2``, ``kl_z1`` and ``kl_z2_dim_j``, ``kl_z1_dim_j``, top layer first."""
    if len(layer_dims) == 1:
        return [], [f"kl_dim_{j}" for j in range(next(iter(layer_dims.values())))]
    layers = [f"kl_{name}" for name in layer_dims]
    return layers, [f"kl_{name}_dim_{j}" for name, dims in layer_dims.items() for j in range(dims)]


def default_out(name: str) -> Path:
    """runs/NAME, or runs/NAME-2, -3, ... : a default run never lands on an existing one."""
    base = Path("runs") / Path(name).stem
    candidate, i = base, 1
    while candidate.exists():
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    return candidate


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Make ``out`` ready to be written, under its lock (rank 0): a resume needs checkpoints/last.pt;
    a new run needs an empty or absent folder, or ``overwrite`` and a folder that is a vaelab run, of
    which only vaelab's own files are removed (:func:`rundir.remove_owned`)."""
    check_out(out, resume, overwrite)
    if resume:
        remove_stale_temporaries(out / "checkpoints")  # the files of a write that a kill interrupted
        remove_stale_temporaries(out)
        rundir.mark(out)  # a run written before the marker existed gets one
        return
    if _holds_anything(out):
        rundir.mark(out)  # a run written before the marker existed (see check_out) is adopted first
        rundir.remove_owned(out)
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run directory {out}: {err.strerror}; choose another --out") from None
    rundir.mark(out, new=True)


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse what :func:`prepare_out` would refuse, changing nothing (checked before the lock is
    taken, so that a refused folder gains no lock file, and again under it)."""
    if out.is_dir():
        rundir.refuse_links(out)
    if resume:
        if not (out / "checkpoints" / "last.pt").exists():
            raise UserError(f"--resume: {out} has no checkpoints/last.pt to resume from")
    elif _holds_anything(out):
        if not overwrite:
            raise UserError(
                f"{out} already exists and is not empty; choose another --out, add --resume, or --overwrite"
            )
        if not rundir.is_run(out) and not _written_before_the_marker(out):
            raise UserError(
                f"{out} is not a vaelab run directory (it has no {rundir.MARKER} marker of its own); refusing to "
                "delete anything in it. Choose another --out, or remove the folder yourself"
            )


def _written_before_the_marker(out: Path) -> bool:
    """A run of a vaelab from before the marker: its checkpoints/last.pt loads as a vaelab checkpoint
    (a stray config.toml does not make one)."""
    if (out / rundir.MARKER).exists():  # a marker, but not this folder's: copied in, no run of before it
        return False
    try:
        return (out / "checkpoints" / "last.pt").is_file() and bool(
            checkpoint.load_checkpoint(out / "checkpoints" / "last.pt")
        )
    except UserError:
        return False


def _holds_anything(out: Path) -> bool:
    """Whether ``out`` holds anything but a lock file (left by this command, or by one that ended)."""
    return out.is_dir() and any(p.name != rundir.LOCK for p in out.iterdir())


def make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run directory {out}: {err.strerror}; choose another --out") from None
    if not out.is_dir():
        raise UserError(f"cannot create run directory {out}: a file of that name exists; choose another --out")


def auto_resume_mode(out: Path, overwrite: bool) -> tuple[bool, bool]:
    """``--auto-resume``: (resume, overwrite) for ``out``. Continue where checkpoints/last.pt is; start
    where there is nothing; restart a vaelab run that never wrote a checkpoint (killed before its first
    write); refuse everything else: a folder that is not a run, or a run whose last.pt is gone."""
    if (out / "checkpoints" / "last.pt").exists():
        return True, overwrite
    if not _holds_anything(out) or overwrite:
        return False, overwrite
    if not rundir.is_run(out):
        raise UserError(
            f"--auto-resume: {out} is not empty and is not a vaelab run; choose another --out (nothing was changed)"
        )
    if (out / "model.safetensors").exists() or (out / "checkpoints" / "best.pt").exists():
        raise UserError(
            f"--auto-resume: the run in {out} has weights but no checkpoints/last.pt to resume from; add --overwrite "
            "to replace it, or choose another --out"
        )
    return False, True  # a run killed before its first checkpoint: start it again in place


class RunWriter:
    """Hook that writes metrics.csv, TensorBoard events and checkpoints (rank 0 only)."""

    def __init__(
        self,
        out: Path,
        config: Config,
        optimizer,
        x_shape,
        identity: dict[str, str],
        layer_dims: dict[str, int],
        state: TrainState,
        val_images: int,
    ):
        self.out, self.config, self.optimizer = out, config, optimizer
        self.val_images, self.split = val_images, epoch_split(val_images)
        self.x_shape, self.identity = x_shape, identity  # the run's id and its data's fingerprints
        self.layer_columns, self.dim_columns = kl_columns(layer_dims)
        self.columns = CSV_BASE + self.layer_columns + self.dim_columns
        self.csv_path = out / "metrics.csv"
        kept = []
        if state.epoch and self.csv_path.exists():  # a resumed run: drop rows of epochs that will be run again
            with open(self.csv_path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if _epoch_of(row) < state.epoch]
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, self.columns, extrasaction="ignore")  # a torn row's extra fields go
        writer.writeheader()
        writer.writerows(kept)
        atomic_write_text(self.csv_path, text.getvalue())  # replaces the path: a link there is never followed
        self.checkpoint_seconds = 0.0  # spent taking and writing checkpoints and weights by this process
        # Checkpoints are taken (serialised) after every validation, and written to disk when
        # ``config.checkpoint_every`` wall seconds have passed since the last write, and at the run's
        # end, a stop or an error (``save``): a killed process loses at most that long, or its epoch
        self.pending: dict[str, bytes] = {}  # path in the run directory -> bytes
        self.saved_at = state.elapsed  # the run's elapsed seconds at the last write
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency; keep training without it
            pass

    def __call__(self, *, records: list[EpochRecord], model, state: TrainState) -> None:
        """Every record of the epoch into metrics.csv and TensorBoard; then the checkpoints, taken after the
        record that stands for the epoch."""
        for record in records:
            self._log(record)
        for record in records:
            if record.split == self.split:
                self._checkpoint(record, model, state)

    def _log(self, record: EpochRecord) -> None:
        row = {k: getattr(record, k) for k in CSV_BASE}
        if self.layer_columns:
            row.update({f"kl_{name}": v for name, v in record.kl_per_layer.items()})
        if record.kl_per_dim:  # empty where a layer's KL does not factorise
            row.update(zip(self.dim_columns, record.kl_per_dim, strict=True))
        fd = os.open(self.csv_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
        with open(fd, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for name in (
                "elbo",
                "reconstruction",
                "kl",
                "beta",
                "mutual_information",
                "total_correlation",
                "dimension_wise_kl",
            ):
                if getattr(record, name) is not None:
                    self.tb.add_scalar(f"{record.split}/{name}", getattr(record, name), record.step)
            if len(record.kl_per_layer) > 1:
                for name, value in record.kl_per_layer.items():
                    self.tb.add_scalar(f"{record.split}/kl_{name}", value, record.step)
            self.tb.flush()

    def _checkpoint(self, record: EpochRecord, model, state: TrainState) -> None:
        start = time.perf_counter()
        improved = not self.val_images or record.elbo > state.best_elbo
        if improved:
            state.best_elbo = record.elbo
        taken = self.checkpoint(model, state)
        self.pending["checkpoints/last.pt"] = taken
        if improved:
            self.pending["checkpoints/best.pt"] = taken
            self.pending["model.safetensors"] = checkpoint.weights_bytes(
                model, self.config, self.x_shape, self.identity
            )
        self.checkpoint_seconds += time.perf_counter() - start  # the taking; save() counts the writing
        if state.elapsed - self.saved_at >= self.config.checkpoint_every:
            self.save()
            self.saved_at = state.elapsed
        if self.tb is not None:
            self.tb.add_scalar("time/checkpoint_seconds", time.perf_counter() - start, record.step)

    def checkpoint(self, model, state: TrainState) -> bytes:
        return checkpoint.checkpoint_bytes(
            model,
            self.optimizer,
            epoch=state.epoch,
            step=state.step,
            best_elbo=state.best_elbo,
            elapsed=state.elapsed,
            config=self.config,
            x_shape=self.x_shape,
            **self.identity,
            val_images=self.val_images,
            rate=None if state.rate is None else asdict(state.rate),
        )

    def save(self) -> None:
        """Write the checkpoints taken since the last write: the best weights first, then last.pt, so
        that a kill between the writes leaves a last.pt no newer than the best weights it knows of. Its
        callers hold a Ctrl-C or SIGTERM back until it is done (``fit`` around its hooks, :meth:`close`)."""
        start = time.perf_counter()
        for name in ("checkpoints/best.pt", "model.safetensors", "checkpoints/last.pt"):
            if name in self.pending:
                atomic_write_bytes(self.out / name, self.pending[name])
                del self.pending[name]
        self.checkpoint_seconds += time.perf_counter() - start

    def close(self):
        """The run's end, or a stop: write the checkpoints not yet written, and close TensorBoard's writer
        (a second stop now waits for both)."""
        with signals_held():
            try:
                self.save()
            finally:
                if self.tb is not None:
                    self.tb.close()


def _epoch_of(row: dict) -> float:
    """A metrics.csv row's epoch; a row torn by a kill, or edited into something else, counts as
    one to run again (so it is dropped)."""
    try:
        return int(row.get("epoch") or "")
    except (TypeError, ValueError):
        return float("inf")


def epoch_split(val_images: int) -> str:
    """The record that stands for an epoch, in the log and for its checkpoint: the validation
    record, or with --val-size 0 the training record (and the last weights are the best)."""
    return "val" if val_images else "train"


def summary_line(r: EpochRecord) -> str:
    bpd = f"  {r.bits_per_dim:.3f} bits/dim" if r.bits_per_dim is not None else ""
    kl = "KL" if r.kl_method == "analytic" else "KL (Monte Carlo)"
    layers = ""
    if len(r.kl_per_layer) > 1:  # each layer's part: a top layer whose KL is near 0 has collapsed
        layers = " (" + ", ".join(f"{name} {v:.3f}" for name, v in r.kl_per_layer.items()) + ")"
    return (
        f"{r.split:>5}  ELBO {r.elbo:9.3f}  reconstruction {r.reconstruction:9.3f}  {kl} {r.kl:7.3f}{layers} nats{bpd}"
    )


def train_run(
    config: Config,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    auto_resume: bool = False,
    given: Collection[str] | None = None,
) -> tuple[Path, EpochRecord]:
    """``vaelab train``: data, model, loop, run directory; returns the run directory and the test record.

    ``auto_resume``: continue from ``out/checkpoints/last.pt`` when it exists, else start the
    run in ``out`` (see :func:`auto_resume_mode` for what is refused). That is what a command
    restarted by ``torchrun --max-restarts`` or a cluster scheduler needs: the same command
    line, run again, continues where the last checkpoint left off.

    A resume continues the run as it was configured: ``given`` names the options the user set
    (``None``: every field of ``config``); the others come from the run's checkpoint, and of the
    given ones only :data:`RESUME_MAY_CHANGE` may differ, which are applied and recorded in
    config.toml (see :func:`continued_config`).

    Under torchrun every rank runs this; rank 0 alone prepares the run directory, holds its lock,
    logs and writes, the others wait for it at barriers.
    """
    threads = set_threads(config.threads)
    device = distributed.resolve_device(config.device)
    if (auto_resume or resume) and out is None:
        raise UserError(f"{'--auto-resume' if auto_resume else '--resume'} needs --out: the run directory to continue")
    with distributed.session(device.type) as ctx, contextlib.ExitStack() as held:
        if auto_resume:  # decided by every rank before rank 0 writes anything (the barrier below)
            resume, overwrite = auto_resume_mode(Path(out), overwrite)
        return _train(config, device, ctx, out, resume, overwrite, log, given, held, threads)


def _train(config, device, ctx, out, resume, overwrite, log, given, held, threads) -> tuple[Path, EpochRecord]:
    device = distributed.rank_device(device, ctx)
    if not ctx.is_main:
        log = _silent
    resume_ckpt, changes = None, {}
    if resume:
        out = Path(out)
        if ctx.is_main:
            check_out(out, resume, overwrite)
            held.enter_context(rundir.lock(out, "training"))
            prepare_out(out, resume, overwrite)
        distributed.barrier()
        resume_ckpt = checkpoint.load_checkpoint(out / "checkpoints" / "last.pt")
        config, changes = continued_config(resume_ckpt["config"], config, given)
    torch.manual_seed(config.seed)
    config, splits, (train, val, test), pixels = _prepared(config, device, ctx.world)
    if resume_ckpt is None and config.epochs == 0:
        raise UserError("--epochs 0 trains nothing and a new run would have no model; give --epochs 1 or more")
    out = Path(out) if out else default_out(splits.name)
    distributed.barrier()  # every rank has chosen ``out`` and read the directory before rank 0 changes it
    state = TrainState()
    if resume_ckpt is not None:
        _check_resumable(resume_ckpt, splits)
    elif ctx.is_main:
        check_out(out, resume, overwrite)
        make_dir(out)
        held.enter_context(rundir.lock(out, "training"))
        prepare_out(out, resume, overwrite)
    model = models.build(config, splits.x_shape).to(device)
    optimizer = make_optimizer(model, config)
    if resume_ckpt is not None:
        state = _restore(resume_ckpt, model, optimizer, out)
        log(f"resuming {out} at epoch {state.epoch + 1}")
        if changes:
            said = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            log(f"resume changes {said} (recorded in {out / 'config.toml'})")
    precision = resolved_precision(config.precision, device)
    hooks: list = []
    if ctx.is_main:
        resolved = {"precision": precision[0], "precision_why": precision[1], "threads": threads[0]}
        resolved["threads_why"] = threads[1]
        atomic_write_text(out / "config.toml", config_toml(out, config, changes, state.epoch, resolved))
        writer = RunWriter(
            out, config, optimizer, splits.x_shape, identity(out, splits), model.layer_dims, state, len(val)
        )
        hooks.append(writer)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{splits.name}: {len(train)} train / {len(val)} val / {len(test)} test images of shape "
        f"{splits.x_shape}; {_described(config, model, splits.x_shape, len(train))}, {config.posterior} "
        f"posterior, {n_params:,} parameters, "
        f"{config.likelihood} likelihood, {config.prior} prior, on {device}; {precision[0]} ({precision[1]}), "
        f"{threads[0]} thread{'s' * (threads[0] > 1)} ({threads[1]})"
    )

    try:
        fit(
            model,
            train,
            val if len(val) else None,  # --val-size 0: no validation
            config,
            hooks=[*hooks, EpochPrinter(log, config.epochs, epoch_split(len(val)))],
            state=state,
            optimizer=optimizer,
            pixels=pixels,
        )
    finally:
        for hook in hooks:
            hook.close()
    if config.time_budget and state.elapsed >= config.time_budget:
        log(f"time budget of {config.time_budget:g} s reached after {state.step} steps, in epoch {state.epoch}")
    if hooks:  # how this process's time went (metrics.csv has it per epoch: `seconds` of each row)
        log(_time_line(state, writer.checkpoint_seconds))
    distributed.barrier()  # rank 0's last checkpoint is on disk
    if (out / "checkpoints" / "best.pt").exists():
        model.load_state_dict(checkpoint.load_checkpoint(out / "checkpoints" / "best.pt")["model"])
    return out, evaluate_terms(model, test, 1024, state.epoch, "test", pixels, config.seed)


def check_before_launch(config: Config, world: int, out, resume: bool, overwrite: bool, auto_resume: bool) -> None:
    """What every one of ``world`` processes would refuse (the device, the run directory, the data, the
    batch's split across them, memory), refused once here, before torchrun starts them: a refusal inside
    the processes is a traceback per process and torchrun's own. A resumed run's config comes from its
    checkpoint, so only its device and directory are checked."""
    device = distributed.resolve_device(config.device)
    if (auto_resume or resume) and out is None:
        raise UserError(f"{'--auto-resume' if auto_resume else '--resume'} needs --out: the run directory to continue")
    if auto_resume:
        resume, overwrite = auto_resume_mode(Path(out), overwrite)
    if out is not None:
        check_out(Path(out), resume, overwrite)
    if not resume:
        _prepared(config, torch.device("cpu") if device.type == "cuda" else device, world)


def _prepared(config: Config, device, world: int):
    """The run's data on ``device`` as it trains on them, each data split's images with the labels the model
    is given (M2: the kept ones, -1 elsewhere), and the config with the labels' count; every check that
    needs the data, made before anything is written: (config, splits, (train, val, test) examples, pixels
    per image)."""
    splits, train_x, val_x, test_x, pixels = prepare_data(config, device)
    if config.uses_labels and not config.classes:  # the labels' count, from every split
        config = config.replace(classes=number_of_classes(splits))
    labels = [data.labels_for(config, s, splits.name, device) for s in (splits.train, splits.val, splits.test)]
    if config.labelled and config.classes < 2:
        raise UserError(
            f"M2 (--labelled) classifies the images into their classes, and the labels of {splits.name} name "
            f"{config.classes} class; give data of 2 or more classes"
        )
    if config.labelled:  # M2: some training labels kept, the rest -1; validation and test score it unlabelled
        labels = [data.semi_supervised(config, labels[0], splits.name), None, None]
    check_batch_size(config.batch_size, len(train_x), world)
    if parts.OBJECTIVES[config.objective].splits_kl_by_dimension and config.batch_size // world < 2:
        raise UserError(  # each rank's rows are the minibatch that estimates q(z)
            f"--objective {config.objective} estimates q(z) from each process's rows of a batch, and --batch-size "
            f"{config.batch_size} gives {world} processes {config.batch_size // world} each; use --batch-size "
            f"{2 * world} or more"
        )
    check_memory(config, splits.x_shape, device)
    check_target_rate(config, splits)
    examples = tuple(Examples(x, y) for x, y in zip((train_x, val_x, test_x), labels, strict=True))
    return config, splits, examples, pixels


@dataclass(frozen=True)
class EpochPrinter:
    """Hook: a line per epoch, of the record that stands for it (validation's, or training's without it)."""

    log: Callable[[str], None]
    epochs: int
    split: str

    def __call__(self, *, records: list[EpochRecord], model, state) -> None:
        for record in records:
            if record.split == self.split:
                line = summary_line(record).strip()
                self.log(f"epoch {record.epoch + 1:3d}/{self.epochs}  {line}  beta {record.beta:.2f}")


def _time_line(state: TrainState, checkpoint_seconds: float) -> str:
    training = sum(r.seconds for r in state.history if r.split == "train")
    validation = sum(r.seconds for r in state.history if r.split == "val")
    return (
        f"time: {state.elapsed:.1f} s in all: training {training:.1f} s, validation {validation:.1f} s and "
        f"checkpoints {checkpoint_seconds:.1f} s in this process"
    )


def _restore(ckpt: dict, model, optimizer, out: Path) -> TrainState:
    """The model's, the optimiser's and the random streams' state from a resumed run's checkpoint, and
    the loop's."""
    checkpoint.load_state(model, ckpt["model"], out / "checkpoints" / "last.pt")
    optimizer.load_state_dict(ckpt["optimizer"])
    checkpoint.set_rng_state(ckpt["rng"])
    return TrainState(
        ckpt["epoch"],
        ckpt["step"],
        ckpt["best_elbo"],
        elapsed=ckpt.get("elapsed", 0.0),
        rate=RateTarget(**ckpt["rate"]) if ckpt.get("rate") else None,
    )


def _described(config: Config, model, x_shape, train_images: int) -> str:
    """The model in the run's first line: its architecture, family, layers or labels."""
    if config.labelled:
        return (
            f"semi-supervised M2 ({config.labelled} of {train_images} training images labelled, "
            f"{config.classes} classes; y, and z of {config.latent_dim} dims)"
        )
    if len(model.layer_dims) > 1:
        return f"{config.family} VAE (" + ", ".join(f"{n} of {d}" for n, d in model.layer_dims.items()) + " dims)"
    if config.uses_labels:
        return f"{config.family} mlp VAE ({config.classes} classes)"
    return f"{models.architecture_for(config.model, x_shape)} VAE"


def memory_needed(config: Config, x_shape) -> int:
    """Bytes a training step needs, roughly: the parameters four times (weights, gradients and Adam's
    two moments), counted on PyTorch's meta device (nothing allocated), and the activations of a batch
    (each of ``k`` importance samples; the total-correlation estimator's (B, B, D) densities)."""
    with torch.device("meta"):
        model = models.build(config, x_shape)
        params = sum(p.numel() for p in model.parameters())
        buffers = sum(b.numel() for b in model.buffers())  # a VQ-VAE's codebook and its moving averages
    pixels = math.prod(x_shape)
    samples = config.batch_size * (config.k if "k" in parts.OBJECTIVES[config.objective].reads else 1)
    posterior = parts.POSTERIORS[config.posterior]
    latent = posterior.outputs(config) + posterior.z_width(config)  # the encoder's output, and z (one-hot: N K)
    latent += config.latent_dim * config.categories if posterior.discrete else 0  # per-category scores, distances
    widths = 2 * sum(config.hidden) + 2 * latent + 3 * pixels  # forward and backward, both networks
    pairs = (
        config.batch_size**2 * config.latent_dim * 3 if parts.OBJECTIVES[config.objective].splits_kl_by_dimension else 0
    )
    return 4 * (4 * params + buffers + 2 * samples * widths + pairs)


def check_memory(config: Config, x_shape, device: torch.device) -> None:
    """Refuse, before allocating, a model or batch that cannot fit."""
    memory.require(
        memory_needed(config, x_shape),
        "this model and batch",
        "use smaller --hidden, --latent-dim, --categories, --batch-size or --k",
        device,
    )


def number_of_classes(splits: data.Splits) -> int:
    """1 + the largest label of any split (labels are 0 .. C-1); 0 when the data have none."""
    labels = [s.y for s in (splits.train, splits.val, splits.test) if s.y is not None and len(s.y)]
    return 1 + max(int(y.max()) for y in labels) if labels else 0


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def identity(out: Path, splits: data.Splits) -> dict[str, str]:
    """What the run's checkpoints and weights say of themselves (``checkpoint.IDENTITY``)."""
    return {
        "run_id": rundir.run_id(out) or "",
        "fingerprint": splits.fingerprint,
        "label_fingerprint": splits.label_fingerprint,
    }


def _check_resumable(ckpt: dict, splits: data.Splits) -> None:
    if ckpt.get("rng_streams") != checkpoint.RNG_STREAMS:
        raise UserError(
            "--resume: this checkpoint was written by an earlier vaelab whose random streams differ, so the run "
            "would not continue exactly; start a new run (its model still loads for evaluate and report)"
        )
    if ckpt["fingerprint"] != splits.fingerprint:
        raise UserError(
            f"--resume: the data differ from the run's ({splits.name} now has another fingerprint); "
            "resume with the same data, or start a new run"
        )
    if ckpt.get("label_fingerprint", splits.label_fingerprint) != splits.label_fingerprint:
        raise UserError(
            f"--resume: the labels differ from the run's ({splits.name}'s images are the same, their labels are not); "
            "resume with the same labels, or start a new run"
        )
    pool = len(splits.train.x) + len(splits.val.x)
    held = ckpt.get("val_images", max(1, pool // 12))  # before --val-size: 1/12 of the training images
    if held != len(splits.val.x):
        raise UserError(
            f"--resume: the run held out {held} validation images, this config {len(splits.val.x)}; "
            f"add --val-size {held}"
        )


# The options a resume may change: how long, how often and where the run goes on, not what it
# trains. Every other option of a resumed run is the run's own.
RESUME_MAY_CHANGE = ("epochs", "time_budget", "checkpoint_every", "skip_nonfinite", "threads", "device", "data_dir")


def continued_config(run_values: dict, config: Config, given: Collection[str] | None) -> tuple[Config, dict]:
    """The config a resume continues with: the run's own, with the options in ``given`` (``None``:
    every field but the derived ``classes``) taken from ``config``. A given option that differs from
    the run's is refused unless it is one of :data:`RESUME_MAY_CHANGE`; returns the config and the
    changes applied, {name: (old, new)}."""
    old = checkpoint.config_from_dict(run_values, "the run's checkpoint")  # a field it lacks takes its default
    names = [f.name for f in fields(Config)] if given is None else list(given)
    names = [k for k in names if k not in ("classes", "download")]  # derived from the data; where to fetch it
    differs = {k: (getattr(old, k), getattr(config, k)) for k in names if getattr(old, k) != getattr(config, k)}
    refused = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in differs.items() if k not in RESUME_MAY_CHANGE]
    if refused:
        raise UserError(
            f"--resume continues the run as it was configured, and options differ from it ({'; '.join(refused)}); "
            f"drop them, or start a new run with another --out (a resume may change {', '.join(RESUME_MAY_CHANGE)})"
        )
    return old.replace(**{k: new for k, (_, new) in differs.items()}, download=config.download), differs


def config_toml(out: Path, config: Config, changes: dict, epoch: int, resolved: dict | None = None) -> str:
    """config.toml: the run's config; what ``auto`` and 0 resolved to in the process that wrote it, as a
    ``[resolved]`` table (precision, threads, and why); then its history of resumes that changed an
    option, as ``[[resumed]]`` tables (the epoch it resumed at and each change as "old -> new")."""
    history = []
    with contextlib.suppress(OSError, ValueError, TypeError, RecursionError):  # none yet, or unreadable: a new history
        history = list(tomllib.loads((out / "config.toml").read_text()).get("resumed", []))
    if changes:
        history.append({"at_epoch": epoch, **{k: f"{a!r} -> {b!r}" for k, (a, b) in changes.items()}})
    text = config.to_toml() + ("\n" + tomli_w.dumps({"resolved": resolved}) if resolved else "")
    return text + ("\n" + tomli_w.dumps({"resumed": history}) if history else "")


def check_target_rate(config: Config, splits) -> None:
    """A rate above what an image holds (C H W log L nats for L pixel levels) is no point of the plane:
    the latent would carry more than the data has."""
    levels = 2 if config.binarized or splits.binary else splits.levels
    if config.target_rate and levels:
        most = math.prod(splits.x_shape) * math.log(levels)
        if config.target_rate > most:
            raise UserError(
                f"--target-rate {config.target_rate:g} nats is more than an image of {splits.name} holds "
                f"({math.prod(splits.x_shape)} pixels of {levels} levels: {most:.1f} nats); give a smaller target"
            )


def set_threads(threads: int) -> tuple[int, str]:
    """Set the threads this process computes with; return how many, and why. ``threads=0``: one per core
    that is free now (a core busy with another process makes OpenMP's threads wait for each other: on
    2 cores with one busy, 2 threads trained the default model 3.6x slower than 1; docs/explanation/performance.md),
    or what OMP_NUM_THREADS says where it is set (torchrun sets it to 1 per process)."""
    if threads > 0:
        torch.set_num_threads(threads)
        return threads, "--threads"
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    cores = available_cores()
    busy = busy_cores()
    if busy is None:
        torch.set_num_threads(cores)
        return cores, f"{cores} cores"
    free = max(1, min(cores, round(cores - busy)))
    torch.set_num_threads(free)
    return free, f"{cores} cores, {busy:.1f} busy with other work" if busy >= 0.5 else f"{cores} cores, idle"


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def busy_cores(seconds: float = 0.1) -> float | None:
    """How many cores other processes keep busy, from /proc/stat's idle time over ``seconds`` (while this
    process sleeps); None where there is no /proc/stat."""

    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None

    def sample() -> dict[int, tuple[int, int]]:
        """Per CPU this process may run on: (all time, idle + iowait), guest time left out (counted in user)."""
        times = {}
        with open("/proc/stat") as f:
            for line in f:
                name, *values = line.split()
                if name.startswith("cpu") and name != "cpu" and (mine is None or int(name[3:]) in mine):
                    fields = [int(v) for v in values[:8]]
                    times[int(name[3:])] = (sum(fields), fields[3] + fields[4])
        return times

    try:
        before = sample()
        time.sleep(seconds)
        after = sample()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for cpu, (total, idle) in after.items():
        spent = total - before.get(cpu, (total, idle))[0]
        if spent > 0:
            busy += 1 - (idle - before[cpu][1]) / spent
    return busy if after else None
