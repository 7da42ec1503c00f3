"""Sample text from GPT-2, from GPT-2 with a trained LoRA adapter, or from a merged checkpoint.

    python sample.py                                         # GPT-2 (124M) continues a default prompt
    python sample.py --prompt "Once upon a time" --top_p 0.9 --num_samples 5
    python sample.py --prompt FILE:prompt.txt                # the prompt is the text of prompt.txt
    python sample.py --adapter out/adapter.safetensors --mr "name[The Vaults], eatType[pub], area[riverside]"
    python sample.py --adapter out/adapter.safetensors --mr "..." --beam 10    # the paper's E2E decoding
    python sample.py --merged out/merged --mr "..." --greedy

--mr formats an E2E meaning representation exactly as training did (prepare.format_prompt), so an adapter
trained on E2E sees the prompt it learned to complete. Generation stops at <|endoftext|>. Samples go to
stdout, one after the other, each under a '--- sample i/n ---' line; what was loaded goes to stderr.
"""

import argparse
import sys
from pathlib import Path

import torch

import lora
from checkpoint import UserError
from data.e2e import prepare
from model import EOT, beam_search, get_tokenizer, pick_device, pick_dtype

DEFAULT_PROMPT = "Hello, I'm a language model,"
FILE_PREFIX = "FILE:"  # --prompt FILE:path reads the prompt from a file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Sample from GPT-2, optionally with a LoRA adapter (--adapter) or from a merged "
        "checkpoint (--merged). Samples are printed to stdout; generation stops at <|endoftext|>.")
    what = parser.add_argument_group("what to sample from")
    what.add_argument("--model", default=None,
                      help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a folder or .safetensors file "
                      "(default: gpt2; with --adapter, the base model named in the adapter file)")
    what.add_argument("--adapter", type=Path, default=None,
                      help="a LoRA adapter file (from train.py) to add to the model (default: none)")
    what.add_argument("--merged", type=Path, default=None,
                      help="a merged checkpoint folder (from merge.py); it is the whole model, so it goes "
                      "with neither --model nor --adapter (default: none)")
    prompt = parser.add_argument_group("the prompt (one of)")
    prompt.add_argument("--prompt", default=None,
                        help=f"the text to continue, or FILE:path to read it from a file; an empty prompt "
                        f"samples unconditionally, after <|endoftext|> (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--mr", default=None,
                        help="an E2E meaning representation, e.g. 'name[The Vaults], eatType[pub]', "
                        "formatted as in training: 'MR ||' (default: none)")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--num_samples", type=int, default=3,
                          help="how many samples to draw; --greedy and --beam give one "
                          "(default: %(default)s)")
    decoding.add_argument("--max_new_tokens", type=int, default=64,
                          help="the most tokens to generate (default: %(default)s)")
    decoding.add_argument("--temperature", type=float, default=1.0,
                          help="divide the logits by this before sampling: lower is more conservative, 0 is "
                          "greedy (default: %(default)s)")
    decoding.add_argument("--top_k", type=int, default=None,
                          help="sample from the k most likely tokens only (default: all tokens)")
    decoding.add_argument("--top_p", type=float, default=None,
                          help="sample from the smallest set of tokens whose probability reaches p, nucleus "
                          "sampling (default: all tokens)")
    decoding.add_argument("--greedy", action="store_true",
                          help="always take the most likely token; one output, since every sample would be "
                          "the same (default: off)")
    decoding.add_argument("--beam", type=int, default=None,
                          help="beam search with this many beams instead of sampling, one output; the LoRA "
                          "paper used 10 on E2E (default: off)")
    decoding.add_argument("--length_penalty", type=float, default=0.9,
                          help="with --beam: a hypothesis scores its log-probability / length ** this "
                          "(default: %(default)s)")
    decoding.add_argument("--no_repeat_ngram", type=int, default=4,
                          help="with --beam: never repeat an n-gram of this many tokens; 0 allows repeats "
                          "(default: %(default)s)")
    decoding.add_argument("--seed", type=int, default=1337,
                          help="the random seed: the same seed gives the same samples (default: %(default)s)")
    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--device", default="auto",
                          help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps "
                          "(default: %(default)s)")
    hardware.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                          help="the weights' precision; auto is bf16 on a GPU that has it, else fp32 "
                          "(default: %(default)s)")
    return parser.parse_args(argv)


def check_options(args):
    """Refuse option values that make no sense, each with a one-line reason."""
    if args.adapter is not None and args.merged is not None:
        raise UserError("--adapter and --merged cannot be used together: a merged checkpoint already holds "
                        "its adapter")
    if args.model is not None and args.merged is not None:
        raise UserError("--model and --merged cannot be used together: --merged DIR is the whole model")
    if args.prompt is not None and args.mr is not None:
        raise UserError("--prompt and --mr cannot be used together: give one prompt")
    for name in ("num_samples", "max_new_tokens", "top_k", "beam"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 or more, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")


def describe_model(args, model):
    """What is being sampled from, for the first line of output."""
    if args.merged is not None:
        return f"merged checkpoint {args.merged}"
    if args.adapter is not None:
        return f"{model.name_or_path} + adapter {args.adapter} ({lora.describe(model.lora_config)})"
    return model.name_or_path


def read_prompt(args):
    """The prompt text: --mr formatted as in training, --prompt (or the file it names), or the default."""
    if args.mr is not None:
        return prepare.format_prompt(args.mr)
    text = DEFAULT_PROMPT if args.prompt is None else args.prompt
    if text.startswith(FILE_PREFIX):
        path = Path(text[len(FILE_PREFIX):])
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read the prompt file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise UserError(f"the prompt file {path} is not UTF-8 text ({e.reason})") from None
        text = text.removesuffix("\n")  # the newline an editor puts at the end is not part of the prompt
    return text


def encode_prompt(text, block_size, max_new_tokens):
    """The prompt's token ids; an empty prompt is <|endoftext|> alone, how GPT-2 starts a new text."""
    # encode_ordinary, as in training: "<|endoftext|>" typed in a prompt stays plain text
    tokens = get_tokenizer().encode_ordinary(text) or [EOT]
    if len(tokens) + max_new_tokens > block_size:
        raise UserError(f"the prompt is {len(tokens)} tokens; with --max_new_tokens {max_new_tokens} that is "
                        f"more than the model's {block_size} positions (shorten the prompt or lower "
                        f"--max_new_tokens)")
    return tokens


def until_eot(tokens):
    """The tokens before the first <|endoftext|> (all of them if there is none)."""
    return tokens[:tokens.index(EOT)] if EOT in tokens else tokens


def generate(model, tokens, args):
    """The new tokens of each output, without <|endoftext|>: one per sample, or one for --greedy / --beam."""
    if args.beam is not None:
        return [beam_search(model, tokens, beam=args.beam, max_new_tokens=args.max_new_tokens,
                            length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram,
                            eos_token=EOT)]
    device = model.transformer.wte.weight.device
    rows = 1 if args.greedy else args.num_samples
    idx = torch.tensor([tokens] * rows, dtype=torch.long, device=device)
    # A generator of our own, seeded by --seed: the samples depend on nothing else (not on other random use).
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                         top_k=args.top_k, top_p=args.top_p, eos_token=EOT, generator=generator)
    return [until_eot(row[len(tokens):].tolist()) for row in out]


def heading(args, i, n):
    """The line above output i of n."""
    if args.beam is not None:
        return f"--- beam search, beam {args.beam} ---"
    return "--- greedy ---" if args.greedy else f"--- sample {i}/{n} ---"


def main(argv=None):
    """Sample and print; returns the texts of the outputs (the continuations only)."""
    args = parse_args(argv)
    try:
        check_options(args)
        text = read_prompt(args)
        model = lora.load_model(model=args.model, adapter=args.adapter, merged=args.merged)
        description = describe_model(args, model)
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        model.to(device=device, dtype=dtype).eval()
        precision = str(dtype).removeprefix("torch.")
        print(f"{description}, on {device} in {precision}", file=sys.stderr, flush=True)
        tokens = encode_prompt(text, model.config.block_size, args.max_new_tokens)
        outputs = generate(model, tokens, args)
    except UserError as e:
        raise SystemExit(f"error: {e}") from None
    enc = get_tokenizer()
    texts = [enc.decode(new_tokens) for new_tokens in outputs]
    print(f"prompt: {text!r}")
    for i, continuation in enumerate(texts, start=1):
        print(heading(args, i, len(texts)))
        print(continuation)
    return texts


if __name__ == "__main__":
    main()
