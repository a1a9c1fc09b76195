"""The training loop: one explicit loop over ``objective(model, batch) -> ElboTerms``.

:func:`fit` knows nothing of files: it trains and hands each epoch's record to hooks
(plain callables). :func:`train_run` is what ``vaelab train`` calls: it loads the data,
builds the model, and attaches the hooks that write the run directory
(``config.toml``, ``metrics.csv``, TensorBoard events, atomic checkpoints).
"""

from __future__ import annotations

import csv
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from vaelab import checkpoint, data, distributed, models, objectives
from vaelab.config import Config, lr_at
from vaelab.data.batches import Batches, seeded, shard_rows
from vaelab.errors import UserError
from vaelab.fileio import atomic_write_text, remove_stale_temporaries

LN2 = math.log(2.0)


class NonFiniteError(UserError):
    """The loss or a gradient became NaN or infinite."""


@dataclass
class EpochRecord:
    """Batch-averaged terms of one epoch on one split, in nats per example."""

    epoch: int
    split: str  # "train", "val" or "test"
    elbo: float
    reconstruction: float
    kl: float
    kl_per_dim: list[float]  # empty when the prior does not factorise
    kl_method: str
    beta: float
    examples_per_s: float
    seconds: float
    bits_per_dim: float | None = None
    step: int = 0
    skipped: int = 0  # batches dropped by --skip-nonfinite


@dataclass
class TrainState:
    """What a resumed run needs besides the model's and optimiser's own state."""

    epoch: int = 0  # the next epoch to run
    step: int = 0
    best_elbo: float = -math.inf
    history: list[EpochRecord] = field(default_factory=list)


class TermSums:
    """Running sums of per-example terms; the batch mean happens in :meth:`record`, once."""

    def __init__(self):
        self.n, self.rec, self.kl, self.kl_dims, self.method = 0, 0.0, 0.0, None, "analytic"

    def add(self, terms: objectives.ElboTerms) -> None:
        self.n += terms.kl.shape[0]
        self.rec = self.rec + terms.reconstruction.detach().sum()
        self.kl = self.kl + terms.kl.detach().sum()
        if terms.kl_per_dim is not None:
            dims = terms.kl_per_dim.detach().sum(0)
            self.kl_dims = dims if self.kl_dims is None else self.kl_dims + dims
        self.method = terms.kl_method

    def record(self, epoch, split, beta, seconds, pixels: int | None, step: int) -> EpochRecord:
        """Batch means over every example this process, and every other rank, has seen."""
        dims_t = self.kl_dims if self.kl_dims is not None else torch.zeros(0)
        sums = torch.cat(
            [
                torch.tensor([float(self.n), float(self.rec), float(self.kl)], dtype=torch.float64),
                dims_t.detach().double().cpu(),
            ]
        )
        sums = distributed.all_reduce_sum(sums)
        examples = sums[0].item()
        n = max(examples, 1.0)
        rec, kl = sums[1].item() / n, sums[2].item() / n
        dims = [] if self.kl_dims is None else (sums[3:] / n).tolist()
        bpd = -(rec - kl) / (pixels * LN2) if pixels else None
        speed = examples / max(seconds, 1e-9)
        return EpochRecord(epoch, split, rec - kl, rec, kl, dims, self.method, beta, speed, seconds, bpd, step)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate_terms(
    model, x: Tensor, batch_size: int, epoch: int = 0, split: str = "val", pixels: int | None = None, seed: int = 0
) -> EpochRecord:
    """The ELBO's terms averaged over ``x`` (already binarised where the likelihood needs it)."""
    was_training = model.training
    model.eval()
    sums = TermSums()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the z ~ q draws: the same every epoch, so epochs compare
        for xb in Batches(x, batch_size, seed, drop_last=False).epoch(0, shuffle=False):
            sums.add(objectives.elbo(model, xb))
    model.train(was_training)
    return sums.record(epoch, split, 1.0, time.perf_counter() - start, pixels, 0)


def fit(
    model,
    train_x: Tensor,
    val_x: Tensor | None = None,
    config: Config | None = None,
    *,
    hooks: Sequence[Callable[[EpochRecord, object, TrainState], None]] = (),
    state: TrainState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    pixels: int | None = None,
    progress: bool | None = None,
    **options,
) -> TrainState:
    """Train ``model`` on ``train_x`` (N, C, H, W) in [0, 1]; return the state with the history.

    ``config`` (or keyword ``options`` such as ``epochs=5, lr=1e-3, beta=4``) sets every knob.
    ``hooks`` are called after each epoch's validation as ``hook(record, model, state)``.
    """
    config = (config or Config()).replace(**options)
    state = state or TrainState()
    optimizer = optimizer or make_optimizer(model, config)
    ctx = distributed.current()
    check_batch_size(config.batch_size, len(train_x), ctx.world)
    rows = shard_rows(config.batch_size, ctx.rank, ctx.world)
    batches = Batches(train_x, config.batch_size, config.seed, dynamic=config.binarize == "dynamic")
    objective = Objective(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    if ctx.active:  # gradients averaged across ranks during backward
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, process_group=distributed.gradient_group())
    show = (sys.stderr.isatty() if progress is None else progress) and ctx.is_main
    for epoch in range(state.epoch, config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, epoch)
        model.train()
        sums = TermSums()
        start = time.perf_counter()
        beta = config.beta
        skipped = 0
        iterator = batches.epoch(epoch, shard=(ctx.rank, ctx.world))
        if show:
            from tqdm import tqdm

            iterator = tqdm(
                iterator,
                total=len(batches),
                desc=f"epoch {epoch + 1}/{config.epochs}",
                unit="ex",
                unit_scale=config.batch_size,
                leave=False,
            )
        for x in iterator:
            beta = objectives.beta_at(state.step, config.warmup, config.beta, config.warmup_steps)
            # the step's noise is a function of (seed, step), drawn for the global batch
            noise = objectives.Noise(
                seeded(config.seed, "noise", state.step, device=x.device), config.batch_size, rows.start
            )
            loss, terms = objective(x, noise, beta)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # on every rank, whatever the loss: DDP's all-reduce needs all of them
            grad_norm = gradient_norm(params, config.grad_clip)
            ok = torch.isfinite(loss) & torch.isfinite(grad_norm)  # the step's one host sync is below
            if ctx.active:  # every rank skips or stops together
                ok = distributed.all_reduce_sum((~ok).double()) == 0
            problem = None if bool(ok) else _nonfinite(loss, None if config.objective == "iwae" else terms, grad_norm)
            if problem is not None:
                if skipped >= config.skip_nonfinite:
                    raise NonFiniteError(_nonfinite_message(problem, epoch, state.step))
                skipped += 1  # --skip-nonfinite: drop this batch, count it, go on
                state.step += 1
                continue
            optimizer.step()
            sums.add(terms)
            state.step += 1
            if show:
                iterator.set_postfix(
                    rec=f"{float(terms.reconstruction.mean()):.1f}",
                    kl=f"{float(terms.kl.mean()):.2f}",
                    beta=f"{beta:.2f}",
                )
        seconds = time.perf_counter() - start
        train_record = sums.record(epoch, "train", beta, seconds, pixels, state.step)
        train_record.skipped = skipped
        state.history.append(train_record)
        records = [train_record]
        if val_x is not None:
            val_record = evaluate_terms(model, val_x, 1024, epoch, "val", pixels, config.seed)
            val_record.beta, val_record.step = beta, state.step
            state.history.append(val_record)
            records.append(val_record)
        state.epoch = epoch + 1
        for record in records:
            for hook in hooks:
                hook(record, model, state)
    return state


class Objective(torch.nn.Module):
    """The loss of a batch and its ELBO terms, as a module: what DistributedDataParallel wraps."""

    def __init__(self, model, config: Config):
        super().__init__()
        self.model, self.config = model, config

    def forward(self, x: Tensor, noise: objectives.Noise, beta: float) -> tuple[Tensor, objectives.ElboTerms]:
        c = self.config
        if c.objective == "iwae":
            loss = objectives.iwae_loss(self.model, x, c.k, noise)
            with torch.no_grad():  # the ELBO's terms, for the logs
                return loss, objectives.elbo(self.model, x, noise)
        terms = objectives.elbo(self.model, x, noise)
        return objectives.loss(terms, beta, c.free_bits), terms


def check_batch_size(batch_size: int, examples: int, world: int) -> None:
    if batch_size > examples:
        raise UserError(
            f"--batch-size {batch_size} is larger than the training set ({examples} examples); use at most {examples}"
        )
    if batch_size % world:
        raise UserError(
            f"--batch-size {batch_size} does not split evenly across {world} processes; use a multiple of {world}"
        )


def make_optimizer(model, config: Config) -> torch.optim.Optimizer:
    # fused Adam on CPU and CUDA: one kernel for the whole update
    return torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps, fused=True)


def _nonfinite_message(what: str, epoch: int, step: int) -> str:
    return (
        f"{what} became NaN or infinite at epoch {epoch + 1}, step {step}; training stopped and the last good "
        "checkpoint is kept. Try a lower --lr, --grad-clip 100, or --skip-nonfinite N"
    )


def gradient_norm(params: list[Tensor], clip: float) -> Tensor:
    """The global L2 norm of the gradients (one fused reduction), clipping them to ``clip`` when > 0.

    Checked every step: a NaN or infinite gradient can come from a finite loss (a sqrt at 0,
    a division by a vanishing scale), and ``optimizer.step()`` would write it into the weights.
    """
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


def _nonfinite(loss: Tensor, terms: objectives.ElboTerms | None, grad_norm: Tensor) -> str:
    """Which part of the step is NaN or infinite (``terms`` None for the IWAE loss)."""
    if bool(torch.isfinite(loss)):
        if bool(torch.isfinite(grad_norm)):
            return "a loss or gradient on another rank"
        return "the gradient (finite loss)"
    if terms is None:
        return "the IWAE loss"
    bad = [
        name
        for name, t in (("reconstruction", terms.reconstruction), ("KL", terms.kl))
        if not bool(torch.isfinite(t).all())
    ]
    return f"the {' and '.join(bad) or 'loss'} term"


# -- the run directory ------------------------------------------------------------------------
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
]


def prepare_data(config: Config, device) -> tuple[data.Splits, Tensor, Tensor, Tensor, int | None]:
    """Load, check the likelihood fits the data, binarise; return the splits and the train/val/test tensors."""
    splits = data.load(config)
    binarized = config.binarize != "none"
    if config.likelihood == "bernoulli" and not binarized and not splits.binary:
        raise UserError(
            f"{splits.name} has grey-level pixels, and a Bernoulli likelihood is only a likelihood for binary data; "
            "use --binarize dynamic (or static), or --likelihood continuous-bernoulli"
        )
    if config.likelihood == "logistic" and splits.levels != 256:
        raise UserError(
            f"the discretised logistic likelihood models 256 grey levels; {splits.name} has "
            f"{splits.levels or 'continuous'} levels. Use --likelihood continuous-bernoulli or gaussian"
        )
    train_x, val_x, test_x = (s.x.to(device) for s in (splits.train, splits.val, splits.test))
    if binarized:
        # validation and test are binarised once (fixed), so their numbers compare across epochs
        val_x, test_x = (
            data.binarize_static(val_x.cpu(), config.seed, "val").to(device),
            data.binarize_static(test_x.cpu(), config.seed, "test").to(device),
        )
        if config.binarize == "static":
            train_x = data.binarize_static(train_x.cpu(), config.seed, "train").to(device)
    # bits/dim where p(x|z) is a probability mass function (binary or 256-level pixels)
    pixels = splits.train.x[0].numel() if config.likelihood in ("bernoulli", "logistic") else None
    return splits, train_x, val_x, test_x, pixels


def default_out(name: str) -> Path:
    """runs/NAME, or runs/NAME-2, -3, ... : a default run never lands on an existing one."""
    base = Path("runs") / Path(name).stem
    candidate, i = base, 1
    while candidate.exists():
        i += 1
        candidate = base.with_name(f"{base.name}-{i}")
    return candidate


def prepare_out(out: Path, resume: bool, overwrite: bool, remove_temporaries: bool = True) -> None:
    if resume:
        if not (out / "checkpoints" / "last.pt").exists():
            raise UserError(f"--resume: {out} has no checkpoints/last.pt to resume from")
        if remove_temporaries:  # rank 0 only: the files of a write that a kill interrupted
            remove_stale_temporaries(out / "checkpoints")
            remove_stale_temporaries(out)
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"{out} already exists and is not empty; choose another --out, add --resume, or --overwrite"
            )
        if not (out / "config.toml").exists():
            raise UserError(f"{out} is not a vaelab run directory (no config.toml); refusing to delete it")
        shutil.rmtree(out)
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run directory {out}: {err.strerror}; choose another --out") from None


class RunWriter:
    """Hook that writes metrics.csv, TensorBoard events and checkpoints (rank 0 only)."""

    def __init__(
        self, out: Path, config: Config, optimizer, x_shape, fingerprint: str, latent_dim: int, resume_epoch: int = 0
    ):
        self.out, self.config, self.optimizer = out, config, optimizer
        self.x_shape, self.fingerprint = x_shape, fingerprint
        self.columns = CSV_BASE + [f"kl_dim_{j}" for j in range(latent_dim)]
        self.csv_path = out / "metrics.csv"
        kept = []
        if resume_epoch and self.csv_path.exists():  # drop rows of epochs that will be run again
            with open(self.csv_path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["epoch"]) < resume_epoch]
        with open(self.csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(kept)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # pragma: no cover - tensorboard is a dependency; keep training without it
            pass

    def __call__(self, record: EpochRecord, model, state: TrainState) -> None:
        row = {k: getattr(record, k) for k in CSV_BASE}
        row.update({f"kl_dim_{j}": v for j, v in enumerate(record.kl_per_dim)})
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow(row)
        if self.tb is not None:
            for name in ("elbo", "reconstruction", "kl", "beta"):
                self.tb.add_scalar(f"{record.split}/{name}", getattr(record, name), record.step)
            self.tb.flush()
        if record.split != "val":
            return

        def save(name: str) -> None:
            checkpoint.save_checkpoint(
                self.out / "checkpoints" / name,
                model,
                self.optimizer,
                epoch=state.epoch,
                step=state.step,
                best_elbo=state.best_elbo,
                config=self.config,
                x_shape=self.x_shape,
                fingerprint=self.fingerprint,
            )

        if record.elbo > state.best_elbo:
            state.best_elbo = record.elbo
            save("best.pt")
            checkpoint.save_weights(self.out / "model.safetensors", model, self.config, self.x_shape)
        save("last.pt")

    def close(self):
        if self.tb is not None:
            self.tb.close()


def summary_line(r: EpochRecord) -> str:
    bpd = f"  {r.bits_per_dim:.3f} bits/dim" if r.bits_per_dim is not None else ""
    kl = "KL" if r.kl_method == "analytic" else "KL (Monte Carlo)"
    return f"{r.split:>5}  ELBO {r.elbo:9.3f}  reconstruction {r.reconstruction:9.3f}  {kl} {r.kl:7.3f} nats{bpd}"


ARCHITECTURE_FIELDS = ("model", "hidden", "activation", "latent_dim", "likelihood", "prior", "prior_components")


def train_run(
    config: Config,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    auto_resume: bool = False,
) -> tuple[Path, EpochRecord]:
    """``vaelab train``: data, model, loop, run directory; returns the run directory and the test record.

    ``auto_resume``: continue from ``out/checkpoints/last.pt`` when it exists, else start the
    run in ``out`` (replacing a run directory that has no checkpoint yet). That is what a command
    restarted by ``torchrun --max-restarts`` or a cluster scheduler needs: the same command
    line, run again, continues where the last checkpoint left off.

    Under torchrun every rank runs this; rank 0 alone prepares the run directory, logs and
    writes, the others wait for it at barriers.
    """
    set_threads(config.threads)
    device = resolve_device(config.device)
    if auto_resume and out is None:
        raise UserError("--auto-resume needs --out: the run directory to continue in")
    with distributed.session(device.type) as ctx:
        if auto_resume:  # decided by every rank before rank 0 writes anything (the barrier below)
            resume = (Path(out) / "checkpoints" / "last.pt").exists()
            overwrite = overwrite or (not resume and (Path(out) / "config.toml").exists())
        return _train(config, device, ctx, out, resume, overwrite, log)


def _train(config, device, ctx, out, resume, overwrite, log) -> tuple[Path, EpochRecord]:
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not ctx.is_main:
        log = _silent
    torch.manual_seed(config.seed)
    splits, train_x, val_x, test_x, pixels = prepare_data(config, device)
    check_batch_size(config.batch_size, len(train_x), ctx.world)  # before anything is written
    out = Path(out) if out else default_out(splits.name)
    distributed.barrier()  # every rank has chosen ``out`` and read the directory before rank 0 changes it
    state, resume_ckpt = TrainState(), None
    if resume:
        prepare_out(out, resume, overwrite, remove_temporaries=ctx.is_main)
        resume_ckpt = checkpoint.load_checkpoint(out / "checkpoints" / "last.pt")
        _check_resumable(resume_ckpt, config, splits)
    model = models.build(config, splits.x_shape).to(device)
    optimizer = make_optimizer(model, config)
    if resume_ckpt is not None:
        checkpoint.load_state(model, resume_ckpt["model"], out / "checkpoints" / "last.pt")
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        checkpoint.set_rng_state(resume_ckpt["rng"])
        state = TrainState(resume_ckpt["epoch"], resume_ckpt["step"], resume_ckpt["best_elbo"])
        log(f"resuming {out} at epoch {state.epoch + 1}")
    elif ctx.is_main:
        prepare_out(out, resume, overwrite)
    hooks: list = []
    if ctx.is_main:
        atomic_write_text(out / "config.toml", config.to_toml())
        writer = RunWriter(out, config, optimizer, splits.x_shape, splits.fingerprint, config.latent_dim, state.epoch)
        hooks.append(writer)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{splits.name}: {len(train_x)} train / {len(val_x)} val / {len(test_x)} test images of shape "
        f"{splits.x_shape}; {models.architecture_for(config.model, splits.x_shape)} VAE, {n_params:,} parameters, "
        f"{config.likelihood} likelihood, {config.prior} prior, on {device}"
    )

    def print_epoch(record: EpochRecord, model, state) -> None:
        if record.split == "val":
            log(
                f"epoch {record.epoch + 1:3d}/{config.epochs}  "
                + summary_line(record).strip()
                + f"  beta {record.beta:.2f}"
            )

    try:
        fit(model, train_x, val_x, config, hooks=[*hooks, print_epoch], state=state, optimizer=optimizer, pixels=pixels)
    finally:
        for hook in hooks:
            hook.close()
    distributed.barrier()  # rank 0's last checkpoint is on disk
    best = (
        checkpoint.load_checkpoint(out / "checkpoints" / "best.pt")
        if (out / "checkpoints" / "best.pt").exists()
        else None
    )
    if best is not None:
        model.load_state_dict(best["model"])
    return out, evaluate_terms(model, test_x, 1024, state.epoch, "test", pixels, config.seed)


def _silent(message: str) -> None:
    """The log of ranks other than 0."""


def _check_resumable(ckpt: dict, config: Config, splits: data.Splits) -> None:
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
    old = ckpt["config"]
    new = config.to_dict()
    differs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in ARCHITECTURE_FIELDS + ("seed", "binarize")
        if old.get(k) != new.get(k)
    ]
    if differs:
        raise UserError(f"--resume with a different config ({'; '.join(differs)}); use the run's config.toml")


def set_threads(threads: int) -> None:
    """``threads=0`` keeps PyTorch's default (one thread per core)."""
    if threads > 0:
        torch.set_num_threads(threads)
