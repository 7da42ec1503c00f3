"""eval.py: its outputs are beam search's, one line per MR; its scores are metrics.score_all's; --hyp --refs
scores any file; every mistake is one line. METEOR (a Java run of ~10 s) is replaced by a stub here; the
real one is tested in test_metrics.py."""

import inspect
import json

import pytest
import torch
from conftest import write_e2e_csv

import eval
import lora
from beam import beam_search, beam_search_batch, cut_output
from checkpoints.adapters import save_adapter
from checkpoints.loading import load_model
from data.e2e import prepare
from data.e2e.batches import dev_loss, load_split
from data.tasks import get_tokenizer
from metrics import e2e as metrics
from model import GPT, GPTConfig

pytestmark = pytest.mark.tokenizer  # these tests tokenize text (see conftest.py)

@pytest.fixture(scope="module")
def adapter(tiny_gpt2, tmp_path_factory):
    """An adapter for the tiny model whose B matrices are random, so that it changes the outputs."""
    torch.manual_seed(0)
    model = lora.apply_lora(GPT.from_pretrained(tiny_gpt2), lora.LoRAConfig(rank=2, alpha=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.5)
    path = tmp_path_factory.mktemp("run") / "adapter.safetensors"
    save_adapter(model, path)
    return path


@pytest.fixture(autouse=True)
def no_meteor(monkeypatch):
    """METEOR as without Java (None), so that no test waits for the jar."""
    monkeypatch.setattr(metrics, "meteor", lambda hyps, refs: None)


def table_row(output):
    """The printed markdown row under the header and its |---| line."""
    lines = output.splitlines()
    header = "| model | split | MRs | val_loss | BLEU | NIST | METEOR | ROUGE-L | CIDEr |"
    return lines[lines.index(header) + 2]


def test_written_lines_read_back_with_empty_ones(tmp_path):
    eval.write_lines(tmp_path / "p.txt", ["a b", "", "£20, café", ""])
    assert (tmp_path / "p.txt").read_bytes() == "a b\n\n£20, café\n\n".encode()
    assert eval.read_hyps(tmp_path / "p.txt") == ["a b", "", "£20, café", ""]


def test_eval_decodes_with_beam_search_and_records_score_all(tiny_gpt2, e2e_small, adapter, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--adapter", str(adapter), "--data", str(e2e_small), "--out", str(out), "--limit", "4", "--beam",
              "2", "--max_new_tokens", "8", "--device", "cpu"]
    eval.main([*common, "--val_examples", "8", "--val_batch_size", "4"])
    printed = capsys.readouterr().out

    text = (out / "predictions_test.txt").read_text(encoding="utf-8")
    assert text.endswith("\n")
    lines = text.split("\n")[:-1]
    assert len(lines) == 4

    # The same outputs straight from beam_search, with the paper's length penalty and 4-gram rule
    model = lora.merge_lora(load_model(adapter=adapter)[0]).eval()
    base = GPT.from_pretrained(tiny_gpt2).eval()
    enc = get_tokenizer()
    items = prepare.load_mrs(e2e_small, "test")[:4]
    prompts = [prepare.prompt_tokens(enc, item["mr"], "paper") for item in items]
    for line, prompt in zip(lines, prompts, strict=True):
        tokens = beam_search(model, prompt, beam=2, max_new_tokens=8, length_penalty=0.8, no_repeat_ngram=4)
        assert line == cut_output(enc.decode(tokens))
    # the adapter was applied: the base model alone says something else
    assert lines[0].split() != enc.decode(beam_search(base, prompts[0], beam=2, max_new_tokens=8)).split()

    records = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 1
    record = records[0]
    scores = metrics.score_all(lines, [item["format_refs"] for item in items])  # the paper's form of the refs
    assert record["scores"] == scores and record["references"] == "paper"
    assert metrics.score_all(lines, [item["refs"] for item in items]) != scores
    assert record["val_loss"] == pytest.approx(dev_loss(model, load_split(e2e_small, "dev"), 4, "cpu", 8), rel=1e-6)
    assert (record["split"], record["mrs"], record["settings"]["beam"]) == ("test", 4, 2)
    assert record["predictions"] == str(out / "predictions_test.txt")
    assert record["base_model"] == str(tiny_gpt2) and record["lora"].startswith("r=2 alpha=4 on q,v")

    expected_row = (f"| {adapter} | test | 4 | {record['val_loss']:.4f} | {100 * scores['BLEU']:.2f} | "
                    f"{scores['NIST']:.4f} | n/a | {100 * scores['ROUGE_L']:.2f} | {scores['CIDEr']:.4f} |")
    assert table_row(printed) == expected_row
    assert eval.METEOR_HINT in printed

    # --split dev, without the dev loss: a second line is appended, the first stays
    eval.main([*common, "--split", "dev", "--no_val_loss"])
    n_dev = len(prepare.load_mrs(e2e_small, "dev")[:4])
    assert len((out / "predictions_dev.txt").read_text(encoding="utf-8").split("\n")[:-1]) == n_dev
    records = [json.loads(line) for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(records) == 2 and records[0] == record
    assert (records[1]["split"], records[1]["mrs"], records[1]["val_loss"]) == ("dev", n_dev, None)


def first_refs_against_the_others(e2e_src, tmp_path):
    """(hyps file, refs CSV, hyps, refs): each MR's first reference as its output, scored against the MR's
    other references (MRs with a single reference are left out)."""
    items = [(mr, refs) for mr, refs in prepare.unique_mrs(prepare.read_csv(e2e_src / "testset_w_refs.csv"))
             if len(refs) > 1]
    hyps, refs = [r[0] for _, r in items], [r[1:] for _, r in items]
    refs_csv = write_e2e_csv(tmp_path / "refs.csv", [(mr, ref) for mr, r in items for ref in r[1:]])
    hyp_file = tmp_path / "hyps.txt"
    eval.write_lines(hyp_file, hyps)
    return hyp_file, refs_csv, hyps, refs


def test_hyp_and_refs_score_a_file_as_score_all(e2e_src, tmp_path, capsys, monkeypatch):
    hyp_file, refs_csv, hyps, refs = first_refs_against_the_others(e2e_src, tmp_path)
    scores, n_mrs = eval.score_hyp_file(hyp_file, refs_csv)
    assert n_mrs == len(hyps) >= 4 and scores == metrics.score_all(hyps, refs)

    # BLEU computed independently: sacrebleu's corpus BLEU with 13a tokenization, lowercased, which is the
    # official BLEU when every output has 3+ tokens and every n-gram order has a match (true here).
    sacrebleu = pytest.importorskip("sacrebleu")
    streams = [[rs[k] if k < len(rs) else None for rs in refs] for k in range(max(map(len, refs)))]
    expected = sacrebleu.corpus_bleu(hyps, streams, tokenize="13a", lowercase=True).score / 100
    assert scores["BLEU"] == pytest.approx(expected, abs=1e-6)

    monkeypatch.setattr(metrics, "meteor", lambda hyps, refs: 0.3125)  # a METEOR to print
    eval.main(["--hyp", str(hyp_file), "--refs", str(refs_csv)])
    printed = capsys.readouterr().out
    assert table_row(printed) == (f"| {hyp_file} | refs.csv | {n_mrs} | - | {100 * scores['BLEU']:.2f} | "
                                  f"{scores['NIST']:.4f} | 31.25 | {100 * scores['ROUGE_L']:.2f} | "
                                  f"{scores['CIDEr']:.4f} |")
    assert eval.METEOR_HINT not in printed


def one_line_error(argv):
    with pytest.raises(SystemExit) as err:
        eval.main(argv)
    message = str(err.value)
    assert message.startswith("error: ") and "\n" not in message
    return message


def test_a_wrong_line_count_names_both_numbers(e2e_src, tmp_path):
    hyp_file, refs_csv, hyps, _ = first_refs_against_the_others(e2e_src, tmp_path)
    eval.write_lines(hyp_file, hyps[:-1])
    message = one_line_error(["--hyp", str(hyp_file), "--refs", str(refs_csv)])
    assert f"has {len(hyps) - 1} lines but" in message and f"has {len(hyps)} unique MRs" in message


def test_mistakes_are_one_line(tiny_gpt2, adapter, e2e_src, tmp_path):
    assert "not both" in one_line_error(["--adapter", str(adapter), "--merged", str(tiny_gpt2)])
    assert "--hyp and --refs go together" in one_line_error(["--hyp", str(tmp_path / "h.txt")])
    assert "--hyp and --refs go together" in one_line_error(["--refs", str(e2e_src / "devset.csv")])
    assert "takes no --model" in one_line_error(["--hyp", "h", "--refs", "r.csv", "--adapter", str(adapter)])
    assert "no such file" in one_line_error(["--hyp", str(tmp_path / "h.txt"), "--refs",
                                             str(e2e_src / "devset.csv")])
    assert "at least 1" in one_line_error(["--adapter", str(adapter), "--limit", "0"])
    assert "cannot read" in one_line_error(["--adapter", str(tmp_path / "missing.safetensors")])

    # An adapter made for another model shape
    other = GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=32))
    other.name_or_path = "other"
    lora.apply_lora(other, lora.LoRAConfig(rank=2))
    save_adapter(other, tmp_path / "other.safetensors")
    message = one_line_error(["--model", str(tiny_gpt2), "--adapter", str(tmp_path / "other.safetensors")])
    assert "does not fit" in message


def eagle_tokens():
    """The tokens of "The Eagle is a pub." + a blank line of two "\\n" tokens + "It is cheap."."""
    enc = get_tokenizer()
    return enc.encode_ordinary("The Eagle is a pub.") + [198, 198] + enc.encode_ordinary("It is cheap.")


def test_outputs_are_cut_as_the_paper_cut_them(tiny_gpt2, e2e_small, tmp_path, monkeypatch):
    """A decoder that answers every MR with the tokens of "The Eagle is a pub.\\n\\nIt is cheap.": the outputs
    file holds, and score_all scores, "The Eagle is a pub." (before the cut: "The Eagle is a pub.  It is cheap.")."""
    monkeypatch.setattr(eval, "beam_search_batch", lambda model, prompts, *args, **kwargs: [eagle_tokens()] * len(
        prompts))
    scored = []
    monkeypatch.setattr(metrics, "score_all", lambda hyps, refs, **options: scored.append(hyps) or dict.fromkeys(
        eval.SCORE_NAMES, 0.5))
    out = tmp_path / "out"
    eval.main(["--model", str(tiny_gpt2), "--data", str(e2e_small), "--out", str(out), "--limit", "3",
               "--no_val_loss", "--device", "cpu"])
    assert (out / "predictions_test.txt").read_text(encoding="utf-8") == "The Eagle is a pub.\n" * 3
    assert scored == [["The Eagle is a pub."] * 3]


def test_length_penalty_and_ngram_rule_reach_the_decoder(tiny_gpt2, e2e_small, tmp_path, monkeypatch):
    """--length_penalty 0.3 and --no_repeat_ngram 2 (not the presets' 0.8 and the default 4, which are also
    beam_search_batch's defaults, so a flag that did not reach it would go unseen) are what the decoder runs with;
    without the flags, the task's preset and 4."""
    seen = []

    def spy(*args, **kwargs):
        call = inspect.signature(beam_search_batch).bind(*args, **kwargs)
        call.apply_defaults()  # an option not passed is the decoder's default
        seen.append((call.arguments["length_penalty"], call.arguments["no_repeat_ngram"]))
        return beam_search_batch(*args, **kwargs)

    monkeypatch.setattr(eval, "beam_search_batch", spy)
    common = ["--model", str(tiny_gpt2), "--data", str(e2e_small), "--limit", "2", "--beam", "2",
              "--max_new_tokens", "4", "--no_val_loss", "--device", "cpu"]
    record = eval.main([*common, "--out", str(tmp_path / "a"), "--length_penalty", "0.3", "--no_repeat_ngram", "2"])
    assert seen == [(0.3, 2)]
    assert (record["settings"]["length_penalty"], record["settings"]["no_repeat_ngram"]) == (0.3, 2)
    seen.clear()
    record = eval.main([*common, "--out", str(tmp_path / "b")])
    assert seen == [(0.8, 4)] and record["settings"]["length_penalty"] == 0.8
