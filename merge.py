"""Fold a LoRA adapter into its base model and write an ordinary GPT-2 checkpoint, checked before it appears.

    python merge.py --adapter out/adapter.safetensors --out out/merged
    python merge.py --adapter out/adapter.safetensors --check-only    # merge in memory, check, write nothing

Every adapted projection becomes W = W0 + (alpha / r) B A (lora.merge_lora, accumulated in fp32): the merged
model computes in one matmul what base + adapter computed in three, so it samples as fast as the base model.
--out gets a complete checkpoint in the Hugging Face layout, model.safetensors + config.json, which loads
with GPT.from_pretrained(out), `python sample.py --merged out` and transformers'
GPT2LMHeadModel.from_pretrained(out).

The check: the written files are read back from disk and compared, on a batch of prompts, with the unmerged
model (base + adapter, computing W0 x + (alpha / r) B A x): the largest and the mean |logit difference|, and
whether the greedy continuations are the same token for token. The folder gets its name --out only when the
check passes; otherwise nothing is left behind and the script exits with an error.

Both models run the check in float64 (the weights themselves stay fp32, as written): in fp32, rounding alone
makes two exactly equivalent GPT-2-sized models differ by about 1e-4 in logits that reach +-150 (measured:
1.5e-4), as much as the tolerance. In float64 the one difference left is the merge's own, W0 + (alpha / r) B A
rounded once to fp32 (measured on the same model: 2e-6).
"""

import argparse
from pathlib import Path

import torch

import lora
from checkpoints.adapters import adapter_path
from checkpoints.loading import describe, describe_lora, load_model
from checkpoints.merged import compare, model_outputs, write_checkpoint
from data.e2e.prepare import DATA_DIR, load_mrs, prompt_tokens
from data.tasks import get_tokenizer
from model import GPT
from plumbing import outputs
from plumbing.device import pick_device
from plumbing.errors import UserError, reported

# The check's prompts when no prepared E2E dev MRs are found in --data: E2E MRs (in the adapter's data format)
# and plain text.
FALLBACK_MRS = [
    "name[The Vaults], eatType[pub], priceRange[more than £30], customer rating[5 out of 5], near[Café Adriatic]",
    "name[The Cambridge Blue], eatType[restaurant], food[English], priceRange[cheap], area[riverside]",
    "name[Aromi], eatType[coffee shop], food[French], customer rating[low], area[city centre], familyFriendly[no]",
    "name[Zizzi], eatType[pub], near[The Sorrento]",
]
FALLBACK_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "In 1905, Albert Einstein published four papers that",
    "Low-rank adaptation freezes the pretrained weights and",
    "def fibonacci(n):\n",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Merge a LoRA adapter into its base model (W = W0 + (alpha / r) B A) and write a "
        "complete GPT-2 checkpoint (model.safetensors + config.json, Hugging Face layout, fp32). The written "
        "files are read back and checked against the unmerged model before the folder appears.")
    parser.add_argument("--adapter", type=Path, required=True, help="the LoRA adapter: the file train.py "
                        "writes, a train.py run folder, or a PEFT adapter folder")
    parser.add_argument("--out", type=Path, default=None, help="the folder to create for the merged checkpoint; "
                        "it must not exist (required unless --check-only) (default: none)")
    parser.add_argument("--model", default=None,
                        help="the base model: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a folder or "
                        ".safetensors file (default: the base model named in the adapter file)")
    parser.add_argument("--check-only", "--check_only", dest="check_only", action="store_true",
                        help="merge in memory and check against the unmerged model; write nothing "
                        "(default: off)")
    parser.add_argument("--data", type=Path, default=None,
                        help="the folder with the prepared E2E data; the check uses its dev MRs "
                        "(dev_mrs.json) when they are there, else a fixed list of texts "
                        f"(default: the --data of the run that trained the adapter, else {DATA_DIR})")
    parser.add_argument("--n_check", type=int, default=16,
                        help="how many prompts the check uses (default: %(default)s)")
    parser.add_argument("--check_tokens", type=int, default=32,
                        help="the length of the greedy continuations compared (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="the largest |logit difference| accepted; the check computes in float64 on the "
                        "fp32 weights (default: %(default)s)")
    parser.add_argument("--device", default="auto",
                        help="where to run the check: auto (cuda, then cpu), cpu, cuda; not mps, which has "
                        "no float64 (default: %(default)s)")
    return parser.parse_args(argv)


def check_options(args):
    """Refuse option values that cannot work, before anything is loaded."""
    if args.out is None and not args.check_only:
        raise UserError("give --out DIR for the merged checkpoint, or --check-only to write nothing")
    if args.out is not None and not args.check_only:
        outputs.check_new_folder(args.out, flag=None)  # a merge never overwrites
    for name in ("n_check", "check_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.tolerance < 0:
        raise UserError(f"--tolerance must be 0 or more, got {args.tolerance}")


# ----------------------------------------------------------------------------------------------------------
# Checking: merged against unmerged on the same prompts (checkpoints/merged.py computes the figures).

def check_prompts(data_dir, n, max_len, data_format):
    """(token lists, where they came from): the first n E2E dev MRs in the adapter's data format when they are
    prepared in data_dir, else fixed MRs and texts; each cut to its last max_len tokens."""
    enc = get_tokenizer()
    path = Path(data_dir) / "dev_mrs.json"
    if path.is_file():
        prompts = [prompt_tokens(enc, item["mr"], data_format) for item in load_mrs(data_dir, "dev")[:n]]
        source = f"{len(prompts)} E2E dev MRs from {path}"
    else:
        prompts = [prompt_tokens(enc, mr, data_format) for mr in FALLBACK_MRS]
        prompts = (prompts + [enc.encode_ordinary(text) for text in FALLBACK_TEXTS])[:n]
        source = f"{len(prompts)} fixed texts (E2E MRs and plain text; no prepared dev MRs in {data_dir})"
    return [tokens[-max_len:] for tokens in prompts], source


def training_data(adapter):
    """The --data folder of the train.py run that wrote this adapter (its ckpt.pt beside it), else the default."""
    ckpt = Path(adapter).parent / "ckpt.pt"
    if ckpt.is_file():
        return torch.load(ckpt, map_location="cpu", weights_only=False)["args"].get("data", DATA_DIR)
    return DATA_DIR


def report(figures, args, what):
    """Print the figures; a one-line error when the merged model is not the unmerged one."""
    print(f"{what} vs unmerged base + adapter, computed in float64:")
    print(f"  max  |logit difference|  {figures['max_diff']:.3e}   (tolerance {args.tolerance:.0e})")
    print(f"  mean |logit difference|  {figures['mean_diff']:.3e}")
    print(f"  greedy continuations of {args.check_tokens} tokens identical: "
          f"{figures['same']} of {figures['n']}")
    if figures["max_diff"] > args.tolerance or figures["same"] != figures["n"]:
        raise UserError(f"the merged model differs from the unmerged one: max |logit difference| "
                        f"{figures['max_diff']:.3e} (tolerance {args.tolerance:.0e}), "
                        f"{figures['n'] - figures['same']} of {figures['n']} greedy continuations differ; "
                        f"{'nothing was written' if not args.check_only else 'the merge is wrong'}")


def merge(args):
    """Load base + adapter, record the unmerged outputs, merge, write (unless --check-only) and check."""
    check_options(args)
    device = pick_device(args.device)
    if device.startswith("mps"):
        device = "cpu"  # the check needs float64, which mps lacks
    adapter = adapter_path(args.adapter)  # a run folder means the adapter file in it
    model, data_format = load_model(model=args.model, adapter=adapter)  # the adapter names its base
    description = describe(model)
    model.to(device).eval()
    print(f"{description}, adapter {adapter}, on {device}")
    if args.check_tokens >= model.config.block_size:
        raise UserError(f"--check_tokens must be below the model's block_size {model.config.block_size}")
    prompts, source = check_prompts(args.data or training_data(adapter), args.n_check,
                                    model.config.block_size - args.check_tokens, data_format)
    print(f"checking on {source}")
    model.double()  # the check computes in float64 (see the top of this file)
    unmerged = model_outputs(model, prompts, args.check_tokens, "unmerged")

    model.float()  # back to the fp32 weights (exactly: they were fp32 before), merged as they will be stored
    lora.merge_lora(model)
    if args.check_only:
        model.double()
        figures = compare(unmerged, model_outputs(model, prompts, args.check_tokens, "merged"))
        report(figures, args, "merged in memory")
        print("ok; --check-only: nothing written")
        return figures

    metadata = {"base_model": str(model.name_or_path), "adapter": str(adapter),
                "lora": describe_lora(lora.config_of(model)), "data_format": data_format}
    with outputs.new_folder(args.out, flag=None) as tmp:
        write_checkpoint(model, tmp, metadata)
        del model  # free its memory before the copy on disk is loaded
        reloaded = GPT.from_pretrained(tmp).to(device).double().eval()
        figures = compare(unmerged, model_outputs(reloaded, prompts, args.check_tokens, "merged, read back"))
        report(figures, args, "merged, read back from the written files,")  # an error here removes tmp
    size = (args.out / "model.safetensors").stat().st_size
    print(f"ok; wrote {args.out}: model.safetensors ({size / 1e6:.1f} MB) and config.json")
    return figures


def main(argv=None):
    """Merge, write and check; returns the check's figures (max_diff, mean_diff, same, n)."""
    args = parse_args(argv)
    with reported():
        return merge(args)


if __name__ == "__main__":
    main()
