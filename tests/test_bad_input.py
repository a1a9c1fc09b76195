"""The catalogue of bad inputs: each gives exit code 2, one line `vaelab: error: ...` that names
the problem and the fix, no traceback, and leaves every file the user had as it was.
(The web app's bad inputs, answered with 4xx, are in test_web.py.)"""

import gzip
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_idx
from vaelab.checkpoint import load_checkpoint
from vaelab.cli import main

FAST = ["--hidden", "16", "--latent-dim", "2", "--epochs", "1"]


class Boom:
    def __reduce__(self):
        return (print, ("never",))


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


# (id, argv builder, words the message must contain)
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
    ("negative epochs", lambda t: ["train", "--epochs", "-3"], ["--epochs", ">= 0"]),
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
    ("pickle-bearing checkpoint", lambda t: ["evaluate", pickle_checkpoint(t)], ["arbitrary pickle", "refuses"]),
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
        lambda t: ["train", "--conditional", "--data", npy(t, np.random.default_rng(0).random((40, 8, 8)))],
        ["--conditional needs labels", "has none", ".npz with key y"],
    ),
    (
        "a conditional hierarchical model",
        lambda t: ["train", "--conditional", "--family", "hierarchical"],
        ["--conditional is a one-layer VAE"],
    ),
    (
        "flow steps without a flow",
        lambda t: ["train", "--flow-steps", "4"],
        ["--flow-steps", "--posterior iaf"],
    ),
    (
        "a top layer without the hierarchical family",
        lambda t: ["train", "--top-latent-dim", "5"],
        ["--top-latent-dim", "--family hierarchical"],
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
        ["held out 127 validation images", "--val-size 127"],
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
]


@pytest.mark.parametrize("name,build,words", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(tmp_path, capsys, monkeypatch, name, build, words):
    if name == "CUDA without a GPU" and torch.cuda.is_available():
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
