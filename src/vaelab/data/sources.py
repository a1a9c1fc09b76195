"""Data sources: each returns images as float32 (N, C, H, W) in [0, 1], labels if it has them.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 17 grey levels).
- ``mnist``, ``fashion-mnist``, ``kmnist``: the original IDX files (``.gz`` or not), from
  ``--data-dir``, or from the cache after ``--download``.
- ``cifar10``: the python tarball ``cifar-10-python.tar.gz`` (or its extracted folder).
- a ``.npy`` / ``.npz`` file: images (N, H, W), (N, C, H, W) or (N, H, W, C) with C in {1, 3};
  uint8 in [0, 255] or floats in [0, 1]; an ``.npz`` holds ``x`` (or ``images``) and optionally ``y``.
- a folder of PNG/JPEG images, all of one size (labels from sub-folder names, if any).

Splits: the source's own test split where it has one (MNIST family, CIFAR-10);
otherwise a seeded 15 % test split. Validation: a seeded 1/12 of the training part.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vaelab import memory
from vaelab.data import download
from vaelab.errors import UserError
from vaelab.parts import DATASETS

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class ImageData:
    x: Tensor  # (N, C, H, W) float32 in [0, 1]
    y: Tensor | None = None  # (N,) int64

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class Splits:
    name: str
    train: ImageData
    val: ImageData
    test: ImageData
    binary: bool  # every pixel is 0 or 1
    levels: int  # distinct grey levels the source stores (256 for 8-bit, 17 for digits)
    fingerprint: str  # SHA-256 of the source's arrays: identifies the data set in checkpoints
    label_fingerprint: str = ""  # SHA-256 of its labels ("" where it has none): a conditional run's other half

    @property
    def x_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


# -- validation -------------------------------------------------------------------------
def validate(x: np.ndarray, y: np.ndarray | None, where: str) -> np.ndarray:
    """Check images and labels once; return images as float32 (N, C, H, W) in [0, 1]."""
    if x.ndim == 0:
        raise UserError(f"{where} holds one number (a 0-d array), not images; save images (N, H, W) as x")
    if x.size == 0 or x.shape[0] == 0:
        raise UserError(f"{where} holds no images; point --data at a non-empty data set")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = np.transpose(x, (0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(
            f"{where} has images of shape {x.shape}; expected (N, H, W), (N, C, H, W) or (N, H, W, C) with C = 1 or 3"
        )
    if y is not None:
        validate_labels(y, len(x), where)
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating) and not np.issubdtype(x.dtype, np.integer):
        raise UserError(f"{where} has values of type {x.dtype}; expected uint8 or floats in [0, 1]")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise UserError(
            f"{where} has {int(bad.sum())} NaN or infinite pixel values (first in image {first[0]}); "
            "clean the data before training"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise UserError(
            f"{where} has pixel values in [{lo:g}, {hi:g}]; vaelab expects uint8 images or floats in [0, 1] "
            "(divide by 255 for 8-bit data)"
        )
    return x


# -- IDX (MNIST family) -------------------------------------------------------------------
IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or not): magic 0x0000, dtype byte, ndim byte, big-endian dims, data.
    Streamed: the header is read first and then exactly the bytes it declares, so a file that inflates
    to more than that (a gzip bomb) or declares more than memory holds is refused before it is read."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES:
                raise UserError(
                    f"{path} is not an IDX file of unsigned bytes (magic number {head.hex()}); check the file"
                )
            ndim = head[3]
            raw_dims = f.read(4 * ndim)
            if len(raw_dims) < 4 * ndim:
                raise UserError(f"{path} is truncated inside its header; download it again")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            expected = math.prod(dims)  # Python's integers: no wrap past 2^64
            memory.require(expected, f"the images of shape {dims} that {path} declares", "check the file")
            raw = f.read(expected + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path} is not a readable gzip file ({err}); download it again") from None
    if len(raw) != expected:
        raise UserError(
            f"{path} declares shape {dims} ({expected} bytes) but holds "
            f"{len(raw) if len(raw) < expected else 'more'}; the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8).reshape(dims)


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(stem)


def load_idx_family(name: str, data_dir: str | None, download_ok: bool):
    """The MNIST family's four IDX files from ``data_dir``, the cache, or a download."""
    directory = Path(data_dir) if data_dir else download.cache_dir() / name
    stems = [f.removesuffix(".gz") for f in download.IDX_FILES]
    try:
        paths = [_find(directory, s) for s in stems]
    except FileNotFoundError:
        if download_ok:
            download.fetch(name, directory)
            paths = [_find(directory, s) for s in stems]
        else:
            raise UserError(
                f"{name} files not found in {directory}: put {', '.join(download.IDX_FILES)} there "
                "(gzipped or not), or add --download to fetch them"
            ) from None
    x_train, y_train, x_test, y_test = (read_idx(p) for p in paths)
    if x_train.ndim != 3 or x_test.ndim != 3:
        raise UserError(f"{paths[0]} / {paths[2]} should hold images (N, H, W); found {x_train.shape} / {x_test.shape}")
    return (x_train, y_train, str(paths[0])), (x_test, y_test, str(paths[2]))


# -- CIFAR-10 (python tarball) ---------------------------------------------------------------
def load_cifar10(data_dir: str | None, download_ok: bool):
    directory = Path(data_dir) if data_dir else download.cache_dir() / "cifar10"
    tarball = directory / "cifar-10-python.tar.gz"
    if not tarball.exists():
        if not download_ok:
            raise UserError(f"cifar10 not found: put cifar-10-python.tar.gz in {directory}, or add --download")
        download.fetch("cifar10", directory)
    batches = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar.getmembers():
                base = Path(member.name).name
                if base.startswith(("data_batch_", "test_batch")):
                    batches[base] = _read_cifar_batch(tar.extractfile(member).read(), f"{tarball}:{member.name}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise UserError(f"{tarball} is not a readable tar.gz archive ({err}); download it again") from None
    missing = ({f"data_batch_{i}" for i in range(1, 6)} | {"test_batch"}) - set(batches)
    if missing:
        raise UserError(f"{tarball} lacks {', '.join(sorted(missing))}; download it again")
    train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
    x_train = np.concatenate([b[0] for b in train])
    y_train = np.concatenate([b[1] for b in train])
    return (x_train, y_train, str(tarball)), (*batches["test_batch"], str(tarball))


def _read_cifar_batch(blob: bytes, where: str):
    """A CIFAR-10 batch is a pickled dict {b'data': uint8 (N, 3072), b'labels': [int]}.

    Read with an unpickler that refuses every global except numpy's array reconstruction,
    so a crafted file cannot run code.
    """
    import pickle

    allowed = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    class NumpyOnly(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")

    try:
        batch = NumpyOnly(io.BytesIO(blob), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as err:
        raise UserError(f"{where} is not a CIFAR-10 batch ({err}); download the archive again") from None
    return data, labels


# -- arrays and folders ---------------------------------------------------------------------
def load_array(path: Path):
    try:  # a .npy is mapped first: its header's shape is checked against the file before anything is read
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix == ".npy" else None)
    except (ValueError, OSError, EOFError, zlib.error) as err:
        raise UserError(f"{path} is not a readable .npy/.npz file ({err})") from None
    if isinstance(loaded, np.ndarray):
        return np.array(loaded), None
    with loaded:
        key = next((k for k in ("x", "images", "arr_0") if k in loaded.files), None)
        if key is None:
            raise UserError(f"{path} has arrays {loaded.files}; name the images 'x' (and labels 'y')")
        try:
            for name in (key, "y"):
                if name in loaded.files:
                    _check_member(loaded.zip, name, path)
            return loaded[key], loaded["y"] if "y" in loaded.files else None
        except (ValueError, OSError, EOFError, zlib.error) as err:  # an object array, a torn member
            raise UserError(f"{path} has an array that cannot be read without pickle, or is torn ({err})") from None


def _check_member(archive, name: str, path: Path) -> None:
    """An .npz member's header read first, as ``np.load`` maps a .npy's: the bytes its shape and type declare
    must be the bytes the member holds (a header that lies is refused before anything is allocated)."""
    with archive.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        declared = math.prod(shape) * dtype.itemsize
        holds = archive.getinfo(f"{name}.npy").file_size - f.tell()
    if dtype.hasobject:
        raise UserError(
            f"{path}'s array {name!r} holds Python objects, which cannot be read without pickle; save numbers"
        )
    if declared != holds:
        raise UserError(
            f"{path}'s array {name!r} declares {declared:,} bytes (shape {shape}, {dtype}) and holds {holds:,}; "
            "the file is torn or was made by hand: save it again with numpy.savez"
        )


def _grey_or_rgb(im, where: Path, exact: bool = False) -> np.ndarray:
    """8-bit grey (H, W) or RGB (H, W, 3). 16-bit grey (PNG's I;16, read as I) is scaled to 8 bits
    (v / 257), where ``convert("L")`` would clip every value above 255 to white. ``exact``: refuse an
    image that this loses something of (16-bit values between 8-bit ones, transparency, colour in a
    palette read as grey, CMYK), as a lossless coder must."""
    if im.mode.startswith("I"):
        wide = np.asarray(im)
        if wide.size and (wide.min() < 0 or wide.max() > 65535):
            raise UserError(f"{where} has grey values outside 0 to 65535; save it as an 8- or 16-bit PNG")
        if exact and (wide % 257).any():
            raise UserError(f"{where} has 16-bit grey values that 8 bits cannot hold exactly; give 8-bit images")
        return np.round(wide / 257.0).astype(np.uint8)
    grey = im.mode in ("1", "L", "LA", "P", "PA")
    if exact:
        _check_exact(im, where, grey)
    return np.asarray(im.convert("L" if grey else "RGB"), dtype=np.uint8)


def _check_exact(im, where: Path, grey: bool) -> None:
    """Refuse an image whose conversion to 8-bit grey or RGB would lose something: transparency, a palette's
    colours read as grey, another colour model's values."""
    lost = None
    if ("A" in im.getbands() or "transparency" in im.info) and np.asarray(im.convert("RGBA"))[..., 3].min() < 255:
        lost = "transparency (an alpha channel)"
    elif im.mode in ("P", "PA") and _coloured(np.asarray(im.convert("RGB"))):
        lost = "colours in its palette, read as grey"
    elif im.mode not in ("1", "L", "LA", "P", "PA", "RGB", "RGBA"):
        lost = f"its {im.mode} values, read as {'grey' if grey else 'RGB'}"
    if lost:
        raise UserError(f"{where} has {lost}, which 8-bit grey or RGB pixels cannot hold exactly; save it as such")


def _coloured(rgb: np.ndarray) -> bool:
    return bool((rgb[..., 0] != rgb[..., 1]).any() or (rgb[..., 1] != rgb[..., 2]).any())


def load_folder(path: Path, exact: bool = False):
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{path} contains no .png or .jpg images")
    classes = sorted({p.parent.relative_to(path).as_posix() for p in files})
    images, first_size = [], None
    for p in files:
        try:
            with Image.open(p) as im:
                arr = _grey_or_rgb(im, p, exact)
        except (UnidentifiedImageError, OSError) as err:
            raise UserError(f"{p} is not a readable image ({err}); remove or replace it") from None
        first_size = first_size or (arr.shape, p)
        if arr.shape != first_size[0]:
            raise UserError(
                f"images differ in size or colour: {first_size[1]} is {first_size[0]}, {p} is {arr.shape}; "
                "resize them to one size"
            )
        images.append(arr)
    x = np.stack(images)
    y = np.array([classes.index(p.parent.relative_to(path).as_posix()) for p in files]) if len(classes) > 1 else None
    return x, y


# -- putting it together ----------------------------------------------------------------------
def load_digits(data_dir: str | None, download_ok: bool):
    """scikit-learn's bundled 8x8 digits (17 grey levels, no test split of its own)."""
    from sklearn.datasets import load_digits as sklearn_digits

    d = sklearn_digits()
    return ((d.images / 16.0).astype(np.float32), d.target, "digits"), None


MNIST_5K = "bundled/mnist-5k.npz"  # 5,000 MNIST digits, see data/bundled/NOTICE.md (CC BY-SA 3.0)
MNIST_5K_SHA256 = "f814240cf7e0d3cbaacc1a898905819a40ab46fb317a600d2a4b91a5c184c810"


def load_mnist_5k(data_dir: str | None, download_ok: bool):
    """5,000 real MNIST digits (500 per class, 28 x 28, 256 grey levels) bundled with vaelab: no
    download, no test split of its own. Checked against its SHA-256 on every load."""
    from importlib.resources import files

    blob = files("vaelab.data").joinpath(MNIST_5K).read_bytes()
    if hashlib.sha256(blob).hexdigest() != MNIST_5K_SHA256:
        raise UserError(f"vaelab's bundled {MNIST_5K} is damaged (its SHA-256 differs); reinstall vaelab")
    with np.load(io.BytesIO(blob), allow_pickle=False) as arrays:
        return (arrays["x"], arrays["y"].astype(np.int64), "mnist-5k"), None


def load_mnist(data_dir: str | None, download_ok: bool):
    return load_idx_family("mnist", data_dir, download_ok)


def load_fashion_mnist(data_dir: str | None, download_ok: bool):
    return load_idx_family("fashion-mnist", data_dir, download_ok)


def load_kmnist(data_dir: str | None, download_ok: bool):
    return load_idx_family("kmnist", data_dir, download_ok)


def load(config) -> Splits:
    """The data set that ``config.data`` names (an entry of ``parts.DATASETS``, a .npy/.npz file
    or a folder of images), split and validated."""
    name, seed, val = config.data, config.seed, config.val_size
    if name in DATASETS:
        source = DATASETS[name]
        (x, y, where), test = source.constructor()(config.data_dir, config.download)
        x_test, y_test = (None, None) if test is None else (validate(test[0], test[1], test[2]), test[1])
        return _split(name, validate(x, y, where), y, x_test, y_test, seed, val, levels=source.levels)
    path = Path(name)
    if path.is_dir():
        x, y = load_folder(path)
    elif path.suffix in (".npy", ".npz") and path.exists():
        x, y = load_array(path)
    elif path.suffix in (".npy", ".npz"):
        raise UserError(f"{path} does not exist")
    else:
        raise UserError(
            f"unknown data set {name!r}: use {', '.join(DATASETS.names())}, a .npy/.npz file or a folder of images"
        )
    levels = 256 if x.dtype == np.uint8 else 0
    return _split(path.name, validate(x, y, str(path)), y, None, None, seed, val, levels=levels)


MAX_CLASSES = 10_000  # a label beyond this is a mistake (an id, a value), not a class of a conditional model


def validate_labels(y, n: int, where: str) -> None:
    """Check labels: one whole number from 0 to C - 1 per image, shape (N,); else one line saying what is wrong."""
    y = np.asarray(y)
    fix = "save one whole-number label per image, 0 to C - 1, as y of shape (N,)"
    if y.ndim == 1 and len(y) != n:
        raise UserError(f"{where} has {n} images but {len(y)} labels; they must match one to one")
    if y.shape != (n,):
        onehot = " (one-hot? save y.argmax(1))" if y.ndim == 2 and y.shape[0] == n and y.shape[1] > 1 else ""
        raise UserError(f"the labels y of {where} have shape {y.shape}, the images {n}: {fix}{onehot}")
    if y.dtype.kind not in "iub" and y.dtype.kind != "f":
        raise UserError(f"the labels y of {where} are of type {y.dtype}, not numbers: {fix}")
    if y.dtype.kind == "f" and (not np.isfinite(y).all() or (y != np.round(y)).any()):
        raise UserError(f"the labels y of {where} include NaN, infinite or fractional values: {fix}")
    if n and (y.min() < 0 or y.max() >= MAX_CLASSES):
        raise UserError(
            f"the labels y of {where} run from {y.min():g} to {y.max():g}; labels are 0 to C - 1 with C at most "
            f"{MAX_CLASSES:,}: {fix}"
        )


VAL_AT_MOST = 1000  # validation images by default: enough to choose the best epoch (paired, same images and noise)


def validation_size(pool: int, val_size: int) -> int:
    """How many of ``pool`` training images are held out for validation: ``val_size``, or by default
    (-1) 1/12 of them, at least 1 and at most ``VAL_AT_MOST``."""
    return min(max(1, pool // 12), VAL_AT_MOST) if val_size < 0 else val_size


def _split(name, x, y, x_test, y_test, seed, val_size, levels) -> Splits:
    fingerprint = hashlib.sha256(x.tobytes())
    if x_test is not None:
        fingerprint.update(x_test.tobytes())
    g = np.random.default_rng(seed)
    N = len(x)
    order = g.permutation(N)
    if x_test is None:  # no test split of its own: hold out 15 %
        n_test = max(1, int(round(0.15 * N)))
        test_idx, order = order[:n_test], order[n_test:]
        x_test, y_test = x[test_idx], None if y is None else y[test_idx]
    n_val = validation_size(len(order), val_size)
    val_idx, train_idx = order[:n_val], order[n_val:]
    if len(train_idx) == 0:
        raise UserError(
            f"{name} has only {N} images: too few to split into train, validation ({n_val}) and test; "
            + ("use a smaller --val-size" if val_size > 0 else "use more images")
        )
    train, val = _part(x, y, train_idx), _part(x, y, val_idx)
    test = _part(x_test, y_test, np.arange(len(x_test)))
    binary = bool(((train.x == 0) | (train.x == 1)).all())
    labels = hashlib.sha256()
    for part in (y, y_test):
        if part is not None:
            labels.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    label_fingerprint = "" if y is None else labels.hexdigest()
    return Splits(name, train, val, test, binary, levels, fingerprint.hexdigest(), label_fingerprint)


def _part(x: np.ndarray, y: np.ndarray | None, idx: np.ndarray) -> ImageData:
    labels = None if y is None else torch.tensor(np.asarray(y)[idx], dtype=torch.int64)
    return ImageData(torch.tensor(x[idx]), labels)
