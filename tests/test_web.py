"""`vaelab serve`: the API against the library, and its validation of every input."""

import io
import math

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from tests.pngs import bad_checksum_png, grey_png, truncated_png
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vaelab.web.app import MAX_UPLOAD_BYTES, create_app


@pytest.fixture(scope="module")
def client(trained_run):
    return TestClient(create_app(trained_run), base_url="http://127.0.0.1")


def png(width, height, mode="L", fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width), dtype=np.uint8)).convert(mode).save(
        buf, format=fmt
    )
    return buf.getvalue()


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (1.0, 0.5), (-2.5, 2.0), (0.3, 0.05)])
def test_kl_endpoint_matches_an_independent_reference(client, mu, sigma):
    r = client.get("/api/kl", params={"mu": mu, "sigma": sigma}).json()
    ref = kl_divergence(Normal(torch.tensor(mu, dtype=torch.float64), sigma), Normal(0.0, 1.0)).item()
    assert r["kl"] == pytest.approx(ref, abs=1e-12)
    assert r["mean_term"] == pytest.approx(mu * mu / 2)
    assert r["width_term"] == pytest.approx((sigma**2 - 1 - math.log(sigma**2)) / 2)


@pytest.mark.parametrize(
    "params",
    [
        {"mu": 1, "sigma": 0},
        {"mu": 1, "sigma": -1},
        {"mu": "a", "sigma": 1},
        {"mu": 11, "sigma": 1},
        {"mu": 1},
        {"mu": "nan", "sigma": 1},
    ],
)
def test_bad_slider_values_are_4xx(client, params):
    r = client.get("/api/kl", params=params)
    assert r.status_code == 422 and r.json()["detail"]


def test_model_and_test_images(client):
    m = client.get("/api/model").json()
    assert m["latent_dim"] == 2 and m["x_shape"] == [1, 8, 8]
    assert sorted(m["dims_by_kl"]) == [0, 1]
    assert m["highest_kl"][0]["kl"] >= m["lowest_kl"][0]["kl"]
    assert set(m["kl_parts"]) == {"mutual_information", "total_correlation", "dimension_wise_kl"}

    r = client.get("/api/test/0").json()
    assert r["image"].startswith("data:image/png;base64,") and len(r["kl"]) == 2
    assert r["kl_total"] == pytest.approx(sum(r["kl"]))
    # the KL shown per dimension is the closed form at the shown mu and sigma
    for mu, sigma, kl in zip(r["mu"], r["sigma"], r["kl"], strict=True):
        assert kl == pytest.approx(0.5 * (mu * mu + sigma * sigma - 1 - math.log(sigma * sigma)), rel=1e-4, abs=1e-6)
    assert client.get(f"/api/test/{m['test_count']}").status_code == 404
    assert client.get("/api/test/-1").status_code == 422


def test_the_kl_parts_are_the_same_every_time_the_page_is_served(trained_run, client):
    again = TestClient(create_app(trained_run), base_url="http://127.0.0.1").get("/api/model").json()["kl_parts"]
    assert again == client.get("/api/model").json()["kl_parts"]


def test_decode(client):
    a = client.get("/api/decode", params={"z": "0,0"}).json()["image"]
    b = client.get("/api/decode", params={"z": "2.5,-2"}).json()["image"]
    assert a != b
    for bad in ("0", "0,0,0", "a,b", "nan,0", "9,0", ""):
        r = client.get("/api/decode", params={"z": bad})
        assert r.status_code == 422, bad


def post_png(client, blob):
    return client.post("/api/inspect", files={"file": ("x.png", blob, "image/png")})


def test_uploads(client):
    ok = post_png(client, png(8, 8))
    assert ok.status_code == 200 and len(ok.json()["kl"]) == 2
    assert post_png(client, grey_png(8, 8)).status_code == 200  # the hand-written PNGs are valid
    wrong_size = client.post("/api/inspect", files={"file": ("x.png", png(9, 8), "image/png")})
    assert wrong_size.status_code == 422 and "needs 8x8" in wrong_size.json()["detail"]
    not_image = client.post("/api/inspect", files={"file": ("x.png", b"hello", "image/png")})
    assert not_image.status_code == 415
    jpeg = client.post("/api/inspect", files={"file": ("x.jpg", png(8, 8, fmt="JPEG"), "image/jpeg")})
    assert jpeg.status_code == 415
    huge = client.post("/api/inspect", files={"file": ("x.png", b"\0" * (MAX_UPLOAD_BYTES + 10), "image/png")})
    assert huge.status_code == 413


@pytest.mark.parametrize("width,height", [(12000, 12000), (20000, 20000)])
def test_a_small_file_declaring_a_huge_image_is_refused_before_decoding(client, monkeypatch, width, height):
    """140 KB declaring 12000x12000 pixels, 390 KB declaring 20000x20000 (over Pillow's decompression-bomb
    limit): refused from the header, the pixels never decoded."""
    from PIL import ImageFile

    decoded = []
    real = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or real(im))
    r = post_png(client, grey_png(width, height))
    assert r.status_code == 422 and "this model needs 8x8" in r.json()["detail"], r.text
    assert decoded == []


@pytest.mark.parametrize(
    "blob",
    [truncated_png(8, 8), bad_checksum_png(8, 8), b"\x89PNG\r\n\x1a\n" + bytes(40), grey_png(8, 8)[:30]],
    ids=["truncated", "bad checksum", "signature only", "header cut"],
)
def test_malformed_pngs_are_4xx(client, blob):
    r = post_png(client, blob)
    assert r.status_code == 415 and "PNG" in r.json()["detail"], r.text


@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/..%2Fapp.py",
        "/static/%2e%2e%2fapp.py",
        "/static/app.py",
        "/static/.env",
        "/static/index.html",
    ],
)
def test_static_files_cannot_reach_elsewhere(client, path):
    assert client.get(path).status_code in (404, 422)


def test_page_and_assets(client):
    assert "Latent explorer" in client.get("/").text
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/style.css").headers["content-type"].startswith("text/css")


def test_serve_refuses_a_taken_port(trained_run, capsys):
    import socket

    from vaelab.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(trained_run), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_takes_a_port_its_last_server_has_just_left(trained_run, monkeypatch):
    """A port whose last connection waits out TCP's TIME_WAIT (a server stopped a moment after serving a
    page) can be listened on again, as uvicorn sets SO_REUSEADDR; vaelab's check of the port refused it,
    so `vaelab serve` started again at once said the port was taken."""
    import socket

    import uvicorn

    from vaelab.cli import main

    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    connection, _ = server.accept()
    connection.close()  # the server's side closes first: it is its end that waits out TIME_WAIT
    client.close()
    server.close()
    with socket.socket() as plain, pytest.raises(OSError):  # the case: a plain bind is refused
        plain.bind(("127.0.0.1", port))
    served = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: served.append(options["port"]))
    assert main(["serve", str(trained_run), "--port", str(port)]) == 0
    assert served == [port]


@pytest.fixture(scope="module")
def vamp_run(tmp_path_factory):
    from vaelab.cli import main

    out = tmp_path_factory.mktemp("vamp") / "run"
    args = ["--data", "digits", "--hidden", "32", "--latent-dim", "3", "--prior", "vamp", "--prior-components", "5"]
    args += ["--epochs", "2"]
    assert main(["train", *args, "--out", str(out)]) == 0
    return out


def test_the_page_shows_the_models_own_kl_for_a_vampprior(vamp_run, tmp_path):
    """The inspector's KL is the model's KL term (a Monte Carlo estimate: a VampPrior has no closed form),
    not KL(q || N(0, I)): it agrees with `vaelab evaluate`'s per-example KL, drawn with another seed,
    within their standard errors."""
    import csv

    from vaelab.cli import main
    from vaelab.kl import kl_normal_std_normal

    table = tmp_path / "per.csv"
    assert main(["evaluate", str(vamp_run), "--iwae-k", "0", "--seed", "1", "--per-example", str(table)]) == 0
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    client = TestClient(create_app(vamp_run), base_url="http://127.0.0.1")
    m = client.get("/api/model").json()
    assert m["kl_method"] == "monte_carlo" and m["kl_per_dim"] is None
    z_scores, against_standard_normal = [], []
    for i in range(12):
        r = client.get(f"/api/test/{i}").json()
        assert r["kl_method"] == "monte_carlo" and r["kl"] is None
        page, page_se = r["kl_total"], r["kl_std_error"]
        evaluated, evaluated_se = float(rows[i]["kl"]), float(rows[i]["kl_std_error"])
        z_scores.append((page - evaluated) / math.hypot(page_se, evaluated_se))
        mu, sigma = torch.tensor(r["mu"]), torch.tensor(r["sigma"])
        against_standard_normal.append(kl_normal_std_normal(mu, 2 * sigma.log()).sum().item())
    # two independent estimates of the same KL: |z| <= 4 fails about 6e-5 of the time per image
    # (normal approximation of a 256-sample mean), under 1e-3 for the 12 images together
    assert max(abs(z) for z in z_scores) <= 4, z_scores
    # and it is not the KL against N(0, I) that the page showed before (that differs by many standard errors)
    assert any(abs(r - e) > 0.1 for r, e in zip(against_standard_normal, (float(w["kl"]) for w in rows), strict=False))
    upload = client.post("/api/inspect", files={"file": ("x.png", png(8, 8), "image/png")}).json()
    assert upload["kl"] is None and upload["kl_std_error"] > 0


def test_report_of_a_vampprior_run(vamp_run):
    from vaelab.cli import main

    assert main(["report", str(vamp_run)]) == 0
    page = (vamp_run / "report.html").read_text()
    assert "<h2>Activity per latent dimension</h2>" in page and "does not factorise" in page
    assert "monte carlo" in page and "prior&#x27;s marginal" in page


def test_the_sampled_kl_and_its_running_mean(client):
    r = client.get("/api/kl/samples", params={"mu": 0.5, "sigma": 2.0, "batch_size": 100, "batches": 3}).json()
    assert r["count"] == [100, 200, 300] and len(r["newest"]) == 100
    q, p = Normal(torch.tensor(0.5, dtype=torch.float64), 2.0), Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    assert r["closed_form"] == pytest.approx(kl_divergence(q, p).item(), abs=1e-12)
    # the newest batch is batch 2, drawn from a generator seeded with 2; its terms are log q(z) - log p(z)
    again = client.get("/api/kl/samples", params={"mu": 0.5, "sigma": 2.0, "batch_size": 100, "batches": 3}).json()
    assert again == r
    assert (r["mean"][-1] - r["closed_form"]) ** 2 <= (4 * r["std_error"][-1]) ** 2  # 6e-5 false alarms
    for bad in ({"mu": 0, "sigma": 1, "batches": 0}, {"mu": 0, "sigma": 1, "batch_size": 1}, {"mu": 0, "sigma": 0}):
        assert client.get("/api/kl/samples", params=bad).status_code == 422


def test_the_correlated_kl_against_torch(client):
    params = {"mu1": 0.8, "s1": 0.6, "mu2": -0.5, "s2": 1.4, "rho": -0.6}
    r = client.get("/api/kl2", params=params).json()
    cov = torch.tensor([[0.36, -0.6 * 0.6 * 1.4], [-0.6 * 0.6 * 1.4, 1.96]], dtype=torch.float64)
    q = MultivariateNormal(torch.tensor([0.8, -0.5], dtype=torch.float64), covariance_matrix=cov)
    p = MultivariateNormal(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    assert r["kl"] == pytest.approx(kl_divergence(q, p).item(), abs=1e-9)
    assert r["kl"] == pytest.approx(r["kl1"] + r["kl2"] + r["correlation"], abs=1e-9)
    assert r["correlation"] == pytest.approx(-0.5 * math.log(1 - 0.36), abs=1e-12)
    assert client.get("/api/kl2", params={**params, "rho": 1.0}).status_code == 422


def test_a_request_for_another_host_is_refused(client):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends Host: evil.example."""
    assert client.get("/api/model", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/api/model", headers={"Host": "localhost:8000"}).status_code == 200


def test_a_cross_site_upload_is_refused(client):
    png_bytes = png(8, 8)
    for headers in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        r = client.post("/api/inspect", files={"file": ("x.png", png_bytes, "image/png")}, headers=headers)
        assert r.status_code == 403, headers
    same = client.post("/api/inspect", files={"file": ("x.png", png_bytes)}, headers={"Origin": "http://127.0.0.1"})
    assert same.status_code == 200


def test_a_large_body_is_refused_before_it_is_read():
    """The guard answers 413 from the Content-Length alone, and cuts off a body that says no length:
    the app behind it never sees a byte more than the limit."""
    import asyncio

    from vaelab.web.app import Guard

    seen = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            seen.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break

    def call(headers, chunks):
        sent = []

        async def receive():
            body = chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "headers": headers, "path": "/api/inspect"}
        try:
            asyncio.run(Guard(app, limit=1000)(scope, receive, send))
        except Exception as err:  # the HTTPException that Starlette turns into 413 inside the app
            return getattr(err, "status_code", None)
        return sent[0]["status"] if sent else None

    assert call([(b"content-length", b"200000000")], [b"x" * 10]) == 413 and seen == []
    assert call([], [b"x" * 600, b"x" * 600, b"x" * 600]) == 413 and sum(seen) <= 1000


def test_concurrent_requests_get_one_answer(iaf_run):
    """The page's draws (a flow's moments) are seeded per request; 20 at a time, they agree."""
    from concurrent.futures import ThreadPoolExecutor

    client = TestClient(create_app(iaf_run), base_url="http://127.0.0.1")
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: tuple(client.get("/api/test/0").json()["mu"]), range(100)))
    assert len(set(answers)) == 1


@pytest.fixture(scope="module")
def iaf_run(tmp_path_factory):
    from vaelab.cli import main

    out = tmp_path_factory.mktemp("iaf") / "run"
    args = ["--data", "digits", "--hidden", "16", "--latent-dim", "2", "--posterior", "iaf", "--epochs", "1"]
    assert main(["train", *args, "--threads", "1", "--out", str(out)]) == 0
    return out
