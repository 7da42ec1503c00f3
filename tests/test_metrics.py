"""metrics/e2e.py: the official E2E scores, against sacrebleu, nltk, pycocoevalcap and numbers worked out by hand.

Uses the first 60 MRs of ../shared/data/e2e/devset.csv when it is there, else the small set below.
"""

import csv
import math
import shutil
from pathlib import Path

import pytest

from data.e2e import prepare
from metrics import e2e as metrics
from plumbing.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "e2e"
HAVE_SHARED = (SHARED / "devset.csv").is_file() and (SHARED / "testset_w_refs.csv").is_file()
HAVE_JAVA = shutil.which("java") is not None

# Used when the shared data is absent: E2E-like references, 2 to 4 per MR, with £, é and clitics.
SMALL_REFS = [
    ["Café Rouge is a family-friendly coffee shop near The Eagle, costing £20-25.",
     "Near The Eagle, the coffee shop Café Rouge costs £20-25 and welcomes families.",
     "Café Rouge, near The Eagle, is a coffee shop for families with prices of £20-25."],
    ["The Punter is a cheap French restaurant in the city centre.",
     "In the city centre there is a cheap restaurant called The Punter that serves French food."],
    ["Zizzi is a pub by the riverside with a 5 out of 5 rating. It isn't family-friendly.",
     "Rated 5 out of 5, Zizzi is a riverside pub that's not for children.",
     "Zizzi, a riverside pub, has a customer rating of 5 out of 5 and is not kid friendly.",
     "The pub Zizzi by the river is rated 5 out of 5; it's not family friendly."],
    ["Aromi is an Italian coffee shop with a low customer rating, near the Crowne Plaza Hotel.",
     "Near Crowne Plaza Hotel, Aromi serves Italian food and has a low rating."],
    ["The Wrestlers serves Japanese food for less than £20 in the riverside area.",
     "For under £20 you can have Japanese food at The Wrestlers by the riverside.",
     "The Wrestlers offers cheap Japanese food, under £20, on the riverside."],
    ["Blue Spice is an expensive coffee shop in the city centre (near Avalon).",
     "In the city centre, near Avalon, you'll find Blue Spice, a coffee shop with high prices."],
]


def perturbed(text: str, i: int) -> str:
    """Every third hypothesis as is, the next with its last two words dropped, the next with two swapped."""
    words = text.split()
    if i % 3 == 1:
        words = words[:-2]
    elif i % 3 == 2:
        words[0], words[1] = words[1], words[0]
    return " ".join(words)


def e2e_refs(csv_path) -> list[list[str]]:
    """The references of each unique MR of an E2E CSV, in order of first appearance."""
    return [refs for _, refs in prepare.unique_mrs(prepare.read_csv(csv_path))]


@pytest.fixture(scope="module")
def corpus():
    """(hyps, refs): per MR, its first reference (perturbed) as the hypothesis, the other references (1 to
    40-odd, a variable number) as the references."""
    all_refs = e2e_refs(SHARED / "devset.csv")[:60] if HAVE_SHARED else SMALL_REFS
    hyps = [perturbed(refs[0], i) for i, refs in enumerate(all_refs)]
    return hyps, [refs[1:] for refs in all_refs]


# --------------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------------


def test_mteval_tokenize_hand_cases():
    assert metrics.mteval_tokenize("The CAFÉ, £20-25.") == ["the", "café", ",", "£20", "-", "25", "."]
    assert metrics.mteval_tokenize("3.5 stars, 1,000 people") == ["3.5", "stars", ",", "1,000", "people"]
    assert metrics.mteval_tokenize('It\'s family-friendly &amp; "near"') == [
        "it's", "family-friendly", "&", '"', "near", '"']
    assert metrics.mteval_tokenize("") == [""]  # pymteval: an empty text is one empty token


def test_mteval_tokenize_equals_sacrebleu_13a(corpus):
    tokenize_13a = pytest.importorskip("sacrebleu.tokenizers.tokenizer_13a").Tokenizer13a()
    texts = [text for refs in corpus[1] for text in refs] + [t for refs in SMALL_REFS for t in refs]
    for text in texts:
        assert metrics.mteval_tokenize(text) == tokenize_13a(text.lower()).split(), text


def test_ptb_tokenize_hand_cases():
    # Expected tokens are what Stanford's PTBTokenizer 3.4.1 (-preserveLines -lowerCase) wrote for these
    # lines, minus coco-caption's punctuation.
    assert metrics.ptb_tokenize("The Eagle's £20-25, isn't it?") == [
        "the", "eagle", "'s", "#", "20-25", "is", "n't", "it"]
    assert metrics.ptb_tokenize("In the city center., near St. Louis (U.S.) they can't.") == [
        "in", "the", "city", "center.", "near", "st.", "louis", "-lrb-", "u.s.", "-rrb-", "they", "ca", "n't"]
    assert metrics.ptb_tokenize("\u201cCafé Rouge\u201d costs €20 -25 in the '90s; kids' menu\u2026") == [
        "café", "rouge", "costs", "$", "20", "-25", "in", "the", "'90s", "kids", "menu"]
    assert metrics.ptb_tokenize("A 5-star pub, 3.5 km away, £20 - £25!?") == [
        "a", "5-star", "pub", "3.5", "km", "away", "#", "20", "#", "25", "!?"]
    assert metrics.ptb_tokenize("The '1 out of 5' shop cannot") == [
        "the", "1", "out", "of", "5", "shop", "can", "not"]
    assert metrics.ptb_tokenize("") == []


@pytest.mark.skipif(not HAVE_JAVA, reason="needs java for Stanford's PTBTokenizer")
def test_ptb_tokenize_equals_the_java_tokenizer():
    """Token for token the same as coco-caption's Java tokenizer on every dev reference (or the small set)."""
    ptbtokenizer = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    texts = [t for refs in SMALL_REFS for t in refs]
    if HAVE_SHARED:
        texts += [t for refs in e2e_refs(SHARED / "devset.csv") for t in refs]
    java = ptbtokenizer.PTBTokenizer().tokenize({i: [{"caption": t}] for i, t in enumerate(texts)})
    for i, text in enumerate(texts):
        assert " ".join(metrics.ptb_tokenize(text)) == java[i][0], text


# --------------------------------------------------------------------------------------------------------
# BLEU
# --------------------------------------------------------------------------------------------------------


def test_bleu_equals_sacrebleu(corpus):
    sacrebleu = pytest.importorskip("sacrebleu")
    hyps, refs = corpus
    # sacrebleu wants one stream per reference position: pad MRs with fewer references with None.
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(max(map(len, refs)))]
    expected = sacrebleu.corpus_bleu(hyps, streams, tokenize="13a", lowercase=True).score / 100
    assert len({len(rs) for rs in refs}) > 1  # the references really are of variable number
    assert metrics.bleu(hyps, refs) == pytest.approx(expected, abs=1e-6)


def test_bleu_hand_worked_brevity_penalty_and_closest_length_tie():
    # MR 1: hyp a b c d e (5 tokens); refs of 7 and 3 tokens are equally near: the shorter, 3, counts.
    #       matches 5/5, 4/4, 3/3, 2/2 (the hypothesis is inside the first reference).
    # MR 2: hyp p q x s (4 tokens), one ref of 8 tokens: closest length 8.
    #       unigrams p q s match: 3/4; bigram "p q": 1/3; trigrams 0/2; 4-grams 0/1.
    # Corpus: precisions 8/9, 5/7, 3/5, 2/3; hyp length 9 < ref length 3 + 8 = 11: BP = exp(1 - 11/9).
    # (Had the tie gone to the longer reference, the ref length would be 15 and BP exp(1 - 15/9).)
    hyps = ["a b c d e", "p q x s"]
    refs = [["a b c d e f g", "a b c"], ["p q r s t u v w"]]
    expected = math.exp(1 - 11 / 9) * (8 / 9 * 5 / 7 * 3 / 5 * 2 / 3) ** (1 / 4)  # = 0.568440...
    assert metrics.bleu(hyps, refs) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.56844, abs=1e-5)


def test_bleu_perfect_hypotheses_give_1(corpus):
    _, refs = corpus
    assert metrics.bleu([rs[0] for rs in refs], refs) == 1.0
    # Case and the way £ and é are written (É lowercases to é) do not matter.
    assert metrics.bleu(["CAFÉ ROUGE costs £20-25."], [["Café Rouge costs £20-25."]]) == 1.0


def test_bleu_empty_hypothesis_follows_pymteval():
    # pymteval: "" is one empty token; n-gram totals are len - n + 1 without clamping. MR 1 ("" vs "x y"):
    # totals 1, 0, -1, -2, closest ref length 2. MR 2 (6 tokens, identical to its ref): totals 6, 5, 4, 3.
    # Corpus: matches 6, 5, 4, 3 over totals 7, 5, 3, 1 (precisions above 1!); hyp length 7 < 8: BP
    # exp(1 - 8/7). BLEU = exp(-1/7) * (6/7 * 5/5 * 4/3 * 3/1) ** (1/4) = 1.17960..., above 1 as the
    # official scorer would print it.
    hyps = ["", "a b c d e f"]
    refs = [["x y"], ["a b c d e f"]]
    expected = math.exp(1 - 8 / 7) * (6 / 7 * 5 / 5 * 4 / 3 * 3 / 1) ** (1 / 4)
    assert metrics.bleu(hyps, refs) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------------------
# NIST
# --------------------------------------------------------------------------------------------------------


def test_nist_equals_nltk_with_one_reference_per_mr(corpus):
    """nltk's corpus_nist agrees only with one reference per MR: with more, it scores each MR against its
    single best reference and takes that reference's length, where mteval clips against all references at
    once and averages their lengths. The same sums in another order: equal to ~1e-15, asserted to 1e-9."""
    nist_score = pytest.importorskip("nltk.translate.nist_score")
    hyps, refs = corpus
    one_ref = [rs[:1] for rs in refs]
    expected = nist_score.corpus_nist([[metrics.mteval_tokenize(r) for r in rs] for rs in one_ref],
                                      [metrics.mteval_tokenize(h) for h in hyps], n=5)
    assert metrics.nist(hyps, one_ref) == pytest.approx(expected, rel=1e-9)


def test_nist_hand_worked_information_and_length_rule():
    # References of the corpus: "a b", "a c" (MR 1) and "b c d" (MR 2): 7 words; a:2 b:2 c:2 d:1,
    # bigrams (a b):1 (a c):1 (b c):1 (c d):1, one trigram (b c d).
    # info(a) = info(b) = log2(7/2); info(a b) = log2(count(a) / count(a b)) = log2(2/1) = 1.
    # MR 1, hyp "a b": matches a, b and (a b). MR 2, hyp "a": no match.
    # Hyp n-gram totals (len - n + 1, unclamped): 3, 1, -1, -3, -5; only orders 1 and 2 have matches:
    # score = 2 * log2(7/2) / 3 + 1 / 1 = 2.2049...
    # Length rule (pymteval): ref length = mean(2, 2) + mean(3) = 5; ratio 3/5: penalty
    # exp(-beta * ln(3/5)^2), beta = -ln(0.5) / ln(1.5)^2. (The Perl rule, 7 words / 1.5 refs per MR = 4.67,
    # would give a different penalty.)
    beta = -math.log(0.5) / math.log(1.5) ** 2
    expected = (2 * math.log2(7 / 2) / 3 + 1) * math.exp(-beta * math.log(3 / 5) ** 2)  # = 0.73381...
    assert metrics.nist(["a b", "a"], [["a b", "a c"], ["b c d"]]) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(0.73381, abs=1e-5)
    perl_rule = (2 * math.log2(7 / 2) / 3 + 1) * math.exp(-beta * math.log(3 / (7 / 1.5)) ** 2)
    assert abs(perl_rule - expected) > 0.05


def test_nist_empty_hypotheses_do_not_crash():
    # Every total is 1 - n + 1 <= 0 except for unigrams, and nothing matches: 0, where pymteval divides by 0.
    assert metrics.nist([""], [["a b"]]) == 0.0


# --------------------------------------------------------------------------------------------------------
# ROUGE-L and CIDEr-D, against pycocoevalcap on the same tokens
# --------------------------------------------------------------------------------------------------------


def coco_inputs(hyps, refs):
    """pycocoevalcap's (gts, res) dictionaries, holding ptb_tokenize's tokens joined by spaces."""
    gts = {i: [" ".join(metrics.ptb_tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(metrics.ptb_tokenize(h))] for i, h in enumerate(hyps)}
    return gts, res


def test_rouge_l_and_cider_d_equal_pycocoevalcap(corpus):
    rouge = pytest.importorskip("pycocoevalcap.rouge.rouge")
    cider = pytest.importorskip("pycocoevalcap.cider.cider")  # coco's Cider is CIDEr-D (clipping, penalty)
    hyps, refs = corpus
    hyps = hyps[:3] + [""] + hyps[4:]  # an empty hypothesis scores 0 in both
    gts, res = coco_inputs(hyps, refs)
    assert metrics.rouge_l(hyps, refs) == pytest.approx(rouge.Rouge().compute_score(gts, res)[0], rel=1e-12)
    assert metrics.cider_d(hyps, refs) == pytest.approx(cider.Cider().compute_score(gts, res)[0], rel=1e-9)


def test_rouge_l_hand_worked():
    # MR 1: hyp a b c d; LCS with "a c d e f" is 3 (a c d), with "b d" 2. Best precision 3/4 (first ref),
    # best recall 2/2 (second ref): F = (1 + 1.2^2) * 0.75 * 1 / (1 + 1.2^2 * 0.75) = 1.83 / 2.08.
    # MR 2: nothing in common: 0. Mean 0.879808 / 2 = 0.439904.
    expected = (1.83 / 2.08 + 0.0) / 2
    score = metrics.rouge_l(["a b c d", "x"], [["a c d e f", "b d"], ["y"]])
    assert score == pytest.approx(expected, rel=1e-12)


def test_cider_d_hand_worked():
    # Two MRs, so idf = ln 2 - ln(max(1, df)) = ln 2 for every n-gram here (each occurs in one MR's refs or
    # none). MR 1: hyp a b c vs ref a b; all weights ln 2.
    #   unigrams: dot 2 ln2^2 / (sqrt(3) ln2 * sqrt(2) ln2) = 2 / sqrt(6); bigrams: 1 / sqrt(2);
    #   trigrams: the reference has none: 0; 4-grams: 0.
    #   Length = bigram count: 2 vs 1, penalty exp(-1 / (2 * 6^2)) = exp(-1/72).
    #   10 x mean over the 4 orders, / 1 reference.
    # MR 2: hyp c vs ref d: 0. CIDEr-D = the mean of both.
    expected = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72) / 2  # = 1.878236...
    assert metrics.cider_d(["a b c", "c"], [["a b"], ["d"]]) == pytest.approx(expected, rel=1e-12)
    # A perfect 2-token hypothesis: unigrams 1, bigrams 1, no 3- or 4-grams: 10 * 2/4 = 5; the other MR 0.
    assert metrics.cider_d(["a b", "c"], [["a b"], ["d"]]) == pytest.approx(2.5, rel=1e-12)


# --------------------------------------------------------------------------------------------------------
# METEOR and score_all
# --------------------------------------------------------------------------------------------------------


def test_meteor_is_none_without_java(monkeypatch):
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    assert metrics.meteor(["a b"], [["a b"]]) is None
    scores = metrics.score_all(["a b c d", "x"], [["a c d e f", "b d"], ["y"]])
    assert list(scores) == ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"]
    assert scores["METEOR"] is None
    assert scores["ROUGE_L"] == metrics.rouge_l(["a b c d", "x"], [["a c d e f", "b d"], ["y"]])
    assert scores["BLEU"] == metrics.bleu(["a b c d", "x"], [["a c d e f", "b d"], ["y"]])


@pytest.mark.skipif(not HAVE_JAVA, reason="METEOR runs meteor-1.5.jar")
def test_meteor_runs_the_jar_as_the_official_scorer():
    """One run (the jar takes seconds to load its paraphrase table). The expected number is what
    pycocoevalcap's own PTBTokenizer().tokenize + Meteor().compute_score, the official scorer's calls,
    returned for these inputs."""
    pytest.importorskip("pycocoevalcap.meteor.meteor")
    hyps, refs = [rs[0] for rs in SMALL_REFS], [rs[1:] for rs in SMALL_REFS]
    assert metrics.meteor(hyps, refs) == pytest.approx(0.34994396565417907, rel=1e-9)


def test_inputs_are_checked():
    with pytest.raises(UserError, match="2 hypotheses but 1"):
        metrics.bleu(["a", "b"], [["a"]])
    with pytest.raises(UserError, match="item 0"):
        metrics.rouge_l(["a"], [[]])


def test_fix_mojibake_repairs_the_references_only_as_the_official_scorer(monkeypatch):
    """measure_scores.py repairs mis-decoded £ and é in the CSV it reads the references from, not in a text
    file of outputs."""
    assert metrics.fix_mojibake("CafÃ© costs Â£20, cafã© Ł25, Café £30") == \
        "Café costs £20, café £25, Café £30"
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)  # no METEOR: no Java run
    clean = "Café Rouge near the river costs £20-25 and is family friendly."
    broken = clean.replace("é", "Ã©").replace("£", "Â£")
    assert metrics.score_all([clean], [[broken]])["BLEU"] == 1.0  # the reference is repaired
    assert metrics.score_all([broken], [[clean]])["BLEU"] < 0.8  # the hypothesis is not


# --------------------------------------------------------------------------------------------------------
# The references: prepare.read_csv + prepare.unique_mrs, the one reader of E2E CSVs
# --------------------------------------------------------------------------------------------------------


def write_rows(path, rows, header=("mr", "ref")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_e2e_csv_groups_references_by_mr_in_first_appearance_order(tmp_path):
    rows = [("name[Café Rouge], priceRange[£20-25]", "Café Rouge costs £20-25."),
            ("name[Zizzi]", 'Zizzi, a "pub".'),
            ("name[Café Rouge], priceRange[£20-25]", "At Café Rouge you pay £20-25."),
            ("name[Aromi]", "Aromi costs £20.")]
    items = prepare.unique_mrs(prepare.read_csv(write_rows(tmp_path / "small.csv", rows)))
    assert [mr for mr, _ in items] == ["name[Café Rouge], priceRange[£20-25]", "name[Zizzi]", "name[Aromi]"]
    assert [refs for _, refs in items] == [["Café Rouge costs £20-25.", "At Café Rouge you pay £20-25."],
                                           ['Zizzi, a "pub".'], ["Aromi costs £20."]]


def test_e2e_csv_errors_name_the_broken_line(tmp_path):
    path = write_rows(tmp_path / "broken.csv", [("name[Zizzi]", "Zizzi is a pub."), ("name[Aromi]",)])
    with pytest.raises(UserError, match=r"broken\.csv:3: "):
        prepare.read_csv(path)
    path = write_rows(tmp_path / "header.csv", [("name[Zizzi]", "Zizzi.")], header=("meaning", "text"))
    with pytest.raises(UserError, match=r"header\.csv:1: "):
        prepare.read_csv(path)
    with pytest.raises(UserError, match="no such file"):
        prepare.read_csv(tmp_path / "missing.csv")


@pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared/data/e2e")
def test_the_official_files():
    refs = e2e_refs(SHARED / "devset.csv")
    assert (len(refs), sum(map(len, refs))) == (547, 4672)
    refs = e2e_refs(SHARED / "testset_w_refs.csv")
    assert (len(refs), sum(map(len, refs))) == (630, 4693)
    assert any("£" in r for rs in refs for r in rs) and any("é" in r for rs in refs for r in rs)
    # ... written correctly: the scorer's repairs change nothing in them
    assert all(metrics.fix_mojibake(r) == r for rs in refs for r in rs)
