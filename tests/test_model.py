"""model.py is GPT-2: logits equal transformers' GPT2LMHeadModel on the same weights, to 1e-5 in fp32."""

import json

import pytest
import torch
from conftest import write_hf_gpt2

from data.tasks import EOT, get_tokenizer
from model import GPT, GPTConfig, KVCache
from plumbing.errors import UserError
from plumbing.hf_checkpoint import PRETRAINED, hf_state_dict

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
    assert sum(p.numel() for p in model.parameters()) == hf.num_parameters()
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


def test_loss_is_label_smoothed_cross_entropy_over_unmasked_targets_only(tiny_gpt2):
    """With targets, the head runs only where a target is: the logits returned are the full logits at those
    positions, and the loss is (1 - eps) * NLL + eps * mean(-log p) over them, by hand."""
    model = GPT.from_pretrained(tiny_gpt2).eval()
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 50257, (2, 12), generator=g)
    targets = torch.randint(0, 50257, (2, 12), generator=g)
    targets[0, :5] = -1
    targets[1, 9:] = -1
    full, no_loss = model(idx)
    keep = targets != -1
    for eps in (0.0, 0.1):
        logits, loss = model(idx, targets, label_smoothing=eps)
        log_p = torch.log_softmax(full[keep], dim=-1)
        nll = -log_p.gather(1, targets[keep][:, None]).squeeze(1)
        expected = ((1 - eps) * nll + eps * -log_p.mean(dim=-1)).mean()
        assert no_loss is None and logits.shape == (7 + 9, 50257)
        assert (logits - full[keep]).abs().max().item() <= 1e-5
        assert abs(loss.item() - expected.item()) < 1e-5
    assert abs(model(idx, targets, label_smoothing=0.1)[1].item() - model(idx, targets)[1].item()) > 1e-3


def test_cache_in_chunks_equals_one_pass(tiny_gpt2):
    """Feeding 7 + 5 + 1 tokens through the KV cache gives the logits of one 13-token pass."""
    model = GPT.from_pretrained(tiny_gpt2).eval()
    idx = torch.randint(0, 50257, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)[0]
        cache = model.new_cache(2, 13)
        chunks = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 7), (7, 12), (12, 13)]]
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-5


def test_left_padded_rows_equal_each_alone(tiny_gpt2):
    """Prompts of 9, 4 and 1 tokens left-padded to 9 on one cache (pad = 0, 5, 8), then 3 one-token steps and a
    2-token step: every real position's logits are those of the row's tokens run alone, to 1e-5, whatever the pad
    tokens are; and reorder moves a row's pad with its past."""
    model = GPT.from_pretrained(tiny_gpt2).eval()
    g = torch.Generator().manual_seed(7)
    lengths, steps = [9, 4, 1], [1, 1, 1, 2]
    rows = [torch.randint(0, 50257, (n + sum(steps),), generator=g) for n in lengths]
    with torch.no_grad():
        alone = [model(row[None])[0][0] for row in rows]  # (tokens, vocab) each
        for pad_token in (0, 50256):
            cache = model.new_cache(3, 9 + sum(steps) + 1, pad=[9 - n for n in lengths])
            prompts = torch.stack([torch.cat([torch.full((9 - n,), pad_token), row[:n]]) for n, row in
                                   zip(lengths, rows, strict=True)])
            got = [model(prompts, cache=cache)[0]]
            done = list(lengths)
            for T in steps:
                got.append(model(torch.stack([row[d:d + T] for d, row in zip(done, rows, strict=True)]),
                                 cache=cache)[0])
                done = [d + T for d in done]
            got = torch.cat(got, dim=1)  # (3, 9 + 5, vocab)
            for i, n in enumerate(lengths):
                assert (got[i, 9 - n:] - alone[i]).abs().max().item() <= 1e-5
        cache.reorder(torch.tensor([2, 0]))  # row 0 takes row 2's past, row 1 row 0's
        assert cache.pad.tolist() == [8, 0, 8]
        nxt = torch.randint(0, 50257, (2, 1), generator=g)
        out = model(nxt, cache=cache)[0][:, -1]
        for got_row, i in zip(out, [2, 0], strict=True):
            expected = model(torch.cat([rows[i], nxt[[2, 0].index(i)]])[None])[0][0, -1]
            assert (got_row - expected).abs().max().item() <= 1e-5


def test_cache_mask_never_leaves_a_softmax_row_empty():
    """For any mix of left padding, past length and new tokens: every query of KVCache.mask sees at least one slot
    (an empty row is 0 on some torch kernels and NaN on others, and a pad's NaN would reach the real tokens
    through the next layer's keys); a real token sees exactly the real slots up to its own, a pad never the
    future; and positions count from each row's first real token."""
    import itertools

    config = GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=2)
    for pads in itertools.product(range(7), repeat=2):  # a pad may reach past the slots filled so far
        for length, T in itertools.product(range(5), range(1, 4)):
            cache = KVCache(config, 3, 16, "cpu", torch.float32, pad=[*pads, 0])  # row 2 is not asked for
            cache.length = length
            mask, pos = cache.mask(2, T), cache.positions(2, T)
            assert mask.shape == (2, 1, T, length + T) and mask.dtype == torch.bool and pos.shape == (2, T)
            assert mask.any(dim=-1).all(), (pads, length, T)  # the property, whatever the kernel
            key = torch.arange(length + T)
            for b, t in itertools.product(range(2), range(T)):
                query, row = length + t, mask[b, 0, t]
                if query >= pads[b]:
                    assert torch.equal(row, (key >= pads[b]) & (key <= query)), (pads, length, T, b, t)
                    assert pos[b, t] == query - pads[b]
                else:
                    assert not row[query + 1:].any()


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
    from plumbing.files import load_safetensors

    theirs, _ = load_safetensors(tiny_gpt2 / "model.safetensors")
    ours = hf_state_dict(GPT.from_pretrained(tiny_gpt2).state_dict())
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def sampled_probs(monkeypatch, logits, **options):
    """The distribution sample_next hands to torch.multinomial for these logits (1, vocab) and options."""
    from model import sample_next

    seen = []

    def record(probs, num_samples, generator=None):
        seen.append(probs.clone())
        return probs.argmax(dim=-1, keepdim=True)

    monkeypatch.setattr(torch, "multinomial", record)
    sample_next(torch.tensor([logits]), **options)
    return seen[0][0].tolist()


def test_sample_next_samples_from_the_hand_computed_distribution(monkeypatch):
    """Temperature divides the logits once; top-k keeps the k best (and ties with the k-th); top-p keeps the
    smallest set of best tokens whose probability reaches p: exactly p counts as reaching it."""
    import math

    logits = [math.log(p) for p in (0.5, 0.25, 0.125, 0.125)]
    assert sampled_probs(monkeypatch, logits) == pytest.approx([0.5, 0.25, 0.125, 0.125])
    # t = 2: softmax(log p / 2) is proportional to sqrt(p); t applied twice would give p ** (1 / 4)
    roots = [math.sqrt(p) for p in (0.5, 0.25, 0.125, 0.125)]
    assert sampled_probs(monkeypatch, logits, temperature=2.0) == pytest.approx([r / sum(roots) for r in roots])
    assert sampled_probs(monkeypatch, logits, top_k=2) == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert sampled_probs(monkeypatch, logits, top_k=3) == pytest.approx([0.5, 0.25, 0.125, 0.125])  # a tie at k
    assert sampled_probs(monkeypatch, logits, top_p=0.5) == pytest.approx([1, 0, 0, 0])  # 0.5 reaches 0.5
    assert sampled_probs(monkeypatch, logits, top_p=0.6) == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert sampled_probs(monkeypatch, logits, top_p=0.75) == pytest.approx([2 / 3, 1 / 3, 0, 0])
    assert sampled_probs(monkeypatch, logits, top_p=0.9) == pytest.approx([0.5, 0.25, 0.125, 0.125])
    # a confident model: its top token alone is above top_p, and it must stay (never an empty set)
    confident = [math.log(p) for p in (0.05, 0.9, 0.05)]
    assert sampled_probs(monkeypatch, confident, top_p=0.5) == pytest.approx([0, 1, 0])
    assert sampled_probs(monkeypatch, confident, top_p=0.5, temperature=0.5) == pytest.approx([0, 1, 0])


def test_fast_decode_layout_gives_the_same_model(tiny_gpt2):
    """tools.fast_decode's transposed layout: the same weights (as views of (in, out) memory), the head still
    tied, logits to float rounding and the same greedy tokens, with and without the cache."""
    from tools.fast_decode import transposed_weights

    plain = GPT.from_pretrained(tiny_gpt2).eval()
    fast = transposed_weights(GPT.from_pretrained(tiny_gpt2).eval())
    c_attn = fast.transformer.h[0].attn.c_attn.weight
    assert c_attn.shape == (192, 64) and c_attn.stride() == (1, 192)  # (out, in) values, (in, out) memory
    assert fast.lm_head.weight is fast.transformer.wte.weight
    for name, p in plain.state_dict().items():
        assert torch.equal(p, fast.state_dict()[name]), name
    idx = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert (plain(idx)[0] - fast(idx)[0]).abs().max().item() <= 1e-5
    assert torch.equal(plain.generate(idx, 12, temperature=0), fast.generate(idx, 12, temperature=0))


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="MKL's packed GEMM needs a PyTorch built with MKL")
def test_fast_decode_packed_weights_give_the_same_model(tiny_gpt2):
    """tools.fast_decode's packed weights: the same parameters, the head still wte, one-token logits of the packed
    row count (and of others, which take the plain kernel) to float rounding, the same greedy tokens; a model
    with LoRA layers is refused."""
    from lora import apply_lora
    from tools.fast_decode import PackedLinear, packed_weights

    plain = GPT.from_pretrained(tiny_gpt2).eval()
    packed = packed_weights(GPT.from_pretrained(tiny_gpt2).eval(), 3)
    assert isinstance(packed.lm_head, PackedLinear) and packed.lm_head.weight is packed.transformer.wte.weight
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 4 * 2 + 1
    for name, p in plain.state_dict().items():
        assert torch.equal(p, packed.state_dict()[name]), name
    idx = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        for rows in (3, 2):  # 3: packed kernel on the cache's one-token step; 2: the plain fallback
            logits = []
            for model in (plain, packed):
                cache = model.new_cache(rows, 10)
                model(idx[:rows, :8], cache=cache)
                logits.append(model(idx[:rows, 8:], cache=cache)[0])
            assert (logits[0] - logits[1]).abs().max().item() <= 1e-5
    assert torch.equal(plain.generate(idx, 12, temperature=0), packed.generate(idx, 12, temperature=0))
    with pytest.raises(ValueError, match="merge the adapter first"):
        packed_weights(apply_lora(GPT.from_pretrained(tiny_gpt2)), 1)
