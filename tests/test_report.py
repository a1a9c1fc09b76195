"""`vaelab report`: every section, its PNG files, and nothing loaded from the network."""

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
