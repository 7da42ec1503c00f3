"""DART v1.1.1 -> prompt / completion examples, as the LoRA paper's DART runs saw them.

The files are the dataset's JSON (Yale-LILY/dart, data/v1.1.1/; microsoft/LoRA's format_converting_dart.py reads
the same ones): a list of entries, each holding
    tripleset     [[subject, relation, object], ...]
    annotations   [{"source", "text"}, ...]: the reference texts

Each entry's triples become one context, exactly as theirs: the relation lower-cased, the rest as written,
    "Mars Hill College : joined : 1973 | Mars Hill College : location : Mars Hill, North Carolina"
and each annotation one example {"prompt": context, "completion": text}. Entries with the same context are scored
together (data/tasks.py groups by prompt, as their gpt2_decode.py keys on the context). An annotation whose text
is empty is left out (theirs would keep it): there is nothing to learn from or score against.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/dart/prepare.py`: the project's root, to import the project
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import tasks  # noqa: E402
from plumbing.errors import UserError  # noqa: E402

URL = "https://raw.githubusercontent.com/Yale-LILY/dart/master/data/v1.1.1/"
SPLITS = {"train": "dart-v1.1.1-full-train.json", "dev": "dart-v1.1.1-full-dev.json",
          "test": "dart-v1.1.1-full-test.json"}
URLS = {split: URL + name for split, name in SPLITS.items()}
DATA_DIR = Path(__file__).resolve().parent  # where the files are downloaded and prepared by default
NOT_DART = "not a DART v1.1.1 JSON file (a list of entries with 'tripleset' and 'annotations')"


def context(tripleset):
    """The prompt for a triple set: "subject : relation : object | ...", relations lower-cased."""
    return " | ".join(f"{subject} : {relation.lower()} : {obj}" for subject, relation, obj in tripleset)


def entries(path):
    """[(tripleset, texts), ...] of a DART file, in file order, after checking its layout (one-line errors)."""
    data = tasks.read_json(path, NOT_DART)
    if not isinstance(data, list) or not data:
        raise UserError(f"{path}: no list of entries at the top; {NOT_DART}")
    out = []
    for number, entry in enumerate(data, start=1):
        if not (isinstance(entry, dict) and isinstance(entry.get("tripleset"), list)
                and isinstance(entry.get("annotations"), list)):
            raise UserError(f"{path}: entry {number} has no 'tripleset' and 'annotations' lists; {NOT_DART}")
        tripleset = entry["tripleset"]
        if not tripleset or not all(isinstance(t, list) and len(t) == 3 and all(isinstance(x, str) for x in t)
                                    for t in tripleset):
            raise UserError(f"{path}: entry {number}: a triple that is not [subject, relation, object]; "
                             f"{NOT_DART}")
        if not all(isinstance(a, dict) and isinstance(a.get("text"), str) for a in entry["annotations"]):
            raise UserError(f"{path}: entry {number}: an annotation without a 'text'; {NOT_DART}")
        out.append((tripleset, [a["text"] for a in entry["annotations"] if a["text"].strip()]))
    return out


def examples(path):
    """The examples of a DART file in the plain format: one per annotation, in file order."""
    return [{"prompt": context(tripleset), "completion": text} for tripleset, texts in entries(path) for text in texts]


def main(argv=None):
    description = ("Download the DART v1.1.1 splits and prepare them as prompt -> completion examples for train.py and "
                   "eval.py: one example per annotation, references grouped per triple set.")
    tasks.task_main(argv, description, DATA_DIR, SPLITS, URLS, "DART", examples, "dart")


if __name__ == "__main__":
    main()
