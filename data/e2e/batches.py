"""The token files prepare.py wrote, as training batches: load a split, order it, pad and mask a batch.

A batch is inputs x and targets y (B, T): y is x shifted by one, and -1 wherever there is nothing to learn
(inside the MR prompt, and on padding), which the loss skips. So the model learns to write the completion only.
"""

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data.e2e.prepare import read_format
from data.tasks import EOT
from plumbing.errors import UserError

BUCKET_BATCHES = 50  # batch_order(bucket=True) sorts by length within windows of this many batches


@dataclass
class Split:
    """All examples of one split: example i is tokens[offsets[i]:offsets[i + 1]], its first prompt_lens[i]
    tokens being the prompt."""

    tokens: np.ndarray  # uint16, every example one after the other
    offsets: np.ndarray  # int64, len(self) + 1, from 0 to len(tokens)
    prompt_lens: np.ndarray  # int32, len(self)
    data_format: str = "paper"

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def lengths(self):
        return np.diff(self.offsets)


def load_split(data_dir, split):
    """The prepared token arrays of one split; a one-line error if they are missing or damaged."""
    path, hint = Path(data_dir) / f"{split}.npz", "run python data/e2e/prepare.py"
    if not path.is_file():
        raise UserError(f"{path}: not found; {hint}")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = Split(f["tokens"], f["offsets"], f["prompt_lens"], read_format(data_dir, split))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: unreadable ({e}); {hint}") from None
    # The invariants every user of a Split relies on, so that a damaged file fails here and not mid-training.
    ok = ((data.tokens.dtype, data.offsets.dtype, data.prompt_lens.dtype) == (np.uint16, np.int64, np.int32)
          and data.tokens.ndim == 1 and data.offsets.ndim == 1 and data.prompt_lens.shape == (len(data),)
          and data.offsets[0] == 0 and data.offsets[-1] == len(data.tokens) and np.all(data.lengths >= 2)
          and np.all(data.prompt_lens >= 1) and np.all(data.prompt_lens < data.lengths))
    if not ok:
        raise UserError(f"{path}: damaged (its arrays do not cut into examples); {hint}")
    return data


def batch_order(split, batch_size, seed, epoch, bucket=False):
    """One epoch's batches of example indices: a permutation seeded by (seed, epoch), cut into batches, so
    the batch of any step can be found again from the step alone (that is all --resume needs).

    bucket=True puts examples of similar length together so that little padding is needed: shuffle, sort by
    length within windows of BUCKET_BATCHES batches, cut into batches, then shuffle the order of the batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(split))
    if bucket:
        window = batch_size * BUCKET_BATCHES  # a stable sort keeps the random order among equal lengths
        order = np.concatenate([w[np.argsort(split.lengths[w], kind="stable")]
                                for w in np.split(order, range(window, len(order), window))])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))] if bucket else batches


def make_batch(split, indices, pad_to=1):
    """Inputs x and targets y, LongTensors (B, T), T = the longest example of this batch minus one, rounded up to
    a multiple of pad_to (torch.compile then meets a few lengths, not every one).

    x is each example without its last token, y the same example shifted by one (y[t] = token t + 1), -1 where
    token t + 1 belongs to the prompt and on padding: the loss covers exactly the completion and its final EOT.
    """
    starts, ends = split.offsets[indices], split.offsets[np.asarray(indices) + 1]
    T = -(-(int((ends - starts).max()) - 1) // pad_to) * pad_to
    x = np.full((len(indices), T), EOT, dtype=np.int64)  # padded with EOT
    y = np.full((len(indices), T), -1, dtype=np.int64)
    for b, (start, end, i) in enumerate(zip(starts, ends, indices, strict=True)):
        tokens = split.tokens[start:end].astype(np.int64)
        x[b, :len(tokens) - 1] = tokens[:-1]
        y[b, :len(tokens) - 1] = tokens[1:]
        y[b, :split.prompt_lens[i] - 1] = -1  # y[t] is token t + 1, part of the prompt when t + 1 < prompt_len
    return torch.from_numpy(x), torch.from_numpy(y)


def target_count(split, indices):
    """How many targets (completion tokens + EOT) the examples at indices have."""
    return int((split.lengths[indices] - split.prompt_lens[indices]).sum())


@torch.no_grad()
def dev_loss(model, split, batch_size, device, limit=None, autocast=None):
    """The mean loss per target token over the first `limit` examples of split (all by default), in order, so
    the figure is the same in every run. Each batch's mean is weighted by its number of targets."""
    was_training = model.training
    model.eval()
    n = len(split) if limit is None else min(limit, len(split))
    loss_sum, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc="dev loss", unit=" batch", leave=False, dynamic_ncols=True):
        indices = np.arange(start, min(start + batch_size, n))
        x, y = make_batch(split, indices)
        with autocast or torch.autocast("cpu", enabled=False):
            _, loss = model(x.to(device), y.to(device))
        loss_sum += loss.item() * target_count(split, indices)
        count += target_count(split, indices)
    model.train(was_training)
    return loss_sum / count
