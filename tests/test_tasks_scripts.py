"""WebNLG, DART and your own data through the scripts, as the README runs them: prepare, train, evaluate, sample."""

import json

import pytest
from conftest import train_tiny_adapter

import eval
import sample
import train
from data import tasks
from data.dart import prepare as dart
from data.webnlg import prepare as webnlg
from metrics import ter

pytestmark = pytest.mark.tokenizer  # these tests tokenize text (see conftest.py)


def webnlg_file(path, entries):
    """A WebNLG 2017 JSON of (category, [(s, p, o)], [lexicalisations]) entries."""
    data = {"entries": [{str(i): {"category": category, "size": str(len(triples)),
                                  "modifiedtripleset": [dict(subject=s, property=p, object=o) for s, p, o in triples],
                                  "lexicalisations": [{"comment": "good", "lex": lex, "lang": "", "xml_id": f"Id{j}"}
                                                      for j, lex in enumerate(lexes, start=1)]}}
                        for i, (category, triples, lexes) in enumerate(entries, start=1)]}
    path.write_text(json.dumps(data), encoding="utf-8")


WEBNLG = [
    ("Airport", [("Aarhus_Airport", "cityServed", "Aarhus")], ["Aarhus Airport serves Aarhus.",
                                                               "Aarhus is served by Aarhus Airport."]),
    ("Food", [("Bacon_sandwich", "country", "United_Kingdom")], ["The bacon sandwich comes from the UK."]),
    ("Artist", [("Aaron_Turner", "genre", "Post-metal")], ["Aaron Turner plays post-metal."]),  # an unseen category
]


@pytest.fixture(scope="module")
def webnlg_data(tmp_path_factory):
    src, out = tmp_path_factory.mktemp("webnlg_src"), tmp_path_factory.mktemp("webnlg") / "data"
    for name in webnlg.SPLITS.values():
        webnlg_file(src / name, WEBNLG)
    webnlg.main(["--source", str(src), "--out", str(out)])
    return out


def args_for(tiny_gpt2, data, out, *extra):
    return ["--model", str(tiny_gpt2), "--data", str(data), "--out", str(out), "--max_iters", "2", "--warmup", "1",
            "--batch_size", "2", "--device", "cpu", *extra]


def test_webnlg_trains_and_is_scored_on_seen_unseen_and_all_categories(tiny_gpt2, webnlg_data, tmp_path, capsys):
    assert json.loads((webnlg_data / "test_groups.json").read_text())[0] == {
        "prompt": "Aarhus_Airport : cityServed : Aarhus", "category": "Airport",
        "references": ["Aarhus Airport serves Aarhus.", "Aarhus is served by Aarhus Airport."]}
    train.main(args_for(tiny_gpt2, webnlg_data, tmp_path / "run", "--preset", "webnlg"))
    record = eval.main(["--adapter", str(tmp_path / "run"), "--data", str(webnlg_data), "--beam", "2",
                        "--max_new_tokens", "6", "--no_meteor", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert record["task"] == "webnlg" and record["mrs"] == 3 and record["settings"]["length_penalty"] == 0.8
    assert {k: v["n"] for k, v in record["scores"].items()} == {"all": 3, "seen": 2, "unseen": 1}
    hyps = (tmp_path / "run" / "predictions_test.txt").read_text(encoding="utf-8").splitlines()
    refs = [lexes for _, _, lexes in WEBNLG]
    assert record["scores"]["all"]["TER"] == pytest.approx(ter.corpus_ter(hyps, refs), abs=1e-12)
    assert record["scores"]["unseen"]["TER"] == pytest.approx(ter.corpus_ter(hyps[2:], refs[2:]), abs=1e-12)
    assert "| subset | inputs | val_loss | BLEU | METEOR | TER |" in printed and "| unseen | 1 |" in printed

    texts = sample.main(["--adapter", str(tmp_path / "run"), "--triples", "Aarhus_Airport | cityServed | Aarhus",
                         "--greedy", "--max_new_tokens", "4", "--device", "cpu"])
    assert "prompt: 'Aarhus_Airport : cityServed : Aarhus<|endoftext|>'" in capsys.readouterr().out
    assert len(texts) == 1
    with pytest.raises(SystemExit, match=r"^error: --mr is an E2E meaning representation, but the model was trained "
                                         r"on webnlg data: give --prompt or --triples$"):
        sample.main(["--adapter", str(tmp_path / "run"), "--mr", "name[X]", "--device", "cpu"])


def test_the_presets_are_table_11s(tiny_gpt2):
    for task, (dropout, weight_decay, label_smoothing) in dict(e2e=(0.1, 0.01, 0.1), webnlg=(0.1, 0.01, 0.1),
                                                               dart=(0.0, 0.0, 0.0)).items():
        args = train.parse_args(["--preset", task])
        assert (args.dropout, args.weight_decay, args.label_smoothing) == (dropout, weight_decay, label_smoothing)
        assert args.data == str(tasks.data_dir(task))
    assert train.parse_args(["--preset", "dart", "--dropout", "0.05"]).dropout == 0.05  # a flag wins


def test_dart_prepares_trains_and_scores(tiny_gpt2, tmp_path):
    src, data = tmp_path / "src", tmp_path / "dart"
    src.mkdir()
    entries = [{"tripleset": [["Mars Hill College", "JOINED", "1973"]], "annotations": [
        {"source": "WikiSQL_decl_sents", "text": "Mars Hill College joined in 1973."}]},
        {"tripleset": [["Ace Wagon", "ROLE", "pilot"], ["Ace Wagon", "FLEW", "Apollo 12"]],
         "annotations": [{"source": "e2e", "text": "Ace Wagon was a pilot on Apollo 12."},
                         {"source": "e2e", "text": "Apollo 12's pilot was Ace Wagon."}]}]
    for name in dart.SPLITS.values():
        (src / name).write_text(json.dumps(entries), encoding="utf-8")
    dart.main(["--source", str(src), "--out", str(data)])
    assert tasks.load_groups(data, "test")[1][0] == "Ace Wagon : role : pilot | Ace Wagon : flew : Apollo 12"
    train.main(args_for(tiny_gpt2, data, tmp_path / "run", "--preset", "dart"))
    record = eval.main(["--adapter", str(tmp_path / "run"), "--data", str(data), "--beam", "2", "--max_new_tokens",
                        "4", "--no_meteor", "--no_val_loss", "--device", "cpu"])
    assert record["task"] == "dart" and list(record["scores"]) == ["all"] and record["scores"]["all"]["n"] == 2


def test_your_own_jsonl_data_end_to_end_and_its_mistakes(tiny_gpt2, tmp_path):
    def jsonl(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return str(tmp_path / name)

    rows = [{"prompt": f"add {a} {b}", "completion": str(a + b)} for a in range(4) for b in range(3)]
    paths = [jsonl("train.jsonl", rows), jsonl("dev.jsonl", rows[:4])]
    tasks.main(["--train", paths[0], "--dev", paths[1], "--test", paths[1], "--out", str(tmp_path / "mine")])
    train.main(args_for(tiny_gpt2, tmp_path / "mine", tmp_path / "run"))
    with pytest.raises(SystemExit, match="say with --data which prepared folder"):
        eval.main(["--adapter", str(tmp_path / "run"), "--beam", "2", "--device", "cpu"])
    record = eval.main(["--adapter", str(tmp_path / "run"), "--data", str(tmp_path / "mine"), "--beam", "2",
                        "--max_new_tokens", "3", "--no_meteor", "--device", "cpu"])
    assert record["task"] == "prompt_completion" and record["scores"]["all"]["n"] == 4

    # a line without a completion: one line naming the file and the line, and nothing written
    bad = jsonl("bad.jsonl", rows[:2] + [{"prompt": "add 9 9"}])
    with pytest.raises(SystemExit) as err:
        tasks.main(["--train", bad, "--dev", paths[1], "--out", str(tmp_path / "bad")])
    assert str(err.value).startswith(f"error: {bad}:3: ") and "completion" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "bad").exists()
    # a folder of another task is not completed with E2E's files
    tasks.prepare_files(tmp_path / "dev_only", {"dev": paths[1]})
    with pytest.raises(SystemExit, match=r"dev_only has no train split of the prompt_completion task; prepare it "
                                         r"first: python data/tasks.py --train \.\.\. --dev \.\.\. --out "):
        train.main(args_for(tiny_gpt2, tmp_path / "dev_only", tmp_path / "run2"))
    assert not (tmp_path / "run2").exists()


def test_an_e2e_adapter_takes_no_triples(tiny_gpt2, tmp_path):
    adapter = train_tiny_adapter(tiny_gpt2, tmp_path / "a.safetensors")
    with pytest.raises(SystemExit, match="^error: --triples is for models trained on WebNLG or DART; this one was "
                                         "trained on e2e data$"):
        sample.main(["--adapter", str(adapter), "--triples", "a | b | c", "--device", "cpu"])
    with pytest.raises(SystemExit, match=r"^error: --triples 'a \| b': each triple is 'subject \| property \| "):
        sample.main(["--model", str(tiny_gpt2), "--triples", "a | b", "--device", "cpu"])


def test_a_rank_sweep_on_webnlg_reports_bleu_meteor_and_ter(tiny_gpt2, webnlg_data, tmp_path):
    from tools import sweep

    rows = sweep.main(["ranks", "--ranks", "1", "--out", str(tmp_path), "--data", str(webnlg_data), "--beam", "2",
                       "--no_meteor", "--", "--preset", "webnlg", "--model", str(tiny_gpt2), "--max_iters", "2",
                       "--warmup", "1", "--batch_size", "2", "--device", "cpu"])
    assert set(rows[0]) >= {"BLEU", "METEOR", "TER"} and "NIST" not in rows[0] and rows[0]["TER"] > 0
    header = (tmp_path / "table.md").read_text().splitlines()[0]
    assert header == "| setting | targets | rank | trainable | steps | val_loss | BLEU | METEOR | TER |"
