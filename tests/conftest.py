"""Shared fixtures: tiny GPT-2 checkpoints written by transformers (the reference), and offline tokenizer files."""

import os
from pathlib import Path

# One thread per process: the test models are tiny, and when the two cores are shared (torchrun's two
# processes, a busy machine) OpenMP's spinning threads can make a millisecond step take a hundred times
# longer. Set before torch is imported, so it holds for this process and for every process a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def tokenizer_available():
    """Whether tiktoken's gpt2 files can be had: from ../shared (set above), its own cache, or the network."""
    from checkpoint import UserError
    from model import get_tokenizer

    try:
        get_tokenizer()
        return True
    except UserError:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked `tokenizer` need GPT-2's BPE files, which no test can make: where there is neither
    ../shared nor a network they are skipped, saying why, and every other test still runs."""
    if not any(item.get_closest_marker("tokenizer") for item in items) or tokenizer_available():
        return
    skip = pytest.mark.skip(reason="tiktoken's gpt2 files are not here (no network, no ../shared/data/tiktoken_cache)")
    for item in items:
        if item.get_closest_marker("tokenizer"):
            item.add_marker(skip)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
E2E_DIR = SHARED / "data" / "e2e"

# tiktoken reads its two gpt2 files from here when the shared folder is present (no network on CI).
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "data" / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "data" / "tiktoken_cache")


def write_hf_gpt2(folder, seed=0, **shape):
    """A randomly initialised transformers GPT2LMHeadModel saved with save_pretrained into folder.

    Every parameter (biases and LayerNorms too) is drawn at random, so a weight loaded into the wrong
    place, or not transposed, changes the logits. Returns the transformers model in eval mode.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    shape = {"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 50257, "n_positions": 128, **shape}
    torch.manual_seed(seed)
    config = GPT2Config(**shape, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=shape["vocab_size"] - 1, eos_token_id=shape["vocab_size"] - 1)
    hf = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(folder)
    return hf.eval()


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    """Folder of a tiny GPT-2 with the full 50257-token vocabulary (so real text can be tokenized)."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    write_hf_gpt2(folder)
    return folder


def train_tiny_adapter(base, path, targets=("q", "v"), steps=10, seq_len=8, label=None):
    """Train a rank-4 adapter on base for `steps` AdamW steps (lr 1e-2) on random tokens, to predict the next
    token, or always the token `label`; save it to path and return path."""
    from lora import apply_lora, save_adapter
    from model import GPT

    torch.manual_seed(0)
    model = apply_lora(GPT.from_pretrained(base), rank=4, alpha=32, targets=targets)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 50257, (8, seq_len + 1), generator=g)
        targets_ = x[:, 1:] if label is None else torch.full_like(x[:, 1:], label)
        _, loss = model(x[:, :-1], targets_)
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(model, path)  # its metadata names base as the base model
    return path
