"""Evaluate on the E2E NLG test set with the challenge's official metrics, as the LoRA paper reports them:

    python eval.py --adapter out/adapter.safetensors   # the base model named in the adapter, + the adapter
    python eval.py --merged out/merged                 # a checkpoint with the adapter merged in (merge.py)
    python eval.py --model gpt2-medium                 # the base model alone
    python eval.py --adapter out/adapter.safetensors --split dev --limit 50    # a quick look on dev
    python eval.py --hyp outputs.txt --refs testset_w_refs.csv    # score any system's outputs; no model

With a model it: decodes every unique MR of the split (630 on test) by beam search with the paper's
settings (microsoft/LoRA's decoder: beam 10, length penalty 0.8, no repeated 4-gram); writes the outputs one
line per MR, in the order the MRs first appear in the CSV, to {out}/predictions_{split}.txt; computes the mean
dev loss per token; scores the outputs with metrics.score_all (BLEU, NIST, METEOR, ROUGE-L, CIDEr, as the official
scorer); prints a row like the paper's Table 18 and appends the figures as a JSON line to {out}/results.jsonl.

With --hyp FILE --refs CSV it does the official scorer's job alone: FILE holds one output per line for each
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
from data.e2e import prepare
from data.e2e.batches import dev_loss, load_split
from tools import metrics, preflight
from tools.beam import beam_search_batch, length_groups
from tools.device import pick_device, pick_dtype
from tools.files import atomic_write
from tools.loading import describe_lora, load_model

SCORE_NAMES = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")  # metrics.score_all's keys, in the paper's order
PERCENT = ("BLEU", "METEOR", "ROUGE_L")  # the paper prints these x100 (BLEU 70.4 is 0.704 from the scorer)
METEOR_HINT = "METEOR n/a: it runs meteor-1.5.jar, which needs Java on PATH and pip install pycocoevalcap"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Decode the E2E test set with beam search and score it with the "
                                "official E2E metrics (defaults: the LoRA paper's decoding, Table 11); or, "
                                "with --hyp and --refs, score a file of outputs.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="base model: gpt2, gpt2-medium, ..., or a folder / "
                   ".safetensors file (default: the adapter's base model, or gpt2)")
    p.add_argument("--adapter", default=None, help="adapter file written by train.py")
    p.add_argument("--merged", default=None, help="merged checkpoint folder written by merge.py")
    p.add_argument("--data", default=str(prepare.DATA_DIR), help="folder of the prepared E2E data (prepared, "
                   "and downloaded, when missing)")
    p.add_argument("--split", default="test", choices=["test", "dev"], help="the MRs to decode and score")
    p.add_argument("--beam", type=int, default=10, help="beam size")
    p.add_argument("--length_penalty", type=float, default=0.8, help="the LoRA repository's E2E command uses 0.8; "
                   "the paper's Table 11 says 0.9")
    p.add_argument("--references", default=None, choices=["paper", "official"], help="score against the "
                   "references in the paper's pre-tokenized form (grouped by context, as microsoft/LoRA's "
                   "gpt2_decode.py does) or as the official CSV has them (default: the model's data format)")
    p.add_argument("--no_repeat_ngram", type=int, default=4, help="never repeat an n-gram of this size "
                   "(0: no rule)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="longest output, in tokens")
    p.add_argument("--beam_batch", type=int, default=16, help="MRs decoded together (their prompts of the same "
                   "token length): all their beams go through the model in one forward per step")
    p.add_argument("--limit", type=int, default=None, help="decode only the first N MRs (quick runs)")
    p.add_argument("--no_val_loss", action="store_true", help="skip the dev loss")
    p.add_argument("--no_meteor", action="store_true", help="skip METEOR (its Java start-up takes seconds)")
    p.add_argument("--val_examples", type=int, default=None, help="dev examples for the loss (default: all)")
    p.add_argument("--val_batch_size", type=int, default=16, help="examples per forward pass of the dev loss")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), or e.g. cuda:1")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype; auto is bf16 where the GPU supports it, else fp32")
    p.add_argument("--out", default=None, help="folder for predictions_{split}.txt and results.jsonl "
                   "(default: the adapter's folder, the merged folder, or ./out for a base model)")
    p.add_argument("--force", action="store_true", help="replace an earlier predictions_{split}.txt in --out")
    p.add_argument("--hyp", default=None, help="score this file of outputs (UTF-8, one line per MR) instead "
                   "of decoding; needs --refs")
    p.add_argument("--refs", default=None, help="E2E CSV (mr,ref) whose references --hyp is scored against")
    return p.parse_args(argv)


def check_args(args):
    """A one-line error for options that cannot go together or values that make no sense."""
    if args.hyp is not None or args.refs is not None:
        if args.hyp is None or args.refs is None:
            raise SystemExit("error: --hyp and --refs go together: the outputs to score and the CSV of references")
        if args.model is not None or args.adapter is not None or args.merged is not None:
            raise SystemExit("error: --hyp scores a file of outputs; it takes no --model, --adapter or --merged")
        return
    for name in ("beam", "max_new_tokens", "limit", "val_examples", "val_batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{name} must be at least 1, got {value}")
    if args.no_repeat_ngram < 0:
        raise SystemExit(f"error: --no_repeat_ngram must be 0 (off) or more, got {args.no_repeat_ngram}")


# ----------------------------------------------------------------------------------------------------------
# The outputs file: one line per MR

def one_line(text):
    """text on a single line: every line break (\\n, \\r\\n, and the others str.splitlines knows, which the
    official scorer's reader also splits on) becomes a space, and surrounding whitespace goes."""
    return " ".join(text.splitlines()).strip()


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
        raise SystemExit(f"error: {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise SystemExit(f"error: cannot read {path}: {e.strerror or e}") from None
    return [line.strip() for line in text.splitlines()]


# ----------------------------------------------------------------------------------------------------------
# Scores and the table

def score_hyp_file(hyp_path, refs_csv):
    """(the five scores, number of MRs) of a file of outputs against an E2E CSV's references: line i of the
    file answers the i-th unique MR of the CSV, in order of first appearance."""
    refs = [mr_refs for _, mr_refs in prepare.unique_mrs(prepare.read_csv(refs_csv))]
    hyps = read_hyps(hyp_path)
    if len(hyps) != len(refs):
        raise SystemExit(f"error: {hyp_path} has {len(hyps)} lines but {refs_csv} has {len(refs)} unique MRs: need "
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


# ----------------------------------------------------------------------------------------------------------
# Decoding

def decode(model, enc, mrs, args, autocast):
    """Each MR's beam-search output as one line of text. MRs whose prompts have the same number of tokens are
    decoded together, args.beam_batch at a time (the same answers as one by one, in fewer, larger forwards)."""
    if args.beam_batch < 1:
        raise ValueError(f"--beam_batch must be at least 1, got {args.beam_batch}")
    prompts = [prepare.prompt_tokens(enc, mr, model.data_format) for mr in mrs]
    outputs = [None] * len(mrs)
    with tqdm(total=len(mrs), desc="beam search", unit=" MR", dynamic_ncols=True) as bar:
        for group in length_groups(prompts, args.beam_batch):
            with autocast:
                answers = beam_search_batch(model, [prompts[i] for i in group], beam=args.beam,
                                            max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty,
                                            no_repeat_ngram=args.no_repeat_ngram)
            for i, tokens in zip(group, answers, strict=True):
                outputs[i] = one_line(enc.decode(tokens))
            bar.update(len(group))
    return outputs


def default_out(args):
    """Where the results go unless --out says: beside the adapter, in the merged folder, or ./out."""
    if args.out is not None:
        return Path(args.out)
    if args.adapter is not None:
        return Path(args.adapter).parent
    if args.merged is not None:
        merged = Path(args.merged)
        return merged if merged.is_dir() else merged.parent
    return Path("out")


def evaluate(args):
    """Decode the split, compute the dev loss, score, print the table and append the results line."""
    out = default_out(args)
    predictions_path = out / f"predictions_{args.split}.txt"
    if predictions_path.exists() and not args.force:
        raise SystemExit(f"error: {predictions_path} exists (results.jsonl may point at it); pass --force to "
                         f"replace it, or another --out")
    preflight.writable_folder(out)  # found out now, not after decoding everything
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    model = load_model(model=args.model, adapter=args.adapter, merged=args.merged)
    references = args.references or model.data_format
    # Fold the adapter into the weights, as loralib does in eval mode: the same function (up to rounding), and
    # one matmul per projection instead of one plus two per update.
    lora.merge_lora(model)
    model.to(device).eval()
    enc = prepare.get_tokenizer()

    data = Path(args.data)
    splits = [args.split] + (["dev"] if not args.no_val_loss and args.split != "dev" else [])
    missing = [split for split in splits if not prepare.is_prepared(data, split)]
    if missing:
        prepare.prepare(data, splits=missing, data_format=model.data_format)
    for split in splits:
        if prepare.read_format(data, split) != model.data_format:
            raise SystemExit(f"error: {data} holds {split} in the {prepare.read_format(data, split)} format, but the "
                             f"model was trained on the {model.data_format} format; pass --data with that format")
    items = prepare.load_mrs(data, args.split)[:args.limit]
    refs = [item["format_refs"] if references == "paper" else item["refs"] for item in items]
    name = args.adapter or args.merged or model.name_or_path
    longest = max(len(prepare.prompt_tokens(enc, item["mr"], model.data_format)) for item in items)
    max_new_tokens = min(args.max_new_tokens, model.config.block_size - longest)
    if max_new_tokens < args.max_new_tokens:
        print(f"note: --max_new_tokens {args.max_new_tokens} capped at {max_new_tokens}: the longest prompt has "
              f"{longest} tokens and the model {model.config.block_size} positions")
    print(f"{name} on {device} ({str(dtype).removeprefix('torch.')}): {len(items)} {args.split} MRs, beam "
          f"{args.beam}, length penalty {args.length_penalty}, no repeated {args.no_repeat_ngram}-grams; scored "
          f"against the {references} references" + (" (pre-tokenized, as the paper)" if references == "paper" else ""))

    val_loss = None
    if not args.no_val_loss:
        dev = load_split(data, "dev")
        val_loss = dev_loss(model, dev, args.val_batch_size, device, args.val_examples, autocast)
        n_examples = len(dev) if args.val_examples is None else min(args.val_examples, len(dev))
        print(f"val loss {val_loss:.4f} (mean per target token over {n_examples:,} dev examples)")

    t0 = time.perf_counter()
    predictions = decode(model, enc, [item["mr"] for item in items], args, autocast)
    decode_seconds = time.perf_counter() - t0
    write_lines(predictions_path, predictions)

    t0 = time.perf_counter()
    scores = metrics.score_all(predictions, refs, with_meteor=not args.no_meteor)
    score_seconds = time.perf_counter() - t0
    print(f"decoded in {decode_seconds:.1f} s, scored in {score_seconds:.1f} s; outputs: {predictions_path}")
    print(table(name, args.split, len(items), val_loss, scores, not args.no_meteor))

    record = dict(
        date=datetime.now().isoformat(timespec="seconds"), model=str(name),
        base_model=str(model.name_or_path), adapter=args.adapter, merged=args.merged,
        lora=describe_lora(model.lora_config) if hasattr(model, "lora_config") else None,
        data_format=model.data_format, references=references, split=args.split,
        mrs=len(items), val_loss=val_loss, val_examples=args.val_examples,
        scores=scores,  # the scorer's units: BLEU, METEOR, ROUGE_L in 0..1
        settings=dict(beam=args.beam, length_penalty=args.length_penalty,
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
    check_args(args)
    if args.hyp is None:
        return evaluate(args)
    t0 = time.perf_counter()
    scores, n_mrs = score_hyp_file(args.hyp, args.refs)
    print(f"scored {n_mrs} MRs in {time.perf_counter() - t0:.1f} s against the official references of {args.refs}")
    print(table(args.hyp, Path(args.refs).name, n_mrs, None, scores))


if __name__ == "__main__":
    main()
