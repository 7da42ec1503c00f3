"""tools/plot.py: each picture is written atomically and shows exactly the numbers it was drawn from (the x and y of
every line and bar, read back from the figure's Axes); without matplotlib, over an existing picture, or from an
empty or missing log, it refuses in one line."""

import csv
import json
import sys

import pytest

import train
from tools import plot, sweep

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

needs_matplotlib = pytest.mark.skipif(not plot.have_matplotlib(), reason="matplotlib is not installed (it is "
                                      "optional: pip install matplotlib)")


def write_log(folder, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


# A log as train.py writes it: warmup then decay, the dev loss every third step.
LOG = [dict(step=s, loss=round(5.0 - 0.3 * s + 0.01 * s * s, 6), lr=2e-4 * min(s / 3, (9 - s) / 6),
            tokens_per_s=1000 + s, **({"val_loss": round(4.9 - 0.2 * s, 6)} if s % 3 == 0 else {}))
       for s in range(1, 10)]


def no_matplotlib(monkeypatch):
    """As if matplotlib were not installed: `import matplotlib` raises ImportError."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@needs_matplotlib
def test_run_figure_shows_the_logs_training_loss_dev_loss_and_learning_rate(tmp_path, capsys):
    run = write_log(tmp_path / "run", LOG)
    path, series = plot.main([str(run)])
    assert path == run / "loss.png" and path.read_bytes().startswith(PNG_SIGNATURE)
    assert leftovers(run) == []
    assert series == {"training loss": ([float(s) for s in range(1, 10)], [line["loss"] for line in LOG]),
                      "dev loss": ([3.0, 6.0, 9.0], [line["val_loss"] for line in LOG if "val_loss" in line]),
                      "learning rate": ([float(s) for s in range(1, 10)], [line["lr"] for line in LOG])}
    assert capsys.readouterr().out == f"wrote {path}: 9 steps, last dev loss {LOG[-1]['val_loss']:.4f}\n"


@needs_matplotlib
def test_a_run_with_no_dev_loss_yet_draws_the_training_curve(tmp_path):
    run = write_log(tmp_path / "run", [line for line in LOG if "val_loss" not in line][:2])
    _, series = plot.plot_run(run, tmp_path / "early.svg")
    assert (tmp_path / "early.svg").read_bytes().lstrip().startswith(b"<?xml")
    assert set(series) == {"training loss", "learning rate"} and series["training loss"][1] == [4.71, 4.44]


@needs_matplotlib
@pytest.mark.tokenizer
def test_the_figure_of_a_real_train_run_has_its_logged_numbers(tiny_gpt2, e2e_small, tmp_path):
    run = tmp_path / "run"
    train.main(["--model", str(tiny_gpt2), "--data", str(e2e_small), "--out", str(run), "--max_iters", "6",
                "--warmup", "2", "--eval_interval", "3", "--eval_examples", "8", "--batch_size", "4",
                "--device", "cpu"])
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    path, series = plot.main([str(run), "--out", str(tmp_path / "curves.png")])
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    assert series["training loss"] == ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [line["loss"] for line in log])
    assert series["dev loss"] == ([3.0, 6.0], [log[2]["val_loss"], log[5]["val_loss"]])
    assert series["learning rate"][1] == [train.lr_at(s, 2e-4, 2, 6) for s in range(6)]


@needs_matplotlib
def test_an_existing_picture_is_replaced_only_with_force_and_atomically(tmp_path, monkeypatch, capsys):
    run = write_log(tmp_path / "run", LOG)
    (run / "loss.png").write_bytes(b"the user's own picture")
    with pytest.raises(SystemExit) as refused:
        plot.main([str(run)])
    assert refused.value.code == (f"error: {run / 'loss.png'} already exists; pass --force to replace it, "
                                  "or give another --out")
    assert (run / "loss.png").read_bytes() == b"the user's own picture"

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("plumbing.files.os.fsync", disk_full)  # the write fails after the bytes went to the temp file
    with pytest.raises(SystemExit) as failed:
        plot.main([str(run), "--force"])
    assert failed.value.code.startswith("error: could not write") and "No space left" in failed.value.code
    assert (run / "loss.png").read_bytes() == b"the user's own picture" and leftovers(run) == []
    monkeypatch.undo()
    path, _ = plot.main([str(run), "--force"])
    assert path.read_bytes().startswith(PNG_SIGNATURE) and leftovers(run) == []


def test_without_matplotlib_one_line_says_how_to_get_the_picture(tmp_path, monkeypatch):
    run = write_log(tmp_path / "run", LOG)
    no_matplotlib(monkeypatch)
    assert not plot.have_matplotlib()
    with pytest.raises(SystemExit) as refused:
        plot.main([str(run)])
    assert refused.value.code == "error: matplotlib is not installed, and tools.plot needs it: pip install matplotlib"
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl"]
    with pytest.raises(ValueError, match="pip install matplotlib"):  # the library raises; only main() prints
        plot.sweep_figure([dict(rank=1, targets="q,v", val_loss=1.0)], "ranks", tmp_path / "figure.png")


@needs_matplotlib
@pytest.mark.parametrize("log, error", [
    (None, "log.jsonl not found: give a folder that train.py wrote (its --out)"),
    ("", "log.jsonl is empty: the run has not finished a step yet"),
    ("\n\n", "log.jsonl is empty: the run has not finished a step yet"),
    ('{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "lo', "log.jsonl:2: not a JSON line (is the file damaged?)"),
    ('{"step": 1, "lr": 0.1}\n', "log.jsonl:1: a log line needs step, loss and lr"),
])
def test_a_missing_empty_or_damaged_log_is_one_line(tmp_path, log, error):
    run = tmp_path / "run"
    run.mkdir()
    if log is not None:
        (run / "log.jsonl").write_text(log)
    with pytest.raises(SystemExit) as refused:
        plot.main([str(run)])
    assert refused.value.code == f"error: {run / error}"
    assert not (run / "loss.png").exists()


@needs_matplotlib
def test_out_must_be_a_picture_file(tmp_path):
    run = write_log(tmp_path / "run", LOG)
    with pytest.raises(SystemExit, match=r"^error: .*curves\.txt: the picture's name must end in .png, .pdf, .svg$"):
        plot.main([str(run), "--out", str(tmp_path / "curves.txt")])
    with pytest.raises(SystemExit, match=r"^error: .*run is a folder, not a file$"):
        plot.main([str(run), "--out", str(run), "--force"])


def test_help_names_every_option_and_its_default(capsys):
    with pytest.raises(SystemExit) as done:
        plot.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--out OUT the picture to write, .png, .pdf or .svg (default: RUN/loss.png)" in text
    assert "--force replace the picture if it exists (default: refuse)" in text


# ----------------------------------------------------------------------------------------------------------
# The sweep's figure.

RANK_ROWS = [dict(setting=f"r{r}", targets="q,v", rank=r, trainable=512 * r, steps="2/2", val_loss=2.0 + 1 / r,
                  BLEU=0.60 + 0.01 * r) for r in (1, 2, 4, 8)]
TARGET_ROWS = [dict(setting=name, targets=targets, rank=rank, trainable=1024, steps="2/2", val_loss=1.5 + i / 10)
               for i, (name, targets, rank) in enumerate([("q_r4", "q", 4), ("qv_r2", "q,v", 2),
                                                          ("qkvo_r1", "q,k,v,o", 1)])]


@needs_matplotlib
def test_rank_sweep_figure_is_dev_loss_and_bleu_against_rank(tmp_path):
    path, series = plot.sweep_figure(RANK_ROWS, "ranks", tmp_path / "figure.png")
    assert path.read_bytes().startswith(PNG_SIGNATURE) and leftovers(tmp_path) == []
    assert series == {"dev loss": ([1.0, 2.0, 4.0, 8.0], [3.0, 2.5, 2.25, 2.125]),
                      "BLEU x100": ([1.0, 2.0, 4.0, 8.0], [pytest.approx(100 * r["BLEU"]) for r in RANK_ROWS])}


@needs_matplotlib
def test_target_sweep_figure_is_one_bar_per_setting(tmp_path):
    _, series = plot.sweep_figure(TARGET_ROWS, "targets", tmp_path / "figure.png")
    # no BLEU in the rows (a --no_eval sweep): the dev-loss panel alone
    assert series == {"dev loss": (["q r=4", "q,v r=2", "q,k,v,o r=1"], [1.5, 1.6, pytest.approx(1.7)])}
    _, series = plot.sweep_figure([dict(row, BLEU=0.5 + i / 100) for i, row in enumerate(TARGET_ROWS)], "targets",
                                  tmp_path / "figure.png")
    assert series["BLEU x100"] == (["q r=4", "q,v r=2", "q,k,v,o r=1"], [50.0, 51.0, 52.0])


@needs_matplotlib
@pytest.mark.tokenizer
def test_a_sweep_writes_its_figure_beside_its_table_or_says_how_to_get_it(tiny_gpt2, e2e_small, tmp_path,
                                                                           monkeypatch, capsys):
    """A rank sweep without matplotlib writes its tables and says once how to get the figure; with it, it draws
    the numbers of table.csv. The runs are trained here first, as the sweep's own train.py would (one process is
    quicker than two), so the sweep finds them finished and only reads them."""
    train_args = ["--model", str(tiny_gpt2), "--max_iters", "2", "--warmup", "1", "--batch_size", "4",
                  "--eval_interval", "2", "--eval_examples", "8", "--device", "cpu"]
    for rank in (1, 2):
        train.main(["--rank", str(rank), "--targets", "q", "v", "--out", str(tmp_path / f"r{rank}"), "--data",
                    str(e2e_small), *train_args])
    argv = ["ranks", "--ranks", "1", "2", "--out", str(tmp_path), "--data", str(e2e_small), "--no_eval", "--",
            *train_args]
    capsys.readouterr()
    with monkeypatch.context() as m:
        no_matplotlib(m)
        sweep.main(argv)
    out = capsys.readouterr().out
    assert "$ " not in out  # the runs were found finished: nothing trained again
    assert (tmp_path / "table.md").is_file() and (tmp_path / "table.csv").is_file()
    assert not (tmp_path / "figure.png").exists()
    assert out.count("pip install matplotlib") == 1

    drawn = []
    monkeypatch.setattr(plot, "sweep_figure", lambda *a: drawn.append(plot_sweep_figure(*a)) or drawn[-1])
    sweep.main(argv)
    with open(tmp_path / "table.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    [(path, series)] = drawn
    assert path == tmp_path / "figure.png" and path.read_bytes().startswith(PNG_SIGNATURE)
    assert series == {"dev loss": ([1.0, 2.0], [float(row["val_loss"]) for row in table])}
    assert [row["setting"] for row in table] == ["r1", "r2"]


plot_sweep_figure = plot.sweep_figure  # the real one, which the last test wraps to see what it drew
