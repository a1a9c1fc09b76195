"""The table of parts: adding a part is one entry, and every rule reads the part's facts."""

import pytest
import torch

import vaelab
from vaelab import contract, parts
from vaelab.cli import main
from vaelab.config import Config
from vaelab.distributions import gaussian
from vaelab.errors import UserError
from vaelab.models import PixelLikelihood, build


class UnitGaussian(PixelLikelihood):
    """A toy likelihood written by a user: N(decoder output, 1) per pixel."""

    def forward(self, out):
        return gaussian(out, torch.zeros(()), 3)


@pytest.fixture
def toy():
    """Register the toy likelihood for one test: this entry is all it takes."""
    part = parts.LIKELIHOODS.register(parts.Likelihood("toy", "N(mean, 1) per pixel", UnitGaussian))
    yield part
    parts.LIKELIHOODS.unregister(part.name)


def test_a_new_likelihood_is_one_entry(toy, tmp_path, capsys):
    model = vaelab.build_model(Config(likelihood="toy", hidden=(16,), latent_dim=2), (1, 8, 8))
    state = vaelab.fit(model, torch.rand(64, 1, 8, 8), epochs=1, batch_size=32, binarize="none", progress=False)
    assert torch.isfinite(torch.tensor(state.history[-1].elbo))
    out = tmp_path / "run"  # and from the command line, through the run directory and its reload
    assert main(["train", "--likelihood", "toy", "--binarize", "none", "--hidden", "16", "--out", str(out)]) == 0
    assert 'likelihood = "toy"' in (out / "config.toml").read_text()
    assert "bits/dim" not in capsys.readouterr().out  # a density, not a mass function: no bits/dim
    assert isinstance(vaelab.load_model(out).likelihood, UnitGaussian)


def test_the_rules_read_the_facts(tmp_path, capsys):
    part = parts.LIKELIHOODS.register(parts.Likelihood("toy-binary", "", UnitGaussian, binary_only=True))
    try:
        code = main(["train", "--likelihood", "toy-binary", "--binarize", "none", "--out", str(tmp_path / "r")])
        assert code == 2 and "toy-binary likelihood is only a likelihood for binary data" in capsys.readouterr().err
    finally:
        parts.LIKELIHOODS.unregister(part.name)
    with pytest.raises(UserError, match="the mixture prior does not factorise"):
        Config(prior="mixture", free_bits=0.5)


def test_choices_come_from_the_tables(capsys):
    with pytest.raises(UserError, match="likelihood = 'nope' is not one of bernoulli, continuous-bernoulli"):
        Config(likelihood="nope")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for table in (parts.LIKELIHOODS, parts.PRIORS, parts.POSTERIORS, parts.OBJECTIVES):
        for part in table:
            assert part.name in text
    with pytest.raises(UserError, match="unknown prior 'flat'; choose one of normal, mixture, vamp"):
        parts.PRIORS["flat"]
    with pytest.raises(ValueError, match="registered already"):
        parts.PRIORS.register(parts.Prior("normal", "", "x:y"))


def test_every_registered_constructor_imports():
    for table in (parts.LIKELIHOODS, parts.PRIORS, parts.POSTERIORS, parts.OBJECTIVES, parts.ACTIVATIONS):
        for part in table:
            assert callable(part.constructor()), part.name
    for arch in parts.ARCHITECTURES:
        assert callable(arch.constructor()) and callable(arch.decoder_constructor())
    for source in parts.DATASETS:
        assert callable(source.constructor())


def full_covariance(h, latent_dim):
    """A toy posterior family: q(z|x) = N(mu, L L^T) with L lower-triangular, positive diagonal."""
    D = int((-3 + (9 + 8 * h.shape[-1]) ** 0.5) / 2)  # h holds D + D (D + 1) / 2 numbers
    mu, flat = h[:, :D], h[:, D:]
    L = torch.zeros(h.shape[0], D, D)
    rows, cols = torch.tril_indices(D, D)
    L[:, rows, cols] = flat
    L = L.tril(-1) + torch.diag_embed(torch.nn.functional.softplus(L.diagonal(dim1=-2, dim2=-1)) + 1e-3)
    return torch.distributions.MultivariateNormal(mu, scale_tril=L)


def test_a_posterior_that_is_not_diagonal_trains_through_the_same_loop():
    """Before the contract, explicit noise needed a diagonal Gaussian, so fit failed for any other q."""
    part = parts.POSTERIORS.register(
        parts.Posterior(
            "toy-full", "", full_covariance, outputs=lambda c: c.latent_dim * (c.latent_dim + 3) // 2, factorises=False
        )
    )
    try:
        model = vaelab.build_model(Config(posterior="toy-full", hidden=(16,), latent_dim=3), (1, 8, 8))
        x = (torch.rand(64, 1, 8, 8) > 0.5).float()
        state = vaelab.fit(model, x, x[:32], epochs=2, batch_size=32, progress=False)
    finally:
        parts.POSTERIORS.unregister(part.name)
    assert all(torch.isfinite(torch.tensor(r.elbo)) for r in state.history)
    assert isinstance(model.encode(x[:2]), torch.distributions.MultivariateNormal)


def test_reparametrize_is_rsample_with_the_noise_made_explicit():
    from vaelab.distributions import diag_normal, reparametrize

    g = torch.Generator().manual_seed(0)
    mu, log_var = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    L = torch.randn(4, 3, 3, generator=g).tril(-1) + torch.diag_embed(torch.rand(4, 3, generator=g) + 0.5)
    flow = torch.distributions.TransformedDistribution(
        diag_normal(mu, log_var), [torch.distributions.transforms.TanhTransform()]
    )
    for q in (diag_normal(mu, log_var), torch.distributions.MultivariateNormal(mu, scale_tril=L), flow):
        torch.manual_seed(1)
        expected = q.rsample()
        torch.manual_seed(1)
        torch.testing.assert_close(reparametrize(q, torch.randn(4, 3)), expected, rtol=0, atol=0)


def test_the_config_lists_the_minibatch_estimators_that_exist():
    """config.py cannot import torch (``vaelab --help`` stays light), so it names the estimators itself."""
    from vaelab.config import TC_ESTIMATORS
    from vaelab.decomposition import MINIBATCH_ESTIMATORS

    assert set(TC_ESTIMATORS) == set(MINIBATCH_ESTIMATORS)


def test_elbo_terms_carry_the_kl_of_each_layer():
    model = vaelab.build_model(Config(hidden=(16,), latent_dim=3), (1, 8, 8))
    terms = vaelab.elbo(model, (torch.rand(5, 1, 8, 8) > 0.5).float())
    assert list(terms.kl_per_layer) == ["z"]
    assert torch.equal(terms.kl_per_layer["z"], terms.kl)
    torch.testing.assert_close(terms.kl_per_dim.sum(-1), terms.kl)


def test_the_priors_facts_match_what_they_compute():
    """Each prior's facts, against the KL dispatch and its per-dimension split on a built model."""
    from vaelab.kl import kl_closed_form

    for part in parts.PRIORS:
        components = {"prior_components": 2} if "prior_components" in part.reads else {}
        components |= {"posterior": "categorical"} if part.discrete else {}  # a prior over categories
        model = vaelab.build_model(Config(hidden=(16,), latent_dim=3, prior=part.name, **components), (1, 8, 8))
        closed = kl_closed_form(model.encode(torch.rand(4, 1, 8, 8)), model.prior())
        assert (closed is not None) == part.closed_form_kl, part.name
        assert (closed is not None and closed.per_dim is not None) == part.factorises, part.name


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"posterior": "full"},
        {"posterior": "iaf"},
        {"posterior": "categorical"},
        {"posterior": "vq"},
        {"family": "hierarchical"},
        {"family": "hierarchical", "inference": "bottom-up"},
        {"family": "conditional", "classes": 10},
        {"labelled": 20, "classes": 10},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "vae",
)
def test_every_family_keeps_the_declared_contract(options):
    """Every model vaelab builds is a contract.LatentVariableModel and has contract.ModelViews, what the
    measures and the pictures read; a conditional model keeps them with its labels bound (Given), and its
    views give what they say: q of the top layer's width, p(x|z) over the image, a reconstruction of it."""
    model = build(Config(hidden=(16,), latent_dim=3, **options), (1, 8, 8))
    bound = contract.given(model, torch.zeros(2, dtype=torch.long)) if "classes" in options else model
    for m in (model, bound):
        assert isinstance(m, contract.LatentVariableModel) and isinstance(m, contract.ModelViews)
    x = torch.rand(2, 1, 8, 8).round()
    assert tuple(bound.x_shape) == (1, 8, 8) and list(bound.layer_dims)[0] in ("z", "z2", "y")
    assert bound.reconstruct(x).shape == x.shape
    q = bound.encode(x)
    assert q.batch_shape[0] == 2
