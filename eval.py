"""Evaluate on the E2E NLG test set with the challenge's official metrics, as the LoRA paper reports them:

    python eval.py --adapter out/adapter.safetensors   # the base model named in the adapter, + the adapter
    python eval.py --merged out/merged                 # a checkpoint with the adapter merged in (merge.py)
    python eval.py --model gpt2-medium                 # the base model alone
    python eval.py --adapter out/adapter.safetensors --split dev --limit 50    # a quick look on dev
    python eval.py --hyp outputs.txt --refs testset_w_refs.csv    # score any system's outputs; no model

With a model it: decodes every unique MR of the split (630 on test) by beam search with the paper's
settings (microsoft/LoRA's decoder: beam 10, length penalty 0.8, no repeated 4-gram); writes the outputs one
line per MR, in the order the MRs first appear in the CSV, to {out}/predictions_{split}.txt; computes the mean
dev loss per token; scores the outputs with metrics.e2e.score_all (BLEU, NIST, METEOR, ROUGE-L, CIDEr, as the official
scorer); prints a row like the paper's Table 18 and appends the figures as a JSON line to {out}/results.jsonl.

WebNLG, DART and your own data (a model trained on a folder that data/tasks.py prepared; the adapter records
the task): each input of the split (its references grouped) is decoded the same way and scored with BLEU, METEOR
and TER as those tasks' official evaluations report them, WebNLG's on its seen, unseen and all categories:

    python eval.py --adapter out/webnlg/adapter.safetensors           # data/webnlg/test
    python eval.py --adapter out/mine/adapter.safetensors --data data/mine --split dev

With --hyp FILE --refs CSV it does the official E2E scorer's job alone: FILE holds one output per line for each
unique MR of CSV, in order of first appearance.
"""

import argparse
import json
import time
from datetime import datetime
from pathlib import Path

import torch
from tqdm import tqdm

import lora
from beam import beam_search_batch, check_beam_width, cut_output, prompt_batches
from checkpoints.adapters import adapter_path
from checkpoints.loading import describe_lora, load_model, new_token_budget
from data import tasks
from data.e2e import prepare
from data.e2e.batches import dev_loss, load_split
from data.webnlg import prepare as webnlg
from metrics import e2e as metrics
from metrics import ter
from plumbing import outputs
from plumbing.device import pick_device, pick_dtype
from plumbing.errors import UserError, reported
from plumbing.files import atomic_write, removed_on_failure

SCORE_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")  # metrics.score_all's keys, in the paper's order
PERCENT = ("BLEU", "METEOR", "ROUGE_L")  # the paper prints these x100 (BLEU 70.4 is 0.704 from the scorer)
METEOR_HINT = "METEOR n/a: it runs meteor-1.5.jar, which needs Java on PATH and pip install pycocoevalcap"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Decode the E2E test set with beam search and score it with the "
                                "official E2E metrics (defaults: the LoRA paper's decoding, Table 11); or, "
                                "with --hyp and --refs, score a file of outputs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="base model: gpt2, gpt2-medium, ..., or a folder / "
                   ".safetensors file (None: the adapter's base model, or gpt2)")
    p.add_argument("--adapter", default=None, help="the LoRA adapter: the file train.py writes, a train.py run "
                   "folder, or a PEFT adapter folder")
    p.add_argument("--merged", default=None, help="merged checkpoint folder written by merge.py")
    p.add_argument("--data", default=None, help="folder of the prepared data (None: data/TASK of the model's "
                   "task, e.g. data/e2e, which is prepared, and downloaded, when missing)")
    p.add_argument("--split", default="test", choices=["test", "dev"], help="the inputs to decode and score")
    p.add_argument("--beam", type=int, default=10, help="beam size")
    p.add_argument("--length_penalty", type=float, default=None, help="None: the task's preset (data/tasks.py), "
                   "0.8 for all three; for E2E the LoRA repository's command uses 0.8, the paper's Table 11 0.9")
    p.add_argument("--references", default=None, choices=["paper", "official"], help="score against the "
                   "references in the paper's pre-tokenized form (grouped by context, as microsoft/LoRA's "
                   "gpt2_decode.py does) or as the official CSV has them (None: the model's data format)")
    p.add_argument("--no_repeat_ngram", type=int, default=4, help="never repeat an n-gram of this size "
                   "(0: no rule)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="longest output, in tokens")
    p.add_argument("--beam_batch", type=int, default=16, help="MRs decoded together (left-padded to the longest "
                   "prompt): all their beams go through the model in one forward per step")
    p.add_argument("--limit", type=int, default=None, help="decode only the first N MRs (quick runs)")
    p.add_argument("--no_val_loss", action="store_true", help="skip the dev loss")
    p.add_argument("--no_meteor", action="store_true", help="skip METEOR (its Java start-up takes seconds)")
    p.add_argument("--val_examples", type=int, default=None, help="dev examples for the loss (None: all of them)")
    p.add_argument("--val_batch_size", type=int, default=16, help="examples per forward pass of the dev loss")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto is bf16 where the GPU supports it, else fp32")
    p.add_argument("--out", default=None, help="folder for predictions_{split}.txt and results.jsonl "
                   "(None: the adapter's folder, the merged folder, or ./out for a base model)")
    p.add_argument("--force", action="store_true", help="replace an earlier predictions_{split}.txt in --out")
    p.add_argument("--hyp", default=None, help="score this file of outputs (UTF-8, one line per MR) instead "
                   "of decoding; needs --refs")
    p.add_argument("--refs", default=None, help="E2E CSV (mr,ref) whose references --hyp is scored against")
    return p.parse_args(argv)


def check_args(args):
    """A one-line error for options that cannot go together or values that make no sense."""
    if args.hyp is not None or args.refs is not None:
        if args.hyp is None or args.refs is None:
            raise UserError("--hyp and --refs go together: the outputs to score and the CSV of references")
        if args.model is not None or args.adapter is not None or args.merged is not None:
            raise UserError("--hyp scores a file of outputs; it takes no --model, --adapter or --merged")
        return
    check_beam_width(args.beam)
    for name in ("max_new_tokens", "beam_batch", "limit", "val_examples", "val_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if args.no_repeat_ngram < 0:
        raise UserError(f"--no_repeat_ngram must be 0 (off) or more, got {args.no_repeat_ngram}")


# ----------------------------------------------------------------------------------------------------------
# The outputs file: one line per MR

def write_lines(path, lines):
    """Write lines, one per line, UTF-8, atomically (a line may be empty: an empty output still holds its
    MR's place)."""
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in lines).encode("utf-8"))


def read_hyps(path):
    """The outputs in a UTF-8 text file, one per line, each stripped (as measure_scores.read_lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return [line.strip() for line in text.splitlines()]


# ----------------------------------------------------------------------------------------------------------
# Scores and the table

def score_hyp_file(hyp_path, refs_csv):
    """(the five scores, number of MRs) of a file of outputs against an E2E CSV's references: line i of the
    file answers the i-th unique MR of the CSV, in order of first appearance."""
    refs = [mr_refs for _, mr_refs in prepare.unique_mrs(prepare.read_csv(refs_csv))]
    hyps = read_hyps(hyp_path)
    if len(hyps) != len(refs):
        raise UserError(f"{hyp_path} has {len(hyps)} lines but {refs_csv} has {len(refs)} unique MRs: need "
                        f"one output line per MR, in the order the MRs first appear")
    return metrics.score_all(hyps, refs), len(refs)


def table(name, split, n_mrs, val_loss, scores, meteor_asked=True):
    """A markdown header and row like the paper's Table 18, then the units (and how to get METEOR)."""
    def cell(metric):
        value = scores[metric]
        if value is None:
            return "n/a"
        return f"{100 * value:.2f}" if metric in PERCENT else f"{value:.4f}"

    cells = [name, split, str(n_mrs), "-" if val_loss is None else f"{val_loss:.4f}", *map(cell, SCORE_NAMES)]
    lines = ["| model | split | MRs | val_loss | BLEU | NIST | METEOR | ROUGE-L | CIDEr |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|",
             "| " + " | ".join(cells) + " |",
             "BLEU, METEOR and ROUGE-L are x100, as the paper prints them; NIST and CIDEr as the scorer "
             "prints them."]
    if scores["METEOR"] is None and meteor_asked:
        lines.append(METEOR_HINT)
    return "\n".join(lines)


def task_scores(hyps, refs, categories, task, with_meteor=True):
    """WebNLG's, DART's or your own data's scores as their official evaluations report them: corpus BLEU (the E2E
    scorer's, mteval tokenization, lowercased), METEOR (where Java is) and TER (tercom's, metrics/ter.py), each as
    a fraction; for WebNLG on the seen categories, the unseen ones and all, as the paper's Table 13 does."""
    subsets = {"all": list(range(len(hyps)))}
    if task == "webnlg":
        subsets["seen"] = [i for i, c in enumerate(categories) if webnlg.is_seen(c)]
        subsets["unseen"] = [i for i, c in enumerate(categories) if not webnlg.is_seen(c)]
    scores = {}
    for subset, rows in subsets.items():
        if not rows:
            continue  # e.g. no unseen category on the dev split
        h, r = [hyps[i] for i in rows], [refs[i] for i in rows]
        scores[subset] = dict(n=len(rows), BLEU=metrics.bleu(h, r),
                              METEOR=metrics.meteor(h, r) if with_meteor else None, TER=ter.corpus_ter(h, r))
    return scores


def task_table(name, split, val_loss, scores, meteor_asked=True):
    """A markdown table like the paper's Tables 13 and 14: one row per category subset."""
    def cell(value):
        return "n/a" if value is None else f"{100 * value:.2f}"

    lines = ["| model | split | subset | inputs | val_loss | BLEU | METEOR | TER |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for subset, s in scores.items():
        lines.append(f"| {name} | {split} | {subset} | {s['n']} | {'-' if val_loss is None else f'{val_loss:.4f}'} | "
                     f"{cell(s['BLEU'])} | {cell(s['METEOR'])} | {cell(s['TER'])} |")
    lines.append("BLEU, METEOR and TER are x100, as the paper prints them (TER: lower is better).")
    if meteor_asked and any(s["METEOR"] is None for s in scores.values()):
        lines.append(METEOR_HINT)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Decoding

def decode(model, enc, prompts, args, autocast, max_new_tokens, length_penalty):
    """Each prompt's beam-search output as one line of text, cut as the paper's decoder cuts it (beam.cut_output).
    The prompts are decoded args.beam_batch at a time, left-padded to the longest of their batch (the same answers
    as one by one, in fewer, larger forwards)."""
    outputs = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="beam search", unit=" input", dynamic_ncols=True) as bar:
        for group in prompt_batches(prompts, args.beam_batch, max_new_tokens, model.config.block_size):
            with autocast:
                answers = beam_search_batch(model, [prompts[i] for i in group], beam=args.beam,
                                            max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                                            no_repeat_ngram=args.no_repeat_ngram)
            for i, tokens in zip(group, answers, strict=True):
                outputs[i] = cut_output(enc.decode(tokens))
            bar.update(len(group))
    return outputs


def default_out(args):
    """Where the results go unless --out says: beside the adapter, in the merged folder, or ./out."""
    if args.out is not None:
        return Path(args.out)
    if args.adapter is not None:
        return adapter_path(args.adapter).parent  # the run folder
    if args.merged is not None:
        merged = Path(args.merged)
        return merged if merged.is_dir() else merged.parent
    return Path("out")


def evaluate(args):
    """Decode the split, compute the dev loss, score, print the table and append the results line."""
    out = default_out(args)
    predictions_path = out / f"predictions_{args.split}.txt"
    outputs.check_folder(out, holds=[predictions_path.name], force=args.force)  # now, not after decoding
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    model, data_format = load_model(model=args.model, adapter=args.adapter, merged=args.merged)
    lora_settings = lora.config_of(model)
    task = tasks.task_of(data_format)
    if task != "e2e" and args.references is not None:
        raise UserError(f"--references chooses between E2E's two forms of references; this model was trained on "
                        f"{task} data, whose references are its own")
    references = args.references or (data_format if task == "e2e" else task)
    length_penalty = args.length_penalty if args.length_penalty is not None else tasks.PRESETS.get(
        task, tasks.PRESETS["e2e"])["length_penalty"]
    # Fold the adapter into the weights, as loralib does in eval mode: the same function (up to rounding), and
    # one matmul per projection instead of one plus two per update.
    lora.merge_lora(model)
    model.to(device).eval()
    enc = tasks.get_tokenizer()

    if args.data is None and task == tasks.FORMAT:
        raise UserError("this model was trained on your own data: say with --data which prepared folder to score")
    data = Path(args.data) if args.data is not None else tasks.data_dir(task)
    splits = [args.split] + (["dev"] if not args.no_val_loss and args.split != "dev" else [])
    prepare.prepare_missing(data, splits, data_format, task)
    for split in splits:
        if prepare.read_format(data, split) != data_format:
            raise UserError(f"{data} holds {split} in the {prepare.read_format(data, split)} format, but the "
                             f"model was trained on the {data_format} format; pass --data with that format")
    if task == "e2e":
        items = prepare.load_mrs(data, args.split)[:args.limit]
        prompts = [prepare.prompt_tokens(enc, item["mr"], data_format) for item in items]
        refs = [item["format_refs"] if references == "paper" else item["refs"] for item in items]
    else:
        groups = tasks.load_groups(data, args.split)[:args.limit]
        prompts = [tasks.prompt_tokens(enc, prompt) for prompt, _, _ in groups]
        refs, categories = [group_refs for _, group_refs, _ in groups], [category for _, _, category in groups]
    name = args.adapter or args.merged or model.name_or_path
    max_new_tokens = new_token_budget(args.max_new_tokens, max(len(prompt) for prompt in prompts),
                                      model.config.block_size, "longest prompt")
    what = "MRs" if task == "e2e" else "inputs"
    print(f"{name} on {device} ({str(dtype).removeprefix('torch.')}): {len(prompts)} {args.split} {what}, beam "
          f"{args.beam}, length penalty {length_penalty}, no repeated {args.no_repeat_ngram}-grams; scored "
          f"against the {references} references" + (" (pre-tokenized, as the paper)" if references == "paper" else ""))

    val_loss = None
    if not args.no_val_loss:
        dev = load_split(data, "dev")
        val_loss = dev_loss(model, dev, args.val_batch_size, device, args.val_examples, autocast)
        n_examples = len(dev) if args.val_examples is None else min(args.val_examples, len(dev))
        print(f"val loss {val_loss:.4f} (mean per target token over {n_examples:,} dev examples)")

    t0 = time.perf_counter()
    predictions = decode(model, enc, prompts, args, autocast, max_new_tokens, length_penalty)
    decode_seconds = time.perf_counter() - t0
    write_lines(predictions_path, predictions)

    t0 = time.perf_counter()
    if task == "e2e":
        scores = metrics.score_all(predictions, refs, with_meteor=not args.no_meteor)
    else:
        scores = task_scores(predictions, refs, categories, task, with_meteor=not args.no_meteor)
    score_seconds = time.perf_counter() - t0
    print(f"decoded in {decode_seconds:.1f} s, scored in {score_seconds:.1f} s; outputs: {predictions_path}")
    if task == "e2e":
        print(table(name, args.split, len(prompts), val_loss, scores, not args.no_meteor))
    else:
        print(task_table(name, args.split, val_loss, scores, not args.no_meteor))

    record = dict(
        date=datetime.now().isoformat(timespec="seconds"), model=str(name),
        base_model=str(model.name_or_path), adapter=args.adapter, merged=args.merged,
        lora=describe_lora(lora_settings) if lora_settings else None, data_format=data_format,
        references=references, split=args.split,
        mrs=len(prompts), val_loss=val_loss, val_examples=args.val_examples, task=task,
        scores=scores,  # the scorers' units: BLEU, METEOR, ROUGE_L, TER in 0..1 (by category subset for WebNLG)
        settings=dict(beam=args.beam, length_penalty=length_penalty,
                      no_repeat_ngram=args.no_repeat_ngram, max_new_tokens=max_new_tokens,
                      limit=args.limit, device=device, dtype=str(dtype).removeprefix("torch.")),
        predictions=str(predictions_path), decode_seconds=round(decode_seconds, 2),
        score_seconds=round(score_seconds, 2),
    )
    # One write call of one line: appending never leaves a half line, and earlier results stay as they were.
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"results appended to {out / 'results.jsonl'}")
    return record


def main(argv=None):
    args = parse_args(argv)
    with reported():
        check_args(args)
        if args.hyp is None:
            with removed_on_failure(default_out(args)):  # an --out folder made for a run that fails goes
                return evaluate(args)
        t0 = time.perf_counter()
        scores, n_mrs = score_hyp_file(args.hyp, args.refs)
    print(f"scored {n_mrs} MRs in {time.perf_counter() - t0:.1f} s against the official references of {args.refs}")
    print(table(args.hyp, Path(args.refs).name, n_mrs, None, scores))


if __name__ == "__main__":
    main()
