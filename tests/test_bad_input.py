"""The catalogue of bad inputs: each gives exit code 2, one line `vaelab: error: ...` that names
the problem and the fix, no traceback, and leaves every file the user had as it was.
(The web app's bad inputs, answered with 4xx, are in test_web.py.)"""

import gzip
import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import Boom, train_options, write_idx
from vaelab.checkpoint import load_checkpoint
from vaelab.cli import main

FAST = train_options(hidden=16, latent_dim=2, epochs=1)


def snapshot(root):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def make_run(tmp_path, *options):
    out = tmp_path / "run"
    assert main(["train", *FAST, *options, "--out", str(out)]) == 0
    return out


def npy(tmp_path, array, name="x.npy"):
    np.save(tmp_path / name, array)
    return str(tmp_path / name)


def mnist_dir(tmp_path, damage=None):
    d = tmp_path / "mnist"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name, arr in [
        ("train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28))),
        ("train-labels-idx1-ubyte.gz", rng.integers(0, 10, 40)),
        ("t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (10, 28, 28))),
        ("t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 10)),
    ]:
        write_idx(d / name, arr)
    if damage:
        damage(d / "train-images-idx3-ubyte.gz")
    return str(d)


def other_architecture_checkpoint(tmp_path):
    run = make_run(tmp_path)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state["config"]["hidden"] = [64]
    torch.save(state, run / "other.pt")
    return str(run / "other.pt")


def truncated_checkpoint(tmp_path):
    run = make_run(tmp_path)
    blob = (run / "checkpoints" / "last.pt").read_bytes()
    (run / "cut.pt").write_bytes(blob[: len(blob) // 3])
    return str(run / "cut.pt")


def pickle_checkpoint(tmp_path):
    torch.save({"format": 1, "model": Boom()}, tmp_path / "evil.pt")
    return str(tmp_path / "evil.pt")


def folder_mixed_sizes(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "a.png")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(d / "b.png")
    return str(d)


def a_file(tmp_path):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    return tmp_path / "file.txt"


def toml(tmp_path, text):
    (tmp_path / "run.toml").write_text(text)
    return str(tmp_path / "run.toml")


def truncate(path):
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-500]))


def wrong_magic(path):
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[2] = 0x0D
    path.write_bytes(gzip.compress(bytes(raw)))


def not_gzip(path):
    path.write_bytes(b"this is not gzip data at all")


def not_a_run(tmp_path):
    """A user's project folder that happens to hold a config.toml."""
    d = tmp_path / "proj"
    (d / ".git").mkdir(parents=True)
    (d / "config.toml").write_text('name = "x"\n')
    (d / "thesis.tex").write_text("precious")
    return str(d)


def run_without_last(tmp_path):
    """A finished run whose checkpoints were removed to save space."""
    run = make_run(tmp_path)
    for name in ("last.pt", "best.pt"):
        (run / "checkpoints" / name).unlink()
    return str(run)


def linked_run(tmp_path, name="metrics.csv"):
    """A run received from someone else, whose ``name`` is a link to a file or folder of the user."""
    run = make_run(tmp_path)
    target = tmp_path / "notes.txt"
    target.write_text("my notes")
    if (run / name).is_dir():
        shutil.rmtree(run / name)
        target = tmp_path / "my-folder"
        target.mkdir()
        (target / "notes.txt").write_text("my notes")
    else:
        (run / name).unlink()
    (run / name).symlink_to(target)
    return str(run)


def resumed(build, *options):
    return lambda t: ["train", "--out", build(t), "--resume", *options]


def labelled(tmp_path, y, name="xy.npz", **extra):
    """An .npz of 40 binary 8x8 images with labels ``y`` (saved as given, pickle allowed for objects)."""
    x = (np.random.default_rng(0).random((40, 8, 8)) > 0.5).astype(np.float32)
    np.savez(tmp_path / name, x=x, y=y, **extra)
    return str(tmp_path / name)


def lying_npy(tmp_path):
    """128 bytes whose header declares 931 GiB of float32."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (250_000_000_000,)})
    (tmp_path / "lie.npy").write_bytes(buf.getvalue().ljust(128, b"\0"))
    return str(tmp_path / "lie.npy")


def torn_evaluation(tmp_path):
    run = make_run(tmp_path)
    assert main(["evaluate", str(run), "--iwae-k", "0"]) == 0
    text = (run / "evaluation.json").read_text()
    (run / "evaluation.json").write_text(text[: len(text) // 2])
    return str(run)


def huge_declared_layers(tmp_path):
    """A model.safetensors whose metadata declares a 2e9-unit hidden layer that its weights do not have."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = make_run(tmp_path)
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["config"] = meta["config"].replace("hidden = [\n    16,\n]", "hidden = [\n    2000000000,\n]")
    assert "2000000000" in meta["config"]
    save_file(weights, tmp_path / "crafted.safetensors", metadata=meta)
    return str(tmp_path / "crafted.safetensors")


def data_from_another_folder(tmp_path):
    """A run trained on a relative path, then evaluated from a folder where that path names other images."""
    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(1)
    np.save(tmp_path / "a" / "x.npy", (rng.random((60, 8, 8)) > 0.5).astype(np.float32))
    np.save(tmp_path / "x.npy", (rng.random((60, 8, 8)) > 0.5).astype(np.float32))
    os.chdir(tmp_path / "a")
    try:
        assert main(["train", *FAST, "--data", "x.npy", "--batch-size", "8", "--out", str(tmp_path / "run")]) == 0
    finally:
        os.chdir(tmp_path)
    return str(tmp_path / "run")


def weights_of_another_run(tmp_path):
    run = make_run(tmp_path)
    other = tmp_path / "other"
    assert main(["train", *FAST, "--seed", "1", "--out", str(other)]) == 0
    shutil.copy(other / "model.safetensors", run / "model.safetensors")
    return str(run)


def conditional_then_permuted(tmp_path):
    """A conditional run, then its data file's labels shuffled: the images are the same, the labels not."""
    y = np.arange(40) % 4
    data = labelled(tmp_path, y)
    run = tmp_path / "cvae"
    assert (
        main(["train", *FAST, "--family", "conditional", "--data", data, "--batch-size", "8", "--out", str(run)]) == 0
    )
    labelled(tmp_path, np.random.default_rng(0).permutation(y))
    return ["train", "--out", str(run), "--resume", "--epochs", "2", "--data", data]


# (id, argv builder, words the message must contain)
def compressed(tmp_path, damage=None):
    """A run and the file ``vaelab compress`` made of its test split, damaged by ``damage``."""
    run = make_run(tmp_path)
    file = tmp_path / "test.vbb"
    assert main(["compress", str(run), "-o", str(file), "--iwae-k", "0"]) == 0
    if damage:
        damage(file)
    return str(file)


def cut(path):
    path.write_bytes(path.read_bytes()[:-100])


def flip_a_byte(path):
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    path.write_bytes(bytes(blob))


def decompress_with_another_run(tmp_path):
    file = compressed(tmp_path)
    other = tmp_path / "other"
    assert main(["train", *FAST, "--seed", "1", "--out", str(other)]) == 0
    return ["decompress", file, "-o", str(tmp_path / "back.npy"), "--run", str(other)]


def decompress_without_its_run(tmp_path):
    file = compressed(tmp_path)
    (tmp_path / "run").rename(tmp_path / "moved")
    return ["decompress", file, "-o", str(tmp_path / "back.npy")]


def compress_run(*options, images=None):
    def build(tmp_path):
        run = str(make_run(tmp_path, *options))
        given = [images(tmp_path)] if images else []
        return ["compress", run, *given, "-o", str(tmp_path / "f.vbb"), "--iwae-k", "0"]

    return build


def one_png(tmp_path):
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(tmp_path / "one.png")
    return str(tmp_path / "one.png")


def torn_compression_record(tmp_path):
    compressed(tmp_path)
    record = tmp_path / "run" / "compression.json"
    record.write_text(record.read_text()[:200])
    return str(tmp_path / "run")


def runs_of_two_data_sets(tmp_path):
    first = make_run(tmp_path)
    second = tmp_path / "digits"
    assert main(["train", *FAST, "--data", "digits", "--out", str(second)]) == 0
    return ["rd", str(first), str(second)]


def lying_npz(tmp_path):
    """An .npz whose x declares 931 GiB of float32 in a 128-byte member."""
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (250_000_000_000,)})
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as archive:
        archive.writestr("x.npy", buf.getvalue().ljust(128, b"\0"))
    return str(tmp_path / "lie.npz")


def nan_weights(tmp_path):
    """A run whose model.safetensors holds NaN weights (its metadata intact)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = make_run(tmp_path)
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta, weights = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, run / "model.safetensors", metadata=meta)
    return str(run)


def checkpoint_without_config(tmp_path):
    torch.save({"format": 1, "model": {}}, tmp_path / "bare.pt")
    return str(tmp_path / "bare.pt")


def edited_header(**changes):
    """A file ``compress`` wrote, its header edited as ``changes`` say (None: the key removed; a bytes
    value: the raw header) and its checksum computed again, as anyone can."""
    import json
    import struct

    from vaelab.compress import MAGIC

    def build(tmp_path):
        file = compressed(tmp_path)
        blob = Path(file).read_bytes()
        (n,) = struct.unpack("<I", blob[len(MAGIC) : len(MAGIC) + 4])
        header = json.loads(blob[len(MAGIC) + 4 : len(MAGIC) + 4 + n])
        raw = changes.get("raw")
        if raw is None:
            for key, value in changes.items():
                header[key] = value
            header = {k: v for k, v in header.items() if v is not None}
            raw = json.dumps(header).encode()
        body = MAGIC + struct.pack("<I", len(raw)) + raw + blob[len(MAGIC) + 4 + n : -32]
        Path(file).write_bytes(body + hashlib.sha256(body).digest())
        return ["decompress", file, "-o", str(tmp_path / "back.npy")]

    return build


def one_class_labels(tmp_path):
    return ["train", *FAST, "--data", labelled(tmp_path, np.zeros(40, dtype=np.int64)), "--labelled", "10"]


def hard_linked_lock(tmp_path):
    run = make_run(tmp_path)
    (tmp_path / "notes.txt").write_text("my notes")
    (run / ".vaelab-lock").unlink()
    os.link(tmp_path / "notes.txt", run / ".vaelab-lock")
    return ["evaluate", str(run), "--iwae-k", "0"]


def copied_marker(tmp_path):
    """A user's folder holding a run's marker, copied in: --overwrite must delete nothing of it."""
    run = make_run(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(run / ".vaelab-run", mine / ".vaelab-run")
    for name in ("config.toml", "metrics.csv", "report.html"):
        (mine / name).write_text("the user's own")
    return ["train", *FAST, "--out", str(mine), "--overwrite"]


def record_with(tmp_path, name, edit):
    import json

    run = make_run(tmp_path)
    if name == "evaluation.json":
        assert main(["evaluate", str(run), "--iwae-k", "0"]) == 0
    else:
        assert main(["compress", str(run), "-o", str(tmp_path / "f.vbb"), "--iwae-k", "0"]) == 0
    record = json.loads((run / name).read_text())
    edit(record)
    (run / name).write_text(json.dumps(record))  # Python writes NaN where asked: not JSON
    return str(run)


def png_folder(tmp_path, array):
    d = tmp_path / "pngs"
    d.mkdir()
    for i in range(3):
        Image.fromarray(array).save(d / f"{i}.png")
    return str(d)


def palette_folder(tmp_path):
    """PNGs of a palette with red and green, and a transparent entry (index 2) that no pixel uses."""
    d = tmp_path / "pngs"
    d.mkdir()
    for i in range(3):
        im = Image.fromarray((np.arange(784).reshape(28, 28) % 2).astype(np.uint8), mode="P")
        im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0])
        im.info["transparency"] = 2
        im.save(d / f"{i}.png", transparency=2)
    return str(d)


def folder_of_others(tmp_path):
    file = compressed(tmp_path)
    d = tmp_path / "pngs"
    d.mkdir()
    (d / "000000.png").write_bytes(b"a PNG of decompress's name")
    (d / "holiday.jpg").write_bytes(b"the user's photo")
    return ["decompress", file, "-o", str(d), "--overwrite"]


def sweep_again_with(*options):
    def build(tmp_path):
        out = str(tmp_path / "S")
        assert main(["sweep", "--beta", "0.5", *FAST, "--data", "digits", "--out", out]) == 0
        return ["sweep", "--beta", "0.5", *FAST, "--data", "digits", "--out", out, *options]

    return build


def idx_bomb(tmp_path):
    """A gzipped IDX file whose header declares one 28x28 image and which inflates to 256 MiB."""
    import struct

    path = tmp_path / "bomb-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + struct.pack(">3I", 1, 28, 28))
        f.write(bytes(2**28))
    return str(path)


def idx_wrapping(tmp_path):
    import struct

    path = tmp_path / "wrap-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 5]) + struct.pack(">5I", *[2**32 - 1] * 4, 5))
    return str(path)


HOSTILE = [  # issue 33's catalogue: a traceback, a wrong success or a loss where one line belongs
    ("an .npz whose header lies about its size", lambda t: ["train", "--data", lying_npz(t)], ["declares", "holds"]),
    ("an .npz of a 0-d array", lambda t: ["train", "--data", npz0(t)], ["0-d"]),
    ("evaluate with a seed beyond 64 bits", lambda t: ["evaluate", "x", "--seed", str(10**23)], ["--seed", "2^63"]),
    ("compress with a negative seed", lambda t: ["compress", "x", "-o", "y", "--seed", "-1"], ["--seed", "at least 0"]),
    ("explain with a seed beyond 64 bits", lambda t: ["explain", "--seed", str(2**63)], ["--seed", "2^63"]),
    ("a sweep of seeds beyond 64 bits", lambda t: ["sweep", "--seed", str(2**64), "--out", str(t / "s")], ["2^63"]),
    ("evaluate of NaN weights", lambda t: ["evaluate", nan_weights(t), "--iwae-k", "0"], ["NaN or infinite weights"]),
    ("a checkpoint without a config", lambda t: ["evaluate", checkpoint_without_config(t)], ["lacks", "config"]),
    (
        "a tc batch that leaves each of 2 processes one row",
        lambda t: ["train", "--data", "digits", "--objective", "tc", "--batch-size", "2", "--nproc", "2"],
        ["2 processes 1 each", "--batch-size 4"],
    ),
    (
        "CUDA without a GPU, under torchrun",
        lambda t: ["evaluate", str(t), "--device", "cuda", "--nproc", "2"],
        ["no CUDA GPU"],
    ),
    (
        "a temperature float32 cannot hold",
        lambda t: ["train", "--posterior", "categorical", "--temperature", "1e300"],
        ["float32", "temperature"],
    ),
    (
        "a config nested 3,000 deep",
        lambda t: ["train", "--config", toml(t, "hidden = " + "[" * 3000 + "]" * 3000)],
        ["deep"],
    ),
    ("a header that is a list", edited_header(raw=b"[1, 2]"), ["not a JSON object"]),
    ("a header nested 100,000 deep", edited_header(raw=b"[" * 100_000 + b"]" * 100_000), ["not JSON"]),
    ("a header without its run", edited_header(run=None), ["'run'"]),
    ("a header of images as text", edited_header(images="50"), ["'images'"]),
    ("a header of -1 images", edited_header(images=-1), ["'images'"]),
    ("a header of 10^12 images", edited_header(images=10**12), ["GiB of memory"]),
    ("a header of 0 latent bits", edited_header(latent_bits=0), ["'latent_bits'"]),
    ("a header of 30 latent bits", edited_header(latent_bits=30), ["'latent_bits'"]),
    ("a header of 3 levels", edited_header(levels=3), ["'levels'"]),
    ("a header of seed -1", edited_header(seed=-1), ["'seed'"]),
    ("a header whose image shape lies", edited_header(x_shape=[1, 28, 27]), ["image shape"]),
    ("a header naming /dev/zero as its run", edited_header(run="/dev/zero"), ["not a run directory"]),
    ("decompress of /dev/zero", lambda t: ["decompress", "/dev/zero", "-o", str(t / "z.npy")], ["not a regular"]),
    (
        "compress with one file for both outputs",
        lambda t: ["compress", str(make_run(t)), "-o", str(t / "a"), "--json", str(t / "a")],
        ["another output"],
    ),
    ("rd with one file for both outputs", lambda t: ["rd", str(t), "--json", "x", "--figure", "x"], ["another output"]),
    (
        "uint8 images of 0 and 1",
        lambda t: ["train", "--data", npy(t, (np.arange(40 * 64).reshape(40, 8, 8) % 2).astype(np.uint8))],
        ["uint8 pixels of 0 and 1", "multiply by 255"],
    ),
    (
        "an IDX file that inflates past its header",
        lambda t: ["compress", str(make_run(t)), idx_bomb(t), "-o", "f"],
        ["more"],
    ),
    ("an IDX shape past 2^64", lambda t: ["compress", str(make_run(t)), idx_wrapping(t), "-o", "f"], ["GiB of memory"]),
    ("M2 with one class", one_class_labels, ["--labelled", "1 class", "2 or more"]),
    ("a lock that is a hard link", hard_linked_lock, ["hard link"]),
    ("overwrite of a folder with a copied marker", copied_marker, ["marker of its own", "refusing to delete"]),
    (
        "rd of an evaluation record holding NaN",
        lambda t: ["rd", record_with(t, "evaluation.json", lambda r: r.update(kl=float("nan")))],
        ["torn or was edited"],
    ),
    (
        "report of a compression record without per-image numbers",
        lambda t: ["report", record_with(t, "compression.json", lambda r: r.update(per_image={}))],
        ["torn or was edited"],
    ),
    (
        "serve of a compression record without per-image numbers",
        lambda t: [
            "serve",
            record_with(t, "compression.json", lambda r: r.update(per_image={})),
            "--port",
            free_port(),
        ],
        ["torn or was edited"],
    ),
    (
        "16-bit grey PNGs coded with an 8-bit model",
        lambda t: [
            "compress",
            str(make_run(t, "--likelihood", "logistic", "--binarize", "none")),
            png_folder(t, np.full((28, 28), 1543, np.uint16)),
            "-o",
            str(t / "f.vbb"),
        ],
        ["16-bit", "8 bits cannot hold"],
    ),
    (
        "grey PNGs with transparency",
        lambda t: [
            "compress",
            str(make_run(t, "--likelihood", "logistic", "--binarize", "none")),
            png_folder(t, np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 7, np.uint8)], -1)),
            "-o",
            str(t / "f.vbb"),
        ],
        ["transparency"],
    ),
    (
        "a colour palette with a transparent entry no pixel uses, coded as grey",
        lambda t: [
            "compress",
            str(make_run(t, "--likelihood", "logistic", "--binarize", "none")),
            palette_folder(t),
            "-o",
            str(t / "f.vbb"),
        ],
        ["colours in its palette"],
    ),
    ("decompress over a folder of other files", folder_of_others, ["holiday.jpg", "did not write"]),
    ("a sweep started again with other layers", sweep_again_with("--hidden", "32"), ["hidden: (16,) -> (32,)"]),
    ("posterior gaps of no image", lambda t: ["evaluate", str(t), "--gaps", "0"], ["--gaps", "at least 1"]),
    ("refinement of no step", lambda t: ["evaluate", str(t), "--refine", "0"], ["--refine", "at least 1"]),
    (
        "refinement of a categorical posterior",
        lambda t: ["evaluate", str(make_run(t, "--posterior", "categorical")), "--refine", "5"],
        ["--refine optimises q", "--posterior categorical"],
    ),
    ("posterior gaps under torchrun", lambda t: ["evaluate", str(t), "--gaps", "5", "--nproc", "2"], ["drop --nproc"]),
    (
        "posterior gaps of more images than the split holds",
        lambda t: ["evaluate", str(make_run(t)), "--gaps", "100000", "--iwae-k", "0"],
        ["more images than the split holds (750)", "--gaps 750"],
    ),
    (
        "posterior gaps of a categorical posterior",
        lambda t: ["evaluate", str(make_run(t, "--posterior", "categorical")), "--gaps", "5"],
        ["--posterior categorical", "defines none"],
    ),
    (
        "posterior gaps of two latent layers",
        lambda t: ["evaluate", str(make_run(t, "--family", "hierarchical")), "--gaps", "5"],
        ["2 layers", "layer by layer"],
    ),
    (
        "a sweep printed with a line break in its folder",
        lambda t: ["sweep", "--beta", "1", "--out", str(t / "a\nb"), "--print"],
        ["line break"],
    ),
]


def free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def npz0(tmp_path):
    np.savez(tmp_path / "zero.npz", x=np.array(3.0))
    return str(tmp_path / "zero.npz")


CATALOGUE = [
    ("unknown data set", lambda t: ["train", "--data", "mnsit"], ["unknown data set 'mnsit'", "use digits"]),
    (
        "missing data dir",
        lambda t: ["train", "--data", "mnist", "--data-dir", str(t / "nowhere")],
        ["not found", "--download"],
    ),
    (
        "truncated IDX",
        lambda t: ["train", "--data", "mnist", "--data-dir", mnist_dir(t, truncate)],
        ["truncated or corrupt", "download it again"],
    ),
    (
        "corrupt gzip",
        lambda t: ["train", "--data", "mnist", "--data-dir", mnist_dir(t, not_gzip)],
        ["not a readable gzip file"],
    ),
    (
        "IDX wrong magic",
        lambda t: ["train", "--data", "mnist", "--data-dir", mnist_dir(t, wrong_magic)],
        ["magic number"],
    ),
    ("npy wrong rank", lambda t: ["train", "--data", npy(t, np.zeros(10))], ["shape", "expected (N, H, W)"]),
    ("images of mixed sizes", lambda t: ["train", "--data", folder_mixed_sizes(t)], ["differ in size", "resize"]),
    ("NaN pixels", lambda t: ["train", "--data", npy(t, np.full((20, 4, 4), np.nan))], ["NaN or infinite"]),
    ("Inf pixels", lambda t: ["train", "--data", npy(t, np.full((20, 4, 4), np.inf))], ["NaN or infinite"]),
    (
        "values outside [0, 1]",
        lambda t: ["train", "--data", npy(t, np.full((20, 4, 4), 3.0))],
        ["[3, 3]", "divide by 255"],
    ),
    (
        "grey values with a Bernoulli likelihood",
        lambda t: ["train", "--binarize", "none"],
        ["bernoulli likelihood", "--binarize dynamic"],
    ),
    ("empty data set", lambda t: ["train", "--data", npy(t, np.zeros((0, 4, 4)))], ["no images"]),
    ("batch larger than the data", lambda t: ["train", "--batch-size", "100000"], ["larger than the training set"]),
    ("latent dim 0", lambda t: ["train", "--latent-dim", "0"], ["--latent-dim", "at least 1"]),
    ("negative epochs", lambda t: ["train", "--epochs", "-3"], ["--epochs", "at least 0"]),
    ("unknown option", lambda t: ["train", "--epoch", "3", "--lr-warmup"], ["unrecognized arguments"]),
    ("unknown option in TOML", lambda t: ["train", "--config", toml(t, "epohcs = 3\n")], ["unknown option 'epohcs'"]),
    (
        "wrong type in TOML",
        lambda t: ["train", "--config", toml(t, 'batch_size = "big"\n')],
        ["batch_size", "a whole number"],
    ),
    ("missing TOML file", lambda t: ["train", "--config", str(t / "none.toml")], ["does not exist"]),
    (
        "checkpoint of another architecture",
        lambda t: ["evaluate", other_architecture_checkpoint(t)],
        ["another architecture"],
    ),
    ("truncated checkpoint", lambda t: ["evaluate", truncated_checkpoint(t)], ["truncated or corrupt"]),
    (
        "pickle-bearing checkpoint",
        lambda t: ["evaluate", pickle_checkpoint(t)],
        ["arbitrary pickle", "(builtins.print)", "refuses"],
    ),
    ("run dir that exists", lambda t: ["train", *FAST, "--out", str(make_run(t))], ["already exists", "--overwrite"]),
    (
        "unwritable output dir",
        lambda t: ["train", *FAST, "--out", str(a_file(t) / "run")],
        ["cannot create run directory"],
    ),
    ("CUDA without a GPU", lambda t: ["train", "--device", "cuda"], ["no CUDA GPU", "--device cpu"]),
    ("unknown preset", lambda t: ["train", "--preset", "burda"], ["invalid choice"]),
    ("evaluate a missing run", lambda t: ["evaluate", str(t / "nope")], ["does not exist"]),
    (
        "resume with nothing to resume",
        lambda t: ["train", "--out", str(t / "empty"), "--resume"],
        ["no checkpoints/last.pt"],
    ),
    ("JSON into a missing folder", lambda t: ["explain", "--json", str(t / "no" / "x.json")], ["does not exist"]),
    (
        "resume and auto-resume together",
        lambda t: ["train", "--out", str(make_run(t)), "--resume", "--auto-resume"],
        ["give one"],
    ),
    ("auto-resume without --out", lambda t: ["train", *FAST, "--auto-resume"], ["--auto-resume needs --out"]),
    (
        "total correlation with a prior that does not factorise",
        lambda t: ["train", "--objective", "tc", "--prior", "vamp"],
        ["--objective tc", "vamp prior does not factorise", "--prior normal"],
    ),
    (
        "free bits with the tc objective",
        lambda t: ["train", "--objective", "tc", "--free-bits", "1"],
        ["--dwkl-weight"],
    ),
    (
        "free bits with a full covariance",
        lambda t: ["train", "--posterior", "full", "--free-bits", "1"],
        ["full posterior", "--posterior diagonal"],
    ),
    (
        "VampPrior with a full covariance",
        lambda t: ["train", "--posterior", "full", "--prior", "vamp"],
        ["vamp prior is a mixture", "--prior normal"],
    ),
    ("free bits with the IWAE objective", lambda t: ["train", "--objective", "iwae", "--free-bits", "1"], ["not iwae"]),
    (
        "total correlation with a full covariance",
        lambda t: ["train", "--posterior", "full", "--objective", "tc"],
        ["full posterior does not factorise"],
    ),
    (
        "a conditional model on data without labels",
        lambda t: ["train", "--family", "conditional", "--data", npy(t, np.random.default_rng(0).random((40, 8, 8)))],
        ["--family conditional needs labels", "has none", ".npz with key y"],
    ),
    (
        "a conditional model with convolutions",
        lambda t: ["train", "--family", "conditional", "--model", "conv"],
        ["--family conditional is built with --model mlp"],
    ),
    (
        "flow steps without a flow",
        lambda t: ["train", "--flow-steps", "4"],
        ["--flow-steps", "--posterior iaf"],
    ),
    (
        "a categorical posterior with the normal prior",
        lambda t: ["train", "--posterior", "categorical", "--prior", "normal"],
        ["uniform prior over its categories", "--prior uniform"],
    ),
    (
        "the uniform prior with a Gaussian posterior",
        lambda t: ["train", "--prior", "uniform"],
        ["--posterior categorical", "--prior normal"],
    ),
    (
        "a categorical posterior with the TC objective",
        lambda t: ["train", "--posterior", "categorical", "--objective", "tc"],
        ["no density for --objective tc", "--objective elbo"],
    ),
    (
        "a categorical posterior with free bits above log K",
        lambda t: ["train", "--posterior", "categorical", "--categories", "4", "--free-bits", "2"],
        ["above log K = 1.3863", "--free-bits 1.39 or less"],
    ),
    (
        "one category",
        lambda t: ["train", "--posterior", "categorical", "--categories", "1"],
        ["--categories", "must be at least 2"],
    ),
    (
        "a temperature of 0",
        lambda t: ["train", "--posterior", "categorical", "--temperature", "0"],
        ["temperature must be above 0", "--temperature 1"],
    ),
    (
        "a temperature floor above the start",
        lambda t: ["train", "--posterior", "categorical", "--temperature-min", "3"],
        ["--temperature-min 3.0 is above --temperature 1.0"],
    ),
    (
        "categories without a categorical posterior",
        lambda t: ["train", "--categories", "5"],
        ["--categories is read only with --posterior categorical"],
    ),
    (
        "more categories than memory",
        lambda t: ["train", "--posterior", "vq", "--latent-dim", "64", "--categories", "4000000000"],
        ["this model and batch", "--categories"],
    ),
    (
        "fewer labels than classes",
        lambda t: ["train", "--data", "digits", "--labelled", "5"],
        ["--labelled 5", "needs 10 to"],
    ),
    (
        "more labels than training images",
        lambda t: ["train", "--data", "digits", "--labelled", "100000"],
        ["--labelled 100000", "give a number in that range"],
    ),
    (
        "semi-supervised learning on data without labels",
        lambda t: ["train", "--labelled", "10", "--data", npy(t, np.random.default_rng(0).random((40, 8, 8)))],
        ["--labelled needs labels", "has none"],
    ),
    (
        "the renamed --conditional",
        lambda t: ["train", "--conditional"],
        ["--conditional is now --family conditional"],
    ),
    (
        "a config file that sets conditional and another family",
        lambda t: ["train", "--config", toml(t, 'conditional = true\nfamily = "hierarchical"\n')],
        ["sets both conditional and family 'hierarchical'"],
    ),
    (
        "semi-supervised and conditional at once",
        lambda t: ["train", "--labelled", "10", "--family", "conditional"],
        ["--family conditional needs every label"],
    ),
    (
        "a classifier weight without semi-supervised learning",
        lambda t: ["train", "--alpha", "2"],
        ["--alpha", "add --labelled N"],
    ),
    (
        "a conv grid without VQ-VAE",
        lambda t: ["train", "--model", "conv-grid"],
        ["--model conv-grid quantises", "--posterior vq"],
    ),
    (
        "a conv grid of another size than the latents",
        lambda t: ["train", "--posterior", "vq", "--model", "conv-grid", "--latent-dim", "10"],
        ["7 x 7 grid", "give --latent-dim 49"],
    ),
    (
        "VQ-VAE with free bits",
        lambda t: ["train", "--posterior", "vq", "--free-bits", "0.5"],
        ["N log K", "drop them"],
    ),
    (
        "a codebook that never moves",
        lambda t: ["train", "--posterior", "vq", "--ema-decay", "1"],
        ["--ema-decay must be in [0, 1)", "0.99"],
    ),
    (
        "a code dimension without VQ-VAE",
        lambda t: ["train", "--code-dim", "8"],
        ["--code-dim is read only with --posterior vq"],
    ),
    (
        "a top layer without the hierarchical family",
        lambda t: ["train", "--top-latent-dim", "5"],
        ["--top-latent-dim", "--family hierarchical"],
    ),
    (
        "evaluate on a GPU that is not there",
        lambda t: ["evaluate", str(make_run(t)), "--device", "cuda", "--iwae-k", "0"],
        ["--device cuda", "no CUDA GPU", "--device cpu"],
    ),
    (
        "an order of inference without the hierarchical family",
        lambda t: ["train", "--inference", "bottom-up"],
        ["--inference", "--family hierarchical"],
    ),
    (
        "the hierarchical family with a VampPrior",
        lambda t: ["train", "--family", "hierarchical", "--prior", "vamp"],
        ["--family hierarchical is built with --prior normal", "--family vae"],
    ),
    (
        "the hierarchical family with a full covariance",
        lambda t: ["train", "--family", "hierarchical", "--posterior", "full"],
        ["--posterior diagonal"],
    ),
    (
        "the hierarchical family with the conv model",
        lambda t: ["train", "--family", "hierarchical", "--model", "conv"],
        ["--model mlp"],
    ),
    (
        "the hierarchical family with the tc objective",
        lambda t: ["train", "--family", "hierarchical", "--objective", "tc"],
        ["one latent layer", "--objective elbo"],
    ),
    (
        "free bits with a flow posterior",
        lambda t: ["train", "--posterior", "iaf", "--free-bits", "1"],
        ["iaf posterior", "--free-bits 0"],
    ),
    (
        "resume with another top layer",
        lambda t: [
            "train",
            "--out",
            str(make_run(t, "--family", "hierarchical", "--top-latent-dim", "3")),
            "--resume",
            *FAST,
            "--family",
            "hierarchical",
            "--top-latent-dim",
            "4",
        ],
        ["top_latent_dim: 3 -> 4"],
    ),
    (
        "a validation set as large as the data",
        lambda t: ["train", *FAST, "--data", "digits", "--val-size", "1527"],
        ["too few to split", "smaller --val-size"],
    ),
    (
        "resume with another validation set",
        lambda t: [
            "train",
            "--out",
            str(make_run(t, "--data", "digits")),
            "--resume",
            *FAST,
            "--data",
            "digits",
            "--val-size",
            "50",
        ],
        ["val_size: -1 -> 50", "start a new run"],
    ),
    (
        "evaluate the validation split of a run without one",
        lambda t: ["evaluate", str(make_run(t, "--data", "digits", "--val-size", "0")), "--split", "val"],
        ["no val images", "--split test"],
    ),
    (
        "auto-resume into a folder that is not a run",
        lambda t: ["train", *FAST, "--out", str(a_file(t).parent), "--auto-resume"],
        ["not empty"],
    ),
    (
        "auto-resume into a folder with a stray config.toml",
        lambda t: ["train", *FAST, "--out", not_a_run(t), "--auto-resume"],
        ["not a vaelab run", "another --out"],
    ),
    (
        "overwrite a folder that is not a run",
        lambda t: ["train", *FAST, "--out", not_a_run(t), "--overwrite"],
        ["no .vaelab-run marker", "refusing to delete"],
    ),
    (
        "auto-resume a finished run whose checkpoints were removed",
        lambda t: ["train", *FAST, "--out", run_without_last(t), "--auto-resume"],
        ["no checkpoints/last.pt", "--overwrite"],
    ),
    (
        "per-example output over the run's weights",
        lambda t: [
            "evaluate",
            str(run := make_run(t)),
            "--iwae-k",
            "0",
            "--per-example",
            str(run / "model.safetensors"),
        ],
        ["--per-example", "would overwrite a file of the run"],
    ),
    (
        "JSON output over the run's config",
        lambda t: ["evaluate", str(run := make_run(t)), "--iwae-k", "0", "--json", str(run / "config.toml")],
        ["--json", "would overwrite a file of the run"],
    ),
    (
        "report over the run's checkpoint",
        lambda t: ["report", str(run := make_run(t)), "--out", str(run / "checkpoints" / "best.pt")],
        ["inside the run", "checkpoints/"],
    ),
    (
        "JSON output over the checkpoint being evaluated",
        lambda t: ["evaluate", str(p := make_run(t) / "checkpoints" / "best.pt"), "--iwae-k", "0", "--json", str(p)],
        ["the file this command reads"],
    ),
    ("resume through a linked metrics.csv", resumed(linked_run, "--epochs", "2"), ["symbolic link", "metrics.csv"]),
    (
        "resume through a linked tensorboard folder",
        resumed(lambda t: linked_run(t, "tensorboard"), "--epochs", "2"),
        ["symbolic link", "tensorboard"],
    ),
    (
        "resume with another beta",
        resumed(lambda t: str(make_run(t, "--beta", "4")), "--epochs", "2", "--beta", "1"),
        ["beta: 4.0 -> 1.0", "start a new run"],
    ),
    (
        "resume with another objective",
        resumed(lambda t: str(make_run(t)), "--objective", "iwae"),
        ["objective: 'elbo' -> 'iwae'"],
    ),
    (
        "a run whose every batch is NaN",
        lambda t: [
            "train",
            *FAST,
            "--lr",
            "1e30",
            "--lr-schedule",
            "constant",
            "--skip-nonfinite",
            "1000",
            "--out",
            str(t / "d"),
        ],
        ["diverged", "lower --lr"],
    ),
    ("a new run of zero epochs", lambda t: ["train", *FAST, "--epochs", "0"], ["--epochs 0 trains nothing"]),
    ("labels that are a scalar", lambda t: ["train", *FAST, "--data", labelled(t, np.array(3))], ["shape ()"]),
    (
        "one-hot labels",
        lambda t: ["train", *FAST, "--data", labelled(t, np.eye(4)[np.arange(40) % 4])],
        ["shape (40, 4)", "y.argmax(1)"],
    ),
    ("labels as a column", lambda t: ["train", *FAST, "--data", labelled(t, np.zeros((40, 1)))], ["shape (40, 1)"]),
    ("negative labels", lambda t: ["train", *FAST, "--data", labelled(t, np.arange(40) - 1)], ["from -1"]),
    ("NaN labels", lambda t: ["train", *FAST, "--data", labelled(t, np.full(40, np.nan))], ["NaN"]),
    ("fractional labels", lambda t: ["train", *FAST, "--data", labelled(t, np.full(40, 1.5))], ["fractional"]),
    ("string labels", lambda t: ["train", *FAST, "--data", labelled(t, np.array(["a"] * 40))], ["not numbers"]),
    (
        "object labels",
        lambda t: ["train", *FAST, "--data", labelled(t, np.array([{"a": 1}] * 40, dtype=object))],
        ["without pickle"],
    ),
    (
        "a label of a billion",
        lambda t: [
            "train",
            *FAST,
            "--family",
            "conditional",
            "--data",
            labelled(t, np.r_[np.zeros(39), 1e9].astype(np.int64)),
        ],
        ["at most 10,000"],
    ),
    ("a negative seed", lambda t: ["train", *FAST, "--seed", "-1"], ["seed must be", "2^63"]),
    ("a seed beyond 64 bits", lambda t: ["train", *FAST, "--seed", str(2**70)], ["seed must be"]),
    ("nan in a TOML config", lambda t: ["train", "--config", toml(t, "beta = nan\n")], ["beta in config file"]),
    ("inf in a TOML config", lambda t: ["train", "--config", toml(t, "lr = inf\n")], ["lr in config file"]),
    (
        "total correlation from batches of one",
        lambda t: ["train", *FAST, "--objective", "tc", "--batch-size", "1"],
        ["--batch-size 2 or more"],
    ),
    ("importance samples without IWAE", lambda t: ["train", "--k", "10"], ["--k is read only with --objective iwae"]),
    ("a TC weight without the tc objective", lambda t: ["train", "--tc-weight", "6"], ["--objective tc"]),
    ("a rank without a low-rank posterior", lambda t: ["train", "--posterior-rank", "3"], ["--posterior lowrank"]),
    ("mixture components with the normal prior", lambda t: ["train", "--prior-components", "5"], ["--prior mixture"]),
    ("a latent space of 10^8 dimensions", lambda t: ["train", "--latent-dim", "100000000"], ["GiB of memory"]),
    ("a hidden layer of 2e9 units", lambda t: ["train", "--hidden", "2000000000"], ["GiB of memory", "--hidden"]),
    ("ten million importance samples", lambda t: ["train", "--objective", "iwae", "--k", "10000000"], ["GiB"]),
    ("a .npy whose header lies about its size", lambda t: ["train", "--data", lying_npy(t)], ["not a readable"]),
    ("explain with 10^12 samples", lambda t: ["explain", "--samples", str(10**12)], ["GiB of memory", "--samples"]),
    ("report of a torn evaluation.json", lambda t: ["report", torn_evaluation(t)], ["torn or was edited"]),
    (
        "a model file declaring layers it does not have",
        lambda t: ["evaluate", huge_declared_layers(t), "--iwae-k", "0"],
        ["another architecture than its config"],
    ),
    (
        "evaluate from a folder where the data path names other images",
        lambda t: ["evaluate", data_from_another_folder(t), "--iwae-k", "0"],
        ["not the images and labels", "--data"],
    ),
    ("report of a run holding another run's weights", lambda t: ["report", weights_of_another_run(t)], ["another run"]),
    ("resume on permuted labels", conditional_then_permuted, ["the labels differ"]),
    (
        "explain's page over a run's weights",
        lambda t: ["explain", "--samples", "100", "--html", str(make_run(t) / "model.safetensors")],
        ["--html", "would overwrite a file of the run"],
    ),
    (
        "report over the run's config",
        lambda t: ["report", str(run := make_run(t)), "--out", str(run / "config.toml")],
        ["would overwrite a file of the run"],
    ),
    (
        "per-example rows over the run's evaluation record",
        lambda t: ["evaluate", str(run := make_run(t)), "--iwae-k", "0", "--per-example", str(run / "evaluation.json")],
        ["--per-example", "would overwrite a file of the run"],
    ),
    (
        "report over the run's evaluation record",
        lambda t: ["report", str(run := make_run(t)), "--out", str(run / "evaluation.json")],
        ["would overwrite a file of the run"],
    ),
    (
        "compress with a density likelihood",
        compress_run("--likelihood", "gaussian", "--binarize", "none"),
        ["is a density", "--likelihood bernoulli"],
    ),
    (
        "importance-sampled bits-back of two latent layers",
        lambda t: [
            "compress",
            str(make_run(t, "--family", "hierarchical")),
            "-o",
            str(t / "f.vbb"),
            "--particles",
            "5",
        ],
        ["one latent layer", "--particles 1"],
    ),
    (
        "the Bit-Swap order of a top-down hierarchical run",
        lambda t: [*compress_run("--family", "hierarchical")(t), "--order", "bit-swap"],
        ["--order bit-swap", "--inference bottom-up", "top-down", "drop --order"],
    ),
    (
        "coupled particles without particles",
        lambda t: [*compress_run()(t), "--coupled"],
        ["--coupled", "--particles K"],
    ),
    (
        "coupled particles of categorical latents",
        lambda t: [*compress_run("--posterior", "categorical")(t), "--particles", "4", "--coupled"],
        ["--coupled", "categorical", "drop --coupled"],
    ),
    (
        "an order of two layers with particles",
        lambda t: [*compress_run()(t), "--particles", "4", "--order", "bb-ans"],
        ["--order", "--particles 4", "drop it"],
    ),
    (
        "the Bit-Swap order of one latent layer",
        lambda t: [*compress_run()(t), "--order", "bit-swap"],
        ["--order bit-swap", "one latent layer", "drop --order"],
    ),
    ("compress a run with a VampPrior", compress_run("--prior", "vamp"), ["--prior vamp", "--prior normal"]),
    ("compress a conditional run", compress_run("--family", "conditional"), ["--family", "conditional", "labels"]),
    (
        "importance-sampled bits-back of M2",
        lambda t: [*compress_run("--labelled", "10", "--data", "digits")(t), "--particles", "4"],
        ["--particles 4", "M2", "use --particles 1"],
    ),
    (
        "compress a categorical run with --latent-bits",
        lambda t: [*compress_run("--posterior", "categorical")(t), "--latent-bits", "6"],
        ["categorical variables", "drop --latent-bits"],
    ),
    (
        "compress grey images with a Bernoulli run",
        compress_run(images=lambda t: npy(t, np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8))),
        ["binary images", "logistic"],
    ),
    (
        "compress images of another shape",
        compress_run(images=lambda t: npy(t, np.zeros((4, 8, 8), dtype=np.uint8))),
        ["shape (1, 8, 8)", "(1, 28, 28)"],
    ),
    (
        "compress NaN pixels",
        compress_run(images=lambda t: npy(t, np.full((4, 28, 28), np.nan, dtype=np.float32))),
        ["NaN"],
    ),
    ("compress no images", compress_run(images=lambda t: npy(t, np.zeros((0, 28, 28), np.uint8))), ["no images"]),
    ("compress one PNG file", compress_run(images=one_png), ["one image", "folder"]),
    (
        "compress over an existing file",
        lambda t: ["compress", str(make_run(t)), "-o", str(a_file(t)), "--iwae-k", "0"],
        ["exists", "--overwrite"],
    ),
    (
        "compress over the run's weights",
        lambda t: ["compress", str(run := make_run(t)), "-o", str(run / "model.safetensors")],
        ["-o", "would overwrite a file of the run"],
    ),
    (
        "compress on a grid of 2^17 buckets",
        lambda t: ["compress", str(make_run(t)), "-o", str(t / "f.vbb"), "--latent-bits", "17"],
        ["--latent-bits must be 1 to 16"],
    ),
    (
        "decompress a truncated file",
        lambda t: ["decompress", compressed(t, cut), "-o", str(t / "back.npy")],
        ["damaged", "compress again"],
    ),
    (
        "decompress a file with one byte changed",
        lambda t: ["decompress", compressed(t, flip_a_byte), "-o", str(t / "back.npy")],
        ["damaged"],
    ),
    (
        "decompress a file vaelab did not write",
        lambda t: ["decompress", str(a_file(t)), "-o", str(t / "back.npy")],
        ["not a file vaelab compress wrote"],
    ),
    ("decompress with another run", decompress_with_another_run, ["not the model", "--run RUN"]),
    ("decompress when its run has moved", decompress_without_its_run, ["not there", "--run RUN"]),
    (
        "decompress into a run's checkpoints",
        lambda t: ["decompress", compressed(t), "-o", str(t / "run" / "checkpoints" / "back.npy")],
        ["inside the run", "checkpoints/"],
    ),
    (
        "decompress over an existing file",
        lambda t: ["decompress", compressed(t), "-o", str(a_file(t))],
        ["exists", "--overwrite"],
    ),
    ("a sweep value that is not a number", lambda t: ["sweep", "--beta", "0.5,x", "--out", str(t / "s")], ["'x'"]),
    ("a sweep of beta 0", lambda t: ["sweep", "--beta", "0,1", "--out", str(t / "s")], ["'0'", "above 0"]),
    ("a sweep naming a value twice", lambda t: ["sweep", "--seed", "1,1", "--out", str(t / "s")], ["twice"]),
    (
        "a sweep of a knob that cannot be swept",
        lambda t: ["sweep", "--epochs", "5,10", "--out", str(t / "s")],
        ["--epochs cannot be swept", "--beta"],
    ),
    ("a sweep of nothing", lambda t: ["sweep", "--epochs", "5", "--out", str(t / "s")], ["at least one knob"]),
    (
        "a sweep told to overwrite",
        lambda t: ["sweep", "--beta", "1,2", "--overwrite", "--out", str(t / "s")],
        ["resumes its unfinished runs"],
    ),
    ("a sweep into a file", lambda t: ["sweep", "--beta", "1,2", "--out", str(a_file(t))], ["is a file"]),
    ("rd of runs on two data sets", runs_of_two_data_sets, ["not on one scale", "one data set"]),
    ("report of a torn compression record", lambda t: ["report", torn_compression_record(t)], ["torn or was edited"]),
    ("rd of a torn compression record", lambda t: ["rd", torn_compression_record(t)], ["torn or was edited"]),
    ("a negative target rate", lambda t: ["train", *FAST, "--target-rate", "-3"], ["--target-rate", ">= 0"]),
    (
        "a target rate beyond what an image holds",
        lambda t: ["train", *FAST, "--target-rate", "1000"],
        ["more than an image of mnist-5k holds", "543.4 nats"],
    ),
    (
        "a target rate with the IWAE objective",
        lambda t: ["train", *FAST, "--target-rate", "10", "--objective", "iwae"],
        ["--objective elbo", "drop --objective or --target-rate"],
    ),
    (
        "resume with another target rate",
        resumed(lambda t: str(make_run(t, "--target-rate", "5")), "--epochs", "2", "--target-rate", "8"),
        ["target_rate: 5.0 -> 8.0"],
    ),
    ("rd of a folder without runs", lambda t: ["rd", str(t)], ["holds no trained run"]),
    (
        "report compared with itself",
        lambda t: ["report", str(run := make_run(t)), "--compare", str(run)],
        ["another run"],
    ),
]


CATALOGUE += HOSTILE


@pytest.mark.parametrize("name,build,words", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(tmp_path, capsys, monkeypatch, name, build, words):
    if name.startswith("CUDA without a GPU") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # the message is for machines without one
    monkeypatch.chdir(tmp_path)  # default run directories land here
    argv = build(tmp_path)
    capsys.readouterr()
    before = snapshot(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vaelab: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    after = snapshot(tmp_path)
    assert {p: h for p, h in after.items() if p in before} == before  # nothing the user had changed
    assert not [p for p in after if p not in before and "runs" in p.parts]  # no stray run left behind


def test_the_catalogue_is_long_enough():
    assert len(CATALOGUE) >= 25


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(Exception, match="unknown data set"):
        main(["--debug", "train", "--data", "mnsit"])
