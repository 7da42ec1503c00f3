"""The one way the scripts load a model: a base model, a base model plus an adapter, or a merged checkpoint."""

import sys
from pathlib import Path

import lora
from checkpoints import adapters
from model import GPT
from plumbing.errors import UserError
from plumbing.files import read_safetensors_header


def load_model(model=None, adapter=None, merged=None):
    """(model, data format) of a merged checkpoint folder, or of a base model plus an adapter (our adapter file or a
    PEFT LoRA folder; the base named in the adapter unless `model` says otherwise; lora.config_of(model) gives its
    LoRAConfig), or of a base model alone (gpt2 by default). The data format is the prompt format the model was
    trained on (data/e2e/prepare.py); a base model has none, so prompts take the default, "paper"."""
    if merged is not None and adapter is not None:
        raise UserError("give --adapter or --merged, not both (a merged checkpoint already holds its adapter)")
    if merged is not None:
        loaded = GPT.from_pretrained(merged)
        weights = Path(merged) / "model.safetensors" if Path(merged).is_dir() else Path(merged)
        return loaded, read_safetensors_header(weights)[1].get("data_format", "paper")  # merge.py wrote it
    if adapter is not None:
        tensors, info = adapters.read_adapter(adapter)  # our file or a PEFT folder, checked finite
        base = model if model is not None else info.base_model
        if base in ("", "None"):
            raise UserError(f"{adapter} does not name its base model; say which with --model")
        return adapters.put_adapter(GPT.from_pretrained(base), tensors, info, adapter), info.data_format
    return GPT.from_pretrained(model if model is not None else "gpt2"), "paper"


def describe_lora(config):
    """'r=4 alpha=32 on q,v (scale 8)' of a LoRAConfig."""
    return f"r={config.rank} alpha={config.alpha:g} on {','.join(config.targets)} (scale {config.scale:g})"


def describe(model):
    """One line for logs: 'gpt2 + r=4 alpha=32 on q,v (scale 8)'."""
    config = lora.config_of(model)
    return str(model.name_or_path) + (f" + {describe_lora(config)}" if config else "")


def trainable_report(model):
    """'trainable 147,456 of 124,587,264 (0.118%)': the parameters the optimizer will see."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"


def new_token_budget(max_new_tokens, prompt_len, block_size, what="prompt"):
    """How many tokens sample.py and eval.py generate after a prompt of prompt_len tokens: --max_new_tokens, capped
    (with a note on stderr) at the positions the model has left after the prompt. A prompt that fills every
    position leaves nothing to generate: a one-line error."""
    room = block_size - prompt_len
    if room < 1:
        raise UserError(f"the {what} is {prompt_len} tokens, and the model has {block_size} positions: nothing is "
                        "left to generate (shorten it)")
    if max_new_tokens > room:
        print(f"note: --max_new_tokens {max_new_tokens} capped at {room}: the {what} has {prompt_len} tokens and the "
              f"model {block_size} positions", file=sys.stderr)
    return min(max_new_tokens, room)
