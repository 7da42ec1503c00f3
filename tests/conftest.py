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
