"""beam_search gives, token for token, what transformers' generate(num_beams=...) gives on the same weights."""

import pytest
import torch
from conftest import write_hf_gpt2

from checkpoint import UserError
from model import EOT, GPT, beam_search, repeated_ngram_mask


def repetitive_model(folder, vocab_size, seed, n_positions=64):
    """(transformers model, our model) on the same random tiny GPT-2 whose last token is eos.

    A random GPT-2 mostly predicts the token it just read (its head is tied to the embeddings), so repeated
    n-grams come up within a few tokens; eos's embedding row is tripled so its logit swings wider and eos
    sometimes wins early. Both make the rules of beam search decide the answer, not just the model.
    """
    hf = write_hf_gpt2(folder, seed=seed, vocab_size=vocab_size, n_positions=n_positions)
    with torch.no_grad():
        hf.transformer.wte.weight[vocab_size - 1] *= 3.0
    hf.save_pretrained(folder)
    return hf, GPT.from_pretrained(folder).eval()


def hf_beam_search(hf, prompt, beam, max_new_tokens, length_penalty, no_repeat_ngram, eos):
    """transformers' beam search, new tokens only, cut at the first eos (it pads with eos after it)."""
    idx = torch.tensor([prompt])
    options = dict(no_repeat_ngram_size=no_repeat_ngram) if no_repeat_ngram else {}
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), num_beams=beam, max_new_tokens=max_new_tokens,
                      length_penalty=length_penalty, do_sample=False, early_stopping=False,
                      eos_token_id=eos, pad_token_id=eos, **options)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(eos)] if eos in new else new


def test_repeated_ngram_mask():
    seq = [1, 2, 3, 1, 2]
    banned = lambda n: set(repeated_ngram_mask([seq], n, 6)[0].nonzero().flatten().tolist())
    assert banned(3) == {3}  # "1 2" was followed by 3 once, so 3 may not follow "1 2" again
    assert banned(2) == {3}  # "2" was followed by 3
    assert banned(1) == {1, 2, 3}  # every token already seen
    assert banned(6) == set()  # no 6-gram yet
    two_rows = repeated_ngram_mask([[4, 4, 4], [4, 5, 4]], 2, 6)
    assert two_rows[0].nonzero().flatten().tolist() == [4] and two_rows[1].nonzero().flatten().tolist() == [5]


def test_beam_1_is_greedy(tmp_path):
    _, model = repetitive_model(tmp_path, vocab_size=60, seed=0)
    stopped_early = False
    for seed in range(4):
        prompt = torch.randint(0, 59, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
        greedy = model.generate(torch.tensor([prompt]), 20, temperature=0, eos_token=59)[0, 6:].tolist()
        greedy = greedy[:greedy.index(59)] if 59 in greedy else greedy
        stopped_early |= len(greedy) < 20
        assert beam_search(model, prompt, beam=1, max_new_tokens=20, length_penalty=1.0, no_repeat_ngram=0,
                           eos_token=59) == greedy
    assert stopped_early  # greedy met eos at least once, so the eos path was compared too


def test_matches_transformers(tmp_path):
    """Beam 4 on six random models, two prompts each, length penalties 0.5 and 1.3, n-gram rule off, 3 and 4."""
    results = {}
    for vocab_size, seed in [(60, 0), (60, 1), (60, 2), (120, 0), (120, 1), (120, 2)]:
        hf, model = repetitive_model(tmp_path / f"{vocab_size}-{seed}", vocab_size, seed)
        eos = vocab_size - 1
        start = torch.randint(0, eos, (5,), generator=torch.Generator().manual_seed(seed)).tolist()
        # A prompt ending in three copies of the token the model wants next has a 3-gram the rule must ban.
        likely = model.generate(torch.tensor([start]), 1, temperature=0)[0, -1].item()
        for p, prompt in enumerate([start, start + [likely] * 3]):
            for length_penalty in (0.5, 1.3):
                for ngram in (0, 3, 4):
                    case = (vocab_size, seed, p, length_penalty, ngram)
                    ours = beam_search(model, prompt, beam=4, max_new_tokens=30, length_penalty=length_penalty,
                                       no_repeat_ngram=ngram, eos_token=eos)
                    assert ours == hf_beam_search(hf, prompt, 4, 30, length_penalty, ngram, eos), case
                    results[case] = ours
    # The cases must exercise the rules, or equality would prove little:
    assert any(0 < len(r) < 30 for r in results.values())  # finished by eos before the limit
    assert any(len(r) == 30 for r in results.values())  # ran to the limit
    ngram_on_off = [(results[c] != results[c[:4] + (3,)]) for c in results if c[4] == 0]
    assert any(ngram_on_off)  # a banned n-gram changed the answer
    penalty = [(results[c] != results[c[:3] + (1.3,) + c[4:]]) for c in results if c[3] == 0.5]
    assert any(penalty)  # the length penalty changed the answer


def test_real_vocabulary_defaults_match_transformers_and_cache_free_search(tiny_gpt2):
    """Beam 10, length penalty 0.9, no repeated 4-grams, eos <|endoftext|>, 64 tokens: the paper's settings."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2).eval()
    model = GPT.from_pretrained(tiny_gpt2).eval()
    prompt = torch.randint(0, 50256, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = beam_search(model, prompt)
    assert ours == hf_beam_search(hf, prompt, 10, 64, 0.9, 4, EOT)
    # The same search run the slow way (whole sequences every step, no cache to reorder) picks the same tokens.
    assert beam_search(model, prompt, use_cache=False) == ours


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cache_reordering_changes_nothing(tmp_path, seed):
    _, model = repetitive_model(tmp_path, 60, seed)
    prompt = torch.randint(0, 59, (7,), generator=torch.Generator().manual_seed(seed)).tolist()
    for ngram in (0, 3):
        cached = beam_search(model, prompt, beam=5, max_new_tokens=25, length_penalty=1.3, no_repeat_ngram=ngram,
                             eos_token=59)
        assert beam_search(model, prompt, beam=5, max_new_tokens=25, length_penalty=1.3, no_repeat_ngram=ngram,
                           eos_token=59, use_cache=False) == cached


def test_block_size_caps_new_tokens(tmp_path):
    hf, model = repetitive_model(tmp_path, 60, 2, n_positions=16)
    prompt = torch.randint(0, 59, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = beam_search(model, prompt, beam=3, max_new_tokens=64, no_repeat_ngram=0, eos_token=59)
    assert ours == hf_beam_search(hf, prompt, 3, 6, 0.9, 0, 59) and len(ours) == 6  # 16 positions - 10
    assert beam_search(model, torch.tensor(prompt), beam=3, max_new_tokens=64, no_repeat_ngram=0, eos_token=59) == ours
    with pytest.raises(UserError, match="block_size is 16"):
        beam_search(model, list(range(16)), eos_token=59)
    with pytest.raises(UserError):
        beam_search(model, [], eos_token=59)
