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


@pytest.fixture(autouse=True)
def one_thread_after_each_test():
    """Every test ends with the process at one torch thread again. A command run in this process may set its own
    count (bench does, for its timings); the next test's numbers must not depend on it, since a sum split over
    two threads rounds differently, and a bit-for-bit comparison with a one-thread child process then fails."""
    yield
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def tokenizer_available():
    """Whether tiktoken's gpt2 files can be had: from ../shared (set above), its own cache, or the network."""

    from data.tasks import get_tokenizer

    try:
        get_tokenizer()
        return True
    except ValueError:  # the project's UserError
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
    from checkpoints.adapters import save_adapter
    from lora import LoRAConfig, apply_lora
    from model import GPT

    torch.manual_seed(0)
    model = apply_lora(GPT.from_pretrained(base), LoRAConfig(rank=4, alpha=32, targets=targets))
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


# A small E2E folder, shared by the tests of train, eval and sweep. The training set cannot be had here, so
# slices of the official dev set stand in for all three splits; without the shared data, hand-made rows
# (three references per MR, £ and é included) do.
SMALL_SPLITS = {"trainset.csv": (0, 240), "devset.csv": (240, 304), "testset_w_refs.csv": (304, 364)}
NAMES = ["The Vaults", "Café Rouge", "The Mill", "Zizzi", "Aromi", "Blue Spice", "The Punter", "Alimentum"]
TEMPLATES = ["{n} is a pub in the city centre costing £{p}.",
             "In the city centre, {n} is a pub with prices of £{p}.",
             "{n}, a city centre pub, costs about £{p} per person."]


def write_e2e_csv(path, rows):
    import csv

    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["mr", "ref"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def e2e_src(tmp_path_factory):
    """A folder with trainset.csv (240 rows), devset.csv (64) and testset_w_refs.csv (60)."""
    from data.e2e import prepare

    src = tmp_path_factory.mktemp("e2e_src")
    if (E2E_DIR / "devset.csv").is_file():
        rows = prepare.read_csv(E2E_DIR / "devset.csv")
    else:
        rows = [(f"name[{n}], eatType[pub], priceRange[£{10 + i}]", t.format(n=n, p=10 + i))
                for i, n in enumerate(NAMES * 16) for t in TEMPLATES]
    for name, (start, end) in SMALL_SPLITS.items():
        write_e2e_csv(src / name, rows[start:end])
    return src


@pytest.fixture(scope="session")
def e2e_small(e2e_src, tmp_path_factory):
    """e2e_src prepared by prepare.py: the --data folder of train.py, eval.py and sweep.py."""
    from data.e2e import prepare

    data = tmp_path_factory.mktemp("e2e_data")
    prepare.prepare(data, source=e2e_src)
    return data
