"""bench.py's helpers: synthetic data, label conversion, the FLOP formula, the table, the alternation order, the
memory probe, and that both training sides compute the same loss on the same weights. No timing is asserted."""

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.tasks import EOT
from tools import bench


def test_synthetic_split_has_e2e_like_lengths_and_batches():
    split = bench.synthetic_split(200, seed=1)
    assert len(split) == 200
    assert split.prompt_lens.min() >= 25 and split.prompt_lens.max() <= 40
    assert split.lengths.min() >= 50 and split.lengths.max() <= 110
    assert np.all(split.tokens[split.offsets[1:] - 1] == EOT)  # every example ends with <|endoftext|>
    assert np.all(split.tokens[split.offsets[:-1]] != EOT)
    batches = bench.make_batches(split, n_batches=3, batch_size=8)
    assert len(batches) == 3
    for b in batches:
        assert b["x"].shape == b["y"].shape == b["mask"].shape
        assert b["n_tokens"] == b["mask"].sum().item() == int(b["lengths"].sum())
        assert b["n_targets"] == (b["y"] != -1).sum().item()  # make_batch's targets are what the loss counts


def test_hf_labels_and_attention_mask():
    y = torch.tensor([[-1, -1, 5, 7], [-1, 3, -1, -1]])
    assert bench.hf_labels(y).tolist() == [[-100, -100, 5, 7], [-100, 3, -100, -100]]
    assert bench.attention_mask([4, 2], 4).tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_lora_train_flops_by_hand():
    # n_layer 1, n_embd 2, vocab 3, sequences of 1 and 2 tokens, 2 targets, 5 LoRA weights:
    # N_body = 12 * 1 * 2^2 = 48; (4 * 48 + 6 * 5) * 3 tokens = 666; head 4 * 2 * 3 * 2 = 48;
    # attention 12 * 1 * 2 * (1^2 + 2^2) = 120
    assert bench.lora_train_flops(1, 2, 3, [1, 2], 2, 5) == 666 + 48 + 120
    # GPT-2 small, one 64-token sequence with 30 targets: about 4 x 85M per token, the head on 30 of 64 only
    flops = bench.lora_train_flops(12, 768, 50257, [64], 30, 147_456)
    assert flops == pytest.approx(64 * (4 * 84_934_656 + 6 * 147_456) + 30 * 4 * 768 * 50257 + 12 * 12 * 768 * 64**2)


def test_peak_tflops_from_the_device_name():
    assert bench.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bench.peak_tflops("NVIDIA H200") == 989
    assert bench.peak_tflops("NVIDIA A100-SXM4-40GB") == 312
    assert bench.peak_tflops("Tesla T4") is None
    assert bench.peak_tflops("Tesla T4", override=65) == 65


def test_ratios_verdicts_and_table():
    assert bench.paired_ratios([2, 4, 6], [1, 1, 2]) == 3  # per-round 2, 4, 3 -> median 3
    assert bench.verdict(1.3, (">=", 1.2)) == "yes"
    assert bench.verdict(0.95, ("<=", 0.9)) == "NO"
    assert bench.verdict(0.95, None) == ""
    table = bench.markdown_table([dict(what="tokens/s", ours=1234.5, theirs=987.6, ratio=1.25, target=(">=", 1.2)),
                                  dict(what="loss", ours=11.123456, theirs=11.123451, digits=5, ratio=1.0)])
    lines = table.splitlines()
    assert lines[0] == "| what | ours | theirs | ratio | target | met? |"
    assert lines[2] == "| tokens/s | 1,234 | 988 | 1.25x | >= 1.2x | yes |"
    assert lines[3] == "| loss | 11.12346 | 11.12345 | 1.00x |  |  |"


def test_alternate_runs_warmups_then_rounds_in_abba_order():
    calls = []
    sides = {name: (lambda i, name=name: calls.append((name, i))) for name in ("A", "B")}
    times = bench.alternate(sides, repeats=3, warmup=2, device="cpu")
    assert calls == [("A", 0), ("B", 0), ("B", 1), ("A", 1),  # warm-up, untimed
                     ("A", 2), ("B", 2), ("B", 3), ("A", 3), ("A", 4), ("B", 4)]
    assert {name: len(t) for name, t in times.items()} == {"A": 3, "B": 3}


def test_same_length_prompts_are_distinct_and_unpadded():
    split = bench.synthetic_split(300, seed=2)
    prompts = bench.same_length_prompts(split, 8)
    assert prompts.shape[0] == 8
    assert len({tuple(p.tolist()) for p in prompts}) == 8
    length = prompts.shape[1]
    assert (split.prompt_lens == length).sum() == np.bincount(split.prompt_lens).max()  # the most common length


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_memory_probe_sees_a_64_mib_tensor():
    with bench.MemoryProbe("cpu") as probe:
        t = torch.ones(16 * 2**20)  # 64 MiB, written, so resident
        del t
    assert probe.extra >= 60 * 2**20


def test_both_training_sides_compute_the_same_first_loss(tiny_gpt2, tmp_path):
    """Same weights, same batch, B = 0 on both sides: the same label-smoothed loss on the completion tokens; and
    the child process's memory report (run here in-process) counts the same trainable weights."""
    batches = bench.make_batches(bench.synthetic_split(40, seed=3), n_batches=2, batch_size=4)
    ours = bench.make_trainer("ours", tiny_gpt2, "cpu")
    theirs = bench.make_trainer("theirs", tiny_gpt2, "cpu")
    loss_ours, loss_theirs = ours.step(batches[0]), theirs.step(batches[0])
    assert loss_ours == pytest.approx(loss_theirs, rel=1e-5)
    assert loss_ours > 5  # a random model on 50,257 tokens: near ln(50257) = 10.8, not a loss over nothing
    # r=4 on q and v of 2 layers of width 64: 2 x 2 x (4x64 + 64x4); PEFT's one A, B on c_attn: 2 x (4x64 + 192x4)
    assert sum(p.numel() for p in ours.params) == sum(p.numel() for p in theirs.params) == 2048

    path = tmp_path / "batches.pt"
    torch.save(batches, path)
    spec = dict(side="ours", folder=str(tiny_gpt2), batches=str(path), steps=1, device="cpu", bf16=False,
                threads=torch.get_num_threads())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.child_main(json.dumps(spec))
    result = json.loads(out.getvalue().splitlines()[-1].removeprefix("RESULT "))
    assert result["trainable"] == 2048
    assert result["peak"] >= result["base"] > 0


def test_decode_bytes_counts_every_weight_once_and_one_position_row():
    """GPT-2 124M: 124,439,808 parameters (wte counted once: the head is tied), 4 bytes each, less the position
    table (1024 x 768) but for one row: the ~497 MB one token at batch 1 reads."""
    from model import GPT, GPTConfig
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert bench.decode_bytes(model) == 4 * (124_439_808 - 1024 * 768 + 768)


def test_read_bandwidth_is_bytes_per_second():
    rate = bench.read_bandwidth("cpu", n_bytes=2**24)
    assert 1e8 < rate < 1e13  # between 0.1 GB/s and 10 TB/s


def test_beam_runners_agree_and_transformers_runs(tiny_gpt2):
    """The batched side gives what the one-prompt side gives (prompts of two lengths); transformers' side answers
    every prompt. Quick settings: beam 3, 4 new tokens."""
    import transformers

    from data.e2e.prepare import EOT
    from model import GPT

    ours = GPT.from_pretrained(tiny_gpt2).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    prompts = [[11, 12, 13, EOT], [21, 22, 23, EOT], [31, 32, EOT], [41, 42, 43, EOT]]
    runners = bench.beam_runners(ours, hf, prompts, dict(beam=3, max_new_tokens=4, length_penalty=0.8,
                                                          no_repeat_ngram=4))
    batched = runners["batched"](0)
    assert batched == runners["one by one"](0)
    assert all(len(answer) <= 4 for answer in batched) and any(answer for answer in batched)
    theirs = runners["transformers"](0)
    assert len(theirs) == 4 and all(len(answer) <= 4 for answer in theirs)
