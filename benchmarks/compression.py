"""The KL term as bits: vaelab compress (BB-ANS, BB-IS, coupled BB-IS and Bit-Swap) against its limits (-ELBO, the
IWAE estimate of -log2 p(x)) and against general-purpose coders on the same images.

    python -m benchmarks.compression                 # two models trained 60 s each, then coded
    python -m benchmarks.compression --budget 20     # shorter training
    python -m benchmarks.compression --mnist DIR     # also full MNIST (its IDX files in DIR)

Models are trained here with ``vaelab train`` for a fixed wall time (binarised digits with a
Bernoulli likelihood; 8-bit digits with the discretised logistic; binarised digits with two latent
layers inferred bottom-up, coded in BB-ANS's order and in Bit-Swap's), then their test split coded.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from vaelab.cli import main as vaelab
from vaelab.compress import compress

LATENT_BITS = (2, 4, 6, 8, 10, 12)
PARTICLES = (10, 50)


def train(out: Path, budget: float, *options: str) -> Path:
    argv = ["train", "--out", str(out), "--time-budget", str(budget), "--epochs", "100000", *options]
    assert vaelab(argv) == 0, argv
    return out


def line(name: str, s: dict, extra: str = "") -> None:
    b, P, N = s["bits_per_image"], s["dimensions"], s["images"]
    per_1000 = 1000 / N
    flips = f"fair flips {b['z_net_expected']:6.2f}, " if "z_net_expected" in b else ""
    print(
        f"  {name:<28} net {b['net'] / P:.4f}  file {s['file_bits'] / N / P:.4f}  z net {b['z_net']:7.2f} bits "
        f"({flips}KL {b['kl']:6.2f})  initial {s['initial_bits']:>6} bits, {s['initial_bits_needed']:7.1f} needed  "
        f"{s['encode_seconds'] * per_1000:5.2f} s / {s['decode_seconds'] * per_1000:5.2f} s per 1000 {extra}",
        flush=True,
    )


def code_run(run: Path, work: Path, title: str, iwae_k: int) -> None:
    print(f"\n{title}")
    first = compress(run, work / "b8.vbb", iwae_k=iwae_k, overwrite=True)
    b, P = first["bits_per_image"], first["dimensions"]
    print(
        f"  limits: -ELBO {b['neg_elbo'] / P:.4f} bits/dim, -log2 p(x) (IWAE k={iwae_k}) {b['neg_log2_px'] / P:.4f}; "
        f"{first['images']} test images; z of {first['latent_dim']} dimensions"
    )
    print(
        "  general-purpose: "
        + ", ".join(f"{k} {v / first['images'] / P:.4f}" for k, v in first["general_purpose_bits"].items())
    )
    for bits in LATENT_BITS:
        s = first if bits == 8 else compress(run, work / f"b{bits}.vbb", latent_bits=bits, iwae_k=0, overwrite=True)
        gap = 100 * (s["bits_per_image"]["net"] / b["neg_elbo"] - 1)
        line(f"BB-ANS, {bits:>2} latent bits", s, f" net - (-ELBO): {gap:+.2f} %")
    for k in PARTICLES:
        s = compress(run, work / f"is{k}.vbb", particles=k, iwae_k=0, overwrite=True)
        line(f"BB-IS, {k} particles", s)
        s = compress(run, work / f"cis{k}.vbb", particles=k, coupled=True, iwae_k=0, overwrite=True)
        line(f"BB-CIS, {k} coupled", s)


def code_orders(run: Path, work: Path, title: str, iwae_k: int) -> None:
    """Two latent layers inferred bottom-up, in BB-ANS's order (both pops first) and in Bit-Swap's: the
    same net length, and the initial bits each message needed."""
    print(f"\n{title}")
    for order in ("bb-ans", "bit-swap"):
        s = compress(run, work / f"{order}.vbb", iwae_k=iwae_k, order=order, overwrite=True)
        b, P = s["bits_per_image"], s["dimensions"]
        if order == "bb-ans":
            print(
                f"  limits: -ELBO {b['neg_elbo'] / P:.4f} bits/dim, -log2 p(x) (IWAE k={iwae_k}) "
                f"{b['neg_log2_px'] / P:.4f}; {s['images']} test images; z2 and z1 of {s['latent_dim']} dimensions"
            )
        first = s["per_image"]["z_back"][0]
        line(f"{order}, 8 latent bits", s, f" (the first image popped {first:.1f} bits)")


def run(budget: float, mnist: str | None, iwae_k: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        binary = train(work / "binary", budget)
        code_run(binary, work, f"binarised mnist-5k (Bernoulli, vaelab train defaults, {budget:.0f} s)", iwae_k)
        grey = train(work / "grey", budget, "--likelihood", "logistic", "--binarize", "none")
        code_run(grey, work, f"8-bit mnist-5k (discretised logistic, {budget:.0f} s)", iwae_k)
        two = train(work / "two", budget, "--family", "hierarchical", "--inference", "bottom-up")
        code_orders(two, work, f"binarised mnist-5k, two layers inferred bottom-up ({budget:.0f} s)", iwae_k)
        if mnist is None:
            print("\nfull MNIST: skipped (give --mnist DIR, the folder of its IDX files)")
            return
        full = train(work / "mnist", 4 * budget, "--data", "mnist", "--data-dir", mnist)
        code_run(full, work, f"binarised MNIST (60,000 training images, {4 * budget:.0f} s)", iwae_k)


def main(argv=None) -> int:
    from benchmarks.__main__ import cpu_name

    parser = argparse.ArgumentParser(prog="python -m benchmarks.compression", description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of training per model (default 60)")
    parser.add_argument("--mnist", metavar="DIR", help="the folder of MNIST's IDX files")
    parser.add_argument("--iwae-k", type=int, default=1000, help="samples of the -log2 p(x) estimate")
    args = parser.parse_args(argv)
    print(f"vaelab compress on {cpu_name()}; bits per dimension unless named")
    run(args.budget, args.mnist, args.iwae_k)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
