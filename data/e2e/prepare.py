"""Run once: the E2E NLG CSVs -> token files that train.py and eval.py read.

    python data/e2e/prepare.py                  # download the three CSVs from GitHub, then tokenize them
    python data/e2e/prepare.py --source DIR     # read trainset.csv, devset.csv, testset_w_refs.csv from DIR
    python data/e2e/prepare.py --format plain   # the official CSV text instead of the paper's format

Every CSV row (mr, ref) becomes one example, a prompt followed by a completion that the model learns to write.
Two formats (the adapter file records which one it was trained on, and sample.py / eval.py follow it):

    paper (default): the LoRA repository's E2E files, as the paper's Table 18 was made (microsoft/LoRA,
        examples/NLG/data/e2e): context = the MR as "name : Alimentum | area : city centre | ...", completion
        = the reference pre-tokenized ("family - friendly", "Spice .", "isn 't");
        tokens = encode(context) + [EOT] + encode(" " + completion) + [EOT]
    plain: the official text; tokens = encode(mr + " ||") + encode(" " + ref) + [EOT]

Written into the data folder (data/e2e/ unless --out), per split, all or none of them:
    {split}.npz       tokens (uint16, every example one after the other), offsets (int64, n + 1: example i is
                      tokens[offsets[i]:offsets[i + 1]]), prompt_lens (int32, n), format
    {split}_mrs.json  each unique MR once, in order, with its prompt text and references (for eval.py)
    {split}.txt       paper format only: "context||completion " per example, the LoRA repository's line format

The scripts import its formats; it imports only data/tasks.py (the tokenizer) and the plumbing layer (errors,
outputs, downloads) of the project.
"""

import argparse
import csv
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python data/e2e/prepare.py`: the project's root, to import plumbing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import tasks  # noqa: E402
from data.tasks import EOT, get_tokenizer  # noqa: E402
from plumbing import outputs  # noqa: E402
from plumbing.errors import UserError, reported  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
SPLITS = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
E2E_URL = "https://raw.githubusercontent.com/tuetschek/e2e-dataset/master/"
URLS = {split: E2E_URL + name for split, name in SPLITS.items()}
FORMATS = ("paper", "plain")
SPLIT_FILES = (".npz", "_mrs.json", ".txt")  # what a split is written as: {split}.npz, {split}_mrs.json, ...


# ----------------------------------------------------------------------------------------------------------
# The two formats.

ATTRIBUTE_NAMES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}


def parse_mr(mr):
    """[(attribute, value), ...] of an MR such as "name[Alimentum], area[city centre]", in its order."""
    return re.findall(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]", mr)


ALNUM, ALPHA = r"[^\W_]", r"[^\W\d_]"  # a letter or digit (Unicode: é counts), a letter
# The LoRA repository's E2E text reads as if Moses' tokenizer (English, hyphens split, no escaping) had been run
# on each sentence. These are the rules E2E text triggers, applied to each whitespace-separated word in order.
WORD_RULES = [
    (re.compile(r"([^\w\s.',\-])"), r" \1 "),  # any symbol but . ' , - stands alone: £20 -> £ 20, Rating: -> Rating :
    (re.compile(rf"({ALNUM})-(?={ALNUM})"), r"\1 - "),  # a hyphen between letters or digits: family - friendly
    (re.compile(r"\.{2,}"), r" \g<0> "),  # a run of dots is one token: rating ..
    (re.compile(r"(?<!\d),|,(?!\d)"), r" , "),  # a comma, except inside a number (5,300)
    # an apostrophe between a letter or digit and a letter starts a clitic (isn 't, It 's); others are quotes
    (re.compile(rf"(?<=\w)(')(?={ALPHA})|'"), lambda m: " '" if m.group(1) else " ' "),
]
BARE_NUMBER = re.compile(r"-?[.,]?\d[\d,.\-]*\.")

# The LoRA repository's test file was made by another tokenizer than its dev file: it splits contractions the Penn
# Treebank way and keeps a number joined to a word. These rules replace WORD_RULES for the test split (and there a
# word-final period is always split off, "5. in" too). The context is made by the dev rules in both files. Not copied:
# that file pads each ";" with spaces to byte 574 of its line (13 lines), which the E2E metrics' tokenizers drop.
TEST_WORD_RULES = [
    # any symbol but . ' , - stands alone, a currency sign only where it starts the word: £20 -> £ 20, 20£-25 stays
    (re.compile(r"^[£$]|[^\w\s.',\-£$]"), r" \g<0> "),
    # a hyphen between two letters or two digits: family - friendly, 20 - 25; 5-star, E20-E25, 20-£25 stay whole
    (re.compile(rf"(?<={ALPHA})-(?={ALPHA})|(?<=\d)-(?=\d)"), " - "),
    WORD_RULES[2],  # a run of dots is one token, as in the dev file
    WORD_RULES[3],  # a comma, except inside a number, as in the dev file
    # an apostrophe that starts or ends a word is a quote: ' The Mill ' ; inside a word it stays (hors d'oeuvre) ...
    (re.compile(r"(?<!\w)'|'(?!\w)"), " ' "),
    # ... unless it starts one of English's clitics, which stand alone the Penn Treebank way: It 's, is n't, ca n't
    (re.compile(rf"(?<={ALPHA})(n't|'(?:s|re|ve|ll|d|m))(?!\w)", re.IGNORECASE), r" \1"),
    (re.compile(r"^([Tt]hat)s$"), r"\1 s"),  # "thats" is read as "that's" missing its apostrophe: that s
]


def pretokenize(text, split="dev"):
    """The LoRA repository's text: `It's family-friendly.` -> `It 's family - friendly .` (its train and dev
    files); the test split follows TEST_WORD_RULES: `It isn't 5-star.` -> `It is n't 5-star .`."""
    rules = TEST_WORD_RULES if split == "test" else WORD_RULES
    words, out = text.split(), []
    for i, word in enumerate(words):
        for pattern, replacement in rules:
            word = pattern.sub(replacement, word)
        # A word-final period is split off (the sentence splitter ended a sentence there), except after a bare
        # number followed by a lower-case word ("1 out of 5. in the city" keeps "5.") outside the test split.
        next_word = words[i + 1] if i + 1 < len(words) else ""
        if split == "test" or not (BARE_NUMBER.fullmatch(words[i]) and next_word[:1].islower()):
            word = re.sub(r"(?<=[^\s.])\.(?=\s|$)", " .", word)
        out.append(word)
    return " ".join(" ".join(out).split())


def paper_context(mr):
    """'name : Alimentum | area : city centre | family friendly : no'."""
    return " | ".join(f"{ATTRIBUTE_NAMES.get(a, a)} : {pretokenize(v)}" for a, v in parse_mr(mr))


def prompt_tokens(enc, mr, data_format):
    """The prompt the model completes for this MR: training, sampling and evaluation all build it here."""
    if data_format == "paper":
        return tasks.prompt_tokens(enc, paper_context(mr))  # the context, then <|endoftext|>, as every task
    return enc.encode_ordinary(f"{mr} ||")


def completion_text(ref, data_format, split="dev"):
    """What the model learns to write for this reference (before the final EOT); the test split's paper text
    follows the LoRA repository's test file (see TEST_WORD_RULES)."""
    return " " + (pretokenize(ref, split) if data_format == "paper" else ref)


def example_tokens(enc, mr, ref, data_format, split="dev"):
    """One example's tokens (prompt + completion + EOT) and its prompt length. encode_ordinary treats the text
    "<|endoftext|>" inside a reference as plain characters, so the only special tokens are the EOTs added here."""
    prompt = prompt_tokens(enc, mr, data_format)
    return prompt + enc.encode_ordinary(completion_text(ref, data_format, split)) + [EOT], len(prompt)


# ----------------------------------------------------------------------------------------------------------
# Reading the CSVs.

def read_csv(path):
    """The (mr, ref) rows of an E2E CSV file (UTF-8, header mr,ref), text exactly as in the file.
    A malformed row is a one-line error "path:line: what is wrong" (the physical line on which the row starts)."""
    path = Path(path)
    rows, next_line = [], 1
    try:
        # utf-8-sig drops a byte-order mark; newline="" lets the csv module see line breaks inside quoted fields
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            for fields in reader:
                line, next_line = next_line, reader.line_num + 1
                if line == 1:
                    if [name.strip() for name in fields] != ["mr", "ref"]:
                        raise UserError(f"{path}:1: the header must be mr,ref, found {','.join(fields)!r}")
                elif fields and len(fields) != 2:
                    raise UserError(f"{path}:{line}: expected 2 fields (mr,ref), found {len(fields)}")
                elif fields and not (fields[0].strip() and fields[1].strip()):
                    raise UserError(f"{path}:{line}: the {'mr' if not fields[0].strip() else 'ref'} is empty")
                elif fields:
                    rows.append((fields[0], fields[1]))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise UserError(f"{path}:{reader.line_num}: {e}") from None
    if not rows:
        raise UserError(f"{path}: " + ("the file is empty (expected the header mr,ref)" if next_line == 1
                                               else "no rows after the header"))
    return rows


def unique_mrs(rows):
    """Each MR once, in order of first appearance, with all its references (the E2E evaluation unit)."""
    refs = {}  # dicts keep insertion order, which is the order of first appearance
    for mr, ref in rows:
        refs.setdefault(mr, []).append(ref)
    return list(refs.items())


# ----------------------------------------------------------------------------------------------------------
# Writing the token files.

def is_prepared(data_dir, split):
    return all((Path(data_dir) / f"{split}{suffix}").is_file() for suffix in (".npz", "_mrs.json"))


def holds_task(data_dir):
    """The format of a folder that data/tasks.py prepared (webnlg, dart, prompt_completion), or None for E2E's
    folders and for empty ones."""
    for npz in sorted(Path(data_dir).glob("*.npz")):
        if read_format(data_dir, npz.stem) not in FORMATS:
            return read_format(data_dir, npz.stem)
    return None


def missing_splits(data_dir, splits, task="e2e"):
    """The E2E splits that data_dir does not hold yet, which train.py and eval.py prepare (downloading their CSVs
    first). A folder of another task cannot be completed from E2E's files: a split it lacks is a one-line error."""
    other = holds_task(data_dir) or (task if task != "e2e" else None)
    if other is None:
        return [split for split in splits if not is_prepared(data_dir, split)]
    absent = [split for split in splits if not (Path(data_dir) / f"{split}.npz").is_file()]
    if absent:
        command = "data/tasks.py --train ... --dev ..." if other == "prompt_completion" else f"data/{other}/prepare.py"
        raise UserError(f"{data_dir} has no {absent[0]} split of the {other} task; prepare it first: python {command} "
                        f"--out {data_dir}")
    return []


def prepare_missing(data_dir, splits, data_format, task="e2e"):
    """Prepare the E2E splits that data_dir does not hold yet: what train.py and eval.py do before they read it."""
    missing = missing_splits(data_dir, splits, task)
    if missing:
        prepare(data_dir, splits=missing, data_format=data_format)


def prepare(data_dir=DATA_DIR, source=None, splits=tuple(SPLITS), data_format="paper", force=False):
    """Tokenize the CSVs of `splits` (read from `source`, or from data_dir where missing ones are downloaded)
    and write each split's files into data_dir. Returns {split: (number of examples, number of tokens)}.
    Every CSV is read (and checked) before anything is written; if anything fails, a data_dir made here goes."""
    data_dir = Path(data_dir)
    if data_format not in FORMATS:
        raise UserError(f"unknown data format {data_format!r}: use {' or '.join(FORMATS)}")
    for split in splits:
        if not force and is_prepared(data_dir, split):
            raise UserError(f"{data_dir} already holds {split} in the {read_format(data_dir, split)} format; "
                             f"pass --force to replace it, or another --out")
    made = [f"{split}{suffix}" for split in splits for suffix in SPLIT_FILES]  # a file of a split half there too
    with outputs.folder(data_dir, holds=made, force=force):
        enc = get_tokenizer()
        csvs = {split: Path(source or data_dir) / SPLITS[split] for split in splits}
        if source is None:  # one error names every file that could not be downloaded
            tasks.fetch_or_list([(f"E2E {path.name}", URLS[split], path) for split, path in csvs.items()
                                 if not path.is_file()])
        rows_of = {split: read_csv(path) for split, path in csvs.items()}
        written = {}
        for split, rows in rows_of.items():
            tokens, offsets, prompt_lens = [], [0], []
            for mr, ref in tqdm(rows, desc=f"tokenizing {split}", unit=" rows"):
                example, prompt_len = example_tokens(enc, mr, ref, data_format, split)
                tokens.extend(example)
                offsets.append(len(tokens))
                prompt_lens.append(prompt_len)
            mrs = [{"mr": mr, "refs": refs, "format_refs": [completion_text(r, data_format, split)[1:] for r in refs]}
                   for mr, refs in unique_mrs(rows)]
            try:
                write_split(data_dir, split, rows, tokens, offsets, prompt_lens, mrs, data_format)
            except OSError as e:  # a full disk, a read-only folder
                raise UserError(f"could not write {split}'s files into {data_dir}: {e.strerror or e}") from None
            written[split] = (len(rows), len(tokens))
    return written


def write_split(data_dir, split, rows, tokens, offsets, prompt_lens, mrs, data_format):
    """{split}.npz, {split}_mrs.json (and {split}.txt) into data_dir: written into a temporary folder first and
    moved in only when all are complete, so a split is there whole or not at all."""
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".{split}.") as tmp:
        tmp = Path(tmp)
        np.savez(tmp / f"{split}.npz", tokens=np.array(tokens, dtype=np.uint16),  # GPT-2's ids fit in 16 bits
                 offsets=np.array(offsets, dtype=np.int64), prompt_lens=np.array(prompt_lens, dtype=np.int32),
                 format=np.array(data_format))
        (tmp / f"{split}_mrs.json").write_text(json.dumps(mrs, ensure_ascii=False, indent=1), encoding="utf-8")
        names = [f"{split}.npz", f"{split}_mrs.json"]
        if data_format == "paper":
            (tmp / f"{split}.txt").write_text("".join(f"{paper_context(mr)}||{pretokenize(ref, split)} \n"
                                                      for mr, ref in rows), encoding="utf-8")
            names.append(f"{split}.txt")
        for name in names:
            os.replace(tmp / name, data_dir / name)


def read_format(data_dir, split):
    """The format a prepared split was written in ('plain' for files from before formats were recorded)."""
    path = Path(data_dir) / f"{split}.npz"
    try:
        with np.load(path) as f:
            return str(f["format"]) if "format" in f.files else "plain"
    except Exception as e:  # a truncated or foreign file: numpy and zipfile raise many kinds
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); prepare {split} again with --force") from None


def load_mrs(data_dir, split):
    """The unique MRs of one split, as prepare wrote them: [{"mr", "refs", "format_refs"}, ...] (format_refs: the
    references in the split's data format, which are the paper's pre-tokenized ones in the paper format)."""
    path = Path(data_dir) / f"{split}_mrs.json"
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
        return [dict(mr=i["mr"], refs=list(i["refs"]), format_refs=list(i["format_refs"])) for i in items]
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run python data/e2e/prepare.py") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: damaged ({e}); run python data/e2e/prepare.py") from None


def main(argv=None):
    parser = argparse.ArgumentParser(description="Download the E2E NLG CSVs and tokenize them into prompt + "
                                     "completion examples: {split}.npz, {split}_mrs.json (and {split}.txt).")
    parser.add_argument("--source", type=Path, default=None, help="a folder holding trainset.csv, devset.csv, "
                        "testset_w_refs.csv; they are read from there (nothing is downloaded or copied) "
                        "(default: none, they are downloaded into --out)")
    parser.add_argument("--out", "--data", dest="out", type=Path, default=DATA_DIR,
                        help=f"the folder to write to (and download the CSVs to); default {DATA_DIR}")
    parser.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS),
                        help="the splits to prepare (default: all three)")
    parser.add_argument("--format", choices=FORMATS, default="paper", help="paper: the LoRA repository's text, "
                        "as the paper's numbers were made; plain: the official CSV text (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace the token files of a split prepared before "
                        "(default: refuse)")
    args = parser.parse_args(argv)
    with reported():
        written = prepare(args.out, args.source, args.splits, args.format, args.force)
    for name, (n, n_tokens) in written.items():
        print(f"{name}: {n:,} examples, {n_tokens:,} tokens ({args.format} format) -> {args.out / (name + '.npz')}")


if __name__ == "__main__":
    main()
