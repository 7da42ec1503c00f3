"""GPT-2, the whole model in one file: config, layers, weight loading, generation and beam search.

Read it top to bottom: GPTConfig -> (a speed detail: Linear) -> KV cache -> attention -> MLP -> Block ->
GPT (forward, loss, generate) -> from_pretrained (OpenAI's weights, name for name) -> beam search -> the
tokenizer and device helpers. Parameter names follow OpenAI / Hugging Face (transformer.h.0.attn.c_attn.weight,
...), so a checkpoint loads name for name. Every projection is an nn.Linear (weight shape (out, in)); that
is what lora.py wraps.
"""

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint
from checkpoint import UserError

EOT = 50256  # <|endoftext|>: GPT-2's one special token, used as end of text and as padding


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (the number of learned positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm


# The four checkpoints OpenAI released, by their Hugging Face names.
PRETRAINED = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"


# ----------------------------------------------------------------------------------------------------------
# A speed detail, safe to skip on a first reading: Linear is nn.Linear with a quicker CPU path for one-token
# generation steps. The math is F.linear's.

def linear(x, weight, bias=None):
    """x W^T + b, as F.linear computes it, but quicker on a CPU when x has few rows and no gradient is needed.

    Why: while generating, x is one token per sequence, and the CPU BLAS that torch ships runs such a
    matrix-vector product on a single core. Cutting W's rows into one block per thread and handing the
    blocks to torch.bmm puts every core to work on its own rows (measured: 2.4x faster per token on 2
    cores). Each output is still one row of W times x, so nothing else changes. Everywhere else (a GPU,
    training, a prompt of many tokens) it is plain F.linear.
    """
    rows, threads = x.numel() // x.size(-1), torch.get_num_threads()
    if x.device.type != "cpu" or rows > 16 or threads < 2 or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    n = weight.size(0) // threads * threads  # the rows that split evenly; the few left over go after
    x2 = x.reshape(rows, x.size(-1))
    out = torch.bmm(weight[:n].view(threads, n // threads, -1), x2.t().expand(threads, -1, -1)).view(n, rows)
    if n < weight.size(0):
        out = torch.cat([out, weight[n:] @ x2.t()])
    out = out.t() if bias is None else out.t() + bias
    return out.reshape(*x.shape[:-1], weight.size(0))


class Linear(nn.Linear):
    """nn.Linear computed by linear() above: the same parameters and state_dict, faster CPU generation."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------------------------------------
# The model.

class KVCache:
    """Keys and values of every past position, per layer, so a new token costs one position's forward pass.

    Buffers are allocated once for max_len positions; `length` counts the positions filled so far.
    """

    def __init__(self, config, batch_size, max_len, device, dtype):
        if max_len > config.block_size:
            raise ValueError(f"{max_len} positions asked for, but the model has only {config.block_size}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def store(self, layer, k, v):
        """Write this step's k, v (B, nh, T, hs) after the past ones; return all keys and values so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reorder(self, batch_index):
        """Keep the rows named by batch_index (beam search: each surviving beam takes its parent's past)."""
        self.k = self.k.index_select(1, batch_index)
        self.v = self.v.index_select(1, batch_index)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where position t sees positions <= t: softmax(q k^T / sqrt(hs)) v per head."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # Wq, Wk, Wv fused
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)  # Wo
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs): each head attends on its own hs = C / nh slice
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0 if cache is None else cache.length
        if cache is not None:
            k, v = cache.store(layer, k, v)
        dropout = self.attn_dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)  # one new token sees everything
        else:
            # T new tokens after `past` cached ones: new token i sees positions <= past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: c_proj(gelu(c_fc(x))), 4x wider inside."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        # GPT-2 was trained with the tanh approximation of GELU, so exact logits need it (not the erf form)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    """One transformer layer, pre-LayerNorm: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x))."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: token + position embeddings, n_layer Blocks, a final LayerNorm, and a head tied to wte."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.name_or_path = None  # set by from_pretrained; recorded in adapter files
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std 0.02 / sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())  # the tied head counts once

    def hidden(self, idx, cache=None):
        """The final LayerNorm's output (B, T, n_embd) for tokens idx (B, T) that follow the cached ones."""
        past = 0 if cache is None else cache.length
        T = idx.size(1)
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, label_smoothing=0.0, cache=None, reduction="mean"):
        """logits (B, T, vocab) at every position; loss = mean cross-entropy where targets != -1
        (reduction="sum" gives the sum instead, for averaging over several batches or processes)."""
        logits = self.lm_head(self.hidden(idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                                   ignore_index=-1, label_smoothing=label_smoothing, reduction=reduction)
        return logits, loss

    def loss(self, idx, targets, label_smoothing=0.0, reduction="mean"):
        """The training loss alone: forward's loss, with the head run only where a target is not -1.

        The head (n_embd x vocab) is GPT-2 small's largest matmul, and its softmax spans 50,257 tokens; on E2E
        the MR prompt and the padding, whose targets are -1, are about half the positions.
        """
        hidden = self.hidden(idx)
        keep = targets != -1
        logits = self.lm_head(hidden[keep])  # (number of targets, vocab)
        return F.cross_entropy(logits.float(), targets[keep], label_smoothing=label_smoothing, reduction=reduction)

    def new_cache(self, batch_size, max_len):
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
                 use_cache=True, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens; temperature 0 is greedy.

        Once a row has produced eos_token it is padded with eos_token, and generation stops when every
        row has. With use_cache=False every step runs the whole sequence again (the slow, obvious way).
        """
        B, T = idx.shape
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        step_input = idx
        for _ in range(max_new_tokens):
            logits = self.lm_head(self.hidden(step_input if use_cache else idx, cache)[:, -1, :]).float()
            next_token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token is not None:
                next_token = torch.where(finished, eos_token, next_token)
                finished |= next_token == eos_token
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            step_input = next_token[:, None]
            if eos_token is not None and finished.all():
                break
        return idx

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """GPT-2 from OpenAI's weights: one of PRETRAINED (downloaded once into the cache folder), a folder
        with model.safetensors (and an optional Hugging Face config.json), or a .safetensors file."""
        path, config_file = _locate_checkpoint(str(name_or_path))
        tensors, _ = checkpoint.load_safetensors(path)
        tensors = _to_our_names(tensors)
        config = _read_config(config_file, tensors, str(name_or_path), path)
        config.dropout = dropout
        with torch.device("meta"):  # shapes only: the random init would be thrown away (and for gpt2-xl, slow)
            model = cls(config)
        ours = model.state_dict()
        ours.pop("lm_head.weight")  # tied to wte
        missing = sorted(set(ours) - set(tensors))
        unexpected = sorted(set(tensors) - set(ours))
        if missing or unexpected:
            raise UserError(f"{path} is not a GPT-2 checkpoint of this shape: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        for name, tensor in tensors.items():
            if tensor.shape != ours[name].shape:
                raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, "
                                f"expected {tuple(ours[name].shape)}")
        model.load_state_dict({**tensors, "lm_head.weight": tensors["transformer.wte.weight"]}, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # tie again: assign made them two parameters
        model.name_or_path = str(name_or_path)
        return model


# ----------------------------------------------------------------------------------------------------------
# Sampling: the next token from the last position's logits.

def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, vocab): argmax when temperature is 0, else a sample from
    softmax(logits / temperature) restricted to the top_k tokens and to the smallest set of tokens
    whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p (so the first token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------
# Loading and writing: between our parameter names and the OpenAI / Hugging Face layout.

# OpenAI's code stored these four weights as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def _locate_checkpoint(name_or_path):
    """(model.safetensors path, config.json path or None), downloading a named model when needed."""
    if name_or_path in PRETRAINED:
        folder = checkpoint.cache_dir() / name_or_path
        file = checkpoint.download(HUB_URL.format(name=name_or_path), folder / "model.safetensors",
                                   desc=f"{name_or_path} weights")
        return file, None
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise UserError(f"{path} has no model.safetensors")
        config = path / "config.json"
        return path / "model.safetensors", config if config.is_file() else None
    if path.is_file():
        config = path.parent / "config.json"
        return path, config if config.is_file() else None
    raise UserError(f"unknown model {name_or_path!r}: use one of {', '.join(PRETRAINED)}, "
                    f"or a folder or .safetensors file")


def _to_our_names(tensors):
    """Checkpoint tensors under our names: 'transformer.' prefix added where missing, attention-mask
    buffers dropped, Conv1D weights transposed to nn.Linear's (out, in), lm_head dropped (tied to wte)."""
    ours = {}
    for name, tensor in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the causal mask stored as a buffer by old code: not a parameter
        if name == "lm_head.weight":
            continue  # GPT-2 ties its head to wte; checked below
        if not name.startswith("transformer."):
            name = "transformer." + name
        if name.endswith(CONV1D_WEIGHTS):
            # c_attn.weight and c_fc.weight would fail on shape if left as they are, but c_proj in the
            # attention is square: only this transpose (and a test on values) keeps it right
            tensor = tensor.t()
        ours[name] = tensor.float().contiguous()
    head = tensors.get("lm_head.weight")
    wte = ours.get("transformer.wte.weight")
    if head is not None and wte is not None and not torch.equal(head.float(), wte):
        raise UserError("this checkpoint's lm_head is not tied to wte; GPT-2 ties them")
    return ours


def _read_config(config_file, tensors, name_or_path, path):
    """GPTConfig from config.json, else from the table of the four released models."""
    if config_file is not None:
        try:
            hf = json.loads(Path(config_file).read_text())
            if hf.get("n_inner") not in (None, 4 * hf["n_embd"]) or hf.get("activation_function") != "gelu_new":
                raise UserError(f"{config_file}: only GPT-2's 4x MLP with gelu_new is supported")
            return GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"],
                             n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{config_file} is not a GPT-2 config.json ({e!r})") from None
    if name_or_path in PRETRAINED:
        return GPTConfig(**PRETRAINED[name_or_path])
    # A bare file: it is one of the released models if its shapes say so (n_head cannot be read off shapes).
    wte = tensors.get("transformer.wte.weight")
    n_layer = len({n.split(".")[2] for n in tensors if n.startswith("transformer.h.")})
    for shape in PRETRAINED.values():
        if wte is not None and tuple(wte.shape) == (50257, shape["n_embd"]) and n_layer == shape["n_layer"]:
            return GPTConfig(**shape)
    raise UserError(f"{path}: no config.json beside it and its shapes are none of {', '.join(PRETRAINED)}")



def hf_state_dict(state_dict):
    """GPT-2 weights as OpenAI / Hugging Face store them, the inverse of loading: the four Conv1D weights
    transposed back to (in, out), and no lm_head (tied to wte, tied again on loading)."""
    tensors = {}
    for name, tensor in state_dict.items():
        if name == "lm_head.weight":
            continue
        tensors[name] = tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
    return tensors


def hf_config(config):
    """A config.json that transformers reads as GPT2LMHeadModel (and GPT.from_pretrained reads too)."""
    if not config.bias:
        raise UserError("GPT-2 checkpoints always have biases; this model has none")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # the old name of n_positions, still read by some tools
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # None means 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation of GELU that GPT-2 was trained with
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.1,  # OpenAI's training dropout, as in the released configs; off at inference
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "bos_token_id": EOT,
        "eos_token_id": EOT,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }


# ----------------------------------------------------------------------------------------------------------
# Beam search: how the LoRA paper decoded E2E (beam 10, a length penalty, no repeated 4-grams). It follows
# Hugging Face transformers' generate(num_beams=..., early_stopping=False) rule for rule, so the two give the
# same tokens; the rules are spelled out in the docstring because each one changes which text comes out.

@torch.no_grad()
def beam_search(model, prompt, beam=10, max_new_tokens=64, length_penalty=0.9, no_repeat_ngram=4,
                eos_token=EOT, use_cache=True):
    """The best continuation of one prompt (a list of token ids or a 1-D tensor), as a list of new token
    ids without the final eos_token.

    A hypothesis scores  sum of log p(token | all tokens before it) / length ** length_penalty,  where the
    sum and the length run over its new tokens only (its eos included, the prompt not). The search:
      - keeps `beam` live hypotheses. Each step extends every one of them by every token and ranks these
        candidates by summed log-probability (not yet divided by the length); the best 2 * beam are kept.
      - a candidate that ends in eos_token is finished if it ranks among the first `beam` (one ranked lower
        is dropped): it is stored with its score, and only the best `beam` finished ones are kept. The best
        `beam` candidates that do not end become the live hypotheses of the next step. (Why 2 * beam: each
        hypothesis gives at most one eos candidate, so at least `beam` candidates are left to go on.)
      - no_repeat_ngram = n > 0: a token that would make an n-gram already present in the hypothesis,
        prompt included, gets log-probability -inf (after the softmax, so the others are not renormalized).
      - it stops after max_new_tokens (then the best `beam` candidates all count as finished), or as soon as
        `beam` hypotheses are finished and the best live one, divided by its current length ** length_penalty,
        scores no better than the worst finished one (a heuristic: it assumes growing would not help).
    The answer is the best-scoring finished hypothesis. max_new_tokens is capped at block_size - len(prompt).
    With use_cache=False every step runs the whole sequences again (the slow, obvious way, for checking).
    """
    prompt = [int(token) for token in prompt]
    block_size = model.config.block_size
    if not 0 < len(prompt) < block_size:
        raise UserError(f"the prompt has {len(prompt)} tokens; beam search needs 1 to {block_size - 1} "
                        f"(the model's block_size is {block_size})")
    if beam < 1:
        raise ValueError(f"beam must be at least 1, got {beam}")
    max_new_tokens = min(max_new_tokens, block_size - len(prompt))
    device = model.transformer.wte.weight.device
    cache = model.new_cache(1, len(prompt) + max_new_tokens) if use_cache else None

    hypotheses = [prompt] * beam  # the live sequences, prompt included (the n-gram rule reads the prompt too)
    # Every hypothesis starts as the same prompt. Only the first copy starts at score 0, the others at -1e9, so
    # the first step takes its candidates from one copy instead of picking each token `beam` times.
    scores = torch.full((beam,), -1e9, device=device)
    scores[0] = 0.0
    finished = []  # (score, new tokens), best first, at most `beam` of them
    step_input = torch.tensor([prompt], device=device)  # first step: the prompt, run once (batch 1)
    for step in range(max_new_tokens):
        logits = model.lm_head(model.hidden(step_input, cache)[:, -1, :]).float()  # the last position only
        if step == 0:  # every beam continues the same prompt: share its logits, copy its past to each beam
            logits = logits.expand(beam, -1)
            if cache is not None:
                cache.reorder(torch.zeros(beam, dtype=torch.long, device=device))
        log_probs = F.log_softmax(logits, dim=-1)
        if no_repeat_ngram > 0:
            banned = repeated_ngram_mask(hypotheses, no_repeat_ngram, log_probs.size(-1)).to(device)
            log_probs = log_probs.masked_fill(banned, float("-inf"))

        # Candidate (hypothesis b, token t) sits at b * vocab + t; keep the 2 * beam best, best first.
        vocab = log_probs.size(-1)
        top_scores, top_index = (scores[:, None] + log_probs).view(-1).topk(2 * beam)
        parents, tokens = (top_index // vocab).tolist(), (top_index % vocab).tolist()
        length = step + 1  # new tokens in every candidate
        last_step = step == max_new_tokens - 1
        ends = [last_step or token == eos_token for token in tokens]
        normalized = (top_scores / length**length_penalty).tolist()
        for rank in range(beam):  # only the top `beam` candidates may finish
            if ends[rank]:
                finished.append((normalized[rank], hypotheses[parents[rank]][len(prompt):] + [tokens[rank]]))
        finished = sorted(finished, key=lambda f: -f[0])[:beam]  # stable: among equal scores the older stays
        if last_step:
            break

        keep = [rank for rank in range(2 * beam) if not ends[rank]][:beam]
        hypotheses = [hypotheses[parents[rank]] + [tokens[rank]] for rank in keep]
        scores = top_scores[keep]
        best_live = (scores[0] / length**length_penalty).item()
        if len(finished) == beam and best_live <= finished[-1][0]:
            break  # the heuristic: no live hypothesis is expected to beat the finished ones

        if cache is not None:  # each kept hypothesis takes its parent's past, then runs only its new token
            cache.reorder(torch.tensor([parents[rank] for rank in keep], device=device))
            step_input = torch.tensor([[h[-1]] for h in hypotheses], device=device)
        else:
            step_input = torch.tensor(hypotheses, device=device)

    best = finished[0][1]
    return best[:-1] if eos_token is not None and best[-1] == eos_token else best


def repeated_ngram_mask(sequences, n, vocab_size):
    """(len(sequences), vocab_size) bool: True where the token would repeat an n-gram of its sequence.

    The next token completes the n-gram (last n-1 tokens, token); so every earlier n-gram whose first n-1
    tokens equal the sequence's last n-1 tokens bans its own last token. (n = 1 bans every token seen.)
    """
    banned = torch.zeros(len(sequences), vocab_size, dtype=torch.bool)
    for row, seq in enumerate(sequences):
        if len(seq) < n:
            continue  # no complete n-gram yet
        suffix = seq[len(seq) - n + 1:]
        for start in range(len(seq) - n + 1):
            if seq[start:start + n - 1] == suffix:
                banned[row, seq[start + n - 1]] = True
    return banned


# ----------------------------------------------------------------------------------------------------------
# The tokenizer and the device: one of each, used the same way by every script.

@functools.cache
def get_tokenizer():
    """GPT-2's byte-pair encoding (tiktoken's 'gpt2'); "\\n\\n" is token 628, <|endoftext|> is EOT."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises several kinds when it cannot fetch its two files
        raise UserError(f"could not load the gpt2 tokenizer ({type(e).__name__}); connect to the network "
                        f"once, or set TIKTOKEN_CACHE_DIR to a folder holding its files") from None


def pick_device(requested="auto"):
    """'auto' -> cuda if present, then mps, then cpu; anything else is taken as asked."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(requested, device):
    """'auto' -> bfloat16 on a GPU that supports it, else float32."""
    if requested == "auto":
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
