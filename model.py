"""GPT-2 (Radford et al., 2019), the whole model in one file, read top to bottom:

    GPTConfig -> CausalSelfAttention -> MLP -> Block -> KVCache -> GPT (forward, generate) -> from_pretrained

Parameter names follow OpenAI / Hugging Face (transformer.h.0.attn.c_attn.weight, ...), so a checkpoint
loads name for name. Every projection is an nn.Linear, weight (out, in): that is what lora.py wraps.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The project's lowest layer, which imports nothing above it: from_pretrained reads OpenAI's files through it
# (finding, downloading, checking them is plumbing; the transpose and the tied head below are the lesson).
from plumbing import hf_checkpoint
from plumbing.errors import UserError


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (the number of learned positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm


class CausalSelfAttention(nn.Module):
    """Multi-head attention, per head: y = softmax(q k^T / sqrt(hs) + M) v, where M is 0 where mask lets a query
    see a key and -inf elsewhere; then the heads side by side through c_proj. mask None: key <= query (causal)."""

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # Wq, Wk, Wv fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # Wo
        self.attn_dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask=None, cache=None, layer=0):
        """x (B, T, C) -> (B, T, C). With a cache, x is T new positions after the cached ones, and mask (B, 1, T, S)
        says which of all S positions so far each new one sees (KVCache.mask builds it)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        # (B, T, C) -> (B, nh, T, hs): each head attends on its own hs = C / nh slice
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.store(layer, k, v)  # now every position so far: (B, nh, S, hs)
        dropout = self.attn_dropout if self.training else 0.0  # on the attention weights, after the softmax
        # scores, mask, softmax, weighted sum of values: one fused kernel (without a mask, its causal one)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: c_proj(gelu(c_fc(x))), 4x wider inside."""

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
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

    def forward(self, x, mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), mask, cache, layer)
        return x + self.mlp(self.ln_2(x))


class KVCache:
    """Every layer's k, v of the `length` slots so far, so that a new token costs one position's forward. Row b's
    first pad[b] slots may be left padding, which no real token sees; a forward of B rows uses the first B."""

    def __init__(self, config, batch_size, max_len, device, dtype, pad=None):
        if max_len > config.block_size:
            raise UserError(f"{max_len} positions asked for, but the model has only {config.block_size}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.pad = torch.zeros(batch_size, dtype=torch.long, device=device)  # no padding: every slot is real
        if pad is not None:
            self.pad[:] = torch.as_tensor(pad)

    def store(self, layer, k, v):
        """Write this step's k, v (B, nh, T, hs) after the past ones; return all keys and values so far."""
        B, start, end = k.size(0), self.length, self.length + k.size(2)
        self.k[layer, :B, :, start:end] = k
        self.v[layer, :B, :, start:end] = v
        return self.k[layer, :B, :, :end], self.v[layer, :B, :, :end]

    def mask(self, B, T):
        """Which slots the next T tokens of the first B rows attend to, (B, 1, T, length + T) bool: the real tokens
        up to themselves, and always themselves, so no softmax row is empty (a pad sees only itself)."""
        query = torch.arange(self.length, self.length + T, device=self.pad.device)[:, None]  # (T, 1) slots
        key = torch.arange(self.length + T, device=self.pad.device)  # (length + T,) slots
        real = key >= self.pad[:B, None, None, None]  # (B, 1, 1, length + T)
        return ((key <= query) & real) | (key == query)

    def positions(self, B, T):
        """The positions of the next T tokens of the first B rows, (B, T): each row counts from its first real
        token (a pad's position is never read; 0 will do)."""
        slots = torch.arange(self.length, self.length + T, device=self.pad.device)
        return (slots - self.pad[:B, None]).clamp(min=0)

    def reorder(self, batch_index):
        """Row i takes the past (and the pad) of row batch_index[i]: beam search's survivors take their parent's.
        Only the filled slots are copied, into the first len(batch_index) rows; the buffers stay where they are."""
        n, filled = batch_index.numel(), self.length
        self.k[:, :n, :, :filled] = self.k[:, batch_index, :, :filled]  # the right side is a copy, so rows
        self.v[:, :n, :, :filled] = self.v[:, batch_index, :, :filled]  # may take another's past safely
        self.pad[:n] = self.pad[batch_index]


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
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying: one matrix reads and writes tokens
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection gets std 0.02 / sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, label_smoothing=0.0, cache=None):
        """Tokens idx (B, T), after the cache's positions if one is given -> (logits, loss).

        Without targets: logits (B, T, vocab) at every position, and loss None.
        With targets (B, T), -1 where there is nothing to predict: the head runs only where a target is (on E2E
        the MR prompt and the padding are about half the positions, and the head is the largest matmul), so
        logits is (number of targets, vocab), and loss their mean cross-entropy (label-smoothed if asked).
        """
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if past + T > self.config.block_size:
            raise UserError(f"sequence of {past + T} tokens is longer than block_size {self.config.block_size}")
        if cache is None:  # each row one sequence from position 0: plain causal attention
            pos, mask = torch.arange(T, device=idx.device), None
        else:  # after the cached past, each row counting from its first real token
            pos, mask = cache.positions(B, T), cache.mask(B, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, layer)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.length += T
        if targets is None:
            return self.lm_head(x), None
        keep = targets != -1
        logits = self.lm_head(x[keep])  # (number of targets, vocab)
        loss = F.cross_entropy(logits.float(), targets[keep], label_smoothing=label_smoothing)
        return logits, loss

    def new_cache(self, batch_size, max_len, pad=None):
        p = self.transformer.wte.weight
        return KVCache(self.config, batch_size, max_len, p.device, p.dtype, pad)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
                 use_cache=True, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens; temperature 0 is greedy.

        Once a row has produced eos_token it is padded with eos_token, and generation stops when every
        row has. With use_cache=False every step runs the whole sequence again (the slow, obvious way).
        """
        B, T = idx.shape
        cache = self.new_cache(B, T + max_new_tokens) if use_cache else None
        out = idx.new_empty(B, T + max_new_tokens)  # filled as we go: no new sequence tensor per step
        out[:, :T] = idx
        finished = torch.zeros(B, dtype=torch.bool, device=idx.device)
        step_input, length = idx, T
        for _ in range(max_new_tokens):
            logits, _ = self(step_input if use_cache else out[:, :length], cache=cache)
            next_token = sample_next(logits[:, -1, :].float(), temperature, top_k, top_p, generator)
            if eos_token is not None:
                next_token = torch.where(finished, eos_token, next_token)
                finished |= next_token == eos_token
            out[:, length] = next_token
            length += 1
            step_input = out[:, length - 1:length]  # with the cache, the next step runs only the new token
            if eos_token is not None and finished.all():
                break
        return out[:, :length]

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        """GPT-2 with OpenAI's weights: gpt2, gpt2-medium, gpt2-large or gpt2-xl (downloaded once), or a folder
        or .safetensors file in the Hugging Face layout."""
        tensors, shape = hf_checkpoint.read(name_or_path)  # OpenAI's names and layout
        with torch.device("meta"):  # shapes only: the random init would be thrown away (and for gpt2-xl, slow)
            model = cls(GPTConfig(**shape, dropout=dropout))
        state = {}
        for name, tensor in tensors.items():
            # OpenAI's code stored four weights per layer as Conv1D, (in, out): the transpose of nn.Linear's.
            # c_attn and c_fc would fail on shape if left as they are, but attn.c_proj is square.
            state[name] = tensor.t() if name.endswith(hf_checkpoint.CONV1D_WEIGHTS) else tensor
        hf_checkpoint.check_state_fits(state, model, name_or_path)  # every name and shape, or a one-line error
        state["lm_head.weight"] = state["transformer.wte.weight"]  # the head is wte, tied
        model.load_state_dict(state, assign=True)
        model.lm_head.weight = model.transformer.wte.weight  # tie again: assign made them two parameters
        model.name_or_path = str(name_or_path)
        return model


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits (B, vocab): argmax when temperature is 0, else a sample from
    softmax(logits / temperature) restricted to the top_k tokens and to the smallest set of most likely
    tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already reach top_p (so the most likely token always stays)
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator).squeeze(-1)
