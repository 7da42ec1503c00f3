"""WebNLG challenge 2017 -> prompt / completion examples, as the LoRA paper's WebNLG runs saw them.

The files are the JSON that microsoft/LoRA keeps in examples/NLG/data/webnlg_challenge_2017/ (read there by
their format_converting_webnlg.py): {"entries": [{"1": entry}, {"2": entry}, ...]}, each entry holding
    category            e.g. "Airport"
    modifiedtripleset   [{"subject", "property", "object"}, ...]
    lexicalisations     [{"comment", "lex", ...}, ...]: the reference texts; only those marked "good" are used

Each entry's triples become one context, exactly as theirs:
    "Aarhus : leaderName : Jacob_Bundsgaard | Aarhus_Airport : cityServed : Aarhus"
(subject : property : object, as written in the file, underscores and quotes kept, joined by " | "), and each
good lexicalisation one example {"prompt": context, "completion": lex, "category": category}. Entries with the
same context are scored together (data/tasks.py groups by prompt, as their gpt2_decode.py keys on the context).
The paper reports BLEU on the test set's seen categories (the ten of the training set), unseen ones and all.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python data/webnlg/prepare.py`: the project's root, to import the project
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from data import tasks  # noqa: E402
from plumbing.errors import UserError  # noqa: E402

URL = "https://raw.githubusercontent.com/microsoft/LoRA/main/examples/NLG/data/webnlg_challenge_2017/"
SPLITS = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
URLS = {split: URL + name for split, name in SPLITS.items()}
DATA_DIR = Path(__file__).resolve().parent  # where the files are downloaded and prepared by default

# The categories of the training set; the test set adds five unseen ones (Artist, Athlete, CelestialBody,
# MeanOfTransportation, Politician). The same ten as format_converting_webnlg.py's `seen` list.
SEEN_CATEGORIES = ("Airport", "Astronaut", "Building", "City", "ComicsCharacter", "Food", "Monument",
                   "SportsTeam", "University", "WrittenWork")
KEEP_COMMENT = "good"  # lexicalisations marked "toFix" are left out, as theirs are
NOT_2017 = "not the WebNLG 2017 JSON of microsoft/LoRA's data/webnlg_challenge_2017"


def is_seen(category):
    """Whether a category is one of the training set's ten."""
    return category in SEEN_CATEGORIES


def context(triples):
    """The prompt for a triple set: "subject : property : object | subject : property : object"."""
    return " | ".join(f"{t['subject']} : {t['property']} : {t['object']}" for t in triples)


def entries(path):
    """[(category, triples, good lexicalisations), ...] of a WebNLG 2017 file, in file order, after checking its
    layout: anything else (the 2020 release, a file with keys missing) is a one-line error naming the file."""
    data = tasks.read_json(path, NOT_2017)
    items = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: no list of 'entries' at the top; {NOT_2017}")
    out = []
    for number, item in enumerate(items, start=1):
        # Their converter reads entry i as entries[i - 1][str(i)]: each entry is keyed by its 1-based position.
        entry = item.get(str(number)) if isinstance(item, dict) and len(item) == 1 else None
        if not isinstance(entry, dict):
            raise UserError(f"{path}: entry {number} is not an object keyed {str(number)!r}; {NOT_2017}")
        for key, kind in (("category", str), ("modifiedtripleset", list), ("lexicalisations", list)):
            if not isinstance(entry.get(key), kind):
                raise UserError(f"{path}: entry {number} has no {key!r} ({kind.__name__}); {NOT_2017}")
        triples, lexes = entry["modifiedtripleset"], entry["lexicalisations"]
        if not triples or not all(isinstance(t, dict) and all(isinstance(t.get(k), str)
                                                              for k in ("subject", "property", "object"))
                                  for t in triples):
            raise UserError(f"{path}: entry {number}: a triple without subject, property and object; {NOT_2017}")
        if not all(isinstance(lex, dict) and isinstance(lex.get("lex"), str) and "comment" in lex
                   for lex in lexes):
            raise UserError(f"{path}: entry {number}: a lexicalisation without 'lex' and 'comment'; {NOT_2017}")
        good = [lex["lex"] for lex in lexes if lex["comment"] == KEEP_COMMENT and lex["lex"].strip()]
        out.append((entry["category"], triples, good))
    return out


def examples(path):
    """The examples of a WebNLG 2017 file in the plain format: one per good lexicalisation, in file order."""
    return [{"prompt": context(triples), "completion": lex, "category": category}
            for category, triples, good in entries(path) for lex in good]


def main(argv=None):
    description = ("Download the WebNLG challenge 2017 splits (microsoft/LoRA's JSON) and prepare them as prompt -> "
                   "completion examples for train.py and eval.py: one example per good lexicalisation, references "
                   "grouped per triple set, categories kept.")
    tasks.task_main(argv, description, DATA_DIR, SPLITS, URLS, "WebNLG 2017", examples, "webnlg")


if __name__ == "__main__":
    main()
