"""Stopping: Ctrl-C, SIGINT or SIGTERM anywhere in a training step saves the state at the end of the last complete
step and exits 130, and --resume then continues bit for bit (the log's losses and the final adapter's tensors equal
an uninterrupted run's); the sweep passes the signal to its train.py and resumes that setting when run again."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lora
import train
from checkpoints import run
from plumbing import stopping
from plumbing.files import load_safetensors

pytestmark = pytest.mark.tokenizer  # these tests tokenize text (see conftest.py)

ROOT = Path(__file__).resolve().parents[1]
# Dropout on, so a step depends on random numbers; an evaluation and a save at every step, so every point below
# falls in step 3 of 5, after a checkpoint (step 2) that an interrupt can wrongly overwrite.
COMMON = ["--lr", "1e-2", "--warmup", "3", "--batch_size", "4", "--device", "cpu", "--max_iters", "5",
          "--eval_interval", "1", "--eval_examples", "8", "--dropout", "0.1"]
POINTS = ["forward", "backward", "optimizer step", "evaluation", "save"]


def args_for(tiny_gpt2, data, out, *extra):
    return ["--model", str(tiny_gpt2), "--data", str(data), "--out", str(out), *COMMON, *extra]


def read_log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def differences(whole, out):
    """(steps whose loss or val_loss differ, largest loss difference, largest adapter difference) of run folder out
    against the uninterrupted run folder whole; (0, 0.0, 0.0) when they are equal bit for bit."""
    a, b = read_log(whole), read_log(out)
    if [line["step"] for line in a] != [line["step"] for line in b]:
        return len(a), float("inf"), float("inf")
    differ = [(x, y) for x, y in zip(a, b, strict=True)
              if (x["loss"], x.get("val_loss")) != (y["loss"], y.get("val_loss"))]
    tensors_a = load_safetensors(Path(whole) / "adapter.safetensors")[0]
    tensors_b = load_safetensors(Path(out) / "adapter.safetensors")[0]
    adapter = max((tensors_a[name] - tensors_b[name]).abs().max().item() for name in tensors_a)
    if not all(torch.equal(tensors_a[name], tensors_b[name]) for name in tensors_a):
        adapter = max(adapter, float.fromhex("0x1p-149"))  # any difference at all counts, even below fp32's tiniest
    return len(differ), max([abs(x["loss"] - y["loss"]) for x, y in differ] + [0.0]), adapter


class Interrupter(torch.overrides.TorchFunctionMode):
    """Sends SIGINT to this process, as Ctrl-C does, at one point of one training step (1-based) of train.main:
    - forward: in the second LoRA layer's forward (the first has drawn its dropout mask);
    - backward: when the gradient reaches the first LoRA layer's output (the second's gradients are done);
    - optimizer step: in AdamW's update, when the first parameter is updated and the others are not;
    - evaluation: in dev_loss's second batch;
    - save: in the step's checkpoint save, after the first file is in place and before the others.
    It acts as a TorchFunctionMode inside AdamW.step, to see the update's tensor operations one by one."""

    def __init__(self, monkeypatch, point, step):
        super().__init__()
        assert point in POINTS
        self.point, self.step, self.fired = point, step, False
        self.in_step = self.in_eval = self.in_save = False
        self.lora_calls, self.lerps = 0, 0
        lr_at, forward, dev_loss, save, adam_step, replace = (train.lr_at, lora.LoRALinear.forward, train.dev_loss,
                                                              run.save, torch.optim.AdamW.step, os.replace)

        def lr_at_(step, *a):  # called once at the start of every step: arms the point in the chosen step
            self.in_step, self.lora_calls = step + 1 == self.step, 0
            return lr_at(step, *a)

        def forward_(layer, x):
            h = forward(layer, x)
            if self.in_step and (layer.training or self.in_eval):
                self.lora_calls += 1
                if self.point == "forward" and self.lora_calls == 2:
                    self.fire()
                if self.point == "backward" and self.lora_calls == 1:
                    h.register_hook(lambda grad: self.fire())
                if self.point == "evaluation" and self.in_eval and self.lora_calls == 3:
                    self.fire()
            return h

        def dev_loss_(*a, **k):
            self.in_eval, self.lora_calls = True, 0
            try:
                return dev_loss(*a, **k)
            finally:
                self.in_eval = False

        def save_(*a, **k):
            self.in_save = True
            try:
                return save(*a, **k)
            finally:
                self.in_save = False

        def adam_step_(opt, *a, **k):
            if self.in_step and self.point == "optimizer step":
                with self:
                    return adam_step(opt, *a, **k)
            return adam_step(opt, *a, **k)

        def replace_(*a, **k):
            replace(*a, **k)
            if self.in_step and self.in_save and self.point == "save":
                self.fire()

        monkeypatch.setattr(train, "lr_at", lr_at_)
        monkeypatch.setattr(lora.LoRALinear, "forward", forward_)
        monkeypatch.setattr(train, "dev_loss", dev_loss_)
        monkeypatch.setattr(run, "save", save_)
        monkeypatch.setattr(torch.optim.AdamW, "step", adam_step_)
        monkeypatch.setattr(os, "replace", replace_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "lerp_":  # Adam's first moment, once per parameter, before its update
            self.lerps += 1
            if self.lerps == 2:
                self.fire()
        return func(*args, **(kwargs or {}))

    def fire(self):
        if not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)


def interrupted_then_resumed(tiny_gpt2, data, out, point, step=3):
    """Run train.main interrupted at `point` of `step`, then with --resume; returns the interrupted run's exit code
    and the step its checkpoint held."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        interrupter = Interrupter(monkeypatch, point, step)
        with pytest.raises(SystemExit) as stopped:
            train.main(args_for(tiny_gpt2, data, out))
    assert interrupter.fired, f"the interrupt at {point} never came: has the code it waits for changed?"
    saved = torch.load(Path(out) / "ckpt.pt", weights_only=False)["step"]
    train.main(args_for(tiny_gpt2, data, out, "--resume"))
    return stopped.value.code, saved


@pytest.fixture(scope="module")
def whole_run(tiny_gpt2, e2e_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    train.main(args_for(tiny_gpt2, e2e_small, out))
    return out


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_anywhere_in_a_step_resumes_bit_for_bit(point, whole_run, tiny_gpt2, e2e_small, tmp_path):
    """SIGINT in step 3's forward, backward, optimizer step, evaluation or save: exit status 130, the checkpoint
    holds step 2 (interrupted before step 3's update was complete) or 3 (after it), and --resume gives the
    uninterrupted run's losses and adapter exactly."""
    code, saved = interrupted_then_resumed(tiny_gpt2, e2e_small, tmp_path / "run", point)
    assert differences(whole_run, tmp_path / "run") == (0, 0.0, 0.0)
    assert code == 130 and saved == (2 if point in ("forward", "backward") else 3)


def wait_for(path, process, seconds=240):
    """Wait until path exists (the first checkpoint of a run) while process runs."""
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"the process ended ({process.returncode}) before {path} was made"
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_to_train_py_saves_exits_130_and_resumes_bit_for_bit(sig, whole_run, tiny_gpt2, e2e_small,
                                                                      tmp_path):
    """A real signal to a real `python train.py`, wherever it lands after the first checkpoint: exit status 130,
    no traceback, a checkpoint of a complete step, and --resume gives the uninterrupted run's losses and adapter."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "train.py", *args_for(tiny_gpt2, e2e_small, out)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "ckpt.pt", process)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: saving step" in stdout + stderr
    saved = torch.load(out / "ckpt.pt", weights_only=False)["step"]
    assert 1 <= saved <= 5 and [line["step"] for line in read_log(out)] == list(range(1, saved + 1))
    train.main(args_for(tiny_gpt2, e2e_small, out, "--resume"))
    assert differences(whole_run, out) == (0, 0.0, 0.0)


def test_sigint_to_the_sweep_alone_stops_its_train_py_which_saves_and_is_resumed(tiny_gpt2, e2e_small, tmp_path):
    """`kill -INT` to the sweep's process only (not its group): the sweep passes it to train.py, waits for it to save
    and exits 130; run again, the sweep resumes that setting from its saved step (its first lines are kept as they
    were, timings included) and ends where an uninterrupted train.py does."""
    from tools import sweep

    common = ["--model", str(tiny_gpt2), *COMMON, "--max_iters", "12", "--eval_interval", "2"]
    sweep_args = ["ranks", "--ranks", "1", "--no_eval", "--out", str(tmp_path / "sweep"), "--data", str(e2e_small),
                  "--", *common]
    run_folder = tmp_path / "sweep" / "r1"
    process = subprocess.Popen([sys.executable, "-m", "tools.sweep", *sweep_args], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for(run_folder / "ckpt.pt", process)
    os.kill(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted: saving step" in stdout + stderr
    saved = torch.load(run_folder / "ckpt.pt", weights_only=False)["step"]
    assert 2 <= saved < 12
    before = read_log(run_folder)

    rows = sweep.main(sweep_args)
    after = read_log(run_folder)
    assert rows[0]["steps"] == "12/12" and after[:saved] == before[:saved]
    train.main(["--rank", "1", "--out", str(tmp_path / "alone"), "--data", str(e2e_small), *common])
    assert differences(tmp_path / "alone", run_folder) == (0, 0.0, 0.0)


def test_a_deferred_block_delivers_its_signal_when_it_ends():
    """deferred(): a SIGINT inside comes out as KeyboardInterrupt after the block's last line, not in the middle."""
    done = []
    with pytest.raises(KeyboardInterrupt):
        with stopping.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")
    assert done == ["after the signal"]


def test_a_notebook_calling_train_gets_a_catchable_keyboard_interrupt(tiny_gpt2, e2e_small, tmp_path):
    """train.train (no script around it, as in a notebook): the kernel's interrupt (a SIGINT) comes out as
    KeyboardInterrupt, which the caller can catch, after the run was saved at its last complete step."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        Interrupter(monkeypatch, "forward", step=2)
        with pytest.raises(KeyboardInterrupt):
            train.train(train.parse_args(args_for(tiny_gpt2, e2e_small, tmp_path / "run", "--max_iters", "3")))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 1
