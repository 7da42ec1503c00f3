"""beam_search follows microsoft/LoRA's E2E decoder (examples/NLG/src/gpt2_beam.py) rule for rule.

First, cases worked by hand on a fake model whose next-token probabilities the test sets: each one would come out
differently under the rule it names if that rule were implemented another way. Then a plain reference written
here (no cache, one hypothesis and one token at a time) against beam_search on small random GPT models.
"""

import math
import time

import pytest
import torch
import torch.nn as nn

from beam import ban_repeated_ngrams, beam_search
from data.tasks import EOT
from model import GPT, GPTConfig
from plumbing.errors import UserError

DUST = 1e-9  # the probability the fake model gives every token its table does not name


class FakeCache:
    """The tokens each row has read so far: enough for the fake model to see whole sequences on the cache.
    As KVCache: a forward of B rows uses the first B, reorder fills the first len(batch_index), and a row's first
    pad[row] tokens (left padding) are not read."""

    def __init__(self, batch_size, pad=None):
        self.rows = [[] for _ in range(batch_size)]
        self.skip = [0] * batch_size if pad is None else pad.tolist()  # pad tokens still to be dropped

    def reorder(self, batch_index):
        self.rows[:batch_index.numel()] = [list(self.rows[i]) for i in batch_index.tolist()]
        self.skip[:batch_index.numel()] = [self.skip[i] for i in batch_index.tolist()]


class FakeModel(nn.Module):
    """The model API beam_search uses, with next-token probabilities read from a table.

    table maps a tuple of tokens to {token: probability}; the longest key that ends the sequence read so far
    wins (so (3,) means "after a 3", () is the fallback). Tokens not named get DUST.
    """

    def __init__(self, table, vocab_size=10, block_size=32):
        super().__init__()
        self.table, self.vocab_size = table, vocab_size
        self.config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=1)
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(1, 1)))  # beam_search reads the device here

    def new_cache(self, batch_size, max_len, pad=None):
        return FakeCache(batch_size, pad)

    def next_logits(self, seq):
        for start in range(len(seq) + 1):  # longest suffix first
            if tuple(seq[start:]) in self.table:
                probs = self.table[tuple(seq[start:])]
                break
        else:
            probs = {}
        logits = torch.full((self.vocab_size,), math.log(DUST))
        for token, p in probs.items():
            logits[token] = math.log(p)
        return logits

    def forward(self, idx, cache=None):
        rows = idx.tolist()
        if cache is not None:
            for i, new in enumerate(rows):  # the first len(rows) rows
                cache.rows[i].extend(new[cache.skip[i]:])
                cache.skip[i] = max(0, cache.skip[i] - len(new))
            rows = cache.rows[:len(rows)]
        T = idx.size(1)
        # a pad position's logits are nothing the search may read: NaN, so that reading one would show
        logits = [[self.next_logits(row[:len(row) - T + t + 1]) if len(row) - T + t >= 0
                   else torch.full((self.vocab_size,), float("nan")) for t in range(T)] for row in rows]
        return torch.stack([torch.stack(r) for r in logits]), None


def both_ways(model, prompt, **options):
    """beam_search with and without the cache, which must agree; returns the answer."""
    with_cache = beam_search(model, prompt, use_cache=True, **options)
    assert beam_search(model, prompt, use_cache=False, **options) == with_cache
    return with_cache


# ----------------------------------------------------------------------------------------------------------
# The rules, by hand. Tokens 8 and 9 end a hypothesis unless a test says otherwise.

def test_length_penalty_is_length_with_its_end_token_to_the_power():
    """Finished: [8] log .45 = -0.799 (length 1); [1 2 9] log(.55 * .7 * .7) = -1.312 (length 3).

    length_penalty 0:   -0.799 vs -1.312                      -> []
    length_penalty 0.8: -0.799 vs -1.312 / 3 ** 0.8 = -0.545  -> [1, 2]
    GNMT's ((5 + len) / 6) ** 0.8 would give -0.799 vs -1.312 / (8 / 6) ** 0.8 = -1.042 -> [] (not theirs).
    """
    model = FakeModel({(0,): {8: 0.45, 1: 0.55}, (1,): {2: 0.7, 3: 0.3}, (2,): {9: 0.7, 4: 0.3},
                       (3,): {9: 0.6, 4: 0.4}, (4,): {8: 1.0}})
    options = dict(beam=2, max_new_tokens=5, no_repeat_ngram=0, eos_tokens=(8, 9))
    assert both_ways(model, [0], length_penalty=0.0, **options) == []
    assert both_ways(model, [0], length_penalty=0.8, **options) == [1, 2]
    assert math.log(0.45) > math.log(0.55 * 0.7 * 0.7) / (8 / 6) ** 0.8  # GNMT's would have kept []


def test_end_of_text_and_blank_line_both_end():
    """By default 50256 (<|endoftext|>) and 628 ("\\n\\n") both end a hypothesis (theirs: [50256] + [628])."""
    table = lambda after_5: {(1,): {5: 0.9, 7: 0.1}, (5,): {after_5: 0.9, 7: 0.1}, (627,): {EOT: 1.0},
                             (628,): {EOT: 1.0}, (7,): {EOT: 1.0}}
    options = dict(beam=3, max_new_tokens=6, no_repeat_ngram=0)
    assert both_ways(FakeModel(table(628), vocab_size=50257), [1], **options) == [5]
    assert both_ways(FakeModel(table(EOT), vocab_size=50257), [1], **options) == [5]
    assert both_ways(FakeModel(table(627), vocab_size=50257), [1], **options) == [5, 627]  # 627 does not end
    assert both_ways(FakeModel(table(628), vocab_size=50257), [1], eos_tokens=(EOT,), **options) == [5, 628]


def test_ngram_ban_reads_the_generated_tokens_only():
    """No repeated 2-grams, prompt [3, 4], beam 1. After 4: 3 (.9); after 3: 4 (.6) or 5 (.4); after 5: 8.

    Generated 3; then 4, although the prompt holds "3 4" (the prompt does not count); then 3 ("4 3" spans the
    prompt's end: does not count either); then "3 4" again would repeat a generated 2-gram, so 5; then 8 ends.
    Reading the prompt too, 4 would be banned at once: [3, 5].
    """
    model = FakeModel({(4,): {3: 0.9, 8: 0.1}, (3,): {4: 0.6, 5: 0.4}, (5,): {8: 1.0}})
    options = dict(beam=1, max_new_tokens=8, length_penalty=1.0, eos_tokens=(8, 9))
    assert both_ways(model, [3, 4], no_repeat_ngram=2, **options) == [3, 4, 3, 5]
    assert both_ways(model, [3, 4], no_repeat_ngram=0, **options) == [3, 4, 3, 4, 3, 4, 3, 4]  # the ban did it


def test_ngram_ban_comes_before_the_softmax():
    """No repeated 1-grams (a token never comes twice), beam 2, prompt [0].

    Step 1: 1 (.5) and 2 (.4) start the beams. Step 2: after 1, token 1 (.9) is banned; 5 (.06) and 6 (.04) share
    the freed mass: .6 and .4. After 2: 7 (.35), 3 (.33), 4 (.32). Candidates:
        [1 5] log(.5 * .6) = -1.20   [1 6] log(.5 * .4) = -1.61   [2 7] log(.4 * .35) = -1.97  ...
    so [1 5] and [1 6] go on, and [1 5 8] wins. Masking after the softmax would score [1 5] log(.5 * .06) = -3.51,
    and [2 7] would win.
    """
    model = FakeModel({(0,): {1: 0.5, 2: 0.4, 3: 0.1}, (1,): {1: 0.9, 5: 0.06, 6: 0.04},
                       (2,): {7: 0.35, 3: 0.33, 4: 0.32}, (): {8: 1.0}})
    options = dict(beam=2, max_new_tokens=5, length_penalty=1.0, eos_tokens=(8, 9))
    assert both_ways(model, [0], no_repeat_ngram=1, **options) == [1, 5]
    assert math.log(0.4 * 0.35) > math.log(0.5 * 0.06)  # after-softmax masking: [2 7] ahead of [1 5]


def test_a_finished_hypothesis_takes_its_slot():
    """Beam 2, prompt [0]: 8 (.5), 1 (.3), 2 (.2). The two best are [8] (finished: -0.69) and [1]; so only [1]
    goes on and [2] is gone, though [2 6 7 8] would score log(.2 * .99 ** 3) / 4 = -0.41 (length_penalty 1).
    [1]'s continuations end at best at log(.3 * .3 * .99) / 3 = -0.81, so [8] wins: the answer is [].
    With beam 3, [2] survives and wins. (transformers keeps 2 * beam candidates: [2] would survive at beam 2.)
    """
    model = FakeModel({(0,): {8: 0.5, 1: 0.3, 2: 0.2}, (1,): {3: 0.3, 4: 0.26, 5: 0.24, 0: 0.2},
                       (2,): {6: 0.99}, (6,): {7: 0.99}, (): {8: 0.99}})
    options = dict(max_new_tokens=6, length_penalty=1.0, no_repeat_ngram=0, eos_tokens=(8, 9))
    assert both_ways(model, [0], beam=2, **options) == []
    assert both_ways(model, [0], beam=3, **options) == [2, 6, 7]


def test_all_steps_run_no_early_stop():
    """Beam 2, length_penalty 1, prompt [0]: 1 (.5), 2 (.3). After 1: 8 (.9). After 2: 5 (.99). After 5: 8 (.55),
    6 (.45). After 6, 7, 7, ...: 7 (.99).

    Step 2 finishes [1 8] (-0.399); step 3 finishes [2 5 8] (-0.604) and keeps [2 5 6] (-2.013, over 3 tokens
    -0.671). Now `beam` hypotheses are finished and the live one, at its length, is behind both: a search with
    transformers' early-stop heuristic ends here with [1]. Run to the end (12 tokens), [2 5 6 7 ... 7] scores
    about -2.10 / 12 = -0.18 and wins.
    """
    model = FakeModel({(0,): {1: 0.5, 2: 0.3, 4: 0.2}, (1,): {8: 0.9, 4: 0.1}, (2,): {5: 0.99},
                       (5,): {8: 0.55, 6: 0.45}, (6,): {7: 0.99}, (7,): {7: 0.99}, (4,): {9: 1.0}})
    finished = [math.log(0.5 * 0.9) / 2, math.log(0.3 * 0.99 * 0.55) / 3]
    live = math.log(0.3 * 0.99 * 0.45) / 3
    assert live <= min(finished)  # where the heuristic would stop
    out = both_ways(model, [0], beam=2, max_new_tokens=12, length_penalty=1.0, no_repeat_ngram=0, eos_tokens=(8, 9))
    assert out == [2, 5, 6] + [7] * 9


def test_prompt_length_and_cap():
    model = FakeModel({(): {3: 1.0}}, block_size=8)
    with pytest.raises(UserError, match="the prompt has 0 tokens"):
        beam_search(model, [])
    with pytest.raises(UserError, match="the prompt has 8 tokens"):
        beam_search(model, list(range(8)))
    assert beam_search(model, [1] * 5, beam=2, max_new_tokens=10, no_repeat_ngram=0) == [3, 3, 3]  # 8 - 5
    assert beam_search(model, torch.tensor([1] * 7), beam=2, max_new_tokens=10, no_repeat_ngram=0) == [3]


def plain_bans(tokens, n):
    """The rule the plain way, to check ban_repeated_ngrams against: the tokens that may not come next after
    `tokens`, those that would complete an n-gram already in them.

    The next token t makes the n-gram (last n - 1 tokens, t); so every earlier n-gram that starts with the
    same n - 1 tokens bans its own last token. With n = 1 every token seen so far is banned.
    """
    if len(tokens) < n:
        return set()  # no complete n-gram yet
    last = tokens[len(tokens) - n + 1:]  # the n - 1 tokens the next one follows (none when n = 1)
    return {tokens[start + n - 1] for start in range(len(tokens) - n + 1) if tokens[start:start + n - 1] == last}


def repeated_ngram_bans(tokens, n):
    """The tokens ban_repeated_ngrams bans after one row of generated tokens."""
    logits = torch.zeros(1, max(tokens, default=0) + 2)
    ban_repeated_ngrams(logits, torch.tensor([tokens], dtype=torch.long).view(1, len(tokens)), n)
    return set(torch.nonzero(logits[0] == float("-inf")).flatten().tolist())


def test_repeated_ngram_bans():
    seq = [1, 2, 3, 1, 2]
    assert repeated_ngram_bans(seq, 3) == {3}  # "1 2" was followed by 3, so 3 may not follow "1 2" again
    assert repeated_ngram_bans(seq, 2) == {3}  # "2" was followed by 3
    assert repeated_ngram_bans(seq, 1) == {1, 2, 3}  # every token seen
    assert repeated_ngram_bans(seq, 6) == set()  # no 6-gram yet
    assert repeated_ngram_bans([4, 4, 4], 2) == {4} and repeated_ngram_bans([4, 5, 4], 2) == {5}


# ----------------------------------------------------------------------------------------------------------
# A plain reference, against beam_search on random GPT models

def reference_beam_search(model, prompt, beam, max_new_tokens, length_penalty, no_repeat_ngram, eos_tokens):
    """The same rules, written the slow, plain way: every sequence is run whole, every candidate looked at."""
    max_new_tokens = min(max_new_tokens, model.config.block_size - len(prompt))
    live = [([], 0.0)]  # (new tokens, summed log-probability)
    best_score, best = float("-inf"), []
    for _step in range(max_new_tokens):
        candidates = []
        all_logits = model(torch.tensor([prompt + tokens for tokens, _ in live]))[0][:, -1].float()  # whole sequences
        for h, (tokens, score) in enumerate(live):
            logits = all_logits[h]
            n = no_repeat_ngram
            if n > 0 and len(tokens) >= n:
                last = tokens[len(tokens) - n + 1:]  # the n - 1 tokens the next one would follow
                for i in range(len(tokens) - n + 1):  # every n-gram generated so far
                    if tokens[i:i + n - 1] == last:
                        logits[tokens[i + n - 1]] = float("-inf")  # would repeat it
            log_probs = torch.log_softmax(logits, dim=-1).tolist()
            for t, log_p in enumerate(log_probs):
                if log_p != float("-inf"):
                    candidates.append((score + log_p, h, t))  # hypothesis h followed by token t
        candidates.sort(key=lambda c: -c[0])  # best first; the top `beam` are kept, finished ones too
        chosen = [(score, live[h][0] + [t]) for score, h, t in candidates[:beam]]
        live = []
        for score, tokens in chosen:
            if tokens[-1] in eos_tokens:
                if score / len(tokens) ** length_penalty > best_score:
                    best_score, best = score / len(tokens) ** length_penalty, tokens[:-1]
            else:
                live.append((tokens, score))
        if not live:
            return best
    for tokens, score in live:
        if score / len(tokens) ** length_penalty > best_score:
            best_score, best = score / len(tokens) ** length_penalty, tokens
    return best


def random_gpt(seed, ends):
    """A small random GPT whose outputs are decided by the rules: its embeddings are scaled up so it likes to
    repeat what it read (tied head), giving n-grams to ban, and the end tokens' rows more, so they do come."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=700, block_size=64)).eval()
    with torch.no_grad():
        model.transformer.wte.weight *= 10
        for token in ends:
            model.transformer.wte.weight[token] *= 3
    return model


def test_matches_reference_on_random_models():
    start = time.time()
    ends = (5, 9)
    agree, total, outs = 0, 0, {}
    for seed in range(3):
        model = random_gpt(seed, ends)
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(10, 700, (int(n),), generator=g).tolist() for n in (1, 4, 9)]
        prompts.append(torch.randint(10, 700, (58,), generator=g).tolist())  # 6 new tokens at most
        for p, prompt in enumerate(prompts):
            for beam, length_penalty, ngram in [(1, 0.8, 4), (3, 0.8, 4), (4, 0.0, 2), (5, 1.5, 3), (3, 0.8, 0)]:
                options = dict(beam=beam, max_new_tokens=12, length_penalty=length_penalty,
                               no_repeat_ngram=ngram, eos_tokens=ends)
                expected = reference_beam_search(model, prompt, **options)
                ours = beam_search(model, prompt, **options)
                assert beam_search(model, prompt, use_cache=False, **options) == ours
                total += 1
                agree += ours == expected
                outs[seed, p, beam, length_penalty, ngram] = ours
    print(f"\nreference agrees in {agree} of {total} cases ({time.time() - start:.1f} s)")
    assert agree == total
    # The cases exercise the rules, or agreement would prove little:
    lengths = [len(out) for key, out in outs.items() if key[1] < 3]
    assert 0 in lengths and any(0 < n < 12 for n in lengths) and 12 in lengths  # ended at once, early, at the limit
    assert any(len(out) == 6 for key, out in outs.items() if key[1] == 3)  # the cap: 64 - 58
    assert any(outs[k] != outs[k[:2] + (3, 0.8, 0)] for k in outs if k[2:] == (3, 0.8, 4))  # the ban mattered


# ----------------------------------------------------------------------------------------------------------
# Many prompts at once: beam_search_batch, its tie rule, the vectorised n-gram ban, the length groups

def test_equal_finished_scores_the_earlier_one_stays():
    """Beam 2, prompt [0]: 1 and 2 are equally likely (.4 each), and each is followed by the end token 8 for sure
    (the two rows' logits are the same numbers, so the scores are bitwise equal). [1] ranks first (equal
    scores: the smaller token), so [1 8] finishes first; [2 8] ties and does not replace it (">" not ">=")."""
    model = FakeModel({(0,): {1: 0.4, 2: 0.4, 3: 0.2}, (1,): {8: 1.0}, (2,): {8: 1.0}})
    options = dict(beam=2, max_new_tokens=4, length_penalty=0.8, no_repeat_ngram=0, eos_tokens=(8, 9))
    assert both_ways(model, [0], **options) == [1]
    # the same with the tokens' roles swapped: still the smaller token's hypothesis
    model = FakeModel({(0,): {1: 0.4, 2: 0.4, 3: 0.2}, (1,): {9: 1.0}, (2,): {8: 1.0}})
    assert both_ways(model, [0], **options) == [1]


def test_ban_repeated_ngrams_equals_the_plain_rule():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        generated = torch.randint(0, 4, (6, 12), generator=g)  # 4 tokens only: many repeats
        logits = torch.zeros(6, 5)
        ban_repeated_ngrams(logits, generated, n)
        for row, tokens in zip(logits, generated.tolist(), strict=True):
            assert set(torch.nonzero(row == float("-inf")).flatten().tolist()) == plain_bans(tokens, n)


def test_top_k_per_row_equals_topk():
    """Distinct values: topk's values and indices exactly, for widths with and without a partial last block and
    a width under k blocks. Many equal values and -inf rows: the same values, each index pointing at its value."""
    from beam import top_k_per_row
    g = torch.Generator().manual_seed(0)
    for n, k in [(50257, 10), (640, 10), (700, 3), (100, 4), (12, 5), (1000, 1)]:
        x = torch.randn(7, n, generator=g)
        values, indices = top_k_per_row(x, k)
        expected = x.topk(k, dim=-1)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)
    x = torch.randint(0, 5, (6, 3000), generator=g).float()  # ties everywhere
    x[0] = float("-inf")
    x[1, 7:] = float("-inf")  # fewer finite values than k
    values, indices = top_k_per_row(x, 10)
    assert torch.equal(values, x.topk(10, dim=-1).values)
    assert torch.equal(x.gather(1, indices), values) and all(len(set(row)) == 10 for row in indices.tolist())
    assert set(indices[1, :7].tolist()) == set(range(7))


def test_prompt_batches():
    from beam import prompt_batches
    prompts = [[1] * 3, [1] * 5, [2] * 3, [3] * 3, [2] * 5, [4] * 3, [1] * 7, [1] * 7, [1] * 6]
    # block_size 8, 2 new tokens: lengths 3, 5 and 6 leave room, shortest first; the two 7s go together, alone
    assert prompt_batches(prompts, 2, 2, 8) == [[0, 2], [3, 5], [1, 4], [8], [6, 7]]
    assert prompt_batches(prompts, 16, 2, 8) == [[0, 2, 3, 5, 1, 4, 8], [6, 7]]
    assert prompt_batches(prompts, 4, 1, 100) == [[0, 2, 3, 5], [1, 4, 8, 6], [7]]


def test_batch_equals_one_by_one_on_random_models():
    """Prompts of different lengths, left-padded in batches of 3 and decoded together, give token for token what
    each gives alone; with and without the cache; and the cases include early ends, the limit and the cap."""
    from beam import beam_search_batch, prompt_batches
    ends = (5, 9)
    lengths, mixed = [], 0
    for seed in range(2):
        model = random_gpt(seed, ends)
        g = torch.Generator().manual_seed(seed)
        prompts = [torch.randint(10, 700, (int(n),), generator=g).tolist() for n in (1, 4, 4, 9, 4, 9, 1, 58, 58)]
        for beam, length_penalty, ngram in [(1, 0.8, 4), (4, 0.8, 4), (5, 1.5, 2), (3, 0.0, 0)]:
            options = dict(beam=beam, max_new_tokens=12, length_penalty=length_penalty, no_repeat_ngram=ngram,
                           eos_tokens=ends)
            alone = [beam_search(model, prompt, **options) for prompt in prompts]
            together = [None] * len(prompts)
            for group in prompt_batches(prompts, 3, 12, model.config.block_size):
                mixed += len({len(prompts[i]) for i in group}) > 1
                answers = beam_search_batch(model, [prompts[i] for i in group], **options)
                assert beam_search_batch(model, [prompts[i] for i in group], use_cache=False, **options) == answers
                for i, answer in zip(group, answers, strict=True):
                    together[i] = answer
            assert together == alone
            lengths += [len(a) for a in alone]
    assert mixed == 16  # two padded batches ([1, 1, 4], [4, 4, 9]) in each of the 8 settings
    assert 0 in lengths and any(0 < n < 12 for n in lengths) and 12 in lengths and 6 in lengths  # 6: 64 - 58


def test_padding_reads_no_pad():
    """On the fake model, whose answer depends on everything a row has read: the short prompt [2] padded beside
    [1, 1] gives what it gives alone (its pad is a copy of its first token: reading it would make [2, 2], which
    goes to 7)."""
    from beam import beam_search_batch
    model = FakeModel({(2,): {3: 0.9, 8: 0.1}, (2, 2): {7: 1.0}, (3,): {8: 1.0}, (1,): {4: 1.0}, (4,): {8: 1.0}})
    options = dict(beam=2, max_new_tokens=4, length_penalty=0.8, no_repeat_ngram=0, eos_tokens=(8, 9))
    alone = [beam_search(model, [1, 1], **options), beam_search(model, [2], **options)]
    assert alone == [[4], [3]]
    assert beam_search_batch(model, [[1, 1], [2]], **options) == alone
    assert beam_search_batch(model, [[1, 1], [2]], use_cache=False, **options) == alone


def test_batch_refuses_padding_that_the_block_would_cut():
    from beam import beam_search_batch
    model = FakeModel({(): {3: 1.0}}, block_size=8)
    with pytest.raises(ValueError, match="decode each length apart"):
        beam_search_batch(model, [[1, 2], [1]], max_new_tokens=7)  # [1] alone gets 7 steps, padded only 6
    assert beam_search_batch(model, [[1, 2], [1]], beam=1, max_new_tokens=6, no_repeat_ngram=0) == [[3] * 6] * 2
    assert beam_search_batch(model, []) == []


def test_a_tie_between_the_children_of_the_first_and_second_ranked_hypotheses():
    """Beam 2, every step the same distribution: 1 (.5), 2 (.3), 3 (.2). Step 1: [1] ranks first, [2] second (no
    tie). Step 2: [1 1] (.25) is best; [1 2] and [2 1] tie for the second slot (.5 * .3 and .3 * .5: the same two
    log-probabilities added in either order, so bitwise equal). The candidate of the higher-ranked hypothesis, [1 2],
    goes on (key order: rank * vocab + token, the order of the flat candidate array that their topk selects from,
    gpt2_beam.py lines 290-293), and [2 1] is dropped. Step 3 ends both ways after [1 2] or [2 1] (score .15, over 3
    tokens with the end), while [1 1] can only go on to 4 (.55) or 5 (.45), at most .1375 in 3 live tokens: the
    survivor of the tie is the answer. With equal candidates in the other order it would be [2, 1]."""
    after_any = {1: 0.5, 2: 0.3, 3: 0.2}
    model = FakeModel({(): after_any, (1, 1): {4: 0.55, 5: 0.45}, (1, 2): {8: 1.0}, (2, 1): {8: 1.0}})
    options = dict(beam=2, max_new_tokens=3, length_penalty=1.0, no_repeat_ngram=0, eos_tokens=(8, 9))
    assert both_ways(model, [0], **options) == [1, 2]
    # the tie is bitwise, and the runner-up [1 1]'s best line is behind it
    log_p = torch.log_softmax(model.next_logits([0]), dim=-1)
    assert log_p[1] + log_p[2] == log_p[2] + log_p[1]
    assert math.log(0.25 * 0.55) / 3 < math.log(0.15) / 3
    # in a batch the same, whatever the prompt's place (its rows' ranks start after the first prompt's rows)
    from beam import beam_search_batch
    other = FakeModel({(): after_any, (1, 1): {4: 0.55, 5: 0.45}, (1, 2): {8: 1.0}, (2, 1): {8: 1.0},
                       (7,): {3: 0.6, 8: 0.4}, (3,): {8: 1.0}})
    for use_cache in (True, False):
        assert beam_search_batch(other, [[7], [0], [6, 0]], use_cache=use_cache, **options) == [[3], [1, 2], [1, 2]]


def test_top_k_per_row_finds_a_maximum_in_the_first_column_after_the_last_whole_block():
    """The columns after the last whole block are searched apart (from whole * block on); a maximum in the first
    of them, or the last, is found at every width with a partial block, for k = 1 and k = 3, with topk's indices."""
    from beam import top_k_per_row
    g = torch.Generator().manual_seed(1)
    for n in (65, 100, 129, 700, 1000, 50257):
        first_after = n // 64 * 64  # the first column after the last whole block
        for column in (first_after, n - 1):
            for k in (1, 3):
                x = torch.randn(4, n, generator=g)
                x[1:3, column] = 10.0  # rows 1 and 2: the maximum there
                x[2, column - 1] = 9.0  # row 2: the runner-up just before it, in the last whole block
                values, indices = top_k_per_row(x, k)
                expected = x.topk(k, dim=-1)
                assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices), (n, column, k)
                assert indices[1:3, 0].tolist() == [column, column]
                if k > 1:
                    assert indices[2, 1].item() == column - 1


# ----------------------------------------------------------------------------------------------------------
# The decoded text, cut as microsoft/LoRA's gpt2_decode.py cuts it

# (decoded text, theirs, ours). theirs: gpt2_decode.py's
#     enc.decode(_pred_tokens).split('<|endoftext|>')[0].split('\n\n')[0].strip()
# worked out by hand (the `refer_dict[_key]['sample'] = ...` line; microsoft/LoRA's file is not in this project's
# search index, its fork AK18k/LoRA has it at examples/NLG/src/gpt2_decode.py line 135). ours is cut_output: the
# same, with any line break left turned into a space (theirs would write it into the one-line-per-output file).
CUT_CASES = [
    ("The Eagle is a pub.\n\nIt is cheap.", "The Eagle is a pub.", "The Eagle is a pub."),
    ("The Eagle is a pub.<|endoftext|>It is cheap.", "The Eagle is a pub.", "The Eagle is a pub."),
    (" A pub.\n\n\nIt is cheap.", "A pub.", "A pub."),  # the first two of three "\n"
    ("A pub. \n\nB", "A pub.", "A pub."),  # the space before the cut is stripped
    ("A\n\nB<|endoftext|>C", "A", "A"),
    ("A<|endoftext|>B\n\nC", "A", "A"),  # <|endoftext|> is cut first
    ("\n\nA pub.", "", ""),  # a blank line at the start leaves nothing
    ("<|endoftext|>A pub.", "", ""),
    ("", "", ""),
    ("\t A pub.\u00a0 \n", "A pub.", "A pub."),  # str.strip: tabs, no-break spaces, a final "\n"
    ("A pub.<|endoftext|", "A pub.<|endoftext|", "A pub.<|endoftext|"),  # not the whole marker: not cut
    # a line break that is not "\n\n" is not cut: theirs keeps it, ours makes it a space
    ("A pub.\nIt is cheap.", "A pub.\nIt is cheap.", "A pub. It is cheap."),
    ("A pub.\n \nIt is cheap.", "A pub.\n \nIt is cheap.", "A pub.   It is cheap."),
    ("A pub.\r\n\r\nIt is cheap.", "A pub.\r\n\r\nIt is cheap.", "A pub.  It is cheap."),
]


@pytest.mark.parametrize("text, theirs, ours", CUT_CASES)
def test_cut_output_is_gpt2_decode_rule(text, theirs, ours):
    from beam import cut_output
    assert cut_output(text) == ours
    assert ours == theirs or ("\n" in theirs and ours == " ".join(theirs.splitlines()))


@pytest.mark.tokenizer
def test_cut_output_on_decoded_tokens():
    """The blank line of two "\\n" tokens (198, 198), which the search does not end on (it ends on 628), and an
    <|endoftext|> inside the text, as the token and as the text that encode_ordinary makes of it."""
    from beam import cut_output
    from data.tasks import get_tokenizer

    enc = get_tokenizer()
    pub, cheap = enc.encode_ordinary("The Eagle is a pub."), enc.encode_ordinary("It is cheap.")
    assert enc.decode(pub + [198, 198] + cheap) == "The Eagle is a pub.\n\nIt is cheap."
    assert cut_output(enc.decode(pub + [198, 198] + cheap)) == "The Eagle is a pub."
    assert cut_output(enc.decode(pub + [EOT] + cheap)) == "The Eagle is a pub."
    as_text = enc.encode_ordinary("<|endoftext|>")
    assert EOT not in as_text and cut_output(enc.decode(pub + as_text + cheap)) == "The Eagle is a pub."
    assert enc.encode_ordinary("a\n\nb") == [64, 198, 198, 65]  # a blank line inside text is two tokens


def test_beam_width_bounds_are_accepted_and_one_past_them_refused():
    """1 and MAX_BEAM are allowed widths (test_faults.py checks the scripts' message for MAX_BEAM + 1 and 0)."""
    from beam import MAX_BEAM, check_beam_width
    check_beam_width(1)
    check_beam_width(MAX_BEAM)
    for width in (0, MAX_BEAM + 1):
        with pytest.raises(UserError, match=f"--beam {width}: must be 1 to {MAX_BEAM}"):
            check_beam_width(width)
