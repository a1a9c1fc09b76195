import contextlib
import gzip
import os
import struct

import numpy as np
import pytest

# vaelab's default thread count follows the machine's load (runs.set_threads), and a sum split among
# another number of threads rounds otherwise: tests that compare two trainings bit for bit need one
# count throughout, so the suite fixes it where OpenMP reads it (vaelab then keeps it)
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))


def train_options(**values) -> list[str]:
    """``vaelab train`` options from keyword values, in their order: ``train_options(hidden=16, epochs=1)`` is
    ``["--hidden", "16", "--epochs", "1"]``. The one spelling of the suite's small, fast runs."""
    return [item for name, value in values.items() for item in ("--" + name.replace("_", "-"), str(value))]


class Boom:
    """An object whose unpickling would run code (print): what a loader must refuse, never call."""

    def __reduce__(self):
        return (print, ("this must never run",))


def write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    """An IDX file as the MNIST authors define it: 0x0000, dtype 0x08, ndim, big-endian dims, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(blob) if compress else blob)


@pytest.fixture
def mnist_dir(tmp_path):
    """A tiny MNIST-format data set: 240 train and 60 test 28x28 images of blobs, gzipped IDX."""
    rng = np.random.default_rng(0)
    d = tmp_path / "mnist"
    d.mkdir()

    def images(n):
        yy, xx = np.mgrid[:28, :28]
        centres = rng.integers(6, 22, size=(n, 2))
        blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 18.0)
        return (255 * blobs).astype(np.uint8)

    write_idx(d / "train-images-idx3-ubyte.gz", images(240))
    write_idx(d / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 240))
    write_idx(d / "t10k-images-idx3-ubyte.gz", images(60))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 60))
    return d


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A small run on the bundled digits (2 latent dimensions), trained once for the session."""
    from vaelab.cli import main

    out = tmp_path_factory.mktemp("runs") / "digits"
    assert (
        main(["train", "--data", "digits", "--hidden", "64", "--latent-dim", "2", "--epochs", "3", "--out", str(out)])
        == 0
    )
    return out


@contextlib.contextmanager
def serving(run_dir):
    """`vaelab serve` of ``run_dir`` on a free loopback port, in a thread; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    from vaelab.web.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(run_dir), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def server(trained_run):
    """`vaelab serve` of the trained run; yields its URL."""
    with serving(trained_run) as url:
        yield url


def round_trip(coder, symbols):
    """Code ``symbols`` with a bits-back coder and decode them again: assert the images and the initial bits
    come back; return the message and what each image cost."""
    message, costs = coder.encode(symbols)
    decoded, returned = coder.decode(message, len(symbols))
    assert returned and np.array_equal(decoded, symbols)
    return message, costs
