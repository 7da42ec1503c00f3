"""sample.py: seeded sampling, greedy and beam search through the command line, --mr, --adapter, errors."""

import inspect

import pytest
import torch
from conftest import train_tiny_adapter, write_hf_gpt2

import sample
from beam import beam_search, cut_output
from checkpoints.loading import load_model
from data.e2e import prepare
from data.tasks import EOT, get_tokenizer
from model import GPT

pytestmark = pytest.mark.tokenizer  # these tests tokenize text (see conftest.py)

PROMPT = "The quick brown fox"
MR = "name[The Vaults], eatType[pub], area[riverside]"


def run(*argv):
    """sample.main on these arguments (paths and numbers turned into strings); returns the output texts."""
    return sample.main([str(a) for a in argv])


def continuation(tokens, out):
    """The text a row of generate's output adds after the prompt, up to <|endoftext|>."""
    new = out[len(tokens):]
    return get_tokenizer().decode(new[:new.index(EOT)] if EOT in new else new)


@pytest.fixture(scope="module")
def adapter(tiny_gpt2, tmp_path_factory):
    """An adapter trained (20 AdamW steps on random inputs) to predict ' pub' after anything, so its effect
    is plain to see: greedy decoding with it writes ' pub pub pub ...', the base model does not."""
    pub = get_tokenizer().encode_ordinary(" pub")
    assert len(pub) == 1
    return train_tiny_adapter(tiny_gpt2, tmp_path_factory.mktemp("adapter") / "adapter.safetensors",
                              targets=("q", "v"), steps=20, label=pub[0])


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory):
    """A GPT-2 of another width (n_embd 32), which the adapter does not fit."""
    folder = tmp_path_factory.mktemp("small_gpt2")
    write_hf_gpt2(folder, n_embd=32)
    return folder


def test_seeded_sampling_is_reproducible_and_is_generate_with_that_seed(tiny_gpt2):
    argv = ["--model", tiny_gpt2, "--prompt", PROMPT, "--num_samples", 3, "--max_new_tokens", 12,
            "--top_k", 100]
    first = run(*argv, "--seed", 5)
    assert len(first) == 3 and len(set(first)) == 3  # three samples, all different
    assert run(*argv, "--seed", 5) == first
    assert run(*argv, "--seed", 6) != first
    # exactly model.generate with a torch.Generator seeded by --seed
    model = GPT.from_pretrained(tiny_gpt2).eval()
    tokens = get_tokenizer().encode_ordinary(PROMPT)
    out = model.generate(torch.tensor([tokens] * 3), 12, top_k=100, eos_token=EOT,
                         generator=torch.Generator().manual_seed(5))
    assert first == [continuation(tokens, row) for row in out.tolist()]


def test_temperature_and_top_p_reach_generate(tiny_gpt2):
    """--temperature 0.5 --top_p 0.5 (off the defaults 1.0 and all tokens, which the other tests use) sample
    exactly as generate with them; each flag alone gives other samples, so a dropped flag shows."""
    common = ["--model", tiny_gpt2, "--prompt", PROMPT, "--num_samples", 3, "--max_new_tokens", 8, "--seed", 5]
    both = run(*common, "--temperature", 0.5, "--top_p", 0.5)
    model = GPT.from_pretrained(tiny_gpt2).eval()
    tokens = get_tokenizer().encode_ordinary(PROMPT)
    out = model.generate(torch.tensor([tokens] * 3), 8, temperature=0.5, top_p=0.5, eos_token=EOT,
                         generator=torch.Generator().manual_seed(5))
    assert both == [continuation(tokens, row) for row in out.tolist()]
    assert run(*common, "--temperature", 0.5) != both and run(*common, "--top_p", 0.5) != both


def test_greedy_is_generate_at_temperature_0_and_printed(tiny_gpt2, capsys):
    texts = run("--model", tiny_gpt2, "--prompt", PROMPT, "--greedy", "--max_new_tokens", 10)
    model = GPT.from_pretrained(tiny_gpt2).eval()
    tokens = get_tokenizer().encode_ordinary(PROMPT)
    out = model.generate(torch.tensor([tokens]), 10, temperature=0, eos_token=EOT)
    assert texts == [continuation(tokens, out[0].tolist())]
    printed = capsys.readouterr().out
    assert printed == f"prompt: {PROMPT!r}\n--- greedy ---\n{texts[0]}\n"


def test_prompt_from_a_file_drops_the_final_newline(tiny_gpt2, tmp_path):
    (tmp_path / "prompt.txt").write_text(PROMPT + "\n", encoding="utf-8")
    common = ["--model", tiny_gpt2, "--greedy", "--max_new_tokens", 8]
    assert run(*common, "--prompt", f"FILE:{tmp_path / 'prompt.txt'}") == run(*common, "--prompt", PROMPT)


def test_mr_feeds_the_model_the_prompt_tokens_of_training(tiny_gpt2, monkeypatch):
    seen = []
    original = GPT.generate

    def spy(self, idx, *args, **kwargs):
        seen.append(idx[0].tolist())
        return original(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "generate", spy)
    run("--model", tiny_gpt2, "--mr", MR, "--greedy", "--max_new_tokens", 4)
    example, prompt_len = prepare.example_tokens(get_tokenizer(), MR, "any reference", "paper")
    assert seen == [example[:prompt_len]]  # the tokens training put before the completion: context + EOT


def test_adapter_brings_its_base_model_from_its_metadata(tiny_gpt2, adapter):
    base = run("--model", tiny_gpt2, "--prompt", PROMPT, "--greedy", "--max_new_tokens", 6)
    adapted = run("--adapter", adapter, "--prompt", PROMPT, "--greedy", "--max_new_tokens", 6)
    assert adapted == [" pub" * 6]  # what the adapter was trained to say, on tiny_gpt2 found by itself
    assert base != adapted


def test_beam_1_is_greedy_and_beam_options_reach_beam_search(tiny_gpt2, adapter):
    common = ["--adapter", adapter, "--prompt", PROMPT, "--max_new_tokens", 8]
    greedy = run(*common, "--greedy")
    assert run(*common, "--beam", 1, "--no_repeat_ngram", 0) == [cut_output(greedy[0])]  # as eval.py cuts it
    # no repeated bigram: ' pub pub' may appear once, so the beam must leave the adapter's favourite path
    beamed = run(*common, "--beam", 3, "--length_penalty", 0.7, "--no_repeat_ngram", 2)
    model = load_model(model=tiny_gpt2, adapter=adapter)[0]
    tokens = get_tokenizer().encode_ordinary(PROMPT)
    best = beam_search(model.eval(), tokens, beam=3, max_new_tokens=8, length_penalty=0.7, no_repeat_ngram=2)
    assert beamed == [cut_output(get_tokenizer().decode(best))]
    assert beamed[0].count("pub pub") <= 1 and beamed != [cut_output(greedy[0])]


def test_each_beam_option_reaches_beam_search_even_off_its_default(tiny_gpt2, monkeypatch):
    """--length_penalty 0.3 and --no_repeat_ngram 2 are what beam_search runs with (the flags' defaults, 0.8 and 4,
    are also beam_search's, so a flag that did not reach it would go unseen at the defaults)."""
    seen = []

    def spy(*args, **kwargs):
        call = inspect.signature(beam_search).bind(*args, **kwargs)
        call.apply_defaults()  # an option not passed is beam_search's default
        seen.append({name: call.arguments[name] for name in ("beam", "max_new_tokens", "length_penalty",
                                                             "no_repeat_ngram")})
        return [13]

    monkeypatch.setattr(sample, "beam_search", spy)
    common = ["--model", tiny_gpt2, "--prompt", PROMPT, "--beam", 3, "--max_new_tokens", 5]
    assert run(*common, "--length_penalty", 0.3, "--no_repeat_ngram", 2) == ["."]
    assert run(*common) == ["."]
    assert seen == [dict(beam=3, max_new_tokens=5, length_penalty=0.3, no_repeat_ngram=2),
                    dict(beam=3, max_new_tokens=5, length_penalty=0.8, no_repeat_ngram=4)]


def test_beam_prints_what_eval_scores_cut_at_the_blank_line(tiny_gpt2, monkeypatch, capsys):
    """A decoder that answers with the tokens of "The Eagle is a pub." + a blank line of two "\\n" tokens + "It is
    cheap.": sample.py --beam prints "The Eagle is a pub.", the line eval.py writes and scores
    (test_eval.py::test_outputs_are_cut_as_the_paper_cut_them)."""
    enc = get_tokenizer()
    tokens = enc.encode_ordinary("The Eagle is a pub.") + [198, 198] + enc.encode_ordinary("It is cheap.")
    monkeypatch.setattr(sample, "beam_search", lambda *args, **kwargs: tokens)
    assert run("--model", tiny_gpt2, "--prompt", PROMPT, "--beam", 2) == ["The Eagle is a pub."]
    assert capsys.readouterr().out.endswith("--- beam search, beam 2 ---\nThe Eagle is a pub.\n")


def test_num_samples_up_to_max_samples_is_accepted():
    """--num_samples MAX_SAMPLES passes the check that refuses MAX_SAMPLES + 1 (test_faults.py), before any model."""
    sample.check_options(sample.parse_args(["--num_samples", str(sample.MAX_SAMPLES)]))
    with pytest.raises(ValueError, match=f"at most {sample.MAX_SAMPLES}"):
        sample.check_options(sample.parse_args(["--num_samples", str(sample.MAX_SAMPLES + 1)]))


ERRORS = {
    "unknown model": (["--model", "gpt3"], "unknown model 'gpt3'"),
    "missing adapter": (["--adapter", "{tmp}/none.safetensors"], "cannot read"),
    "not an adapter": (["--adapter", "{tiny}/model.safetensors"], "not a lora-gpt adapter"),
    "adapter for another model": (["--adapter", "{adapter}", "--model", "{small}"], "does not fit"),
    "prompt too long": (["--model", "{tiny}", "--prompt", "word " * 200], "the model has 128 positions: nothing is "
                        "left to generate"),
    "adapter and merged": (["--adapter", "{adapter}", "--merged", "{tiny}"], "cannot be used together"),
    "prompt and mr": (["--model", "{tiny}", "--prompt", "a", "--mr", MR], "cannot be used together"),
    "missing prompt file": (["--model", "{tiny}", "--prompt", "FILE:{tmp}/no.txt"], "cannot read the prompt"),
    "top_p above 1": (["--model", "{tiny}", "--top_p", "1.5"], "--top_p must be in (0, 1]"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_mistakes_are_one_line_errors(case, tiny_gpt2, small_gpt2, adapter, tmp_path):
    argv, expected = ERRORS[case]
    where = dict(tmp=tmp_path, tiny=tiny_gpt2, small=small_gpt2, adapter=adapter)
    with pytest.raises(SystemExit) as exit_info:
        sample.main([arg.format(**where) for arg in argv])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert expected in message


def test_several_adapters_are_each_sampled_as_if_loaded_alone(tiny_gpt2, adapter, tmp_path, capsys):
    from checkpoints.adapters import export

    inn = get_tokenizer().encode_ordinary(" inn")
    other = train_tiny_adapter(tiny_gpt2, tmp_path / "inn.safetensors", targets=("o", "mlp"), steps=20, label=inn[0])
    peft = export(adapter, tmp_path / "peft")  # the ' pub' adapter as a PEFT folder
    common = ["--prompt", PROMPT, "--greedy", "--max_new_tokens", 5]
    alone = {str(path): run("--adapter", path, *common) for path in (adapter, other, peft)}
    capsys.readouterr()
    together = run("--adapter", adapter, other, peft, *common)
    assert together == alone
    assert together[str(other)] == [" inn" * 5] and together[str(peft)] == [" pub" * 5]
    printed = capsys.readouterr().out
    for path in (adapter, other, peft):
        assert f"=== adapter {path}: " in printed and f"--- greedy ---\n{alone[str(path)][0]}\n" in printed
    assert printed.index(f"=== adapter {adapter}") < printed.index(f"=== adapter {other}") < printed.index(
        f"=== adapter {peft}")


def test_max_new_tokens_beyond_the_model_is_capped_as_in_eval(tiny_gpt2, capsys):
    """--max_new_tokens 100000 used to be refused here and capped by eval.py; both now cap it at the positions the
    model has left after the prompt (128 - 2 tokens of "Hello world"), with the same note."""
    sample.main(["--model", str(tiny_gpt2), "--prompt", "Hello world", "--greedy", "--max_new_tokens", "100000",
                 "--device", "cpu"])
    assert "note: --max_new_tokens 100000 capped at 126: the prompt has 2 tokens and the model 128 positions" in \
        capsys.readouterr().err
