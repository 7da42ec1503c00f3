"""The assignment in one place: which functions each part blanks, its points, and the written part.

A function is named by its qualified name inside its file ("GPT.forward", "scale"). The starter keeps its
signature, decorators and docstring and replaces its body; the grader takes exactly these functions from a
student's file and the rest of the project from the instructor's copy (see grade.py).
"""

import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Part:
    number: int
    title: str
    points: int
    functions: dict = field(default_factory=dict)  # {file: [qualified names]}
    minutes: str = ""  # the expected time on a CPU laptop, to write it and pass the public tests

    @property
    def slug(self):
        return f"part{self.number}"


PARTS = [
    Part(0, "loading OpenAI's checkpoint (the Conv1D transpose)", 5,
         {"model.py": ["GPT.from_pretrained"]}, "20 min"),
    Part(1, "causal self-attention with the KV cache", 25,
         {"model.py": ["CausalSelfAttention.forward", "KVCache.store", "KVCache.mask"]}, "1.5 h"),
    Part(2, "the LoRA layer: forward, merge and unmerge", 20,
         {"lora.py": ["scale", "LoRAUpdate.__init__", "LoRALinear.forward", "LoRALinear.merge",
                     "LoRALinear.unmerge"]}, "1.5 h"),
    Part(3, "where the updates go: apply_lora", 10,
         {"lora.py": ["apply_lora"]}, "45 min"),
    Part(4, "the completion-only loss and one training step", 20,
         {"data/e2e/batches.py": ["make_batch"], "model.py": ["GPT.forward", "KVCache.positions"]}, "1.5 h"),
    Part(5, "what LoRA learned: subspace similarity and amplification", 10,
         {"lora_analysis.py": ["subspace_similarity", "projection_norms"]}, "1 h"),
]

# Part 6 has no code to write: an experiment and written answers, graded by hand. The grader only says
# whether the answers file is there.
WRITTEN = Part(6, "experiment: which weight matrices to adapt (Table 5)", 10, {}, "2-3 h")
ANSWERS = "answers/part6.md"

AUTOGRADED = {part.number: part for part in PARTS}


def part_files():
    """Every file that holds a part's functions, in PARTS order."""
    return list(dict.fromkeys(file for part in PARTS for file in part.functions))


def functions_in(file):
    """{qualified name: part number} of the blanked functions in one file."""
    return {name: part.number for part in PARTS for name in part.functions.get(file, [])}


# What a repository's "product" is: every file git knows of (tracked, or new and not ignored), less these.
NOT_PRODUCT = ("tests/", "assignments/", ".ci/", ".github/")
PRODUCT_SUFFIXES = (".py", ".md", ".toml", ".txt", ".cfg")  # when there is no git to ask


def product_files(root):
    """The product's files under root, relative paths, sorted: git's list where root is a git checkout, else a
    walk that keeps source and text files and skips hidden folders and caches."""
    root = Path(root)
    listed = None
    if (root / ".git").exists():
        try:
            done = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=root,
                                  capture_output=True, check=True, timeout=60)
            listed = done.stdout.decode().split("\0")
        except (OSError, subprocess.SubprocessError):
            listed = None
    if listed is None:
        listed = [str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in PRODUCT_SUFFIXES
                  and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(root).parts)]
    return sorted(f for f in listed if f and not f.startswith(NOT_PRODUCT) and "__pycache__" not in f
                  and (root / f).is_file())
