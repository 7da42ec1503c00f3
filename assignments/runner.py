"""What one grading process does: import the project from one tree, run some cases, write what happened.

grade.py starts one process per (repository, part) from a fork server that has already imported torch (so
each process starts in a fraction of a second, not the seconds that importing torch takes), and kills it
if it runs past its time. Nothing of the project is imported before run_cases moves into its tree.
"""

import json
import os
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

from assignments import checks

# One thread, set before any parallel work: a fork server that has started OpenMP's threads makes children
# that can hang in their first parallel loop (and the cases are far too small to gain from threads).
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def warm_up():
    """Run once what costs seconds the first time (building modules on the meta device imports much of torch;
    a first backward and optimizer step), here in the fork server rather than in every process."""
    with torch.device("meta"):
        layers = nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4), nn.LayerNorm(4))
        nn.init.normal_(layers[1].weight)
        nn.init.kaiming_uniform_(layers[1].weight)
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 3, 4, requires_grad=True)
    q = x.view(2, 3, 2, 2).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    loss = F.cross_entropy(layer(x).view(-1, 4), torch.zeros(6, dtype=torch.long), label_smoothing=0.1) + y.sum()
    loss.backward()
    torch.optim.AdamW(layer.parameters(), lr=1e-3).step()
    torch.linalg.svd(torch.randn(3, 4, dtype=torch.float64), full_matrices=False)


warm_up()


def enter(tree, log_path):
    """Make this process see the project in `tree` only, and send its output to log_path."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(tree)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where assignments/ was imported from
    sys.path[:] = [tree] + [p for p in sys.path if p not in ("", ".", here, os.getcwd()) and p != tree]


def run_cases(tree, cases, results_path, log_path, expected_path=None, seconds=checks.CASE_SECONDS):
    """Run cases ({name: case}) with the project in tree.

    With expected_path (the reference's outputs): write {name: {"passed", "output"}} as JSON to results_path.
    Without it (this is the reference): save {name: outputs} with torch.save to results_path, and raise if
    a case fails, so that the grader never compares against a broken reference."""
    enter(tree, log_path)
    if expected_path is None:
        outputs = {}
        for name, case in cases.items():
            start = time.perf_counter()
            try:
                outputs[name] = checks.run_case(case, seconds)
                print(f"reference {name} ({time.perf_counter() - start:.2f} s)", flush=True)
            except BaseException:
                print(f"reference case {name!r} failed:\n{traceback.format_exc()}", flush=True)
                raise SystemExit(1) from None
        torch.save(outputs, results_path)
        return
    expected = torch.load(expected_path, weights_only=True)
    results = {}
    for name, case in cases.items():
        start = time.perf_counter()
        passed, message = checks.outcome(expected[name], case, seconds)
        results[name] = {"passed": passed, "output": message}
        print(f"{'PASS' if passed else 'FAIL'} {name} ({time.perf_counter() - start:.2f} s): {message}", flush=True)
        with open(results_path, "w") as f:  # after every case: a later hang still leaves these results
            json.dump(results, f)
