"""Models: the VAE, assembled from the parts that ``parts.py`` registers."""

from __future__ import annotations

from functools import partial

from vaelab import parts
from vaelab.models.base import VAE, Likelihood, make_likelihood, make_prior


def architecture_for(model: str, x_shape) -> str:
    """``auto``: conv for colour images, mlp otherwise (fast on CPU, strong on MNIST-like data)."""
    if model != "auto":
        return model
    return "conv" if x_shape[0] == 3 else "mlp"


def build(config, x_shape) -> VAE:
    """The VAE that ``config`` describes, for images of shape ``x_shape`` (C, H, W)."""
    x_shape = tuple(x_shape)
    architecture = parts.ARCHITECTURES[architecture_for(config.model, x_shape)]
    posterior = parts.POSTERIORS[config.posterior]
    likelihood = make_likelihood(config.likelihood, x_shape)
    params_per_pixel = parts.LIKELIHOODS[config.likelihood].params_per_pixel
    width = posterior.outputs(config.latent_dim, config.posterior_rank)
    encoder = architecture.constructor()(x_shape, config.hidden, width, config.activation)
    decoder = architecture.decoder_constructor()(
        x_shape, config.hidden, config.latent_dim, params_per_pixel, config.activation
    )
    prior = make_prior(config.prior, config.latent_dim, x_shape, config.prior_components, config.seed)
    q = partial(posterior.constructor(), latent_dim=config.latent_dim)
    return VAE(encoder, decoder, config.latent_dim, x_shape, likelihood, prior, q)


__all__ = ["VAE", "Likelihood", "build", "architecture_for", "make_likelihood", "make_prior"]
