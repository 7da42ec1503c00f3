"""merge.py: the merged checkpoint equals base + adapter, loads in transformers and in GPT, and a wrong merge,
an existing folder or an adapter of another model is refused with nothing left behind."""

import contextlib
import csv
import io

import pytest
import torch
from conftest import train_tiny_adapter, write_hf_gpt2

import lora
import merge
import sample
from checkpoints import merged as merged_checkpoint
from checkpoints.loading import load_model
from data.e2e import prepare
from model import GPT
from plumbing.files import read_safetensors_header

pytestmark = pytest.mark.tokenizer  # these tests tokenize text (see conftest.py)

MRS = [
    ("name[The Eagle], eatType[pub], near[Burger King]", "The Eagle is a pub near Burger King."),
    ("name[Zizzi], area[riverside]", "Zizzi is by the river."),
    ("name[Aromi], eatType[coffee shop], food[French]", "Aromi is a French coffee shop."),
]


@pytest.fixture(scope="module")
def adapter(tiny_gpt2, tmp_path_factory):
    """An adapter on all of q, k, v, o and the MLP (so all four Conv1D weights change), trained 10 AdamW steps
    on random tokens."""
    return train_tiny_adapter(tiny_gpt2, tmp_path_factory.mktemp("adapter") / "adapter.safetensors",
                              targets=("q", "k", "v", "o", "mlp"), steps=10)


@pytest.fixture(scope="module")
def dev_data(tmp_path_factory):
    """A --data folder with three dev MRs prepared by prepare.py (dev_mrs.json)."""
    source, data = tmp_path_factory.mktemp("csv"), tmp_path_factory.mktemp("data")
    with open(source / "devset.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("mr", "ref"), *MRS])
    prepare.prepare(data, source=source, splits=("dev",))
    return data


@pytest.fixture(scope="module")
def merged(adapter, dev_data, tmp_path_factory):
    """(folder, figures, printed text) of one merge.py run writing to a fresh folder."""
    parent = tmp_path_factory.mktemp("merged")
    out = parent / "merged"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        figures = merge.main(["--adapter", str(adapter), "--out", str(out), "--data", str(dev_data)])
    return out, figures, printed.getvalue()


def unmerged_model(tiny_gpt2, adapter):
    return load_model(model=tiny_gpt2, adapter=adapter)[0].eval()


def tokens(seed=0):
    return torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(seed))


def test_merge_reports_figures_within_tolerance_and_leaves_only_its_folder(merged):
    out, figures, printed = merged
    assert figures["n"] == len(MRS) and figures["same"] == len(MRS)  # every greedy continuation identical
    assert figures["max_diff"] <= 1e-4 and figures["mean_diff"] <= figures["max_diff"]
    assert f"max  |logit difference|  {figures['max_diff']:.3e}" in printed
    assert f"{len(MRS)} E2E dev MRs" in printed and f"identical: {len(MRS)} of {len(MRS)}" in printed
    assert [p.name for p in out.parent.iterdir()] == ["merged"]  # no temporary folder left over
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_written_tensors_are_laid_out_as_transformers_writes_gpt2(merged, tiny_gpt2):
    out, _, _ = merged
    ours, metadata = read_safetensors_header(out / "model.safetensors")
    theirs, _ = read_safetensors_header(tiny_gpt2 / "model.safetensors")  # transformers' save_pretrained
    # same names (transformer.-prefixed, no lora, no lm_head) and shapes (Conv1D weights (in, out))
    assert {n: e["shape"] for n, e in ours.items()} == {n: e["shape"] for n, e in theirs.items()}
    assert ours["transformer.h.0.mlp.c_fc.weight"]["shape"] == [64, 256]
    assert metadata["format"] == "pt" and metadata["lora"] == "r=4 alpha=32 on q,k,v,o,mlp (scale 8)"


def test_merged_folder_loads_in_transformers_and_gpt_with_the_unmerged_logits(merged, tiny_gpt2, adapter):
    from transformers import GPT2LMHeadModel

    out, _, _ = merged
    idx = tokens()
    with torch.no_grad():
        want = unmerged_model(tiny_gpt2, adapter)(idx)[0]
        base = GPT.from_pretrained(tiny_gpt2).eval()(idx)[0]
        assert (want - base).abs().max() > 0.1  # the adapter matters: a merge that lost it would be seen
        hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
        assert info == dict(missing_keys=set(), unexpected_keys=set(), mismatched_keys=set(), error_msgs=[])
        assert (hf.config.model_type, hf.config.n_positions, hf.config.activation_function) == ("gpt2", 128,
                                                                                               "gelu_new")
        assert (hf.eval()(idx).logits - want).abs().max() <= 1e-5
        assert (GPT.from_pretrained(out).eval()(idx)[0] - want).abs().max() <= 1e-5


def test_sample_from_merged_equals_sample_with_adapter(merged, adapter):
    out, _, _ = merged
    common = ["--prompt", "The Eagle is a", "--greedy", "--max_new_tokens", "12"]
    assert sample.main(["--merged", str(out), *common]) == sample.main(["--adapter", str(adapter), *common])


def test_check_only_writes_nothing(adapter, tmp_path, capsys):
    (tmp_path / "no_data").mkdir()
    figures = merge.main(["--adapter", str(adapter), "--check-only", "--data", str(tmp_path / "no_data"),
                          "--n_check", "3", "--out", str(tmp_path / "out")])
    assert figures["n"] == 3 and figures["same"] == 3 and figures["max_diff"] <= 1e-4
    assert "3 fixed texts" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["no_data"] and not any((tmp_path / "no_data").iterdir())


def one_line_error(argv):
    """The message merge.main exits with; it must be one line starting with 'error: '."""
    with pytest.raises(SystemExit) as exit_info:
        merge.main([str(a) for a in argv])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_existing_output_folder_is_refused_and_left_untouched(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert "already exists" in one_line_error(["--adapter", adapter, "--out", out])
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep me"


def merge_without_scale(monkeypatch):
    """merge_lora that adds B A instead of (alpha / r) B A: the mistake of forgetting the scale."""
    original = lora.merge_lora

    def wrong(model):
        for layer in lora.lora_layers(model):
            layer.scale = 1.0
        return original(model)

    monkeypatch.setattr(lora, "merge_lora", wrong)


def untransposed_c_proj(monkeypatch):
    """hf_state_dict that forgets to transpose the square attn.c_proj of layer 1 (shapes cannot catch it)."""
    original = merged_checkpoint.hf_state_dict

    def wrong(model):
        tensors = original(model)
        tensors["transformer.h.1.attn.c_proj.weight"] = tensors["transformer.h.1.attn.c_proj.weight"].t()
        return tensors

    monkeypatch.setattr(merged_checkpoint, "hf_state_dict", wrong)


def one_weight_off(monkeypatch):
    """hf_state_dict that writes one number of ln_f's weight 0.03 off."""
    original = merged_checkpoint.hf_state_dict

    def wrong(model):
        tensors = original(model)
        weight = tensors["transformer.ln_f.weight"].clone()
        weight[0] += 0.03
        return {**tensors, "transformer.ln_f.weight": weight}

    monkeypatch.setattr(merged_checkpoint, "hf_state_dict", wrong)


@pytest.mark.parametrize("mistake, check_only", [(merge_without_scale, False), (merge_without_scale, True),
                                                 (untransposed_c_proj, False), (one_weight_off, False)],
                         ids=["no-scale", "no-scale-check-only", "untransposed", "one-weight-off"])
def test_a_wrong_merge_is_caught_and_nothing_is_left(mistake, check_only, adapter, tmp_path, monkeypatch):
    mistake(monkeypatch)
    (tmp_path / "no_data").mkdir()
    argv = ["--adapter", adapter, "--data", tmp_path / "no_data", "--n_check", 2, "--check_tokens", 4]
    argv += ["--check-only"] if check_only else ["--out", tmp_path / "out"]
    assert "the merged model differs from the unmerged one" in one_line_error(argv)
    assert [p.name for p in tmp_path.iterdir()] == ["no_data"]  # no --out, no temporary folder


def test_adapter_for_another_model_is_refused(adapter, tmp_path):
    write_hf_gpt2(tmp_path / "small", n_embd=32)
    message = one_line_error(["--adapter", adapter, "--model", tmp_path / "small", "--out", tmp_path / "out"])
    assert "does not fit" in message and "n_embd 64 vs 32" in message
    assert [p.name for p in tmp_path.iterdir()] == ["small"]


def test_missing_adapter_is_refused(tmp_path):
    message = one_line_error(["--adapter", tmp_path / "none.safetensors", "--out", tmp_path / "out"])
    assert "cannot read" in message and "none.safetensors" in message
    assert not any(tmp_path.iterdir())
