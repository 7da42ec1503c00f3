"""data/e2e/prepare.py and batches.py: CSV rows -> token arrays (paper or plain format) -> batches whose loss
covers exactly the completions.

Uses ../shared/data/e2e (the official dev and test CSVs) when it is there, else a small CSV written here.
"""

import csv
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from data.e2e import batches, prepare
from data.tasks import EOT, get_tokenizer
from plumbing.errors import UserError

pytestmark = pytest.mark.tokenizer  # these tests tokenize text (see conftest.py)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "e2e"
LORA_FORMAT = SHARED.parent / "e2e_lora_format" / "valid.txt"
HAVE_SHARED = (SHARED / "devset.csv").is_file() and (SHARED / "testset_w_refs.csv").is_file()

# Used when the shared data is absent, and always where a test needs these exact texts. Rows 1-2 and 4 share
# an MR; row 3 quotes a comma and a quote; row 5's reference contains the special token's text.
SMALL_ROWS = [
    ("name[Café Rouge], priceRange[£20-25]", "Café Rouge costs £20-25 a head."),
    ("name[Café Rouge], priceRange[£20-25]", "At Café Rouge you pay about £20-25."),
    ("name[The Eagle], eatType[pub], near[Burger King]", 'The Eagle, a "pub", is near Burger King.'),
    ("name[Café Rouge], priceRange[£20-25]", "Café Rouge: £20-25."),
    ("name[Zizzi], area[riverside]", "Zizzi is by the river.<|endoftext|> Really."),
    ("name[Aromi], eatType[coffee shop], food[French], customer rating[5 out of 5], area[city centre]",
     "Aromi is a highly rated French coffee shop in the city centre, well worth a visit for breakfast."),
]


def write_csv(path: Path, rows, header=("mr", "ref")) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def padding(split, order) -> int:
    """Padded positions over all batches: each batch is as long as its longest example."""
    return sum(int(split.lengths[b].max() * len(b) - split.lengths[b].sum()) for b in order)


def example(split, i):
    """Example i's tokens (int64) and its prompt length."""
    return split.tokens[split.offsets[i]:split.offsets[i + 1]].astype(np.int64), int(split.prompt_lens[i])


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory) -> Path:
    """A --source folder: a slice of the official devset.csv (rows with £ and é in it) as devset.csv and
    trainset.csv, or SMALL_ROWS when the shared data is absent."""
    folder = tmp_path_factory.mktemp("csv")
    if HAVE_SHARED:
        lines = (SHARED / "devset.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        # Line 0 is the header; rows 340-345 name "Café Sicilia", rows 728-733 have a £ price range.
        text = "".join(lines[0:31] + lines[340:346] + lines[728:734])
        assert "£" in text and "é" in text
        (folder / "devset.csv").write_text(text, encoding="utf-8")
    else:
        write_csv(folder / "devset.csv", SMALL_ROWS)
    (folder / "trainset.csv").write_bytes((folder / "devset.csv").read_bytes())
    return folder


@pytest.fixture(scope="module")
def dev(csv_dir, tmp_path_factory):
    """(rows, Split) of the dev slice prepared in the plain format."""
    data_dir = tmp_path_factory.mktemp("data")
    prepare.prepare(data_dir, source=csv_dir, splits=("dev",), data_format="plain")
    return prepare.read_csv(csv_dir / "devset.csv"), batches.load_split(data_dir, "dev")


@pytest.fixture(scope="module")
def full_dev(tmp_path_factory):
    """The whole official dev set prepared, or a synthetic split with lengths 10..99 when it is absent."""
    if not HAVE_SHARED:
        lengths = np.random.default_rng(0).integers(10, 100, size=1000)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return batches.Split(np.zeros(offsets[-1], np.uint16), offsets, np.full(1000, 5, np.int32))
    data_dir = tmp_path_factory.mktemp("full")
    prepare.prepare(data_dir, source=SHARED, splits=("dev",))
    return batches.load_split(data_dir, "dev")


def test_stored_tokens_decode_to_exactly_prompt_completion_eot(dev):
    rows, split = dev
    enc = get_tokenizer()
    assert len(split) == len(rows) and len(rows) >= 6
    for i, (mr, ref) in enumerate(rows):
        tokens, prompt_len = example(split, i)
        assert enc.decode(tokens.tolist()) == f"{mr} || {ref}<|endoftext|>"
        assert enc.decode(tokens[:prompt_len].tolist()) == f"{mr} ||"
        assert prompt_len == len(enc.encode_ordinary(f"{mr} ||"))
        assert tokens[-1] == EOT and np.count_nonzero(tokens == EOT) == 1
    assert split.tokens.dtype == np.uint16 and split.offsets[-1] == len(split.tokens)


def test_pound_and_e_acute_round_trip_and_text_never_makes_special_tokens(tmp_path):
    # The CSV gets a byte-order mark, as some editors write it; it must not end up in the first MR.
    src = tmp_path / "src"
    src.mkdir()
    write_csv(src / "devset.csv", SMALL_ROWS)
    (src / "devset.csv").write_bytes(b"\xef\xbb\xbf" + (src / "devset.csv").read_bytes())
    assert prepare.read_csv(src / "devset.csv") == SMALL_ROWS

    prepare.prepare(tmp_path, source=src, splits=("dev",), data_format="plain")
    split = batches.load_split(tmp_path, "dev")
    enc = get_tokenizer()
    texts = [enc.decode(example(split, i)[0].tolist()) for i in range(len(split))]
    assert texts[0] == "name[Café Rouge], priceRange[£20-25] || Café Rouge costs £20-25 a head.<|endoftext|>"
    # "<|endoftext|>" typed inside a reference is plain text: EOT appears once per example, at its end.
    assert np.count_nonzero(split.tokens == EOT) == len(SMALL_ROWS)
    assert texts[4].endswith("river.<|endoftext|> Really.<|endoftext|>")

    # The MR file groups the references of each MR, in order of first appearance.
    assert [(item["mr"], item["refs"]) for item in prepare.load_mrs(tmp_path, "dev")] == [
        ("name[Café Rouge], priceRange[£20-25]", [SMALL_ROWS[0][1], SMALL_ROWS[1][1], SMALL_ROWS[3][1]]),
        (SMALL_ROWS[2][0], [SMALL_ROWS[2][1]]),
        (SMALL_ROWS[4][0], [SMALL_ROWS[4][1]]),
        (SMALL_ROWS[5][0], [SMALL_ROWS[5][1]]),
    ]


def test_loss_mask_covers_exactly_completion_and_eot(dev):
    rows, split = dev
    enc = get_tokenizer()
    indices = np.array([0, 3, len(split) - 1, 2, 1])
    x, y = batches.make_batch(split, indices)
    lengths = [len(example(split, int(i))[0]) for i in indices]
    assert len(set(lengths)) > 1  # the batch needs padding for this test to test it
    assert x.dtype == y.dtype == torch.long
    assert tuple(x.shape) == tuple(y.shape) == (len(indices), max(lengths) - 1)

    for b, i in enumerate(indices):
        mr, ref = rows[i]
        tokens, prompt_len = example(split, int(i))
        n = len(tokens) - 1
        completion = enc.encode_ordinary(f" {ref}") + [EOT]
        targets = y[b][y[b] != -1].tolist()
        assert Counter(targets) == Counter(completion)
        assert targets == completion  # and in order, at positions prompt_len - 1 .. n - 1
        assert (y[b, : prompt_len - 1] == -1).all() and (y[b, prompt_len - 1 : n] != -1).all()
        assert (y[b, n:] == -1).all() and (x[b, n:] == EOT).all()  # padding
        assert x[b, :n].tolist() == tokens[:-1].tolist()
    completions = [len(enc.encode_ordinary(f" {rows[i][1]}")) + 1 for i in indices]  # the text's tokens + EOT
    assert int((y != -1).sum()) == sum(completions) == batches.target_count(split, indices)


def test_unique_mrs_of_official_dev_and_test():
    if not HAVE_SHARED:
        pytest.skip("../shared/data/e2e is absent")
    dev_rows = prepare.read_csv(SHARED / "devset.csv")
    test_rows = prepare.read_csv(SHARED / "testset_w_refs.csv")  # its header is quoted: "mr","ref"
    assert (len(dev_rows), len(test_rows)) == (4672, 4693)
    dev_mrs, test_mrs = prepare.unique_mrs(dev_rows), prepare.unique_mrs(test_rows)
    assert (len(dev_mrs), len(test_mrs)) == (547, 630)
    assert sum(len(refs) for _, refs in dev_mrs) == 4672
    assert dev_mrs[0][0] == "name[Alimentum], area[city centre], familyFriendly[no]"


@pytest.mark.parametrize(
    "body, line, what",
    [
        # A quoted reference on lines 3-4 moves the broken row (itself spanning lines 5-6) to line 5.
        ('"a[1]","one"\n"b[2]","two\nlines"\n"c[3]","three\nlines","extra"\n', 5, "expected 2 fields"),
        ('"a[1]","one"\n,"no mr"\n', 3, "mr is empty"),
        ('"a[1]","one"\n"b[2]"\n', 3, "expected 2 fields"),
    ],
)
def test_broken_row_names_file_and_line(tmp_path, body, line, what):
    path = tmp_path / "file.csv"
    path.write_text("mr,ref\n" + body, encoding="utf-8")
    with pytest.raises(UserError, match=f"file.csv:{line}: .*{what}"):
        prepare.read_csv(path)


def test_wrong_header_is_refused(tmp_path):
    path = write_csv(tmp_path / "file.csv", [("a[1]", "one")], header=("meaning", "text"))
    with pytest.raises(UserError, match="file.csv:1: the header must be mr,ref"):
        prepare.read_csv(path)


def test_batch_order_is_a_seeded_permutation(full_dev):
    n, size = len(full_dev), 7
    assert n % size != 0  # so there is a partial batch to keep
    for bucket in (False, True):
        order = batches.batch_order(full_dev, size, seed=3, epoch=0, bucket=bucket)
        again = batches.batch_order(full_dev, size, seed=3, epoch=0, bucket=bucket)
        other = batches.batch_order(full_dev, size, seed=3, epoch=1, bucket=bucket)
        assert [b.tolist() for b in order] == [b.tolist() for b in again]
        assert sorted(np.concatenate(order).tolist()) == list(range(n))
        assert sorted(np.concatenate(other).tolist()) == list(range(n))
        assert np.concatenate(order).tolist() != np.concatenate(other).tolist()
        # ceil(n / size) batches, all full but one that holds the remainder
        sizes = sorted(len(b) for b in order)
        assert len(order) == -(-n // size) and sizes == [n % size] + [size] * (len(order) - 1)


def test_bucketing_cuts_padding(full_dev):
    plain = batches.batch_order(full_dev, 16, seed=0, epoch=0)
    bucketed = batches.batch_order(full_dev, 16, seed=0, epoch=0, bucket=True)
    assert sorted(np.concatenate(bucketed).tolist()) == list(range(len(full_dev)))
    # Sorting within windows of 50 batches leaves neighbours of almost equal length.
    assert padding(full_dev, bucketed) * 5 < padding(full_dev, plain)
    # ... and the batches are shuffled afterwards, so training does not go from short to long in each window.
    means = [full_dev.lengths[b].mean() for b in bucketed[:50]]
    assert means != sorted(means)


def test_make_batch_pads_to_the_batch_not_a_fixed_length(full_dev):
    for batch in batches.batch_order(full_dev, 16, seed=0, epoch=0, bucket=True)[:5]:
        x, y = batches.make_batch(full_dev, batch)
        assert x.shape[1] == full_dev.lengths[batch].max() - 1
        x16, y16 = batches.make_batch(full_dev, batch, pad_to=16)  # for torch.compile: a few lengths only
        assert x16.shape[1] % 16 == 0 and x16.shape[1] - x.shape[1] < 16
        assert torch.equal(x16[:, :x.shape[1]], x) and (y16[:, x.shape[1]:] == -1).all()


def test_a_csv_in_the_data_folder_is_not_downloaded_again(csv_dir, tmp_path, monkeypatch):
    (tmp_path / "devset.csv").write_bytes((csv_dir / "devset.csv").read_bytes())
    # The dev CSV is there, so no download may happen: a download would fail on this URL.
    monkeypatch.setitem(prepare.URLS, "dev", closed_port_url())
    prepare.prepare(tmp_path, splits=("dev",))
    assert prepare.is_prepared(tmp_path, "dev")
    assert len(batches.load_split(tmp_path, "dev")) == len(prepare.read_csv(csv_dir / "devset.csv"))


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/x.csv"


def test_missing_csv_and_no_network_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(prepare.URLS, "dev", closed_port_url())
    with pytest.raises(UserError) as err:
        prepare.prepare(tmp_path, splits=("dev",))
    assert "\n" not in str(err.value) and "x.csv" in str(err.value)
    assert not (tmp_path / "dev.npz").exists() and not (tmp_path / "devset.csv").exists()

    with pytest.raises(SystemExit) as exit_:
        prepare.main(["--out", str(tmp_path), "--splits", "dev"])
    assert str(exit_.value.code).startswith("error: could not download") and "\n" not in str(exit_.value.code)


def test_missing_or_damaged_arrays_say_how_to_make_them(tmp_path):
    with pytest.raises(UserError, match="run python data/e2e/prepare.py"):
        batches.load_split(tmp_path, "dev")
    (tmp_path / "dev.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="dev.npz: unreadable .*run python data/e2e/prepare.py"):
        batches.load_split(tmp_path, "dev")
    with pytest.raises(UserError, match="run python data/e2e/prepare.py"):
        prepare.load_mrs(tmp_path, "dev")


def test_main_prints_counts(csv_dir, tmp_path, capsys):
    prepare.main(["--source", str(csv_dir), "--data", str(tmp_path), "--splits", "train", "dev"])
    out = capsys.readouterr().out
    n = len(prepare.read_csv(csv_dir / "devset.csv"))
    tokens = len(batches.load_split(tmp_path, "train").tokens)
    assert f"train: {n:,} examples, {tokens:,} tokens (paper format)" in out and f"dev: {n:,} examples" in out
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["dev.npz", "dev.txt", "dev_mrs.json", "train.npz", "train.txt", "train_mrs.json"]


def test_paper_format_equals_the_lora_repository_dev_file_line_for_line(tmp_path):
    """All 4,672 dev lines of microsoft/LoRA's valid.txt, made from the official CSV: context, completion, the
    trailing space; and the tokens are context + EOT + " " completion + EOT, 59.15 per example on average."""
    if not LORA_FORMAT.is_file():
        pytest.skip("../shared/data/e2e_lora_format is absent")
    prepare.prepare(tmp_path, source=SHARED, splits=("dev",))
    ours = (tmp_path / "dev.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    theirs = LORA_FORMAT.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(ours) == len(theirs) == 4672
    assert [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b] == []
    split, enc = batches.load_split(tmp_path, "dev"), get_tokenizer()
    assert split.data_format == "paper" and round(split.lengths.mean(), 2) == 59.15
    context, completion = theirs[0].rstrip("\n").split("||")
    tokens, prompt_len = example(split, 0)
    completion = completion.strip()
    assert tokens.tolist() == enc.encode_ordinary(context) + [EOT] + enc.encode_ordinary(" " + completion) + [EOT]
    assert prompt_len == len(enc.encode_ordinary(context)) + 1
    item = prepare.load_mrs(tmp_path, "dev")[0]
    assert item["format_refs"][0] == completion
    assert item["refs"][0] == prepare.read_csv(SHARED / "devset.csv")[0][1]


@pytest.mark.parametrize("text, tokenized", [
    ("It's family-friendly.", "It 's family - friendly ."),
    ("Prices are £20-25, isn't it?", "Prices are £ 20 - 25 , isn 't it ?"),
    ("rated 1 out of 5. in the city", "rated 1 out of 5. in the city"),
    ("rated 5 out of 5. It is", "rated 5 out of 5 . It is"),
    ("near 'Aromi'..", "near ' Aromi ' .."),
    ("costs 5,300 or 30.99", "costs 5,300 or 30.99"),
])
def test_pretokenize_rules_by_hand(text, tokenized):
    assert prepare.pretokenize(text) == tokenized


# The test split's rules (TEST_WORD_RULES), one case per rule: each expected text differs from what the dev rules
# give, so each case fails if its rule is missing.
@pytest.mark.parametrize("text, tokenized", [
    ("It isn't, they don't, you can't, we won't, they aren't.",
     "It is n't , they do n't , you ca n't , we wo n't , they are n't ."),  # Penn Treebank clitics
    # a hyphen splits two letters or two digits, not a number from a word
    ("a 5-star, family-friendly pub for 20-25 with 1-star food",
     "a 5-star , family - friendly pub for 20 - 25 with 1-star food"),
    ("from £20-£25, 20£-25 or E20-E25.", "from £ 20-£25 , 20£-25 or E20-E25 ."),  # price ranges stay whole
    ("rated 1 out of 5. it is near", "rated 1 out of 5 . it is near"),  # "5." splits its period
    ("an average rating thats based", "an average rating that s based"),
    ("wine and hors d'oeuvre", "wine and hors d'oeuvre"),  # an apostrophe inside a word that starts no clitic
])
def test_pretokenize_test_split_rules_by_hand(text, tokenized):
    assert prepare.pretokenize(text, "test") == tokenized
    assert prepare.pretokenize(text) != tokenized  # the dev file's rules give another text


def test_test_split_keeps_the_dev_rules_elsewhere():
    text = "It's family-friendly, £20-25 at 'The Mill'.."
    assert prepare.pretokenize(text, "test") == prepare.pretokenize(text) == (
        "It 's family - friendly , £ 20 - 25 at ' The Mill ' ..")


def test_prepare_gives_the_test_split_its_rules(tmp_path):
    """The completion tokens, test.txt and format_refs of the test split follow the test rules; the same row
    prepared as the dev split follows the dev rules; the context is the same in both."""
    mr, ref = "name[The Mill], eatType[pub], priceRange[£20-25]", "The Mill isn't a 5-star pub."
    src = tmp_path / "src"
    src.mkdir()
    write_csv(src / "testset_w_refs.csv", [(mr, ref)])
    write_csv(src / "devset.csv", [(mr, ref)])
    prepare.prepare(tmp_path, source=src, splits=("test", "dev"))
    context = "name : The Mill | Type : pub | price : £ 20 - 25"
    for split, completion in [("test", "The Mill is n't a 5-star pub ."), ("dev", "The Mill isn 't a 5 - star pub .")]:
        assert (tmp_path / f"{split}.txt").read_text(encoding="utf-8") == f"{context}||{completion} \n"
        assert prepare.load_mrs(tmp_path, split)[0]["format_refs"] == [completion]
        tokens, prompt_len = example(batches.load_split(tmp_path, split), 0)
        assert get_tokenizer().decode(tokens[prompt_len:].tolist()) == f" {completion}<|endoftext|>"


def test_paper_context_renames_three_attributes_in_mr_order():
    mr = "name[The Mill], eatType[pub], priceRange[£20-25], customer rating[high], familyFriendly[yes]"
    assert prepare.paper_context(mr) == ("name : The Mill | Type : pub | price : £ 20 - 25 | customer rating : high"
                                         " | family friendly : yes")


def test_preparing_another_format_into_a_prepared_folder_is_refused(csv_dir, tmp_path):
    prepare.prepare(tmp_path, source=csv_dir, splits=("dev",), data_format="plain")
    before = (tmp_path / "dev.npz").read_bytes()
    with pytest.raises(UserError, match="already holds dev in the plain format; pass --force"):
        prepare.prepare(tmp_path, source=csv_dir, splits=("dev",), data_format="paper")
    assert (tmp_path / "dev.npz").read_bytes() == before
    prepare.prepare(tmp_path, source=csv_dir, splits=("dev",), data_format="paper", force=True)
    assert batches.load_split(tmp_path, "dev").data_format == "paper"
