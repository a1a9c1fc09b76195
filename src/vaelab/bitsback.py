r"""Bits-back coding with asymmetric numeral systems (BB-ANS; Townsend, Bird & Barber 2019): a
trained VAE as a lossless compressor whose code length is the negative ELBO, and whose net bits
for the latent are the KL term.

The message is a stack (``constriction``'s ANS coder). To put an image x on it:

1. **pop** z with Q(z|x): decoding bits that are already on the stack *with the posterior* draws
   z ~ Q(z|x) and takes -log2 Q(z|x) bits off the stack (the bits "got back");
2. **push** x with p(x|z): -log2 p(x|z) bits;
3. **push** z with P(z): -log2 P(z) bits.

Net: -log2 p(x|z) + [-log2 P(z) + log2 Q(z|x)], whose mean over z ~ Q is E_Q[-log2 p(x|z)] +
KL(Q || P) in bits: the negative ELBO. The bracket, the net bits for z, is the KL term.
Decoding runs the three steps backwards, images in reverse order: pop z with P, pop x with
p(x|z), push z with Q(z|x), which puts back exactly the bits step 1 took.

Latents are coded on a grid: each dimension's real line cut into 2^b buckets of equal mass under
the prior N(0, 1) (BB-ANS, section 2.5.1), so pushing z costs exactly b bits per dimension; the
posterior's mass of bucket i is Phi((e_{i+1} - mu) / sigma) - Phi((e_i - mu) / sigma), and the
decoder sees each bucket's centre, the prior's (i + 1/2) / 2^b quantile. The first image's pop
needs bits on the stack before there are any: the *initial bits*, seeded random words, which
decoding hands back exactly (and checks).

Encoder and decoder must compute the same probabilities bit for bit: both evaluate the networks on
one image at a time, in float32 on one thread, and turn them into float64 tables that
``constriction`` quantises deterministically. What is decoded is checked against the image
checksum stored with the message (``vaelab.compress``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from vaelab.errors import UserError
from vaelab.models.categorical import categorical_posterior_of
from vaelab.models.m2 import m2_of
from vaelab.models.vq import vq_posterior_of

QUANTISATION_BITS = 24  # constriction's probability precision: no symbol costs more than 24 bits
MAX_LATENT_BITS = 16
FLOOR = 2.0**-QUANTISATION_BITS  # the least probability the coder gives a symbol
SWEEP_BITS = (2, 4, 6, 8, 10, 12)  # the grids whose costs compress records (BitsBack.latent_bits_sweep)


@dataclass(frozen=True)
class LatentGrid:
    """2^bits buckets per latent dimension of equal mass under N(0, 1): their edges and centres."""

    bits: int
    edges: Tensor  # (2^bits + 1,), from -inf to inf
    centres: Tensor  # (2^bits,)

    @classmethod
    def of(cls, bits: int) -> LatentGrid:
        n = 2**bits
        steps = torch.arange(n + 1, dtype=torch.float64)
        return cls(bits, torch.special.ndtri(steps / n), torch.special.ndtri((steps[:-1] + 0.5) / n))

    def masses(self, mu: Tensor, sigma: Tensor) -> Tensor:
        """Q's mass of every bucket, (D, 2^bits) float64, for q(z_j|x) = N(mu_j, sigma_j^2)."""
        return interval_masses(self.edges, mu.double().unsqueeze(-1), sigma.double().unsqueeze(-1))


def interval_masses(edges: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
    """N(mu, sigma^2)'s mass between consecutive ``edges`` (..., n + 1) -> (..., n), float64; upper tails
    from the survival function, so a bucket far right is not 1 - 1. Phi(a) = erfc(-a / sqrt 2) / 2:
    torch's ``ndtr`` is 3e-4 off at -7.5 and 0 below -8.3 in float64; ``erfc`` holds to 1e-300."""
    a = (edges - mu) / (sigma * math.sqrt(2))
    lo, hi = a[..., :-1], a[..., 1:]
    erfc = torch.special.erfc
    return 0.5 * torch.where(lo > 0, erfc(lo) - erfc(hi), erfc(-hi) - erfc(-lo))


@dataclass(frozen=True)
class Costs:
    """What each image cost, in bits, (N,) each: the information content -log2 of each coded symbol's
    probability under the tables the coder was given (the message's length is their sum, plus the
    initial bits, plus what quantising the tables to 24 bits costs)."""

    pixels: np.ndarray  # pushed for x with p(x|z)
    z_pushed: np.ndarray  # pushed for z with P(z)
    z_back: np.ndarray  # got back when z was popped with Q(z|x)
    # pixels whose value the model gives less than 2^-24: the coder charges them 24 bits, less than the model
    capped: np.ndarray
    # the most the stack went below where it stood before the image (bits popped not yet paid back by pushes):
    # what the first image needs as initial bits (for BB-ANS every pop, for Bit-Swap the first layer's)
    peak: np.ndarray

    @property
    def z_net(self) -> np.ndarray:
        return self.z_pushed - self.z_back

    @property
    def net(self) -> np.ndarray:
        return self.pixels + self.z_net

    def initial_bits_needed(self) -> float:
        """The least the stack must hold before the first image so that no pop runs out: the highest of
        each image's peak less what the images before it left on the stack."""
        before = np.concatenate([[0.0], np.cumsum(self.net)[:-1]])
        return float(max(0.0, (self.peak - before).max()))


def floored(table: np.ndarray) -> np.ndarray:
    """A probability table with no entry below 2^-24, the least the coder gives a symbol: a symbol whose
    float probability underflowed (a far bucket) can still be drawn, and costs what the coder charges."""
    return np.ascontiguousarray(np.maximum(table, FLOOR))


@contextlib.contextmanager
def one_thread():
    """Both sides evaluate the networks on one thread: a matrix product split among threads may sum
    in another order, and the coder needs the same probabilities bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def initial_words(latent_dim: int, seed: int, particles: int = 1) -> np.ndarray:
    """The initial bits: enough seeded random 32-bit words for the first image's pops (of its
    ``particles`` z, each at most ``QUANTISATION_BITS`` bits per dimension, and of the index); the last
    word's top bit set, so the stack holds every one of them."""
    n = math.ceil((QUANTISATION_BITS * (latent_dim * particles + 1) + 64) / 32)
    words = np.random.default_rng(seed).integers(0, 2**32, size=n, dtype=np.uint32)
    words[-1] |= np.uint32(1 << 31)
    return words


class BitsBack:
    """BB-ANS, and with ``particles`` K > 1 its importance-sampled form BB-IS (Ruan et al. 2021,
    "Improving Lossless Compression Rates via Monte Carlo Bits-Back Coding"), for a model with one
    latent layer, a diagonal Gaussian q(z|x) and p(z) = N(0, I).

    BB-IS pops K particles z_1..z_K from Q(z|x) and an index j with the normalised importance weights
    w_k = p(x, z_k) / Q(z_k|x), then pushes the other particles back with Q(z|x), x with p(x|z_j),
    z_j with P(z) and j uniformly: the code of the extended target, whose expected net length is the
    IWAE bound -E log2 (1/K sum_k w_k) instead of the ELBO's. K = 1 is BB-ANS.

    ``posterior(x)`` gives (mu, sigma) of q(z|x) for one image x (1, C, H, W); ``pmf(z, at=None)`` gives
    p(x|z) as tables (n, pixels, levels) of float64 for n latents (n, D), or with ``at`` (1, pixels) only
    those values' probabilities (n, pixels). Pixel values are symbols 0 to levels - 1 (the value
    symbol / (levels - 1)).
    """

    def __init__(
        self,
        posterior: Callable[[Tensor], tuple[Tensor, Tensor]],
        pmf: Callable[[Tensor], Tensor],
        latent_dim: int,
        x_shape: tuple[int, ...],
        levels: int,
        latent_bits: int,
        particles: int = 1,
    ):
        import constriction

        self.posterior, self.pmf = posterior, pmf
        self.latent_dim, self.x_shape, self.levels = latent_dim, tuple(x_shape), levels
        self.grid, self.particles = LatentGrid.of(latent_bits), particles
        self._categorical = constriction.stream.model.Categorical(perfect=False)
        self._uniform = constriction.stream.model.Uniform(2**latent_bits)
        self._index = constriction.stream.model.Uniform(particles) if particles > 1 else None
        self._coder = constriction.stream.stack.AnsCoder

    def _image(self, symbols: np.ndarray) -> Tensor:
        return torch.from_numpy(symbols.astype(np.float32) / (self.levels - 1)).view(1, *self.x_shape)

    def _masses(self, x: Tensor) -> Tensor:
        """Q's mass of every symbol of every latent dimension for one image x (1, C, H, W), (D, symbols) float64:
        the buckets' masses under q(z_j|x)."""
        mu, sigma = self.posterior(x)
        return self.grid.masses(mu.reshape(-1), sigma.reshape(-1))

    def _q(self, symbols: np.ndarray) -> np.ndarray:
        return floored(self._masses(self._image(symbols)).numpy())

    def initial_words(self, seed: int) -> np.ndarray:
        """The message's initial bits: room for the first image's pops (:func:`initial_words`)."""
        return initial_words(self.latent_dim, seed, self.particles)

    @staticmethod
    def _left(coder, i: int) -> None:
        """Refuse a message that is used up with image ``i`` (decoding runs from the last) still to decode.
        An honest stack never falls under 32 valid bits: before image i it is the encoder's after image i,
        which keeps the initial bits' 64 spare bits (:func:`initial_words`) below what the images pushed. An
        exhausted one would go on decoding made-up images, for as many as the header claims."""
        if coder.num_valid_bits() < 32:
            raise UserError(
                f"the message ends with {i + 1} images still to decode: the file's header claims more images than "
                "it holds (it was edited); compress again"
            )

    def _returned(self, coder, seed: int) -> bool:
        """Whether what is left on the stack after decoding is exactly the initial bits."""
        left, initial = coder.get_compressed(), self.initial_words(seed)
        return len(left) == len(initial) and bool((left == initial).all())

    def _values(self, z_index: np.ndarray) -> Tensor:
        """The latents the decoder sees for the symbols ``z_index`` (n, D): the bucket centres, (n, D)."""
        return self.grid.centres[torch.from_numpy(z_index.astype(np.int64))].float()

    def _tables(self, z_index: np.ndarray) -> np.ndarray:
        """p(x|z) for the latent symbols ``z_index`` (n, D): (n, pixels, levels); one network call for all n."""
        return floored(self.pmf(self._values(z_index)).reshape(len(z_index), -1, self.levels).numpy())

    @torch.no_grad()
    def expected_z_net(self, x: Tensor) -> float:
        """E_Q[log2 Q(z|x) - log2 P(z)] for one image x (1, C, H, W), summed exactly over every symbol of
        every dimension: the net bits for z that popping with fair coin flips would average (the KL of the
        discretised latent)."""
        q = self._masses(x)
        return float((q * (torch.log2(q.clamp_min(1e-300)) + self.grid.bits)).sum())

    def _p_x(self, z_index: np.ndarray) -> np.ndarray:
        return self._pixels(self._values(z_index.reshape(1, -1)))

    def _pixels(self, values: Tensor, *given) -> np.ndarray:
        """p(x|z) of one latent's ``values`` (1, D) (and what else the decoder is ``given``: M2's label) as the
        coder's table, (pixels, levels)."""
        return floored(self.pmf(values, *given).reshape(-1, self.levels).numpy())

    def _table(self, params: tuple[Tensor, Tensor]) -> np.ndarray:
        """A diagonal Gaussian's (mu, sigma) masses of the grid's buckets, per dimension, as the coder's table."""
        mu, sigma = params
        return floored(self.grid.masses(mu.reshape(-1), sigma.reshape(-1)).numpy())

    @torch.no_grad()
    def latent_bits_sweep(self, symbols: np.ndarray, bits=SWEEP_BITS, seed: int = 0) -> list[dict[str, float]]:
        """What BB-ANS pays per image on grids of 2^b buckets, b in ``bits``, as means over the images
        ``symbols`` (N, pixels): the net bits for z that fair coin flips pay (exact: a sum over every bucket),
        and the bits for x at one bucket per dimension drawn from Q (seeded by ``seed`` and b: an estimate of
        E_Q -log2 p(x|z)).
        Coarse grids make z cheap and x dear. The grids are nested (each bucket of 2^b is two of 2^(b+1)),
        so z's expected net never falls as b grows, and never passes the analytic KL (data processing)."""
        rows = []
        for b in bits:  # each grid's draws from its own stream: a grid's figure does not follow the others'
            rng, grid, z_net, pixels = np.random.default_rng([seed, b]), LatentGrid.of(b), [], []
            chunk = max(1, min(100, 2**22 // (self.latent_dim * 2**b)))  # the masses of a chunk: at most 32 MiB
            for start in range(0, len(symbols), chunk):
                s = np.ascontiguousarray(symbols[start : start + chunk])
                x = torch.from_numpy(s.astype(np.float32) / (self.levels - 1)).view(-1, *self.x_shape)
                mu, sigma = self.posterior(x)
                q = grid.masses(mu.reshape(len(s), -1), sigma.reshape(len(s), -1))  # (n, D, 2^b)
                z_net.append((q * (torch.log2(q.clamp_min(1e-300)) + b)).sum((1, 2)))
                u = torch.from_numpy(rng.random(q.shape[:2]))
                index = (q.cumsum(-1) < u.unsqueeze(-1)).sum(-1).clamp(max=2**b - 1)  # a bucket drawn from Q
                at = torch.from_numpy(s.astype(np.int64))
                pixels.append(-torch.log2(self.pmf(grid.centres[index].float(), at).clamp_min(FLOOR)).sum(1))
            z, xs = torch.cat(z_net).mean().item(), torch.cat(pixels).mean().item()
            rows.append({"latent_bits": b, "z_net": z, "pixels": xs, "net": z + xs})
        return rows

    def _weights(self, x: np.ndarray, particles: np.ndarray, q: np.ndarray) -> np.ndarray:
        """The normalised importance weights of the particles (K, D): p(x|z_k) P(z_k) / Q(z_k|x), (1, K);
        p(x|z_k) from the probabilities of x's values only, the same numbers as the full tables'."""
        z = self._values(particles)
        at = torch.from_numpy(x.astype(np.int64)).view(1, -1)
        log_px = np.log(floored(self.pmf(z, at).reshape(len(particles), -1).numpy())).sum(1)
        log_q = np.log(np.take_along_axis(q, particles.T, 1)).sum(0)  # P(z_k) = 2^-bD is the same for all k
        w = np.exp(log_px - log_q - (log_px - log_q).max())
        return (w / w.sum())[None]

    def _tiled(self, q: np.ndarray, times: int) -> np.ndarray:
        return np.ascontiguousarray(np.tile(q, (times, 1)))

    @torch.no_grad()
    def encode(self, symbols: np.ndarray, seed: int = 0) -> tuple[np.ndarray, Costs]:
        """Code the images ``symbols`` (N, pixels), int, onto a stack that starts from the initial
        bits; return the message (uint32 words) and what each image cost."""
        symbols = np.ascontiguousarray(symbols, dtype=np.int32)
        K, D, rows = self.particles, self.latent_dim, np.arange(self.latent_dim)
        coder = self._coder(self.initial_words(seed))
        costs = np.zeros((5, len(symbols)))
        with one_thread():
            for i, x in enumerate(symbols):
                q = self._q(x)
                zs = coder.decode(self._categorical, self._tiled(q, K)).reshape(K, D)  # pop z_1..z_K with Q(z|x)
                log2_q = np.log2(q[rows, zs]).sum(1)  # (K,)
                j, back, pushed = 0, -log2_q.sum(), self.grid.bits * D
                if K > 1:
                    w = self._weights(x, zs, q)
                    j = int(coder.decode(self._categorical, w)[0])  # pop the index with the weights
                    others = np.delete(zs, j, 0)
                    coder.encode_reverse(others.ravel(), self._categorical, self._tiled(q, K - 1))  # push z_-j
                    back -= math.log2(w[0, j])
                    pushed += math.log2(K) - (log2_q.sum() - log2_q[j])
                popped = -log2_q.sum() - (math.log2(w[0, j]) if K > 1 else 0.0)  # every pop precedes every push
                p_x = self._p_x(zs[j])
                coder.encode_reverse(x, self._categorical, p_x)  # push x with p(x|z_j)
                coder.encode_reverse(zs[j], self._uniform)  # push z_j with P(z)
                if K > 1:
                    coder.encode_reverse(np.array([j], dtype=np.int32), self._index)  # push j uniformly
                coded = p_x[np.arange(len(x)), x]
                costs[:, i] = (-np.log2(coded).sum(), pushed, back, (coded <= FLOOR).sum(), popped)
        return coder.get_compressed(), Costs(*costs)

    @torch.no_grad()
    def decode(self, message: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, bool]:
        """The ``n`` images of ``message``, (n, pixels) int32, and whether what is left on the stack is
        exactly the initial bits (False: the message, or this machine's arithmetic, is not the one it
        was coded with)."""
        coder = self._coder(np.ascontiguousarray(message, dtype=np.uint32))
        K, D = self.particles, self.latent_dim
        out = np.zeros((n, math.prod(self.x_shape)), dtype=np.int32)
        with one_thread():
            for i in reversed(range(n)):
                self._left(coder, i)
                j = int(coder.decode(self._index, 1)[0]) if K > 1 else 0  # pop the index
                z = coder.decode(self._uniform, D)  # pop z_j with P(z)
                out[i] = x = coder.decode(self._categorical, self._p_x(z))  # pop x with p(x|z_j)
                q = self._q(x)
                zs = z[None]
                if K > 1:
                    others = coder.decode(self._categorical, self._tiled(q, K - 1)).reshape(K - 1, D)
                    zs = np.insert(others, j, z, 0)
                    coder.encode_reverse(np.array([j], dtype=np.int32), self._categorical, self._weights(x, zs, q))
                coder.encode_reverse(zs.ravel(), self._categorical, self._tiled(q, K))  # push the particles back
        return out, self._returned(coder, seed)


COUPLING_BITS = 16  # BB-CIS: q(z_j|x) quantised to counts out of 2^16 per dimension, the uniform u's range


def quantised_counts(masses: np.ndarray, bits: int = COUPLING_BITS) -> np.ndarray:
    """Integer counts out of 2^bits per row of ``masses`` (D, n), each at least 1, deterministic: floor of the
    mass times the counts left after one each, plus one, and what rounding leaves to each row's largest."""
    n = masses.shape[1]
    counts = np.floor(masses * (2**bits - n)).astype(np.int64) + 1
    counts[np.arange(len(counts)), masses.argmax(1)] += 2**bits - counts.sum(1)
    return counts


class CoupledBitsBack(BitsBack):
    """McBits' coupled BB-IS (BB-CIS; Ruan et al. 2021, section 4.2): the K particles come from one popped
    uniform, so the first image needs initial bits for one particle, not K. q(z_j|x) is quantised to
    integer counts out of 2^16 (each bucket's share of [0, 2^16)); a uniform u in [0, 2^16)^D is popped
    (16 bits per dimension), and particle k is the bucket holding u + k 2^16 / K (mod 2^16), each one a
    draw from the quantised q, the K of them stratified. j is popped with the normalised importance
    weights; then u_j's place inside z_j's bucket is pushed (log2 of its count per dimension), j uniformly,
    x with p(x|z_j) and z_j with P(z). The net length is -log2 (1/K sum_k w_k), the IWAE-K bound's, as for
    BB-IS; decoding recovers u_j, hence u and every particle, and pushes j and u back."""

    def __init__(self, posterior, pmf, latent_dim: int, x_shape, levels: int, latent_bits: int, particles: int):
        import constriction

        super().__init__(posterior, pmf, latent_dim, x_shape, levels, latent_bits, particles)
        self._u = constriction.stream.model.Uniform(2**COUPLING_BITS)
        self._offset = constriction.stream.model.Uniform()  # sizes given per call
        self._shifts = (np.arange(particles, dtype=np.int64) * 2**COUPLING_BITS) // particles

    def initial_words(self, seed: int) -> np.ndarray:
        return initial_words(self.latent_dim, seed)  # one particle's room: the uniform takes 16 bits per dimension

    def _counts(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """q(z|x)'s counts (D, n) and their cumulative sums (D, n + 1)."""
        counts = quantised_counts(self._masses(self._image(x)).numpy())
        return counts, np.concatenate([np.zeros((len(counts), 1), np.int64), np.cumsum(counts, 1)], 1)

    def _particles(self, u: np.ndarray, cdf: np.ndarray) -> np.ndarray:
        """The buckets (K, D) of the K shifted uniforms u + shift_k (mod 2^16)."""
        shifted = (u[None] + self._shifts[:, None]) % 2**COUPLING_BITS  # (K, D)
        return np.stack(
            [np.searchsorted(row, col, side="right") - 1 for row, col in zip(cdf, shifted.T, strict=True)], 1
        )

    def _within(self, counts: np.ndarray, z: np.ndarray) -> np.ndarray:
        """The dimensions whose bucket holds more than one count: there u's place inside it is coded."""
        return counts[np.arange(len(z)), z] > 1

    @torch.no_grad()
    def encode(self, symbols: np.ndarray, seed: int = 0) -> tuple[np.ndarray, Costs]:
        symbols = np.ascontiguousarray(symbols, dtype=np.int32)
        D, rows = self.latent_dim, np.arange(self.latent_dim)
        coder = self._coder(self.initial_words(seed))
        costs = np.zeros((5, len(symbols)))
        with one_thread():
            for i, x in enumerate(symbols):
                counts, cdf = self._counts(x)
                u = coder.decode(self._u, D).astype(np.int64)  # pop the uniform
                zs = self._particles(u, cdf)
                q = counts / 2**COUPLING_BITS
                w = self._weights(x, zs, q)
                j = int(coder.decode(self._categorical, w)[0])  # pop the index with the weights
                z = zs[j]
                inside = self._within(counts, z)
                place = (u + self._shifts[j]) % 2**COUPLING_BITS - cdf[rows, z]
                sizes = counts[rows, z][inside].astype(np.int32)
                coder.encode_reverse(place[inside].astype(np.int32), self._offset, sizes)  # push u_j's place
                coder.encode_reverse(np.array([j], dtype=np.int32), self._index)  # push j uniformly
                p_x = self._p_x(z)
                coder.encode_reverse(x, self._categorical, p_x)  # push x with p(x|z_j)
                coder.encode_reverse(z.astype(np.int32), self._uniform)  # push z_j with P(z)
                coded = p_x[np.arange(len(x)), x]
                popped = COUPLING_BITS * D - math.log2(w[0, j])
                pushed = self.grid.bits * D + math.log2(self.particles) + float(np.log2(sizes).sum())
                costs[:, i] = (-np.log2(coded).sum(), pushed, popped, (coded <= FLOOR).sum(), popped)
        return coder.get_compressed(), Costs(*costs)

    @torch.no_grad()
    def decode(self, message: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, bool]:
        coder = self._coder(np.ascontiguousarray(message, dtype=np.uint32))
        D, rows = self.latent_dim, np.arange(self.latent_dim)
        out = np.zeros((n, math.prod(self.x_shape)), dtype=np.int32)
        with one_thread():
            for i in reversed(range(n)):
                self._left(coder, i)
                z = coder.decode(self._uniform, D).astype(np.int64)  # pop z_j with P(z)
                out[i] = x = coder.decode(self._categorical, self._p_x(z))  # pop x with p(x|z_j)
                j = int(coder.decode(self._index, 1)[0])  # pop j
                counts, cdf = self._counts(x)
                inside = self._within(counts, z)
                place = np.zeros(D, dtype=np.int64)
                place[inside] = coder.decode(self._offset, counts[rows, z][inside].astype(np.int32))
                u = (cdf[rows, z] + place - self._shifts[j]) % 2**COUPLING_BITS
                w = self._weights(x, self._particles(u, cdf), counts / 2**COUPLING_BITS)
                coder.encode_reverse(np.array([j], dtype=np.int32), self._categorical, w)  # push j with the weights
                coder.encode_reverse(u.astype(np.int32), self._u)  # push the uniform back
        return out, self._returned(coder, seed)


@dataclass(frozen=True)
class Categories:
    """The symbols of a categorical latent variable: its K categories, pushed uniformly at log2 K bits."""

    categories: int

    @property
    def bits(self) -> float:
        return math.log2(self.categories)


class CategoricalBitsBack(BitsBack):
    """BB-ANS (BB-IS with ``particles`` > 1) for categorical latent variables (``models.categorical``):
    q(z|x) a product of V categoricals of K categories, p(z) uniform. No grid: each z_j is one of K
    symbols, popped with q(z_j|x) and pushed with the uniform prior at exactly log2 K bits; the decoder
    sees z one-hot. The net bits for z average the KL term, sum_j (log K - H(q(z_j|x))) in bits, with
    no discretisation. ``posterior(x)`` gives q(z_j = k|x), (V, K). VQ-VAE (``models.vq``) too: its q is
    one-hot, so popping gets nothing back and z costs exactly its rate, V log2 K bits; ``vectors`` turns
    the codes into the codebook vectors its decoder sees."""

    def __init__(
        self, posterior, pmf, variables: int, categories: int, x_shape, levels: int, particles: int = 1, vectors=None
    ):
        import constriction

        super().__init__(posterior, pmf, variables, x_shape, levels, 1, particles)
        self.grid = Categories(categories)
        self._uniform = constriction.stream.model.Uniform(categories)
        self.vectors = vectors  # codes (n, V) -> what the decoder sees (VQ-VAE's codebook vectors); None: one-hot

    def _masses(self, x: Tensor) -> Tensor:
        return self.posterior(x).double()  # q(z_j = k|x), (V, K)

    def _values(self, z_index: np.ndarray) -> Tensor:
        index = torch.from_numpy(z_index.astype(np.int64))
        if self.vectors is not None:
            return self.vectors(index)
        return torch.nn.functional.one_hot(index, self.grid.categories).float().flatten(1)


class TwoLayerBitsBack(BitsBack):
    """BB-ANS for two latent layers with top-down inference (``models.hierarchical``): q(z2|x) q(z1|x, z2),
    p(z2) = N(0, I), p(z1|z2) a diagonal Gaussian, p(x|z1). z2 is on the grid of equal N(0, 1) mass; z1,
    once z2 is known (to the coder and the decoder alike), on the grid of equal mass under p(z1|z2), so
    that z1 too costs b bits per dimension and its buckets are fine where p(z1|z2) lives. To code x:
    pop z2 with Q(z2|x), pop z1 with Q(z1|x, z2), push x with p(x|z1), push z1 with P(z1|z2), push z2
    with P(z2). The net bits for the latents average KL2 + E KL1, the two KL terms of the hierarchical
    ELBO. (Bit-Swap interleaves the pops and pushes to need fewer initial bits; that needs bottom-up
    inference, q(z2|z1): :class:`BitSwap`.)

    ``posterior(x, z2)`` gives (mu, sigma) of q(z2|x) for z2 None, else of q(z1|x, z2); ``prior(z2)``
    those of p(z1|z2); ``pmf(z1)`` p(x|z1)'s tables."""

    def __init__(self, posterior, prior, pmf, dims: tuple[int, int], x_shape, levels: int, latent_bits: int):
        super().__init__(posterior, pmf, dims[0] + dims[1], x_shape, levels, latent_bits)
        self.prior, self.dims = prior, dims

    def _top(self, z2: np.ndarray) -> Tensor:
        return self.grid.centres[torch.from_numpy(z2.astype(np.int64))].float().view(1, -1)

    def _q_top(self, x: np.ndarray) -> np.ndarray:
        return self._table(self.posterior(self._image(x), None))

    def _bottom(self, x: np.ndarray | None, z2: np.ndarray) -> tuple[np.ndarray | None, Tensor, Tensor]:
        """Q(z1|x, z2)'s masses of the buckets of equal p(z1|z2) mass (None without x), and p(z1|z2)'s
        (mu, sigma), which place those buckets."""
        mu_p, sigma_p = (t.reshape(-1).double() for t in self.prior(self._top(z2)))
        if x is None:
            return None, mu_p, sigma_p
        mu_q, sigma_q = (t.reshape(-1).double() for t in self.posterior(self._image(x), self._top(z2)))
        q = self.grid.masses((mu_q - mu_p) / sigma_p, sigma_q / sigma_p)  # in p(z1|z2)'s standard units
        return floored(q.numpy()), mu_p, sigma_p

    def _p_x_bottom(self, z1: np.ndarray, mu_p: Tensor, sigma_p: Tensor) -> np.ndarray:
        values = mu_p + sigma_p * self.grid.centres[torch.from_numpy(z1.astype(np.int64))]
        return self._pixels(values.float().view(1, -1))

    @torch.no_grad()
    def encode(self, symbols: np.ndarray, seed: int = 0) -> tuple[np.ndarray, Costs]:
        symbols = np.ascontiguousarray(symbols, dtype=np.int32)
        coder = self._coder(self.initial_words(seed))
        costs = np.zeros((5, len(symbols)))

        with one_thread():
            for i, x in enumerate(symbols):
                q2 = self._q_top(x)
                z2 = coder.decode(self._categorical, q2)  # pop z2 with Q(z2|x)
                q1, mu_p, sigma_p = self._bottom(x, z2)
                z1 = coder.decode(self._categorical, q1)  # pop z1 with Q(z1|x, z2)
                p_x = self._p_x_bottom(z1, mu_p, sigma_p)
                coder.encode_reverse(x, self._categorical, p_x)  # push x with p(x|z1)
                coder.encode_reverse(z1, self._uniform)  # push z1 with P(z1|z2): b bits each
                coder.encode_reverse(z2, self._uniform)  # push z2 with P(z2)
                coded = p_x[np.arange(len(x)), x]
                pushed = self.grid.bits * self.latent_dim
                back = _bits(q2, z2) + _bits(q1, z1)
                costs[:, i] = (_bits(p_x, x), pushed, back, (coded <= FLOOR).sum(), back)  # both pops come first
        return coder.get_compressed(), Costs(*costs)

    @torch.no_grad()
    def decode(self, message: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, bool]:
        coder = self._coder(np.ascontiguousarray(message, dtype=np.uint32))
        out = np.zeros((n, math.prod(self.x_shape)), dtype=np.int32)
        with one_thread():
            for i in reversed(range(n)):
                self._left(coder, i)
                z2 = coder.decode(self._uniform, self.dims[0])  # pop z2 with P(z2)
                z1 = coder.decode(self._uniform, self.dims[1])  # pop z1 with P(z1|z2)
                _, mu_p, sigma_p = self._bottom(None, z2)
                out[i] = x = coder.decode(self._categorical, self._p_x_bottom(z1, mu_p, sigma_p))  # pop x
                coder.encode_reverse(z1, self._categorical, self._bottom(x, z2)[0])  # push z1 back with Q(z1|x, z2)
                coder.encode_reverse(z2, self._categorical, self._q_top(x))  # push z2 back with Q(z2|x)
        return out, self._returned(coder, seed)


def _bits(table: np.ndarray, symbols: np.ndarray) -> float:
    """-log2 of the probabilities ``table`` (n, symbols) gives the ``symbols`` (n,), summed."""
    return -float(np.log2(table[np.arange(len(symbols)), symbols]).sum())


ORDERS = ("bit-swap", "bb-ans")


class BitSwap(BitsBack):
    """Two latent layers with bottom-up inference (``models.hierarchical``, ``--inference bottom-up``):
    q(z1|x) q(z2|z1), p(z2) = N(0, I), p(z1|z2) a diagonal Gaussian, p(x|z1). z2 on the grid of equal
    N(0, 1) mass; z1 is popped before z2 is known, so its buckets cannot follow p(z1|z2) (as
    ``TwoLayerBitsBack``'s do): they have equal mass under N(m, s^2), the moments of the prior's marginal
    p(z1) = E_p(z2) p(z1|z2) per dimension (``z1_moments``), and p(z1|z2)'s masses of them come from its
    CDF, like q's.

    The Bit-Swap order (Kingma, Abbeel & Ho 2019), ``order`` "bit-swap": pop z1 with Q(z1|x), push x with
    p(x|z1), pop z2 with Q(z2|z1), push z1 with P(z1|z2), push z2 with P(z2). z2's pop takes bits that x
    has just put on the stack, so the first image needs initial bits for z1 alone. ``order`` "bb-ans":
    both pops first (pop z1, pop z2, push x, push z1, push z2), the same code length and more initial
    bits. The net bits for the latents average KL2 + KL1 of the bottom-up ELBO.

    ``posterior(x)`` gives (mu, sigma) of q(z1|x); ``top_posterior(z1)`` of q(z2|z1) and ``prior(z2)`` of
    p(z1|z2) for one latent (1, D); ``pmf(z1)`` p(x|z1)'s tables."""

    def __init__(
        self,
        posterior,
        top_posterior,
        prior,
        pmf,
        dims: tuple[int, int],
        x_shape,
        levels: int,
        latent_bits: int,
        z1_moments: tuple[Tensor, Tensor],
        order: str = "bit-swap",
    ):
        super().__init__(posterior, pmf, dims[0] + dims[1], x_shape, levels, latent_bits)
        self.top_posterior, self.prior, self.dims, self.order = top_posterior, prior, dims, order
        self.z1_loc, self.z1_scale = z1_moments

    def _z1_table(self, params: tuple[Tensor, Tensor]) -> np.ndarray:
        """A diagonal Gaussian's masses of z1's buckets (the grid in the units of z1's N(m, s^2))."""
        mu, sigma = (t.reshape(-1).double() for t in params)
        return self._table(((mu - self.z1_loc) / self.z1_scale, sigma / self.z1_scale))

    def _z1(self, index: np.ndarray) -> Tensor:
        """z1's value for its bucket indices (D1,): (1, D1)."""
        centres = self.grid.centres[torch.from_numpy(index.astype(np.int64))]
        return (self.z1_loc + self.z1_scale * centres).float()[None]

    def _q1(self, x: np.ndarray) -> np.ndarray:
        return self._z1_table(self.posterior(self._image(x)))

    @torch.no_grad()
    def encode(self, symbols: np.ndarray, seed: int = 0) -> tuple[np.ndarray, Costs]:
        symbols = np.ascontiguousarray(symbols, dtype=np.int32)
        coder = self._coder(self.initial_words(seed))
        costs = np.zeros((5, len(symbols)))
        swap = self.order == "bit-swap"
        with one_thread():
            for i, x in enumerate(symbols):
                q1 = self._q1(x)
                z1 = coder.decode(self._categorical, q1)  # pop z1 with Q(z1|x)
                z1_value = self._z1(z1)
                p_x = self._pixels(z1_value)
                if swap:
                    coder.encode_reverse(x, self._categorical, p_x)  # push x with p(x|z1)
                q2 = self._table(self.top_posterior(z1_value))
                z2 = coder.decode(self._categorical, q2)  # pop z2 with Q(z2|z1)
                if not swap:
                    coder.encode_reverse(x, self._categorical, p_x)  # push x with p(x|z1)
                p1 = self._z1_table(self.prior(self._values(z2[None])))
                coder.encode_reverse(z1, self._categorical, p1)  # push z1 with P(z1|z2)
                coder.encode_reverse(z2, self._uniform)  # push z2 with P(z2)
                coded = p_x[np.arange(len(x)), x]
                b1, b2, bx = _bits(q1, z1), _bits(q2, z2), _bits(p_x, x)
                peak = max(b1, b1 - bx + b2) if swap else b1 + b2
                pushed = _bits(p1, z1) + self.grid.bits * self.dims[1]
                costs[:, i] = (bx, pushed, b1 + b2, (coded <= FLOOR).sum(), peak)
        return coder.get_compressed(), Costs(*costs)

    @torch.no_grad()
    def decode(self, message: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, bool]:
        coder = self._coder(np.ascontiguousarray(message, dtype=np.uint32))
        out = np.zeros((n, math.prod(self.x_shape)), dtype=np.int32)
        swap = self.order == "bit-swap"
        with one_thread():
            for i in reversed(range(n)):
                self._left(coder, i)
                z2 = coder.decode(self._uniform, self.dims[1])  # pop z2 with P(z2)
                p1 = self._z1_table(self.prior(self._values(z2[None])))
                z1 = coder.decode(self._categorical, p1)  # pop z1 with P(z1|z2)
                z1_value = self._z1(z1)
                q2 = self._table(self.top_posterior(z1_value))
                if swap:
                    coder.encode_reverse(z2, self._categorical, q2)  # push z2 back with Q(z2|z1)
                out[i] = x = coder.decode(self._categorical, self._pixels(z1_value))  # pop x with p(x|z1)
                if not swap:
                    coder.encode_reverse(z2, self._categorical, q2)  # push z2 back with Q(z2|z1)
                coder.encode_reverse(z1, self._categorical, self._q1(x))  # push z1 back with Q(z1|x)
        return out, self._returned(coder, seed)


def z1_moments(prior, top_dim: int, draws: int = 4096) -> tuple[Tensor, Tensor]:
    """The mean and standard deviation per dimension of p(z1) = E_p(z2) p(z1|z2), ``prior(z2)`` giving
    (mu, sigma) of p(z1|z2): from ``draws`` seeded z2 ~ N(0, I), rounded (the mean to 1/16, the deviation
    to a power of 2^(1/8)) so that the coder and the decoder place z1's grid alike. (D1,) float64 each."""
    z2 = torch.randn(draws, top_dim, generator=torch.Generator().manual_seed(0))
    with one_thread(), torch.no_grad():
        mu, sigma = (t.double() for t in prior(z2))
    scale = (sigma.square().mean(0) + mu.var(0)).sqrt()
    return torch.round(mu.mean(0) * 16) / 16, torch.exp2(torch.round(torch.log2(scale) * 8) / 8)


class LabelBitsBack(BitsBack):
    """BB-ANS for semi-supervised M2 (``models.m2``) scored without labels: the label y is a latent too.
    To code x: pop y with q(y|x), pop z with q(z|x, y) on the grid of equal N(0, 1) mass, push x with
    p(x|y, z), push z with p(z) (b bits per dimension) and y with p(y) = Uniform(C) (log2 C bits). The net
    bits for y average KL(q(y|x) || Uniform(C)) in bits, those for z E_q(y|x) KL(q(z|x, y) || p(z)): the
    two KL terms of M2's unlabelled bound.

    ``classify(x)`` gives q(y|x), (C,); ``posterior(x, y)`` (mu, sigma) of q(z|x, y); ``pmf(z, y)`` p(x|y, z)'s
    tables."""

    def __init__(self, classify, posterior, pmf, latent_dim: int, classes: int, x_shape, levels: int, latent_bits: int):
        import constriction

        super().__init__(posterior, pmf, latent_dim + 1, x_shape, levels, latent_bits)  # z's dimensions and y
        self.classify, self.dims, self.classes = classify, latent_dim, classes
        self._label = constriction.stream.model.Uniform(classes)

    def _q_y(self, x: np.ndarray) -> np.ndarray:
        return floored(self.classify(self._image(x)).double().numpy()[None])  # (1, C)

    def _q_z(self, x: np.ndarray, y: int) -> np.ndarray:
        return self._table(self.posterior(self._image(x), torch.tensor([y])))

    def _p_x_given(self, z: np.ndarray, y: int) -> np.ndarray:
        return self._pixels(self._values(z.reshape(1, -1)), torch.tensor([y]))

    @torch.no_grad()
    def encode(self, symbols: np.ndarray, seed: int = 0) -> tuple[np.ndarray, Costs]:
        symbols = np.ascontiguousarray(symbols, dtype=np.int32)
        coder = self._coder(self.initial_words(seed))
        costs = np.zeros((5, len(symbols)))
        with one_thread():
            for i, x in enumerate(symbols):
                q_y = self._q_y(x)
                y = int(coder.decode(self._categorical, q_y)[0])  # pop y with q(y|x)
                q_z = self._q_z(x, y)
                z = coder.decode(self._categorical, q_z)  # pop z with q(z|x, y)
                p_x = self._p_x_given(z, y)
                coder.encode_reverse(x, self._categorical, p_x)  # push x with p(x|y, z)
                coder.encode_reverse(z, self._uniform)  # push z with p(z)
                coder.encode_reverse(np.array([y], dtype=np.int32), self._label)  # push y with p(y)
                coded = p_x[np.arange(len(x)), x]
                back = -math.log2(q_y[0, y]) - float(np.log2(q_z[np.arange(self.dims), z]).sum())
                pushed = self.grid.bits * self.dims + math.log2(self.classes)
                costs[:, i] = (-np.log2(coded).sum(), pushed, back, (coded <= FLOOR).sum(), back)  # y's, z's pops first
        return coder.get_compressed(), Costs(*costs)

    @torch.no_grad()
    def decode(self, message: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, bool]:
        coder = self._coder(np.ascontiguousarray(message, dtype=np.uint32))
        out = np.zeros((n, math.prod(self.x_shape)), dtype=np.int32)
        with one_thread():
            for i in reversed(range(n)):
                self._left(coder, i)
                y = int(coder.decode(self._label, 1)[0])  # pop y with p(y)
                z = coder.decode(self._uniform, self.dims)  # pop z with p(z)
                out[i] = x = coder.decode(self._categorical, self._p_x_given(z, y))  # pop x with p(x|y, z)
                coder.encode_reverse(z, self._categorical, self._q_z(x, y))  # push z back with q(z|x, y)
                coder.encode_reverse(np.array([y], dtype=np.int32), self._categorical, self._q_y(x))  # and y
        return out, self._returned(coder, seed)


def model_coder(
    model, levels: int, latent_bits: int, particles: int = 1, order: str = "bb-ans", coupled: bool = False
) -> BitsBack:
    """BB-ANS (BB-IS with ``particles`` > 1) for a trained model with a discrete likelihood of ``levels``
    pixel values: one latent layer (``models.base.VAE``) with a diagonal Gaussian posterior and a
    standard normal prior, or categorical variables and the uniform prior (``latent_bits`` unused), or
    two Gaussian layers (``models.hierarchical``, BB-ANS only; with bottom-up inference in the Bit-Swap
    ``order``, or "bb-ans"). ``coupled``: BB-IS's particles from one uniform (one Gaussian layer)."""

    def pmf(z: Tensor, at: Tensor | None = None) -> Tensor:
        return model.likelihood.pmf(model.decoder(z).float(), at)

    def params(q) -> tuple[Tensor, Tensor]:
        return q.base_dist.loc, q.base_dist.scale

    if m2_of(model) is not None:  # the label a latent too

        def classify(x: Tensor) -> Tensor:
            return model.classify(x).probs[0, 0]  # (C,)

        def label_posterior(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            return params(model.encode(x, y))  # q(z|x, y)

        def label_pmf(z: Tensor, y: Tensor) -> Tensor:
            return model.likelihood.pmf(model._decoder_out(z, y).float())

        return LabelBitsBack(
            classify, label_posterior, label_pmf, model.latent_dim, model.classes, model.x_shape, levels, latent_bits
        )

    dims = tuple(model.layer_dims.values())  # top first
    if len(dims) == 2 and model.inference == "bottom-up":

        def p_bottom(z2: Tensor) -> tuple[Tensor, Tensor]:
            return params(model._p_bottom(z2))  # p(z1|z2)

        return BitSwap(
            lambda x: params(model._q_z1(x)),  # q(z1|x)
            lambda z1: params(model._q_z2(z1)),  # q(z2|z1)
            p_bottom,
            pmf,
            (dims[1], dims[0]),
            model.x_shape,
            levels,
            latent_bits,
            z1_moments(p_bottom, dims[0]),
            order,
        )
    if len(dims) == 2:

        def posterior(x: Tensor, z2: Tensor | None) -> tuple[Tensor, Tensor]:
            if z2 is None:
                return params(model.encode(x))  # q(z2|x)
            return params(model._q_bottom(model._bottom_up(x)[0], z2))  # q(z1|x, z2)

        def prior(z2: Tensor) -> tuple[Tensor, Tensor]:
            return params(model._p_bottom(z2))

        return TwoLayerBitsBack(posterior, prior, pmf, dims, model.x_shape, levels, latent_bits)

    def one_layer(x: Tensor) -> tuple[Tensor, Tensor]:
        return params(model.encode(x))

    discrete = categorical_posterior_of(model) or vq_posterior_of(model)
    if discrete is not None:

        def probs(x: Tensor) -> Tensor:
            return model.encode(x).probs[0]  # (V, K)

        V, K = discrete.variables, discrete.categories
        vectors = getattr(discrete, "vectors", None)  # VQ-VAE's codebook
        return CategoricalBitsBack(probs, pmf, V, K, model.x_shape, levels, particles, vectors)

    if coupled:
        return CoupledBitsBack(one_layer, pmf, model.latent_dim, model.x_shape, levels, latent_bits, particles)
    return BitsBack(one_layer, pmf, model.latent_dim, model.x_shape, levels, latent_bits, particles)
