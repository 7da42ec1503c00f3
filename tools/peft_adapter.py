"""Our adapter file as a Hugging Face PEFT adapter folder (the conversion itself is checkpoints/adapters.py):

    python -m tools.peft_adapter export out/adapter.safetensors out/peft      # a folder PEFT loads
"""

import argparse
from pathlib import Path

from checkpoints.adapters import export
from plumbing.errors import reported


def main(argv=None):
    parser = argparse.ArgumentParser(description="Convert a lora-gpt adapter to Hugging Face PEFT's format.")
    commands = parser.add_subparsers(dest="command", required=True)
    ex = commands.add_parser("export", help="write an adapter file as a PEFT adapter folder "
                             "(adapter_config.json + adapter_model.safetensors)")
    ex.add_argument("adapter", type=Path, help="the adapter file (.safetensors, from train.py) or a train.py run "
                    "folder")
    ex.add_argument("out", type=Path, help="the folder to write; PeftModel.from_pretrained(GPT2LMHeadModel, out) "
                    "loads it")
    ex.add_argument("--force", action="store_true", help="replace OUT if it exists (default: refuse)")
    args = parser.parse_args(argv)
    with reported():
        out = export(args.adapter, args.out, force=args.force)
    print(f"wrote {out}: adapter_config.json and adapter_model.safetensors")
    return out


if __name__ == "__main__":
    main()
