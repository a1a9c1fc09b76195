"""vaelab on a CUDA GPU, every figure in one short run (about 5 minutes; ``scripts/gpu-check.sh`` calls it):

    python -m benchmarks.gpu                   # the bundled digits
    python -m benchmarks.gpu --mnist DIR       # and full MNIST (its IDX files in DIR)

1. the card, torch and CUDA;
2. training throughput of the 784-400-20 MLP at batch 128 in fp32 and under bf16 autocast, against the
   same step on 2 CPU threads of this machine (the goal: 20x);
3. the IWAE k=5000 estimate of log p(x) on 10,000 test images (MNIST's test set, or the bundled
   digits' test images repeated to 10,000 without it; the goal: under a minute);
4. with two GPUs, a 2-process DistributedDataParallel run over NCCL (``vaelab train --nproc 2``);
5. with full MNIST, time to target: the textbook loop for 120 s against vaelab's defaults for 60 s,
   both on the GPU, scored by one IWAE k=1000 estimator on MNIST's test images.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.__main__ import MLP, TextbookAsLatentModel, cpu_name, mnist_5k, synthetic
from benchmarks.references import textbook_for
from vaelab.checkpoint import load_run
from vaelab.config import Config
from vaelab.contract import OneLayer
from vaelab.data import binarize_static, load
from vaelab.evaluation import iwae_log_likelihood
from vaelab.models import build
from vaelab.runs import train_run
from vaelab.training import TrainState, fit


def throughput(device: str, precision: str, x: torch.Tensor, epochs: int) -> float:
    """Median examples/s over ``epochs`` epochs after one of warm-up, of vaelab's training step."""
    config = MLP.replace(batch_size=128, precision=precision, epochs=epochs + 1)
    torch.manual_seed(0)
    model = build(config, (1, 28, 28)).to(device)
    state = fit(model, x.to(device), None, config, state=TrainState(), progress=False)
    return statistics.median(r.examples_per_s for r in state.history if r.split == "train" and r.epoch > 0)


def test_images(mnist: str | None) -> tuple[torch.Tensor, str]:
    if mnist is not None:
        x = load(Config(data="mnist", data_dir=mnist)).test.x
        return binarize_static(x, 0, "test"), f"MNIST's {len(x):,} test images"
    _, test = mnist_5k()
    reps = -(-10_000 // len(test))
    return test.repeat(reps, 1, 1, 1)[:10_000], f"the bundled digits' {len(test)} test images repeated to 10,000"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", metavar="DIR", help="the folder of MNIST's IDX files")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU here: nothing to measure")
        return 2
    name = torch.cuda.get_device_name(0)
    print(f"{name} ({torch.cuda.device_count()} GPU(s)); torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"host CPU: {cpu_name()}", flush=True)

    # 2. training throughput
    x = synthetic(60_000)
    gpu = {p: throughput("cuda", p, x, 3) for p in ("fp32", "bf16")}
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    cpu = throughput("cpu", "fp32", x[:10_000], 2)
    torch.set_num_threads(threads)
    print("training, 784-400-20 at batch 128 (examples/s):")
    for p, v in gpu.items():
        print(f"  GPU {p:<5} {v:>12,.0f}   {v / cpu:6.1f}x the CPU's 2 threads (fp32, {cpu:,.0f}; goal 20x)")

    # 3. IWAE k = 5000 on 10,000 test images
    test, what = test_images(args.mnist)
    torch.manual_seed(0)
    model = build(MLP, (1, 28, 28)).cuda().eval()
    torch.cuda.synchronize()
    start = time.perf_counter()
    ll = iwae_log_likelihood(model, test.cuda(), 5000, batch_size=500)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"IWAE k=5000 on {what}: {seconds:.1f} s (goal: under 60 s); mean {ll.mean().item():.2f} nats (untrained)")

    # 4. two GPUs over NCCL
    if torch.cuda.device_count() >= 2:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "vaelab", "train", "--nproc", "2", "--device", "cuda", "--epochs", "3"]
            start = time.perf_counter()
            r = subprocess.run([*cmd, "--out", str(Path(tmp) / "ddp")], capture_output=True, text=True, timeout=300)
            status = "ran" if r.returncode == 0 else f"FAILED (exit {r.returncode}): {r.stderr[-500:]}"
            print(f"DDP, 2 processes over NCCL, 3 epochs of mnist-5k: {status} in {time.perf_counter() - start:.1f} s")
    else:
        print("DDP over NCCL: one GPU here, skipped")

    # 5. full MNIST, time to target
    if args.mnist is None:
        print("full MNIST time to target: skipped (give --mnist DIR, the folder of its IDX files)")
        return 0
    splits = load(Config(data="mnist", data_dir=args.mnist))
    textbook, epochs = textbook_for(torch.cat([splits.train.x, splits.val.x]).cuda(), 120.0)
    torch.manual_seed(5)
    ref = -iwae_log_likelihood(OneLayer(TextbookAsLatentModel(textbook.eval())), test.cuda(), 1000).mean().item()
    print(f"full MNIST: the textbook loop, 120 s on the GPU ({epochs} epochs): test NLL {ref:.2f}", flush=True)
    config = Config(data="mnist", data_dir=args.mnist, device="cuda", time_budget=60.0, epochs=100_000)
    with tempfile.TemporaryDirectory() as tmp:
        out, record = train_run(config, Path(tmp) / "run", log=lambda line: None)
        ours, _ = load_run(out)
    torch.manual_seed(5)
    nll = -iwae_log_likelihood(ours.cuda().eval(), test.cuda(), 1000).mean().item()
    verdict = "met" if nll <= ref else "missed"
    print(f"full MNIST: vaelab's defaults, 60 s ({record.epoch + 1} epochs): {nll:.2f}; time to target {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
