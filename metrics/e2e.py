"""The five E2E NLG challenge scores, computed the way the challenge's official scorer computes them.

The official scorer is measure_scores.py from github.com/tuetschek/e2e-metrics, run with -p as the LoRA
paper's code runs it (eval/e2e/measure_scores.py e2e_ref.txt e2e_pred.txt -p). It prints

    BLEU     pymteval.BLEUScore: corpus BLEU-4, mteval-v13a tokenization, lowercased      (0..1)
    NIST     pymteval.NISTScore: corpus NIST-5, same tokenization                           (>= 0; ~8.5)
    METEOR   coco-caption: Java PTB tokenizer, then METEOR 1.5 (meteor-1.5.jar)           (0..1)
    ROUGE_L  coco-caption: Java PTB tokenizer, then LCS F-measure, beta 1.2                 (0..1)
    CIDEr    coco-caption: Java PTB tokenizer, then CIDEr-D (coco's "Cider" is CIDEr-D)    (0..10)

and this module returns each in the same unit (papers print BLEU, METEOR, ROUGE_L x100: "BLEU 70.4" is
0.704 here). All but METEOR are plain Python + numpy; METEOR needs Java and the jar pycocoevalcap ships.

How close each score is to the official one:

| metric  | computed here                        | agreement with the official scorer                    |
|---------|--------------------------------------|-------------------------------------------------------|
| BLEU    | pymteval's algorithm, step by step   | same number (float rounding, ~1e-15). Equals          |
|         |                                      | sacrebleu corpus_bleu(tokenize="13a", lowercase=True) |
|         |                                      | / 100 when every hypothesis has >= 3 tokens and every |
|         |                                      | n-gram order has a match; else the quirks below rule. |
| NIST    | pymteval's algorithm, step by step   | same number (~1e-15); where an n-gram order has no    |
|         |                                      | hypothesis n-grams at all it divides by 1 (pymteval   |
|         |                                      | raises ZeroDivisionError; lxuechen's fork does this). |
| METEOR  | pycocoevalcap's Java PTB tokenizer   | the same programs on the same input: identical.       |
|         | and meteor-1.5.jar, as the scorer    | None when java or pycocoevalcap is missing.           |
| ROUGE_L | ptb_tokenize (Python), coco's ROUGE  | identical whenever ptb_tokenize gives the Java        |
| CIDEr   | ptb_tokenize (Python), coco CIDEr-D  | tokenizer's tokens, as it does on all 9,365 dev and   |
|         |                                      | test references; rare constructs differ (below).      |

Quirks kept on purpose, because the official scorer has them:
- mteval_tokenize("") is [""], one empty token: an empty hypothesis has length 1 for BLEU and NIST.
- BLEU and NIST count len(hyp) - n + 1 n-grams of order n even when that is negative (a 2-token hypothesis
  adds -1 to the 4-gram count); sacrebleu and mteval-v13a.pl count max(0, ...). A zero match count is
  floored at 1e-15 (no smoothing): a corpus without a single 4-gram match scores ~1e-5, not exactly 0.
- NIST's reference length is the sum over MRs of the mean reference length of that MR. The Perl
  mteval-v13a-sig.pl (measure_scores.py without -p) instead divides the total reference words by the mean
  number of references per MR; the two agree only when every MR has the same number of references.
- CIDEr-D's Gaussian length penalty compares bigram counts (coco counts "length" at n-gram index 1), and its
  idf is log(number of MRs / document frequency) over the references being scored: with a single MR every
  idf is 0 and CIDEr-D is 0.
- The Java PTB tokenizer lowercases "-LRB-" to "-lrb-", so coco's punctuation filter (which lists "-LRB-")
  keeps brackets as tokens; £ becomes "#", € becomes "$", ¢ becomes "cents".

Where ptb_tokenize may differ from Stanford's PTBTokenizer 3.4.1 (none of these occur in the E2E references):
its abbreviation list is shorter (a period stays on "st.", "etc.", "mr.", "u.s.", single letters, and before
",;:"; Java also keeps it on "no." before a number and on ~100 more abbreviations); "'tis", "y'all",
"rock'n'roll" stay whole; "a!b", "a?b", "no.1" and "4.5/5" are split differently; "#tag", "@name" and "<tag>"
are split; "½" is not rewritten as "1/2"; a combining accent (e + U+0301) is split from its letter.
"""

import math
import re
import shutil
import subprocess
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from plumbing.errors import UserError

# ---------------------------------------------------------------------------------------------------------
# BLEU and NIST: pymteval (measure_scores.py -p)
# ---------------------------------------------------------------------------------------------------------

BLEU_ORDER = 4
NIST_ORDER = 5
# NIST's length penalty is exp(-beta * log(ratio)^2), beta chosen so that a system 2/3 as long as the
# references gets a penalty of 0.5 (mteval-v13a.pl).
NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2

# mteval-v13a's "punctuation": { | } ~  [ \ ] ^ _ `  space ! " # $ % &  ( ) * +  : ; < = > ? @  /
# Note what is missing: - . , and the apostrophe, which the next three rules treat separately.
_MTEVAL_PUNCT = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_MTEVAL_PERIOD_COMMA_AFTER = re.compile(r"([^0-9])([\.,])")  # split . and , unless a digit comes before
_MTEVAL_PERIOD_COMMA_BEFORE = re.compile(r"([\.,])([^0-9])")  # ... or after them (so 3.5 and 1,000 stay)
_MTEVAL_DASH_AFTER_DIGIT = re.compile(r"([0-9])(-)")  # 20-25 -> 20 - 25, but family-friendly stays


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's tokenization as pymteval does it, then lowercased: "£20-25, ok." -> ["£20", "-", ...].

    "" gives [""] (one empty token), exactly as pymteval: an empty hypothesis counts as one token.
    """
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    text = _MTEVAL_PUNCT.sub(r" \1 ", text)
    text = _MTEVAL_PERIOD_COMMA_AFTER.sub(r"\1 \2 ", text)
    text = _MTEVAL_PERIOD_COMMA_BEFORE.sub(r" \1 \2", text)
    text = _MTEVAL_DASH_AFTER_DIGIT.sub(r"\1 \2 ", text)
    text = re.sub(r"\s+", " ", text).strip()
    # pymteval lowercases tokens (str.lower, so É -> é too) after splitting; split(" ") keeps "" -> [""].
    return [token.lower() for token in text.split(" ")]


def ngram_counts(tokens: list[str], n: int) -> Counter:
    """How often each n-gram (a tuple of n tokens) occurs in tokens."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def clipped_matches(hyp: list[str], refs: list[list[str]], n: int) -> Counter:
    """Each hypothesis n-gram's count, clipped to the most times any one reference contains it."""
    most_in_one_ref = Counter()
    for ref in refs:
        most_in_one_ref |= ngram_counts(ref, n)  # | keeps the larger count of each n-gram
    return ngram_counts(hyp, n) & most_in_one_ref  # & keeps the smaller count, drops zeros


def closest_ref_length(hyp_len: int, ref_lens: list[int]) -> int:
    """The reference length nearest to hyp_len; of two equally near, the shorter (mteval, pymteval)."""
    return min(ref_lens, key=lambda ref_len: (abs(ref_len - hyp_len), ref_len))


def _bleu_tokens(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """Corpus BLEU-4 of tokenized hypotheses, exactly as pymteval.BLEUScore (0..1)."""
    matches = [0] * BLEU_ORDER  # clipped n-gram matches, summed over the corpus
    totals = [0] * BLEU_ORDER  # hypothesis n-grams, summed over the corpus
    ref_length = 0  # the closest reference length, summed over the corpus
    for hyp, hyp_refs in zip(hyps, refs, strict=True):
        for n in range(1, BLEU_ORDER + 1):
            matches[n - 1] += sum(clipped_matches(hyp, hyp_refs, n).values())
            totals[n - 1] += len(hyp) - n + 1  # pymteval does not clamp this at 0
        ref_length += closest_ref_length(len(hyp), [len(ref) for ref in hyp_refs])

    hyp_length = totals[0]
    brevity_penalty = 1.0
    if hyp_length <= ref_length:
        brevity_penalty = math.exp(1.0 - ref_length / (hyp_length if hyp_length else 1e-5))
    # Geometric mean of the n-gram precisions; pymteval floors a zero count at 1e-15 and a zero total at
    # 1e-9 so the log is defined (no real smoothing: one order without matches makes BLEU ~1e-5).
    log_precision = sum(math.log(max(m, 1e-15) / max(t, 1e-9)) for m, t in zip(matches, totals, strict=True))
    return brevity_penalty * math.exp(log_precision / BLEU_ORDER)


def _nist_tokens(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """Corpus NIST-5 of tokenized hypotheses, exactly as pymteval.NISTScore."""
    # Information weights come from every reference of the corpus: info(w1..wn) = log2(count(w1..wn-1) /
    # count(w1..wn)), where the count of the empty prefix () is the total number of reference words.
    ref_counts = Counter()
    for hyp_refs in refs:
        for ref in hyp_refs:
            ref_counts[()] += len(ref)
            for n in range(1, NIST_ORDER + 1):
                ref_counts.update(ngram_counts(ref, n))

    def info(ngram):
        return math.log2(ref_counts[ngram[:-1]] / ref_counts[ngram])

    matched_info = [0.0] * NIST_ORDER  # information of the clipped matches, summed over the corpus
    totals = [0] * NIST_ORDER  # hypothesis n-grams, summed over the corpus (not clamped at 0, as pymteval)
    ref_length = 0.0  # the sum over MRs of the MR's mean reference length (pymteval's rule)
    for hyp, hyp_refs in zip(hyps, refs, strict=True):
        for n in range(1, NIST_ORDER + 1):
            matched = clipped_matches(hyp, hyp_refs, n)
            matched_info[n - 1] += sum(info(ngram) * count for ngram, count in matched.items())
            totals[n - 1] += len(hyp) - n + 1
        ref_length += sum(len(ref) for ref in hyp_refs) / len(hyp_refs)

    # pymteval divides by totals[n] and crashes when it is 0 (a corpus of one-token hypotheses); divide by 1.
    score = sum(info_sum / (total if total != 0 else 1)
                for info_sum, total in zip(matched_info, totals, strict=True))
    ratio = totals[0] / ref_length
    if ratio >= 1:
        return score
    if ratio <= 0:
        return 0.0
    return score * math.exp(-NIST_BETA * math.log(ratio) ** 2)


def tokenized(hyps: list[str], refs: list[list[str]], tokenize) -> tuple[list, list]:
    """Every hypothesis and reference split into tokens by `tokenize`, after checking the inputs' shape."""
    _check_inputs(hyps, refs)
    return [tokenize(h) for h in hyps], [[tokenize(r) for r in rs] for rs in refs]


def bleu(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 in 0..1 as the official E2E scorer prints it (papers print it x100)."""
    return _bleu_tokens(*tokenized(hyps, refs, mteval_tokenize))


def nist(hyps: list[str], refs: list[list[str]]) -> float:
    """Corpus NIST with 1- to 5-grams, information weights from the references, as the official scorer."""
    return _nist_tokens(*tokenized(hyps, refs, mteval_tokenize))


# ---------------------------------------------------------------------------------------------------------
# The coco-caption tokenizer: Stanford PTBTokenizer -preserveLines -lowerCase, then punctuation removed
# ---------------------------------------------------------------------------------------------------------

# One token of the line, tried in this order at each position:
_PTB_TOKEN = re.compile(
    r"""
    (?P<word>                          # a word, number or compound: family-friendly, 20-25, 30.99, 1,000,
        (?:[-+](?=\d)|\.(?=\d))?       #   9:30, it's (its clitic is split off later), -25 and .5 keep signs
        \w+ (?: (?:[-./'] | (?<=\d)[,:](?=\d)) \w+ )*
    )
    | '(?:s|re|ve|ll|m|d)(?!\w)        # a lone clitic ('s)
    | '\d\ds?(?!\w)                     # a decade ('90, '90s)
    | \.\.\. | -- | [!?]+              # runs that are one token
    | \S                               # any other character is a token by itself
    """,
    re.VERBOSE | re.IGNORECASE,
)
_CLITIC = re.compile(r"(.+?)('(?:s|re|ve|ll|m|d))", re.IGNORECASE)  # it's -> it 's, we're -> we 're
_SPLIT_WORDS = {"cannot", "gonna", "gotta", "wanna", "gimme", "lemme"}  # split after 3 letters: can not
# Abbreviations that keep their period (a subset of PTBLexer's lists; a sentence-final period after one of
# them becomes an extra "." token in Java, which the punctuation filter removes anyway).
_ABBREVIATIONS = {
    "mr", "mrs", "ms", "dr", "drs", "prof", "st", "ste", "ave", "rd", "blvd", "mt", "ft", "sq", "jr", "sr",
    "rev", "gen", "col", "lt", "sgt", "capt", "gov", "sen", "rep", "hon", "pres", "vs", "etc", "al",
    "inc", "co", "cos", "corp", "ltd", "plc", "dept", "univ", "intl", "assn", "est", "ext", "tel", "esq",
    "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    "mon", "tue", "tues", "wed", "thu", "thurs", "fri",
}
_ACRONYM = re.compile(r"[^\W\d_](?:\.[^\W\d_])*")  # x, u.s, p.m: letters joined by periods
# Typographic characters that Java reads as their ASCII forms: curly quotes, guillemets, dashes, ellipsis.
_PTB_CHARACTERS = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201b": "'", "\u201c": '"', "\u201d": '"', "\u00ab": '"', "\u00bb": '"',
    "\u2013": "--", "\u2014": "--", "\u2026": "...",
})
# PTB's escapes and currency normalisation (Java's output, lowercased by -lowerCase).
_PTB_REWRITES = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
                 "£": "#", "€": "$", "¢": "cents"}
# coco-caption's PUNCTUATIONS, removed after tokenizing. It also lists -LRB- -RRB- -LCB- -RCB-, which never
# match the lowercased output; " stands for the `` and '' that Java writes for it.
_PTB_DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}


def ptb_tokenize(text: str) -> list[str]:
    """coco-caption's tokenization in Python: PTB tokens, lowercased, punctuation removed.

    "The Eagle's £20-25, isn't it?" -> ["the", "eagle", "'s", "#", "20-25", "is", "n't", "it"]
    """
    text = text.translate(_PTB_CHARACTERS)
    tokens = []
    for match in _PTB_TOKEN.finditer(text):
        token = match.group()
        previous = tokens[-1] if tokens else None
        if token == "." and previous is not None and previous[1] == match.start():
            # A period right after a word stays on it when more punctuation follows (center., near), or the
            # word is an abbreviation or an acronym; otherwise it ends a sentence and is a token of its own.
            word, following = previous[0], text[match.end():match.end() + 1]
            if following in (",", ";", ":") or word.lower() in _ABBREVIATIONS or _ACRONYM.fullmatch(word):
                tokens[-1] = (word + ".", match.end())
                continue
        tokens.append((token, match.end()))

    words = []
    for token, _ in tokens:
        lower = token.lower()
        if lower in _SPLIT_WORDS:
            words += [lower[:3], lower[3:]]
        elif lower.endswith("n't") and len(lower) > 3:
            words += [lower[:-3], "n't"]  # isn't -> is n't, can't -> ca n't, won't -> wo n't
        elif clitic := _CLITIC.fullmatch(lower):
            words += [clitic.group(1), clitic.group(2)]
        else:
            words.append(_PTB_REWRITES.get(lower, lower))
    return [w for w in words if w not in _PTB_DROPPED]


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L and CIDEr-D: coco-caption's formulas on ptb_tokenize's tokens
# ---------------------------------------------------------------------------------------------------------

ROUGE_BETA = 1.2  # coco-caption's weight of recall over precision
CIDER_ORDER = 4
CIDER_SIGMA = 6.0  # width of CIDEr-D's Gaussian length penalty


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (dynamic programming, row by row)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_l_tokens(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """Mean over MRs of the LCS F-measure with the best precision and the best recall over the references."""
    scores = []
    for hyp, hyp_refs in zip(hyps, refs, strict=True):
        lcs = [lcs_length(ref, hyp) for ref in hyp_refs]
        # An empty text scores 0 (coco splits "" into [""], which matches nothing).
        precision = max(c / len(hyp) if hyp else 0.0 for c in lcs)
        recall = max(c / len(ref) if ref else 0.0 for c, ref in zip(lcs, hyp_refs, strict=True))
        if precision and recall:
            scores.append((1 + ROUGE_BETA**2) * precision * recall / (recall + ROUGE_BETA**2 * precision))
        else:
            scores.append(0.0)
    return float(np.mean(scores))


def _cider_d_tokens(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """coco-caption's CIDEr-D: mean over MRs of 10 x the mean over n of the tf-idf cosine with clipping and a
    Gaussian length penalty, averaged over the MR's references."""
    def counts_of(tokens):
        counts = Counter()
        for n in range(1, CIDER_ORDER + 1):
            counts.update(ngram_counts(tokens, n))
        return counts

    hyp_counts = [counts_of(hyp) for hyp in hyps]
    ref_counts = [[counts_of(ref) for ref in hyp_refs] for hyp_refs in refs]

    # Document frequency: in how many MRs' reference sets an n-gram occurs. idf = log(#MRs) - log(df).
    doc_freq = Counter()
    for counts in ref_counts:
        doc_freq.update(set().union(*counts))
    log_docs = math.log(len(refs))

    def tfidf(counts):
        """Per order: the tf-idf vector {ngram: weight}, its norm; and coco's "length", the bigram count."""
        vectors = [{} for _ in range(CIDER_ORDER)]
        for ngram, tf in counts.items():
            vectors[len(ngram) - 1][ngram] = tf * (log_docs - math.log(max(1.0, doc_freq[ngram])))
        norms = [math.sqrt(sum(w * w for w in vector.values())) for vector in vectors]
        return vectors, norms, sum(tf for ngram, tf in counts.items() if len(ngram) == 2)

    scores = []
    for counts, hyp_ref_counts in zip(hyp_counts, ref_counts, strict=True):
        hyp_vectors, hyp_norms, hyp_length = tfidf(counts)
        per_order = np.zeros(CIDER_ORDER)
        for ref_count in hyp_ref_counts:
            ref_vectors, ref_norms, ref_length = tfidf(ref_count)
            penalty = math.exp(-((hyp_length - ref_length) ** 2) / (2 * CIDER_SIGMA**2))
            for n in range(CIDER_ORDER):
                ref_vector = ref_vectors[n]
                # Clipping: a hypothesis n-gram's weight counts at most as much as the reference's.
                dot = sum(min(w, ref_vector.get(g, 0.0)) * ref_vector.get(g, 0.0)
                          for g, w in hyp_vectors[n].items())
                if hyp_norms[n] and ref_norms[n]:
                    dot /= hyp_norms[n] * ref_norms[n]
                per_order[n] += dot * penalty
        scores.append(10.0 * per_order.mean() / len(hyp_ref_counts))
    return float(np.mean(scores))


def rouge_l(hyps: list[str], refs: list[list[str]]) -> float:
    """coco-caption's ROUGE-L (0..1): LCS F-measure, beta 1.2, best precision and recall over references."""
    return _rouge_l_tokens(*tokenized(hyps, refs, ptb_tokenize))


def cider_d(hyps: list[str], refs: list[list[str]]) -> float:
    """coco-caption's CIDEr-D (0..10): 1- to 4-grams, sigma 6, clipped, idf from these references, x10."""
    return _cider_d_tokens(*tokenized(hyps, refs, ptb_tokenize))


# ---------------------------------------------------------------------------------------------------------
# METEOR: the official Java programs, when they are there
# ---------------------------------------------------------------------------------------------------------


def meteor(hyps: list[str], refs: list[list[str]]) -> float | None:
    """METEOR 1.5 as the official scorer runs it: Java PTB tokenizer, then meteor-1.5.jar -l en -norm.

    None when java is not on PATH or pycocoevalcap (which ships both jars) is not installed: nothing here
    reimplements METEOR's stemmer, synonyms and paraphrase tables. Also None, with a warning saying why,
    when the Java programs fail.
    """
    _check_inputs(hyps, refs)
    if shutil.which("java") is None:
        return None
    try:
        from pycocoevalcap.meteor import meteor as coco_meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        return None
    try:
        # COCOEvalCap's input: {id: [{"caption": text}, ...]}; references and outputs tokenized separately.
        tokenizer = PTBTokenizer()
        tokenized_refs = tokenizer.tokenize({i: [{"caption": r} for r in rs] for i, rs in enumerate(refs)})
        tokenized_hyps = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hyps)})
        jar = Path(coco_meteor.__file__).with_name(coco_meteor.METEOR_JAR)
        return _run_meteor_jar(jar, [tokenized_hyps[i][0] for i in range(len(hyps))],
                               [tokenized_refs[i] for i in range(len(refs))])
    except (OSError, ValueError, subprocess.SubprocessError) as error:
        warnings.warn(f"METEOR not computed, the Java programs failed: {error!r}", stacklevel=2)
        return None


def _run_meteor_jar(jar: Path, hyps: list[str], refs: list[list[str]]) -> float:
    """Talk to meteor-1.5.jar as pycocoevalcap's Meteor class does: one SCORE line per segment returns its
    statistics, then one EVAL line with all of them returns each segment's score and the corpus score."""
    command = ["java", "-jar", "-Xmx2G", jar.name, "-", "-", "-stdio", "-l", "en", "-norm"]
    process = subprocess.Popen(command, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL)

    def send(line: str) -> None:
        process.stdin.write((line + "\n").encode("utf-8"))
        process.stdin.flush()

    try:
        stats = []
        for hyp, hyp_refs in zip(hyps, refs, strict=True):
            hyp = hyp.replace("|||", "").replace("  ", " ")  # ||| separates the fields
            send(" ||| ".join(["SCORE", *hyp_refs, hyp]))
            stats.append(process.stdout.readline().decode("utf-8").strip())
        send(" ||| ".join(["EVAL", *stats]))
        for _ in stats:
            process.stdout.readline()  # the segment scores
        return float(process.stdout.readline().decode("utf-8"))  # the corpus score; ValueError if it died
    finally:
        process.kill()  # the jar would wait for more input
        process.wait()


# ---------------------------------------------------------------------------------------------------------
# All five
# ---------------------------------------------------------------------------------------------------------


# Mis-decoded characters the official scorer repairs, in this order, in every line of a CSV or TSV file it
# reads (measure_scores.read_tsv): reference CSVs, and system outputs given as CSV/TSV. A plain text file
# of outputs, one per line (what eval.py writes, and how the LoRA paper scored), is read as it is.
MOJIBAKE = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def fix_mojibake(text: str) -> str:
    """text with the official scorer's repairs: "Ł" and "Â£" -> "£", "Ã©" and "ã©" -> "é"."""
    for wrong, right in MOJIBAKE:
        text = text.replace(wrong, right)
    return text


def score_all(hyps: list[str], refs: list[list[str]], with_meteor=True) -> dict[str, float | None]:
    """The official scorer's five numbers: BLEU, NIST, METEOR (None without Java, or when with_meteor is
    False: its Java start-up costs seconds), ROUGE_L, CIDEr.

    refs are taken to come from an E2E CSV and hyps from a text file, one per line, as measure_scores.py
    reads them: fix_mojibake is applied to the references only. (The official E2E CSVs hold none of these
    characters, so on them it changes nothing.)
    """
    _check_inputs(hyps, refs)
    refs = [[fix_mojibake(r) for r in rs] for rs in refs]
    mteval_hyps = [mteval_tokenize(h) for h in hyps]
    mteval_refs = [[mteval_tokenize(r) for r in rs] for rs in refs]
    ptb_hyps = [ptb_tokenize(h) for h in hyps]
    ptb_refs = [[ptb_tokenize(r) for r in rs] for rs in refs]
    return {
        "BLEU": _bleu_tokens(mteval_hyps, mteval_refs),
        "NIST": _nist_tokens(mteval_hyps, mteval_refs),
        "METEOR": meteor(hyps, refs) if with_meteor else None,
        "ROUGE_L": _rouge_l_tokens(ptb_hyps, ptb_refs),
        "CIDEr": _cider_d_tokens(ptb_hyps, ptb_refs),
    }


def _check_inputs(hyps, refs) -> None:
    """A one-line error unless there is one list of at least one reference string per hypothesis string."""
    if len(hyps) != len(refs):
        raise UserError(f"{len(hyps)} hypotheses but {len(refs)} reference lists: need one per hypothesis")
    if not hyps:
        raise UserError("nothing to score: no hypotheses")
    for i, (hyp, hyp_refs) in enumerate(zip(hyps, refs, strict=True)):
        if not isinstance(hyp, str) or isinstance(hyp_refs, str) or not hyp_refs:
            raise UserError(f"item {i}: need a hypothesis string and a non-empty list of reference strings")
