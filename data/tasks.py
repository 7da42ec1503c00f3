"""Any task as prompt -> completion examples: read them, tokenize them, group them for scoring, write them.

An example is a dict:
    prompt      str, what the model is given ("" is allowed: then it writes from <|endoftext|> alone)
    completion  str, not empty: what the model learns to write
    group       optional (str or int): examples with the same group share one input and are scored together,
                their completions being its references. Without one, examples with the same prompt are one
                group, which is how the LoRA repository's scorer groups them (gpt2_decode.py keys on the context).
    category    optional str, kept for scoring by category (WebNLG's seen / unseen split)

Two file formats are read:
    .jsonl  one JSON object per line (lines end at "\\n" only), with the fields above (others are ignored);
            blank lines are skipped
    .txt    the LoRA repository's lines, "context||completion" (their examples/NLG/data/e2e/*.txt); each line is
            stripped of surrounding whitespace as their format_converting_e2e.py does, and split at the first "||"

Every example is tokenized as the LoRA repository's gpt2_encode.py does for E2E, WebNLG and DART alike:
    tokens = encode(prompt) + [EOT] + encode(" " + completion) + [EOT],  the first len(encode(prompt)) + 1 being
the prompt. A prepared folder holds, per split (data/e2e/batches.py's load_split reads the .npz):
    {split}.npz          tokens (uint16), offsets (int64, n + 1), prompt_lens (int32, n), format (FORMAT)
    {split}_groups.json  [{"prompt", "references", "category"}, ...]: each group once, in order of first appearance

Mistakes in a file are a one-line UserError "path:line: what is wrong".
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

if __package__ in (None, ""):  # run as `python data/tasks.py`: the project's root, to import plumbing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from plumbing import files, outputs  # noqa: E402
from plumbing.errors import UserError, reported  # noqa: E402

EOT = 50256  # <|endoftext|>: GPT-2's one special token, ending every example (and padding batches)
TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
TIKTOKEN_FILES = {  # tiktoken's gpt2 files, and the names its cache (TIKTOKEN_CACHE_DIR) gives them
    TIKTOKEN_URL + "vocab.bpe": "6d1cbeee0f20b3d9449abfede4726ed8212e3aee",
    TIKTOKEN_URL + "encoder.json": "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6",
}
FORMAT = "prompt_completion"  # the `format` recorded in a prepared .npz of your own data
TASK_FORMATS = (FORMAT, "webnlg", "dart")  # every format tokenized here (E2E's "paper" and "plain" are prepare.py's)

# The LoRA paper's settings for GPT-2 on each task (its Table 11; the same for GPT-2 M and L). The training ones
# are train.py's defaults under --preset TASK; the decoding ones are eval.py's. E2E's length penalty is the LoRA
# repository's E2E command's 0.8 (Table 11 says 0.9).
PRESETS = {
    "e2e": dict(train=dict(dropout=0.1, weight_decay=0.01, label_smoothing=0.1), length_penalty=0.8),
    "webnlg": dict(train=dict(dropout=0.1, weight_decay=0.01, label_smoothing=0.1), length_penalty=0.8),
    "dart": dict(train=dict(dropout=0.0, weight_decay=0.0, label_smoothing=0.0), length_penalty=0.8),
}
OPTIONAL_FIELDS = ("group", "category")


def get_tokenizer():
    """GPT-2's byte-pair encoding (tiktoken's 'gpt2'); "\\n\\n" is token 628, <|endoftext|> is EOT."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # tiktoken raises several kinds when it cannot fetch its two files
        raise UserError(tokenizer_help()) from None


def tokenizer_help():
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", "a folder of your choice, named in TIKTOKEN_CACHE_DIR")
    files = "; ".join(f"{url} saved as {name}" for url, name in TIKTOKEN_FILES.items())
    return f"GPT-2's tokenizer files are missing and could not be downloaded: put {files} into {cache}"


def fetch_or_list(needed):
    """Get the tokenizer and every file in `needed`; if one cannot be had, one error lists all that is missing."""
    try:
        get_tokenizer()
        for what, url, path in needed:
            files.download(url, path, desc=what)
        return
    except UserError as e:
        reason = str(e).removeprefix("error: ")
    missing = [f"{what}: {url} -> {path}" for what, url, path in needed if not Path(path).is_file()]
    raise UserError(f"{reason}. Everything still missing (see the README's 'Offline' section): "
                     + " | ".join(missing or ["nothing else"]))


# ----------------------------------------------------------------------------------------------------------
# Reading.

def read_text(path):
    """The text of a UTF-8 file (a byte-order mark is dropped); a one-line error for a missing, non-UTF-8 or empty
    file. A decoding error names the line and the byte offset of the first bad byte."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    return text


def check_example(example, where):
    """The example dict itself, after checking its fields' types; `where` ("path:line") starts the error."""
    for key in ("prompt", "completion"):
        if key not in example:
            raise UserError(f"{where}: no {key!r} field")
        if not isinstance(example[key], str):
            raise UserError(f"{where}: {key!r} must be a string, found {type(example[key]).__name__}")
    if not example["completion"].strip():
        raise UserError(f"{where}: the completion is empty")
    group = example.get("group")
    if group is not None and (isinstance(group, bool) or not isinstance(group, str | int)):
        raise UserError(f"{where}: 'group' must be a string or an integer, found {type(group).__name__}")
    category = example.get("category")
    if category is not None and not isinstance(category, str):
        raise UserError(f"{where}: 'category' must be a string, found {type(category).__name__}")
    return example


def read_jsonl(path):
    """The examples of a JSON Lines file: [{"prompt", "completion", and "group" / "category" where given}]."""
    examples, wheres = [], []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object, found {type(item).__name__}")
        check_example(item, where)
        examples.append({key: item[key] for key in ("prompt", "completion", *OPTIONAL_FIELDS)
                         if item.get(key) is not None})
        wheres.append(where)
    check_groups(examples, wheres)
    return examples


def read_json(path, expected):
    """The parsed JSON of a task's file; a one-line error for a missing, non-UTF-8 or non-JSON file (such as an XML
    release), ending with what the file should be."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not JSON ({e.msg}); {expected}") from None


def read_lora_lines(path):
    """The examples of a file of "context||completion" lines (the LoRA repository's E2E files)."""
    examples = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        line = line.strip()  # their converter strips each line (the trailing space before the newline goes)
        if not line:
            continue
        if "||" not in line:
            raise UserError(f"{path}:{number}: no '||' between the context and the completion")
        prompt, completion = line.split("||", 1)
        examples.append(check_example({"prompt": prompt, "completion": completion}, f"{path}:{number}"))
    return examples


def read_examples(path):
    """The examples of a .jsonl or a .txt (context||completion) file."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".txt":
        return read_lora_lines(path)
    raise UserError(f"{path}: unknown kind of file (expected .jsonl, or .txt with context||completion lines)")


# ----------------------------------------------------------------------------------------------------------
# Grouping, for scoring.

def group_key(example):
    """What makes examples one scoring unit: their group if they have one, else their prompt."""
    return ("group", example["group"]) if "group" in example else ("prompt", example["prompt"])


def check_groups(examples, wheres):
    """Examples of one explicit group must share the prompt (the model sees one input) and the category."""
    first = {}
    for example, where in zip(examples, wheres, strict=True):
        if "group" not in example:
            continue
        key = group_key(example)
        if key not in first:
            first[key] = (example, where)
            continue
        earlier, earlier_where = first[key]
        for field in ("prompt", "category"):
            if example.get(field) != earlier.get(field):
                raise UserError(f"{where}: group {example['group']!r} has another {field} than on line "
                                 f"{earlier_where.rsplit(':', 1)[1]}")


def group_examples(examples):
    """[(prompt, [references], category), ...]: each group once, in order of first appearance, its references
    being its examples' completions in order. A group's category is its first example's (None if it has none).
    To score one category, keep its examples first and then group them (as gpt2_decode.py --filter does)."""
    groups = {}  # dicts keep insertion order
    for example in examples:
        key = group_key(example)
        if key not in groups:
            groups[key] = (example["prompt"], [], example.get("category"))
        groups[key][1].append(example["completion"])
    return list(groups.values())


# ----------------------------------------------------------------------------------------------------------
# Tokenizing and writing.

def prompt_tokens(enc, prompt):
    """The tokens the model is given: the prompt, then <|endoftext|>. encode_ordinary reads the text
    "<|endoftext|>" inside a prompt as plain characters, so the only special token is the EOT added here."""
    return enc.encode_ordinary(prompt) + [EOT]


def example_tokens(enc, example):
    """One example's tokens (prompt + EOT + " " completion + EOT) and its prompt length."""
    prompt = prompt_tokens(enc, example["prompt"])
    return prompt + enc.encode_ordinary(" " + example["completion"]) + [EOT], len(prompt)


def tokenize(enc, examples):
    """(tokens uint16, offsets int64, prompt_lens int32): example i is tokens[offsets[i]:offsets[i + 1]], its first
    prompt_lens[i] tokens being the prompt; the arrays data/e2e/batches.py's Split holds."""
    tokens, offsets, prompt_lens = [], [0], []
    for example in tqdm(examples, desc="tokenizing", unit=" examples", leave=False):
        ids, prompt_len = example_tokens(enc, example)
        tokens.extend(ids)
        offsets.append(len(tokens))
        prompt_lens.append(prompt_len)
    # GPT-2's 50,257 ids fit in 16 bits
    return (np.array(tokens, dtype=np.uint16), np.array(offsets, dtype=np.int64),
            np.array(prompt_lens, dtype=np.int32))


def split_files(split):
    return f"{split}_groups.json", f"{split}.npz"  # the .npz last: a split whose .npz is there is complete


def is_prepared(data_dir, split):
    return all((Path(data_dir) / name).is_file() for name in split_files(split))


def write_split(data_dir, split, enc, examples, force=False, data_format=FORMAT):
    """Tokenize examples and write {split}.npz and {split}_groups.json into data_dir. They are written into a
    temporary folder inside data_dir and moved to their names only when both are complete, the .npz last, so a
    split is whole or absent (on any error, nothing new is left). Returns (number of examples, of tokens)."""
    data_dir = Path(data_dir)
    if not examples:
        raise UserError(f"no examples to write for {split}")
    if not force and any((data_dir / name).exists() for name in split_files(split)):
        raise UserError(f"{data_dir} already holds the {split} split; pass --force to replace it, or another --out")
    tokens, offsets, prompt_lens = tokenize(enc, examples)
    groups = [{"prompt": p, "references": refs, "category": c} for p, refs, c in group_examples(examples)]
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{split}."))
    try:
        groups_name, npz_name = split_files(split)
        (tmp / groups_name).write_text(json.dumps(groups, ensure_ascii=False, indent=1), encoding="utf-8")
        np.savez(tmp / npz_name, tokens=tokens, offsets=offsets, prompt_lens=prompt_lens, format=np.array(data_format))
        (data_dir / npz_name).unlink(missing_ok=True)  # the old split stops counting as prepared first
        os.replace(tmp / groups_name, data_dir / groups_name)
        os.replace(tmp / npz_name, data_dir / npz_name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return len(examples), len(tokens)


def load_groups(data_dir, split):
    """The groups write_split wrote: [(prompt, [references], category), ...]."""
    path = Path(data_dir) / split_files(split)[0]
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
        return [(i["prompt"], list(i["references"]), i["category"]) for i in items]
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: damaged ({e})") from None


# ----------------------------------------------------------------------------------------------------------
# Preparing a folder: your own files, or a task's downloaded ones.

def task_of(data_format):
    """The task a prepared format belongs to: webnlg, dart, prompt_completion (your own data), else e2e (E2E's
    "paper" and "plain" formats)."""
    return data_format if data_format in TASK_FORMATS else "e2e"


def data_dir(task):
    """The folder a task's files are downloaded and prepared into by default: data/e2e, data/webnlg, data/dart."""
    return Path(__file__).resolve().parent / task


def prepare_files(out, paths, reader=read_examples, data_format=FORMAT, force=False):
    """Read each split's file with reader and write the split into out; every file is read (and checked) before
    anything is written, and if anything fails an `out` made here goes. Returns {split: (examples, tokens)}."""
    with output_folder(out, paths, force):
        enc = get_tokenizer()
        examples = {split: reader(path) for split, path in paths.items()}
        return {split: write_split(out, split, enc, found, force, data_format) for split, found in examples.items()}


def prepare_task(out, source, splits, names, urls, what, reader, data_format, force=False):
    """A task's splits: its files (names[split]) read from source, or downloaded into out where missing (one error
    naming every file that could not be had), then prepared into out."""
    out = Path(out)
    paths = {split: Path(source or out) / names[split] for split in splits}
    with output_folder(out, paths, force):  # checked before the downloads, and gone if they fail
        if source is None:
            fetch_or_list([(f"{what} {paths[s].name}", urls[s], paths[s]) for s in splits if not paths[s].is_file()])
        return prepare_files(out, paths, reader, data_format, force)


def output_folder(out, splits, force):
    """The prepared folder as an output (plumbing/outputs.py): the files of `splits` are refused if they are there
    already, unless `force`."""
    return outputs.folder(out, holds=[name for split in splits for name in split_files(split)], force=force)


def print_written(written, out):
    for split, (n, n_tokens) in written.items():
        print(f"{split}: {n:,} examples, {n_tokens:,} tokens -> {Path(out) / (split + '.npz')}")


def task_main(argv, description, default_out, names, urls, what, reader, data_format):
    """The command line of data/webnlg/prepare.py and data/dart/prepare.py."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--source", type=Path, default=None, help=f"a folder holding {', '.join(names.values())}; they "
                   "are read from there (nothing is downloaded) (default: none, they are downloaded into --out)")
    p.add_argument("--out", "--data", dest="out", type=Path, default=default_out,
                   help=f"the folder to write to (and download to); default {default_out}")
    p.add_argument("--splits", nargs="+", choices=list(names), default=list(names),
                   help="the splits to prepare (default: all three)")
    p.add_argument("--force", action="store_true", help="replace the files of a split prepared before "
                   "(default: refuse)")
    args = p.parse_args(argv)
    with reported():
        written = prepare_task(args.out, args.source, args.splits, names, urls, what, reader, data_format, args.force)
    print_written(written, args.out)


def main(argv=None):
    p = argparse.ArgumentParser(description="Prepare your own prompt -> completion data for train.py and eval.py: "
                                "JSON Lines with 'prompt' and 'completion' (and optional 'group', 'category'), or "
                                "the LoRA repository's 'context||completion' lines (.txt).")
    p.add_argument("--train", type=Path, required=True, help="the training examples (.jsonl or .txt)")
    p.add_argument("--dev", type=Path, required=True, help="the examples of the dev loss (.jsonl or .txt)")
    p.add_argument("--test", type=Path, default=None, help="the examples eval.py decodes and scores (default: none; "
                   "eval.py --split dev scores the dev examples)")
    p.add_argument("--out", type=Path, required=True, help="the folder to write, e.g. data/mine")
    p.add_argument("--force", action="store_true", help="replace the files of a split prepared before "
                   "(default: refuse)")
    args = p.parse_args(argv)
    paths = {split: getattr(args, split) for split in ("train", "dev", "test") if getattr(args, split) is not None}
    with reported():
        written = prepare_files(args.out, paths, force=args.force)
    print_written(written, args.out)


if __name__ == "__main__":
    main()
