"""model.py is GPT-2: logits equal transformers' GPT2LMHeadModel on the same weights, to 1e-5 in fp32."""

import json

import pytest
import torch
from conftest import write_hf_gpt2

from checkpoint import UserError
from model import EOT, GPT, PRETRAINED, get_tokenizer, hf_state_dict

SHAPES = [
    dict(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=128),  # the real vocabulary
    dict(n_layer=3, n_head=3, n_embd=48, vocab_size=300, n_positions=32),  # head count not a power of two
    dict(n_layer=1, n_head=5, n_embd=40, vocab_size=97, n_positions=16),  # odd everything, short block
]


def max_logit_diff(ours, hf, idx):
    with torch.no_grad():
        return (ours(idx)[0] - hf(idx).logits).abs().max().item()


@pytest.mark.parametrize("shape", SHAPES, ids=["vocab50257", "3heads", "5heads-short"])
def test_logits_match_transformers(tmp_path, shape):
    hf = write_hf_gpt2(tmp_path, seed=1, **shape)
    model = GPT.from_pretrained(tmp_path).eval()
    assert model.config.n_head == shape["n_head"] and model.config.block_size == shape["n_positions"]
    assert model.lm_head.weight is model.transformer.wte.weight  # tied: one matrix, counted once
    assert model.num_params() == hf.num_parameters()
    idx = torch.randint(0, shape["vocab_size"], (3, shape["n_positions"]), generator=torch.Generator().manual_seed(0))
    assert max_logit_diff(model, hf, idx) <= 1e-5


def hub_style_file(hf, path):
    """Write hf's weights the way the hub's gpt2 file has them: no 'transformer.' prefix, the attention-mask
    buffers h.N.attn.bias / masked_bias stored, and no lm_head.weight."""
    from safetensors.torch import save_file

    n_pos = hf.config.n_positions
    tensors = {}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensors[name.removeprefix("transformer.")] = tensor.contiguous()
    for i in range(hf.config.n_layer):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, n_pos, n_pos))
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_hub_style_file_loads(tmp_path):
    hf = write_hf_gpt2(tmp_path / "hf", seed=2)
    folder = tmp_path / "hub"
    folder.mkdir()
    hub_style_file(hf, folder / "model.safetensors")
    (folder / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    model = GPT.from_pretrained(folder).eval()
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    assert max_logit_diff(model, hf, idx) <= 1e-5
    # a bare .safetensors file with a config.json beside it loads the same
    assert max_logit_diff(GPT.from_pretrained(folder / "model.safetensors").eval(), hf, idx) <= 1e-5


def test_missing_transpose_of_square_c_proj_is_caught(tmp_path):
    """attn.c_proj is square, so a forgotten transpose raises no shape error: only the values show it."""
    from safetensors.torch import load_file, save_file

    hf = write_hf_gpt2(tmp_path, seed=3)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["transformer.h.0.attn.c_proj.weight"] = tensors["transformer.h.0.attn.c_proj.weight"].t().contiguous()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(2))
    assert max_logit_diff(GPT.from_pretrained(tmp_path).eval(), hf, idx) > 1e-3


def test_bare_file_without_config_is_a_clear_error(tmp_path):
    write_hf_gpt2(tmp_path / "hf", seed=4)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "weights.safetensors").write_bytes((tmp_path / "hf" / "model.safetensors").read_bytes())
    with pytest.raises(UserError, match="no config.json"):
        GPT.from_pretrained(bare / "weights.safetensors")


def test_unknown_name_lists_the_four_models():
    with pytest.raises(UserError) as err:
        GPT.from_pretrained("gpt3")
    assert all(name in str(err.value) for name in PRETRAINED)


def test_config_json_of_another_architecture_is_refused(tmp_path):
    write_hf_gpt2(tmp_path, seed=5)
    config = json.loads((tmp_path / "config.json").read_text())
    config["activation_function"] = "relu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="gelu_new"):
        GPT.from_pretrained(tmp_path)


def test_loss_is_mean_cross_entropy_over_unmasked_targets(tiny_gpt2):
    model = GPT.from_pretrained(tiny_gpt2).eval()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50257, (2, 12), generator=g)
    targets = torch.randint(0, 50257, (2, 12), generator=g)
    targets[0, :5] = -1
    targets[1, 9:] = -1
    logits, loss = model(idx, targets)
    keep = targets != -1
    expected = -torch.log_softmax(logits[keep], dim=-1).gather(1, targets[keep][:, None]).mean()
    assert keep.sum() == 7 + 9 and abs(loss.item() - expected.item()) < 1e-5


def test_training_loss_equals_forward_loss_and_its_gradient(tiny_gpt2):
    """model.loss runs the head only where a target is; value and gradient equal forward's."""
    model = GPT.from_pretrained(tiny_gpt2)
    g = torch.Generator().manual_seed(7)
    idx = torch.randint(0, 50257, (3, 10), generator=g)
    targets = torch.randint(0, 50257, (3, 10), generator=g)
    targets[:, :4] = -1
    targets[2, 7:] = -1
    for reduction in ("mean", "sum"):
        _, full = model(idx, targets, label_smoothing=0.1, reduction=reduction)
        (grad_full,) = torch.autograd.grad(full, model.transformer.h[0].attn.c_attn.weight)
        fast = model.loss(idx, targets, label_smoothing=0.1, reduction=reduction)
        (grad_fast,) = torch.autograd.grad(fast, model.transformer.h[0].attn.c_attn.weight)
        assert abs(fast.item() - full.item()) <= 1e-5 * abs(full.item())
        assert (grad_fast - grad_full).abs().max().item() <= 1e-6 * max(1.0, grad_full.abs().max().item())


def test_cache_in_chunks_equals_one_pass(tiny_gpt2):
    """Feeding 7 + 5 + 1 tokens through the KV cache gives the logits of one 13-token pass."""
    model = GPT.from_pretrained(tiny_gpt2).eval()
    idx = torch.randint(0, 50257, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_cache(2, 13)
        chunks = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 7), (7, 12), (12, 13)]]
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-5


def test_greedy_generate_cache_equals_no_cache_equals_transformers(tmp_path):
    hf = write_hf_gpt2(tmp_path, seed=6)
    model = GPT.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(5))
    with_cache = model.generate(prompt, 20, temperature=0)
    without_cache = model.generate(prompt, 20, temperature=0, use_cache=False)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                         pad_token_id=EOT, eos_token_id=None)
    assert with_cache.shape == (2, 26)
    assert torch.equal(with_cache, without_cache)
    assert torch.equal(with_cache, theirs)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_gpt2):
    model = GPT.from_pretrained(tiny_gpt2).eval()
    prompt = torch.tensor([[EOT]])
    a = model.generate(prompt, 10, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 10, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 10, temperature=0)
    assert torch.equal(model.generate(prompt, 10, top_k=1, generator=torch.Generator().manual_seed(1)), greedy)


def test_eos_stops_generation_and_pads(tiny_gpt2):
    model = GPT.from_pretrained(tiny_gpt2).eval()
    prompt = torch.tensor([[1, 2, 3]])
    first = model.generate(prompt, 1, temperature=0)[0, -1].item()
    out = model.generate(prompt, 10, temperature=0, eos_token=first)
    assert out.shape == (1, 4) and out[0, -1].item() == first


@pytest.mark.tokenizer
def test_tokenizer():
    enc = get_tokenizer()
    assert enc.encode_ordinary("\n\n") == [628]
    assert enc.eot_token == EOT
    text = "name[Café Rouge], priceRange[£20-25] — naïve 日本語 🙂"
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_hf_state_dict_is_the_exact_inverse_of_loading(tiny_gpt2):
    """Our weights written back in the Hugging Face layout are the file they came from, bit for bit."""
    from checkpoint import load_safetensors

    theirs, _ = load_safetensors(tiny_gpt2 / "model.safetensors")
    ours = hf_state_dict(GPT.from_pretrained(tiny_gpt2).state_dict())
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


@pytest.mark.parametrize("rows", [1, 8, 20])
@pytest.mark.parametrize("out_features", [12, 7])
def test_cpu_linear_for_few_rows_equals_f_linear(rows, out_features):
    """model.linear splits W's rows across threads for one-token steps; it must give F.linear's numbers
    (with 2 threads, so that the split path runs; 20 rows take the plain path)."""
    import torch.nn.functional as F

    from model import linear

    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 1, 16, generator=g), torch.randn(out_features, 16, generator=g)
    b = torch.randn(out_features, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            for bias in (b, None):
                ours, theirs = linear(x, w, bias), F.linear(x, w, bias)
                assert ours.shape == theirs.shape == (rows, 1, out_features)
                assert (ours - theirs).abs().max().item() <= 1e-5
    finally:
        torch.set_num_threads(threads)
