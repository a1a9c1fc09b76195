"""``vaelab compress`` and ``vaelab decompress``: a trained run as a lossless image compressor by
bits-back coding (``vaelab.bitsback``), and the KL term as the bits the latent costs.

The file holds a header (JSON: the model's identity, the images' count, shape, pixel levels and
SHA-256, the latent grid, how to write the images back), the ANS message, and a SHA-256 of all of
it. ``decompress`` decodes with the run the header names (or ``--run``), checks the model's
identity first and the images' SHA-256 and the returned initial bits last, and writes nothing
unless all three hold.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import json
import lzma
import math
import os
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaelab import memory, rundir
from vaelab.bitsback import (
    MAX_LATENT_BITS,
    ORDERS,
    BitsBack,
    BitSwap,
    CategoricalBitsBack,
    LabelBitsBack,
    TwoLayerBitsBack,
    model_coder,
)
from vaelab.config import SEED_LIMIT, Config
from vaelab.data.sources import IMAGE_SUFFIXES, load_array, load_folder, read_idx, validate
from vaelab.errors import UserError
from vaelab.evaluation import evaluate, open_trained, weights_sha256
from vaelab.fileio import atomic_write_bytes, atomic_write_text, loads_finite
from vaelab.parts import FAMILIES, LIKELIHOODS, POSTERIORS, PRIORS

MAGIC = b"vaelab bits-back\n"
RECORD = "compression.json"  # in the run directory: the last compression of the run's own split
VERSION = 2  # 2: the run's path relative to the file, the images' check keyed by the model, no host details
VERSIONS = (1, 2)
MAX_PARTICLES = 1000
DEFAULT_LATENT_BITS = 8  # docs/tutorial.md, "The KL term as bits": 6 to 12 bits code within 0.1 % of each other
# the Config fields that make the model: with the weights, the identity a file is decoded against
MODEL_FIELDS = (
    "family",
    "conditional",
    "classes",
    "model",
    "hidden",
    "activation",
    "latent_dim",
    "top_latent_dim",
    "top_hidden",
    "posterior",
    "posterior_rank",
    "flow_steps",
    "likelihood",
    "prior",
    "prior_components",
)
LAYOUTS = ("NCHW", "NHW", "NHWC")


def model_identity(model: torch.nn.Module, config: Config) -> str:
    """SHA-256 of the model's weights (names, dtypes, shapes, bytes) and the config fields that build it."""
    # a discrete posterior's categories and code size too (only there: a file of a Gaussian run keeps its identity)
    names = MODEL_FIELDS + (("categories", "code_dim") if POSTERIORS[config.posterior].discrete else ())
    names += ("inference",) if config.inference != "top-down" else ()  # (top-down files keep their identity)
    values = config.to_dict() | {"conditional": FAMILIES[config.family].labels}  # once a field: files keep their id
    h = hashlib.sha256(json.dumps({k: values.get(k) for k in names}, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d (a temperature) too
    return h.hexdigest()


def coding_levels(config: Config) -> int:
    """The pixel values a run's likelihood gives probabilities to; a density is refused with why."""
    likelihood = LIKELIHOODS[config.likelihood]
    if not likelihood.discrete:
        raise UserError(
            f"the run's {likelihood.name} likelihood is a density: it gives no probability to a pixel value, so it "
            "cannot code images; compress with a run trained with --likelihood bernoulli (binary images) or logistic "
            "(8-bit images)"
        )
    return 2 if likelihood.binary_only else likelihood.levels


def check_codable(config: Config, particles: int = 1) -> None:
    """BB-ANS here codes one latent layer with a diagonal Gaussian posterior and a N(0, I) prior, or the
    two layers of the hierarchical family; BB-IS one layer."""
    layers = FAMILIES[config.family].layers
    if layers > 1 and particles > 1:
        raise UserError(
            f"--particles {particles}: importance-sampled bits-back (BB-IS) here codes one latent layer, and "
            f"--family {config.family} has {layers}; use --particles 1 (BB-ANS codes both layers)"
        )
    if config.labelled and particles > 1:
        raise UserError(
            f"--particles {particles}: importance-sampled bits-back (BB-IS) here codes one latent layer, and M2 "
            "(--labelled) codes its label and z; use --particles 1"
        )
    if config.labelled and config.classes < 2:  # (vaelab refuses to train one since; constriction panics)
        raise UserError(f"this M2 run classifies into {config.classes} class: its label carries nothing to code")
    problems = []
    if FAMILIES[config.family].labels:  # (M2's labels are latents: coded by bits-back like z)
        problems.append(f"--family {config.family} (the labels would have to be coded too)")
    posterior = POSTERIORS[config.posterior]
    if not posterior.factorises or not (posterior.gaussian or posterior.discrete):
        problems.append(f"--posterior {config.posterior}")
    if not PRIORS[config.prior].factorises:
        problems.append(f"--prior {config.prior}")
    if problems:
        raise UserError(
            f"bits-back coding here needs diagonal or categorical posteriors and a prior that factorises, and no "
            f"labels; the run has {', '.join(problems)}. Train a run with --posterior diagonal --prior normal (or "
            "--posterior categorical) to compress"
        )
    coding_levels(config)


SCHEMES = ("bb-ans", "bit-swap", "bb-is", "bb-cis")  # a file's "coder"


def check_scheme(config: Config, order: str | None, particles: int, coupled: bool) -> str:
    """The coder of a run (one of :data:`SCHEMES`): BB-IS with ``particles`` > 1 (coupled: BB-CIS, for a
    Gaussian latent); else the order of a two-layer code, Bit-Swap where inference is bottom-up (the
    default there), else BB-ANS (the default, and the only order of every other run)."""
    if coupled and particles == 1:
        raise UserError("--coupled draws BB-IS's particles from one uniform; add --particles K (K > 1)")
    if coupled and POSTERIORS[config.posterior].discrete:
        raise UserError(
            f"--coupled draws the particles of a Gaussian latent from one uniform; this run's z is categorical "
            f"(--posterior {config.posterior}): drop --coupled (BB-IS pops its particles one by one)"
        )
    if particles > 1:
        if order is not None:
            raise UserError(f"--order sets how two latent layers are coded; with --particles {particles} drop it")
        return "bb-cis" if coupled else "bb-is"
    bottom_up = FAMILIES[config.family].layers > 1 and config.inference == "bottom-up"
    if order is None:
        return "bit-swap" if bottom_up else "bb-ans"
    if order not in ORDERS:
        raise UserError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "bit-swap" and not bottom_up:
        raise UserError(
            "--order bit-swap pops z2 with q(z2|z1) after pushing x, which needs a run of --family hierarchical "
            "--inference bottom-up; this run has "
            + ("top-down inference, q(z2|x) q(z1|x,z2)" if FAMILIES[config.family].layers > 1 else "one latent layer")
            + ": drop --order (its code is BB-ANS)"
        )
    return order


def read_record(run_dir: Path, sha: str | None = None) -> dict | None:
    """RUN/compression.json, what ``compress`` measured on the run's own split, when it is of these weights
    (``sha``, else hashed here); None where there is none or it is of other weights; a torn one is refused."""
    path = Path(run_dir) / RECORD
    if not path.exists():
        return None
    fields = ("weights_sha256", "split", "images", "dimensions", "particles", "latent_bits", "per_image")
    try:
        record = loads_finite(path.read_text())
        [record[k] for k in fields]
        if not _whole(record["images"]) or not _whole(record["dimensions"]) or record["dimensions"] < 1:
            raise TypeError("images or dimensions")
        for name in PER_IMAGE:  # what the report and the page draw of each image
            values = record["per_image"][name]
            if len(values) != record["images"] or not all(_number(v) for v in values):
                raise TypeError(name)
        if not all(_number(record["bits_per_image"][name]) for name in PER_IMAGE):
            raise TypeError("bits_per_image")
        if not record["general_purpose_bits"] or not all(map(_number, dict(record["general_purpose_bits"]).values())):
            raise TypeError("general_purpose_bits")
    except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
        raise UserError(f"{path} is torn or was edited; run vaelab compress {run_dir} -o FILE again") from None
    return record if record["weights_sha256"] == (sha or weights_sha256(run_dir)) else None


# -- the images -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Images:
    """Images as pixel levels, and how to write them back exactly as they were read."""

    symbols: np.ndarray  # (N, C H W) int32, level i meaning the value i / (levels - 1)
    x_shape: tuple[int, int, int]
    levels: int
    dtype: str  # uint8, float32 or float64
    layout: str  # NCHW, NHW or NHWC
    where: str

    def x(self) -> torch.Tensor:
        """As the model sees them: float32 (N, C, H, W) in [0, 1]."""
        return torch.from_numpy(self.symbols.astype(np.float32) / (self.levels - 1)).view(-1, *self.x_shape)

    def array(self) -> np.ndarray:
        return restore(self.symbols, self.x_shape, self.levels, self.dtype, self.layout)


def restore(symbols: np.ndarray, x_shape, levels: int, dtype: str, layout: str) -> np.ndarray:
    """The array the images were read from: uint8 values 0 to 255 (binary: 0 and 255), or floats in [0, 1]."""
    x = symbols.reshape(-1, *x_shape)
    if dtype == "uint8":
        x = (x * (255 // (levels - 1))).astype(np.uint8)
    else:
        x = (x / np.asarray(levels - 1, dtype=dtype)).astype(dtype)
    if layout == "NHW":
        return x[:, 0]
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if layout == "NHWC" else x


def _layout(raw: np.ndarray) -> str:
    """How ``sources.validate`` reads an array's axes."""
    if raw.ndim == 3:
        return "NHW"
    return "NHWC" if raw.shape[-1] in (1, 3) and raw.shape[1] not in (1, 3) else "NCHW"


def read_images(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Images from a .npy/.npz file, a folder of PNG/JPEG images or an IDX file: (the array as stored
    or None for a folder, float32 (N, C, H, W) in [0, 1], the layout)."""
    path = Path(path)
    if path.is_dir():
        raw, _ = load_folder(path, exact=True)  # coded exactly, or refused
        return None, validate(raw, None, str(path)), _layout(raw)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a .npy/.npz file, a folder of images or an IDX file")
    if path.suffix in (".npy", ".npz"):
        raw, _ = load_array(path)
    elif "idx3" in path.name or path.suffix == ".gz" and "idx" in path.name:
        raw = read_idx(path)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"{path} is one image; put the images to compress in a folder and give the folder")
    else:
        raise UserError(f"{path} is not a .npy/.npz file, a folder of images or an IDX file (…-idx3-ubyte[.gz])")
    raw = np.asarray(raw)
    if raw.dtype not in (np.uint8, np.float32, np.float64):
        raise UserError(f"{path} holds {raw.dtype} values; save uint8 images, or floats in [0, 1]")
    return raw, validate(raw, None, str(path)), _layout(raw)


def as_levels(x: np.ndarray, levels: int, where: str, likelihood: str) -> np.ndarray:
    """The pixel levels (N, C H W) int32 of images in [0, 1]; images between the levels are refused."""
    symbols = np.rint(x * (levels - 1)).astype(np.int32)
    if not np.array_equal(symbols.astype(np.float32) / np.float32(levels - 1), x):
        kind = "binary images (every pixel 0 or 1)" if levels == 2 else f"images of {levels} grey levels (8-bit)"
        raise UserError(
            f"{where} has pixel values that are not those of {kind}, which a {likelihood} model codes; give "
            + ("binarised images, or compress with a run of --likelihood logistic" if levels == 2 else "8-bit images")
        )
    return symbols.reshape(len(x), -1)


def images_of(trained, images: Path | None, split: str) -> Images:
    """The images to code: the run's own ``split`` as the model sees them, or the file or folder ``images``."""
    levels, model, config = coding_levels(trained.config), trained.model, trained.config
    if images is None:
        x = trained.examples(split).x.numpy()
        C = x.shape[1]
        where, dtype, layout = f"{trained.splits.name} ({split} split)", "uint8", "NHW" if C == 1 else "NHWC"
        raw = None
    else:
        raw, x, layout = read_images(images)
        where, dtype = str(images), "uint8" if raw is None else raw.dtype.name
    if tuple(x.shape[1:]) != tuple(model.x_shape):
        raise UserError(
            f"{where} has images of shape {tuple(x.shape[1:])}, the run's model codes {tuple(model.x_shape)}; give "
            "images of the shape it was trained on"
        )
    symbols = as_levels(x, levels, where, config.likelihood)
    out = Images(symbols, tuple(model.x_shape), levels, dtype, layout, where)
    if raw is not None and not np.array_equal(out.array(), raw):
        raise UserError(f"{where}'s values cannot be written back exactly from its pixel levels; save it as uint8")
    return out


# -- what other coders make of the same images -------------------------------------------------
def general_purpose_bits(images: Images) -> dict[str, float]:
    """Bits for all the images: gzip, bz2 and lzma (the standard library, strongest settings) on the
    pixel levels, one byte each; PNG and lossless WebP (Pillow) one file per image, as they are stored."""
    from PIL import Image

    raw = images.symbols.astype(np.uint8).tobytes()
    bits = {
        "gzip -9": 8 * len(gzip.compress(raw, 9, mtime=0)),
        "bz2 -9": 8 * len(bz2.compress(raw, 9)),
        "lzma (xz -9e)": 8 * len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)),
    }
    pictures = restore(images.symbols, images.x_shape, images.levels, "uint8", "NHWC")
    binary = images.levels == 2 and images.x_shape[0] == 1
    for name, kw in (
        ("PNG", {"format": "PNG", "optimize": True}),
        ("WebP lossless", {"format": "WEBP", "lossless": True, "quality": 100, "method": 6}),
    ):
        total = 0
        for picture in pictures:
            im = Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture)
            if binary and name == "PNG":
                im = im.convert("1", dither=Image.Dither.NONE)  # a 1-bit PNG
            buf = io.BytesIO()
            im.save(buf, **kw)
            total += buf.tell()
        bits[f"{name} (a file per image)"] = 8 * total
    return bits


# -- the file ---------------------------------------------------------------------------------
def images_check(identity: str, array: np.ndarray) -> str:
    """SHA-256 of the model's identity and the images' bytes: the decode's last check. Keyed by the model,
    so that the file confirms a guess of its images only to whoever holds the model (who can decode it)."""
    return hashlib.sha256(identity.encode() + array.tobytes()).hexdigest()


# a header's fields (version 2): what each must be, checked before anything is allocated or opened
HEADER = {
    "version": lambda v: v in VERSIONS,
    "coder": lambda v: v in SCHEMES,
    "particles": lambda v: _whole(v) and 1 <= v <= MAX_PARTICLES,
    "run": lambda v: isinstance(v, str) and 0 < len(v) < 4096 and "\0" not in v,
    "model": lambda v: _hex64(v),
    "latent_bits": lambda v: _whole(v) and 1 <= v <= MAX_LATENT_BITS,
    "seed": lambda v: _whole(v) and 0 <= v < SEED_LIMIT,
    "images": lambda v: _whole(v) and 1 <= v <= 2**40,
    "x_shape": lambda v: isinstance(v, list) and len(v) == 3 and all(_whole(d) and d >= 1 for d in v),
    "levels": lambda v: v in (2, 256),
    "dtype": lambda v: v in ("uint8", "float32", "float64"),
    "layout": lambda v: v in LAYOUTS,
}
CHECKS = {1: "images_sha256", 2: "images_check"}  # version 1 held the images' plain SHA-256


# the per-image numbers every record holds (BB-IS and two layers add their own)
PER_IMAGE = ("pixels", "z_pushed", "z_back", "z_net", "kl", "net", "neg_elbo", "capped_pixels")


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _hex64(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def check_header(header, path: Path) -> dict:
    """Refuse a header whose fields are missing, of another type or out of range (a checksum is no
    signature: anyone can edit the header and compute it again)."""
    if not isinstance(header, dict):
        raise UserError(f"{path} is damaged (its header is not a JSON object); compress again")
    fields = {**HEADER, CHECKS.get(header.get("version"), "images_check"): _hex64}
    bad = next((name for name, ok in fields.items() if name not in header or not ok(header[name])), None)
    if bad == "version":
        raise UserError(f"{path} is of format version {header.get('version')!r}; this vaelab reads versions 1 and 2")
    if bad is not None:
        raise UserError(f"{path} is damaged (its header's {bad!r} is missing or out of range); compress again")
    return header


def pack(header: dict, message: np.ndarray) -> bytes:
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(head)) + head + message.astype("<u4").tobytes()
    return body + hashlib.sha256(body).digest()


def unpack(path: Path) -> tuple[dict, np.ndarray]:
    """The header and the message of a file ``compress`` wrote; a damaged or foreign file is refused."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a folder, a device (/dev/zero reads for ever), a pipe
        raise UserError(f"{path} is not a file vaelab compress wrote (not a regular file)")
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path} does not exist") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if not blob.startswith(MAGIC):
        raise UserError(f"{path} is not a file vaelab compress wrote (its first bytes differ)")
    body, digest = blob[:-32], blob[-32:]
    start = len(MAGIC) + 4
    if len(blob) < start + 32 or hashlib.sha256(body).digest() != digest:
        raise UserError(f"{path} is damaged (truncated or changed: its SHA-256 does not match); compress again")
    (n,) = struct.unpack("<I", body[len(MAGIC) : start])
    try:
        header = check_header(json.loads(body[start : start + n]), path)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{path} is damaged (its header is not JSON); compress again") from None
    words = body[start + n :]
    if len(words) % 4 or not words:
        raise UserError(f"{path} is damaged (its message is not whole 32-bit words); compress again")
    return header, np.frombuffer(words, dtype="<u4").astype(np.uint32)


# -- the commands -------------------------------------------------------------------------------


def compress(
    run,
    out,
    *,
    images=None,
    split: str = "test",
    latent_bits: int | None = None,
    particles: int = 1,
    seed: int = 0,
    iwae_k: int = 1000,
    overwrite: bool = False,
    order: str | None = None,
    coupled: bool = False,
) -> dict:
    """``vaelab compress``: code ``images`` (a file or folder; default the run's ``split``) with the run's
    model into ``out`` by BB-ANS (``particles`` 1; two layers inferred bottom-up in Bit-Swap's ``order``)
    or BB-IS (``particles`` K > 1; its K particles from one uniform if ``coupled``), check the file by
    decoding it, and return every number (bits per image, bits per dimension) beside the model's
    -ELBO, its IWAE estimate of -log2 p(x) and general-purpose coders."""
    out = Path(out)
    if latent_bits is not None and not 1 <= latent_bits <= MAX_LATENT_BITS:
        raise UserError(f"--latent-bits must be 1 to {MAX_LATENT_BITS}, got {latent_bits}")
    if iwae_k < 0:
        raise UserError(f"--iwae-k must be >= 0, got {iwae_k}")
    if not 1 <= particles <= MAX_PARTICLES:
        raise UserError(f"--particles must be 1 to {MAX_PARTICLES}, got {particles}")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; choose another -o, or add --overwrite")
    run = Path(run)
    trained = open_trained(run, with_data=images is None)  # given images: the model is all it needs
    check_codable(trained.config, particles)
    scheme = check_scheme(trained.config, order, particles, coupled)
    if POSTERIORS[trained.config.posterior].discrete and latent_bits is not None:
        raise UserError(
            f"--latent-bits sets the grid of a Gaussian latent; this run's z is {trained.config.latent_dim} "
            f"categorical variables, coded as their {trained.config.categories} categories: drop --latent-bits"
        )
    latent_bits = latent_bits or DEFAULT_LATENT_BITS
    data = images_of(trained, images, split)
    # the run's own split: its record goes into the run, for its report (a read-only run keeps none)
    records = images is None and run.is_dir() and os.access(run, os.W_OK)
    with rundir.lock(run, "compressing") if records else contextlib.nullcontext():  # taken once the input is good
        summary = _compress(trained, data, run, out, latent_bits, particles, seed, iwae_k, scheme)
        if records:
            record = {**summary, "split": split, "weights_sha256": weights_sha256(run)}
            atomic_write_text(run / RECORD, json.dumps(record, indent=1))
    return summary


def scheme_coder(model, levels: int, latent_bits: int, particles: int, scheme: str) -> BitsBack:
    """The coder of ``scheme`` (one of :data:`SCHEMES`, a file's "coder") for a model."""
    order = scheme if scheme in ORDERS else "bb-ans"
    tables = particles * sum(model.layer_dims.values()) * 2**latent_bits * 8  # q's float64 table for each particle
    memory.require(
        tables, f"{particles} particles on a grid of 2^{latent_bits} buckets", "use fewer --particles or --latent-bits"
    )
    return model_coder(model, levels, latent_bits, particles, order, coupled=scheme == "bb-cis")


def _compress(trained, data: Images, run: Path, out: Path, latent_bits, particles, seed, iwae_k, scheme) -> dict:
    levels, N = data.levels, len(data.symbols)
    coder = scheme_coder(trained.model, levels, latent_bits, particles, scheme)
    start = time.perf_counter()
    message, costs = coder.encode(data.symbols, seed)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded, returned = coder.decode(message, N, seed)
    decode_s = time.perf_counter() - start
    if not returned or not np.array_equal(decoded, data.symbols):
        raise UserError(
            "the message does not decode to the images on this machine; nothing was written (a bug: report it)"
        )
    identity = model_identity(trained.model, trained.config)
    header = {
        "version": VERSION,
        "coder": scheme,
        "particles": particles,
        "run": os.path.relpath(Path(run).resolve(), out.resolve().parent),  # from the file's folder
        "model": identity,
        "latent_bits": latent_bits,
        "seed": seed,
        "images": N,
        "x_shape": list(data.x_shape),
        "levels": levels,
        "dtype": data.dtype,
        "layout": data.layout,
        "images_check": images_check(identity, data.array()),
    }
    blob = pack(header, message)
    atomic_write_bytes(out, blob)
    summary = _summary(trained, data, coder, costs, message, blob, iwae_k, seed, encode_s, decode_s)
    return {"file": str(out), "coder": scheme, **summary}


def _summary(trained, data: Images, coder: BitsBack, costs, message, blob, iwae_k, seed, encode_s, decode_s) -> dict:
    """Every number of a compression: per image and their means, in bits."""
    N, P, particles = len(data.symbols), data.symbols.shape[1], coder.particles
    x = data.x()
    record, per = evaluate(trained.model, x, iwae_k=iwae_k, pixels=P, take_kl_apart=False, seed=seed)
    to_bits = 1 / math.log(2)
    q_grid = (  # several latents, one below another: no single sum over one grid
        np.array([coder.expected_z_net(x[i : i + 1]) for i in range(len(x))])
        if not isinstance(coder, TwoLayerBitsBack | BitSwap | LabelBitsBack)
        else None
    )
    per_image = {
        "pixels": costs.pixels,
        "z_pushed": costs.z_pushed,
        "z_back": costs.z_back,
        "z_net": costs.z_net,
        "z_net_expected": q_grid,
        "kl": per["kl"].double().numpy() * to_bits,
        "net": costs.net,
        "neg_elbo": -per["elbo"].double().numpy() * to_bits,
        "capped_pixels": costs.capped,
    }
    if q_grid is None:
        del per_image["z_net_expected"]  # two layers: KL1 at each z2, no sum over one grid
    if "log_likelihood" in per:
        per_image["neg_log2_px"] = -per["log_likelihood"].double().numpy() * to_bits
    mean = {k: float(v.mean()) for k, v in per_image.items()}
    # a Gaussian grid's costs at other grids (one layer): coarse buckets, a cheap latent and dear pixels
    sweep = coder.latent_bits_sweep(data.symbols, seed=seed) if type(coder) is BitsBack and particles == 1 else None
    return {
        "images": N,
        "where": data.where,
        "x_shape": list(data.x_shape),
        "dimensions": P,
        "likelihood": trained.config.likelihood,
        "latent_dim": coder.latent_dim,
        "layers": 2 if isinstance(coder, TwoLayerBitsBack | BitSwap | LabelBitsBack) else 1,
        "inference": trained.config.inference if isinstance(coder, TwoLayerBitsBack | BitSwap) else None,
        "label_classes": coder.classes if isinstance(coder, LabelBitsBack) else None,  # M2: y coded as a latent
        "latent_bits": coder.grid.bits,  # per dimension; log2 K for a categorical variable of K categories
        "categories": coder.grid.categories if isinstance(coder, CategoricalBitsBack) else None,
        "codebook": isinstance(coder, CategoricalBitsBack) and coder.vectors is not None,  # VQ-VAE's codes
        "particles": particles,
        "iwae_k": iwae_k if "log_likelihood" in per else None,
        "bits_per_image": mean,
        "initial_bits": 32 * len(coder.initial_words(seed)),
        # what the stack had to hold before the first image: the initial bits this message needed
        "initial_bits_needed": costs.initial_bits_needed(),
        "message_bits": 32 * len(message),
        "file_bits": 8 * len(blob),
        "general_purpose_bits": general_purpose_bits(data),
        "latent_bits_sweep": sweep,
        "encode_seconds": encode_s,
        "decode_seconds": decode_s,
        "per_image": {k: [round(float(v), 4) for v in values] for k, values in per_image.items()},
    }


def decompress(path, out, *, run=None, overwrite: bool = False) -> dict:
    """``vaelab decompress``: the images of ``path``, exactly as they were compressed, into ``out`` (a
    .npy file, or a folder of PNG files); nothing is written unless the decoded images are the ones
    coded (their SHA-256) and the initial bits come back."""
    path, out = Path(path), Path(out)
    header, message = unpack(path)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; choose another -o, or add --overwrite")
    if out.suffix != ".npy":
        check_png_folder(out)
    # the run the header names is relative to the file's folder (version 1 named it absolutely)
    run = Path(run) if run is not None else path.resolve().parent / header["run"]
    if not run.exists():
        raise UserError(f"{path} was coded with the run {run}, which is not there; give the run with --run RUN")
    trained = open_trained(run, with_data=False)  # the model is all decoding needs
    identity = model_identity(trained.model, trained.config)
    if identity != header["model"]:
        raise UserError(
            f"{run} is not the model {path} was coded with (their weights or architecture differ); give that run "
            "with --run RUN"
        )
    levels, x_shape, n = header["levels"], tuple(header["x_shape"]), header["images"]
    if x_shape != tuple(trained.model.x_shape) or levels != coding_levels(trained.config):
        raise UserError(f"{path} is damaged (its header's image shape or levels are not its model's); compress again")
    pixels = math.prod(x_shape)
    memory.require(n * pixels * (4 + 8 + 1), f"the {n:,} images {path} declares", "decompress a file of fewer images")
    coder = scheme_coder(trained.model, levels, header["latent_bits"], header["particles"], header["coder"])
    start = time.perf_counter()
    symbols, returned = coder.decode(message, n, header["seed"])
    seconds = time.perf_counter() - start
    array = restore(symbols, x_shape, levels, header["dtype"], header["layout"])
    check = images_check(identity, array) if header["version"] > 1 else hashlib.sha256(array.tobytes()).hexdigest()
    if not returned or check != header[CHECKS[header["version"]]]:
        raise UserError(
            f"decoding {path} does not give back the images that were coded (its header was edited, or this "
            "machine's arithmetic gives the model other probabilities than the one that coded it); nothing was "
            "written. Decompress it on a machine like the one that compressed it"
        )
    if out.suffix == ".npy":
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        atomic_write_bytes(out, buf.getvalue())
    else:
        write_pngs(restore(symbols, x_shape, levels, "uint8", "NHWC"), out)
    return {"file": str(out), "images": len(array), "decode_seconds": seconds}


PNG_NAME = re.compile(r"[0-9]{6}\.png")  # what decompress names its PNG files


def check_png_folder(out: Path) -> None:
    """An existing folder is replaced (``--overwrite``) only if it holds nothing but decompress's PNGs."""
    if out.is_dir() and not out.is_symlink():
        other = next((p.name for p in out.iterdir() if not PNG_NAME.fullmatch(p.name) or not p.is_file()), None)
        if other is not None:
            raise UserError(
                f"{out} holds {other}, which decompress did not write; --overwrite replaces only a folder of "
                "decompress's PNGs: choose another -o"
            )
    elif out.is_symlink():
        raise UserError(f"{out} is a symbolic link; give a folder or a .npy file")


def write_pngs(pictures: np.ndarray, out: Path) -> None:
    """One PNG per image, 000000.png on, into the folder ``out``: a new folder appears whole (written
    beside it, then renamed); an existing one (``--overwrite``, a folder of decompress's PNGs alone) gets
    each file atomically, and its PNGs beyond these images go."""
    from PIL import Image

    def save(folder: Path) -> None:
        for i, picture in enumerate(pictures):
            buf = io.BytesIO()
            Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(buf, format="PNG")
            atomic_write_bytes(folder / f"{i:06d}.png", buf.getvalue())

    if out.is_dir():
        check_png_folder(out)
        save(out)
        for stale in out.iterdir():  # another file's images beyond these: decompress's names, checked above
            if PNG_NAME.fullmatch(stale.name) and int(stale.name[:6]) >= len(pictures):
                stale.unlink()
        return
    if out.exists():
        raise UserError(f"{out} is a file; give a folder for PNG images, or a .npy file")
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist; create it first")
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    except OSError as err:  # a read-only mount, a full disk
        raise UserError(f"cannot create {out}: {err.strerror or err}; check the folder is writable") from None
    try:
        save(tmp)
        try:
            tmp.rename(out)  # the folder appears whole; one made meanwhile by something else is not replaced
        except OSError as err:
            raise UserError(f"{out} appeared while decoding ({err.strerror}); nothing was written there") from None
    except BaseException:
        for f in tmp.glob("*"):
            f.unlink()
        tmp.rmdir()
        raise


# -- the table ----------------------------------------------------------------------------------
def latent_code(s: dict) -> str:
    """How a compression's summary coded z, in words."""
    if s.get("label_classes"):
        return (
            f"the label y of {s['label_classes']} classes as a latent, and z of {s['latent_dim'] - 1} dimensions on "
            f"a grid of 2^{s['latent_bits']} buckets each"
        )
    if s.get("categories"):
        what = "positions of a codebook of" if s.get("codebook") else "categorical variables of"
        return (
            f"z of {s['latent_dim']} {what} {s['categories']} categories, each pushed uniformly "
            f"at log2 {s['categories']} = {s['latent_bits']:.2f} bits"
        )
    return f"z of {s['latent_dim']} dimensions on a grid of 2^{s['latent_bits']} buckets each"


def coder_name(s: dict) -> str:
    """The coder of a compression's summary (or record), in words."""
    K = s["particles"]
    names = {"bit-swap": "Bit-Swap", "bb-is": f"BB-IS with {K} particles", "bb-cis": f"BB-CIS ({K} coupled particles)"}
    return names.get(s.get("coder"), "BB-ANS" if K == 1 else f"BB-IS with {K} particles")  # records before "coder"


def format_summary(s: dict) -> str:
    """The table ``vaelab compress`` prints: bits per image and per dimension, mean over the images."""
    b, P, N, K = s["bits_per_image"], s["dimensions"], s["images"], s["particles"]

    def row(label: str, bits: float, per_image: bool = True) -> str:
        per = bits if per_image else bits / N
        return f"  {label:<60} {per:>11.2f} {per / P:>9.4f}"

    coder = coder_name(s)
    lines = [
        f"{coder}: {N} images {'x'.join(map(str, s['x_shape']))} from {s['where']}, {s['likelihood']} likelihood, "
        + latent_code(s),
        f"  {'':<60} {'bits/image':>11} {'bits/dim':>9}",
        row("x pushed with p(x|y,z)" if s.get("label_classes") else "x pushed with p(x|z)", b["pixels"]),
    ]
    if s.get("label_classes"):
        lines += [
            row("y pushed with p(y) uniformly, z with p(z)", b["z_pushed"]),
            row("y and z got back when popped with q(y|x), q(z|x,y)", -b["z_back"]),
            row("y and z net: the label's KL and z's, as this coder paid them", b["z_net"]),
        ]
    elif s.get("inference") == "bottom-up":
        lines += [
            row("z1 pushed with p(z1|z2), z2 with p(z2)", b["z_pushed"]),
            row("z1 and z2 got back when popped with q(z1|x), q(z2|z1)", -b["z_back"]),
            row("z net: the two KL terms, as this coder paid them", b["z_net"]),
        ]
    elif s.get("layers") == 2:
        lines += [
            row("z2 pushed with p(z2), z1 with p(z1|z2)", b["z_pushed"]),
            row("z2 and z1 got back when popped with q(z2|x), q(z1|x,z2)", -b["z_back"]),
            row("z net: the two KL terms, as this coder paid them", b["z_net"]),
        ]
    elif K == 1:
        lines += [
            row("z pushed with p(z)", b["z_pushed"]),
            row("z got back when popped with q(z|x)", -b["z_back"]),
            row("z net: the KL term, as this coder paid it", b["z_net"]),
        ]
    else:
        lines += [
            row("z_j with p(z), the others back with q(z|x), j uniformly", b["z_pushed"]),
            row(f"{K} particles popped with q(z|x), j with the weights", -b["z_back"]),
            row("latent side net", b["z_net"]),
        ]
    if "z_net_expected" in b:
        on = "" if s.get("categories") else " on this grid"
        lines.append(row(f"  BB-ANS's z net for fair coin flips{on}", b["z_net_expected"]))
    lines += [
        row(
            "  analytic KL(q(z|x) || p(z))"
            if s.get("layers") != 2
            else "  KL(q(y|x) || p(y)) + KL of z (at sampled y)"
            if s.get("label_classes")
            else "  KL2 (at sampled z1) + KL1 (sampled)"
            if s.get("inference") == "bottom-up"
            else "  KL2 + KL1 (at sampled z2)",
            b["kl"],
        ),
        row("net code length", b["net"]),
        row("  the model's -ELBO (BB-ANS's limit)", b["neg_elbo"]),
    ]
    if "neg_log2_px" in b:
        lines.append(row(f"  -log2 p(x), IWAE k={s['iwae_k']} (any coder's limit)", b["neg_log2_px"]))
    if b["capped_pixels"] > 0:
        lines.append(
            f"  ({b['capped_pixels']:.2f} pixels per image have a probability under 2^-24 in the model; the coder "
            "gives every value at least that, so they cost it 24 bits and the model more: net can be below -ELBO)"
        )
    lines += [
        row(f"initial bits (given back on decoding: {s['initial_bits']} in all)", s["initial_bits"], False),
        row("  of them needed: popped before the first image paid them back", s["initial_bits_needed"], False),
        row(f"the file, header and checksum included ({s['file_bits'] // 8:,} bytes)", s["file_bits"], False),
    ]
    lines += [row(name, bits, False) for name, bits in s["general_purpose_bits"].items()]
    return "\n".join(lines)
