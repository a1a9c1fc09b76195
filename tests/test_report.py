"""`vaelab report`: every section, its PNG files, and nothing loaded from the network."""

import html
import json
import math
import re

from PIL import Image

from vaelab.cli import main

SECTIONS = [
    "Training",
    "KL per latent dimension",
    "The KL taken apart",
    "Reconstructions",
    "Samples from the prior",
    "Latent traversals",
    "The latent space",
    "The decoded manifold",
    "q(z|x) against the prior",
    "The true posterior p(z|x)",
]


def test_report_has_every_section(trained_run, tmp_path, capsys):
    assert main(["evaluate", str(trained_run), "--iwae-k", "10"]) == 0
    out = tmp_path / "report.html"
    assert main(["report", str(trained_run), "--out", str(out)]) == 0
    page = out.read_text()
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page, title
    assert "<h2>Evaluation</h2>" in page and "IWAE k=10" in page
    assert page.count("data:image/png;base64,") == len(SECTIONS)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    pngs = sorted((tmp_path / "report-figures").glob("*.png"))  # beside the page given with --out
    assert len(pngs) == len(SECTIONS)
    for png in pngs:
        with Image.open(png) as im:
            assert im.size[0] > 200 and im.size[1] > 100


def test_report_without_evaluation_says_how_to_add_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--hidden", "32", "--latent-dim", "5", "--epochs", "1", "--out", str(run)]) == 0
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "vaelab evaluate" in page and "by PCA" in page
    assert "<h2>The decoded manifold</h2>" not in page  # only for a 2-D latent space


def test_projections():
    import numpy as np

    from vaelab.inspection import project_2d

    mu = np.random.default_rng(0).normal(size=(60, 5))
    for method, label in (("pca", "PC 1"), ("tsne", "t-SNE 1")):
        points, (xl, _) = project_2d(mu, method)
        assert points.shape == (60, 2) and xl.startswith(label)
    points, labels = project_2d(mu[:, :2], "tsne")  # a 2-D latent space is shown as it is
    assert np.array_equal(points, mu[:, :2]) and labels == ("z0", "z1")


def test_the_command_line_the_report_and_the_page_show_one_record(tmp_path, capsys):
    """The MI, TC and active units of one run, as `evaluate` prints them, the report's table and
    figure captions, and the page's API: one record (evaluation.json), read, not measured again; a
    record of weights the run no longer has is not read (the pictures measure it again)."""
    from fastapi.testclient import TestClient

    from vaelab.web.app import create_app

    run = tmp_path / "run"
    train = ["train", "--data", "digits", "--hidden", "32", "--latent-dim", "3", "--epochs", "2", "--out", str(run)]
    assert main(train) == 0
    assert main(["evaluate", str(run), "--iwae-k", "5"]) == 0
    printed = capsys.readouterr().out
    record = json.loads((run / "evaluation.json").read_text())
    mi, tc, active = record["mutual_information"], record["total_correlation"], record["active_units"]
    assert f"{mi:12.4f}" in printed and f"{tc:12.4f}" in printed and f"{active:12d}  of 3" in printed
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert f"{mi:.3f} nats" in page and f"{tc:.3f} nats" in page and f"{active} of 3." in page
    # the KL-taken-apart figure's top bar is the record's KL, and its MI names the ceiling log N
    text = html.unescape(page)
    assert f"its KL ({record['kl']:.2f} nats) is the model's own term" in text
    assert f"at most log N = {math.log(record['examples']):.2f} on N = {record['examples']} examples" in text
    model = TestClient(create_app(run), base_url="http://127.0.0.1").get("/api/model").json()
    assert model["kl_parts"]["mutual_information"] == mi and model["kl_parts"]["total_correlation"] == tc
    rows = {row["name"]: row["value"] for row in model["evaluation"]}
    assert rows["mutual information I(x; z)"] == mi and not model["measured_here"]
    assert main([*train[:-2], "--epochs", "3", "--out", str(run), "--resume"]) == 0  # new weights
    model = TestClient(create_app(run), base_url="http://127.0.0.1").get("/api/model").json()
    assert model["measured_here"] and model["kl_parts"]["mutual_information"] != mi


def test_the_kl_figure_adds_the_models_kl_not_its_estimate():
    """The top bar of "The KL taken apart" is -reconstruction + the model's KL (the evaluation's -ELBO); the
    parts' sum, a one-z-per-image estimate, is the lower bar's title."""
    from vaelab import plots

    parts = {"mutual information": 6.59, "total correlation": 3.0, "dimension-wise KL": 12.06}
    fig = plots.kl_decomposition(parts, reconstruction=-95.83, kl=21.77, per_dim=None)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [
        "−ELBO = 117.60 nats",
        "KL taken apart: its parts add up to 21.65 nats, a one-z-per-image estimate",
    ]
