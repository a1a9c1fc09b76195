"""The table of parts: every likelihood, prior, posterior family, objective, architecture,
activation and named data set vaelab knows, each one registered entry that carries its
constructor and its facts.

Everything else reads this table: ``Config``'s choices and the command line's, the rules
about which parts go together (a Bernoulli likelihood needs binary pixels; free bits need a
prior that factorises), bits/dim (discrete likelihoods only), and ``models.build``. To add a
part, register one entry; nothing else changes (see docs/architecture.md).

A constructor is given as ``"module:attribute"`` and imported only when a model is built, so
this table, ``Config`` and ``vaelab --help`` load without torch; a test or a user may also
register the constructor itself.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar, final

from vaelab.errors import UserError

Constructor = str | Callable


@dataclass(frozen=True)
class Part:
    """A named part; ``build`` makes it (``"module:attribute"`` or the callable itself)."""

    name: str
    help: str
    build: Constructor
    # the options (Config fields) only this part reads: setting one while another part is chosen is refused
    reads: tuple[str, ...] = field(default=(), kw_only=True)

    def constructor(self) -> Callable:
        if callable(self.build):
            return self.build
        module, attribute = self.build.split(":")
        return getattr(importlib.import_module(module), attribute)


@final
@dataclass(frozen=True)
class Likelihood(Part):
    """p(x|z); ``build(x_shape)`` returns the module that turns decoder outputs into p(x|z)."""

    params_per_pixel: int = 1  # decoder outputs per pixel and channel
    discrete: bool = False  # a probability mass function over pixel values, so bits/dim apply
    binary_only: bool = False  # a likelihood only for pixels that are 0 or 1 (Bernoulli)
    levels: int | None = None  # the grey levels it models, when it models a fixed number


@final
@dataclass(frozen=True)
class Prior(Part):
    """p(z); ``build(latent_dim, x_shape, components, seed)`` returns its module."""

    factorises: bool = True  # p(z) = prod_j p(z_j): the KL has a per-dimension split (and free bits apply)
    closed_form_kl: bool = True  # KL(diagonal Gaussian || p) has a closed form
    mixes_posteriors: bool = False  # built from the encoder's (diagonal) posteriors, as the VampPrior
    discrete: bool = False  # over the categories of a categorical posterior (built with components = --categories)


# The encoder's width for a config (its latent_dim D, posterior_rank R, categories K), by posterior family
def _two_per_dimension(config) -> int:
    return 2 * config.latent_dim


def _full_covariance_width(config) -> int:
    return config.latent_dim + config.latent_dim * (config.latent_dim + 1) // 2


def _low_rank_width(config) -> int:
    return config.latent_dim * (2 + config.posterior_rank)


def _flow_width(config) -> int:
    return 3 * config.latent_dim  # mu, log_var, and a context vector of D numbers for the flow's steps


def _latent_dim(config) -> int:
    return config.latent_dim


def _code_width(config) -> int:
    return config.latent_dim * config.code_dim  # VQ-VAE: a vector of code_dim numbers per position


def _one_hot_width(config) -> int:
    return config.latent_dim * config.categories  # a logit per category of each variable; z one-hot, as wide


@final
@dataclass(frozen=True)
class Posterior(Part):
    """q(z|x); ``build(h, latent_dim)`` turns the encoder's output (B, outputs(config)) into q(z|x).

    A family with a module of its own (a flow's parameters, a categorical's temperature:
    ``has_parameters``) is built once instead, as ``build(config)``, an ``nn.Module`` that maps the
    encoder's output to q(z|x)."""

    outputs: Callable[[object], int] = _two_per_dimension  # the encoder's width for a config
    z_width: Callable[[object], int] = _latent_dim  # the width of z, the decoder's input, for a config
    factorises: bool = True  # q(z|x) = prod_j q(z_j|x)
    has_parameters: bool = False  # a module of its own, built as build(config)
    # a Gaussian q: its KL against a Gaussian prior has a closed form, and the aggregate posterior
    # is a Gaussian mixture (the KL split of `vaelab evaluate`); a flow is neither (Monte Carlo KL)
    gaussian: bool = True
    # categorical variables (z one-hot, a uniform prior over the categories, trained through a relaxation)
    discrete: bool = False
    # `vaelab evaluate --gaps`: the families (of ``gaps.FAMILIES``) q* is optimised in per image, the run's
    # own first, then richer ones; empty where vaelab defines no q* (a flow, a point mass, categories)
    optimal_families: tuple[str, ...] = ()


@final
@dataclass(frozen=True)
class Family(Part):
    """A model family; ``build(config, x_shape)`` returns the model (``contract.LatentVariableModel``).

    ``priors``, ``posteriors`` and ``architectures`` list the parts the family is built from
    (empty: any registered one); ``layers`` is its number of latent layers; ``labels``: its models are
    given the data's labels (the batches carry them, ``contract.given`` binds them)."""

    layers: int = 1
    labels: bool = False  # the model is given each image's label y: q(z|x, y), p(x|z, y)
    priors: tuple[str, ...] = ()
    posteriors: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()


@final
@dataclass(frozen=True)
class Objective(Part):
    """``build(model, x, noise, beta, config, dataset_size) -> (loss, ElboTerms)``: the loss to
    minimise and the ELBO's terms to log."""

    uses_free_bits: bool = False  # applies --free-bits (the KL of each dimension floored)
    splits_kl_by_dimension: bool = False  # needs a prior and a posterior that factorise


@final
@dataclass(frozen=True)
class Architecture(Part):
    """``build`` is the encoder, ``decoder`` the decoder; each takes (x_shape, hidden, latent_dim, ...)."""

    decoder: Constructor = ""
    grid: bool = False  # z's positions are the H/4 x W/4 grid of a feature map: --latent-dim must be their number

    def decoder_constructor(self) -> Callable:
        return Part(self.name, self.help, self.decoder).constructor()


@final
@dataclass(frozen=True)
class Activation(Part):
    """``build()`` returns the activation module."""


@final
@dataclass(frozen=True)
class DataSet(Part):
    """A named data set; ``build(data_dir, download)`` returns ``((x, y, where), (x_test, y_test, where))``
    with ``x_test`` None when the source has no test split of its own."""

    levels: int = 256  # grey levels the source stores


P = TypeVar("P", bound=Part)


@final
class Table(Generic[P]):
    """The registered parts of one kind, by name, in the order they were registered."""

    def __init__(self, kind: str):
        self.kind = kind
        self._parts: dict[str, P] = {}

    def register(self, part: P) -> P:
        if part.name in self._parts:
            raise ValueError(f"a {self.kind} named {part.name!r} is registered already")
        self._parts[part.name] = part
        return part

    def unregister(self, name: str) -> None:
        del self._parts[name]

    def __getitem__(self, name: str) -> P:
        try:
            return self._parts[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self.names())}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def __iter__(self) -> Iterator[P]:
        return iter(self._parts.values())

    def names(self) -> tuple[str, ...]:
        return tuple(self._parts)


LIKELIHOODS: Table[Likelihood] = Table("likelihood")
PRIORS: Table[Prior] = Table("prior")
POSTERIORS: Table[Posterior] = Table("posterior")
OBJECTIVES: Table[Objective] = Table("objective")
FAMILIES: Table[Family] = Table("family")
ARCHITECTURES: Table[Architecture] = Table("model")
ACTIVATIONS: Table[Activation] = Table("activation")
DATASETS: Table[DataSet] = Table("data set")

_M = "vaelab.models.base"
LIKELIHOODS.register(
    Likelihood("bernoulli", "binary pixels", f"{_M}:BernoulliLikelihood", discrete=True, binary_only=True)
)
LIKELIHOODS.register(
    Likelihood("continuous-bernoulli", "a density on [0, 1] for grey pixels", f"{_M}:ContinuousBernoulliLikelihood")
)
LIKELIHOODS.register(Likelihood("gaussian", "learned per-pixel variance", f"{_M}:GaussianLikelihood"))
LIKELIHOODS.register(
    Likelihood(
        "logistic",
        "discretised logistic over 256 levels",
        f"{_M}:LogisticLikelihood",
        params_per_pixel=2,
        discrete=True,
        levels=256,
    )
)

PRIORS.register(Prior("normal", "N(0, I): closed-form KL", f"{_M}:StandardNormalPrior"))
PRIORS.register(
    Prior(
        "mixture",
        "a learned Gaussian mixture: Monte Carlo KL",
        f"{_M}:MixturePrior",
        factorises=False,
        closed_form_kl=False,
        reads=("prior_components",),
    )
)
PRIORS.register(
    Prior(
        "vamp",
        "VampPrior, learned pseudo-inputs: Monte Carlo KL",
        f"{_M}:VampPrior",
        factorises=False,
        closed_form_kl=False,
        mixes_posteriors=True,
        reads=("prior_components",),
    )
)

PRIORS.register(
    Prior(
        "uniform",
        "uniform over the --categories of each variable of --posterior categorical or vq: KL = log K - H(q)",
        "vaelab.models.categorical:UniformPrior",
        discrete=True,
    )
)

POSTERIORS.register(
    Posterior(
        "diagonal",
        "N(mu, diag sigma^2)",
        "vaelab.distributions:diagonal_posterior",
        optimal_families=("diagonal", "full"),
    )
)
POSTERIORS.register(
    Posterior(
        "full",
        "N(mu, L L^T), full covariance: the KL of eq. 7",
        "vaelab.distributions:full_posterior",
        outputs=_full_covariance_width,
        factorises=False,
        optimal_families=("full",),
    )
)
POSTERIORS.register(
    Posterior(
        "lowrank",
        "N(mu, diag sigma^2 + W W^T), W of rank --posterior-rank",
        "vaelab.distributions:lowrank_posterior",
        outputs=_low_rank_width,
        factorises=False,
        reads=("posterior_rank",),
    )
)

POSTERIORS.register(
    Posterior(
        "iaf",
        "a diagonal Gaussian through --flow-steps inverse autoregressive flows: Monte Carlo KL",
        "vaelab.models.flows:iaf_posterior",
        outputs=_flow_width,
        factorises=False,
        has_parameters=True,
        gaussian=False,
        reads=("flow_steps",),
    )
)

POSTERIORS.register(
    Posterior(
        "categorical",
        "--latent-dim N variables of --categories K, trained by the Gumbel-softmax relaxation: KL = log K - H(q)",
        "vaelab.models.categorical:categorical_posterior",
        outputs=_one_hot_width,
        z_width=_one_hot_width,
        has_parameters=True,
        gaussian=False,
        discrete=True,
        reads=("categories", "temperature", "temperature_min", "anneal_rate", "straight_through"),
    )
)

POSTERIORS.register(
    Posterior(
        "vq",
        "VQ-VAE: each of --latent-dim N positions the nearest of --categories K codebook vectors of --code-dim "
        "D (van den Oord et al. 2017): KL = N log K, a constant",
        "vaelab.models.vq:vq_posterior",
        outputs=_code_width,
        z_width=_code_width,
        has_parameters=True,
        gaussian=False,
        discrete=True,
        reads=("categories", "code_dim", "commitment", "ema_decay"),
    )
)

FAMILIES.register(Family("vae", "one latent layer z", "vaelab.models:build_vae"))
FAMILIES.register(
    Family(
        "conditional",
        "one latent layer z given the data's labels y, q(z|x, y) and p(x|z, y) (Sohn et al. 2015)",
        "vaelab.models.conditional:build_conditional",
        labels=True,
        priors=("normal",),
        architectures=("mlp",),
    )
)
FAMILIES.register(
    Family(
        "hierarchical",
        "two latent layers, p(z2) p(z1|z2) p(x|z1), inferred q(z2|x) q(z1|x,z2) or (--inference bottom-up) "
        "q(z1|x) q(z2|z1)",
        "vaelab.models.hierarchical:build_hierarchical",
        layers=2,
        priors=("normal",),
        posteriors=("diagonal",),
        architectures=("mlp",),
    )
)

OBJECTIVES.register(
    Objective("elbo", "the ELBO, with beta and free bits", "vaelab.objectives:elbo_objective", uses_free_bits=True)
)
OBJECTIVES.register(
    Objective("iwae", "the IWAE bound with --k samples", "vaelab.objectives:iwae_objective", reads=("k",))
)
OBJECTIVES.register(
    Objective(
        "tc",
        "beta-TCVAE: the KL's three parts weighted apart",
        "vaelab.objectives:tc_objective",
        splits_kl_by_dimension=True,
        reads=("mi_weight", "tc_weight", "dwkl_weight", "tc_estimator"),
    )
)

ARCHITECTURES.register(
    Architecture("mlp", "multilayer perceptrons", "vaelab.models.mlp:MLPEncoder", "vaelab.models.mlp:MLPDecoder")
)
ARCHITECTURES.register(
    Architecture(
        "conv", "two stride-2 convolutions", "vaelab.models.conv:ConvEncoder", "vaelab.models.conv:ConvDecoder"
    )
)
ARCHITECTURES.register(
    Architecture(
        "conv-grid",
        "two stride-2 convolutions, z a grid of H/4 x W/4 positions (--posterior vq, --latent-dim the positions)",
        "vaelab.models.conv:ConvGridEncoder",
        "vaelab.models.conv:ConvGridDecoder",
        grid=True,
    )
)

for _name, _cls in (("relu", "ReLU"), ("tanh", "Tanh"), ("elu", "ELU"), ("gelu", "GELU"), ("softplus", "Softplus")):
    ACTIVATIONS.register(Activation(_name, _cls, f"torch.nn:{_cls}"))

_S = "vaelab.data.sources"
DATASETS.register(DataSet("digits", "scikit-learn's bundled 8x8 digits", f"{_S}:load_digits", levels=17))
DATASETS.register(DataSet("mnist-5k", "5,000 MNIST digits, 28x28, bundled with vaelab", f"{_S}:load_mnist_5k"))
for _name in ("mnist", "fashion-mnist", "kmnist"):
    DATASETS.register(DataSet(_name, "IDX files", f"{_S}:load_{_name.replace('-', '_')}"))
DATASETS.register(DataSet("cifar10", "the python tarball", f"{_S}:load_cifar10"))
