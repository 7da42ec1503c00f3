"""The one way the scripts load a model: a base model, a base model plus an adapter, or a merged checkpoint."""

from pathlib import Path

import lora
from model import GPT
from tools import peft_adapter
from tools.files import read_safetensors_header


def load_model(model=None, adapter=None, merged=None):
    """A merged checkpoint folder, or a base model plus an adapter (our adapter file or a PEFT LoRA folder; the
    base named in the adapter unless `model` says otherwise), or a base model alone (gpt2 by default)."""
    if merged is not None and adapter is not None:
        raise SystemExit("error: give --adapter or --merged, not both (a merged checkpoint already holds its adapter)")
    if merged is not None:
        loaded = GPT.from_pretrained(merged)
        weights = Path(merged) / "model.safetensors" if Path(merged).is_dir() else Path(merged)
        loaded.data_format = read_safetensors_header(weights)[1].get("data_format", "paper")  # merge.py wrote it
        return loaded
    if adapter is not None:
        tensors, config = peft_adapter.read_adapter(adapter)  # our file or a PEFT folder, checked finite
        base = model if model is not None else config["base_model"]
        if base in ("", "None"):
            raise SystemExit(f"error: {adapter} does not name its base model; say which with --model")
        return peft_adapter.put_adapter(GPT.from_pretrained(base), tensors, config, adapter)  # sets data_format
    loaded = GPT.from_pretrained(model if model is not None else "gpt2")
    loaded.data_format = "paper"  # a base model has none: prompts take the default format
    return loaded


def describe_lora(config):
    """'r=4 alpha=32 on q,v (scale 8)'."""
    s = lora.scale(config["alpha"], config["rank"], config["rslora"])
    return f"r={config['rank']} alpha={config['alpha']:g} on {','.join(config['targets'])} (scale {s:g})"


def describe(model):
    """One line for logs: 'gpt2 + r=4 alpha=32 on q,v (scale 8)'."""
    config = getattr(model, "lora_config", None)
    return str(model.name_or_path) + (f" + {describe_lora(config)}" if config else "")


def trainable_report(model):
    """'trainable 147,456 of 124,587,264 (0.118%)': the parameters the optimizer will see."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
