"""The model families beyond one diagonal-Gaussian layer: the hierarchical VAE (two latent layers,
a KL per layer) and the flow posterior (inverse autoregressive flow, a Monte Carlo KL).

Witnesses that do not trust the code: the two-level linear-Gaussian model, whose log p(x), exact
posterior and ELBO are known in closed form; torch.distributions' own KL; autograd's Jacobian;
the mean-field gap of the one-level linear-Gaussian model. Randomised checks use fixed seeds and a
tolerance of 4 standard errors (a false alarm about 6e-5 of the time each, normal approximation).
"""

import json
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import pngs
import vaelab
from vaelab import contract, objectives, parts
from vaelab.cli import main
from vaelab.config import PRESETS, Config, resolve
from vaelab.contract import Examples
from vaelab.evaluation import evaluate, kl_per_example
from vaelab.kl import kl_mvn
from vaelab.linear_gaussian import LinearGaussian, TwoLevelLinearGaussian, mean_field_kl
from vaelab.models import build
from vaelab.models.flows import IAFPosterior

# a constant rate where a test resumes a run with more epochs (cosine would decay to the first run's end)
TWO = [
    "--data",
    "digits",
    "--lr-schedule",
    "constant",
    "--family",
    "hierarchical",
    "--hidden",
    "32",
    "--latent-dim",
    "4",
    "--top-hidden",
    "16",
    "--top-latent-dim",
    "2",
]


def two_level(shift: float = 0.0, seed: int = 0, inference: str = "top-down"):
    m = TwoLevelLinearGaussian.random(seed=seed)
    return TwoLevelLinearGaussian(m.A, m.a, m.var1, m.W, m.b, m.var, posterior_shift=shift, inference=inference)


# -- the contract on an exact two-layer model ------------------------------------------------------------
@pytest.mark.parametrize("inference", ["top-down", "bottom-up"])
def test_exact_two_layer_posterior_gives_log_px_in_every_importance_weight(inference):
    """With the exact posterior, q(z2|x) q(z1|x, z2) or q(z1|x) q(z2|z1), every joint importance weight
    over both layers is p(x)."""
    torch.manual_seed(0)
    model = two_level(inference=inference)
    x = model.marginal().sample((6,))
    log_w = objectives.iwae_log_weights(model, x, 200)  # (200, 6)
    torch.testing.assert_close(log_w, model.log_px(x).expand_as(log_w), rtol=0, atol=1e-10)


def test_bottom_up_elbo_is_unbiased_with_the_lower_layer_kl_sampled():
    """Bottom-up, p(z1|z2) is read at a z2 drawn from z1: KL1 is log q(z1|x) - log p(z1|z2) at the samples
    (marked Monte Carlo), and E_q[ELBO] = log p(x) - KL(q || p(z1, z2|x)) for a shifted q, within 4 standard
    errors. The closed form of KL1 at the drawn z2 would be biased: its ELBO misses the exact one by more
    than 20 standard errors."""
    torch.manual_seed(5)
    model, R = two_level(shift=0.3, inference="bottom-up"), 40_000
    x = model.marginal().sample((1,)).expand(R, -1)
    layers = model.latents(x, objectives.rsample)
    assert [(layer.name, layer.closed_form) for layer in layers] == [("z2", True), ("z1", False)]
    terms = objectives.elbo(_Fixed(model, layers), x)
    assert terms.kl_method == "monte_carlo"
    exact = (model.log_px(x[:1]) - model.kl_q_posterior(x[:1])).item()
    se = terms.elbo.std().item() / math.sqrt(R)
    assert abs(terms.elbo.mean().item() - exact) < 4 * se
    top, bottom = layers
    torch.testing.assert_close(terms.kl_per_layer["z1"], bottom.q.log_prob(bottom.z) - bottom.p.log_prob(bottom.z))
    closed = kl_mvn(bottom.q.loc, bottom.q.covariance_matrix, bottom.p.mean, torch.diag_embed(bottom.p.variance))
    biased = terms.reconstruction - terms.kl_per_layer["z2"] - closed
    assert abs(biased.mean().item() - exact) > 20 * biased.std().item() / math.sqrt(R)


def test_two_layer_elbo_matches_its_closed_form_and_stays_below_log_px():
    """E_q[ELBO] = log p(x) - KL(q || p(z1, z2|x)), known exactly for a shifted q; the ELBO's KL2 is the
    closed form against N(0, I) and KL1 the closed form at the sampled z2."""
    torch.manual_seed(1)
    model, R = two_level(shift=0.3), 20_000
    x = model.marginal().sample((1,)).expand(R, -1)
    terms = objectives.elbo(model, x)
    assert list(terms.kl_per_layer) == ["z2", "z1"] and terms.kl_method == "analytic"
    exact = (model.log_px(x[:1]) - model.kl_q_posterior(x[:1])).item()
    se = terms.elbo.std().item() / math.sqrt(R)
    assert abs(terms.elbo.mean().item() - exact) < 4 * se
    assert terms.elbo.mean().item() < model.log_px(x[:1]).item() - 4 * se  # the gap is there, and positive
    # the KL of each layer, against an independent witness at the same samples
    layers = model.latents(x[:5], objectives.rsample)
    for layer in layers:
        witness = kl_mvn(layer.q.loc, layer.q.covariance_matrix, layer.p.mean, torch.diag_embed(layer.p.variance))
        mine = objectives.elbo(_Fixed(model, layers), x[:5]).kl_per_layer[layer.name]
        torch.testing.assert_close(mine, witness)


class _Fixed:
    """A model whose latents are fixed layers: the ELBO's terms at given samples."""

    def __init__(self, model, layers):
        self.model, self.layers = model, layers

    def latents(self, x, draw):
        return self.layers

    def log_px_given_z(self, layers, x):
        return self.model.log_px_given_z(layers, x)


def test_two_layer_iwae_approaches_log_px_as_k_grows():
    """The IWAE bound with joint weights over both layers rises with k towards log p(x) (paired over
    the same 400 repetitions: from k = 1 to 10 to 100 each step up by more than 4 standard errors of the
    paired difference), and at k = 1000 less than a tenth of the ELBO's gap is left."""
    torch.manual_seed(2)
    model, R = two_level(shift=0.3), 400
    x = model.marginal().sample((1,)).expand(R, -1)
    log_px = model.log_px(x[:1]).item()
    log_w = objectives.iwae_log_weights(model, x, 1000)  # (1000, R): the bounds below share their samples
    bounds = {k: torch.logsumexp(log_w[:k], 0) - math.log(k) for k in (1, 10, 100, 1000)}
    gaps = [log_px - bounds[k].mean().item() for k in bounds]
    for small, large in ((1, 10), (10, 100)):
        d = bounds[large] - bounds[small]
        assert d.mean().item() > 4 * d.std().item() / math.sqrt(R), (small, large)
    assert gaps[-1] > -4 * bounds[1000].std().item() / math.sqrt(R)  # still a lower bound
    assert gaps[-1] < 0.1 * gaps[0]  # most of the gap closed


# -- the hierarchical VAE ------------------------------------------------------------------------------
def hierarchical(**options):
    config = Config(family="hierarchical", hidden=(32,), latent_dim=4, top_hidden=(16,), top_latent_dim=3, **options)
    torch.manual_seed(0)
    return build(config, (1, 8, 8))


def test_hierarchical_kl_per_layer_against_torch():
    """KL2 = KL(q(z2|x) || N(0, I)) and KL1 = KL(q(z1|x, z2) || p(z1|z2)) at the drawn z2, each equal to
    torch.distributions.kl_divergence; the IWAE bound with k = 1 is the single-sample ELBO."""
    model = hierarchical()
    x = (torch.rand(7, 1, 8, 8) > 0.5).float()
    noise = contract.Noise(torch.Generator().manual_seed(0), 7)
    terms = objectives.elbo(model, x, noise)
    layers = model.latents(x, contract.Noise(torch.Generator().manual_seed(0), 7).sample)
    for layer in layers:
        q, p = layer.q.base_dist, layer.p.base_dist
        witness = kl_divergence(Normal(q.loc, q.scale), Normal(p.loc.expand_as(q.loc), p.scale.expand_as(q.scale)))
        torch.testing.assert_close(terms.kl_per_layer[layer.name], witness.sum(-1))
    assert terms.kl_per_dim.shape == (7, 3 + 4)
    torch.testing.assert_close(terms.kl_per_dim.sum(-1), terms.kl)
    single = objectives.iwae_bound(model, x, 1, contract.Noise(torch.Generator().manual_seed(0), 7))
    log_joint = terms.reconstruction + sum(
        layer.p.log_prob(layer.z) - layer.q.log_prob(layer.z) for layer in layers
    )  # the single-sample ELBO with Monte Carlo KLs at the same z
    torch.testing.assert_close(single, log_joint)


def test_bottom_up_hierarchical_kl_per_layer_against_torch():
    """--inference bottom-up: KL2 = KL(q(z2|z1) || N(0, I)) at the drawn z1 (torch.distributions), KL1 per
    dimension log q(z1_j|x) - log p(z1_j|z2) at the samples (torch's Normal); the IWAE bound with k = 1 is
    the single-sample ELBO at the same noise; evaluate's KL per layer is the plain Monte Carlo mean over joint draws."""
    model = hierarchical(inference="bottom-up")
    x = (torch.rand(7, 1, 8, 8) > 0.5).float()
    terms = objectives.elbo(model, x, contract.Noise(torch.Generator().manual_seed(0), 7))
    top, bottom = model.latents(x, contract.Noise(torch.Generator().manual_seed(0), 7).sample)
    q, p = top.q.base_dist, top.p.base_dist
    witness = kl_divergence(Normal(q.loc, q.scale), Normal(p.loc.expand_as(q.loc), p.scale.expand_as(q.scale)))
    torch.testing.assert_close(terms.kl_per_layer["z2"], witness.sum(-1))
    q, p = bottom.q.base_dist, bottom.p.base_dist
    per_dim = Normal(q.loc, q.scale).log_prob(bottom.z) - Normal(p.loc, p.scale).log_prob(bottom.z)
    torch.testing.assert_close(terms.kl_per_dim, torch.cat([witness, per_dim], -1))
    torch.testing.assert_close(terms.kl, terms.kl_per_dim.sum(-1))
    single = objectives.iwae_bound(model, x, 1, contract.Noise(torch.Generator().manual_seed(0), 7))
    log_joint = terms.reconstruction + sum(
        layer.p.log_prob(layer.z) - layer.q.log_prob(layer.z) for layer in (top, bottom)
    )
    torch.testing.assert_close(single, log_joint)  # the single-sample ELBO, every KL sampled at the same z
    kl = kl_per_example(model, x[:3], samples=4000, seed=3)
    torch.manual_seed(4)
    layers = model.latents(x[:3], lambda q: q.sample((4000,)))
    for layer in layers:
        r = layer.q.log_prob(layer.z) - layer.p.log_prob(layer.z)  # (4000, 3)
        se = (r.std(0).square() / 4000 + kl.std_error.square()).sqrt()
        assert ((kl.per_layer[layer.name] - r.mean(0)).abs() < 4 * se).all(), layer.name


def test_hierarchical_kl_of_the_lower_layer_averages_over_the_top():
    """evaluate's KL of z1, a closed form averaged over draws of z2, against the plain Monte Carlo mean of
    log q(z1|x, z2) - log p(z1|z2) over joint draws (within 4 combined standard errors per example)."""
    model = hierarchical()
    x = (torch.rand(5, 1, 8, 8) > 0.5).float()
    kl = kl_per_example(model, x, samples=4000, seed=3)
    torch.manual_seed(4)
    S = 4000
    layers = model.latents(x, lambda q: q.sample((S,)))
    ratio = {layer.name: layer.q.log_prob(layer.z) - layer.p.log_prob(layer.z) for layer in layers}  # (S, 5)
    for name, r in ratio.items():
        se = r.std(0) / math.sqrt(S)
        assert (kl.per_layer[name] - r.mean(0)).abs().max() < 4 * (se.square() + kl.std_error.square()).sqrt().max()
    torch.testing.assert_close(kl.value, kl.per_layer["z2"] + kl.per_layer["z1"])


def test_hierarchical_iwae_evaluation_is_above_the_elbo():
    """On a trained two-layer model, the IWAE estimate (k = 200, joint weights over both layers) exceeds
    the ELBO example by example on average: paired, by more than 4 standard errors."""
    model = hierarchical()
    x = (torch.rand(400, 1, 8, 8) > 0.5).float()
    vaelab.fit(model, x, epochs=3, batch_size=50, progress=False, binarize="none")
    record, per = evaluate(model.eval(), x[:150], iwae_k=200, pixels=64)
    d = per["log_likelihood"] - per["elbo"].double()
    assert d.mean().item() > 4 * d.std().item() / math.sqrt(150)
    assert set(record.kl_per_layer) == {"z2", "z1"}
    assert sum(record.active_units_per_layer.values()) == record.active_units
    assert record.kl_split["layer"] == "z2" and record.kl_split["agrees_with_kl_within_4_std_errors"]


def test_hierarchical_trains_evaluates_reports_and_resumes(tmp_path, capsys):
    out = tmp_path / "h"
    assert main(["train", *TWO, "--epochs", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hierarchical VAE (z2 of 2, z1 of 4 dims)" in text and "(z2 " in text
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"kl_z2", "kl_z1", "kl_z2_dim_1", "kl_z1_dim_3"} <= set(header) and "kl_dim_0" not in header
    rows = [
        dict(zip(header, line.split(","), strict=True)) for line in (out / "metrics.csv").read_text().splitlines()[1:]
    ]
    for row in rows:  # each layer's KL, and its dimensions', add up to the KL
        assert float(row["kl_z2"]) + float(row["kl_z1"]) == pytest.approx(float(row["kl"]), rel=1e-6, abs=1e-9)
        dims = sum(float(v) for k, v in row.items() if "_dim_" in k)
        assert dims == pytest.approx(float(row["kl"]), rel=1e-5, abs=1e-7)
    assert main(["train", *TWO, "--epochs", "3", "--out", str(out), "--resume"]) == 0
    resumed = vaelab.load_model(out)
    fresh = tmp_path / "fresh"
    assert main(["train", *TWO, "--epochs", "3", "--out", str(fresh)]) == 0
    for a, b in zip(resumed.state_dict().values(), vaelab.load_model(fresh).state_dict().values(), strict=True):
        assert torch.equal(a, b)  # resume is exact for two layers too
    assert main(["evaluate", str(out), "--iwae-k", "20", "--per-example", str(tmp_path / "per.csv")]) == 0
    record = json.loads((out / "evaluation.json").read_text())
    assert set(record["kl_per_layer"]) == {"z2", "z1"} and set(record["active_units_per_layer"]) == {"z2", "z1"}
    assert "kl_z2" in (tmp_path / "per.csv").read_text().splitlines()[0]
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "KL per latent dimension, every layer" in page and "latent layers z2 (2 dimensions)" in page


def test_bottom_up_inference_trains_evaluates_and_reports(tmp_path, capsys):
    """--inference bottom-up from the command line: recorded in config.toml; evaluate gives each layer's KL
    (z1's sampled: Monte Carlo) and takes no KL split of the top layer, whose q(z2|x) has no closed form; the
    report draws the run."""
    out = tmp_path / "b"
    assert main(["train", *TWO, "--inference", "bottom-up", "--epochs", "2", "--out", str(out)]) == 0
    assert 'inference = "bottom-up"' in (out / "config.toml").read_text()
    assert main(["evaluate", str(out), "--iwae-k", "20"]) == 0
    record = json.loads((out / "evaluation.json").read_text())
    assert set(record["kl_per_layer"]) == {"z2", "z1"} and record["kl_method"] == "monte_carlo"
    assert "kl_split" not in record and record["log_likelihood"] > record["elbo"] - 1.0
    assert main(["report", str(out)]) == 0
    assert "latent layers z2 (2 dimensions)" in (out / "report.html").read_text()


def test_a_collapsed_top_layer_is_reported_and_free_bits_counter_it(tmp_path, capsys):
    """A large beta makes the top layer's KL vanish: train, evaluate and the report say so. Free bits keep
    each dimension's KL from being pushed below its floor, and the top layer stays in use."""
    out = tmp_path / "collapsed"
    assert main(["train", *TWO, "--epochs", "4", "--beta", "8", "--out", str(out)]) == 0
    assert "layer z2 has collapsed" in capsys.readouterr().out
    assert main(["evaluate", str(out), "--iwae-k", "5"]) == 0
    assert "layer z2 has collapsed" in capsys.readouterr().out
    assert "z2" in json.loads((out / "evaluation.json").read_text())["collapsed_layers"]
    assert main(["report", str(out)]) == 0
    assert "layer z2 has collapsed" in (out / "report.html").read_text()
    held = tmp_path / "held"
    assert main(["train", *TWO, "--epochs", "4", "--beta", "8", "--free-bits", "0.5", "--out", str(held)]) == 0
    assert "has collapsed" not in capsys.readouterr().out
    collapsed, kept = vaelab_kl_of(out)["z2"], vaelab_kl_of(held)["z2"]
    assert kept > objectives.COLLAPSED_KL and kept > 5 * collapsed, (collapsed, kept)


def vaelab_kl_of(run) -> dict:
    """The test set's KL of each layer of a run, from vaelab evaluate's record."""
    assert main(["evaluate", str(run), "--iwae-k", "0"]) == 0
    return json.loads((run / "evaluation.json").read_text())["kl_per_layer"]


def test_the_burda_two_layer_presets():
    """784-[200-200]-100-[100-100]-50 tanh, as in Burda et al. 2015's two-layer models."""
    for name in ("burda2015-vae-2layer", "burda2015-iwae-2layer-k50"):
        config = resolve(None, {}, name)
        assert (config.family, config.hidden, config.latent_dim) == ("hierarchical", (200, 200), 100)
        assert (config.top_hidden, config.top_latent_dim, config.activation) == ((100, 100), 50, "tanh")
    assert PRESETS["burda2015-iwae-2layer-k50"]["k"] == 50
    model = build(resolve(None, {}, "burda2015-vae-2layer"), (1, 28, 28))
    shapes = [tuple(p.shape) for name, p in model.named_parameters() if "bottom_up" in name and "weight" in name]
    assert shapes == [(200, 784), (200, 200), (100, 200), (100, 100)]


# -- the flow posterior ---------------------------------------------------------------------------------
def test_iaf_log_density_by_the_change_of_variables():
    """log q(z) of the flow: at its own samples (one pass) and at other points (through the inverse), against
    the base density minus log|det J| with J from autograd, in float64."""
    torch.manual_seed(0)
    D = 3
    posterior = IAFPosterior(D, steps=3).double()
    for made in posterior.steps:  # far from the identity it starts at
        torch.nn.init.normal_(made.w_out.weight, std=0.7)
    h = torch.randn(2, 3 * D, dtype=torch.float64)
    q = posterior(h)
    z = q.rsample()
    fresh = posterior(h).log_prob(z.clone())  # not the cached sample: needs the inverse
    torch.testing.assert_close(q.log_prob(z), fresh)
    for i in range(2):  # the witness: z = f(z0) one example at a time, log q(z) = log N(z0) - log|det df/dz0|
        z0 = z[i].clone()
        flow = posterior(h[i : i + 1])
        for t in reversed(flow.transforms):
            z0 = t.inv(z0[None])[0]

        def f(v, flow=flow):
            for t in flow.transforms:
                v = t(v[None])[0]
            return v

        J = torch.autograd.functional.jacobian(f, z0)
        base = flow.base_dist.log_prob(z0[None])[0]
        witness = base - torch.linalg.slogdet(J)[1]
        torch.testing.assert_close(fresh[i], witness)


def test_a_single_iaf_step_is_triangular():
    """Each step's Jacobian is triangular (autoregressive), its diagonal the gate g; steps alternate the order."""
    torch.manual_seed(1)
    posterior = IAFPosterior(4, steps=2).double()
    for made in posterior.steps:
        torch.nn.init.normal_(made.w_out.weight, std=0.7)
    q = posterior(torch.randn(1, 12, dtype=torch.float64))
    z = torch.randn(4, dtype=torch.float64)
    J0 = torch.autograd.functional.jacobian(lambda v: q.transforms[0](v[None])[0], z)
    J1 = torch.autograd.functional.jacobian(lambda v: q.transforms[1](v[None])[0], z)
    assert torch.equal(J0.triu(1), torch.zeros_like(J0)) and not torch.equal(J0.tril(-1), torch.zeros_like(J0))
    assert torch.equal(J1.tril(-1), torch.zeros_like(J1)) and not torch.equal(J1.triu(1), torch.zeros_like(J1))


def test_a_flow_closes_the_mean_field_gap():
    """On the linear-Gaussian model, fit q(z|x) to one x by maximising the ELBO: the best diagonal Gaussian
    stops at the mean-field gap KL(q_mf || p(z|x)) (closed form), while the flow's KL(q || p(z|x)),
    estimated with 20,000 samples, ends more than 4 standard errors below it."""
    torch.manual_seed(0)
    F64 = torch.float64
    W = torch.randn(5, 1, dtype=F64) @ torch.ones(1, 2, dtype=F64) + 0.3 * torch.randn(5, 2, dtype=F64)
    lg = LinearGaussian(W, torch.zeros(5, dtype=F64), 0.3)  # nearly parallel columns: a correlated posterior
    x = lg.marginal().sample()
    post = lg.posterior(x)
    mean_field_gap = mean_field_kl(post).item()
    assert mean_field_gap > 0.3  # something to close
    posterior = IAFPosterior(2, steps=2).double()
    h = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([h, *posterior.parameters()], lr=0.02)
    for _ in range(1500):
        q = posterior(h)
        z = q.rsample((32,))
        neg_elbo = -(lg.decode(z).log_prob(x) + lg.prior().log_prob(z) - q.log_prob(z)).mean()
        optimiser.zero_grad()
        neg_elbo.backward()
        optimiser.step()
    with torch.no_grad():
        q = posterior(h)
        z = q.sample((20_000,))
        log_ratio = q.log_prob(z) - post.log_prob(z)  # KL(q || p(z|x)) = E_q[log q - log p(z|x)]
    kl, se = log_ratio.mean().item(), log_ratio.std().item() / math.sqrt(20_000)
    assert kl + 4 * se < mean_field_gap, (kl, se, mean_field_gap)


def test_the_flow_trains_evaluates_and_reports(tmp_path, capsys):
    out = tmp_path / "flow"
    args = [
        "--posterior",
        "iaf",
        "--flow-steps",
        "2",
        "--hidden",
        "32",
        "--latent-dim",
        "3",
        "--lr-schedule",
        "constant",
    ]
    args += ["--epochs", "2"]
    assert main(["train", *args, "--out", str(out)]) == 0
    assert "KL (Monte Carlo)" in capsys.readouterr().out
    rows = (out / "metrics.csv").read_text().splitlines()
    assert all(",monte_carlo," in row for row in rows[1:])
    model = vaelab.load_model(out)
    assert len(model.posterior.steps) == 2
    assert main(["evaluate", str(out), "--iwae-k", "50"]) == 0
    record = json.loads((out / "evaluation.json").read_text())
    assert record["kl_method"] == "monte_carlo" and record["kl_std_error"] > 0
    assert "mutual_information" not in record  # the KL split needs a Gaussian posterior
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "gap log p(x) − ELBO" in page and "flow posterior has no closed-form KL" in page
    from vaelab.inspection import open_run

    assert torch.equal(open_run(out).mu, open_run(out).mu)  # a flow's moments are drawn, from a seeded RNG
    # resume is exact: the flow's own parameters are in the checkpoint like the networks'
    assert main(["train", *args[:-1], "3", "--out", str(out), "--resume"]) == 0
    assert main(["train", *args[:-1], "3", "--out", str(tmp_path / "fresh")]) == 0
    resumed, fresh = vaelab.load_model(out).state_dict(), vaelab.load_model(tmp_path / "fresh").state_dict()
    assert all(torch.equal(resumed[k], fresh[k]) for k in fresh)
    diagonal = tmp_path / "diagonal"  # the gap beside a diagonal-Gaussian run on the same data
    assert main(["train", *args[4:], "--out", str(diagonal)]) == 0
    assert main(["evaluate", str(diagonal), "--iwae-k", "50"]) == 0
    assert main(["evaluate", str(out), "--iwae-k", "50"]) == 0
    assert main(["report", str(out), "--compare", str(diagonal)]) == 0
    page = (out / "report.html").read_text()
    assert "<h2>Compared</h2>" in page and "vae, diagonal posterior" in page and "vae, iaf posterior" in page


# -- the conditional VAE --------------------------------------------------------------------------------
COND = [
    "--data",
    "digits",
    "--lr-schedule",
    "constant",
    "--family",
    "conditional",
    "--hidden",
    "64",
    "--latent-dim",
    "4",
]


def test_conditional_kl_is_the_same_closed_form_given_y():
    """KL(q(z|x, y) || N(0, I)) is eq. 7's diagonal form at mu(x, y), sigma(x, y): against torch, and the
    labels change q (the encoder is told y)."""
    torch.manual_seed(0)
    model = build(Config(family="conditional", classes=10, hidden=(32,), latent_dim=3), (1, 8, 8))
    x = (torch.rand(6, 1, 8, 8) > 0.5).float()
    y = torch.arange(6)
    terms = objectives.elbo(contract.given(model, y), x)
    q = model.encode(x, y).base_dist
    witness = kl_divergence(Normal(q.loc, q.scale), Normal(torch.zeros(3), torch.ones(3))).sum(-1)
    torch.testing.assert_close(terms.kl, witness)
    assert not torch.allclose(model.encode(x, y).mean, model.encode(x, (y + 1) % 10).mean)
    k = objectives.iwae_log_weights(contract.given(model, y), x, 7)  # n samples decode with their labels
    assert k.shape == (7, 6) and torch.isfinite(k).all()


def test_conditional_trains_and_uses_its_labels(tmp_path, capsys):
    """From the command line on the digits' labels: the resolved config knows the classes, evaluate and
    report run, and the trained model scores test images higher with their own labels than with
    others': log p(x|y) - log p(x|y'), paired, more than 4 standard errors above 0."""
    from vaelab.checkpoint import load_run
    from vaelab.data import labels_for, prepare_data
    from vaelab.evaluation import iwae_log_likelihood

    out = tmp_path / "cvae"
    assert main(["train", *COND, "--epochs", "12", "--out", str(out)]) == 0
    assert "conditional mlp VAE (10 classes)" in capsys.readouterr().out
    assert "classes = 10" in (out / "config.toml").read_text()
    model, config = load_run(out)
    splits, _, _, test_x, _ = prepare_data(config, "cpu")
    y = labels_for(config, splits.test, splits.name)
    torch.manual_seed(0)
    d = iwae_log_likelihood(model, Examples(test_x, y), 20) - iwae_log_likelihood(
        model, Examples(test_x, (y + 1) % 10), 20
    )
    assert d.mean().item() > 4 * d.std().item() / math.sqrt(len(d))
    assert main(["evaluate", str(out), "--iwae-k", "10"]) == 0
    assert "log p(x|y), IWAE k=10" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert "Samples from the prior, per class" in (out / "report.html").read_text()
    assert main(["train", *COND, "--epochs", "13", "--out", str(out), "--resume"]) == 0
    other = tmp_path / "cvae-lr"  # compared: a conditional model's bound is on log p(x|y)
    assert main(["train", *COND, "--epochs", "1", "--lr", "1e-3", "--out", str(other)]) == 0
    assert main(["evaluate", str(other), "--iwae-k", "10"]) == 0
    assert main(["evaluate", str(out), "--iwae-k", "10"]) == 0
    assert main(["report", str(out), "--compare", str(other)]) == 0
    compared = (out / "report.html").read_text().split("<h2>Compared</h2>")[1]
    assert "log p(x|y), IWAE" in compared and "log p(x), IWAE" not in compared


def test_conditional_from_python():
    x = (torch.rand(200, 1, 8, 8) > 0.5).float()
    y = torch.randint(0, 3, (200,))
    model = build(Config(family="conditional", classes=3, hidden=(16,), latent_dim=2), (1, 8, 8))
    state = vaelab.fit(model, Examples(x, y), Examples(x[:50], y[:50]), epochs=2, batch_size=50, progress=False)
    assert math.isfinite(state.history[-1].elbo)


def test_the_page_of_a_conditional_model_takes_a_label(tmp_path):
    from fastapi.testclient import TestClient

    from vaelab.web.app import create_app

    out = tmp_path / "cvae"
    assert main(["train", *COND, "--epochs", "1", "--out", str(out)]) == 0
    client = TestClient(create_app(out), base_url="http://127.0.0.1")
    assert client.get("/api/model").json()["classes"] == 10
    z = ",".join(["0"] * 4)
    assert client.get(f"/api/decode?z={z}").status_code == 422  # which class?
    assert client.get(f"/api/decode?z={z}&label=10").status_code == 422
    a, b = (client.get(f"/api/decode?z={z}&label={c}").json()["image"] for c in (1, 7))
    assert a != b  # the label changes the picture
    assert client.get("/api/test/3").status_code == 200
    png = pngs.grey_png(8, 8)
    assert client.post("/api/inspect", files={"file": ("x.png", png)}).status_code == 422  # no label
    answer = client.post("/api/inspect", files={"file": ("x.png", png)}, data={"label": "4"})
    assert answer.status_code == 200 and answer.json()["kl_total"] > 0


def test_a_run_written_with_the_conditional_flag_reads_as_the_conditional_family():
    """Before the conditional VAE was an entry of parts.FAMILIES it was a flag, ``conditional = true`` in
    config.toml and in a checkpoint's config: both read as ``family = "conditional"``; the flag's false
    is dropped; a file that sets it beside another family is refused rather than read as one of them."""
    from vaelab.checkpoint import config_from_dict
    from vaelab.config import parse_toml
    from vaelab.errors import UserError

    assert parse_toml("conditional = true\nlatent_dim = 4\n", "t") == {"latent_dim": 4, "family": "conditional"}
    assert parse_toml("conditional = false\n", "t") == {}
    config = config_from_dict({"conditional": True, "classes": 10}, "a checkpoint")
    assert config.family == "conditional" and config.uses_labels and parts.FAMILIES[config.family].labels
    with pytest.raises(UserError, match="sets both conditional and family 'hierarchical'"):
        parse_toml('conditional = true\nfamily = "hierarchical"\n', "t")
