"""Models: the VAE interface and the table that turns config names into parts."""

from __future__ import annotations

from vaelab.models.base import VAE, Likelihood, make_likelihood, make_prior
from vaelab.models.conv import ConvDecoder, ConvEncoder
from vaelab.models.mlp import MLPDecoder, MLPEncoder

ARCHITECTURES = {"mlp": (MLPEncoder, MLPDecoder), "conv": (ConvEncoder, ConvDecoder)}


def architecture_for(model: str, x_shape) -> str:
    """``auto``: conv for colour images, mlp otherwise (fast on CPU, strong on MNIST-like data)."""
    if model != "auto":
        return model
    return "conv" if x_shape[0] == 3 else "mlp"


def build(config, x_shape) -> VAE:
    """The VAE that ``config`` describes, for images of shape ``x_shape`` (C, H, W)."""
    x_shape = tuple(x_shape)
    encoder_cls, decoder_cls = ARCHITECTURES[architecture_for(config.model, x_shape)]
    likelihood = make_likelihood(config.likelihood, x_shape)
    encoder = encoder_cls(x_shape, config.hidden, config.latent_dim, config.activation)
    decoder = decoder_cls(x_shape, config.hidden, config.latent_dim, likelihood.params_per_pixel, config.activation)
    prior = make_prior(config.prior, config.latent_dim, x_shape, config.prior_components, config.seed)
    return VAE(encoder, decoder, config.latent_dim, x_shape, likelihood, prior)


__all__ = ["VAE", "Likelihood", "build", "architecture_for", "make_likelihood", "make_prior", "ARCHITECTURES"]
