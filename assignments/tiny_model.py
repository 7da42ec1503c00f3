"""A tiny GPT-2 with random weights, as a checkpoint folder train.py reads: python -m assignments.tiny_model OUT

Part 6's sweep on a CPU: a 4-layer, 128-wide model trains in seconds per setting. Its weights are random,
so it cannot write English; what it shows is the trainable counts and how the settings order by loss.
"""

import argparse
import json
from pathlib import Path

import torch

from model import GPT, GPTConfig
from plumbing import files, hf_checkpoint, outputs
from plumbing.errors import reported


def write_tiny_model(out, n_layer=4, n_head=4, n_embd=128, seed=0):
    out = Path(out)
    with outputs.folder(out, holds=["model.safetensors", "config.json"], flag=None, option="OUT"):
        torch.manual_seed(seed)
        config = GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd)  # GPT-2's vocabulary and 1024 positions
        model = GPT(config)
        state = {name: t.contiguous() for name, t in hf_checkpoint.hf_state_dict(model.state_dict()).items()}
        files.save_safetensors(state, out / "model.safetensors")
        with files.atomic_write(out / "config.json") as f:
            f.write(json.dumps(hf_checkpoint.hf_config(config), indent=1).encode())
    print(f"wrote a random {n_layer}-layer, {n_embd}-wide GPT-2 to {out}: train.py --model {out}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a tiny random GPT-2 checkpoint (for part 6 on a CPU).")
    p.add_argument("out", metavar="OUT", help="the folder to write model.safetensors and config.json into")
    p.add_argument("--seed", type=int, default=0, help="the seed of the random weights (default: %(default)s)")
    args = p.parse_args(argv)
    with reported():
        write_tiny_model(args.out, seed=args.seed)


if __name__ == "__main__":
    main()
