"""Convolutional encoder and decoder: two stride-2 convolutions each way (H, W divisible by 4)."""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from vaelab.errors import UserError
from vaelab.models.mlp import activation_module


def _check(x_shape):
    C, H, W = x_shape
    if H % 4 or W % 4 or H < 8 or W < 8:
        raise UserError(f"the conv model needs image sides divisible by 4 and at least 8, got {H}x{W}; use --model mlp")


class ConvEncoder(nn.Module):
    """x (B, C, H, W) -> (B, out_features): the posterior's parameters."""

    def __init__(self, x_shape, hidden: tuple[int, ...], out_features: int, activation: str = "relu", width: int = 32):
        super().__init__()
        _check(x_shape)
        C, H, W = x_shape
        act = partial(activation_module, activation)
        self.net = nn.Sequential(
            nn.Conv2d(C, width, 4, 2, 1), act(),  # (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 4, 2, 1), act(),  # (B, 2w, H/4, W/4)
            nn.Flatten(),
            nn.Linear(2 * width * (H // 4) * (W // 4), hidden[0]), act(),
            nn.Linear(hidden[0], out_features),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    def __init__(self, x_shape, hidden, latent_dim: int, params_per_pixel: int, activation="relu", width: int = 32):
        super().__init__()
        _check(x_shape)
        C, H, W = x_shape
        act = partial(activation_module, activation)
        self.grid = (2 * width, H // 4, W // 4)
        self.fc = nn.Sequential(
            nn.Linear(latent_dim, hidden[0]), act(), nn.Linear(hidden[0], 2 * width * (H // 4) * (W // 4)), act()
        )
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), act(),  # (B, w, H/2, W/2)
            nn.ConvTranspose2d(width, params_per_pixel * C, 4, 2, 1),  # (B, P C, H, W)
        )  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.fc(z).view(z.shape[0], *self.grid))
