"""metrics/ter.py against hand-worked cases and against sacrebleu's TER (the tercom reimplementation)."""

import json
import random
from pathlib import Path

import pytest

from metrics.ter import BEAM_WIDTH, MAX_SHIFT_DIST, MAX_SHIFT_SIZE, corpus_ter, edits, segment_stats

DART_DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dart" / "dart-v1.1.1-full-dev.json"


def sacrebleu_ter(hyps, refs, case_sensitive=False):
    """sacrebleu's corpus TER as a fraction; refs[i] is hyps[i]'s list (padded with None into streams)."""
    from sacrebleu.metrics import TER

    n = max(map(len, refs))
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(n)]
    return TER(case_sensitive=case_sensitive).corpus_score(hyps, streams).score / 100


HAND_CASES = [  # (hyps, refs, TER worked by hand)
    (["a b c d e"], [["a b c d e"]], 0.0),
    # one shift of "a b" to the end is 1 edit; without shifts it would be 2 deletions + 2 insertions (0.8)
    (["c d e a b"], [["a b c d e"]], 1 / 5),
    # a shift and a substitution
    (["c d x a b"], [["a b c d e"]], 2 / 5),
    # the closest reference's edits (1 substitution) over the MEAN reference length (6 + 3) / 2
    (["the cat sat"], [["the cat sat on the mat", "a cat sat"]], 1 / 4.5),
    # an empty hypothesis: every reference word is inserted
    ([""], [["a b c"]], 1.0),
    # an empty reference: 3 deletions over length 0 -> 1.0; all empty -> 0.0
    (["a b c"], [[""]], 1.0),
    ([""], [[""]], 0.0),
    # the corpus score is total edits / total length (4 / 5), not the mean of the sentence scores (0.875)
    (["a", "x"], [["a b c d"], ["y"]], 4 / 5),
    # words are lower-cased by default
    (["The CAT sat"], [["the cat Sat"]], 0.0),
    # a phrase of 12 words moved as one needs two shifts: one shift moves at most MAX_SHIFT_SIZE = 10 words
    (["z " + " ".join(f"w{i}" for i in range(12))], [[" ".join(f"w{i}" for i in range(12)) + " z"]], 1 / 13),
]


@pytest.mark.parametrize("hyps, refs, expected", HAND_CASES)
def test_hand_cases(hyps, refs, expected):
    assert corpus_ter(hyps, refs) == pytest.approx(expected, abs=1e-12)
    assert sacrebleu_ter(hyps, refs) == pytest.approx(expected, abs=1e-12)


def test_case_sensitive():
    assert corpus_ter(["The CAT sat"], [["the cat Sat"]], case_sensitive=True) == pytest.approx(1.0)
    assert sacrebleu_ter(["The CAT sat"], [["the cat Sat"]], case_sensitive=True) == pytest.approx(1.0)


def test_shift_of_more_than_max_size_words_is_not_one_edit():
    # "z" moved past 12 words is one shift of "z" itself; moving the 12 words as a phrase is not allowed
    words = [f"w{i}" for i in range(12)]
    assert MAX_SHIFT_SIZE == 10
    assert edits(["z", *words], [*words, "z"]) == 1
    # a 12-word phrase with nothing else to move: two shifts (10 + 2 words) or fewer plain edits
    assert edits([*words[6:], "x", *words[:6]], [*words[:6], "x", *words[6:]]) == 2


@pytest.mark.parametrize("n, expected", [(49, 1), (50, 1), (51, 2)])
def test_shift_distance_limit_at_its_boundary(n, expected):
    """z w0 .. w(n-1) against w0 .. w(n-1) z: z's place in the reference is n words from its place in the
    hypothesis. Up to MAX_SHIFT_DIST = 50 words it is one shift (1 edit); at 51 z cannot be shifted, and no shift
    of w words helps, so it is deleted and inserted (2 edits). The same from the other side, and as sacrebleu."""
    assert MAX_SHIFT_DIST == 50
    words = [f"w{i}" for i in range(n)]
    for hyp, ref in (["z", *words], [*words, "z"]), ([*words, "z"], ["z", *words]):
        assert edits(hyp, ref) == expected
        assert corpus_ter([" ".join(hyp)], [[" ".join(ref)]]) == pytest.approx(expected / (n + 1), abs=1e-12)
        assert sacrebleu_ter([" ".join(hyp)], [[" ".join(ref)]]) == pytest.approx(expected / (n + 1), abs=1e-12)


@pytest.mark.parametrize("n, expected", [(9, 1), (10, 1), (11, 2)])
def test_shift_size_limit_at_its_boundary(n, expected):
    """b0 .. b19 a0 .. a(n-1) against a0 .. a(n-1) b0 .. b19: moving the n a-words to the front is one shift up to
    MAX_SHIFT_SIZE = 10 words; 11 take two shifts (and the 20 b-words two as well). As sacrebleu."""
    a, b = [f"a{i}" for i in range(n)], [f"b{i}" for i in range(20)]
    assert edits([*b, *a], [*a, *b]) == expected
    assert sacrebleu_ter([" ".join(b + a)], [[" ".join(a + b)]]) == pytest.approx(expected / (n + 20), abs=1e-12)


@pytest.mark.parametrize("n, expected", [(49, 49), (50, 50), (52, 53)])
def test_edit_distance_band_at_its_edge(n, expected):
    """n unmatched words, then the n words of the reference: the cheapest path deletes the first n words while it
    stays at reference position 0, n / 2 positions off the (length-scaled) diagonal. Up to BEAM_WIDTH = 25 off it
    is inside the band (n = 50: 50 deletions); at n = 52 the band (26 off) cuts it and costs one edit more, 53, as
    tercom's and sacrebleu's band does. A band of 24 gives 51 at n = 50, one of 26 gives 52 at n = 52."""
    assert BEAM_WIDTH == 25
    hyp, ref = [f"z{i}" for i in range(n)] + [f"w{i}" for i in range(n)], [f"w{i}" for i in range(n)]
    assert edits(hyp, ref) == expected
    assert sacrebleu_ter([" ".join(hyp)], [[" ".join(ref)]]) == pytest.approx(expected / n, abs=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        corpus_ter(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="item 0"):
        corpus_ter(["a"], [[]])
    with pytest.raises(ValueError, match="item 0"):
        corpus_ter(["a"], ["a"])


def test_random_word_lists_equal_sacrebleu():
    """Seeded random sentences: long ones (the edit distance's band, shifts farther than 50 words) and few
    distinct words (many candidate shifts, so the cap on candidates is reached)."""
    rng = random.Random(1)
    vocab = "a b c d e the of and to in".split()
    hyps, refs = [], []
    for _ in range(40):
        v = vocab[:rng.choice([2, 4, 10])]
        ref = [rng.choice(v) for _ in range(rng.choice([0, 1, 5, 20, 30, 60]))]
        hyp = list(ref) if rng.random() < 0.5 else [rng.choice(v) for _ in range(rng.choice([0, 3, 20, 60]))]
        for _ in range(rng.randint(0, 3) if hyp else 0):  # move a few phrases around
            i, j, n = rng.randrange(len(hyp)), rng.randrange(len(hyp)), rng.randint(1, 5)
            phrase = hyp[i:i + n]
            del hyp[i:i + n]
            hyp[j:j] = phrase
        hyps.append(" ".join(hyp))
        refs.append([" ".join(ref)])
    for hyp, ref in zip(hyps, refs, strict=True):
        assert corpus_ter([hyp], [ref]) == pytest.approx(sacrebleu_ter([hyp], [ref]), abs=1e-12)
    assert corpus_ter(hyps, refs) == pytest.approx(sacrebleu_ter(hyps, refs), abs=1e-12)


@pytest.mark.skipif(not DART_DEV.is_file(), reason="../shared/data/dart is not here")
def test_dart_references_against_each_other_equal_sacrebleu():
    """100 DART dev entries with 2+ references (254 sentences): the first scored against the others."""
    entries = json.loads(DART_DEV.read_text(encoding="utf-8"))
    texts = [[a["text"] for a in e["annotations"]] for e in entries if len(e["annotations"]) >= 2][:100]
    assert sum(map(len, texts)) == 254
    from sacrebleu.metrics import TER

    sacre = TER()
    ours_edits = ours_length = theirs_edits = theirs_length = 0
    for hyp, *refs in texts:
        n_edits, length = segment_stats(hyp, refs)
        theirs = sacre.sentence_score(hyp, refs)  # its integer edits and mean reference length
        assert (n_edits, length) == (theirs.num_edits, pytest.approx(theirs.ref_length, abs=1e-12))
        ours_edits, ours_length = ours_edits + n_edits, ours_length + length
        theirs_edits, theirs_length = theirs_edits + theirs.num_edits, theirs_length + theirs.ref_length
    assert ours_edits / ours_length == pytest.approx(theirs_edits / theirs_length, abs=1e-12)
    assert 0.3 < ours_edits / ours_length < 0.8  # references of one input differ, far less than unrelated ones
