"""The training loop: one explicit loop over ``objective(model, batch) -> (loss, ElboTerms)``.

:func:`fit` knows nothing of files: it trains and hands each epoch's records to hooks (plain
callables). One optimiser step is :class:`OptimiserStep`; the epoch's batch means are
:class:`TermSums`. The run directory, resume and ``vaelab train`` live in ``runs.py``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from vaelab import contract, distributed, objectives, parts
from vaelab.config import Config, lr_at
from vaelab.data.batches import Batches, seeded, shard_rows
from vaelab.errors import UserError
from vaelab.models.categorical import categorical_posterior_of, temperature_at


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
    kl_per_dim: list[float]  # empty when the prior does not factorise; every layer's, top first
    kl_method: str
    beta: float
    examples_per_s: float
    seconds: float
    bits_per_dim: float | None = None
    step: int = 0
    skipped: int = 0  # batches dropped by --skip-nonfinite
    elapsed: float = 0.0  # wall seconds since the run began (training, validation, checkpoints), at this record
    # the KL's parts by --objective tc's minibatch estimator (training records only)
    mutual_information: float | None = None
    total_correlation: float | None = None
    dimension_wise_kl: float | None = None
    kl_per_layer: dict[str, float] = field(default_factory=dict)  # each latent layer's KL (several layers)
    temperature: float | None = None  # --posterior categorical: the relaxation's temperature at the epoch's last step


@dataclass
class TrainState:
    """What a resumed run needs besides the model's and optimiser's own state."""

    epoch: int = 0  # the next epoch to run
    step: int = 0
    best_elbo: float = -math.inf
    history: list[EpochRecord] = field(default_factory=list)
    elapsed: float = 0.0  # wall seconds of the run so far: training, validation, checkpoints (the budget counts these)
    skipped: int = 0  # batches dropped by --skip-nonfinite in this process, against its budget
    rate: RateTarget | None = None  # --target-rate: the KL's adjusted weight


@dataclass
class RateTarget:
    """The KL's weight as a Lagrange multiplier that holds the rate R = E KL(q(z|x) || p(z)) at a target:
    minimising D + beta (R - target) over the model while beta climbs when R is above the target and
    falls when below, as GECO (Rezende & Viola 2018) holds a distortion target. Per step, with the
    batch's mean KL (over every process): c = (R - target) / target, its moving average
    m <- 0.9 m + 0.1 c, and log beta <- log beta + RATE * m, beta kept in [1e-3, 1e3]."""

    target: float
    beta: float
    average: float = 0.0  # the moving average of the relative constraint

    RATE: ClassVar[float] = 0.02
    LOG_RANGE: ClassVar[float] = math.log(1e6)  # the width of beta's range [1e-3, 1e3]

    def update(self, rate: float) -> None:
        self.average = 0.9 * self.average + 0.1 * (rate - self.target) / self.target
        # the step in log beta is clipped to the range's width: a tiny target makes c huge (1e-10 nats: 1e11)
        step = max(-self.LOG_RANGE, min(self.LOG_RANGE, self.RATE * self.average))
        self.beta = min(1e3, max(1e-3, self.beta * math.exp(step)))


class signals_held:  # noqa: N801 (used as a context manager, like contextlib's)
    """Hold SIGINT and SIGTERM back for the ``with`` block: one that arrives is noted, and acted on (by the
    handler that was in place: Ctrl-C's KeyboardInterrupt, ``vaelab``'s SIGTERM) at :meth:`check` or at
    the block's end, never on a line in between. A stop raised on any line may land inside a library that
    holds a lock: raised inside TensorBoard's writer, it left its queue's lock held, and the run's last
    flush waited for ever. Handlers, not thread signal masks: PyTorch's threads would take a process
    signal that the main thread masks. Outside the main thread (whose handlers these are) nothing is held."""

    def __enter__(self) -> signals_held:
        self.caught: list[int] = []
        self.previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            try:
                for s in (signal.SIGINT, signal.SIGTERM):
                    self.previous[s] = signal.signal(s, self._note)
            except BaseException:  # a stop between the two: the handler set is put back before it goes on
                self._restore()
                raise
        return self

    def _note(self, signum, frame) -> None:
        self.caught.append(signum)

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            if handler is not None:  # (None: a handler set outside Python, which cannot be put back)
                signal.signal(s, handler)

    def check(self) -> None:
        """Act on the first stop noted so far, here (its handler raises KeyboardInterrupt, or ``vaelab``'s
        Terminated); what follows in the block then does not run."""
        if self.caught:
            signum = self.caught[0]
            self.caught.clear()
            handler = self.previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:  # the process ends as the signal ends it
                self._restore()
                signal.raise_signal(signum)

    def __exit__(self, *exc) -> None:
        self._restore()
        if self.caught:
            self.check()


# called once after each epoch (its training record, then its validation record where there is one), with
# named arguments: hook(records=[...], model=model, state=state); `state` is what a checkpoint keeps
Hook = Callable[..., None]


def fit(
    model,
    train: Tensor | contract.Examples,
    val: Tensor | contract.Examples | None = None,
    config: Config | None = None,
    *,
    hooks: Sequence[Hook] = (),
    state: TrainState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    pixels: int | None = None,
    progress: bool | None = None,
    **options,
) -> TrainState:
    """Train ``model`` on the images ``train`` (N, C, H, W) in [0, 1], or on :class:`contract.Examples`
    (the images with the labels a conditional model is given); validate on ``val`` each epoch; return
    the state with the history.

    ``config`` (or keyword ``options`` such as ``epochs=5, lr=1e-3, beta=4``) sets every knob.
    ``hooks`` are called once after each epoch's validation as ``hook(records=..., model=..., state=...)``,
    with the epoch's records (training, then validation);
    ``pixels`` per image turns on bits/dim (a discrete likelihood).
    A Ctrl-C or SIGTERM is acted on between two steps, or when the epoch's hooks are done, never inside
    them: its KeyboardInterrupt (or the handler in place) is raised there.
    """
    config = (config or Config()).replace(**options)
    state = state or TrainState()
    optimizer = optimizer or make_optimizer(model, config)
    ctx = distributed.current()
    check_batch_size(config.batch_size, len(train), ctx.world)
    batches = Batches(train, config.batch_size, config.seed, dynamic=config.binarized_per_batch)
    step = OptimiserStep(model, optimizer, config, dataset_size=len(train))
    show = (sys.stderr.isatty() if progress is None else progress) and ctx.is_main
    bar = ProgressBar(len(batches), config) if show else None  # (rank 0's, on a terminal)
    clock = Clock(config, state, total_steps=config.epochs * len(batches))
    with signals_held() as stop:  # a Ctrl-C or SIGTERM stops the run between two steps, or after the hooks
        for epoch in range(state.epoch, config.epochs):
            # the seconds the last checkpoint holds, not the live clock: a resume of a spent budget stops here,
            # and a budget that ran out during validation or a checkpoint still ends on a step, checkpointed
            if clock.out_of_time(state.elapsed):
                break
            _set_lr(optimizer, lr_at(config, epoch))
            model.train()
            sums, skipped, beta, start = TermSums(), 0, config.beta, time.perf_counter()
            for x, y in batches.epoch(epoch, shard=(ctx.rank, ctx.world)):
                if config.lr_per_step:  # the share of the run done so far
                    _set_lr(optimizer, lr_at(config, epoch, clock.progress(clock.elapsed())))
                beta = _kl_weight(config, state)
                terms, problem = step(x, y, beta, state.step)
                skipped += _tally(terms, problem, sums, state, config, epoch)
                state.step += 1
                if bar is not None:
                    bar.update(epoch, terms, beta)
                stop.check()
                if clock.out_of_time(clock.elapsed()):  # the run ends after the step that reaches the budget
                    break
            _check_learnt(epoch, skipped, sums.n)
            record = sums.record(
                epoch, "train", beta, time.perf_counter() - start, pixels, state.step, skipped, clock.elapsed()
            )
            if step.relaxed is not None:  # the train terms are the relaxed model's, at this temperature
                record.temperature = temperature_at(config, state.step - 1)
            records = [record, *_validation(model, val, epoch, pixels, config, beta, state.step, clock)]
            if not math.isfinite(records[-1].elbo):  # without validation images, the training terms say it
                raise NonFiniteError(f"the ELBO of epoch {epoch + 1} is NaN or infinite: the run has diverged")
            state.elapsed = records[-1].elapsed  # what a checkpoint written by the hooks below keeps
            state.history += records
            state.epoch = epoch + 1
            for hook in hooks:
                hook(records=records, model=model, state=state)
            stop.check()
    state.elapsed = clock.elapsed()
    if bar is not None:
        bar.close()
    return state


def _tally(
    terms: contract.ElboTerms, problem: str | None, sums: TermSums, state: TrainState, config: Config, epoch: int
) -> int:
    """A step's terms into the epoch's sums (and the rate target's multiplier); a NaN or infinite step is
    skipped (returns 1) while --skip-nonfinite allows, and stops the run after."""
    if problem is None:
        sums.add(terms)
        if state.rate is not None:
            state.rate.update(_batch_rate(terms))
        return 0
    if state.skipped < config.skip_nonfinite:  # --skip-nonfinite: drop this batch, count it, go on
        state.skipped += 1  # the budget is the run's (this process's part of it), not an epoch's
        return 1
    raise NonFiniteError(_nonfinite_message(problem, epoch, state.step))


def _check_learnt(epoch: int, skipped: int, batches: int) -> None:
    """An epoch whose every batch was skipped (NaN or infinite) learnt nothing: the run has diverged."""
    if skipped and not batches:
        raise NonFiniteError(
            f"every batch of epoch {epoch + 1} was NaN or infinite and skipped ({skipped}); the run has diverged "
            "and checkpoints of earlier epochs are kept. Try a lower --lr or --grad-clip 100"
        )


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _batch_rate(terms: contract.ElboTerms) -> float:
    """The mean KL of the whole batch, every process's share of it (one small all-reduce under torchrun)."""
    kl = terms.kl.detach()
    total, n = distributed.all_reduce_sum(torch.stack([kl.sum(), kl.new_tensor(len(kl))])).tolist()
    return total / n


def _kl_weight(config: Config, state: TrainState) -> float:
    """The KL's weight at this step: the rate target's multiplier (``--target-rate``), or beta by its
    warm-up schedule."""
    if config.target_rate:
        state.rate = state.rate or RateTarget(config.target_rate, config.beta)
        return state.rate.beta
    return objectives.beta_at(state.step, config.warmup, config.beta, config.warmup_steps)


def _validation(model, val, epoch: int, pixels, config: Config, beta: float, step: int, clock) -> list:
    """The epoch's validation record (none without validation images); weights that give a NaN or an
    infinite ELBO on held-out images end the run before any hook checkpoints them."""
    if val is None:
        return []
    record = evaluate_terms(model, val, 1024, epoch, "val", pixels, config.seed, beta, step, clock.elapsed())
    if not math.isfinite(record.elbo):
        raise NonFiniteError(
            f"the validation ELBO of epoch {epoch + 1} is NaN or infinite: the run has diverged; checkpoints "
            "of earlier epochs are kept. Try a lower --lr or --grad-clip 100"
        )
    return [record]


class Clock:
    """The run's progress, in steps or, with ``config.time_budget``, in wall seconds: of training,
    validation and checkpoints alike, from the run's start (and the seconds a resumed run had
    already spent), as Lightning's ``max_time`` counts them.

    Under torchrun every rank stops together: the ranks' clocks differ, so a rank that is out of
    time says so to the others (one small all-reduce per step, only when there is a budget).
    """

    def __init__(self, config: Config, state: TrainState, total_steps: int):
        self.budget, self.state, self.total_steps = config.time_budget, state, max(total_steps, 1)
        self.ctx = distributed.current()
        self.start, self.before = time.perf_counter(), state.elapsed  # a resumed run brings its seconds

    def elapsed(self) -> float:
        """Wall seconds of the run so far, this process's part since ``fit`` began included."""
        return self.before + time.perf_counter() - self.start

    def progress(self, elapsed: float) -> float:
        """The share of the run done: of the time budget, or of the steps of every epoch."""
        return elapsed / self.budget if self.budget else self.state.step / self.total_steps

    def out_of_time(self, elapsed: float) -> bool:
        """True once ``elapsed`` seconds reach the budget (never without one)."""
        if not self.budget:
            return False
        out = elapsed >= self.budget
        if self.ctx.active:
            out = bool(distributed.all_reduce_sum(torch.tensor([float(out)])).item())
        return out


class OptimiserStep:
    """One optimiser step on a batch: loss and terms, backward, the gradient check, the update.

    Returns ``(terms, problem)``: ``problem`` names what became NaN or infinite, and then no
    update was made. Under torchrun the gradients are averaged across ranks during backward
    (DistributedDataParallel), and every rank skips or stops together.
    """

    def __init__(self, model, optimizer: torch.optim.Optimizer, config: Config, dataset_size: int):
        self.optimizer, self.config, self.ctx = optimizer, config, distributed.current()
        self.objective = Loss(model, config, dataset_size)
        if self.ctx.active:
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(self.objective, process_group=distributed.gradient_group())
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.autocast = autocast(config.precision, next(model.parameters()).device)
        self.rows = shard_rows(config.batch_size, self.ctx.rank, self.ctx.world)  # this rank's rows of a batch
        self.relaxed = categorical_posterior_of(model)  # whose relaxation's temperature each step sets

    def __call__(self, x: Tensor, y: Tensor | None, beta: float, step: int) -> tuple[contract.ElboTerms, str | None]:
        c = self.config
        # the step's noise is a function of (seed, step), drawn for the global batch
        noise = contract.Noise(seeded(c.seed, "noise", step, device=x.device), c.batch_size, self.rows.start)
        if self.relaxed is not None:  # the relaxation's temperature, a function of the step
            self.relaxed.temperature.fill_(temperature_at(c, step))
        with self.autocast:
            loss, terms = self.objective(x, y, noise, beta)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # on every rank, whatever the loss: DDP's all-reduce needs all of them
        grad_norm = gradient_norm(self.params, c.grad_clip)
        ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.ctx.active:
            ok = distributed.all_reduce_sum((~ok).double()) == 0
        if not bool(ok):  # the step's one host sync
            return terms, _nonfinite(loss, terms, grad_norm, c.objective)
        self.optimizer.step()
        return terms, None


class Loss(torch.nn.Module):
    """The loss of a batch and its ELBO terms, as a module: what DistributedDataParallel wraps.
    The loss is the objective registered as ``config.objective`` in ``parts.OBJECTIVES``, or the model's
    own ``training_loss`` where it has one (M2, whose batches mix labelled and unlabelled images)."""

    def __init__(self, model, config: Config, dataset_size: int):
        super().__init__()
        self.model, self.config, self.dataset_size = model, config, dataset_size
        self.objective = parts.OBJECTIVES[config.objective].constructor()
        self.own_loss = hasattr(model, "training_loss")  # a model with a loss of its own (M2: labels partly missing)

    def forward(
        self, x: Tensor, y: Tensor | None, noise: contract.Noise, beta: float
    ) -> tuple[Tensor, contract.ElboTerms]:
        """The loss of the images ``x`` with their labels ``y`` (None: a model that takes none)."""
        if self.own_loss:
            return self.model.training_loss(x, noise, beta, self.config, self.dataset_size, y)
        model = contract.given(self.model, y)  # the one place the loop binds a batch's labels
        return self.objective(model, x, noise, beta, self.config, self.dataset_size)


class TermSums:
    """Running sums of per-example terms; the batch mean happens in :meth:`record`, once."""

    def __init__(self):
        self.n, self.rec, self.kl, self.kl_dims, self.method = 0, 0.0, 0.0, None, "analytic"
        self.kl_parts: dict[str, Tensor] = {}
        self.kl_layers: dict[str, Tensor] = {}

    def add(self, terms: contract.ElboTerms) -> None:
        self.n += terms.kl.shape[0]
        self.rec = self.rec + terms.reconstruction.detach().sum()
        self.kl = self.kl + terms.kl.detach().sum()
        if terms.kl_per_dim is not None:
            dims = terms.kl_per_dim.detach().sum(0)
            self.kl_dims = dims if self.kl_dims is None else self.kl_dims + dims
        self.method = terms.kl_method
        for name, t in terms.kl_parts.items():
            self.kl_parts[name] = self.kl_parts.get(name, 0.0) + t.detach().sum()
        if len(terms.kl_per_layer) > 1:  # one layer's part is the KL itself
            for name, t in terms.kl_per_layer.items():
                self.kl_layers[name] = self.kl_layers.get(name, 0.0) + t.detach().sum()

    def record(
        self,
        epoch: int,
        split: str,
        beta: float,
        seconds: float,
        pixels: int | None,
        step: int,
        skipped: int = 0,
        elapsed: float = 0.0,
    ) -> EpochRecord:
        """Batch means over every example this process, and every other rank, has seen."""
        dims_t = self.kl_dims if self.kl_dims is not None else torch.zeros(0)
        names, layers = sorted(self.kl_parts), list(self.kl_layers)
        sums = torch.cat(
            [
                torch.tensor([float(self.n), float(self.rec), float(self.kl)], dtype=torch.float64),
                torch.tensor([float(self.kl_parts[k]) for k in names], dtype=torch.float64),
                torch.tensor([float(self.kl_layers[k]) for k in layers], dtype=torch.float64),
                dims_t.detach().double().cpu(),
            ]
        )
        sums = distributed.all_reduce_sum(sums)
        examples = sums[0].item()
        n = max(examples, 1.0)
        rec, kl = sums[1].item() / n, sums[2].item() / n
        kl_parts = {k: sums[3 + i].item() / n for i, k in enumerate(names)}
        kl_layers = {k: sums[3 + len(names) + i].item() / n for i, k in enumerate(layers)}
        dims = sums[3 + len(names) + len(layers) :]
        return EpochRecord(
            epoch=epoch,
            split=split,
            elbo=rec - kl,
            reconstruction=rec,
            kl=kl,
            kl_per_dim=[] if self.kl_dims is None else (dims / n).tolist(),
            kl_method=self.method,
            beta=beta,
            examples_per_s=examples / max(seconds, 1e-9),
            seconds=seconds,
            bits_per_dim=objectives.bits_per_dim(rec - kl, pixels) if pixels else None,
            step=step,
            skipped=skipped,
            elapsed=elapsed,
            kl_per_layer=kl_layers,
            **kl_parts,
        )


@torch.no_grad()
def evaluate_terms(
    model,
    data: Tensor | contract.Examples,
    batch_size: int,
    epoch: int = 0,
    split: str = "val",
    pixels: int | None = None,
    seed: int = 0,
    beta: float = 1.0,
    step: int = 0,
    elapsed: float = 0.0,
) -> EpochRecord:
    """The ELBO's terms averaged over ``data`` (images already binarised where the likelihood needs it, or
    :class:`contract.Examples` with a conditional model's labels); the z ~ q draws are seeded by ``seed``,
    the same every epoch, so epochs compare."""
    sums = TermSums()
    start = time.perf_counter()
    for terms in objectives.elbo_batches(model, data, batch_size, seed):
        sums.add(terms)
    return sums.record(epoch, split, beta, time.perf_counter() - start, pixels, step, elapsed=elapsed)


class ProgressBar:
    """tqdm over an epoch's batches, with the step's terms (a host sync per step: a terminal only)."""

    def __init__(self, batches: int, config: Config):
        self.batches, self.config, self.bar, self.epoch = batches, config, None, None

    def update(self, epoch: int, terms: contract.ElboTerms, beta: float) -> None:
        if epoch != self.epoch:
            from tqdm import tqdm

            self.close()
            self.epoch = epoch
            self.bar = tqdm(
                total=self.batches * self.config.batch_size,
                desc=f"epoch {epoch + 1}/{self.config.epochs}",
                unit="ex",
                leave=False,
            )
        self.bar.update(self.config.batch_size)
        self.bar.set_postfix(
            rec=f"{float(terms.reconstruction.mean()):.1f}", kl=f"{float(terms.kl.mean()):.2f}", beta=f"{beta:.2f}"
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# oneDNN's instruction sets without bf16 arithmetic: ONEDNN_MAX_CPU_ISA at one of them holds PyTorch's bf16
# matrix products to a reference path (measured: 2 GFLOP/s against 190 on a Zen 4 with avx512_bf16)
ONEDNN_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU, or a CPU whose flags list
    avx512_bf16 or amx_bf16 (/proc/cpuinfo, else PyTorch's own CPU check) and whose bf16 products
    PyTorch may run on them (:func:`cpu_bf16`). Never a guess."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_bf16()[0]


def cpu_bf16() -> tuple[bool, str]:
    """Whether this CPU's bf16 instructions serve PyTorch's bf16 matrix products, and why: the CPU must
    list them, and oneDNN (PyTorch's path for them) be enabled and not held below them by
    ``ONEDNN_MAX_CPU_ISA`` (or its former name ``DNNL_MAX_CPU_ISA``)."""
    info = cpu_info()
    if info is None:
        check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        flags = ["PyTorch's check"] if check is not None and check() else []
    else:
        flags = [f for f in ("avx512_bf16", "amx_bf16") if f in info["flags"]]
    if not flags:
        return False, "no native bf16 on this CPU"
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        isa = os.environ.get(name, "").upper()
        if isa in ONEDNN_WITHOUT_BF16:
            return False, f"this CPU has {' and '.join(flags)}, but {name}={isa} keeps oneDNN's bf16 products off it"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False, f"this CPU has {' and '.join(flags)}, but PyTorch's oneDNN backend is off"
    return True, "native bf16 on this CPU: " + " and ".join(flags)


def cpu_info() -> dict | None:
    """The first CPU's ``model name`` and ``flags`` from /proc/cpuinfo; None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line.split(":", 1) for line in f if line.startswith(("model name", "flags"))]
    except OSError:
        return None
    fields = {key.strip(): value.strip() for key, value in reversed(lines)}  # reversed: the first CPU's wins
    return {"model name": fields.get("model name", "?"), "flags": fields.get("flags", "").split()}


def resolved_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """What ``--precision`` comes to on ``device``, and why: ("bf16", "native bf16 on this CPU: avx512_bf16")."""
    if precision != "auto":
        return precision, f"--precision {precision}"
    if device.type == "cuda":
        return ("bf16", "native bf16 on this GPU") if native_bf16(device) else ("fp32", "no native bf16 on this GPU")
    native, why = cpu_bf16()
    return "bf16" if native else "fp32", why


def autocast(precision: str, device: torch.device):
    """The context the networks run in: bfloat16 autocast for ``bf16`` (and ``auto`` where it is
    native), else a no-op. What runs in bf16 is autocast's own list (linear, matmul, conv); the
    models return float32 to the likelihood and the KL."""
    enabled = resolved_precision(precision, device)[0] == "bf16"  # the rule the run's first line states
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


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
    """Fused Adam on CPU and CUDA (one kernel for the whole update); AdamW's decoupled weight decay with
    ``--weight-decay``."""
    decay = {"weight_decay": config.weight_decay, "decoupled_weight_decay": True} if config.weight_decay else {}
    return torch.optim.Adam(model.parameters(), lr=config.lr, eps=config.adam_eps, fused=True, **decay)


def gradient_norm(params: list[Tensor], clip: float) -> Tensor:
    """The global L2 norm of the gradients (one fused reduction), clipping them to ``clip`` when > 0.

    Checked every step: a NaN or infinite gradient can come from a finite loss (a sqrt at 0,
    a division by a vanishing scale), and ``optimizer.step()`` would write it into the weights.
    """
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)


def _nonfinite(loss: Tensor, terms: contract.ElboTerms, grad_norm: Tensor, objective: str) -> str:
    """Which part of the step is NaN or infinite."""
    if bool(torch.isfinite(loss)):
        if bool(torch.isfinite(grad_norm)):
            return "a loss or gradient on another rank"
        return "the gradient (finite loss)"
    bad = [
        name
        for name, t in (("reconstruction", terms.reconstruction), ("KL", terms.kl))
        if not bool(torch.isfinite(t).all())
    ]
    return f"the {' and '.join(bad)} term" if bad else f"the {objective} loss"


def _nonfinite_message(what: str, epoch: int, step: int) -> str:
    return (
        f"{what} became NaN or infinite at epoch {epoch + 1}, step {step}; training stopped and the last good "
        "checkpoint is kept. Try a lower --lr, --grad-clip 100, or --skip-nonfinite N"
    )
