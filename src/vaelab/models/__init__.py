"""Models: the VAE, assembled from the parts that ``parts.py`` registers."""

from __future__ import annotations

from functools import partial

from vaelab import distributions as dist
from vaelab import parts
from vaelab.models.base import VAE, PixelLikelihood, make_likelihood, make_prior


def architecture_for(model: str, x_shape) -> str:
    """``auto``: conv for colour images, mlp otherwise (fast on CPU, strong on MNIST-like data)."""
    if model != "auto":
        return model
    return "conv" if x_shape[0] == 3 else "mlp"


def build(config, x_shape):
    """The model that ``config`` describes, for images of shape ``x_shape`` (C, H, W): built by its
    family's entry in ``parts.FAMILIES`` (the one-layer VAE, or the hierarchical model)."""
    return parts.FAMILIES[config.family].constructor()(config, tuple(x_shape))


def make_posterior(config):
    """The function (or, for a family with parameters such as a flow, the module) that turns the
    encoder's output into q(z|x): the entry ``config.posterior`` of ``parts.POSTERIORS``, its input taken
    through the float32 boundary (``distributions.at_least_float32``) first, a posterior of the user's too."""
    posterior = parts.POSTERIORS[config.posterior]
    if posterior.has_parameters:
        module = posterior.constructor()(config)
        module.register_forward_pre_hook(_float32_input)
        return module
    return partial(_float32_posterior, posterior.constructor(), config.latent_dim)


def _float32_input(module, args: tuple) -> tuple:
    return (dist.at_least_float32(args[0]), *args[1:])


def _float32_posterior(build, latent_dim: int, h):
    return build(dist.at_least_float32(h), latent_dim=latent_dim)


def build_vae(config, x_shape):
    """The one-layer VAE (family ``vae``) that ``config`` describes; with ``--labelled``, M2 (``models.m2``)."""
    if config.labelled:
        from vaelab.models.m2 import build_m2

        return build_m2(config, x_shape)
    architecture = parts.ARCHITECTURES[architecture_for(config.model, x_shape)]
    if architecture.grid:
        from vaelab.models.conv import check_grid

        check_grid(x_shape, config.latent_dim)
    posterior = parts.POSTERIORS[config.posterior]
    likelihood = make_likelihood(config.likelihood, x_shape)
    params_per_pixel = parts.LIKELIHOODS[config.likelihood].params_per_pixel
    encoder = architecture.constructor()(x_shape, config.hidden, posterior.outputs(config), config.activation)
    decoder = architecture.decoder_constructor()(
        x_shape, config.hidden, posterior.z_width(config), params_per_pixel, config.activation
    )
    # a prior over categories (the uniform one of a categorical posterior) has --categories components
    components = config.categories if parts.PRIORS[config.prior].discrete else config.prior_components
    prior = make_prior(config.prior, config.latent_dim, x_shape, components, config.seed)
    return VAE(encoder, decoder, config.latent_dim, x_shape, likelihood, prior, make_posterior(config))


__all__ = [
    "VAE",
    "PixelLikelihood",
    "build",
    "build_vae",
    "architecture_for",
    "make_likelihood",
    "make_posterior",
    "make_prior",
]
