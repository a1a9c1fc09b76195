"""The reference implementations the benchmark measures vaelab against, written as a
textbook would: the classic PyTorch VAE example's model and loop, and a straightforward
importance-sampled log-likelihood."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TextbookVAE(nn.Module):
    """784-400-20 MLP VAE with a sigmoid output, as in the PyTorch examples repository."""

    def __init__(self, pixels: int = 784, hidden: int = 400, latent: int = 20):
        super().__init__()
        self.fc1 = nn.Linear(pixels, hidden)
        self.fc21 = nn.Linear(hidden, latent)
        self.fc22 = nn.Linear(hidden, latent)
        self.fc3 = nn.Linear(latent, hidden)
        self.fc4 = nn.Linear(hidden, pixels)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return torch.sigmoid(self.fc4(F.relu(self.fc3(z)))), mu, logvar


def textbook_loss(recon_x, x, mu, logvar):
    bce = F.binary_cross_entropy(recon_x, x, reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


def textbook_epoch(model, optimizer, loader, binarize: bool = False) -> float:
    """One epoch of the textbook loop; returns the summed loss (``loss.item()`` every step).
    ``binarize``: each batch drawn as Bernoulli(pixels) (dynamic binarisation)."""
    model.train()
    total = 0.0
    for (x,) in loader:
        if binarize:
            x = torch.bernoulli(x)
        optimizer.zero_grad()
        recon, mu, logvar = model(x)
        loss = textbook_loss(recon, x, mu, logvar)
        loss.backward()
        total += loss.item()
        optimizer.step()
    return total


def textbook_loader(x: torch.Tensor, batch_size: int) -> DataLoader:
    return DataLoader(TensorDataset(x.flatten(1)), batch_size=batch_size, shuffle=True)


def textbook_for(x: torch.Tensor, seconds: float, seed: int = 0) -> tuple[TextbookVAE, int]:
    """The textbook loop (Adam 1e-3, batch 128, dynamically binarised) on ``x`` for ``seconds`` of wall
    time, whole epochs, on ``x``'s device; returns the model and the epochs it ran."""
    torch.manual_seed(seed)
    model = TextbookVAE().to(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = textbook_loader(x, 128)
    start, epochs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        textbook_epoch(model, optimizer, loader, binarize=True)
        epochs += 1
    return model, epochs


@torch.no_grad()
def straightforward_iwae(model, x: torch.Tensor, k: int, batch_size: int = 100, chunk: int = 500) -> torch.Tensor:
    """log p(x) by importance sampling: encoder once per image, decoder on k samples in chunks,
    the full pixel-wide Bernoulli log-likelihood per sample (x repeated for every sample)."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size]
        q_z = model.encode(xb)
        p_z = model.prior()
        B = xb.shape[0]
        log_ws = []
        done = 0
        while done < k:
            n = min(chunk, k - done)
            z = q_z.sample((n,))
            logits = model.decoder(z.reshape(n * B, -1)).reshape(n * B, -1)
            x_rep = xb.flatten(1).repeat(n, 1)
            bce = F.binary_cross_entropy_with_logits(logits, x_rep, reduction="none")
            log_px_z = -bce.sum(-1, dtype=torch.float64).float().view(n, B)
            log_ws.append(log_px_z + p_z.log_prob(z) - q_z.log_prob(z))
            done += n
        out.append(torch.logsumexp(torch.cat(log_ws).double(), 0) - math.log(k))
    return torch.cat(out)
