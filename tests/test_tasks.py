"""data/tasks.py: the plain prompt -> completion format, its readers' errors, tokens, groups and prepared splits."""

import json
from pathlib import Path

import numpy as np
import pytest

from data import tasks

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VALID_TXT = SHARED / "e2e_lora_format" / "valid.txt"
DEVSET_CSV = SHARED / "e2e" / "devset.csv"


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def jsonl(path, *items):
    return write(path, "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


# ----------------------------------------------------------------------------------------------------------
# Reading

def test_read_jsonl_keeps_the_fields_of_the_plain_format(tmp_path):
    path = tmp_path / "train.jsonl"
    write(path, "\ufeff" + json.dumps({"prompt": "a : b", "completion": "A is b.", "group": 7, "category": "X",
                                       "source": "ignored"}) + "\n\n"
          + json.dumps({"prompt": "", "completion": "Free text \u2028 with a line separator."}) + "\n")
    assert tasks.read_jsonl(path) == [
        {"prompt": "a : b", "completion": "A is b.", "group": 7, "category": "X"},
        {"prompt": "", "completion": "Free text \u2028 with a line separator."},
    ]
    assert tasks.read_examples(path) == tasks.read_jsonl(path)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "a", "completion": "b"', "line 2: not JSON"),
    ('["a", "b"]', "line 2: expected a JSON object, found list"),
    ('{"completion": "b"}', "line 2: no 'prompt' field"),
    ('{"prompt": "a"}', "line 2: no 'completion' field"),
    ('{"prompt": "a", "completion": 3}', "line 2: 'completion' must be a string, found int"),
    ('{"prompt": ["a"], "completion": "b"}', "line 2: 'prompt' must be a string, found list"),
    ('{"prompt": "a", "completion": "  "}', "line 2: the completion is empty"),
    ('{"prompt": "a", "completion": "b", "group": true}', "line 2: 'group' must be a string or an integer"),
    ('{"prompt": "a", "completion": "b", "category": 1}', "line 2: 'category' must be a string"),
    ('{"prompt": "other", "completion": "b", "group": "g"}', "line 2: group 'g' has another prompt than on line 1"),
    ('{"prompt": "a", "completion": "b", "group": "g", "category": "Y"}', "line 2: group 'g' has another category"),
])
def test_a_bad_jsonl_line_is_a_one_line_error_naming_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "bad.jsonl", json.dumps({"prompt": "a", "completion": "b", "group": "g"}) + "\n"
                 + line + "\n")
    with pytest.raises(ValueError) as e:
        tasks.read_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ") and message.split(": ", 1)[1] in str(e.value)
    assert "\n" not in str(e.value)


def test_non_utf8_and_empty_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    # the 0-based offset of the first bad byte in the file: 36 bytes of line 1, then 14 of line 2
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 50: "):
        tasks.read_jsonl(path)
    for name, content in [("empty.jsonl", ""), ("blank.txt", "\n \n")]:
        with pytest.raises(ValueError, match=f"{name}: the file is empty"):
            tasks.read_examples(write(tmp_path / name, content))
    with pytest.raises(ValueError, match="missing.jsonl: no such file"):
        tasks.read_examples(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="data.csv: unknown kind of file"):
        tasks.read_examples(write(tmp_path / "data.csv", "a,b\n"))


def test_read_lora_lines(tmp_path):
    path = write(tmp_path / "valid.txt", "name : A | area : city||A is in the city . \n\n"
                 "x : y||a || b \r\nno separator here\n")
    with pytest.raises(ValueError, match=r"valid.txt:4: no '\|\|' between"):
        tasks.read_lora_lines(path)
    write(path, "name : A | area : city||A is in the city . \nx : y||a || b \r\nx : y|| \n")
    with pytest.raises(ValueError, match="valid.txt:3: the completion is empty"):
        tasks.read_lora_lines(path)
    write(path, "name : A | area : city||A is in the city . \nx : y||a || b \r\n")
    assert tasks.read_examples(path) == [{"prompt": "name : A | area : city", "completion": "A is in the city ."},
                                         {"prompt": "x : y", "completion": "a || b"}]


@pytest.mark.skipif(not VALID_TXT.is_file(), reason="../shared/data/e2e_lora_format is not here")
def test_the_lora_repositorys_e2e_dev_file():
    examples = tasks.read_lora_lines(VALID_TXT)
    assert len(examples) == 4672
    assert examples[0] == {"prompt": "name : Alimentum | area : city centre | family friendly : no",
                           "completion": "There is a place in the city centre , Alimentum , that is not family - "
                                         "friendly ."}
    groups = tasks.group_examples(examples)
    assert len(groups) == 547  # the dev set's unique MRs
    assert sum(len(refs) for _, refs, _ in groups) == 4672


# ----------------------------------------------------------------------------------------------------------
# Grouping

def test_groups_by_group_else_by_prompt_in_order_of_first_appearance():
    examples = [{"prompt": "p1", "completion": "r1", "category": "A"},
                {"prompt": "p2", "completion": "r2"},
                {"prompt": "p1", "completion": "r3", "category": "B"},  # same prompt: same group, first category
                {"prompt": "p3", "completion": "r4", "group": 1},
                {"prompt": "p3", "completion": "r5", "group": 2},  # same prompt, another explicit group
                {"prompt": "p3", "completion": "r6", "group": 1}]
    assert tasks.group_examples(examples) == [("p1", ["r1", "r3"], "A"), ("p2", ["r2"], None),
                                              ("p3", ["r4", "r6"], None), ("p3", ["r5"], None)]


# ----------------------------------------------------------------------------------------------------------
# Tokens and prepared splits

@pytest.mark.tokenizer
def test_tokens_are_the_lora_repositorys_encoding():
    from data.tasks import get_tokenizer

    enc = get_tokenizer()
    examples = [{"prompt": "a : b", "completion": "Hello <|endoftext|> world"}, {"prompt": "", "completion": "x"}]
    tokens, offsets, prompt_lens = tasks.tokenize(enc, examples)
    first = enc.encode_ordinary("a : b") + [tasks.EOT] + enc.encode_ordinary(" Hello <|endoftext|> world") + [
        tasks.EOT]
    second = [tasks.EOT] + enc.encode_ordinary(" x") + [tasks.EOT]
    assert tokens.tolist() == first + second
    assert offsets.tolist() == [0, len(first), len(first) + len(second)]
    assert prompt_lens.tolist() == [len(enc.encode_ordinary("a : b")) + 1, 1]
    assert (tokens.dtype, offsets.dtype, prompt_lens.dtype) == (np.uint16, np.int64, np.int32)


@pytest.mark.tokenizer
@pytest.mark.skipif(not (VALID_TXT.is_file() and DEVSET_CSV.is_file()), reason="../shared/data is not here")
def test_valid_txt_tokenizes_as_the_e2e_paper_format():
    """The LoRA repository's E2E lines, read as plain examples, give data/e2e/prepare.py's paper tokens."""
    from data.e2e import prepare

    enc = tasks.get_tokenizer()
    rows = prepare.read_csv(DEVSET_CSV)
    tokens, offsets, prompt_lens = tasks.tokenize(enc, tasks.read_lora_lines(VALID_TXT))
    expected = [prepare.example_tokens(enc, mr, ref, "paper") for mr, ref in rows]
    assert tokens.tolist() == [t for ids, _ in expected for t in ids]
    assert prompt_lens.tolist() == [n for _, n in expected]


@pytest.mark.tokenizer
def test_write_split_is_read_by_load_split(tmp_path):
    from data.e2e.batches import load_split, make_batch
    from data.tasks import get_tokenizer

    enc = get_tokenizer()
    examples = [{"prompt": "a : b", "completion": "A is b.", "category": "X"},
                {"prompt": "a : b", "completion": "B is a.", "category": "X"},
                {"prompt": "c : d", "completion": "C is d."}]
    assert tasks.write_split(tmp_path, "train", enc, examples) == (3, len(tasks.tokenize(enc, examples)[0]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.npz", "train_groups.json"]  # nothing else left
    split = load_split(tmp_path, "train")
    assert len(split) == 3 and split.data_format == tasks.FORMAT
    x, y = make_batch(split, [0])
    n_prompt = len(enc.encode_ordinary("a : b")) + 1
    assert (y[0, :n_prompt - 1] == -1).all() and y[0, n_prompt - 1] == enc.encode_ordinary(" A")[0]
    assert tasks.load_groups(tmp_path, "train") == [("a : b", ["A is b.", "B is a."], "X"),
                                                    ("c : d", ["C is d."], None)]


class FakeEncoder:
    """Enough of tiktoken's Encoding for tests that check files, not tokens: one id per character."""

    def encode_ordinary(self, text):
        return [ord(c) % 50000 for c in text]


def test_an_existing_split_is_kept_unless_forced(tmp_path):
    enc = FakeEncoder()
    tasks.write_split(tmp_path, "dev", enc, [{"prompt": "p", "completion": "old"}])
    with pytest.raises(ValueError, match=f"{tmp_path} already holds the dev split; pass --force to replace it"):
        tasks.write_split(tmp_path, "dev", enc, [{"prompt": "p", "completion": "new"}])
    assert tasks.load_groups(tmp_path, "dev") == [("p", ["old"], None)]
    tasks.write_split(tmp_path, "dev", enc, [{"prompt": "p", "completion": "new"}], force=True)
    assert tasks.load_groups(tmp_path, "dev") == [("p", ["new"], None)]
    with pytest.raises(ValueError, match="no examples to write for test"):
        tasks.write_split(tmp_path, "test", enc, [])


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tasks.write_split(tmp_path, "train", FakeEncoder(), [{"prompt": "p", "completion": "c"}])
    assert list(tmp_path.iterdir()) == []  # neither the groups file nor the temporary folder
    assert not tasks.is_prepared(tmp_path, "train")
