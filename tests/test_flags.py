"""train.py's and merge.py's flags reach what they set, each at a value off its default.

No other test passes train.py's --alpha, --targets, --rslora, --init, --weight_decay, --seed, --bucket or --epochs,
or merge.py's --tolerance, and no test looks at what merge.py's --check_tokens does (issue 30): at the defaults, a
flag that a script read but did not pass on would go unseen. One short run each shows where each one lands.
"""

import json

import pytest
import torch
from conftest import train_tiny_adapter, write_e2e_csv

import lora
import merge
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


def test_rank_up_to_n_embd_is_accepted(tiny_gpt2, e2e_small, tmp_path):
    """--rank 64, the tiny model's n_embd, trains (65 is refused: test_faults.py)."""
    model = run(tiny_gpt2, e2e_small, tmp_path / "run", "--max_iters", 1, "--rank", 64)
    assert lora.config_of(model).rank == 64


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


# ----------------------------------------------------------------------------------------------------------
# merge.py

@pytest.fixture(scope="module")
def adapter(tiny_gpt2, tmp_path_factory):
    return train_tiny_adapter(tiny_gpt2, tmp_path_factory.mktemp("adapter") / "adapter.safetensors", steps=5)


def check_only(adapter, folder, *extra):
    """merge.py --check-only on the fixed texts (an empty --data folder); returns the figures."""
    folder.mkdir(exist_ok=True)
    return merge.main(["--adapter", str(adapter), "--check-only", "--data", str(folder), "--n_check", "2",
                       *map(str, extra)])


def test_tolerance_is_the_largest_difference_accepted(adapter, tmp_path):
    """A right merge differs from the unmerged model by a little rounding (max_diff, far below the default 1e-4).
    --tolerance max_diff accepts it (the limit is "more than", so equal passes); half of it refuses it."""
    max_diff = check_only(adapter, tmp_path / "data", "--check_tokens", 2)["max_diff"]
    assert 0 < max_diff < 1e-4
    assert check_only(adapter, tmp_path / "data", "--check_tokens", 2, "--tolerance", max_diff)["max_diff"] == max_diff
    with pytest.raises(SystemExit, match="the merged model differs from the unmerged one"):
        check_only(adapter, tmp_path / "data", "--check_tokens", 2, "--tolerance", max_diff / 2)


def test_check_tokens_is_the_length_of_the_greedy_continuations(adapter, tmp_path, monkeypatch):
    seen = []
    original = merge.model_outputs

    def spy(model, prompts, check_tokens, desc):
        seen.append(check_tokens)
        return original(model, prompts, check_tokens, desc)

    monkeypatch.setattr(merge, "model_outputs", spy)
    check_only(adapter, tmp_path / "data", "--check_tokens", 3)
    assert seen == [3, 3]  # unmerged, then merged
