"""The LoRA paper's sweeps, one command each: train one adapter per setting, evaluate it, write a table.

    python -m tools.sweep ranks --ranks 1 2 4 8 16 64                  # Table 18: r on Wq, Wv
    python -m tools.sweep targets                                      # Table 5: Wq / Wk / Wv / Wo at r=8,
                                                                 # {Wq,Wk} / {Wq,Wv} at r=4, all four at r=2
    python -m tools.sweep targets --grid q:8 q,v:4 q,k,v,o:2 q,v:64    # any grid (Table 6)
    python -m tools.sweep ranks --ranks 1 4 -- --max_iters 200 --model gpt2   # after --: passed to train.py

Every setting trains with the same seed, data and steps (train.py run by itself, so a run is exactly what
`python train.py ...` gives), then eval.py scores it. Each run lives in its own folder under --out; a sweep
that is stopped and started again reuses the runs that are finished and resumes the one it stopped in. Ctrl-C,
SIGINT or SIGTERM to the sweep goes to the script it is running, which saves where it was; the sweep waits for it
and exits with status 130. The table goes to --out/table.md and --out/table.csv, and its figure to
--out/figure.png (with matplotlib).
"""

import argparse
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from beam import check_beam_width
from data.e2e import prepare
from lora import TARGETS
from plumbing import outputs, stopping
from plumbing.errors import UserError, reported
from plumbing.files import atomic_write, read_safetensors_header, removed_on_failure
from tools import plot

ROOT = Path(__file__).resolve().parents[1]  # the repository, where train.py and eval.py are
TABLE5 = ["q:8", "k:8", "v:8", "o:8", "q,k:4", "q,v:4", "q,k,v,o:2"]  # the paper's 18M-parameter budget
COLUMNS = ["setting", "targets", "rank", "trainable", "steps", "val_loss"]
# eval.py's scores: E2E's five, or BLEU, METEOR and TER (over all inputs) for WebNLG, DART and your own data
SCORES = ["BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr", "TER"]
PERCENT = {"BLEU", "METEOR", "ROUGE_L", "TER"}  # printed x100, as the paper does


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description="Train and evaluate one LoRA adapter per rank or per target set. "
                                "Arguments after -- go to train.py (e.g. -- --model gpt2-medium --max_iters 2000).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="sweep", required=True)
    ranks = sub.add_parser("ranks", help="one adapter per rank on fixed targets (Table 18)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ranks.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 64], help="the LoRA ranks r, one "
                       "run each")
    ranks.add_argument("--targets", nargs="+", default=["q", "v"], choices=TARGETS, help="the projections every "
                       "run updates")
    targets = sub.add_parser("targets", help="one adapter per target set and rank (Tables 5 and 6)",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    targets.add_argument("--grid", nargs="+", default=TABLE5, help="settings TARGETS:RANK, e.g. q,v:4")
    for sp in (ranks, targets):
        sp.add_argument("--out", default=None, help="folder of the runs and the table (None: sweep_KIND)")
        sp.add_argument("--data", default=str(prepare.DATA_DIR), help="prepared E2E data, for train and eval")
        sp.add_argument("--eval_split", default="test", choices=["test", "dev"], help="what eval.py decodes")
        sp.add_argument("--eval_limit", type=int, default=None, help="decode only the first N MRs (quick runs)")
        sp.add_argument("--beam", type=int, default=10, help="beam size for eval.py")
        sp.add_argument("--no_eval", action="store_true", help="train only (the table has val_loss, no scores)")
        sp.add_argument("--no_meteor", action="store_true", help="skip METEOR in eval.py")
    args = p.parse_args(argv)
    args.train_args = train_args
    args.out = Path(args.out or f"sweep_{args.sweep}")
    return args


def settings(args):
    """[(name, targets, rank)] of the sweep, in table order."""
    if args.sweep == "ranks":
        return [(f"r{r}", list(args.targets), r) for r in args.ranks]
    grid = []
    for item in args.grid:
        targets, _, rank = item.partition(":")
        if not rank.isdigit() or not targets:
            raise UserError(f"--grid wants TARGETS:RANK such as q,v:4, got {item!r}")
        grid.append((f"{targets.replace(',', '')}_r{rank}", targets.split(","), int(rank)))
    return grid


def run_script(script, script_args):
    """Run one of the project's scripts in its own process, as a user would; stop the sweep if it fails. A signal to
    stop goes to the script alone (plumbing/stopping.py), and once the script has saved and exited, the sweep stops
    too (KeyboardInterrupt: status 130)."""
    command = [sys.executable, str(ROOT / script), *script_args]
    print("$ " + " ".join(command[1:]), flush=True)
    child = subprocess.Popen(command, cwd=ROOT, start_new_session=True)  # signals reach it through passed_on only
    with stopping.passed_on(child) as passed:
        returncode = child.wait()
    if passed or returncode == 130:
        print(f"sweep: stopped, with {script}; run the sweep again to continue where it stopped", file=sys.stderr)
        raise KeyboardInterrupt
    if returncode != 0:
        raise UserError(f"{script} failed (its error is above); finished runs are kept, run the sweep again "
                        "to continue")


def last_result(run, split):
    """The latest results.jsonl line of this run for this split, or None."""
    path = run / "results.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [line for line in lines if line["split"] == split]
    return lines[-1] if lines else None


def final_val_loss(run):
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    return next((line["val_loss"] for line in reversed(lines) if "val_loss" in line), None)


def progress(run):
    """(steps done, steps planned) of a run, from its checkpoint; (0, None) when it has none."""
    if not (run / "ckpt.pt").is_file():
        return 0, None
    state = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=False)
    return state["step"], state.get("total")


def finished(run):
    """A run is finished when its checkpoint says every planned step is done (a val_loss alone is not enough:
    a run stopped part way has one too)."""
    step, total = progress(run)
    return (run / "adapter.safetensors").is_file() and step == total


def trainable_count(adapter):
    """The number of LoRA parameters, read from the adapter file's header."""
    entries, _ = read_safetensors_header(adapter)
    return sum(math.prod(entry["shape"]) for entry in entries.values())


def sweep(args):
    # every run's numbers before the first run starts: a mistake found after hours of training costs those hours
    check_beam_width(args.beam)
    for name, _, rank in settings(args):
        if rank < 1:
            raise UserError(f"{name}: rank {rank} must be at least 1")
    if args.eval_limit is not None and args.eval_limit < 1:
        raise UserError(f"--eval_limit must be at least 1, got {args.eval_limit}")
    outputs.check_folder(args.out)  # the runs' folders and the tables; a sweep started again continues it
    rows = []
    for name, targets, rank in settings(args):
        run = args.out / name
        adapter = run / "adapter.safetensors"
        trained = not finished(run)
        if trained:  # a new run, or one stopped part way (Ctrl-C, a crash): train.py --resume continues it
            resume = ["--resume"] if (run / "ckpt.pt").is_file() else []
            run_script("train.py", ["--rank", str(rank), "--targets", *targets, "--out", str(run),
                                    "--data", args.data, *resume, *args.train_args])
        step, total = progress(run)
        if step != total:
            raise UserError(f"{run} stopped at step {step} of {total}; run the sweep again to continue it")
        row = dict(setting=name, targets=",".join(targets), rank=rank, trainable=trainable_count(adapter),
                   steps=f"{step}/{total}", val_loss=final_val_loss(run))
        if not args.no_eval:
            result = last_result(run, args.eval_split)
            same = result is not None and (result["settings"]["limit"], result["settings"]["beam"]) == \
                (args.eval_limit, args.beam)
            if trained or not same:  # not evaluated yet, trained further since, or with other settings
                run_script("eval.py", ["--adapter", str(adapter), "--split", args.eval_split, "--force", "--beam",
                                       str(args.beam), "--no_val_loss", "--data", args.data,
                                       *(["--limit", str(args.eval_limit)] if args.eval_limit else []),
                                       *(["--no_meteor"] if args.no_meteor else [])])
                result = last_result(run, args.eval_split)
            scores = result["scores"] if result.get("task", "e2e") == "e2e" else result["scores"]["all"]
            row.update({name: scores[name] for name in SCORES if name in scores})
        rows.append(row)
    write_tables(args.out, rows)
    plot.sweep_figure_beside(args.out, rows, args.sweep)  # figure.png, when matplotlib is installed
    if args.sweep == "targets":
        counts = {row["trainable"] for row in rows}
        verdict = "the same for every setting" if len(counts) == 1 else "NOT the same: compare with care"
        print(f"trainable parameters: {verdict} ({', '.join(f'{c:,}' for c in sorted(counts))})")
    return rows


def cell(column, value):
    if value is None:
        return "n/a"
    if column in PERCENT:
        return f"{100 * value:.2f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_tables(out, rows):
    """table.md (printed too) and table.csv (full precision, the scorer's units), with the scores the task has."""
    columns = COLUMNS + [name for name in SCORES if any(name in row for row in rows)]
    header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    markdown = header + "".join("| " + " | ".join(cell(c, row.get(c)) for c in columns) + " |\n" for row in rows)
    markdown += "\nBLEU, METEOR, ROUGE_L and TER x100 as in the paper; val_loss is the mean dev loss per token.\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(out / "table.md") as f:
        f.write(markdown.encode())
    with atomic_write(out / "table.csv") as f:
        f.write(buffer.getvalue().encode())
    print(markdown + f"written to {out / 'table.md'} and {out / 'table.csv'}")


def main(argv=None):
    args = parse_args(argv)
    # A folder made for a sweep that fails before its first run has saved anything goes again.
    with reported(), removed_on_failure(args.out, keep=lambda: any(args.out.glob("*/ckpt.pt"))):
        return sweep(args)


if __name__ == "__main__":
    main()
