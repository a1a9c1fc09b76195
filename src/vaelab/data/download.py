"""Downloading data sets into a cache, verified against published checksums.

Cache: ``$VAELAB_CACHE`` if set, else ``~/.cache/vaelab``; one folder per data set.
A file is downloaded to a temporary name, its digest checked, then renamed: a broken
or interrupted download never sits in the cache under the real name. The digests are
the MD5 sums the data sets' authors publish (the only ones they publish); KMNIST
publishes none, so its files are checked for structure only when read.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from vaelab.errors import UserError

IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

# name -> (base URL, {file name: md5 or None})
SOURCES: dict[str, tuple[str, dict[str, str | None]]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        dict(
            zip(
                IDX_FILES,
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
                strict=True,
            )
        ),
    ),
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        dict(
            zip(
                IDX_FILES,
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
                strict=True,
            )
        ),
    ),
    "kmnist": ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/", dict.fromkeys(IDX_FILES)),
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/",
        {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("VAELAB_CACHE") or Path.home() / ".cache" / "vaelab")


def md5_of(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(name: str, directory: Path | None = None, opener=urllib.request.urlopen) -> Path:
    """Make sure every file of data set ``name`` is in ``directory`` (default: the cache); return it."""
    base, files = SOURCES[name]
    directory = Path(directory) if directory else cache_dir() / name
    directory.mkdir(parents=True, exist_ok=True)
    for filename, expected in files.items():
        target = directory / filename
        if target.exists():
            continue
        partial = directory / f".{filename}.part"
        try:
            with opener(base + filename, timeout=60) as response, open(partial, "wb") as out:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
        except (urllib.error.URLError, OSError) as err:
            partial.unlink(missing_ok=True)
            raise UserError(
                f"could not download {base + filename} ({err}); if this machine is offline, copy "
                f"{', '.join(files)} into {directory} by hand"
            ) from None
        if expected is not None and (actual := md5_of(partial)) != expected:
            partial.unlink()
            raise UserError(
                f"{filename} from {base} has MD5 {actual}, expected {expected}; the download is corrupt, try again"
            )
        os.replace(partial, target)
    return directory
