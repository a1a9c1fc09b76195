"""Evaluation metrics against exact values and independent implementations."""

import json
import math

import pytest
import torch

from vaelab import distributions as dist
from vaelab.cli import main
from vaelab.config import Config
from vaelab.contract import OneLayer
from vaelab.evaluation import activity, decompose_kl, evaluate, iwae_log_likelihood
from vaelab.linear_gaussian import LinearGaussian
from vaelab.models import build
from vaelab.training import fit

F64 = torch.float64


class ExactModel:
    """The linear-Gaussian model with a chosen q: the exact posterior, or a shifted diagonal one
    (encode / decode / prior; ``OneLayer`` wraps it into the objectives' contract)."""

    def __init__(self, lg: LinearGaussian, exact: bool):
        self.lg, self.exact = lg, exact

    def encode(self, x):
        post = self.lg.posterior(x)
        if self.exact:
            return post
        return dist.diag_normal(post.mean + 0.3, post.covariance_matrix.diagonal(dim1=-2, dim2=-1).log() + 0.4)

    def decode(self, z):
        return self.lg.decode(z)

    def prior(self):
        return self.lg.prior()


@pytest.fixture
def lg_data():
    lg = LinearGaussian.random(6, 2, seed=1)
    x = lg.marginal().sample((20,))
    return lg, x


def test_iwae_with_the_exact_posterior_is_log_px_for_any_k(lg_data):
    lg, x = lg_data
    for k, chunk in ((1, 3), (7, 3), (7, None), (5000, None)):  # None: sized to the cache, 2^21 // (8 * 6)
        ll = iwae_log_likelihood(OneLayer(ExactModel(lg, exact=True)), x, k, batch_size=8, chunk=chunk)
        torch.testing.assert_close(ll, lg.log_px(x), atol=1e-4, rtol=0)


def test_iwae_keeps_no_graph_whoever_calls_it():
    """An estimate, not a loss: called with gradients on (a benchmark, a notebook) it keeps no autograd
    graph, whose decoder outputs for every chunk and batch would fill the memory on 10,000 images."""
    torch.manual_seed(0)
    model = build(Config(hidden=(8,), latent_dim=2), (1, 4, 4))
    x = (torch.rand(30, 1, 4, 4) > 0.5).float()
    assert torch.is_grad_enabled() and all(p.requires_grad for p in model.parameters())
    ll = iwae_log_likelihood(model, x, 50, batch_size=10, chunk=5)
    assert ll.grad_fn is None and not ll.requires_grad


def test_iwae_approaches_log_px_from_below(lg_data):
    lg, x = lg_data
    torch.manual_seed(0)
    model = ExactModel(lg, exact=False)
    log_px = lg.log_px(x).mean().item()
    estimates = {k: iwae_log_likelihood(OneLayer(model), x, k, chunk=64).mean().item() for k in (1, 10, 1000)}
    assert estimates[1] < estimates[10] < estimates[1000] <= log_px + 1e-3
    assert log_px - estimates[1000] < 0.1 * (log_px - estimates[1])  # most of the gap closed


def independent_iwae(model, x, k, seed):
    """A plain, unchunked IWAE written from the definition, for comparison."""
    torch.manual_seed(seed)
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        q = model.encode(xi)
        z = q.sample((k,))[:, 0]  # (k, D)
        log_px_z = model.decode(z).log_prob(xi.expand(k, *xi.shape[1:]))
        log_w = log_px_z + model.prior().log_prob(z) - q.log_prob(z[:, None])[:, 0]
        out.append(torch.logsumexp(log_w, 0) - math.log(k))
    return torch.stack(out)


def test_iwae_matches_an_independent_implementation():
    torch.manual_seed(0)
    model = build(Config(hidden=(32,), latent_dim=3), (1, 8, 8))
    x = (torch.rand(200, 1, 8, 8) > 0.5).float()
    fit(model, x, epochs=2, batch_size=50, progress=False)
    model.eval()
    x = x[:5]
    torch.manual_seed(3)
    ours = torch.cat([iwae_log_likelihood(model, x[i : i + 1], 200, batch_size=1, chunk=200) for i in range(5)])
    ref = independent_iwae(model, x, 200, seed=3)
    torch.testing.assert_close(ours, ref.double(), atol=1e-4, rtol=0)


def test_decoder_ignoring_dimensions_makes_them_inactive():
    torch.manual_seed(0)
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images / 16.0, dtype=torch.float32)[:, None]
    model = build(Config(hidden=(64,), latent_dim=4), (1, 8, 8))
    first = model.decoder.net[0]
    mask = torch.ones_like(first.weight)
    mask[:, 2:] = 0  # the decoder never sees z_2, z_3
    with torch.no_grad():
        first.weight.mul_(mask)
    first.weight.register_hook(lambda g: g * mask)
    fit(model, x, epochs=15, batch_size=64, binarize="dynamic", progress=False)
    model.eval()
    from vaelab.evaluation import posterior_params

    mu, _, _ = posterior_params(model, (x > 0.5).float())
    act = activity(mu)
    assert (act[2:] < 0.01).all(), act
    assert (act[:2] > 0.01).all(), act


def test_kl_split_matches_closed_form_mutual_information():
    """x ~ N(0, I_2), q(z|x) = N(a x, s^2 I): q(z) = N(0, (a^2 + s^2) I), I(x; z) = log((a^2 + s^2) / s^2)."""
    torch.manual_seed(0)
    N, a, s = 4000, 1.0, 0.5
    x = torch.randn(N, 2)
    mu, log_var = a * x, torch.full((N, 2), math.log(s * s))

    class Prior:
        def prior(self):
            return dist.standard_normal(2)

    out, single = decompose_kl(Prior(), mu, log_var)
    assert single.shape == (N,)
    exact_mi = math.log((a * a + s * s) / (s * s))
    assert out.mutual_information == pytest.approx(exact_mi, abs=0.05)
    # marginal KL: KL(N(0, 1.25 I) || N(0, I)) in closed form
    exact_marginal = 2 * 0.5 * (1.25 - 1 - math.log(1.25))
    assert out.marginal_kl == pytest.approx(exact_marginal, abs=0.05)
    assert out.mutual_information + out.marginal_kl == pytest.approx(out.kl_monte_carlo, abs=1e-4)


def test_evaluate_record_adds_up():
    torch.manual_seed(0)
    model = build(Config(hidden=(32,), latent_dim=3), (1, 8, 8))
    x = (torch.rand(300, 1, 8, 8) > 0.5).float()
    fit(model, x, epochs=1, batch_size=50, progress=False)
    record, per = evaluate(model, x, iwae_k=50, pixels=64)
    assert record.kl_split["adds_up"] and record.kl_split["agrees_with_kl_within_4_std_errors"]
    # paired on the same examples: IWAE-k >= ELBO in expectation for each x, so the mean of
    # log p_k(x) - ELBO(x) is not below -4 of its standard errors (a false alarm about 3e-5 of the
    # time, one-sided, normal approximation); in fact it is well above 0
    gap = per["log_likelihood"] - per["elbo"].double()
    assert gap.mean() >= -4 * gap.std() / math.sqrt(len(gap))
    assert sum(record.kl_per_dim) == pytest.approx(record.kl, rel=1e-4)
    assert per["elbo"].shape == (300,)
    # MI + TC + dimension-wise KL add up to the single-sample Monte Carlo KL, and the last two to the marginal KL
    parts = record.mutual_information + record.total_correlation + record.dimension_wise_kl
    assert parts == pytest.approx(record.kl_split["kl_monte_carlo"], abs=1e-4)
    assert record.total_correlation + record.dimension_wise_kl == pytest.approx(record.marginal_kl, abs=1e-4)
    assert sum(record.dimension_wise_kl_per_dim) == pytest.approx(record.dimension_wise_kl, abs=1e-4)


def test_kl_split_against_the_linear_encoder_oracle():
    """`evaluate`'s split on posteriors from the exact oracle of tests/test_decomposition.py:
    4 standard errors plus 0.02 nats for the full-data estimator's bias (about 1e-4 false alarms)."""
    from vaelab.linear_gaussian import LinearEncoderOracle

    oracle = LinearEncoderOracle.random(4, 3, seed=1)
    torch.manual_seed(0)
    mu, log_var = oracle.posterior_params(oracle.data().sample((4000,)))

    class Prior:
        def prior(self):
            return dist.standard_normal(3, dtype=torch.float64)

    out, _ = decompose_kl(Prior(), mu, log_var)
    for key, exact in (
        ("mutual_information", oracle.mutual_information),
        ("total_correlation", oracle.total_correlation),
        ("dimension_wise_kl", oracle.dimension_wise_kl_per_dim.sum().item()),
    ):
        assert abs(getattr(out, key) - exact) <= 4 * getattr(out, f"{key}_std_error") + 0.02, (key, exact)


def test_the_split_without_a_factorising_prior_is_mi_and_marginal_kl():
    torch.manual_seed(0)
    model = build(Config(hidden=(16,), latent_dim=2, prior="mixture", prior_components=3), (1, 8, 8))
    mu, log_var = torch.randn(200, 2), torch.randn(200, 2) * 0.1
    out, single = decompose_kl(model, mu, log_var)
    assert out.total_correlation is None and out.dimension_wise_kl is None and out.adds_up
    assert out.mutual_information + out.marginal_kl == pytest.approx(single.mean().item(), abs=1e-4)


def test_evaluate_command_on_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--hidden", "32", "--latent-dim", "3", "--epochs", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    js, pe = tmp_path / "e.json", tmp_path / "pe.csv"
    assert main(["evaluate", str(out), "--iwae-k", "20", "--json", str(js), "--per-example", str(pe)]) == 0
    printed = capsys.readouterr().out
    assert "mutual information" in printed and "total correlation" in printed and "IWAE k=20" in printed
    record = json.loads(js.read_text())
    for key in (
        "elbo",
        "reconstruction",
        "kl",
        "kl_per_dim",
        "bits_per_dim",
        "log_likelihood",
        "log_likelihood_std_error",
        "iwae_k",
        "active_units",
        "mutual_information",
        "marginal_kl",
        "total_correlation",
        "dimension_wise_kl",
        "dimension_wise_kl_per_dim",
        "kl_estimator",
        "data",
        "split",
        "binarize",
        "seed",
    ):
        assert key in record, key
    assert (out / "evaluation.json").exists()
    lines = pe.read_text().splitlines()
    assert (
        lines[0].startswith("index,elbo,reconstruction,kl,log_likelihood,kl_dim_0")
        and len(lines) == 1 + record["examples"]
    )
    assert main(["evaluate", str(tmp_path / "missing")]) == 2


def test_evaluate_takes_the_kl_apart_on_28x28_images(tmp_path, mnist_dir, capsys):
    """An MNIST-size run (the IDX fixture, 28 x 28): the printed MI, TC and dimension-wise KL add up."""
    out = tmp_path / "run"
    args = ["--data", "mnist", "--data-dir", str(mnist_dir), "--hidden", "64", "--latent-dim", "4", "--epochs", "2"]
    assert main(["train", *args, "--out", str(out)]) == 0
    js = tmp_path / "e.json"
    assert main(["evaluate", str(out), "--iwae-k", "0", "--json", str(js)]) == 0
    r = json.loads(js.read_text())
    total = r["mutual_information"] + r["total_correlation"] + r["dimension_wise_kl"]
    assert total == pytest.approx(r["kl_split"]["kl_monte_carlo"], abs=1e-3)
    assert r["kl_split"]["agrees_with_kl_within_4_std_errors"]


def test_the_kl_split_has_its_own_draws_and_leaves_the_caller_alone(trained_run):
    """The MI / TC / dimension-wise KL come from their own stream: the same for any --iwae-k (they were
    drawn after the IWAE samples); evaluate leaves the caller's RNG state and the model's mode as they were."""
    from vaelab.checkpoint import load_run
    from vaelab.data import prepare_data

    model, config = load_run(trained_run)
    _, _, _, test_x, pixels = prepare_data(config, "cpu")
    model.train()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    few, _ = evaluate(model, test_x, iwae_k=10, pixels=pixels)
    assert torch.equal(torch.get_rng_state(), before) and model.training
    many, _ = evaluate(model, test_x, iwae_k=200, pixels=pixels)
    assert few.log_likelihood != many.log_likelihood  # the IWAE estimates differ ...
    for name in ("mutual_information", "marginal_kl", "total_correlation", "dimension_wise_kl", "activity"):
        assert getattr(few, name) == getattr(many, name), name  # ... the split does not
    other, _ = evaluate(model, test_x, iwae_k=10, pixels=pixels, seed=1)
    assert other.mutual_information != few.mutual_information  # and it is drawn: --seed moves it


def test_the_rows_say_the_mi_ceiling_and_the_per_image_kl(trained_run):
    """The full-data MI estimate on N examples cannot exceed log N (the entropy of the empirical data
    distribution): the row says so, and says when the estimate has reached it. The per-image KL's
    quantiles are those of the per-example KL that evaluate returns."""
    from dataclasses import replace

    from vaelab.checkpoint import load_run
    from vaelab.data import prepare_data
    from vaelab.evaluation import evaluation_rows, format_table

    model, config = load_run(trained_run)
    _, _, _, test_x, pixels = prepare_data(config, "cpu")
    record, per = evaluate(model, test_x, iwae_k=0, pixels=pixels)
    q = record.kl_per_image_quantiles
    assert q["50%"] == pytest.approx(per["kl"].double().median().item(), abs=1e-3)
    assert q["10%"] <= q["50%"] <= q["90%"]
    ceiling = math.log(record.examples)
    notes = {row.name: row.note for row in evaluation_rows(record)}
    assert notes["mutual information I(x; z)"] == f"at most log N = {ceiling:.2f} on N = {record.examples} examples"
    saturated = replace(record, mutual_information=ceiling - 0.05)
    assert "at its ceiling" in {r.name: r.note for r in evaluation_rows(saturated)}["mutual information I(x; z)"]
    assert "at its ceiling log N" in format_table(saturated)


def test_one_layer_is_a_one_entry_record_of_layers():
    """The KL per example names its layers whether there is one or several: a one-layer model's record has
    one entry, its layer's KL, the total itself; it is not `layered`."""
    from vaelab.evaluation import kl_per_example

    model = build(Config(hidden=(16,), latent_dim=3), (1, 8, 8))
    kl = kl_per_example(model, torch.rand(10, 1, 8, 8))
    assert list(kl.per_layer) == ["z"] and torch.equal(kl.per_layer["z"], kl.value) and not kl.layered
    assert not kl[2:4].layered and torch.equal(kl[2:4].per_layer["z"], kl.value[2:4])


def test_an_evaluation_reads_the_examples_once_and_the_iwae_bound_once_more(monkeypatch):
    """`evaluate` of a Gaussian model: one pass for every per-example measure (the ELBO's terms, the KL,
    the posteriors, the layers' means), one more for the IWAE bound; no other loop over the examples."""
    from vaelab import contract

    passes = []
    original = contract.Examples.batches

    def counted(self, model, size):
        passes.append(size)
        return original(self, model, size)

    monkeypatch.setattr(contract.Examples, "batches", counted)
    for family in ("vae", "hierarchical"):
        model = build(Config(family=family, hidden=(16,), latent_dim=3), (1, 8, 8))
        passes.clear()
        evaluate(model, torch.rand(40, 1, 8, 8).bernoulli(), iwae_k=0)
        assert len(passes) == 1, family
        passes.clear()
        evaluate(model, torch.rand(40, 1, 8, 8).bernoulli(), iwae_k=3)
        assert len(passes) == 2, family
