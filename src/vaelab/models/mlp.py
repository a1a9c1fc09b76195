"""Multilayer-perceptron encoder and decoder (images are flattened)."""

from __future__ import annotations

import math

from torch import Tensor, nn

from vaelab.parts import ACTIVATIONS


def activation_module(name: str) -> nn.Module:
    """A new activation module of the kind registered as ``name`` in ``parts.ACTIVATIONS``."""
    return ACTIVATIONS[name].constructor()()


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation_module(activation))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x (B, C, H, W) -> (B, out_features): the posterior's parameters (2 D for a diagonal Gaussian)."""

    def __init__(self, x_shape, hidden: tuple[int, ...], out_features: int, activation: str = "relu"):
        super().__init__()
        self.net = mlp([math.prod(x_shape), *hidden, out_features], activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


class MLPDecoder(nn.Module):
    """z (B, D) -> (B, P C, H, W); hidden sizes mirror the encoder's."""

    def __init__(self, x_shape, hidden: tuple[int, ...], latent_dim: int, params_per_pixel: int, activation="relu"):
        super().__init__()
        C, H, W = x_shape
        self.out_shape = (params_per_pixel * C, H, W)
        self.net = mlp([latent_dim, *reversed(hidden), math.prod(self.out_shape)], activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)
