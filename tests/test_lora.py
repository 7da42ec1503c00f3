"""lora.py: h = W0 x + (alpha/r) B A x on chosen projections, with exact merge / unmerge and adapter files."""

import json
import struct

import pytest
import torch

from checkpoints.adapters import put_adapter, read_adapter, read_config, save_adapter
from checkpoints.loading import trainable_report
from lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    config_of,
    lora_layers,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)
from model import GPT, GPTConfig
from plumbing.errors import UserError
from plumbing.hf_checkpoint import PRETRAINED


def random_b(model, seed=0, std=0.05):
    """Give every B a random non-zero value, as training would, so that the update is not zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tokens(n=24, batch=2, seed=0):
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_adapted_model_equals_base_before_training(tiny_gpt2):
    model = GPT.from_pretrained(tiny_gpt2).eval()
    idx = tokens()
    with torch.no_grad():
        before = model(idx)[0]
        apply_lora(model, LoRAConfig(rank=4, alpha=32, targets=("q", "k", "v", "o", "mlp")))
        after = model(idx)[0]
    assert torch.equal(before, after)  # B = 0, so B A x adds exactly zero


@pytest.mark.parametrize("targets", [("q", "v", "o"), ("o",), ("mlp",), ("k",)])
def test_only_lora_parameters_learn_and_base_stays_bit_identical(tiny_gpt2, targets):
    """Also with a single target: then the first adapted layer's input needs no gradient, and its frozen
    output must still take the update (an in-place add there is refused by autograd)."""
    torch.manual_seed(0)
    model = apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(rank=4, targets=targets, dropout=0.1))
    base = {n: p.clone() for n, p in model.state_dict().items() if ".lora." not in n}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.01)
    idx = tokens(seed=1)
    for _ in range(3):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == set(lora_state_dict(model))
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, base[n]) for n, p in model.state_dict().items() if n in base)
    assert any(p.abs().sum() > 0 for n, p in lora_state_dict(model).items() if n.endswith("lora_B"))


def count_trainable(name, rank, targets):
    with torch.device("meta"):  # shapes only: no memory, no time
        model = apply_lora(GPT(GPTConfig(**PRETRAINED[name])), LoRAConfig(rank=rank, targets=targets))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_trainable_counts_match_the_formula_and_the_papers_budget():
    # r (d_in + d_out) per adapted matrix, per layer: 4 * (768 + 768) * 2 * 12 = 147,456
    assert count_trainable("gpt2", 4, ("q", "v")) == 147_456
    assert count_trainable("gpt2-medium", 4, ("q", "v")) == 393_216
    # Table 5: one type at r=8, two at r=4, all four at r=2 spend the same budget
    budgets = {count_trainable("gpt2", 8, (t,)) for t in "qkvo"}
    budgets |= {count_trainable("gpt2", 4, pair) for pair in [("q", "k"), ("q", "v")]}
    budgets.add(count_trainable("gpt2", 2, ("q", "k", "v", "o")))
    assert budgets == {147_456}


def test_trainable_report(tiny_gpt2):
    model = apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(rank=4, targets=("q", "v")))
    lora = 2 * 4 * (64 + 64) * 2  # two matrices, r (in + out) each, two layers
    total = sum(p.numel() for p in model.parameters())
    assert trainable_report(model) == f"trainable {lora:,} of {total:,} ({100 * lora / total:.3f}%)"


def test_merged_equals_unmerged_and_unmerge_restores_w(tiny_gpt2):
    model = apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(rank=8, targets=("q", "k", "v", "o", "mlp"))).eval()
    random_b(model)
    w0 = {n: p.clone() for n, p in model.named_parameters() if n.endswith("weight") and ".lora." not in n}
    idx = tokens(seed=2)
    with torch.no_grad():
        unmerged = model(idx)[0]
        merge_lora(model)
        once = {n: p.clone() for n, p in model.named_parameters()}
        merge_lora(model)  # a second merge must not add the update again
        merged = model(idx)[0]
    assert all(torch.equal(p, once[n]) for n, p in model.named_parameters())
    assert (merged - unmerged).abs().max().item() <= 1e-5
    assert not torch.equal(once["transformer.h.0.attn.c_attn.weight"], w0["transformer.h.0.attn.c_attn.weight"])
    unmerge_lora(model)
    assert max((p - w0[n]).abs().max().item() for n, p in model.named_parameters() if n in w0) <= 1e-6


def test_merge_in_bf16_accumulates_in_fp32(tiny_gpt2):
    """In bf16 the merged weight must be W0 + (alpha/r) B A computed in fp32 and rounded once.

    Rounding the product to bf16 first and then adding (the naive way) rounds twice. The logits of merged
    and unmerged bf16 models still differ, because the unmerged model rounds W0 x and B A x separately:
    bf16 keeps 8 significant bits, so a logit of size ~2 moves in steps of 2^-6 = 0.016; we allow 0.05,
    about three such steps (measured: 0.0195), against 1e-5 in fp32 (measured: 1.2e-6).
    """
    model = apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(rank=4, targets=("q", "v"))).to(torch.bfloat16).eval()
    random_b(model, std=0.2)
    layer = model.transformer.h[0].attn.c_attn
    w0 = layer.weight.detach().clone()
    update = layer.lora["q"]
    expected = (w0[:64].float() + layer.scale * (update.lora_B.float() @ update.lora_A.float())).to(torch.bfloat16)
    idx = tokens(seed=3)
    with torch.no_grad():
        unmerged = model(idx)[0].float()
        merge_lora(model)
        merged = model(idx)[0].float()
    assert torch.equal(layer.weight[:64], expected)
    assert torch.equal(layer.weight[64:128], w0[64:128])  # the k third is not touched
    assert merged.abs().max().item() < 4  # the size the tolerance assumes
    assert (merged - unmerged).abs().max().item() <= 0.05


def test_choosing_q_changes_only_the_q_third_of_c_attn(tiny_gpt2):
    model = GPT.from_pretrained(tiny_gpt2).eval()
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model.transformer.h[1].attn.c_attn(x)
        apply_lora(model, LoRAConfig(targets=("q",)))
        random_b(model)
        after = model.transformer.h[1].attn.c_attn(x)
    assert not torch.allclose(before[..., :64], after[..., :64])
    assert torch.equal(before[..., 64:], after[..., 64:])  # k and v thirds bit for bit


def test_the_update_is_alpha_over_r_times_b_a_x():
    base = torch.nn.Linear(6, 9)
    layer = LoRALinear(base, {"v": (6, 9)}, LoRAConfig(rank=2, alpha=8))
    rs = LoRALinear(base, {"v": (6, 9)}, LoRAConfig(rank=2, alpha=8, rslora=True))
    assert layer.scale == 4.0 and rs.scale == pytest.approx(8 / 2**0.5)
    with torch.no_grad():
        layer.lora["v"].lora_B.fill_(0.5)
    x = torch.randn(3, 6)
    expected = base(x).detach()
    expected[:, 6:] += 4.0 * x @ layer.lora["v"].lora_A.T @ layer.lora["v"].lora_B.T
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_dropout_acts_on_the_lora_branch_only(tiny_gpt2):
    model = apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(targets=("q", "v"), dropout=0.5)).train()
    idx = tokens(seed=5)
    with torch.no_grad():
        base_out = model(idx)[0]  # B = 0: the dropped-out branch adds nothing, the base path has no dropout
        assert torch.equal(base_out, model.eval()(idx)[0])
        random_b(model)
        model.train()
        assert not torch.equal(model(idx)[0], model(idx)[0])  # the LoRA branch is dropped at random
        model.eval()
        assert torch.equal(model(idx)[0], model(idx)[0])


def test_adapter_round_trip_is_bit_exact_and_metadata_is_plain_json(tiny_gpt2, tmp_path):
    config = LoRAConfig(rank=4, alpha=16, targets=("q", "v", "mlp"), dropout=0.1)
    model = apply_lora(GPT.from_pretrained(tiny_gpt2), config)
    random_b(model)
    path = tmp_path / "adapter.safetensors"
    save_adapter(model, path)
    # the settings are readable with nothing but the standard library
    raw = path.read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    meta = header["__metadata__"]
    assert (meta["rank"], meta["alpha"], meta["targets"], meta["n_embd"]) == ("4", "16", "q,v,mlp", "64")
    assert meta["base_model"] == str(tiny_gpt2)
    assert set(header) - {"__metadata__"} == set(lora_state_dict(model))
    fresh = load_adapter(GPT.from_pretrained(tiny_gpt2), path)  # applies LoRA from the file's settings
    assert config_of(fresh) == config and read_config(path).lora == config
    theirs = lora_state_dict(fresh)
    assert all(torch.equal(p, theirs[n]) for n, p in lora_state_dict(model).items())
    assert read_config(path).lora.alpha == 16.0
    idx = tokens(seed=6)
    with torch.no_grad():
        assert torch.equal(model.eval()(idx)[0], fresh.eval()(idx)[0])


def load_adapter(model, path):
    """The adapter file at path put on model, as the scripts load it."""
    tensors, info = read_adapter(path)
    return put_adapter(model, tensors, info, path)


def test_adapter_for_another_model_or_other_targets_is_refused(tiny_gpt2, tmp_path):
    from conftest import write_hf_gpt2

    path = tmp_path / "adapter.safetensors"
    save_adapter(apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(targets=("q", "v"))), path)
    write_hf_gpt2(tmp_path / "wider", n_embd=96, n_head=4)
    with pytest.raises(UserError, match="does not fit.*n_embd 64 vs 96"):
        load_adapter(GPT.from_pretrained(tmp_path / "wider"), path)
    with pytest.raises(UserError, match="targets"):
        load_adapter(apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(targets=("q", "k"))), path)
    with pytest.raises(UserError, match="rank"):
        load_adapter(apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(rank=8, targets=("q", "v"))), path)
    not_adapter = tmp_path / "model.safetensors"
    not_adapter.write_bytes((tiny_gpt2 / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="not a lora-gpt adapter"):
        load_adapter(GPT.from_pretrained(tiny_gpt2), not_adapter)


def test_an_adapter_whose_tensors_are_not_those_of_its_header_says_how(tiny_gpt2, tmp_path):
    """A file whose header says another rank or other targets than its tensors have (hand-made, or mixed up):
    the error names the rank of each, or the first tensor missing or left over."""
    from plumbing.files import load_safetensors, save_safetensors

    good = tmp_path / "good.safetensors"
    save_adapter(apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(rank=4, targets=("q", "v"))), good)
    tensors, metadata = load_safetensors(good)
    cases = {"rank": ("8", "its tensors have rank 4, but its header says rank 8"),
             "targets": ("q,v,o", "it lacks transformer.h.0.attn.c_proj.lora.o.lora_A (and 3 more), which its "
                                  "header's targets (q,v,o) call for")}
    for key, (value, message) in cases.items():
        path = tmp_path / f"{key}.safetensors"
        save_safetensors(tensors, path, {**metadata, key: value})
        with pytest.raises(UserError) as err:
            load_adapter(GPT.from_pretrained(tiny_gpt2), path)
        assert str(err.value) == f"{path} does not hold the tensors its header describes: {message}"


def test_bad_targets_are_refused(tiny_gpt2):
    with pytest.raises(UserError, match="unknown LoRA targets"):
        apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(targets=("q", "x")))
    model = apply_lora(GPT.from_pretrained(tiny_gpt2))
    with pytest.raises(UserError, match="already has LoRA"):
        apply_lora(model)
    assert len(lora_layers(model)) == 2


def test_merge_then_unmerge_forwards_as_never_merged_and_trains(tiny_gpt2):
    """After merge and unmerge the layer is unmerged again: the update is added in forward (not skipped), and
    gradients reach A and B."""
    torch.manual_seed(0)
    model = apply_lora(GPT.from_pretrained(tiny_gpt2), LoRAConfig(rank=4, alpha=32, targets=("q", "v", "o")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.05)
    idx = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
    never, _ = model(idx)
    merge_lora(model)
    unmerge_lora(model)
    again, _ = model(idx)
    base, _ = GPT.from_pretrained(tiny_gpt2)(idx)
    assert (again - never).abs().max().item() <= 1e-5 and (never - base).abs().max().item() > 1e-3
    again.square().mean().backward()
    grads = [p.grad for name, p in model.named_parameters() if ".lora." in name]
    assert len(grads) == 2 * 3 * 2 and all(g is not None and g.abs().sum() > 0 for g in grads)
