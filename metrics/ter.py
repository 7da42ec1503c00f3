"""Translation Edit Rate (Snover et al., 2006), as tercom computes it for WebNLG's and DART's official evaluation.

TER counts the fewest edits that turn a hypothesis into a reference, where an edit is inserting, deleting or
substituting one word, or shifting a phrase of the hypothesis to another place; it divides by the reference's
length. Finding the fewest edits with shifts is NP-hard, so tercom searches greedily:

    repeat: among the shifts allowed (below), apply the one that lowers the word-level edit distance the most,
            while one lowers it
    edits = number of shifts applied + the edit distance of the shifted hypothesis

A shift is allowed only where it can help: it moves a phrase of at most MAX_SHIFT_SIZE words that equals the
reference at a place at most MAX_SHIFT_DIST words away, that is not fully correct where it stands, and whose
reference span is not already matched; it lands next to the hypothesis word aligned with the reference word
before the span (or at the start). The edit distance is computed inside a band around the diagonal.

With several references, a hypothesis is charged the edits of its closest reference, and its length is the mean
length of all its references; corpus TER = sum of edits / sum of those mean lengths (tercom's "Total TER", and
sacrebleu's TER, whose choices of ties and limits this module follows, so that both give the same number).
Words are whitespace-separated and lower-cased (tercom's and sacrebleu's default; case_sensitive=True keeps
case). The result is a fraction (0.46, as the LoRA paper's Table 3 prints it); it can exceed 1.

Note: the LoRA repository's own eval.py (WebNLG's GenerationEval) reports a different TER: the mean over
hypotheses of the best sentence TER, computed by pyter (another shift search), on nltk-tokenized text.
"""

import math

from plumbing.errors import UserError

MAX_SHIFT_SIZE = 10  # tercom: a shifted phrase has at most 10 words
MAX_SHIFT_DIST = 50  # tercom: ... and starts at most 50 words from its reference position
BEAM_WIDTH = 25  # the edit distance considers reference positions within 25 of the (length-scaled) diagonal
MAX_SHIFT_CANDIDATES = 1000  # sacrebleu's own cap on the shifts tried for one hypothesis-reference pair
MAX_CACHED_ROWS = 10000  # a memory bound on the cache of edit-distance rows (it changes no result)
INFINITY = 10 ** 16

# The steps of an alignment path, from the start of both word lists.
MATCH, SUBSTITUTE, HYP_ONLY, REF_ONLY = "match", "substitute", "hyp_only", "ref_only"


def words_of(text, case_sensitive=False):
    """The words TER compares: whitespace-separated, lower-cased unless case_sensitive."""
    return (text if case_sensitive else text.lower()).split()


class EditDistance:
    """Word-level Levenshtein distance from hypotheses of one length to one reference, with the path taken.

    Shifting words keeps a hypothesis's length and often its first words, so the rows of the distance matrix
    computed for one hypothesis are kept in a tree of word prefixes and reused for the next."""

    def __init__(self, ref, hyp_len):
        self.ref = ref
        # Row i holds the distances from hyp[:i] to every ref[:j]; only a band of columns around j = i * ratio
        # is computed (the others stay infinite). A band at least half as wide as the length ratio keeps
        # neighbouring rows overlapping when the lengths are far apart.
        self.ratio = len(ref) / hyp_len if hyp_len else 1
        self.width = math.ceil(self.ratio / 2 + BEAM_WIDTH) if BEAM_WIDTH < self.ratio / 2 else BEAM_WIDTH
        self.first_row = tuple((j, REF_ONLY) for j in range(len(ref) + 1))  # reference words inserted
        self.tree, self.cached_rows = {}, 0

    def __call__(self, hyp):
        """(distance, path): path is the list of steps (MATCH, SUBSTITUTE, HYP_ONLY, REF_ONLY) of one cheapest
        alignment, from the start; among equally cheap steps a diagonal one is preferred, then HYP_ONLY."""
        rows, node = [self.first_row], self.tree
        for word in hyp:  # the longest prefix of hyp whose rows are known
            if word not in node:
                break
            node, row = node[word]
            rows.append(row)
        for i in range(len(rows), len(hyp) + 1):
            rows.append(self.next_row(rows[-1], hyp[i - 1], i, last=i == len(hyp)))
        self.remember(hyp, rows)
        return rows[-1][-1][0], self.path(rows)

    def next_row(self, above, word, i, last):
        """Row i (distances from hyp[:i], whose last word is `word`), computed from row i - 1."""
        n = len(self.ref)
        diagonal = math.floor(i * self.ratio)
        low, high = max(0, diagonal - self.width), min(n + 1, diagonal + self.width)
        if last:
            high = n + 1  # the final row is complete, so the distance to the whole reference is known
        row = [(INFINITY, None)] * (n + 1)
        for j in range(low, high):
            if j == 0:
                row[0] = (above[0][0] + 1, HYP_ONLY)
                continue
            same = word == self.ref[j - 1]
            best = (INFINITY, None)
            for cost, step in ((above[j - 1][0] + (0 if same else 1), MATCH if same else SUBSTITUTE),
                               (above[j][0] + 1, HYP_ONLY), (row[j - 1][0] + 1, REF_ONLY)):
                if cost < best[0]:  # strictly: the first of equally cheap steps wins
                    best = (cost, step)
            row[j] = best
        return tuple(row)

    def path(self, rows):
        """The steps from (0, 0) to the last cell, read backwards from the last cell."""
        i, j, steps = len(rows) - 1, len(self.ref), []
        while i > 0 or j > 0:
            step = rows[i][j][1]
            steps.append(step)
            if step in (MATCH, SUBSTITUTE):
                i, j = i - 1, j - 1
            elif step == HYP_ONLY:
                i -= 1
            else:
                j -= 1
        return steps[::-1]

    def remember(self, hyp, rows):
        node = self.tree
        for word, row in zip(hyp, rows[1:], strict=True):
            if word not in node:
                if self.cached_rows >= MAX_CACHED_ROWS:
                    return
                node[word] = ({}, row)
                self.cached_rows += 1
            node = node[word][0]


def alignment(path, ref_len):
    """From an alignment path: for each reference word the index of the hypothesis word it is aligned to (for a
    reference word with none, the hypothesis word before it, -1 at the start), and which hypothesis and which
    reference words are not matched."""
    ref_to_hyp, hyp_wrong, ref_wrong = [0] * ref_len, [], []
    h = r = -1
    for step in path:
        if step == HYP_ONLY:
            h += 1
            hyp_wrong.append(True)
            continue
        r += 1
        if step == REF_ONLY:
            ref_wrong.append(True)
        else:
            h += 1
            hyp_wrong.append(step == SUBSTITUTE)
            ref_wrong.append(step == SUBSTITUTE)
        ref_to_hyp[r] = h
    return ref_to_hyp, hyp_wrong, ref_wrong


def matching_phrases(hyp, ref):
    """(start in hyp, start in ref, length) of every phrase of 1..MAX_SHIFT_SIZE words found in both, starting at
    most MAX_SHIFT_DIST positions apart; hypothesis start first, then reference start, then length."""
    for start_h in range(len(hyp)):
        for start_r in range(len(ref)):
            if abs(start_r - start_h) > MAX_SHIFT_DIST:
                continue
            for length in range(1, MAX_SHIFT_SIZE + 1):
                if start_h + length > len(hyp) or start_r + length > len(ref):
                    break
                if hyp[start_h + length - 1] != ref[start_r + length - 1]:
                    break
                yield start_h, start_r, length


def shifted(words, start, length, target):
    """words with the phrase words[start:start + length] moved to before index `target` of the original list.
    A target inside the phrase or just after it (start < target <= start + length) counts from the phrase's
    end instead: the phrase then moves right past the target - start words that follow it."""
    phrase, rest = words[start:start + length], words[:start] + words[start + length:]
    at = target if target < start else (target - length if target > start + length else target)
    return rest[:at] + phrase + rest[at:]


def best_shift(hyp, ref, distance, tried):
    """(gain, shifted hypothesis, shifts tried so far) for the shift that lowers the edit distance the most: ties
    go to the longer phrase, then the earlier phrase, then the earlier target. gain is 0 when no shift helps."""
    before, path = distance(hyp)
    ref_to_hyp, hyp_wrong, ref_wrong = alignment(path, len(ref))
    best_key, best_words = None, hyp
    for start_h, start_r, length in matching_phrases(hyp, ref):
        if not any(hyp_wrong[start_h:start_h + length]) or not any(ref_wrong[start_r:start_r + length]):
            continue  # the phrase is already right where it is, or its reference span is already matched
        if start_h <= ref_to_hyp[start_r] < start_h + length:
            continue  # it would land inside itself
        previous_target = None
        for offset in range(-1, length):  # land after the word aligned with ref[start_r + offset], or at 0
            target = 0 if start_r + offset == -1 else ref_to_hyp[start_r + offset] + 1
            if target == previous_target:
                continue
            previous_target = target
            candidate = shifted(hyp, start_h, length, target)
            tried += 1
            key = (before - distance(candidate)[0], length, -start_h, -target)
            if best_key is None or key > best_key:
                best_key, best_words = key, candidate
        if tried >= MAX_SHIFT_CANDIDATES:
            break
    return (0 if best_key is None else best_key[0]), best_words, tried


def edits(hyp, ref):
    """The number of edits (shifts + insertions, deletions, substitutions) tercom finds from hyp to ref, both
    lists of words. An empty reference costs one deletion per hypothesis word."""
    if not ref:
        return len(hyp)
    distance, shifts, tried = EditDistance(ref, len(hyp)), 0, 0
    while True:
        gain, candidate, tried = best_shift(hyp, ref, distance, tried)
        if tried >= MAX_SHIFT_CANDIDATES or gain <= 0:
            break  # as sacrebleu: once the cap is reached, the last search's shift is not applied either
        hyp, shifts = candidate, shifts + 1
    return shifts + distance(hyp)[0]


def segment_stats(hyp, refs, case_sensitive=False):
    """(edits to the closest reference, mean reference length) for one hypothesis string and its references."""
    hyp_words = words_of(hyp, case_sensitive)
    ref_words = [words_of(r, case_sensitive) for r in refs]
    return min(edits(hyp_words, r) for r in ref_words), sum(map(len, ref_words)) / len(ref_words)


def corpus_ter(hyps, refs, case_sensitive=False):
    """Corpus TER of hypothesis strings against their references (refs[i]: the list of hyps[i]'s references):
    total edits / total mean reference length; 1.0 if all references are empty and a hypothesis is not, 0.0 if
    everything is empty."""
    if len(hyps) != len(refs):
        raise UserError(f"{len(hyps)} hypotheses but {len(refs)} reference lists: need one per hypothesis")
    if not hyps:
        raise UserError("nothing to score: no hypotheses")
    total_edits = total_length = 0
    for i, (hyp, hyp_refs) in enumerate(zip(hyps, refs, strict=True)):
        if not isinstance(hyp, str) or isinstance(hyp_refs, str) or not hyp_refs:
            raise UserError(f"item {i}: need a hypothesis string and a non-empty list of reference strings")
        n_edits, length = segment_stats(hyp, hyp_refs, case_sensitive)
        total_edits += n_edits
        total_length += length
    if total_length > 0:
        return total_edits / total_length
    return 1.0 if total_edits > 0 else 0.0
