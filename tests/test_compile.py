"""train.py --compile compiles a bounded number of times over batches of varied lengths and trains exactly as eager
does (issue #16); bf16 autocast trains; tools/gpu_check.py's CPU dry run passes where there is no CUDA."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from tools import gpu_check

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.tokenizer
def test_train_compile_bounds_compilations_and_matches_eager(tiny_gpt2, e2e_small, tmp_path, monkeypatch):
    """12 steps of batches of 4 E2E examples (lengths vary from batch to batch) with --compile: at most
    gpu_check.MAX_COMPILATIONS compilations, and the losses of the eager run. Inductor would take minutes to
    compile on a CPU, so torch.compile gets the aot_eager backend: the graphs dynamo makes (and so how often it
    compiles) are the same, and aot_eager also traces the backward as inductor's path does."""
    compiled = []

    def compile_with_aot_eager(model, **options):
        compiled.append(options)
        return original_compile(model, **{**options, "backend": "aot_eager"})

    original_compile = torch.compile
    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    # train.py may set dynamo's config for the run: put it back afterwards, for the other tests of this process
    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops",
                        torch._dynamo.config.capture_dynamic_output_shape_ops)
    common = ["--model", str(tiny_gpt2), "--data", str(e2e_small), "--lr", "1e-2", "--warmup", "3", "--batch_size",
              "4", "--device", "cpu", "--dropout", "0", "--max_iters", "12", "--eval_interval", "100",
              "--eval_examples", "8"]
    train.main([*common, "--out", str(tmp_path / "eager")])
    torch._dynamo.reset()  # nothing compiled before counts
    before = gpu_check.compilations()
    train.main([*common, "--out", str(tmp_path / "compiled"), "--compile"])
    count = gpu_check.compilations() - before

    assert compiled, "train.py --compile did not call torch.compile"
    assert count <= gpu_check.MAX_COMPILATIONS, f"{count} compilations for 12 batches"
    logs = {run: [json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("eager", "compiled")}
    eager, compiled_losses = ([line["loss"] for line in logs[run]] for run in ("eager", "compiled"))
    assert len(compiled_losses) == 12
    assert compiled_losses == pytest.approx(eager, rel=1e-5)  # fp32: the same sums, give or take rounding


def test_bf16_autocast_lowers_the_loss_with_finite_lora_tensors():
    """A few steps under CPU bf16 autocast (train.py --dtype bf16) on one batch: the loss falls, and A and B stay
    finite fp32 tensors (autocast computes in bf16; the parameters and AdamW's state stay fp32)."""
    plan = gpu_check.DRY_PLAN
    model = gpu_check.lora_model(plan.small, "cpu", dropout=0.1)
    opt = gpu_check.optimizer(model, lr=1e-2)
    split = gpu_check.paper_like_split(32, seed=1, scale=plan.length_scale, n_tokens=256)
    x, y, _ = gpu_check.batch_list(split, 1, plan)[0]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast:  # the forward really runs in bf16
        assert model(x, y)[0].dtype == torch.bfloat16
    losses = [gpu_check.train_step(model, opt, x, y, autocast) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.1
    lora = [p for p in model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in lora)
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if name.endswith("lora_B"))


def test_gpu_check_without_cuda_runs_its_dry_run_and_exits_0():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # as on a machine without a GPU, even where there is one
    done = subprocess.run([sys.executable, "-m", "tools.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "no CUDA: a dry run on the CPU" in done.stdout
    for name in ("parity", "merge", "bf16", "compile", "speed"):
        assert f"[PASS] {name}" in done.stdout, done.stdout
    assert "5 of 5 checks passed" in done.stdout
