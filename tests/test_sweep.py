"""sweep.py: a two-rank sweep on a tiny model gives the table with the right rows, and a target sweep at a
fixed budget gives equal trainable counts."""

import csv

import pytest

from tools import sweep

pytestmark = pytest.mark.tokenizer  # these tests tokenize text (see conftest.py)


def train_args(tiny_gpt2):
    return ["--", "--model", str(tiny_gpt2), "--max_iters", "2", "--warmup", "1", "--batch_size", "4",
            "--eval_interval", "2", "--eval_examples", "8", "--device", "cpu"]


def test_rank_sweep_writes_one_row_per_rank(tiny_gpt2, e2e_small, tmp_path):
    rows = sweep.main(["ranks", "--ranks", "1", "2", "--out", str(tmp_path), "--data", str(e2e_small),
                       "--eval_split", "dev", "--eval_limit", "2", "--beam", "2", "--no_meteor",
                       *train_args(tiny_gpt2)])
    # r (in + out) per adapted matrix: r * (64 + 64) * 2 matrices (q, v) * 2 layers
    assert [(row["setting"], row["trainable"]) for row in rows] == [("r1", 512), ("r2", 1024)]
    assert all(row["val_loss"] > 0 and row["BLEU"] is not None and row["METEOR"] is None for row in rows)
    with open(tmp_path / "table.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [(r["setting"], r["rank"], r["trainable"]) for r in table] == [("r1", "1", "512"), ("r2", "2", "1024")]
    assert float(table[0]["BLEU"]) == rows[0]["BLEU"]
    assert "| r2 | q,v | 2 | 1,024 |" in (tmp_path / "table.md").read_text()
    # a second call reuses the finished runs: same rows, nothing trained or decoded again
    assert sweep.main(["ranks", "--ranks", "1", "2", "--out", str(tmp_path), "--data", str(e2e_small),
                       "--eval_split", "dev", "--eval_limit", "2", "--beam", "2", "--no_meteor",
                       *train_args(tiny_gpt2)]) == rows


def test_target_sweep_at_a_fixed_budget(tiny_gpt2, e2e_small, tmp_path, capsys):
    rows = sweep.main(["targets", "--grid", "q:4", "q,v:2", "q,k,v,o:1", "--no_eval", "--out", str(tmp_path),
                       "--data", str(e2e_small), *train_args(tiny_gpt2)])
    assert [row["setting"] for row in rows] == ["q_r4", "qv_r2", "qkvo_r1"]
    assert {row["trainable"] for row in rows} == {4 * 128 * 2}
    assert "trainable parameters: the same for every setting (1,024)" in capsys.readouterr().out
