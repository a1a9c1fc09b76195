"""A bounded load test of `vaelab serve` on loopback: 500 requests to each endpoint, 20 at a
time, and malformed uploads in the mix. No request may fail (the malformed ones get their 4xx),
and the server's memory may not grow by more than 64 MiB."""

import asyncio
import io

import httpx
import numpy as np
from PIL import Image
from tests.pngs import bad_checksum_png, grey_png, truncated_png

REQUESTS, CONCURRENCY, MEMORY_BOUND_MIB = 500, 20, 64


def rss_mib() -> float:  # the server runs in this process (a thread)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def png_8x8() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def upload(blob: bytes) -> dict:
    return {"files": {"file": ("x.png", blob, "image/png")}}


async def hammer(base: str, method: str, path: str, n: int, **kwargs) -> list[int]:
    limit = asyncio.Semaphore(CONCURRENCY)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def one() -> int:
            async with limit:
                r = await client.request(method, path, **kwargs)
                return r.status_code

        return await asyncio.gather(*(one() for _ in range(n)))


ENDPOINTS = [
    ("GET", "/api/kl?mu=0.7&sigma=0.4", {}),
    ("GET", "/api/kl/samples?mu=0.7&sigma=0.4&batches=3", {}),
    ("GET", "/api/kl2?mu1=0.5&s1=0.8&mu2=-1&s2=1.2&rho=0.5", {}),
    ("GET", "/api/model", {}),
    ("GET", "/api/test/3", {}),
    ("GET", "/api/decode?z=0.5,-1", {}),
    ("POST", "/api/inspect", upload(png_8x8())),
    ("GET", "/", {}),
    ("GET", "/static/app.js", {}),
]
# (upload, expected status, requests): a decompression bomb, then broken files
MALFORMED = [
    (grey_png(12000, 12000), 422, 100),
    (truncated_png(8, 8), 415, 300),
    (bad_checksum_png(8, 8), 415, 300),
]


def test_load_every_endpoint(server):
    for method, path, kwargs in ENDPOINTS:  # warm up: first-call allocations are not growth
        asyncio.run(hammer(server, method, path, 50, **kwargs))
    before = rss_mib()
    for method, path, kwargs in ENDPOINTS:
        codes = asyncio.run(hammer(server, method, path, REQUESTS, **kwargs))
        assert codes == [200] * REQUESTS, (path, sorted(set(codes)))
    for blob, status, n in MALFORMED:
        codes = asyncio.run(hammer(server, "POST", "/api/inspect", n, **upload(blob)))
        assert codes == [status] * n, (status, sorted(set(codes)))
    grown = rss_mib() - before
    assert grown < MEMORY_BOUND_MIB, f"memory grew by {grown:.0f} MiB over the load test's requests"
