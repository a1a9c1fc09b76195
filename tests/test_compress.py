"""Bits-back coding (``vaelab compress`` / ``decompress``): round trips exact to the bit for every
discrete likelihood and every way images come in, the initial bits returned, the coder's bits
checked against exact sums, and the KL term recovered as the net bits for z."""

import gzip
import hashlib
import html
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.distributions import kl_divergence

from conftest import round_trip, train_options, write_idx
from vaelab import bitsback
from vaelab.bitsback import LatentGrid, model_coder
from vaelab.cli import main
from vaelab.compress import compress, decompress, format_summary, unpack
from vaelab.errors import UserError
from vaelab.evaluation import kl_per_example, open_trained
from vaelab.models.base import BernoulliLikelihood, LogisticLikelihood

SMALL = train_options(hidden=32, latent_dim=4, epochs=2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A Bernoulli run (binarised) and a logistic run (8-bit) on a small MNIST-format data set."""
    root = tmp_path_factory.mktemp("compress")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]

    def images(n):
        centres = rng.integers(6, 22, size=(n, 2))
        blobs = np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 18.0)
        return (255 * blobs).astype(np.uint8)

    d = root / "mnist"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte.gz", images(300))
    write_idx(d / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 300))
    write_idx(d / "t10k-images-idx3-ubyte.gz", images(40))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", rng.integers(0, 10, 40))
    out = {}
    for name, options in (
        ("bernoulli", []),
        ("logistic", ["--likelihood", "logistic", "--binarize", "none"]),
        ("hierarchical", ["--family", "hierarchical", "--top-latent-dim", "3"]),
        ("bottom-up", ["--family", "hierarchical", "--top-latent-dim", "3", "--inference", "bottom-up"]),
        ("categorical", ["--posterior", "categorical", "--categories", "5"]),
    ):
        out[name] = root / name
        argv = ["train", "--data", "mnist", "--data-dir", str(d), *SMALL, *options, "--out", str(out[name])]
        assert main(argv) == 0
    out["data"] = d
    return out


# -- the math ---------------------------------------------------------------------------------
def test_the_grid_has_equal_prior_mass_and_masses_that_sum_to_one():
    grid = LatentGrid.of(6)
    prior = grid.masses(torch.zeros(1), torch.ones(1))
    torch.testing.assert_close(prior, torch.full((1, 64), 1 / 64, dtype=torch.float64), rtol=0, atol=1e-14)
    # centres are the prior's (i + 1/2) / 64 quantiles
    torch.testing.assert_close(torch.special.ndtr(grid.centres), (torch.arange(64) + 0.5).double() / 64)
    q = grid.masses(torch.tensor([-7.0, 0.3, 9.0]), torch.tensor([0.01, 0.2, 0.05]))
    torch.testing.assert_close(q.sum(1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)
    assert (q >= 0).all()
    assert q[2, -1] > 0.99  # far right: from the survival function, not 1 - 1


def test_the_discretised_kl_tends_to_the_closed_form():
    """sum_i Q_i log2(Q_i / 2^-b) on the grid against torch.distributions' KL: the KL of the
    discretised latent is below the continuous one (data processing) and reaches it as b grows."""
    g = torch.Generator().manual_seed(0)
    mu, sigma = torch.randn(20, generator=g), 0.05 + torch.rand(20, generator=g)
    exact = kl_divergence(torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)).sum()
    exact_bits = exact.item() / math.log(2)
    gaps = []
    for bits in (4, 8, 12):
        q = LatentGrid.of(bits).masses(mu, sigma)
        discrete = (q * (torch.log2(q.clamp_min(1e-300)) + bits)).sum().item()
        assert discrete <= exact_bits + 1e-9
        gaps.append(exact_bits - discrete)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3 * exact_bits, gaps


def test_each_likelihood_table_is_its_log_prob():
    g = torch.Generator().manual_seed(1)
    logits = 4 * torch.randn(3, 1, 5, 5, generator=g)
    table = BernoulliLikelihood().pmf(logits)
    for value in (0, 1):
        x = torch.full((3, 1, 5, 5), float(value))
        expected = BernoulliLikelihood()(logits).base_dist.log_prob(x).flatten(1).double()
        torch.testing.assert_close(table[..., value].log(), expected, rtol=1e-5, atol=1e-5)
    out = torch.cat([torch.randn(3, 1, 5, 5, generator=g), -1 - 2 * torch.rand(3, 1, 5, 5, generator=g)], 1)
    likelihood = LogisticLikelihood()
    table = likelihood.pmf(out)
    torch.testing.assert_close(table.sum(-1), torch.ones(3, 25, dtype=torch.float64), rtol=0, atol=1e-12)
    p = likelihood(out).base_dist
    for level in (0, 17, 128, 255):
        x = torch.full((3, 1, 5, 5), level / 255)
        expected = p.log_prob(x).flatten(1).double()
        big = table[..., level] > 1e-4  # where log_prob is the exact difference of sigmoids (not its tail form)
        torch.testing.assert_close(table[..., level].log()[big], expected[big], rtol=1e-4, atol=1e-4)
    # the probabilities of given values only (what BB-IS's weights read) are the table's, to the bit
    for lik, o, levels in ((BernoulliLikelihood(), logits, 2), (likelihood, out, 256)):
        at = torch.randint(0, levels, (1, 25), generator=g)
        full = lik.pmf(o).gather(-1, at.expand(3, -1).unsqueeze(-1)).squeeze(-1)
        assert torch.equal(lik.pmf(o, at), full)
    # far above a sharp location the top bin keeps its own tiny mass (the survival function, not 1 - 1):
    # log P(255) = logsigmoid(-(254.5 / 255 - loc) / s), which log_prob computes the same way
    sharp = torch.cat([torch.full((1, 1, 2, 2), -4.0), torch.full((1, 1, 2, 2), -5.0)], 1)
    top = likelihood.pmf(sharp)[..., 255]
    assert (top > 0).all() and top.max() < 1e-50  # about e^-146
    expected = likelihood(sharp).base_dist.log_prob(torch.ones(1, 1, 2, 2)).flatten(1).double()
    torch.testing.assert_close(top.log(), expected, rtol=1e-5, atol=0)


def test_fair_coin_flips_pay_the_discretised_kl_for_z(runs):
    """Each image coded onto a stack of fresh random bits: popping z then draws z ~ Q(z|x), so the net
    bits for z average E_Q[log2 Q - log2 P] (summed exactly over the grid). Monte Carlo over 40 images
    x 5 seeds; 4.5 standard errors (a false alarm about 1 in 150,000)."""
    t = open_trained(runs["bernoulli"])
    x = t.examples("test").x
    symbols = x.flatten(1).round().int().numpy()
    coder = model_coder(t.model, 2, 8)
    paid, expected = [], []
    for s in range(5):
        for i in range(len(symbols)):
            _, costs = coder.encode(symbols[i : i + 1], seed=1000 * s + i)
            paid.append(costs.z_net[0])
    with torch.no_grad():
        for i in range(len(symbols)):
            mu, sigma = coder.posterior(x[i : i + 1])
            q = coder.grid.masses(mu.reshape(-1), sigma.reshape(-1))
            expected.append(((q * (torch.log2(q.clamp_min(1e-300)) + 8)).sum()).item())
    paid, expected = np.array(paid), np.tile(expected, 5)
    diff = paid - expected
    assert abs(diff.mean()) < 4.5 * diff.std() / math.sqrt(len(diff)) + 1e-9, (paid.mean(), expected.mean())


def test_the_message_is_the_sum_of_what_each_symbol_cost(runs):
    """The coder's message length against the information content of every symbol it coded (from the
    float tables): equal up to the initial bits and what 24-bit quantisation of the tables costs."""
    t = open_trained(runs["logistic"])
    x = t.examples("test").x
    symbols = (x.flatten(1) * 255).round().int().numpy()
    coder = model_coder(t.model, 256, 8)
    message, costs = coder.encode(symbols)
    initial = 32 * len(bitsback.initial_words(coder.latent_dim, 0))
    coded = 32 * len(message) - initial
    assert abs(coded - costs.net.sum()) < 0.002 * costs.net.sum() + 64, (coded, costs.net.sum())
    decoded, returned = coder.decode(message, len(symbols))
    assert returned and np.array_equal(decoded, symbols)
    damaged = message.copy()
    damaged[len(damaged) // 2] ^= np.uint32(1 << 7)
    decoded, returned = coder.decode(damaged, len(symbols))
    assert not (returned and np.array_equal(decoded, symbols))


# -- the commands -------------------------------------------------------------------------------
def test_compress_then_decompress_gives_back_the_run_split_exactly(runs, tmp_path, capsys):
    run = runs["bernoulli"]
    file = tmp_path / "test.vbb"
    assert main(["compress", str(run), "-o", str(file), "--iwae-k", "50", "--json", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    for words in ("z net: the KL term", "analytic KL", "the model's -ELBO", "IWAE k=50", "bz2 -9", "WebP"):
        assert words in printed
    summary = json.loads((tmp_path / "s.json").read_text())
    b = summary["bits_per_image"]
    assert b["z_pushed"] == 8 * 4  # b bits per dimension, exactly
    assert summary["message_bits"] - summary["initial_bits"] == pytest.approx(40 * b["net"], rel=2e-3, abs=64)
    assert len(summary["per_image"]["net"]) == 40
    x = open_trained(run).examples("test").x
    assert main(["decompress", str(file), "-o", str(tmp_path / "back.npy")]) == 0
    back = np.load(tmp_path / "back.npy")
    assert back.dtype == np.uint8 and back.shape == (40, 28, 28)
    assert np.array_equal(back, (x[:, 0].numpy() * 255).astype(np.uint8))  # the binarised split, 0 and 255
    assert main(["decompress", str(file), "-o", str(tmp_path / "pngs")]) == 0
    pngs = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(pngs) == 40 and np.array_equal(np.stack([np.asarray(Image.open(p)) for p in pngs]), back)


def test_an_idx_file_comes_back_byte_for_byte(runs, tmp_path):
    source = runs["data"] / "t10k-images-idx3-ubyte.gz"
    raw = np.frombuffer(gzip.decompress(source.read_bytes())[16:], dtype=np.uint8).reshape(40, 28, 28)
    compress(runs["logistic"], tmp_path / "idx.vbb", images=source, iwae_k=0)
    decompress(tmp_path / "idx.vbb", tmp_path / "back.npy")
    assert np.array_equal(np.load(tmp_path / "back.npy"), raw)


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64])
def test_arrays_come_back_in_their_own_type_and_layout(runs, tmp_path, layout, dtype):
    rng = np.random.default_rng(3)
    levels = rng.random((6, 28, 28)) < 0.3
    values = levels.astype(dtype) * (255 if dtype == np.uint8 else 1)
    values = {"NHW": values, "NCHW": values[:, None], "NHWC": values[..., None]}[layout]
    np.save(tmp_path / "in.npy", values)
    compress(runs["bernoulli"], tmp_path / "f.vbb", images=tmp_path / "in.npy", iwae_k=0, latent_bits=5)
    decompress(tmp_path / "f.vbb", tmp_path / "out.npy")
    back = np.load(tmp_path / "out.npy")
    assert back.dtype == values.dtype and back.shape == values.shape and np.array_equal(back, values)


def test_a_folder_of_pngs_comes_back_pixel_for_pixel(runs, tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(4)
    pictures = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    for i, p in enumerate(pictures):
        Image.fromarray(p).save(folder / f"p{i}.png")
    compress(runs["logistic"], tmp_path / "f.vbb", images=folder, iwae_k=0)
    decompress(tmp_path / "f.vbb", tmp_path / "out")
    back = np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "out").glob("*.png"))])
    assert np.array_equal(back, pictures)


def test_sigterm_while_pngs_are_written_leaves_nothing_behind(runs, tmp_path):
    """SIGTERM stops `vaelab decompress` as Ctrl-C does: exit 143, and the folder of PNGs it was writing goes
    (SIGTERM's default action ended the process on the spot, leaving a hidden folder of the first images)."""
    file = tmp_path / "f.vbb"
    compress(runs["bernoulli"], file, iwae_k=0)
    script = textwrap.dedent(
        f"""
        import os, signal
        from vaelab import compress
        real, written = compress.atomic_write_bytes, []
        def write(path, data):  # the third image written, then a SIGTERM
            real(path, data)
            written.append(path)
            if len(written) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        compress.atomic_write_bytes = write
        from vaelab.cli import main
        raise SystemExit(main(["decompress", {str(file)!r}, "-o", {str(tmp_path / "pngs")!r}]))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 143 and "vaelab: stopped by SIGTERM" in done.stderr, done.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["f.vbb"]


def test_the_file_names_the_model_and_the_images(runs, tmp_path):
    compress(runs["bernoulli"], tmp_path / "f.vbb", iwae_k=0)
    header, message = unpack(tmp_path / "f.vbb")
    assert header["images"] == 40 and header["x_shape"] == [1, 28, 28] and header["levels"] == 2
    assert len(header["model"]) == 64 and len(header["images_check"]) == 64 and message.dtype == np.uint32
    # nothing of the sender's machine: the run relative to the file, no versions, no plain hash of the images
    assert not Path(header["run"]).is_absolute() and "coded_on" not in header and "images_sha256" not in header
    decompress(tmp_path / "f.vbb", tmp_path / "back.npy")
    assert header["images_check"] != hashlib.sha256(np.load(tmp_path / "back.npy").tobytes()).hexdigest()


def test_other_arithmetic_on_decoding_writes_nothing(runs, tmp_path, monkeypatch):
    """A machine whose arithmetic gives the model other probabilities decodes other images: the
    checksum says so in one line and no output appears."""
    compress(runs["bernoulli"], tmp_path / "f.vbb", iwae_k=0)
    real = bitsback.BitsBack._p_x

    def other(self, z):
        p = real(self, z)
        return p * np.where(np.arange(p.shape[0])[:, None] % 7 == 0, [1.3, 0.7], 1.0)

    monkeypatch.setattr(bitsback.BitsBack, "_p_x", other)
    with pytest.raises(UserError, match="does not give back the images that were coded"):
        decompress(tmp_path / "f.vbb", tmp_path / "out.npy")
    assert not (tmp_path / "out.npy").exists()


def test_importance_sampling_round_trips_and_pays_the_iwae_bound(runs):
    """BB-IS with 10 particles: exact round trip and the initial bits back; coded onto fresh random bits,
    its net length averages the IWAE-10 bound of the discretised model, -E log2 (1/K sum_k w_k),
    estimated here independently from particles drawn with numpy. 40 images x 5 seeds against
    40 x 20 draws; 4.5 standard errors of the difference (a false alarm about 1 in 150,000)."""
    t = open_trained(runs["bernoulli"])
    x = t.examples("test").x
    symbols = x.flatten(1).round().int().numpy()
    K = 10
    coder = model_coder(t.model, 2, 8, particles=K)
    message, costs = round_trip(coder, symbols)
    initial = 32 * len(bitsback.initial_words(coder.latent_dim, 0, K))
    assert abs(32 * len(message) - initial - costs.net.sum()) < 0.002 * costs.net.sum() + 64

    paid = [coder.encode(symbols[i : i + 1], seed=100 * s + i)[1].net[0] for s in range(5) for i in range(len(x))]
    rng, bound, D = np.random.default_rng(7), [], coder.latent_dim
    with torch.no_grad():
        for i in range(len(x)):
            q = coder._q(symbols[i])
            for _ in range(20):
                zs = np.stack([rng.choice(q.shape[1], size=K, p=q[d] / q[d].sum()) for d in range(D)], 1)
                tables = coder._tables(zs)
                log_w = (
                    np.log2(tables[:, np.arange(symbols.shape[1]), symbols[i]]).sum(1)
                    - 8 * D
                    - np.log2(np.take_along_axis(q, zs.T, 1)).sum(0)
                )
                bound.append(-(np.logaddexp2.reduce(log_w) - math.log2(K)))
    paid, bound = np.array(paid), np.array(bound)
    se = math.sqrt(paid.var() / len(paid) + bound.var() / len(bound))
    assert abs(paid.mean() - bound.mean()) < 4.5 * se, (paid.mean(), bound.mean(), se)


def test_coupled_particles_round_trip_pay_their_bound_and_need_one_particle_s_initial_bits(runs, tmp_path):
    """BB-CIS with 10 particles: q's counts out of 2^16 each at least 1 and summing to 2^16; exact round trip
    with the initial bits back, which are BB-ANS's (one particle's), not BB-IS's ten; the message is those
    plus the net code; coded onto fresh random bits, the net length averages -E log2 (1/K sum_k w_k) over
    particles that are the buckets of one uniform u shifted by k 2^16 / K, estimated independently with
    numpy (40 images x 5 seeds against 40 x 20 draws of u; 4.5 standard errors, a false alarm about 1 in
    150,000); compress and decompress name it in the file."""
    t = open_trained(runs["bernoulli"])
    x = t.examples("test").x
    symbols = x.flatten(1).round().int().numpy()
    K, M = 10, 2**bitsback.COUPLING_BITS
    coder = model_coder(t.model, 2, 8, particles=K, coupled=True)
    with torch.no_grad():
        masses = coder._masses(coder._image(symbols[0])).numpy()
    counts = bitsback.quantised_counts(masses)
    assert (counts >= 1).all() and (counts.sum(1) == M).all() and np.abs(counts / M - masses).max() < 300 / M
    message, costs = round_trip(coder, symbols)
    initial = 32 * len(coder.initial_words(0))
    assert initial == 32 * len(bitsback.initial_words(coder.latent_dim, 0)) < 32 * len(bitsback.initial_words(4, 0, K))
    assert abs(32 * len(message) - initial - costs.net.sum()) < 0.002 * costs.net.sum() + 64
    assert costs.initial_bits_needed() <= 16 * coder.latent_dim + 24

    paid = [coder.encode(symbols[i : i + 1], seed=100 * s + i)[1].net[0] for s in range(5) for i in range(len(x))]
    rng, bound, D = np.random.default_rng(7), [], coder.latent_dim
    shifts = np.arange(K) * M // K
    with torch.no_grad():
        for i in range(len(x)):
            counts = bitsback.quantised_counts(coder._masses(coder._image(symbols[i])).numpy())
            edges = np.cumsum(counts, 1)  # bucket b holds [edges[b] - counts[b], edges[b])
            for _ in range(20):
                u = (rng.integers(0, M, size=D)[None] + shifts[:, None]) % M  # (K, D)
                zs = np.stack([np.searchsorted(edges[d], u[:, d], side="right") for d in range(D)], 1)
                tables = coder._tables(zs)
                log_w = (
                    np.log2(tables[:, np.arange(symbols.shape[1]), symbols[i]]).sum(1)
                    - 8 * D
                    - np.log2(np.take_along_axis(counts / M, zs.T, 1)).sum(0)
                )
                bound.append(-(np.logaddexp2.reduce(log_w) - math.log2(K)))
    paid, bound = np.array(paid), np.array(bound)
    se = math.sqrt(paid.var() / len(paid) + bound.var() / len(bound))
    assert abs(paid.mean() - bound.mean()) < 4.5 * se, (paid.mean(), bound.mean(), se)

    summary = compress(runs["bernoulli"], tmp_path / "c.vbb", particles=K, coupled=True, iwae_k=0)
    assert summary["coder"] == "bb-cis" and unpack(tmp_path / "c.vbb")[0]["coder"] == "bb-cis"
    assert "coupled" in format_summary(summary)
    decompress(tmp_path / "c.vbb", tmp_path / "c.npy")
    assert np.array_equal(np.load(tmp_path / "c.npy"), (x[:, 0].numpy() * 255).astype(np.uint8))


def test_each_grid_of_the_sweep_draws_from_its_own_stream(runs):
    """The sweep's figure for 8 latent bits is the same alone as after the coarser grids' draws."""
    t = open_trained(runs["bernoulli"])
    symbols = t.examples("test").x.flatten(1).round().int().numpy()
    coder = model_coder(t.model, 2, 8)
    assert coder.latent_bits_sweep(symbols, bits=(8,))[0] == coder.latent_bits_sweep(symbols)[3]


def test_the_run_keeps_a_record_its_report_draws(runs, tmp_path):
    """Coding the run's own split leaves RUN/compression.json (of these weights), which the report
    draws; coding other images leaves the run as it was."""
    from vaelab.report import run_report

    run = runs["logistic"]
    (run / "compression.json").unlink(missing_ok=True)
    compress(run, tmp_path / "idx.vbb", images=runs["data"] / "t10k-images-idx3-ubyte.gz", iwae_k=0)
    assert not (run / "compression.json").exists()
    summary = compress(run, tmp_path / "own.vbb", iwae_k=20)
    record = json.loads((run / "compression.json").read_text())
    assert record["split"] == "test" and record["bits_per_image"] == summary["bits_per_image"]
    page, figures = run_report(run, out=tmp_path / "page.html")
    text = page.read_text()
    assert "The KL term as bits" in text and f"{summary['bits_per_image']['kl']:.2f}" in text
    assert any("kl-term-as-bits" in f.name for f in figures)
    # the latent-bits sweep: nested grids, so z's expected net climbs with b and stays under the analytic KL
    sweep = record["latent_bits_sweep"]
    assert [row["latent_bits"] for row in sweep] == [2, 4, 6, 8, 10, 12]
    z_net = [row["z_net"] for row in sweep]
    assert all(a <= b + 1e-9 for a, b in zip(z_net, z_net[1:], strict=False)) and z_net[0] < z_net[-1]
    assert z_net[-1] <= record["bits_per_image"]["kl"] + 1e-6
    # the file's own grid (a batch of images through the encoder, not one by one: float32 rounding apart)
    assert z_net[3] == pytest.approx(record["bits_per_image"]["z_net_expected"], rel=1e-6)
    assert "a cheap z, dear pixels" in text and any("cheap-z" in f.name for f in figures)
    from fastapi.testclient import TestClient

    from vaelab.web.app import create_app

    shown = TestClient(create_app(run), base_url="http://127.0.0.1").get("/api/test/3").json()["bits"]
    assert shown == {k: record["per_image"][k][3] for k in shown}  # the page's inspector, image by image
    assert shown["net"] == pytest.approx(shown["pixels"] + shown["z_pushed"] - shown["z_back"], abs=1e-3)
    (run / "compression.json").unlink()
    assert "bits" not in TestClient(create_app(run), base_url="http://127.0.0.1").get("/api/test/3").json()


def test_two_latent_layers_round_trip_and_pay_both_kl_terms(runs, tmp_path):
    """The hierarchical family: z2 on the prior's grid, z1 on p(z1|z2)'s; exact round trip, the initial
    bits back, both layers' pushes b bits per dimension, and the net code within its accounting."""
    t = open_trained(runs["hierarchical"])
    x = t.examples("test").x
    symbols = x.flatten(1).round().int().numpy()
    coder = model_coder(t.model, 2, 8)
    assert coder.latent_dim == 4 + 3
    message, costs = round_trip(coder, symbols)
    assert (costs.z_pushed == 8 * 7).all()
    initial = 32 * len(bitsback.initial_words(coder.latent_dim, 0))
    assert abs(32 * len(message) - initial - costs.net.sum()) < 0.002 * costs.net.sum() + 64
    summary = compress(runs["hierarchical"], tmp_path / "h.vbb", iwae_k=0)
    assert summary["layers"] == 2 and "z_net_expected" not in summary["bits_per_image"]
    from vaelab.report import run_report

    page, _ = run_report(runs["hierarchical"], out=tmp_path / "h.html")  # its record has no expected z net
    text = html.unescape(page.read_text())
    assert "The KL term as bits" in text and "The net bits for z2 and z1 average" in text  # both layers, named
    decompress(tmp_path / "h.vbb", tmp_path / "h.npy")
    assert np.array_equal(np.load(tmp_path / "h.npy"), (x[:, 0].numpy() * 255).astype(np.uint8))


def test_bit_swap_needs_fewer_initial_bits_than_popping_both_layers_first(runs, tmp_path):
    """Bottom-up inference, both orders: exact round trips; the same first z1 (the same initial bits and
    q(z1|x)); BB-ANS's order must hold every pop of an image (its peak is z1's and z2's bits back), Bit-Swap's
    only z1's, or z1's less x's plus z2's; the message is the initial bits plus the net code; compress
    defaults to Bit-Swap and decompress reads the order from the file."""
    t = open_trained(runs["bottom-up"])
    x = t.examples("test").x
    symbols = x.flatten(1).round().int().numpy()
    swap, plain = (model_coder(t.model, 2, 8, order=order) for order in ("bit-swap", "bb-ans"))
    message, costs = round_trip(swap, symbols)
    _, before = round_trip(plain, symbols)
    np.testing.assert_array_equal(before.peak, before.z_back)
    assert (costs.peak <= costs.z_back + 1e-9).all() and costs.peak[0] < before.peak[0]
    assert costs.initial_bits_needed() < before.initial_bits_needed()
    initial = 32 * len(bitsback.initial_words(swap.latent_dim, 0))
    assert abs(32 * len(message) - initial - costs.net.sum()) < 0.002 * costs.net.sum() + 64
    summary = compress(runs["bottom-up"], tmp_path / "b.vbb", iwae_k=0)
    assert summary["coder"] == "bit-swap" and summary["initial_bits_needed"] == pytest.approx(
        costs.initial_bits_needed()
    )
    assert "Bit-Swap" in format_summary(summary) and "q(z2|z1)" in format_summary(summary)
    compress(runs["bottom-up"], tmp_path / "a.vbb", iwae_k=0, order="bb-ans")
    for name in ("b", "a"):
        decompress(tmp_path / f"{name}.vbb", tmp_path / f"{name}.npy")
        assert np.array_equal(np.load(tmp_path / f"{name}.npy"), (x[:, 0].numpy() * 255).astype(np.uint8))


def test_z1_grid_follows_the_prior_marginal_of_z1(runs):
    """Bit-Swap's z1 buckets have equal mass under N(m, s^2), p(z1)'s moments per dimension, rounded (m to
    1/16, s to a power of 2^(1/8)): against ancestral samples z2 ~ N(0, I), z1 ~ p(z1|z2) of another seed
    (4,096 of them, each way: the deviation within 9 %, 4.4 % of rounding and 4 standard errors of 1.1 %)."""
    model = open_trained(runs["bottom-up"]).model
    prior = model._p_bottom
    loc, scale = bitsback.z1_moments(lambda z2: (prior(z2).base_dist.loc, prior(z2).base_dist.scale), 3)
    torch.testing.assert_close(loc * 16, (loc * 16).round(), rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.log2(scale) * 8, (torch.log2(scale) * 8).round(), rtol=0, atol=1e-12)
    with torch.no_grad():
        z1 = prior(torch.randn(4096, 3, generator=torch.Generator().manual_seed(1))).sample().double()
    assert ((scale / z1.std(0)).log().abs() < math.log(1.09)).all()
    assert ((loc - z1.mean(0)).abs() < 1 / 32 + 4 * z1.std(0) / 64).all()


def test_categorical_variables_are_coded_as_their_categories_and_pay_the_kl_term(runs, tmp_path):
    """No grid for categorical z: each of the 4 variables is pushed with the uniform prior at exactly
    log2 5 bits; the net bits for z that fair coin flips average, summed over every category, are the
    closed-form KL in bits (no discretisation to lose), and what the coder pays on fresh random bits
    averages that (Monte Carlo over 40 images x 5 seeds, 4.5 standard errors). Exact round trips, BB-IS too."""
    t = open_trained(runs["categorical"])
    x = t.examples("test").x
    symbols = x.flatten(1).round().int().numpy()
    coder = model_coder(t.model, 2, 8)
    message, costs = round_trip(coder, symbols)
    np.testing.assert_allclose(costs.z_pushed, 4 * math.log2(5), rtol=1e-12)
    kl_bits = kl_per_example(t.model, x).value.double().numpy() / math.log(2)
    expected = np.array([coder.expected_z_net(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(expected, kl_bits, rtol=1e-4, atol=1e-4)  # float32 probabilities, floored at 2^-24
    paid = [coder.encode(symbols[i : i + 1], seed=1000 * s + i)[1].z_net[0] for s in range(5) for i in range(len(x))]
    diff = np.array(paid) - np.tile(expected, 5)
    assert abs(diff.mean()) < 4.5 * diff.std() / math.sqrt(len(diff)), (np.mean(paid), expected.mean())
    sampled = model_coder(t.model, 2, 8, particles=3)
    message, _ = sampled.encode(symbols)
    decoded, returned = sampled.decode(message, len(symbols))
    assert returned and np.array_equal(decoded, symbols)
    summary = compress(runs["categorical"], tmp_path / "c.vbb", iwae_k=0)
    assert summary["categories"] == 5 and summary["latent_bits"] == pytest.approx(math.log2(5))
    decompress(tmp_path / "c.vbb", tmp_path / "c.npy")
    assert np.array_equal(np.load(tmp_path / "c.npy"), (x[:, 0].numpy() * 255).astype(np.uint8))
    with pytest.raises(UserError, match="drop --latent-bits"):
        compress(runs["categorical"], tmp_path / "d.vbb", iwae_k=0, latent_bits=6)


def test_the_model_identity_of_a_gaussian_run_is_the_one_files_were_coded_with(runs):
    """Files already coded name their model by this hash: the config fields that build a Gaussian model
    (the categorical ones join only for a discrete posterior) and every tensor's name, dtype, shape and
    bytes. Recomputed here by hand, so a change to it shows up as what it is: old files that stop decoding."""
    import hashlib

    from vaelab.compress import model_identity

    t = open_trained(runs["bernoulli"])
    fields = "family conditional classes model hidden activation latent_dim top_latent_dim top_hidden posterior"
    fields += " posterior_rank flow_steps likelihood prior prior_components"
    values = t.config.to_dict() | {"conditional": False}  # a Config field until the conditional family came
    h = hashlib.sha256(json.dumps({k: values.get(k) for k in fields.split()}, sort_keys=True).encode())
    for name, tensor in sorted(t.model.state_dict().items()):
        h.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        h.update(tensor.contiguous().numpy().tobytes())
    assert model_identity(t.model, t.config) == h.hexdigest()
