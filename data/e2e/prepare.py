"""The E2E NLG data: from the official CSVs to token arrays, and from token arrays to training batches.

    python data/e2e/prepare.py                  # download the three CSVs from GitHub, tokenize, write arrays
    python data/e2e/prepare.py --source DIR     # read the CSVs from DIR where they are (nothing is downloaded
                                                # or copied; DIR holds trainset.csv, devset.csv, ...)

Every CSV row (mr, ref) becomes one example, a prompt followed by a completion:

    tokens = encode(f"{mr} ||") + encode(f" {ref}") + [<|endoftext|>]     prompt_len = len(encode(f"{mr} ||"))

The model learns to write the completion only: make_batch sets the targets inside the prompt to -1, which the
loss ignores. The files written next to this script (or in --out), per split:

    {split}.npz       tokens (uint16, all examples one after the other), offsets (int64, n + 1: example i is
                      tokens[offsets[i]:offsets[i + 1]]), prompt_lens (int32, n)
    {split}_mrs.json  [{"mr": ..., "refs": [...]}, ...]: each MR once with all its references (for eval)
"""

import argparse
import contextlib
import csv
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

# Run as a script (python data/e2e/prepare.py), Python puts data/e2e/ on the import path, not the repository
# root where model.py and checkpoint.py live; add the root so the imports below work both ways.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from checkpoint import UserError, atomic_write, download  # noqa: E402
from model import EOT, get_tokenizer  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent  # where the CSVs and arrays go unless told otherwise
SPLITS = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
BASE_URL = "https://raw.githubusercontent.com/tuetschek/e2e-dataset/master/"
URLS = {split: BASE_URL + filename for split, filename in SPLITS.items()}
BUCKET_BATCHES = 50  # batch_order(bucket=True) sorts by length within windows of this many batches
PREPARE_HINT = "run python data/e2e/prepare.py"


def format_prompt(mr: str) -> str:
    """The one prompt format (train, sample and eval all use it): the MR followed by ' ||'."""
    return f"{mr} ||"


def format_completion(ref: str) -> str:
    """What the model learns to write after the prompt: a space and the reference (then <|endoftext|>)."""
    return f" {ref}"


def read_csv(path) -> list[tuple[str, str]]:
    """The (mr, ref) rows of an E2E CSV file (UTF-8, header mr,ref), text exactly as in the file.

    A malformed row raises UserError "path:line: what is wrong" (the physical line on which the row starts).
    """
    path = Path(path)
    rows = []
    try:
        # utf-8-sig drops a byte-order mark if an editor put one in front of the header; newline="" lets the
        # csv module see line breaks inside quoted fields.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            next_line = 1  # the physical line the next row starts on (a quoted field may span lines)
            for fields in reader:
                line, next_line = next_line, reader.line_num + 1
                if line == 1:
                    if [name.strip() for name in fields] != ["mr", "ref"]:
                        raise UserError(f"{path}:1: the header must be mr,ref, found {','.join(fields)!r}")
                    continue
                if not fields:  # a blank line holds no row
                    continue
                if len(fields) != 2:
                    raise UserError(f"{path}:{line}: expected 2 fields (mr,ref), found {len(fields)}")
                mr, ref = fields
                if not mr.strip():
                    raise UserError(f"{path}:{line}: the mr is empty")
                if not ref.strip():
                    raise UserError(f"{path}:{line}: the ref is empty")
                rows.append((mr, ref))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: {e}") from None
    if next_line == 1:
        raise UserError(f"{path}: the file is empty (expected the header mr,ref)")
    if not rows:
        raise UserError(f"{path}: no rows after the header")
    return rows


def unique_mrs(rows: list[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """Each MR once, in order of first appearance, with all its references (the E2E evaluation unit)."""
    refs = {}  # dicts keep insertion order, which is the order of first appearance
    for mr, ref in rows:
        refs.setdefault(mr, []).append(ref)
    return list(refs.items())


def tokenize_example(enc, mr: str, ref: str) -> tuple[list[int], int]:
    """One example's tokens (prompt + completion + EOT) and its prompt length.

    encode_ordinary treats text like "<|endoftext|>" inside a reference as plain characters, so the only
    special token in an example is the EOT appended here.
    """
    prompt = enc.encode_ordinary(format_prompt(mr))
    completion = enc.encode_ordinary(format_completion(ref))
    return prompt + completion + [EOT], len(prompt)


@dataclass
class Split:
    """All examples of one split: example i is tokens[offsets[i]:offsets[i + 1]], its first prompt_lens[i]
    tokens being the prompt."""

    tokens: np.ndarray  # uint16, every example one after the other
    offsets: np.ndarray  # int64, len(self) + 1, starts at 0 and ends at len(tokens)
    prompt_lens: np.ndarray  # int32, len(self)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """The number of tokens of each example."""
        return np.diff(self.offsets)

    def example(self, i: int) -> tuple[np.ndarray, int]:
        """Example i's tokens (int64) and its prompt length."""
        tokens = self.tokens[self.offsets[i] : self.offsets[i + 1]].astype(np.int64)
        return tokens, int(self.prompt_lens[i])


def prepare(data_dir=DATA_DIR, source=None, splits=tuple(SPLITS)) -> dict[str, Split]:
    """Tokenize the CSVs of `splits` and write {split}.npz and {split}_mrs.json into data_dir.

    The CSVs are read from `source` where they are when it is given; otherwise from data_dir, downloading
    the ones that are missing there. Returns the splits written.
    """
    data_dir = Path(data_dir)
    for split in splits:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")
    data_dir.mkdir(parents=True, exist_ok=True)
    enc = get_tokenizer()
    written = {}
    for split in splits:
        if source is not None:
            csv_path = Path(source) / SPLITS[split]
            if not csv_path.is_file():
                raise UserError(f"{csv_path}: no such file (--source must be a folder with {SPLITS[split]})")
        else:
            csv_path = data_dir / SPLITS[split]
            if not csv_path.is_file():
                download(URLS[split], csv_path, desc=SPLITS[split])
        rows = read_csv(csv_path)

        tokens, offsets, prompt_lens = [], [0], []
        for mr, ref in tqdm(rows, desc=f"tokenizing {split}", unit=" rows"):
            example, prompt_len = tokenize_example(enc, mr, ref)
            tokens.extend(example)
            offsets.append(len(tokens))
            prompt_lens.append(prompt_len)
        # GPT-2's 50,257 token ids fit in 16 bits: half the disk and memory of int32.
        assert max(tokens, default=0) < 2**16, "a token id does not fit in uint16"
        data = Split(
            tokens=np.array(tokens, dtype=np.uint16),
            offsets=np.array(offsets, dtype=np.int64),
            prompt_lens=np.array(prompt_lens, dtype=np.int32),
        )

        mrs = [{"mr": mr, "refs": refs} for mr, refs in unique_mrs(rows)]
        with atomic_write(data_dir / f"{split}_mrs.json") as f:
            f.write(json.dumps(mrs, ensure_ascii=False, indent=1).encode("utf-8"))
        with atomic_write(data_dir / f"{split}.npz") as f:
            np.savez(f, tokens=data.tokens, offsets=data.offsets, prompt_lens=data.prompt_lens)
        written[split] = data
    return written


def ensure_prepared(data_dir=DATA_DIR, splits=tuple(SPLITS)) -> None:
    """Prepare the splits whose files are missing in data_dir (downloading their CSVs if need be)."""
    data_dir = Path(data_dir)
    missing = [
        split
        for split in splits
        if not (data_dir / f"{split}.npz").is_file() or not (data_dir / f"{split}_mrs.json").is_file()
    ]
    if missing:
        prepare(data_dir, splits=missing)


def load_split(data_dir, split: str) -> Split:
    """The prepared token arrays of one split; UserError if they are missing or damaged."""
    path = Path(data_dir) / f"{split}.npz"
    if not path.is_file():
        raise UserError(f"{path}: not found; {PREPARE_HINT}")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = Split(tokens=f["tokens"], offsets=f["offsets"], prompt_lens=f["prompt_lens"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: unreadable ({e}); {PREPARE_HINT}") from None

    # Check the invariants every user of a Split relies on, so a damaged file fails here and not mid-training.
    problem = None
    if (data.tokens.dtype, data.offsets.dtype, data.prompt_lens.dtype) != (np.uint16, np.int64, np.int32):
        problem = "unexpected dtypes"
    elif data.tokens.ndim != 1 or data.offsets.ndim != 1 or data.prompt_lens.shape != (len(data),):
        problem = "inconsistent shapes"
    elif data.offsets[0] != 0 or data.offsets[-1] != len(data.tokens) or np.any(data.lengths < 2):
        problem = "offsets do not cut the tokens into examples"
    elif np.any(data.prompt_lens < 1) or np.any(data.prompt_lens >= data.lengths):
        problem = "a prompt length outside its example"
    if problem:
        raise UserError(f"{path}: damaged ({problem}); {PREPARE_HINT}")
    return data


def load_mrs(data_dir, split: str) -> list[tuple[str, list[str]]]:
    """The unique MRs of one split with all their references, as written by prepare."""
    path = Path(data_dir) / f"{split}_mrs.json"
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
        return [(item["mr"], list(item["refs"])) for item in items]
    except FileNotFoundError:
        raise UserError(f"{path}: not found; {PREPARE_HINT}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: damaged ({e}); {PREPARE_HINT}") from None


def batch_order(split: Split, batch_size: int, seed: int, epoch: int, bucket=False) -> list[np.ndarray]:
    """One epoch's batches of example indices: a permutation seeded by (seed, epoch), cut into batches.

    bucket=True puts examples of similar length together so that little padding is needed: shuffle, sort by
    length within windows of BUCKET_BATCHES batches, cut into batches, then shuffle the order of the batches.
    Every example appears exactly once; the last batch may be smaller.
    """
    if batch_size < 1:
        raise UserError(f"the batch size must be at least 1, got {batch_size}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(split))
    if bucket and len(order) > 0:
        lengths = split.lengths
        window = batch_size * BUCKET_BATCHES
        # A stable sort keeps the random order among examples of equal length.
        windows = [order[i : i + window] for i in range(0, len(order), window)]
        order = np.concatenate([w[np.argsort(lengths[w], kind="stable")] for w in windows])
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if bucket:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


def make_batch(split: Split, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y, LongTensors (B, T), T = the longest example in this batch minus one.

    x is each example without its last token, y the same example shifted by one (y[t] = token t + 1).
    A target is -1 (ignored by the loss) where token t + 1 belongs to the prompt and on padding, so the loss
    covers exactly the completion and its final <|endoftext|>. Inputs are padded with EOT.
    """
    examples = [split.example(int(i)) for i in indices]
    if not examples:
        raise ValueError("make_batch needs at least one example")
    T = max(len(tokens) for tokens, _ in examples) - 1
    x = np.full((len(examples), T), EOT, dtype=np.int64)
    y = np.full((len(examples), T), -1, dtype=np.int64)
    for b, (tokens, prompt_len) in enumerate(examples):
        n = len(tokens) - 1
        x[b, :n] = tokens[:-1]
        y[b, :n] = tokens[1:]
        # y[t] is token t + 1, which is part of the prompt when t + 1 < prompt_len.
        y[b, : prompt_len - 1] = -1
    return torch.from_numpy(x), torch.from_numpy(y)



def target_count(split: Split, indices) -> int:
    """How many targets (completion tokens + EOT) the examples at indices have: the loss's denominator."""
    indices = np.asarray(indices, dtype=np.int64)
    return int((split.lengths[indices] - split.prompt_lens[indices]).sum())


@torch.no_grad()
def summed_loss(model, split: Split, batch_size: int, device, limit=None, rank=0, world_size=1, autocast=None):
    """The summed cross-entropy and the number of target tokens over the first `limit` examples (all by default):
    their ratio is the mean loss per token.

    Examples are taken in order, so the figure is the same in every run. With several processes, each
    computes the loss of every world_size-th batch; the caller sums (loss_sum, count) across them.
    Returns (loss_sum, count) as floats.
    """
    was_training = model.training
    model.eval()
    n = len(split) if limit is None else min(limit, len(split))
    batches = [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
    loss_sum, count = 0.0, 0
    for indices in batches[rank::world_size]:
        x, y = make_batch(split, indices)
        with autocast if autocast is not None else contextlib.nullcontext():
            loss = model.loss(x.to(device), y.to(device), reduction="sum")
        loss_sum += loss.item()
        count += target_count(split, indices)
    model.train(was_training)
    return loss_sum, count

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Download the E2E NLG CSVs, tokenize them into prompt + completion examples and write "
        "{split}.npz and {split}_mrs.json.",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="a folder holding trainset.csv, devset.csv, testset_w_refs.csv; they are read from there "
        "(nothing is downloaded or copied)",
    )
    parser.add_argument(
        "--out",
        "--data",
        dest="out",
        type=Path,
        default=DATA_DIR,
        help=f"the folder to write the arrays to (and download the CSVs to); default {DATA_DIR}",
    )
    parser.add_argument(
        "--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS), help="the splits to prepare"
    )
    args = parser.parse_args(argv)
    try:
        written = prepare(args.out, source=args.source, splits=args.splits)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    for name, data in written.items():
        print(
            f"{name}: {len(data):,} examples, {len(data.tokens):,} tokens, longest {data.lengths.max()} "
            f"-> {args.out / (name + '.npz')}"
        )


if __name__ == "__main__":
    main()
