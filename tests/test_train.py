"""`vaelab train` end to end: run directory, config precedence, load_model, resume, failures."""

import csv
import hashlib
import math
import os

import pytest
import torch

import vaelab
from conftest import Boom, train_options
from vaelab import contract, objectives
from vaelab.checkpoint import load_checkpoint, load_model
from vaelab.cli import main
from vaelab.config import Config, tomllib
from vaelab.errors import UserError
from vaelab.training import NonFiniteError

FAST = train_options(data="digits", hidden=32, latent_dim=3, batch_size=64)


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run(tmp_path, *args, name="run"):
    out = tmp_path / name
    code = main(["train", *FAST, "--out", str(out), *args])
    return code, out


def files_digest(directory):
    return {
        p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.rglob("*")
        if p.is_file()
    }


def test_default_data_run_directory(tmp_path, capsys):
    code, out = run(tmp_path, "--epochs", "2")
    assert code == 0
    printed = capsys.readouterr().out
    assert "test  ELBO" in printed and "KL" in printed and str(out) in printed
    for name in ("config.toml", "metrics.csv", "model.safetensors", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    rows = read_rows(out / "metrics.csv")
    assert [(r["epoch"], r["split"]) for r in rows] == [("0", "train"), ("0", "val"), ("1", "train"), ("1", "val")]
    for column in ("elbo", "reconstruction", "kl", "beta", "examples_per_s", "seconds", "kl_dim_0", "kl_dim_2"):
        assert column in rows[0]
    assert "kl_dim_3" not in rows[0]
    for r in rows:  # the columns agree with each other: ELBO = reconstruction - KL = rec - sum_j KL_j
        assert float(r["elbo"]) == pytest.approx(float(r["reconstruction"]) - float(r["kl"]), abs=1e-6)
        assert float(r["kl"]) == pytest.approx(sum(float(r[f"kl_dim_{j}"]) for j in range(3)), rel=1e-4)


def test_config_precedence(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("epochs = 1\nlatent_dim = 5\nbeta = 2.0\nhidden = [16, 8]\n")
    code, out = run(tmp_path, "--config", str(toml), "--latent-dim", "2")
    assert code == 0
    saved = (out / "config.toml").read_text()
    assert "latent_dim = 2\n" in saved  # command line beats the file
    assert "epochs = 1\n" in saved and "beta = 2.0\n" in saved  # the file beats the defaults
    assert "batch_size = 64\n" in saved and f"lr = {Config().lr}\n" in saved


@pytest.mark.parametrize(
    "content,message",
    [
        ("epochz = 3\n", "unknown option 'epochz'"),
        ('epochs = "three"\n', "must be a whole number"),
        ("epochs = [\n", "not valid TOML"),
        ('likelihood = "poisson"\n', "not one of"),
    ],
)
def test_bad_config_files(tmp_path, capsys, content, message):
    toml = tmp_path / "bad.toml"
    toml.write_text(content)
    code, out = run(tmp_path, "--config", str(toml))
    assert code == 2 and message in capsys.readouterr().err and not out.exists()


def test_load_model_from_run_and_checkpoint(tmp_path):
    code, out = run(tmp_path, "--epochs", "1")
    m1 = vaelab.load_model(out)
    m2 = load_model(out / "checkpoints" / "best.pt")
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(m1.encode(x).mean, m2.encode(x).mean)
    assert m1.decode(torch.zeros(2, 3)).mean.shape == (2, 1, 8, 8)
    assert m1.prior().sample().shape == (3,) and not m1.training


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    code, out = run(tmp_path, "--epochs", "1")
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    from vaelab.models import build

    other = build(Config(hidden=(64,), latent_dim=3), (1, 8, 8))
    with pytest.raises(UserError, match="another architecture"):
        from vaelab.checkpoint import load_state

        load_state(other, state["model"], "last.pt")


def test_mnist_idx_end_to_end(tmp_path, mnist_dir, capsys):
    code, out = run(tmp_path, "--data", "mnist", "--data-dir", str(mnist_dir), "--binarize", "dynamic", "--epochs", "2")
    assert code == 0
    assert "bits/dim" in capsys.readouterr().out
    assert load_model(out).x_shape == (1, 28, 28)


def test_grey_pixels_with_bernoulli_are_refused(tmp_path, capsys):
    code, out = run(tmp_path, "--binarize", "none")
    assert code == 2
    err = capsys.readouterr().err
    assert "--binarize dynamic" in err and "continuous-bernoulli" in err and "Traceback" not in err
    assert not out.exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    code, out = run(tmp_path, "--epochs", "1")
    before = files_digest(out)
    code, _ = run(tmp_path, "--epochs", "1")
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert files_digest(out) == before
    code, _ = run(tmp_path, "--epochs", "1", "--overwrite")
    assert code == 0


def test_resume_continues_exactly(tmp_path):
    """2 epochs, then --resume to 4, equals 4 epochs uninterrupted, bit for bit (CPU). A constant rate: the
    default cosine decays to 0 at the end of the epochs asked for, so 2 epochs then 4 is another schedule."""
    common = ["--epochs", "4", "--binarize", "dynamic", "--seed", "5", "--lr-schedule", "constant"]
    assert main(["train", *FAST, *common, "--out", str(tmp_path / "full")]) == 0
    assert main(["train", *FAST, *common[2:], "--epochs", "2", "--out", str(tmp_path / "half")]) == 0
    assert main(["train", *FAST, *common, "--out", str(tmp_path / "half"), "--resume"]) == 0
    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "half" / "checkpoints" / "last.pt")["model"]
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    rows = read_rows(tmp_path / "half" / "metrics.csv")
    assert [r["epoch"] for r in rows if r["split"] == "val"] == ["0", "1", "2", "3"]


def test_resume_with_another_architecture_is_refused(tmp_path, capsys):
    code, out = run(tmp_path, "--epochs", "1")
    assert (
        main(["train", "--data", "digits", "--hidden", "48", "--latent-dim", "3", "--out", str(out), "--resume"]) == 2
    )
    assert "hidden" in capsys.readouterr().err


def test_nan_stops_the_run_naming_step_and_term(tmp_path, capsys, monkeypatch):
    real = objectives.elbo
    calls = {"n": 0}

    def poisoned(model, x, noise=None):
        terms = real(model, x, noise)
        calls["n"] += 1
        if model.training and calls["n"] > 30:  # after the first epoch's checkpoint
            return contract.ElboTerms(terms.reconstruction * float("nan"), terms.kl, terms.kl_per_dim, "analytic")
        return terms

    monkeypatch.setattr(objectives, "elbo", poisoned)
    code, out = run(tmp_path, "--epochs", "5")
    err = capsys.readouterr().err
    assert code == 2 and "reconstruction term became NaN" in err and "step" in err
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] >= 1  # the last good one is kept


def test_batch_larger_than_data_and_missing_cuda(tmp_path, capsys):
    code, _ = run(tmp_path, "--batch-size", "5000")
    assert code == 2 and "larger than the training set" in capsys.readouterr().err
    if not torch.cuda.is_available():
        code, _ = run(tmp_path, "--device", "cuda", name="cuda")
        assert code == 2 and "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["--objective", "iwae", "--k", "3"],
        ["--prior", "vamp", "--prior-components", "4"],
        ["--warmup", "cyclical", "--warmup-steps", "10", "--free-bits", "0.1"],
        ["--likelihood", "continuous-bernoulli", "--binarize", "none", "--model", "conv", "--data", "mnist"],
    ],
)
def test_option_combinations_train(tmp_path, mnist_dir, args):
    if "mnist" in args:
        args = [*args, "--data-dir", str(mnist_dir)]
    code, out = run(tmp_path, "--epochs", "1", *args)
    assert code == 0
    rows = read_rows(out / "metrics.csv")
    assert all(abs(float(r["elbo"])) < 1e6 for r in rows)


def test_python_api_fit():
    model = vaelab.build_model(Config(hidden=(16,), latent_dim=2), (1, 8, 8))
    x = torch.rand(100, 1, 8, 8)
    state = vaelab.fit(model, x, x[:20], epochs=3, batch_size=20, binarize="dynamic", progress=False)
    assert [r.split for r in state.history] == ["train", "val"] * 3
    assert state.history[-1].elbo > state.history[1].elbo


def test_presets_configure_the_published_protocol(tmp_path):
    from vaelab.config import lr_at, resolve

    c = resolve(None, {}, "burda2015-iwae-k5")
    assert (c.hidden, c.latent_dim, c.activation, c.objective, c.k, c.batch_size) == (
        (200, 200),
        50,
        "tanh",
        "iwae",
        5,
        20,
    )
    assert c.binarize == "dynamic" and c.adam_eps == 1e-4 and c.epochs == sum(3**i for i in range(8)) == 3280
    # 3^i epochs at 0.001 * 10^(-i/7)
    assert lr_at(c, 0) == pytest.approx(1e-3)
    assert lr_at(c, 1) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert lr_at(c, 3) == pytest.approx(1e-3 * 10 ** (-1 / 7))
    assert lr_at(c, 4) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    assert lr_at(c, 3279) == pytest.approx(1e-4)
    # a command-line option still overrides the preset
    assert resolve(None, {"epochs": 2}, "burda2015-vae").epochs == 2
    with pytest.raises(UserError, match="unknown preset"):
        resolve(None, {}, "burda")


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]), "truncated or corrupt"),
        (lambda p: p.write_bytes(b"garbage"), "not a vaelab checkpoint"),
        (lambda p: torch.save({"format": 1, "model": Boom()}, p), "arbitrary pickle"),
    ],
)
def test_bad_checkpoints_are_refused(tmp_path, make, message):
    code, out = run(tmp_path, "--epochs", "1")
    path = out / "checkpoints" / "last.pt"
    make(path)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_a_users_own_modules_train_through_the_same_loop():
    """VAE(encoder, decoder, ...) with hand-written nn.Modules: encoder -> (B, 2D), decoder -> (B, P C, H, W)."""
    from torch import nn

    from vaelab.models import VAE, make_likelihood, make_prior

    D = 3
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 2 * D))
    decoder = nn.Sequential(nn.Linear(D, 32), nn.Tanh(), nn.Linear(32, 64), nn.Unflatten(1, (1, 8, 8)))
    model = VAE(
        encoder, decoder, D, (1, 8, 8), make_likelihood("bernoulli", (1, 8, 8)), make_prior("normal", D, (1, 8, 8), 1)
    )
    x = (torch.rand(200, 1, 8, 8) > 0.5).float()
    state = vaelab.fit(model, x, x[:40], epochs=2, batch_size=40, progress=False)
    assert len(state.history[-1].kl_per_dim) == D
    assert torch.isfinite(torch.tensor(state.history[-1].elbo))


class _NaNGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward once ``armed``: a finite loss, a non-finite gradient.
    ``armed`` True: every backward pass; a whole number n: the next n passes."""

    armed: bool | int = False

    @staticmethod
    def forward(ctx, h):
        return h.clone()

    @staticmethod
    def backward(ctx, grad):
        armed = _NaNGradient.armed
        if armed is True:
            return grad * float("nan")
        if armed:
            _NaNGradient.armed = armed - 1
            return grad * float("nan")
        return grad


def _model_with_a_nan_gradient():
    from torch import nn

    from vaelab.models import VAE, make_likelihood, make_prior

    class NaNGradient(nn.Module):
        def forward(self, h):
            return _NaNGradient.apply(h)

    D, shape = 2, (1, 8, 8)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), NaNGradient(), nn.Tanh(), nn.Linear(16, 2 * D))
    decoder = nn.Sequential(nn.Linear(D, 64), nn.Unflatten(1, shape))
    return VAE(encoder, decoder, D, shape, make_likelihood("bernoulli", shape), make_prior("normal", D, shape, 1))


@pytest.mark.parametrize("grad_clip", [0.0, 5.0])
def test_a_nan_gradient_with_a_finite_loss_stops_the_run(monkeypatch, grad_clip):
    """Before the gradient norm was checked every step, grad_clip 0 let NaN gradients into Adam."""
    monkeypatch.setattr(_NaNGradient, "armed", True)
    model = _model_with_a_nan_gradient()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.rand(80, 1, 8, 8) > 0.5).float()
    with pytest.raises(UserError, match=r"the gradient \(finite loss\) became NaN or infinite at epoch 1, step 0"):
        vaelab.fit(model, x, epochs=1, batch_size=40, grad_clip=grad_clip, progress=False)
    for name, value in model.state_dict().items():  # the step was not taken
        assert torch.equal(value, before[name]), name


def test_skip_nonfinite_skips_a_nan_gradient(monkeypatch):
    model = _model_with_a_nan_gradient()
    x = (torch.rand(120, 1, 8, 8) > 0.5).float()
    vaelab.fit(model, x, epochs=1, batch_size=40, progress=False)  # unarmed: trains
    monkeypatch.setattr(_NaNGradient, "armed", 2)  # two of the epoch's three batches
    state = vaelab.fit(model, x, epochs=1, batch_size=40, skip_nonfinite=2, progress=False)
    record = state.history[-1]
    assert record.skipped == 2 and math.isfinite(record.elbo) and record.elbo < 0  # the mean of the third batch
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())


def test_an_epoch_of_skipped_batches_is_a_divergence(monkeypatch):
    """Every batch skipped: nothing was learnt, and the epoch's ELBO would be a mean over no examples (it
    was logged as 0.0); the run stops as diverged, with the parameters as they were."""
    model = _model_with_a_nan_gradient()
    x = (torch.rand(80, 1, 8, 8) > 0.5).float()
    monkeypatch.setattr(_NaNGradient, "armed", True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteError, match="every batch of epoch 1 was NaN or infinite and skipped"):
        vaelab.fit(model, x, epochs=1, batch_size=40, skip_nonfinite=5, progress=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_skip_budget_is_the_runs_not_an_epochs(monkeypatch):
    model = _model_with_a_nan_gradient()
    x = (torch.rand(120, 1, 8, 8) > 0.5).float()
    monkeypatch.setattr(_NaNGradient, "armed", 1)

    def arm_again(*, records, model, state):  # one NaN batch in every epoch
        _NaNGradient.armed = 1

    with pytest.raises(NonFiniteError, match="epoch 2"):
        vaelab.fit(model, x, epochs=3, batch_size=40, skip_nonfinite=1, hooks=[arm_again], progress=False)


def test_resume_refuses_a_checkpoint_of_the_old_random_streams(tmp_path, capsys):
    code, out = run(tmp_path, "--epochs", "1")
    path = out / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["rng_streams"]  # as written before the streams were named
    torch.save(state, path)
    before = files_digest(out)
    code, _ = run(tmp_path, "--epochs", "2", "--resume")
    assert code == 2 and "random streams differ" in capsys.readouterr().err
    assert files_digest(out) == before
    assert load_model(path) is not None  # its model still loads


def test_auto_resume_starts_then_continues(tmp_path, capsys):
    """--auto-resume: a new run when --out has no checkpoint, a resume when it has one."""
    code, out = run(tmp_path, "--epochs", "1", "--auto-resume")
    assert code == 0 and "resuming" not in capsys.readouterr().out
    code, _ = run(tmp_path, "--epochs", "2", "--auto-resume")
    assert code == 0 and "resuming" in capsys.readouterr().out
    assert [r["epoch"] for r in read_rows(out / "metrics.csv") if r["split"] == "val"] == ["0", "1"]
    assert main(["train", *FAST, "--epochs", "1", "--auto-resume"]) == 2
    assert "--auto-resume needs --out" in capsys.readouterr().err


def test_nproc_runs_the_command_line_given_to_main(tmp_path):
    """main([... '--nproc', '2']) launches torchrun with that command line, not the process's own sys.argv."""
    out = tmp_path / "run"
    assert main(["train", *FAST, "--epochs", "1", "--out", str(out), "--nproc", "2"]) == 0
    assert (out / "checkpoints" / "last.pt").exists()


def test_cosine_schedule_values():
    from vaelab.config import lr_at

    config = Config(lr=2e-3, lr_schedule="cosine")
    assert [lr_at(config, 0, p) for p in (0.0, 0.5, 1.0, 1.7)] == pytest.approx([2e-3, 1e-3, 0.0, 0.0])
    assert lr_at(Config(lr=2e-3, lr_schedule="constant"), 5, 0.9) == 2e-3  # constant ignores the progress


def test_cosine_over_the_epochs_ends_near_zero():
    model = vaelab.build_model(Config(hidden=(16,), latent_dim=2), (1, 8, 8))
    x = (torch.rand(128, 1, 8, 8) > 0.5).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    vaelab.fit(model, x, epochs=3, batch_size=32, lr_schedule="cosine", optimizer=optimizer, progress=False)
    total = 3 * (128 // 32)
    # the last step's rate: progress (total - 1) / total
    expected = Config().lr * 0.5 * (1 + math.cos(math.pi * (total - 1) / total))
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)


def test_a_time_budget_ends_the_run_and_a_resume_keeps_to_it(tmp_path, capsys):
    """--time-budget: the run stops after the step that reaches the budget, with its checkpoint and test
    record; --resume with the same budget trains no further, with a larger one it continues."""
    out = tmp_path / "run"
    args = [*FAST, "--epochs", "100000", "--lr-schedule", "cosine", "--out", str(out)]
    assert main(["train", *args, "--time-budget", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert "time budget of 0.5 s reached" in printed and "test  ELBO" in printed
    first = load_checkpoint(out / "checkpoints" / "last.pt")
    assert first["elapsed"] >= 0.5 and first["epoch"] < 100000
    assert main(["train", *args, "--time-budget", "0.5", "--resume"]) == 0
    assert load_checkpoint(out / "checkpoints" / "last.pt")["step"] == first["step"]
    assert main(["train", *args, "--time-budget", "1.0", "--resume"]) == 0
    later = load_checkpoint(out / "checkpoints" / "last.pt")
    assert later["step"] > first["step"] and later["elapsed"] >= 1.0
    rows = read_rows(out / "metrics.csv")
    assert float(rows[-1]["elapsed"]) == pytest.approx(later["elapsed"])
    assert all(int(r["epoch"]) == i // 2 for i, r in enumerate(rows))  # train and val once per epoch


def test_a_budget_spent_during_validation_or_a_checkpoint_still_ends_checkpointed():
    """The budget counts wall time, so it can run out in a hook (a checkpoint write) rather than in a step.
    The run then still ends on a step, and what the last checkpoint would hold (the state a hook sees)
    is past the budget: resuming from it trains no further."""
    import time as _time

    from vaelab.training import TrainState

    x = (torch.rand(256, 1, 8, 8) > 0.5).float()
    seen = []

    def slow_checkpoint(*, records, model, state):
        seen.append((state.epoch, state.step, state.elapsed))  # what a checkpoint written here keeps
        if state.epoch == 1:
            _time.sleep(0.4)  # the budget runs out here, after epoch 0's steps

    model = vaelab.build_model(Config(hidden=(16,), latent_dim=2), (1, 8, 8))
    options = dict(batch_size=64, epochs=50, time_budget=0.3, lr_schedule="constant", progress=False)
    state = vaelab.fit(model, x, hooks=[slow_checkpoint], **options)
    epoch, step, elapsed = seen[-1]
    assert step > 256 // 64 and elapsed >= 0.3  # a step of epoch 1 ran after the hook, and was checkpointed
    resumed = vaelab.fit(model, x, state=TrainState(epoch, step, elapsed=elapsed), **options)
    assert resumed.step == step == state.step


def test_a_time_budget_without_epochs_runs_to_the_budget():
    """--time-budget alone: the clock ends the run, not the default 30 epochs; --epochs still caps it."""
    from vaelab.config import UNCAPPED_EPOCHS, resolve

    assert resolve(None, {"time_budget": 60.0}).epochs == UNCAPPED_EPOCHS
    assert resolve(None, {"time_budget": 60.0, "epochs": 5}).epochs == 5
    assert resolve(None, {}).epochs == Config().epochs


def _trained(precision):
    torch.manual_seed(0)
    model = vaelab.build_model(Config(hidden=(32,), latent_dim=3, precision=precision), (1, 8, 8))
    x = (torch.rand(128, 1, 8, 8) > 0.5).float()
    state = vaelab.fit(model, x, epochs=2, batch_size=32, precision=precision, progress=False)
    return model, state


def test_bf16_runs_the_networks_in_bfloat16_and_keeps_the_rest_in_float32():
    fp32, _ = _trained("fp32")
    bf16, state = _trained("bf16")
    assert all(p.dtype == torch.float32 for p in bf16.parameters())  # weights and optimiser stay float32
    assert all(math.isfinite(r.elbo) for r in state.history)
    differs = any(not torch.equal(a, b) for a, b in zip(fp32.parameters(), bf16.parameters(), strict=True))
    assert differs  # autocast really ran the products in bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = bf16.encode(torch.rand(2, 1, 8, 8))
        p_x = bf16.decode(q.mean)
    assert q.mean.dtype == torch.float32 and p_x.base_dist.logits.dtype == torch.float32


def test_the_float32_boundary_is_in_the_builders():
    """A network's bf16 output becomes float32 in the builders themselves (``at_least_float32``): every
    posterior builder, every likelihood and the categoricals; float64 stays float64. A new family that never
    casts gets float32 densities under bf16 autocast."""
    from vaelab import distributions as dist
    from vaelab.models.base import make_likelihood
    from vaelab.parts import LIKELIHOODS

    h = torch.randn(4, 3 * 5, dtype=torch.bfloat16)  # wide enough for every builder below, D = 3
    for q in (
        dist.diagonal_posterior(h[:, :6]),
        dist.full_posterior(h[:, :9]),
        dist.lowrank_posterior(h[:, :9], 3),
        dist.Categoricals(h.view(4, 5, 3)),
    ):
        assert q.mean.dtype == torch.float32, type(q)
    assert dist.diagonal_posterior(h[:, :6].double()).mean.dtype == torch.float64
    for part in LIKELIHOODS:
        out = torch.randn(2, part.params_per_pixel, 8, 8, dtype=torch.bfloat16)
        p_x = make_likelihood(part.name, (1, 8, 8))(out)
        assert p_x.log_prob(torch.rand(2, 1, 8, 8).round()).dtype == torch.float32, part.name

    class Bare(torch.nn.Module):  # a family that never casts: encoder and decoder straight into the builders
        def __init__(self):
            super().__init__()
            self.enc, self.dec, self.lik = (
                torch.nn.Linear(64, 6),
                torch.nn.Linear(3, 64),
                make_likelihood("bernoulli", (1, 8, 8)),
            )

        def latents(self, x, draw):
            q = dist.diagonal_posterior(self.enc(x.flatten(1)))
            return [contract.LatentLayer("z", q, dist.standard_normal(3), draw(q))]

        def log_px_given_z(self, layers, x):
            return self.lik(self.dec(layers[0].z).view(-1, 1, 8, 8)).log_prob(x)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = objectives.elbo(Bare(), (torch.rand(5, 1, 8, 8) > 0.5).float())
    assert terms.kl.dtype == terms.reconstruction.dtype == torch.float32


def test_auto_precision_follows_the_cpu_flags(monkeypatch):
    from vaelab.training import native_bf16

    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    with open("/proc/cpuinfo") as f:
        flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    assert native_bf16(torch.device("cpu")) == native
    auto, _ = _trained("auto")
    same_as, _ = _trained("bf16" if native else "fp32")
    for a, b in zip(auto.parameters(), same_as.parameters(), strict=True):
        assert torch.equal(a, b)


def test_auto_precision_stays_fp32_where_onednn_may_not_use_the_bf16_instructions(monkeypatch):
    """A CPU with avx512_bf16 whose oneDNN is held below it (ONEDNN_MAX_CPU_ISA=AVX2, as a study of AVX2
    code paths sets it) multiplies bf16 on a reference path, about 100 times slower than fp32: ``auto``
    stays fp32 there and says why; so it does where PyTorch's oneDNN backend is off."""
    from vaelab import training

    monkeypatch.setattr(training, "cpu_info", lambda: {"model name": "x", "flags": ["avx2", "avx512_bf16"]})
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    cpu = torch.device("cpu")
    if torch.backends.mkldnn.is_available():
        assert training.resolved_precision("auto", cpu) == ("bf16", "native bf16 on this CPU: avx512_bf16")
        enabled = torch.backends.mkldnn.set_flags(False, _fp32_precision=None)[0]  # only the switch, no TF32 flag
        try:
            assert training.resolved_precision("auto", cpu) == (
                "fp32",
                "this CPU has avx512_bf16, but PyTorch's oneDNN backend is off",
            )
        finally:
            torch.backends.mkldnn.set_flags(enabled, _fp32_precision=None)
        assert torch.backends.mkldnn.enabled
    for name, value in (("ONEDNN_MAX_CPU_ISA", "avx2"), ("DNNL_MAX_CPU_ISA", "AVX512_CORE")):
        monkeypatch.setenv(name, value)
        precision, why = training.resolved_precision("auto", cpu)
        assert precision == "fp32" and f"{name}={value.upper()} keeps oneDNN's bf16 products off it" in why
        assert not training.native_bf16(cpu)
        monkeypatch.delenv(name)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # a limit at or above bf16 holds nothing back
    assert training.resolved_precision("auto", cpu)[0] == ("bf16" if torch.backends.mkldnn.is_available() else "fp32")
    monkeypatch.setattr(training, "cpu_info", lambda: {"model name": "x", "flags": ["avx2"]})
    assert training.resolved_precision("auto", cpu) == ("fp32", "no native bf16 on this CPU")
    assert training.resolved_precision("bf16", cpu) == ("bf16", "--precision bf16")  # asked for: done as asked


def test_the_validation_split_is_a_twelfth_of_the_training_images_at_most_a_thousand():
    from vaelab.data import load
    from vaelab.data.sources import validation_size

    assert [validation_size(n, -1) for n in (5, 4250, 12_000, 60_000)] == [1, 354, 1000, 1000]
    assert [validation_size(60_000, n) for n in (0, 250, 5000)] == [0, 250, 5000]
    default, splits = load(Config(data="digits")), load(Config(data="digits", val_size=100))
    pool = len(default.train.x) + len(default.val.x)
    assert len(default.val.x) == pool // 12
    assert (len(splits.val.x), len(splits.train.x)) == (100, pool - 100)
    assert torch.equal(splits.test.x, default.test.x)  # the test split does not move


def test_val_size_0_trains_on_every_training_image_and_keeps_the_last_weights(tmp_path, capsys):
    code, out = run(tmp_path, "--epochs", "3", "--val-size", "0")
    assert code == 0
    printed = capsys.readouterr().out
    assert "1527 train / 0 val" in printed and "epoch   3/3  train  ELBO" in printed
    rows = read_rows(out / "metrics.csv")
    assert [r["split"] for r in rows] == ["train"] * 3
    last, best = (load_checkpoint(out / "checkpoints" / n) for n in ("last.pt", "best.pt"))
    assert last["epoch"] == best["epoch"] == 3 and last["val_images"] == 0
    assert all(torch.equal(last["model"][k], best["model"][k]) for k in last["model"])
    assert main(["report", str(out)]) == 0  # the curves without a validation line


def test_the_default_thread_count_leaves_out_the_cores_other_work_keeps_busy(monkeypatch):
    """One process spinning beside: /proc/stat shows about a core busy, and the default (threads 0)
    takes one thread fewer than the cores (on a machine of one core, that one)."""
    import subprocess
    import sys
    import time

    import torch

    from vaelab.runs import busy_cores, set_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert 0.7 <= busy_cores(0.5) <= cores
        chosen, why = set_threads(0)
        assert chosen <= max(1, cores - 1) and "busy with other work" in why
    finally:
        spinner.kill()
        torch.set_num_threads(threads)
    assert set_threads(3) == (3, "--threads")
    torch.set_num_threads(threads)


def test_the_run_says_what_precision_and_threads_it_resolved(tmp_path, capsys):
    from vaelab.config import read_toml
    from vaelab.training import native_bf16

    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--hidden", "16", "--epochs", "1", "--out", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    resolved = tomllib.loads((out / "config.toml").read_text())["resolved"]
    expected = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    assert resolved["precision"] == expected and f"{expected} ({resolved['precision_why']})" in first
    assert f"{resolved['threads']} thread" in first and resolved["threads_why"] in first
    assert "resolved" not in read_toml(out / "config.toml")  # a record, not an option, when the file is reused


def test_weight_decay_is_adamws():
    """``--weight-decay``: the update of torch.optim.AdamW (decoupled decay; an independent, unfused
    implementation) on the same gradients; 0 is plain Adam, as before the option."""
    import copy

    from vaelab.training import make_optimizer

    torch.manual_seed(0)
    model = vaelab.build_model(Config(hidden=(8,), latent_dim=2), (1, 4, 4))
    reference = copy.deepcopy(model)
    ours = make_optimizer(model, Config(lr=1e-2, weight_decay=0.1))
    theirs = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, eps=1e-8, foreach=False)
    for step in range(3):
        for m in (model, reference):
            torch.manual_seed(step)
            for p in m.parameters():
                p.grad = torch.randn_like(p)
        ours.step()
        theirs.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    plain = make_optimizer(model, Config())
    assert plain.param_groups[0]["weight_decay"] == 0 and not plain.param_groups[0]["decoupled_weight_decay"]
