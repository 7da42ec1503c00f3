"""A merged checkpoint: written in the Hugging Face layout, and compared with the unmerged model it came from.

merge.py and tools/gpu_check.py make the same check with these functions: the logits of both models at every
position of a batch of prompts, and their greedy continuations token for token.
"""

import json
from pathlib import Path

import torch
from tqdm import tqdm

import lora
from data.tasks import EOT
from plumbing.errors import UserError
from plumbing.files import save_safetensors
from plumbing.hf_checkpoint import hf_config, hf_state_dict


def write_checkpoint(model, folder, metadata):
    """model.safetensors and config.json of the merged model into folder."""
    if not all(layer.merged for layer in lora.lora_layers(model)):
        raise UserError("merge the LoRA layers first: until then the weights are the base model's")
    weights = hf_state_dict(model.state_dict())  # the updates are in W now; the LoRA tensors are left out
    save_safetensors(weights, Path(folder) / "model.safetensors", {"format": "pt", **metadata})
    (Path(folder) / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")


@torch.no_grad()
def model_outputs(model, prompts, check_tokens, desc):
    """For each prompt: the logits (T, vocab) at its positions, on the CPU, and its greedy continuation of
    check_tokens tokens (stopping at <|endoftext|>) as a list of token ids."""
    device = model.transformer.wte.weight.device
    logits, continuations = [], []
    for tokens in tqdm(prompts, desc=desc, unit=" prompts"):
        idx = torch.tensor([tokens], device=device)
        logits.append(model(idx)[0][0].cpu())
        out = model.generate(idx, check_tokens, temperature=0.0, eos_token=EOT)
        continuations.append(out[0, len(tokens):].tolist())
    return logits, continuations


def compare(unmerged, merged):
    """max and mean |logit difference| over every position of every prompt, and how many of the greedy
    continuations are the same token for token."""
    max_diff, total, count = 0.0, 0.0, 0
    for a, b in zip(unmerged[0], merged[0], strict=True):
        diff = (a - b).abs()
        max_diff = max(max_diff, diff.max().item())
        total += diff.double().sum().item()
        count += diff.numel()
    same = sum(a == b for a, b in zip(unmerged[1], merged[1], strict=True))
    return dict(max_diff=max_diff, mean_diff=total / count, same=same, n=len(unmerged[1]))
