"""train.py: the loss falls, only LoRA learns, --resume continues exactly, torchrun splits the same batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from data.e2e import prepare
from data.e2e.batches import dev_loss, load_split
from lora import lora_state_dict
from model import GPT

pytestmark = pytest.mark.tokenizer  # these tests tokenize text (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]


def args_for(tiny_gpt2, data, out, *extra):
    return ["--model", str(tiny_gpt2), "--data", str(data), "--out", str(out), "--lr", "1e-2", "--warmup", "3",
            "--eval_examples", "16", "--batch_size", "4", "--device", "cpu", *extra]


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_thirty_steps_lower_the_dev_loss_and_leave_the_base_untouched(tiny_gpt2, e2e_small, tmp_path):
    base = GPT.from_pretrained(tiny_gpt2)
    base_loss = dev_loss(base, load_split(e2e_small, "dev"), 8, "cpu", limit=32)
    model = train.train(train.parse_args(args_for(tiny_gpt2, e2e_small, tmp_path / "run",
                                                  "--max_iters", "30", "--eval_interval", "10")))
    log = read_log(tmp_path / "run")
    assert [line["step"] for line in log] == list(range(1, 31))
    assert [line["step"] for line in log if "val_loss" in line] == [10, 20, 30]
    assert log[-1]["val_loss"] < base_loss - 0.05  # the LoRA update has learned something
    lora = lora_state_dict(model)
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in base.state_dict().items())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if n.endswith("lora_B"))
    assert (tmp_path / "run" / "adapter.safetensors").is_file() and (tmp_path / "run" / "ckpt.pt").is_file()


def test_resume_continues_exactly(tiny_gpt2, e2e_small, tmp_path):
    """Stop after step 5 and resume to 10: steps 6-10 log the losses of one uninterrupted 10-step run
    (dropout is on: each step draws its masks from its own seed, so a resumed step draws the same ones)."""
    common = ["--max_iters", "10", "--eval_interval", "5", "--dropout", "0.1"]
    train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "whole", *common))
    train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "split", *common, "--stop_after", "5"))
    assert [line["step"] for line in read_log(tmp_path / "split")][-1] == 5
    train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "split", *common, "--resume"))
    whole, split = read_log(tmp_path / "whole"), read_log(tmp_path / "split")
    assert [line["step"] for line in split] == list(range(1, 11))
    assert [(line["loss"], line.get("val_loss")) for line in split[5:]] == \
           [(line["loss"], line.get("val_loss")) for line in whole[5:]]


def test_resume_with_other_settings_and_overwriting_a_run_are_refused(tiny_gpt2, e2e_small, tmp_path):
    train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "run", "--max_iters", "2", "--eval_interval", "2"))
    adapter = (tmp_path / "run" / "adapter.safetensors").read_bytes()
    with pytest.raises(SystemExit, match="^error: .*already holds a run"):
        train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "run", "--max_iters", "2"))
    with pytest.raises(SystemExit, match="^error: --resume with other settings.*--rank"):
        train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "run", "--max_iters", "2", "--rank", "8", "--resume"))
    assert (tmp_path / "run" / "adapter.safetensors").read_bytes() == adapter


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_gpt2, e2e_small, tmp_path):
    out = tmp_path / "run"
    # lr 1e30: the first step's update (about lr in size, whatever the gradient) sends B to ~1e30, so the
    # second step's activations overflow fp32 (squared in LayerNorm's variance) and the loss is nan
    with pytest.raises(SystemExit) as err:
        train.main(args_for(tiny_gpt2, e2e_small, out, "--max_iters", "5", "--eval_interval", "1", "--lr", "1e30",
                            "--warmup", "0"))
    # an fp32 run is not told to try --dtype fp32
    assert str(err.value) == (f"error: the loss became nan at step 2; the last good checkpoint in {out} (step 1) is "
                              "intact (nothing non-finite is ever saved). Try a lower --lr")
    state = torch.load(out / "ckpt.pt", weights_only=False)
    assert state["step"] == 1 and all(torch.isfinite(t).all() for t in state["lora"].values())


def test_a_nan_loss_at_step_1_blames_the_model_and_names_no_checkpoint(tiny_gpt2, e2e_small, tmp_path):
    """Step 1 runs before any update (B = 0), so its loss is the base model's: an infinite weight makes it NaN
    whatever the learning rate. Nothing has been saved; only a half-precision run is told to try --dtype fp32."""
    from plumbing.files import load_safetensors, save_safetensors

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny_gpt2 / "config.json").read_bytes())
    tensors, metadata = load_safetensors(tiny_gpt2 / "model.safetensors")
    tensors["transformer.ln_f.weight"][0] = float("inf")
    save_safetensors(tensors, broken / "model.safetensors", metadata)
    for dtype, cause in [("fp32", "check that --model's weights are all finite"),
                         ("bf16", "it may overflow bfloat16 (try --dtype fp32), or --model's weights are not all "
                                  "finite")]:
        out = tmp_path / dtype
        with pytest.raises(SystemExit) as err:
            train.main(args_for(broken, e2e_small, out, "--max_iters", "3", "--dtype", dtype))
        assert str(err.value) == ("error: the loss became nan at step 1, before any update, so the base model itself "
                                  f"gives it: {cause}; nothing was saved")
        assert not (out / "ckpt.pt").exists()


def test_fp16_on_a_cpu_is_refused_in_one_line_before_work(tiny_gpt2, e2e_small, tmp_path, capfd):
    """torch would run it, slower than fp32, and print its own warning (with its source line) that it drops the
    loss scaling fp16 needs: refused before the model loads, naming the dtypes that work on a CPU."""
    with pytest.raises(SystemExit) as err:
        train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "run", "--dtype", "fp16"))
    assert str(err.value) == "error: --dtype fp16 needs a GPU (CUDA or MPS); on the CPU use --dtype bf16 or fp32"
    assert "GradScaler" not in capfd.readouterr().err and not (tmp_path / "run").exists()


def test_torchrun_two_processes_give_the_single_process_losses(tiny_gpt2, e2e_small, tmp_path):
    """gloo on the CPU: each process takes half of every global batch of 4; the summed gradients are those of
    the whole batch, so every step's loss equals the one-process run's."""
    common = ["--max_iters", "4", "--eval_interval", "2", "--dropout", "0"]
    train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "one", *common))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(ROOT / "train.py"), *args_for(tiny_gpt2, e2e_small, tmp_path / "two", *common)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=240)
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True)) <= 1e-5
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) <= 1e-5


def test_help_works_offline():
    env = {k: v for k, v in os.environ.items() if k != "TIKTOKEN_CACHE_DIR"}
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "--rank" in result.stdout and "(default: 4)" in result.stdout


def test_missing_data_without_network_is_one_clear_line(tiny_gpt2, tmp_path, monkeypatch):
    monkeypatch.setitem(prepare.URLS, "train", "http://127.0.0.1:9/trainset.csv")  # port 9: nothing listens
    with pytest.raises(SystemExit) as err:
        train.main(args_for(tiny_gpt2, tmp_path / "no_data", tmp_path / "run", "--max_iters", "1"))
    message = str(err.value)
    assert message.startswith("error: could not download http://127.0.0.1:9/trainset.csv") and "\n" not in message


def test_the_logged_loss_is_the_label_smoothed_loss_of_the_step_batch(tiny_gpt2, e2e_small, tmp_path):
    """Step 1 runs on the base model (B = 0, no dropout): its logged loss is the label-smoothed cross-entropy of
    the first batch, computed here by hand from the logits; --label_smoothing 0 logs the plain one."""
    from data.e2e.batches import batch_order, make_batch

    split = load_split(e2e_small, "train")
    x, y = make_batch(split, batch_order(split, 4, 1337, 0)[0])
    logits, _ = GPT.from_pretrained(tiny_gpt2)(x)
    log_p = torch.log_softmax(logits[y != -1], dim=-1)
    nll = -log_p.gather(1, y[y != -1][:, None]).squeeze(1)
    for eps in (0.1, 0.0):
        out = tmp_path / f"ls{eps}"
        train.main(args_for(tiny_gpt2, e2e_small, out, "--max_iters", "1", "--dropout", "0", "--eval_examples", "4",
                            "--label_smoothing", str(eps)))
        expected = ((1 - eps) * nll + eps * -log_p.mean(dim=-1)).mean().item()
        assert abs(read_log(out)[0]["loss"] - expected) <= 2e-5


def test_learning_rate_schedule_warmup_then_linear_decay(tiny_gpt2, e2e_small, tmp_path):
    """lr_at by hand: (step + 1) / (warmup + 1) of the peak while warming up, the peak at the end of warmup,
    then linear to zero; and the lr each step logs is lr_at's."""
    assert train.lr_at(0, 1e-3, 10, 100) == pytest.approx(1e-3 / 11)
    assert train.lr_at(9, 1e-3, 10, 100) == pytest.approx(1e-3 * 10 / 11)
    assert train.lr_at(10, 1e-3, 10, 100) == pytest.approx(1e-3)
    assert train.lr_at(55, 1e-3, 10, 100) == pytest.approx(0.5e-3)
    assert train.lr_at(99, 1e-3, 10, 100) == pytest.approx(1e-3 / 90)
    train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "run", "--max_iters", "6", "--eval_interval", "6",
                        "--eval_examples", "4"))
    assert [line["lr"] for line in read_log(tmp_path / "run")] == pytest.approx(
        [1e-2 / 4, 2e-2 / 4, 3e-2 / 4, 1e-2, 1e-2 * 2 / 3, 1e-2 / 3])


def test_grad_accum_2_gives_the_grad_accum_1_losses(tiny_gpt2, e2e_small, tmp_path):
    """Each piece's mean loss is weighted by its share of the batch's targets: two pieces of unequal target
    counts make the same step as one."""
    common = ["--max_iters", "4", "--eval_interval", "4", "--dropout", "0", "--eval_examples", "8"]
    train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "one", *common))
    train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "two", *common, "--grad_accum", "2"))
    one, two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two, strict=True)) <= 1e-5
    assert abs(one[-1]["val_loss"] - two[-1]["val_loss"]) <= 1e-5


def test_dev_loss_is_the_mean_per_target_token_at_every_batch_size(tiny_gpt2, e2e_small):
    """dev_loss weights each batch by its number of targets: the same figure at batch sizes 1, 3 and 8, and equal
    to the cross-entropy summed over every target of every example, one example at a time, over their count. (A
    mean of batch means would differ: E2E examples have different numbers of targets.)"""
    model = GPT.from_pretrained(tiny_gpt2)
    split = load_split(e2e_small, "dev")
    n = 11
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            tokens = torch.from_numpy(split.tokens[split.offsets[i]:split.offsets[i + 1]].astype("int64"))
            logits, _ = model(tokens[None, :-1])
            start = int(split.prompt_lens[i]) - 1  # the first target is the first completion token
            losses = torch.nn.functional.cross_entropy(logits[0, start:], tokens[start + 1:], reduction="sum")
            total, count = total + losses.item(), count + len(tokens) - 1 - start
    per_token = total / count
    figures = [dev_loss(model, split, batch_size, "cpu", limit=n) for batch_size in (1, 3, 8)]
    assert figures == pytest.approx([per_token] * 3, rel=1e-6)
    lengths = split.lengths[:n] - split.prompt_lens[:n]
    assert lengths.min() != lengths.max()  # so the weighting matters
