"""The local web app: a FastAPI service over one trained run, and a static page.

Every number the page shows comes from the library (the KL core, the model), never from
a re-implementation in JavaScript. Inputs are validated by type and range (FastAPI
answers 422 with the reason); uploads are size- and format-checked; nothing from a
request reaches the file system (the run directory is fixed when the app starts).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import threading
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, PlainTextResponse, Response
from PIL import Image, UnidentifiedImageError
from starlette.middleware.trustedhost import TrustedHostMiddleware
from torch.distributions import Normal

from vaelab.compress import read_record
from vaelab.contract import Examples, given
from vaelab.distributions import Categoricals, Quantised, marginals
from vaelab.evaluation import evaluation_rows, kl_per_example
from vaelab.inspection import Run, decode_mean, kl_parts, open_run
from vaelab.kl import KLResult, correlation_kl, kl_full_normal_diag_normal, kl_normal_std_normal, log_ratio_samples

MAX_UPLOAD_BYTES = 1_000_000
Z_RANGE = 5.0
STATIC = resources.files("vaelab.web") / "static"


def png_data_url(image: np.ndarray) -> str:
    """An image (C, H, W) in [0, 1] as a PNG data URL."""
    arr = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr[0]) if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def read_png(blob: bytes, size: tuple[int, int], mode: str) -> np.ndarray:
    """An uploaded PNG of ``size`` (H, W) as floats in [0, 1], (H, W) or (H, W, 3); HTTP 4xx otherwise.

    The header is read first and the pixels decoded only when the image has the model's size,
    so a small file that declares a huge image (a decompression bomb) costs nothing.
    """
    H, W = size
    try:
        with Image.open(io.BytesIO(blob), formats=["PNG"]) as im:  # reads the header only
            if (im.height, im.width) != (H, W):
                raise HTTPException(422, f"the image is {im.width}x{im.height} pixels; this model needs {W}x{H}")
            return np.asarray(im.convert(mode), dtype=np.float32) / 255.0
    except HTTPException:
        raise
    except Image.DecompressionBombError:  # Pillow refuses a declared size over 2 x MAX_IMAGE_PIXELS at open
        raise HTTPException(422, f"the image declares too many pixels; this model needs {W}x{H}") from None
    except UnidentifiedImageError:
        raise HTTPException(415, "the upload is not a PNG image") from None
    except Exception:  # a malformed file: Pillow raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise HTTPException(415, "the upload is not a readable PNG image") from None


def kl_terms(mu: float, sigma: float) -> dict:
    """KL(N(mu, sigma^2) || N(0, 1)) and its two parts, from vaelab.kl."""
    mu_t = torch.tensor(mu, dtype=torch.float64)
    log_var = torch.tensor(2.0 * np.log(sigma), dtype=torch.float64)
    kl = kl_normal_std_normal(mu_t, log_var).item()
    mean_term = kl_normal_std_normal(mu_t, torch.zeros((), dtype=torch.float64)).item()  # mu^2 / 2
    return {"kl": kl, "mean_term": mean_term, "width_term": kl - mean_term}


def kl_sampled(mu: float, sigma: float, batch_size: int, batches: int) -> dict:
    """The KL of N(mu, sigma^2) from N(0, 1) as the expectation it is: ``batches`` batches of draws
    (batch b from a generator seeded with b), the newest batch's log q(z) - log p(z), and after each
    batch the running Monte Carlo mean and its standard error over every draw so far, beside the
    closed form (all from vaelab.kl)."""
    q = Normal(torch.tensor(mu, dtype=torch.float64), torch.tensor(sigma, dtype=torch.float64))
    p = Normal(torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64))
    draws = torch.cat([log_ratio_samples(q, p, batch_size, torch.Generator().manual_seed(b)) for b in range(batches)])
    counts = torch.arange(1, batches + 1) * batch_size
    running = [(draws[:n].mean().item(), (draws[:n].std() / math.sqrt(n)).item()) for n in counts.tolist()]
    return {
        "closed_form": kl_terms(mu, sigma)["kl"],
        "newest": draws[-batch_size:].tolist(),
        "count": counts.tolist(),
        "mean": [m for m, _ in running],
        "std_error": [e for _, e in running],
    }


def kl_correlated(mu1: float, s1: float, mu2: float, s2: float, rho: float) -> dict:
    """KL(N(mu, Sigma) || N(0, I)) in two dimensions with correlation rho (eq. 7), split into the two
    marginals' KLs and what the correlation adds, -1/2 log(1 - rho^2) (vaelab.kl)."""
    mu = torch.tensor([mu1, mu2], dtype=torch.float64)
    L = torch.tensor([[s1, 0.0], [rho * s2, s2 * math.sqrt(1 - rho * rho)]], dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    return {
        "kl": kl_full_normal_diag_normal(mu, L, zeros, zeros).item(),
        "kl1": kl_terms(mu1, s1)["kl"],
        "kl2": kl_terms(mu2, s2)["kl"],
        "correlation": correlation_kl(L).item(),
    }


def inspect_image(model, x: torch.Tensor, kl: KLResult) -> dict:
    """What the inspector shows of one image (C, H, W): the image, its reconstruction, q(z|x) of the top
    latent layer and the model's KL (a KLResult of one example: closed form per dimension where the
    prior factorises, else a Monte Carlo estimate with its standard error; every layer's part)."""
    with SEEDED, torch.no_grad(), torch.random.fork_rng(devices=[]):  # a flow's moments are drawn: seeded
        torch.manual_seed(0)
        q = model.encode(x[None])
        mu, var = marginals(q)  # q(z_j|x): for a full covariance, Sigma's diagonal
        mu, sigma = mu[0], var[0].sqrt()
        reconstruction = model.reconstruct(x[None]).clamp(0, 1)[0].numpy()
    if isinstance(q, (Categoricals, Quantised)):  # each variable's most probable category (code), its probability
        top = q.probs[0].max(-1)
        D, shown = q.variables, {"mode": top.indices.tolist(), "p_mode": top.values.tolist()}
    else:
        D, shown = mu.shape[0], {"mu": mu.tolist(), "sigma": sigma.tolist()}
    return {
        "image": png_data_url(x.numpy()),
        "reconstruction": png_data_url(reconstruction),
        **shown,
        "kl": None if kl.per_dim is None else kl.per_dim[0, :D].tolist(),  # the top layer's dimensions
        "kl_total": kl.value[0].item(),
        "kl_std_error": None if kl.std_error is None else kl.std_error[0].item(),
        "kl_method": kl.method,
        "kl_per_layer": {k: v[0].item() for k, v in kl.per_layer.items()} if kl.layered else None,
        "kl_how": kl_how(kl),
    }


def kl_how(kl: KLResult) -> str:
    """How the page's KL was obtained, in words."""
    if kl.layered:
        se = "" if kl.std_error is None else f" ± {kl.std_error[0].item():.3f} (standard error over the draws)"
        layers = ", ".join(f"{name} {v[0].item():.3f}" for name, v in kl.per_layer.items())
        return f"{se}: the sum over layers ({layers}), each in closed form at 256 draws of the layers above"
    if kl.std_error is None:
        return "(closed form)"
    return f"± {kl.std_error[0].item():.3f} (Monte Carlo standard error; this model's KL has no closed form)"


BITS_SHOWN = ("pixels", "z_pushed", "z_back", "z_net", "kl", "net", "neg_elbo")


def coded_bits(run: Run) -> dict[str, list[float]] | None:
    """Per test image, the bits ``vaelab compress`` spent coding the run's test split (its
    compression.json, when it is of these weights and of the test split): x, z pushed and got back, z net
    beside the analytic KL, the net code beside -ELBO. None where the run has no such record."""
    record = read_record(run.path) if run.path.is_dir() else None
    if record is None or record["split"] != "test":
        return None
    return {name: record["per_image"][name] for name in BITS_SHOWN}


def describe_run(run: Run) -> dict:
    """The run as the page's header, lists and sliders need it (the sliders move the top latent layer)."""
    parts = kl_parts(run)
    order = torch.argsort(run.kl.value)  # the model's own KL term per test image
    listed = [{"index": int(i), "kl": run.kl.value[i].item()} for i in order]
    if run.kl.std_error is not None:  # Monte Carlo estimates: a KL near 0 can come out below it
        for entry in listed:
            entry["std_error"] = run.kl.std_error[entry["index"]].item()
    return {
        "run": run.path.name,
        "data": run.config.data,
        "latent_dim": run.model.latent_dim,
        "categories": run.categories,  # a categorical posterior: a category picker per variable, not sliders
        "codebook": run.vq is not None,  # VQ-VAE: the categories are codes, z their codebook vectors
        "classes": run.config.classes if run.model_y is not None else None,  # conditional, and M2's pictures
        "x_shape": list(run.model.x_shape),
        "test_count": len(run.test_x),
        "dims_by_kl": run.dims_by_kl,
        "prior": run.config.prior,
        "kl_method": run.kl.method,
        "kl_per_dim": None if run.top_kl_per_dim is None else run.top_kl_per_dim.mean(0).tolist(),
        "layers": {
            name: {"dims": m.shape[1], "kl": run.kl.per_layer[name].mean().item()}
            for name, m in run.layer_means.items()
        }
        if run.layered
        else None,
        "lowest_kl": listed[:8],
        "highest_kl": listed[::-1][:8],
        "kl_parts": None if parts is None else parts[0],
        "evaluation": [dataclasses.asdict(row) for row in evaluation_rows(run.measured)],  # the rows evaluate prints
        "measured_here": run.measured_here,
    }


def parse_z(text: str, latent_dim: int, categories: int | None = None) -> torch.Tensor:
    """A latent vector from 'z0,z1,...' (HTTP 422 unless it has ``latent_dim`` values in [-Z_RANGE, Z_RANGE]);
    for ``categories`` K, one category (code) 0 .. K - 1 per variable, returned as the codes, (1, latent_dim)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise HTTPException(422, "z must be comma-separated numbers") from None
    if len(values) != latent_dim:
        raise HTTPException(422, f"z has {len(values)} values; this model has {latent_dim} latent dimensions")
    if categories is not None:
        if not all(v in range(categories) for v in values):
            raise HTTPException(422, f"each variable's category must be a whole number from 0 to {categories - 1}")
        return torch.tensor([values]).long()
    if not all(abs(v) <= Z_RANGE for v in values):  # also rejects NaN
        raise HTTPException(422, f"every z value must lie in [-{Z_RANGE}, {Z_RANGE}]")
    return torch.tensor([values], dtype=torch.float32)


LOCAL_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
# a request body may be this long: the largest upload and its multipart wrapping
MAX_BODY_BYTES = MAX_UPLOAD_BYTES + 64 * 1024
# The model's draws (a flow's moments, a Monte Carlo KL) use PyTorch's process-wide RNG, seeded per
# request; FastAPI runs handlers on a thread pool, so the seeded sections take turns
SEEDED = threading.Lock()


class Guard:
    """ASGI middleware in front of the app: the request body is bounded before anything is spooled
    (a Content-Length over :data:`MAX_BODY_BYTES` is answered 413 unread, and a body that grows past
    it while read is cut off with 413), and a write (any method but GET and HEAD) from another origin
    is refused with 403: a page on another site may not post to the local server (CSRF).
    Host names are checked by Starlette's ``TrustedHostMiddleware`` (DNS rebinding)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["method"] not in ("GET", "HEAD") and not _same_origin(headers):
            return await PlainTextResponse("cross-origin writes are refused", 403)(scope, receive, send)
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.limit:
            return await PlainTextResponse(f"request body larger than {self.limit} bytes", 413)(scope, receive, send)
        seen = 0

        async def bounded():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # a chunked body that says no length
                raise HTTPException(413, f"request body larger than {self.limit} bytes")
            return message

        return await self.app(scope, bounded, send)


def _same_origin(headers: dict[str, str]) -> bool:
    """A browser names where a request comes from (Origin, Sec-Fetch-Site); a tool like curl names
    nothing and is let through, as it could reach the server without a browser anyway."""
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")
    return origin is None or urlsplit(origin).netloc == headers.get("host")


def allowed_hosts(host: str) -> list[str]:
    """The Host headers the server answers: its loopback names, and the address it was bound to (any
    for 0.0.0.0 / ::, where the user chose to serve the network)."""
    return ["*"] if host in ("0.0.0.0", "::") else sorted({*LOCAL_HOSTS, host})


def create_runs_app(folder: str | Path, host: str = "127.0.0.1") -> FastAPI:
    """The app over a folder of runs (a sweep's): their rate-distortion plane as a page, and its points
    as JSON; measured once, when the app starts."""
    from vaelab import rd
    from vaelab.report import runs_page

    points = rd.plane([Path(folder)])
    text = runs_page(folder, points)
    app = FastAPI(title="vaelab", docs_url=None, redoc_url=None)
    app.add_middleware(Guard)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return text

    @app.get("/api/rd")
    def plane() -> list[dict]:
        return [p.to_dict() for p in points]

    return app


def _page_and_explorer(app: FastAPI) -> None:
    """The routes that need no run: the page, its static files and the KL explorer's closed forms."""

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return (STATIC / "index.html").read_text()

    @app.get("/static/{name}")
    def static(name: str = PathParam(pattern=r"^[a-z]+\.(js|css)$")) -> Response:
        files = {f.name: f for f in STATIC.iterdir()}
        if name not in files:
            raise HTTPException(404, f"no static file {name!r}")
        media = "text/javascript" if name.endswith(".js") else "text/css"
        return Response(files[name].read_bytes(), media_type=media)

    @app.get("/api/kl")
    def kl(mu: float = Query(ge=-10, le=10), sigma: float = Query(ge=0.01, le=10)) -> dict:
        return kl_terms(mu, sigma)

    @app.get("/api/kl/samples")
    def kl_samples(
        mu: float = Query(ge=-10, le=10),
        sigma: float = Query(ge=0.01, le=10),
        batch_size: int = Query(200, ge=2, le=2000),
        batches: int = Query(1, ge=1, le=100),
    ) -> dict:
        return kl_sampled(mu, sigma, batch_size, batches)

    @app.get("/api/kl2")
    def kl2(
        mu1: float = Query(ge=-10, le=10),
        s1: float = Query(ge=0.01, le=10),
        mu2: float = Query(ge=-10, le=10),
        s2: float = Query(ge=0.01, le=10),
        rho: float = Query(0.0, ge=-0.99, le=0.99),
    ) -> dict:
        return kl_correlated(mu1, s1, mu2, s2, rho)


def create_app(run_dir: str | Path, host: str = "127.0.0.1") -> FastAPI:
    """The app over one run: the page, its static files, and the JSON API the page calls; answering
    requests addressed to ``host`` (the address ``vaelab serve`` binds) or a loopback name."""
    run = open_run(run_dir)
    model, (C, H, W) = run.model, run.model.x_shape
    summary = describe_run(run)
    coded = coded_bits(run)
    app = FastAPI(title="vaelab", docs_url=None, redoc_url=None)
    app.add_middleware(Guard)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(host))  # outermost: checked first

    _page_and_explorer(app)

    @app.get("/api/model")
    def describe() -> dict:
        return summary

    @app.get("/api/test/{index}")
    def test_image(index: int = PathParam(ge=0)) -> dict:
        if index >= len(run.test_x):
            raise HTTPException(404, f"test image {index} does not exist; there are {len(run.test_x)} (0-based)")
        shown = inspect_image(run.view(slice(index, index + 1)), run.test_x[index], run.kl[index])
        if coded is not None and index < len(coded["net"]):  # what vaelab compress paid for this image
            shown["bits"] = {name: values[index] for name, values in coded.items()}
        return {"index": index, **shown}

    @app.post("/api/inspect")
    async def upload(file: UploadFile = File(...), label: int | None = Form(None, ge=0)) -> dict:
        y = labels(label)
        blob = await file.read(MAX_UPLOAD_BYTES + 1)
        if len(blob) > MAX_UPLOAD_BYTES:
            raise HTTPException(413, f"upload larger than {MAX_UPLOAD_BYTES} bytes; send a small PNG")
        arr = read_png(blob, (H, W), "L" if C == 1 else "RGB")
        x = torch.from_numpy(arr[None] if C == 1 else arr.transpose(2, 0, 1).copy())
        with SEEDED:  # a Monte Carlo KL's draws
            kl = kl_per_example(model, Examples(x[None], y))
        return inspect_image(given(model, y), x, kl)

    @app.get("/api/decode")
    def decode(z: str = Query(max_length=40 * 1024), label: int | None = Query(None, ge=0)) -> dict:
        latent = parse_z(z, model.latent_dim, run.categories)
        if run.categories:  # codes: one-hot, or a VQ-VAE's codebook vectors
            latent = run.z_of(latent)
        image = decode_mean(given(model, labels(label)), latent)[0]
        return {"image": png_data_url(image)}

    def labels(label: int | None) -> torch.Tensor | None:
        """The label a conditional model is given (HTTP 422 when it is missing or out of range); None for
        any other model, which takes none."""
        if run.model_y is None:
            if label is not None:
                raise HTTPException(422, "this model is not conditional: it takes no label")
            return None
        if label is None or label >= run.config.classes:
            raise HTTPException(422, f"this conditional model needs a label from 0 to {run.config.classes - 1}")
        return torch.tensor([label])

    return app
