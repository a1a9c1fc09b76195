"""The benchmark's references compute what vaelab computes (speed is only ever compared
between equal results); the benchmark itself never runs in the test suite."""

import torch
from benchmarks.__main__ import MLP, step_gemm_shapes
from benchmarks.references import TextbookVAE, straightforward_iwae, textbook_loss

from vaelab.evaluation import iwae_log_likelihood
from vaelab.models import build
from vaelab.objectives import elbo


def test_straightforward_iwae_equals_vaelab_estimate():
    torch.manual_seed(0)
    model = build(MLP, (1, 28, 28)).eval()
    x = (torch.rand(6, 1, 28, 28) > 0.7).float()
    torch.manual_seed(3)
    ref = straightforward_iwae(model, x, 300, batch_size=4, chunk=100)
    torch.manual_seed(3)
    ours = iwae_log_likelihood(model, x, 300, batch_size=4, chunk=100)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_gemm_shapes_cost_the_stated_flops():
    flops = sum(2 * m * k * n for m, k, n in step_gemm_shapes(128)) / 128
    assert round(flops / 1e6, 2) == 3.28


def test_textbook_loss_is_the_negative_elbo_summed_over_the_batch():
    """Same weights, same z: the textbook's BCE + KLD equals -sum(ELBO terms) of vaelab's objective."""
    torch.manual_seed(0)
    textbook = TextbookVAE()
    model = build(MLP, (1, 28, 28))
    with torch.no_grad():  # copy the textbook's weights into vaelab's MLP
        enc, dec = model.encoder.net, model.decoder.net
        enc[0].weight.copy_(textbook.fc1.weight), enc[0].bias.copy_(textbook.fc1.bias)
        enc[2].weight.copy_(torch.cat([textbook.fc21.weight, textbook.fc22.weight]))
        enc[2].bias.copy_(torch.cat([textbook.fc21.bias, textbook.fc22.bias]))
        dec[0].weight.copy_(textbook.fc3.weight), dec[0].bias.copy_(textbook.fc3.bias)
        dec[2].weight.copy_(textbook.fc4.weight), dec[2].bias.copy_(textbook.fc4.bias)
    x = (torch.rand(8, 1, 28, 28) > 0.7).float()
    torch.manual_seed(1)
    recon, mu, logvar = textbook(x.flatten(1))
    ref = textbook_loss(recon, x.flatten(1), mu, logvar)
    torch.manual_seed(1)
    terms = elbo(model, x)
    torch.testing.assert_close(-terms.elbo.sum(), ref, rtol=1e-4, atol=1e-2)


def test_the_textbook_model_is_scored_by_the_same_estimator():
    """The time-to-quality row scores the textbook model through OneLayer and vaelab's IWAE estimator."""
    from benchmarks.__main__ import TextbookAsLatentModel

    from vaelab.contract import OneLayer

    torch.manual_seed(0)
    textbook = TextbookVAE().eval()
    x = (torch.rand(3, 1, 28, 28) > 0.7).float()
    ll = iwae_log_likelihood(OneLayer(TextbookAsLatentModel(textbook)), x, 20, batch_size=3, chunk=10)
    assert ll.shape == (3,) and torch.isfinite(ll).all()


def test_the_recipe_study_states_both_goals():
    """Equal time: at least 1.5 nats under the textbook's mean at the same budget; time to target: the
    recipe's run of B / 2 at or under the textbook's mean at B."""
    from benchmarks.recipes import goals

    results = {
        60.0: {"textbook": [(101.0, 9), (101.5, 9)], "defaults": [(99.75, 9), (99.75, 9)]},
        120.0: {"textbook": [(100.0, 9), (99.5, 9)], "defaults": [(98.5, 9), (98.0, 9)], "other": [(99.5, 9)]},
    }
    assert goals(results) == [
        "defaults at 60 s: +1.50 nats at equal time (met)",
        "defaults at 120 s: +1.50 nats at equal time (met); in 60 s +0.00 against the textbook's 120 s (met)",
        "other at 120 s: +0.25 nats at equal time (missed)",
    ]
    results[60.0]["defaults"] = [(99.76, 9)]
    assert goals(results)[0].endswith("+1.49 nats at equal time (missed)")
    assert goals(results)[1].endswith("-0.01 against the textbook's 120 s (missed)")


def test_the_recipe_study_runs_on_mnist_idx_files(mnist_dir, capsys):
    """python -m benchmarks.recipes --mnist DIR trains the textbook loop and a recipe on MNIST-format IDX
    files (here a tiny generated set) and scores both; a folder without them is skipped with a line."""
    from benchmarks import recipes

    argv = ["--mnist", str(mnist_dir), "--budget", "0.25", "0.5", "--seeds", "0", "--recipes", "textbook", "defaults"]
    assert recipes.main(argv) == 0
    out = capsys.readouterr().out
    assert "mnist, 0.25 and 0.5 s per run" in out
    assert "seed 0, 0.5 s: textbook" in out and "seed 0, 0.25 s: defaults" in out
    # the goals: equal time at both budgets, and the half-time run against the textbook's longer one
    assert "defaults at 0.25 s: " in out and "at equal time" in out
    assert "defaults at 0.5 s: " in out and "in 0.25 s " in out and "against the textbook's 0.5 s" in out
    assert recipes.main(["--mnist", str(mnist_dir / "nothing")]) == 0
    assert "full MNIST: skipped" in capsys.readouterr().out


def test_the_cpu_line_says_when_pytorch_is_held_to_a_lower_code_path(monkeypatch):
    """A study run with ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU says so beside the CPU's own features."""
    import benchmarks.__main__ as bench

    monkeypatch.setattr(bench, "cpu_info", lambda: {"model name": "AMD EPYC", "flags": ["avx2", "avx512f"]})
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    assert bench.cpu_name() == "AMD EPYC (avx2, avx512f)"
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert bench.cpu_name() == "AMD EPYC (avx2, avx512f; PyTorch's kernels held to avx2 by ATEN_CPU_CAPABILITY)"
