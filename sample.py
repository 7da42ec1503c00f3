"""Sample text from GPT-2, from GPT-2 with a trained LoRA adapter, or from a merged checkpoint.

    python sample.py                                         # GPT-2 (124M) continues a default prompt
    python sample.py --prompt "Once upon a time" --top_p 0.9 --num_samples 5
    python sample.py --prompt FILE:prompt.txt                # the prompt is the text of prompt.txt
    python sample.py --adapter out/adapter.safetensors --mr "name[The Vaults], eatType[pub], area[riverside]"
    python sample.py --adapter out/adapter.safetensors --mr "..." --beam 10    # the paper's E2E decoding
    python sample.py --merged out/merged --mr "..." --greedy
    python sample.py --adapter out/webnlg --triples "Aarhus_Airport | cityServed | Aarhus" --beam 10   # WebNLG, DART
    python sample.py --adapter a.safetensors b.safetensors peft_folder --mr "..." --greedy   # each, in turn

--mr formats an E2E meaning representation exactly as training did (prepare.prompt_tokens), so an adapter
trained on E2E sees the prompt it learned to complete. Generation stops at <|endoftext|>; a --beam output is
printed as eval.py scores it, cut at the first blank line and on one line (beam.cut_output). Samples go to
stdout, one after the other, each under a '--- sample i/n ---' line; what was loaded goes to stderr. With several
adapters the base model is loaded once and each adapter's outputs follow an '=== adapter NAME ===' line.
"""

import argparse
import sys
from pathlib import Path

import torch

from beam import beam_search, check_beam_width, cut_output
from checkpoints.adapters import AdapterBank, read_adapter
from checkpoints.loading import describe, load_model, new_token_budget
from data import tasks
from data.dart import prepare as dart
from data.e2e.prepare import prompt_tokens
from data.tasks import EOT, get_tokenizer
from data.webnlg import prepare as webnlg
from model import GPT
from plumbing.device import pick_device, pick_dtype
from plumbing.errors import UserError, reported

DEFAULT_PROMPT = "Hello, I'm a language model,"
MAX_SAMPLES = 1024
FILE_PREFIX = "FILE:"  # --prompt FILE:path reads the prompt from a file


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Sample from GPT-2, optionally with a LoRA adapter (--adapter) or from a merged "
        "checkpoint (--merged). Samples are printed to stdout; generation stops at <|endoftext|>.")
    what = parser.add_argument_group("what to sample from")
    what.add_argument("--model", default=None,
                      help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a folder or .safetensors file "
                      "(default: gpt2; with --adapter, the base model named in the adapter file)")
    what.add_argument("--adapter", type=Path, nargs="+", default=None,
                      help="a LoRA adapter to add to the model: the file train.py writes, a train.py run folder, or a "
                      "PEFT adapter folder; several "
                      "are each sampled in turn, on one base model (default: none)")
    what.add_argument("--merged", type=Path, default=None,
                      help="a merged checkpoint folder (from merge.py); it is the whole model, so it goes "
                      "with neither --model nor --adapter (default: none)")
    prompt = parser.add_argument_group("the prompt (one of)")
    prompt.add_argument("--prompt", default=None,
                        help=f"the text to continue, or FILE:path to read it from a file; an empty prompt "
                        f"samples unconditionally, after <|endoftext|> (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--triples", nargs="+", default=None,
                        help="a WebNLG or DART input, one 'subject | property | object' per triple, formatted as the "
                        "adapter was trained (default: none)")
    prompt.add_argument("--mr", default=None,
                        help="an E2E meaning representation, e.g. 'name[The Vaults], eatType[pub]', "
                        "formatted as the adapter was trained (its data format) (default: none)")
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
    decoding.add_argument("--length_penalty", type=float, default=0.8,
                          help="with --beam: the length penalty of the LoRA repository's decoder (0.8 in its E2E "
                          "command; the paper's Table 11 says 0.9) (default: %(default)s)")
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
    if sum(x is not None for x in (args.prompt, args.mr, args.triples)) > 1:
        raise UserError("--prompt, --mr and --triples cannot be used together: give one prompt")
    if args.beam is not None:
        check_beam_width(args.beam)
    if args.num_samples > MAX_SAMPLES:
        raise UserError(f"--num_samples {args.num_samples}: at most {MAX_SAMPLES} (the samples are drawn as one "
                        "batch, each with its own KV cache); run again with another --seed for more")
    for name in ("num_samples", "max_new_tokens", "top_k"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    for triple in args.triples or []:
        parse_triple(triple)  # each one checked before the model loads
    if args.temperature < 0:
        raise UserError(f"--temperature must be 0 or more, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {args.top_p}")


def read_prompt(args):
    """The prompt text: --prompt (or the file it names), or the default."""
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


# How WebNLG and DART write a triple set into the prompt (data/webnlg/prepare.py, data/dart/prepare.py)
TRIPLE_CONTEXTS = {
    "webnlg": lambda triples: webnlg.context([dict(subject=s, property=p, object=o) for s, p, o in triples]),
    "dart": dart.context,
}


def parse_triple(text):
    """'Aarhus_Airport | cityServed | Aarhus' -> ('Aarhus_Airport', 'cityServed', 'Aarhus')."""
    parts = [part.strip() for part in text.split("|")]
    if len(parts) != 3 or not all(parts):
        raise UserError(f"--triples {text!r}: each triple is 'subject | property | object'")
    return tuple(parts)


def encode_prompt(args, model, data_format):
    """The prompt's token ids: --mr in the model's data format, or the text (empty: <|endoftext|> alone, how
    GPT-2 starts a new text). encode_ordinary, as in training: "<|endoftext|>" typed in a prompt stays text."""
    enc = get_tokenizer()
    task = tasks.task_of(data_format)
    if args.mr is not None and task != "e2e":
        raise UserError(f"--mr is an E2E meaning representation, but the model was trained on {task} data: give "
                        "--prompt" + (" or --triples" if task in TRIPLE_CONTEXTS else ""))
    if args.triples is not None and task not in TRIPLE_CONTEXTS:
        raise UserError(f"--triples is for models trained on WebNLG or DART; this one was trained on {task} data")
    if args.mr is not None:
        tokens = prompt_tokens(enc, args.mr, data_format)
    elif args.triples is not None:
        tokens = tasks.prompt_tokens(enc, TRIPLE_CONTEXTS[task]([parse_triple(t) for t in args.triples]))
    elif task != "e2e":  # the text as a prompt of the task's format: the prompt, then <|endoftext|>
        tokens = tasks.prompt_tokens(enc, read_prompt(args))
    else:
        tokens = enc.encode_ordinary(read_prompt(args)) or [EOT]
    return tokens


def until_eot(tokens):
    """The tokens before the first <|endoftext|> (all of them if there is none)."""
    return tokens[:tokens.index(EOT)] if EOT in tokens else tokens


def generate(model, tokens, args, max_new_tokens):
    """The new tokens of each output, without <|endoftext|>: one per sample, or one for --greedy / --beam."""
    if args.beam is not None:
        return [beam_search(model, tokens, beam=args.beam, max_new_tokens=max_new_tokens,
                            length_penalty=args.length_penalty, no_repeat_ngram=args.no_repeat_ngram)]
    device = model.transformer.wte.weight.device
    rows = 1 if args.greedy else args.num_samples
    idx = torch.tensor([tokens] * rows, dtype=torch.long, device=device)
    # A generator of our own, seeded by --seed: the samples depend on nothing else (not on other random use).
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(idx, max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                         top_k=args.top_k, top_p=args.top_p, eos_token=EOT, generator=generator)
    return [until_eot(row[len(tokens):].tolist()) for row in out]


def heading(args, i, n):
    """The line above output i of n."""
    if args.beam is not None:
        return f"--- beam search, beam {args.beam} ---"
    return "--- greedy ---" if args.greedy else f"--- sample {i}/{n} ---"


def sample_and_print(model, data_format, args):
    """The prompt and the outputs of model, printed; returns the texts of the outputs (the continuations only)."""
    tokens = encode_prompt(args, model, data_format)
    max_new_tokens = new_token_budget(args.max_new_tokens, len(tokens), model.config.block_size)
    texts = [get_tokenizer().decode(new_tokens) for new_tokens in generate(model, tokens, args, max_new_tokens)]
    if args.beam is not None:  # the paper's decoding, its last step too: the text eval.py scores
        texts = [cut_output(text) for text in texts]
    print(f"prompt: {get_tokenizer().decode(tokens)!r}")
    for i, continuation in enumerate(texts, start=1):
        print(heading(args, i, len(texts)))
        print(continuation)
    return texts


def sample_several(args, device, dtype):
    """Each adapter's outputs for the same prompt and seed, switching adapters on one base model in memory;
    returns {adapter: texts}."""
    bases = {str(read_adapter(path)[1].base_model) for path in args.adapter}
    if args.model is None and (len(bases) > 1 or bases & {"", "None"}):
        raise UserError(f"the adapters name the base models {', '.join(sorted(bases))}; say which with --model")
    model = GPT.from_pretrained(args.model or bases.pop()).to(device=device, dtype=dtype).eval()
    bank = AdapterBank(model)
    for path in args.adapter:
        bank.add(str(path), path)
    print(f"{model.name_or_path} with {len(args.adapter)} adapters, on {device} in "
          f"{str(dtype).removeprefix('torch.')}", file=sys.stderr, flush=True)
    outputs = {}
    for name in bank.adapters:
        bank.use(name)
        print(f"=== adapter {name}: {describe(model)} ===")
        outputs[name] = sample_and_print(model, bank.adapters[name][1].data_format, args)
    return outputs


def main(argv=None):
    """Sample and print; returns the texts of the outputs (the continuations only), by adapter if several."""
    args = parse_args(argv)
    with reported():
        return sample(args)


def sample(args):
    """What main does, for parsed arguments; mistakes raise UserError."""
    check_options(args)
    if args.prompt is not None:
        read_prompt(args)  # a missing prompt file is found before the model loads
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    if args.adapter is not None and len(args.adapter) > 1:
        return sample_several(args, device, dtype)
    adapter = args.adapter[0] if args.adapter else None
    model, data_format = load_model(model=args.model, adapter=adapter, merged=args.merged)
    model.to(device=device, dtype=dtype).eval()
    print(f"{describe(model)}, on {device} in {str(dtype).removeprefix('torch.')}", file=sys.stderr, flush=True)
    return sample_and_print(model, data_format, args)


if __name__ == "__main__":
    main()
