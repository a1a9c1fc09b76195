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


class ConvGridEncoder(nn.Module):
    """x (B, C, H, W) -> (B, (H/4)(W/4) F): the two convolutions, then a 1x1 convolution to F numbers at each
    position of the H/4 x W/4 grid, position by position. VQ-VAE's grid of latents (van den Oord et al.
    2017): each position is quantised on its own; ``out_features`` must be a multiple of the positions."""

    def __init__(self, x_shape, hidden: tuple[int, ...], out_features: int, activation: str = "relu", width: int = 32):
        super().__init__()
        _check(x_shape)
        C, H, W = x_shape
        features = _per_position(x_shape, out_features)
        act = partial(activation_module, activation)
        self.net = nn.Sequential(
            nn.Conv2d(C, width, 4, 2, 1), act(),  # (B, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 4, 2, 1), act(),  # (B, 2w, H/4, W/4)
            nn.Conv2d(2 * width, features, 1),  # (B, F, H/4, W/4)
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).permute(0, 2, 3, 1).flatten(1)  # position-major: (B, positions F)


class ConvGridDecoder(nn.Module):
    """z (B, (H/4)(W/4) F), F numbers per grid position -> (B, P C, H, W): a 1x1 convolution, then two
    transposed convolutions."""

    def __init__(self, x_shape, hidden, latent_dim: int, params_per_pixel: int, activation="relu", width: int = 32):
        super().__init__()
        _check(x_shape)
        C, H, W = x_shape
        self.grid = (H // 4, W // 4)
        features = _per_position(x_shape, latent_dim)
        act = partial(activation_module, activation)
        self.net = nn.Sequential(
            nn.Conv2d(features, 2 * width, 1), act(),  # (B, 2w, H/4, W/4)
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), act(),  # (B, w, H/2, W/2)
            nn.ConvTranspose2d(width, params_per_pixel * C, 4, 2, 1),  # (B, P C, H, W)
        )  # fmt: skip

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.view(z.shape[0], *self.grid, -1).permute(0, 3, 1, 2))


def check_grid(x_shape, latent_dim: int) -> None:
    """Refuse a number of latent positions other than the H/4 x W/4 grid's."""
    _check(x_shape)
    positions = (x_shape[1] // 4) * (x_shape[2] // 4)
    if latent_dim != positions:
        raise UserError(
            f"--model conv-grid puts the latents on the {x_shape[1] // 4} x {x_shape[2] // 4} grid of "
            f"{x_shape[1]}x{x_shape[2]} images, {positions} positions, not {latent_dim}: give --latent-dim {positions}"
        )


def _per_position(x_shape, numbers: int) -> int:
    """The numbers per grid position, for ``numbers`` in all over the H/4 x W/4 grid."""
    return numbers // ((x_shape[1] // 4) * (x_shape[2] // 4))
