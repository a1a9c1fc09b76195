"""Data sources and their validation, on small files generated here in each on-disk format."""

import gzip
import hashlib
import io
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Boom, write_idx
from vaelab.config import Config
from vaelab.contract import Examples
from vaelab.data import Batches, download, load
from vaelab.data.sources import read_idx
from vaelab.errors import UserError


def test_digits_is_bundled_and_split():
    s = load(Config(data="digits"))
    assert s.x_shape == (1, 8, 8)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert float(s.train.x.min()) >= 0.0 and float(s.train.x.max()) <= 1.0
    assert s.train.y is not None and not s.binary
    assert load(Config(data="digits")).fingerprint == s.fingerprint
    assert not torch.equal(load(Config(data="digits", seed=1)).test.x, s.test.x)  # the split depends on the seed


def test_the_default_is_5000_real_mnist_digits_bundled():
    """mnist-5k: 500 of each digit at 28 x 28 and 256 levels, read from the package (no download), held
    out 15 % for test, and checked against its SHA-256 (data/bundled/NOTICE.md says where it is from)."""
    from vaelab.data import sources

    s = load(Config())
    assert s.name == "mnist-5k" and s.x_shape == (1, 28, 28) and s.levels == 256 and not s.binary
    assert (len(s.train), len(s.val), len(s.test)) == (3896, 354, 750)
    labels = torch.cat([s.train.y, s.val.y, s.test.y])
    assert torch.equal(torch.bincount(labels), torch.full((10,), 500))
    # real handwriting, not blobs: the average 1 is narrower than the average 0 (ink per column)
    x = torch.cat([s.train.x, s.val.x, s.test.x])[:, 0]
    width = {d: (x[labels == d].mean(0).sum(0) > 0.5).sum().item() for d in (0, 1)}
    assert width[1] < width[0]
    blob = (Path(sources.__file__).parent / sources.MNIST_5K).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == sources.MNIST_5K_SHA256


def test_a_damaged_bundled_data_set_is_said_so(monkeypatch):
    from vaelab.data import sources

    monkeypatch.setattr(sources, "MNIST_5K_SHA256", "0" * 64)
    with pytest.raises(UserError, match="bundled bundled/mnist-5k.npz is damaged"):
        load(Config())


def test_idx_round_trip_and_own_test_split(mnist_dir):
    s = load(Config(data="mnist", data_dir=str(mnist_dir)))
    assert s.x_shape == (1, 28, 28)
    assert len(s.test) == 60 and len(s.train) + len(s.val) == 240
    raw = gzip.decompress((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())[16:]
    expected = np.frombuffer(raw, np.uint8).reshape(60, 1, 28, 28) / 255.0
    np.testing.assert_allclose(s.test.x.numpy(), expected, atol=1e-7)


def test_idx_uncompressed(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte", arr, compress=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte"), arr)


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[:-100], "truncated or corrupt"),
        (lambda b: b"\x08\x03" + b[2:], "magic number"),
        (lambda b: b[:10], "truncated inside its header"),
    ],
)
def test_damaged_idx_files(tmp_path, damage, message):
    write_idx(tmp_path / "x", np.zeros((50, 4, 4)), compress=False)
    (tmp_path / "x").write_bytes(damage((tmp_path / "x").read_bytes()))
    with pytest.raises(UserError, match=message):
        read_idx(tmp_path / "x")


def test_corrupt_gzip(mnist_dir):
    path = mnist_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(UserError, match="not a readable gzip file"):
        load(Config(data="mnist", data_dir=str(mnist_dir)))


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte.gz.*--download"):
        load(Config(data="fashion-mnist", data_dir=str(tmp_path)))


def test_unknown_data_set():
    with pytest.raises(UserError, match="unknown data set 'mnsit'"):
        load(Config(data="mnsit"))


def test_npy_and_npz(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (50, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "a.npy", x)
    s = load(Config(data=str(tmp_path / "a.npy")))
    assert s.x_shape == (1, 6, 6) and s.levels == 256
    np.savez(tmp_path / "b.npz", x=np.random.default_rng(1).random((40, 8, 8, 3)), y=np.arange(40))
    s = load(Config(data=str(tmp_path / "b.npz")))
    assert s.x_shape == (3, 8, 8) and s.train.y is not None


@pytest.mark.parametrize(
    "array,message",
    [
        (np.zeros(10), "shape"),
        (np.zeros((0, 4, 4)), "no images"),
        (np.full((5, 4, 4), np.nan), "NaN or infinite"),
        (np.full((5, 4, 4), np.inf), "NaN or infinite"),
        (np.full((5, 4, 4), 3.0), r"pixel values in \[3, 3\]"),
        (np.zeros((5, 2, 4, 4)), "shape"),
    ],
)
def test_bad_arrays(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(UserError, match=message):
        load(Config(data=str(tmp_path / "bad.npy")))


def test_label_count_mismatch(tmp_path):
    np.savez(tmp_path / "m.npz", x=np.zeros((10, 4, 4)), y=np.zeros(9))
    with pytest.raises(UserError, match="10 images but 9 labels"):
        load(Config(data=str(tmp_path / "m.npz")))


def test_corrupt_npy(tmp_path):
    (tmp_path / "c.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="not a readable"):
        load(Config(data=str(tmp_path / "c.npy")))


def test_image_folder_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(12):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    s = load(Config(data=str(tmp_path)))
    assert s.x_shape == (1, 8, 8)
    labels = torch.cat([s.train.y, s.val.y, s.test.y])
    assert sorted(labels.tolist()) == [0] * 12 + [1] * 12


def test_16_bit_grey_images_keep_their_values(tmp_path):
    """A 16-bit PNG's grey values are scaled to 8 bits (v / 257), not clipped to white: a folder of
    darkish 16-bit images keeps its mean (convert("L") gave 1.0 for every value above 255)."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 40_000, (8, 8)).astype(np.uint16) for _ in range(20)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i:02d}.png")
    assert Image.open(tmp_path / "00.png").mode.startswith("I")  # Pillow reads them as 16-bit
    s = load(Config(data=str(tmp_path)))
    x = torch.cat([s.train.x, s.val.x, s.test.x])
    truth = np.stack(arrays) / 65535.0
    assert abs(x.mean().item() - truth.mean()) < 1 / 255  # 8-bit rounding at most
    assert x.max().item() < 0.65  # nothing was clipped to white


def test_image_folder_mixed_sizes_and_non_images(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(UserError, match="differ in size"):
        load(Config(data=str(tmp_path)))
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="not a readable image"):
        load(Config(data=str(tmp_path)))


def _cifar_tarball(path, payload=None):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
            blob = payload if payload is not None and name == "test_batch" else pickle.dumps(batch)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_cifar10_tarball(tmp_path):
    _cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    s = load(Config(data="cifar10", data_dir=str(tmp_path)))
    assert s.x_shape == (3, 32, 32) and len(s.test) == 4 and len(s.train) + len(s.val) == 20


def test_cifar10_refuses_code_in_pickles(tmp_path):
    _cifar_tarball(tmp_path / "cifar-10-python.tar.gz", payload=pickle.dumps({b"data": Boom()}))
    with pytest.raises(UserError, match="not a CIFAR-10 batch.*refusing"):
        load(Config(data="cifar10", data_dir=str(tmp_path)))


# -- download ---------------------------------------------------------------------------
class FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def test_download_verifies_checksums(tmp_path, monkeypatch):
    files = {"a.gz": b"hello", "b.gz": b"world"}
    monkeypatch.setitem(
        download.SOURCES, "toy", ("http://example.invalid/", {k: hashlib.md5(v).hexdigest() for k, v in files.items()})
    )
    served = []

    def opener(url, timeout):
        served.append(url)
        return FakeResponse(files[url.rsplit("/", 1)[1]])

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path / "cache"))
    directory = download.fetch("toy", opener=opener)
    assert directory == tmp_path / "cache" / "toy"
    assert (directory / "a.gz").read_bytes() == b"hello"
    download.fetch("toy", opener=opener)  # cached: nothing fetched again
    assert len(served) == 2
    # a corrupted download is refused and leaves nothing under the real name
    (directory / "b.gz").unlink()
    with pytest.raises(UserError, match="MD5"):
        download.fetch("toy", opener=lambda url, timeout: FakeResponse(b"tampered"))
    assert not (directory / "b.gz").exists() and not list(directory.glob(".*part"))


def test_download_offline_says_what_to_do(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("VAELAB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="offline, copy train-images-idx3-ubyte.gz"):
        download.fetch("mnist", opener=offline)


# -- batches -------------------------------------------------------------------------------
def test_data_order_is_a_function_of_seed_and_epoch():
    x = torch.arange(100.0).view(100, 1, 1, 1) / 100
    y = torch.arange(100)
    b = Batches(Examples(x, y), 10, seed=3)

    def images(epoch, batches=b):
        return torch.cat([xb for xb, _ in batches.epoch(epoch)])

    first = images(0)
    assert torch.equal(first, images(0, Batches(x, 10, seed=3)))
    assert not torch.equal(first, images(1))
    assert sorted(first.flatten().tolist()) == sorted(x.flatten().tolist())  # a permutation
    for xb, yb in b.epoch(2):  # the labels travel with their images
        assert torch.equal((xb.flatten() * 100).round().long(), yb)


def test_dynamic_binarization_resamples_each_epoch_reproducibly():
    x = torch.full((64, 1, 4, 4), 0.5)
    b = Batches(x, 64, seed=0, dynamic=True)
    (e0, _), (e0_again, _), (e1, _) = next(b.epoch(0)), next(b.epoch(0)), next(b.epoch(1))
    assert set(e0.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(e0, e0_again) and not torch.equal(e0, e1)
    assert abs(e0.mean().item() - 0.5) < 0.1  # 1024 Bernoulli(0.5) draws: sd 0.016, so 6 sd


def test_random_streams_never_share_a_generator():
    """Every (stream, index) of a run gets its own generator. The old scheme mixed integers, so the
    noise of step 1 in 'epoch slot' 2 and the binarisation of epoch 2 were one generator."""
    from vaelab.data.batches import STREAMS, seeded

    seeds = {}
    for stream in STREAMS:
        for index in range(3000):
            seeds[(stream, index)] = seeded(0, stream, index).initial_seed()
    assert len(set(seeds.values())) == len(seeds)
    a, b = seeded(0, "noise", 1), seeded(0, "binarize", 1)
    assert not torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
    assert seeded(3, "noise", 7).initial_seed() == seeded(3, "noise", 7).initial_seed()  # a pure function
    with pytest.raises(ValueError, match="unknown random stream"):
        seeded(0, "nosie", 1)


def test_dynamic_binarisation_draws_bernoulli_p():
    """batches.bernoulli_draw: each pixel is 1 with probability p. 200,000 draws per value of p; each
    frequency within 5 standard errors (false alarm < 1e-5 for the 11), and p = 0 and 1 exact."""
    from vaelab.data.batches import bernoulli_draw, seeded

    p = torch.linspace(0, 1, 11)
    draws = bernoulli_draw(p.expand(200_000, 11).contiguous(), seeded(0, "binarize", 0))
    assert set(draws.unique().tolist()) <= {0.0, 1.0} and draws.dtype == p.dtype
    freq = draws.mean(0)
    se = (p * (1 - p) / 200_000).sqrt()
    assert (freq - p).abs().le(5 * se).all(), (freq, p)
    assert freq[0] == 0 and freq[-1] == 1


def test_dynamic_binarisation_draws_what_torch_bernoulli_draws():
    """The same pixels as torch.bernoulli from the same generator state: a run binarised by either
    is the same run, and checkpoints written before keep resuming exactly."""
    from vaelab.data.batches import bernoulli_draw, seeded

    p = torch.rand(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    expected = torch.bernoulli(p, generator=seeded(3, "binarize", 7))
    assert torch.equal(bernoulli_draw(p, seeded(3, "binarize", 7)), expected)
