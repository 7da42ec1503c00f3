"""train.py's flags reach what they set, each at a value off its default.

No other test passes --alpha, --targets, --rslora, --init, --weight_decay, --seed, --bucket or --epochs (issue 30):
at the defaults, a flag that train.py read but did not pass on would go unseen. One short run each (one or a few
steps of the tiny model) shows where each one lands.
"""

import json

import pytest
import torch
from conftest import write_e2e_csv

import lora
import train
from data.e2e import prepare

pytestmark = pytest.mark.tokenizer  # the data is prepared by tokenizing text (see conftest.py)


def run(tiny_gpt2, data, out, *extra):
    """train.train on these arguments: 4 examples a step, evaluation off (its interval past the end)."""
    argv = ["--model", str(tiny_gpt2), "--data", str(data), "--out", str(out), "--batch_size", "4", "--warmup", "1",
            "--eval_interval", "1000", "--eval_examples", "4", "--device", "cpu", *map(str, extra)]
    return train.train(train.parse_args(argv))


def log_of(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_lora_settings_and_weight_decay_reach_the_model_and_the_optimizer(tiny_gpt2, e2e_small, tmp_path):
    model = run(tiny_gpt2, e2e_small, tmp_path / "run", "--max_iters", 1, "--rank", 2, "--alpha", 6,
                "--targets", "k", "o", "--dropout", 0.2, "--rslora", "--init", "gaussian", "--weight_decay", 0.05)
    assert lora.config_of(model) == lora.LoRAConfig(rank=2, alpha=6, targets=("k", "o"), dropout=0.2, rslora=True,
                                                    init="gaussian")
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    assert [group["weight_decay"] for group in state["optimizer"]["param_groups"]] == [0.05]


def test_seed_sets_the_start_of_a(tiny_gpt2, e2e_small, tmp_path):
    """The same --seed gives the same A; another seed (7, not the default 1337) another."""
    def first_a(name, *seed):
        model = run(tiny_gpt2, e2e_small, tmp_path / name, "--max_iters", 1, *seed)
        return next(p for n, p in lora.lora_state_dict(model).items() if n.endswith("lora_A")).clone()

    default, seven, seven_again = first_a("a"), first_a("b", "--seed", 7), first_a("c", "--seed", 7)
    assert torch.equal(seven, seven_again) and not torch.equal(seven, default)


def test_bucket_changes_the_batches(tiny_gpt2, e2e_small, tmp_path):
    """--bucket batches examples of similar length: the first step's batch, and so its loss, is another."""
    run(tiny_gpt2, e2e_small, tmp_path / "plain", "--max_iters", 1)
    run(tiny_gpt2, e2e_small, tmp_path / "bucket", "--max_iters", 1, "--bucket")
    assert log_of(tmp_path / "plain")[0]["loss"] != log_of(tmp_path / "bucket")[0]["loss"]


def test_epochs_set_the_number_of_steps(tiny_gpt2, e2e_src, tmp_path):
    """--epochs 2 (not the default 5) over 8 training examples, 4 a step: 4 steps."""
    src = tmp_path / "src"
    src.mkdir()
    rows = prepare.read_csv(e2e_src / "trainset.csv")[:8]
    for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        write_e2e_csv(src / name, rows)
    prepare.prepare(tmp_path / "data", source=src)
    run(tiny_gpt2, tmp_path / "data", tmp_path / "run", "--epochs", 2)
    assert [line["step"] for line in log_of(tmp_path / "run")] == [1, 2, 3, 4]
