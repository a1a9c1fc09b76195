"""Semi-supervised M2 (``--labelled N``): the label a latent variable where it is missing.

Witnesses: the batch's bound against the same bound written out by hand label by label (the labelled
images' log p(x, y) bound, the unlabelled ones' sum over every label weighted by q(y|x) plus
KL(q(y|x) || Uniform(C)) from torch.distributions); the unlabelled model's sampled ELBO against that
exact sum (Monte Carlo, 4 standard errors); its IWAE estimate of log p(x) against numerical
integration over a 2-D z, the label summed out exactly."""

import json
import math

import pytest
import torch
from torch.distributions import Categorical, kl_divergence

import vaelab
from conftest import round_trip
from vaelab.cli import main
from vaelab.config import Config
from vaelab.contract import Examples, Noise
from vaelab.data import semi_supervised
from vaelab.errors import UserError
from vaelab.evaluation import iwae_log_likelihood
from vaelab.kl import kl_q_p
from vaelab.models import build
from vaelab.objectives import elbo


def small_m2(classes=3, latent_dim=2):
    torch.manual_seed(0)
    config = Config(labelled=6, classes=classes, latent_dim=latent_dim, hidden=(16,))
    return build(config, (1, 8, 8)), config


def images(n, seed=1):
    return (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) > 0.5).float()


def test_the_batch_bound_is_the_labelled_and_the_unlabelled_bound_written_out():
    model, config = small_m2()
    x, y = images(5), torch.tensor([2, -1, 0, -1, -1])
    loss, terms = model.training_loss(x, Noise(torch.Generator().manual_seed(7), 5), 1.0, config, 100, y)
    eps = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(7))  # the noise of each label's z
    q_y = model.classify(x).probs[:, 0]
    with torch.no_grad():
        per_label = []
        for c in range(3):
            label = torch.full((5,), c)
            q_z = model.encode(x, label)
            z = q_z.base_dist.loc + q_z.base_dist.scale * eps[c]
            per_label.append(model.decode(z, label).log_prob(x) - kl_q_p(q_z, model.prior()).value)
        bound = torch.stack(per_label, 1)  # (B, C): E log p(x|y, z) - KL(q(z|x, y) || p(z)) at one z each
    kl_y = kl_divergence(Categorical(probs=q_y), Categorical(logits=torch.zeros(3)))
    expected = torch.where(
        y >= 0, bound.gather(1, y.clamp(min=0)[:, None])[:, 0] - math.log(3), (q_y * bound).sum(1) - kl_y
    )
    torch.testing.assert_close(terms.elbo.detach(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(terms.kl_per_layer["y"].detach()[[1, 3, 4]], kl_y[[1, 3, 4]])
    cross_entropy = -torch.log(q_y[[0, 2], [2, 0]]).mean()
    torch.testing.assert_close(loss.detach(), -expected.mean() + config.alpha * cross_entropy, rtol=1e-5, atol=1e-4)


def test_the_unlabelled_models_sampled_elbo_is_the_exact_sum_over_labels():
    model, config = small_m2()
    x = images(1).expand(40_000, -1, -1, -1)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(2)
        sampled = elbo(model, x).elbo  # y ~ q(y|x), z ~ q(z|x, y)
        _, exact = model.training_loss(
            x, Noise(torch.Generator().manual_seed(3), len(x)), 1.0, config, 1, -torch.ones(len(x), dtype=torch.long)
        )
    difference = sampled.double().mean() - exact.elbo.double().mean()
    se = (sampled.double().var() / len(x) + exact.elbo.double().var() / len(x)).sqrt()
    assert abs(difference) <= 4 * se, (difference, se)


def test_the_iwae_estimate_sums_the_label_out():
    """log p(x) = log sum_y p(y) integral p(x|y, z) p(z) dz, the 2-D integral on a grid of 401 x 401 points
    over [-7, 7]^2 (the integrand's mass outside is below 1e-10 of it)."""
    model, _ = small_m2()
    model.eval()
    x = images(2, seed=4)
    grid = torch.linspace(-7, 7, 401)
    z = torch.cartesian_prod(grid, grid)  # (G, 2)
    cell = (grid[1] - grid[0]).item() ** 2
    log_pz = model.prior().log_prob(z)
    exact = []
    with torch.no_grad():
        for xi in x:
            per_label = []
            for c in range(3):
                label = torch.full((len(z),), c)
                log_px = model.decode(z, label).log_prob(xi.expand(len(z), -1, -1, -1))
                per_label.append(torch.logsumexp((log_px + log_pz).double(), 0) + math.log(cell))
            exact.append(torch.logsumexp(torch.stack(per_label), 0) - math.log(3))
    exact = torch.stack(exact)
    torch.manual_seed(5)
    estimate = iwae_log_likelihood(model, x, 20_000)
    assert ((estimate - exact).abs() < 0.02).all(), (estimate, exact)


def test_the_labels_kept_are_balanced_and_seeded():
    y = torch.arange(10).repeat(30)
    config = Config(labelled=25, classes=10)
    kept = semi_supervised(config, y, "data")
    assert (kept >= 0).sum() == 25 and torch.equal(kept[kept >= 0], y[kept >= 0])
    counts = torch.bincount(kept[kept >= 0], minlength=10)
    assert counts.tolist() == [3] * 5 + [2] * 5  # 25 over 10 classes: the first five one more
    assert torch.equal(kept, semi_supervised(config, y, "data"))  # a function of the seed
    assert not torch.equal(kept, semi_supervised(config.replace(seed=1), y, "data"))
    for wanted, message in ((5, "needs 10 to 300"), (301, "needs 10 to 300")):
        with pytest.raises(UserError, match=message):
            semi_supervised(Config(labelled=wanted, classes=10), y, "data")


M2 = ["--data", "digits", "--lr-schedule", "constant", "--labelled", "50", "--hidden", "64", "--latent-dim", "3"]


def test_m2_trains_evaluates_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "m2"
    assert main(["train", *M2, "--epochs", "2", "--out", str(out)]) == 0
    assert "semi-supervised M2 (50 of" in capsys.readouterr().out
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kl_y", "kl_z", "kl_y_dim_0", "kl_z_dim_2"} <= set(header)
    assert main(["train", *M2, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    assert main(["train", *M2, "--epochs", "3", "--out", str(tmp_path / "fresh")]) == 0
    resumed, fresh = vaelab.load_model(out).state_dict(), vaelab.load_model(tmp_path / "fresh").state_dict()
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--iwae-k", "50"]) == 0
    assert "classifier accuracy" in capsys.readouterr().out
    record = json.loads((out / "evaluation.json").read_text())
    assert 0 <= record["accuracy"] <= 1 and record["labelled"] == 50
    assert set(record["kl_per_layer"]) == {"y", "z"} and record["kl_per_layer"]["y"] <= math.log(10) + 1e-9
    assert record["kl_split"]["layer"] == "y" and record["mutual_information"] <= math.log(10) + 1e-6
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Samples from the prior, per class" in page and "KL(q(y|x) ‖ Uniform(C))" in page


def test_m2_options_are_checked():
    for message, options in {
        "--family conditional needs every label": dict(labelled=10, family="conditional"),
        "built with --prior normal": dict(labelled=10, prior="mixture"),
        "built with --family vae": dict(labelled=10, family="hierarchical"),
        "add --labelled N": dict(alpha=1.0),
    }.items():
        with pytest.raises(UserError, match=message):
            Config(**options)


def test_two_halves_of_a_batch_give_the_batchs_gradient(monkeypatch):
    """What torchrun's two processes compute: each its rows' loss (its share of the noise, the classifier's
    loss over the whole batch's labelled count, times the number of processes), the gradients averaged.
    Against one process's gradient on the whole batch: equal to float32 rounding."""
    from vaelab.models import m2

    model, config = small_m2(classes=10, latent_dim=3)
    x, y = images(64, seed=6), torch.full((64,), -1)
    y[[3, 40, 41]] = torch.tensor([1, 5, 7])

    def gradient(rows, start, total):
        model.zero_grad()
        noise = Noise(torch.Generator().manual_seed(5), total, start)
        model.training_loss(x[rows], noise, 1.0, config, 100, y[rows])[0].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = gradient(slice(None), 0, 64)

    class TwoProcesses:
        active, world, rank, is_main = True, 2, 0, True

    monkeypatch.setattr(m2.distributed, "current", TwoProcesses)
    monkeypatch.setattr(m2.distributed, "all_reduce_sum", lambda t: torch.full_like(t, 3.0))  # 3 labelled in all
    halves = (gradient(slice(0, 32), 0, 64) + gradient(slice(32, 64), 32, 64)) / 2
    assert ((whole - halves).norm() / whole.norm()) < 1e-6


def test_m2_from_python():
    model, config = small_m2()
    x = images(120, seed=9)
    y = torch.full((120,), -1)
    y[:6] = torch.tensor([0, 1, 2, 0, 1, 2])
    state = vaelab.fit(model, Examples(x, y), x[:30], config.replace(epochs=2, batch_size=30), progress=False)
    assert set(state.history[0].kl_per_layer) == {"y", "z"} and math.isfinite(state.history[-1].elbo)
    assert 0 <= state.history[-1].kl_per_layer["y"] <= math.log(3) + 1e-6


def test_the_page_of_m2_draws_given_a_label(tmp_path):
    from fastapi.testclient import TestClient

    from vaelab.web.app import create_app

    out = tmp_path / "m2"
    assert main(["train", *M2, "--epochs", "1", "--out", str(out)]) == 0
    client = TestClient(create_app(out), base_url="http://127.0.0.1")
    assert client.get("/api/model").json()["classes"] == 10
    assert client.get("/api/decode?z=0,0,0").status_code == 422  # which label?
    a, b = (client.get(f"/api/decode?z=0,0,0&label={c}").json()["image"] for c in (1, 7))
    assert a != b


def test_m2_compresses_with_the_label_as_a_latent(tmp_path):
    """Bits-back with y a latent: pop y with q(y|x) and z with q(z|x, y), push x, z and y (log2 C bits): an
    exact round trip, the initial bits back, the pushes exactly 8 bits per dimension of z plus log2 10, and
    the message the sum of what each symbol cost (to 0.2 %, the tables' 24-bit quantisation)."""
    from vaelab.bitsback import initial_words, model_coder
    from vaelab.compress import compress, decompress
    from vaelab.evaluation import open_trained

    out = tmp_path / "m2"
    assert main(["train", *M2, "--epochs", "2", "--out", str(out)]) == 0
    t = open_trained(out)
    x = t.examples("test").x
    symbols = x.flatten(1).round().int().numpy()
    coder = model_coder(t.model, 2, 8)
    message, costs = round_trip(coder, symbols)
    assert costs.z_pushed == pytest.approx(8 * 3 + math.log2(10))
    coded = 32 * len(message) - 32 * len(initial_words(coder.latent_dim, 0))
    assert abs(coded - costs.net.sum()) < 0.002 * costs.net.sum() + 64
    summary = compress(out, tmp_path / "m2.vbb", iwae_k=0)
    assert summary["label_classes"] == 10 and "z_net_expected" not in summary["bits_per_image"]
    decompress(tmp_path / "m2.vbb", tmp_path / "back.npy")
