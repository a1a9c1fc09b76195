"""The table of parts: adding a part is one entry, and every rule reads the part's facts."""

import pytest
import torch

import vaelab
from vaelab import parts
from vaelab.cli import main
from vaelab.config import Config
from vaelab.distributions import gaussian
from vaelab.errors import UserError
from vaelab.models import Likelihood


class UnitGaussian(Likelihood):
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
