"""On a CUDA GPU: data, generators, noise and checkpoints on the device, bf16 autocast, the IWAE chunk
rule by device memory, evaluation on the GPU against the CPU, resume across CPU and GPU, and NCCL with
two GPUs.

Every test here is marked ``cuda`` and skipped, with that reason, where PyTorch sees no CUDA GPU;
``bash scripts/gpu-check.sh`` runs them (``pytest -m cuda``) on a machine that has one.
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import train_options
from vaelab import contract, objectives
from vaelab.checkpoint import load_checkpoint
from vaelab.cli import main
from vaelab.config import Config
from vaelab.data.batches import Batches
from vaelab.distributions import diag_normal
from vaelab.evaluation import CHUNK_VALUES, iwae_chunk
from vaelab.memory import available
from vaelab.models import build
from vaelab.training import TrainState, fit

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bash scripts/gpu-check.sh runs these)"),
]

SMALL = train_options(data="digits", hidden=64, latent_dim=4, lr_schedule="constant")


def epochs(run) -> list[str]:
    lines = (run / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","), strict=True))["epoch"] for line in lines[1:] if ",val," in line]


def test_noise_and_generators_draw_on_the_gpu():
    """Noise from a CUDA generator is drawn on the GPU, and is a pure function of the generator's seed."""
    q = diag_normal(torch.zeros(8, 3, device="cuda"), torch.zeros(8, 3, device="cuda"))
    z = contract.Noise(torch.Generator(device="cuda").manual_seed(0), 8).sample(q)
    again = contract.Noise(torch.Generator(device="cuda").manual_seed(0), 8).sample(q)
    assert z.device.type == "cuda" and torch.equal(z, again)


def test_batches_and_dynamic_binarisation_stay_on_the_gpu():
    """Batches of a CUDA tensor are CUDA tensors, binarised there, the same for the same seed."""
    x = torch.rand(64, 1, 8, 8, device="cuda")
    first = [xb for xb, _ in Batches(x, 16, 3, dynamic=True).epoch(0)]
    second = [xb for xb, _ in Batches(x, 16, 3, dynamic=True).epoch(0)]
    assert all(xb.device.type == "cuda" and set(xb.unique().tolist()) <= {0.0, 1.0} for xb in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_bf16_autocast_on_cuda_trains_with_the_terms_in_float32():
    """A bf16 epoch on the GPU: finite, its KL and reconstruction in float32, its first loss within 2 % of
    fp32's on the same weights and batch."""
    x = (torch.rand(256, 1, 28, 28) > 0.5).float().cuda()
    losses = {}
    for precision in ("fp32", "bf16"):
        config = Config(hidden=(64,), latent_dim=4, epochs=1, batch_size=64, binarize="none", precision=precision)
        torch.manual_seed(0)
        model = build(config, (1, 28, 28)).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            terms = objectives.elbo(model, x[:64], contract.Noise(torch.Generator(device="cuda").manual_seed(0), 64))
        assert terms.kl.dtype == terms.reconstruction.dtype == torch.float32
        losses[precision] = -terms.elbo.mean().item()
        state = fit(model, x, None, config, state=TrainState(), progress=False)
        assert torch.isfinite(torch.tensor(state.history[-1].elbo))
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * abs(losses["fp32"])


def test_the_iwae_chunk_follows_the_gpu_s_free_memory():
    """On the GPU the IWAE chunk is what a quarter of the free memory holds (32 bytes per sample, example
    and pixel), at most k; on the CPU the cache rule's."""
    x = torch.zeros(100, 1, 28, 28, device="cuda")
    expected = max(1, min(5000, available(x.device) // 4 // (32 * 100 * 784)))
    assert iwae_chunk(x, 100, 5000) == expected
    assert iwae_chunk(x.cpu(), 100, 5000) == max(1, CHUNK_VALUES // (100 * 784))


def test_a_run_trained_on_the_gpu_resumes_on_the_cpu_and_back(tmp_path):
    """A checkpoint written on the GPU loads on the CPU (every tensor in it on the CPU); --resume may move
    a run between them (--device is one of the options a resume may change), and the epochs go on."""
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "2", "--device", "cuda", "--out", str(out)]) == 0
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert all(t.device.type == "cpu" for t in state["model"].values())
    assert main(["train", *SMALL, "--epochs", "3", "--device", "cpu", "--out", str(out), "--resume"]) == 0
    assert main(["train", *SMALL, "--epochs", "4", "--device", "cuda", "--out", str(out), "--resume"]) == 0
    assert epochs(out) == ["0", "1", "2", "3"]
    assert 'device = "cuda"' in (out / "config.toml").read_text()


def test_evaluate_on_the_gpu_measures_what_the_cpu_does(tmp_path):
    """The closed-form KL and the active units agree to float32 rounding; the sampled terms (other draws
    on the GPU) within 1 % for the ELBO and 0.5 % for the IWAE estimate."""
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--epochs", "3", "--device", "cpu", "--out", str(out)]) == 0
    records = {}
    for device in ("cpu", "cuda"):
        argv = ["evaluate", str(out), "--iwae-k", "200", "--device", device, "--json", str(tmp_path / f"{device}.json")]
        assert main(argv) == 0
        records[device] = json.loads((tmp_path / f"{device}.json").read_text())
    cpu, gpu = records["cpu"], records["cuda"]
    assert gpu["kl"] == pytest.approx(cpu["kl"], rel=1e-4) and gpu["active_units"] == cpu["active_units"]
    assert gpu["elbo"] == pytest.approx(cpu["elbo"], rel=1e-2)
    assert gpu["log_likelihood"] == pytest.approx(cpu["log_likelihood"], rel=5e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_over_nccl(tmp_path):
    """vaelab train --nproc 2 --device cuda: two processes, one GPU each, NCCL between them; the run ends
    cleanly and its epochs are logged once."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "vaelab", "train", "--nproc", "2", *SMALL, "--epochs", "2", "--device", "cuda"]
    r = subprocess.run([*cmd, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert epochs(out) == ["0", "1"]
