"""Every README promise under faults: bad numbers, Ctrl-C, NaN, full or unwritable disks, overwrites, offline."""

import errno
import json
import os
import socket

import pytest
import torch
from conftest import train_tiny_adapter

import eval
import sample
import train
from data.e2e import prepare
from plumbing import device, files, hf_checkpoint
from plumbing.errors import UserError
from tools import analyze, sweep

tokenizer = pytest.mark.tokenizer  # the tests that tokenize text (see conftest.py)


def args_for(tiny_gpt2, data, out, *extra):
    return ["--model", str(tiny_gpt2), "--data", str(data), "--out", str(out), "--lr", "1e-2", "--warmup", "1",
            "--eval_examples", "8", "--batch_size", "4", "--device", "cpu", *extra]


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def closed_port_url(name):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


@tokenizer
@pytest.mark.parametrize("flag, value, message", [
    ("--eval_interval", "0", "--eval_interval 0: must be at least 1"),
    ("--lr", "-1", "--lr -1.0: must be positive"),
    ("--dropout", "2", "--dropout 2.0: must be in [0, 1)"),
    ("--rank", "0", "--rank 0: must be at least 1"),
    ("--max_iters", "0", "--max_iters 0: must be at least 1"),
    ("--device", "gpu", "unknown device 'gpu'"),
    ("--device", "cuda:7", "--device cuda:7: this machine has"),
])
def test_bad_numbers_are_one_line_before_the_model_loads(flag, value, message, e2e_small, tmp_path):
    """The model named here does not exist: the argument's error comes first, and no folder is left."""
    with pytest.raises(SystemExit) as err:
        train.main(args_for(tmp_path / "no-such-model", e2e_small, tmp_path / "run", flag, value))
    assert str(err.value).startswith(f"error: {message}") and "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


@tokenizer
def test_ctrl_c_saves_exits_130_and_a_resumed_run_logs_every_eval(tiny_gpt2, e2e_small, tmp_path, monkeypatch):
    """Ctrl-C during step 4's evaluation: the run saves step 4 and exits 130; --resume evaluates step 4 first, so
    the log has every evaluation of the uninterrupted run."""
    calls = []
    real = train.dev_loss

    def interrupted_at_second_eval(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train, "dev_loss", interrupted_at_second_eval)
    common = ["--max_iters", "6", "--eval_interval", "2"]
    with pytest.raises(SystemExit) as err:
        train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "run", *common))
    assert err.value.code == 130
    log = read_log(tmp_path / "run")
    assert [line["step"] for line in log] == [1, 2, 3, 4] and "val_loss" not in log[-1]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 4
    train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "run", *common, "--resume"))
    assert [line["step"] for line in read_log(tmp_path / "run") if "val_loss" in line] == [2, 4, 6]


@tokenizer
def test_a_nan_adapter_is_never_written_nor_loaded(tiny_gpt2, tmp_path):
    path = train_tiny_adapter(tiny_gpt2, tmp_path / "adapter.safetensors", steps=1)
    from checkpoints.adapters import save_adapter
    from lora import apply_lora
    from model import GPT

    model = apply_lora(GPT.from_pretrained(tiny_gpt2))
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.lora["q"].lora_B.fill_(float("nan"))
    with pytest.raises(UserError, match="not writing .*not all finite"):
        save_adapter(model, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    tensors, meta = files.load_safetensors(path)  # a NaN file made by hand, as another tool might
    tensors = {name: torch.full_like(t, float("nan")) for name, t in tensors.items()}
    files.save_safetensors(tensors, tmp_path / "by_hand.safetensors", meta)
    with pytest.raises(SystemExit, match="holds NaN or infinite numbers"):
        sample.main(["--adapter", str(tmp_path / "by_hand.safetensors"), "--greedy", "--max_new_tokens", "2"])


def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "log.jsonl"
    target.write_text("old\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(UserError, match=r"^could not write .*log.jsonl: No space left on device$"):
        with files.atomic_write(target) as f:
            f.write(b"new\n")
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]
    with pytest.raises(UserError, match="No space left on device"):
        files.atomic_torch_save({"step": 1}, tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()


@tokenizer
def test_prepare_on_a_full_disk_leaves_no_split_behind(e2e_src, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(prepare.np, "savez", full)
    with pytest.raises(UserError, match="could not write dev's files .*No space left on device"):
        prepare.prepare(tmp_path, source=e2e_src, splits=("dev",))
    assert list(tmp_path.iterdir()) == []


@tokenizer
def test_an_output_that_cannot_be_a_folder_is_refused_before_work(tiny_gpt2, e2e_small, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "file" / "run", "--max_iters", "1"))


@tokenizer
def test_nothing_a_user_made_is_overwritten(tiny_gpt2, e2e_small, e2e_src, tmp_path):
    """train.py: a folder with a log.jsonl; prepare.py: token files; eval.py: predictions; analyze: heatmaps."""
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "log.jsonl").write_text("mine\n")
    with pytest.raises(SystemExit, match="already holds a run \\(log.jsonl\\)"):
        train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "notes", "--max_iters", "1"))
    assert (tmp_path / "notes" / "log.jsonl").read_text() == "mine\n"
    with pytest.raises(UserError, match="already holds dev in the paper format; pass --force"):
        prepare.prepare(e2e_small, source=e2e_src, splits=("dev",))
    out = tmp_path / "eval"
    out.mkdir()
    (out / "predictions_dev.txt").write_text("mine\n")
    with pytest.raises(SystemExit, match="predictions_dev.txt already exists; pass --force"):
        eval.main(["--model", str(tiny_gpt2), "--split", "dev", "--out", str(out), "--data", str(e2e_small)])
    assert (out / "predictions_dev.txt").read_text() == "mine\n"
    (tmp_path / "similarity_layer0_q.png").write_bytes(b"mine")

    class Args:
        out, force = tmp_path, False

    with pytest.raises(UserError, match="similarity_layer0_q.png already exists; pass --force"):
        analyze.plot_paths_free(Args, "similarity", [(0, "q"), (1, "q")])
    Args.force = True
    assert analyze.plot_paths_free(Args, "similarity", [(0, "q")])


@tokenizer
def test_offline_one_run_lists_every_missing_file(tmp_path, monkeypatch):
    """No network: the CSVs and the weights are all named in one error, each with its URL and its path."""
    monkeypatch.setenv("LORA_GPT_CACHE", str(tmp_path / "cache"))
    for split in ("train", "dev"):
        monkeypatch.setitem(prepare.URLS, split, closed_port_url(prepare.SPLITS[split]))
    monkeypatch.setattr(hf_checkpoint, "HUB_URL", closed_port_url("{name}/model.safetensors"))
    with pytest.raises(SystemExit) as err:
        train.main(["--model", "gpt2", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")])
    message = str(err.value)
    assert message.startswith("error: could not download") and "\n" not in message
    for name in ("trainset.csv", "devset.csv"):
        assert f"{name} -> {tmp_path / 'data' / name}" in message
    assert f"gpt2/model.safetensors -> {tmp_path / 'cache' / 'gpt2' / 'model.safetensors'}" in message


def test_busy_cores_reads_the_machine_s_non_idle_time(monkeypatch):
    """Two /proc/stat readings 0.2 s apart: 200 of 400 jiffies busy (idle and iowait are not) on 4 CPUs is 2
    busy cores; without /proc/stat, the load average."""
    import io

    readings = iter(["cpu 100 0 100 700 100 0 0 0\n", "cpu 200 0 200 850 150 0 0 0\n"])
    monkeypatch.setattr(device, "open", lambda path: io.StringIO(next(readings)), raising=False)
    monkeypatch.setattr(device.time, "sleep", lambda seconds: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert device.busy_cores() == 2

    def no_proc(path):
        raise FileNotFoundError(path)

    monkeypatch.setattr(device, "open", no_proc, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.4, 1.0, 1.0))
    assert device.busy_cores() == 1


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    before = torch.get_num_threads()
    try:
        for busy, threads in ((0, 4), (1, 3), (3, 1), (9, 1)):
            monkeypatch.setattr(device, "busy_cores", lambda busy=busy: busy)
            assert device.set_cpu_threads() == threads
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(2)
        assert device.set_cpu_threads() == 2  # the user's choice (here the variable) is left as it is
    finally:
        torch.set_num_threads(before)


@tokenizer
def test_an_interrupted_sweep_run_is_resumed_not_tabulated(tiny_gpt2, e2e_small, tmp_path):
    """A run stopped at step 1 of 2 has a val_loss in its log; the sweep resumes it to step 2 before its row."""
    common = ["--max_iters", "2", "--warmup", "1", "--batch_size", "4", "--eval_interval", "1", "--eval_examples",
              "8", "--device", "cpu", "--model", str(tiny_gpt2)]
    train.main(["--rank", "1", "--targets", "q", "v", "--out", str(tmp_path / "r1"), "--data", str(e2e_small),
                *common, "--stop_after", "1"])
    assert [line["step"] for line in read_log(tmp_path / "r1") if "val_loss" in line] == [1]
    rows = sweep.main(["ranks", "--ranks", "1", "--no_eval", "--out", str(tmp_path), "--data", str(e2e_small),
                       "--", *common])
    assert rows[0]["steps"] == "2/2" and [line["step"] for line in read_log(tmp_path / "r1")] == [1, 2]
    assert rows[0]["val_loss"] == read_log(tmp_path / "r1")[-1]["val_loss"]


def test_no_meteor_prints_no_java_hint_and_merge_checks_on_the_training_data(tmp_path):
    scores = dict(BLEU=0.5, NIST=5.0, METEOR=None, ROUGE_L=0.5, CIDEr=1.0)
    assert eval.METEOR_HINT not in eval.table("m", "test", 1, None, scores, meteor_asked=False)
    assert eval.METEOR_HINT in eval.table("m", "test", 1, None, scores)
    import merge

    (tmp_path / "run").mkdir()
    torch.save({"args": {"data": str(tmp_path / "my_data")}}, tmp_path / "run" / "ckpt.pt")
    assert merge.training_data(tmp_path / "run" / "adapter.safetensors") == str(tmp_path / "my_data")
    assert merge.training_data(tmp_path / "adapter.safetensors") == prepare.DATA_DIR


# ----------------------------------------------------------------------------------------------------------
# Edges a new user meets: each case failed on the main of 2026-12-02 (issue 24).

@pytest.mark.parametrize("script, argv", [
    (sample, ["--mr", "name[X]", "--max_new_tokens", "2"]),
    (eval, ["--split", "dev", "--no_val_loss", "--out", "{tmp}"]),
])
def test_a_beam_wider_than_the_bound_is_refused_before_the_model_loads(script, argv, tmp_path):
    """--beam 100000 used to be accepted and then to run with no progress and no end. The model named here does
    not exist: the beam's error comes first."""
    from beam import MAX_BEAM

    for width in (100000, MAX_BEAM + 1, 0):
        with pytest.raises(SystemExit) as err:
            script.main(["--model", str(tmp_path / "no-such-model"), "--beam", str(width),
                         *(a.format(tmp=tmp_path) for a in argv)])
        assert str(err.value) == (f"error: --beam {width}: must be 1 to {MAX_BEAM} (each beam holds a KV cache and "
                                  "scores the whole vocabulary at every step; the paper uses 10)")
    assert MAX_BEAM == 256


def test_a_sweep_checks_every_setting_before_its_first_run(tmp_path):
    with pytest.raises(SystemExit, match=r"^error: --beam 100000: must be 1 to 256"):
        sweep.main(["ranks", "--ranks", "1", "--beam", "100000", "--out", str(tmp_path / "s")])
    with pytest.raises(SystemExit, match=r"^error: r0: rank 0 must be at least 1"):
        sweep.main(["ranks", "--ranks", "4", "0", "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()  # no run was started


@tokenizer
def test_every_dev_loss_pass_shows_a_progress_bar(tiny_gpt2, e2e_small, capsys):
    from data.e2e.batches import dev_loss, load_split
    from model import GPT

    dev_loss(GPT.from_pretrained(tiny_gpt2), load_split(e2e_small, "dev"), 4, "cpu", limit=12)
    err = capsys.readouterr().err
    assert "dev loss:   0%|          | 0/3" in err  # 12 examples in batches of 4


def test_prepared_data_and_analysis_outputs_are_ignored_by_git():
    """A student's `git add .` after preparing data or drawing heatmaps commits none of them."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    made = ["data/e2e/train.txt", "data/e2e/dev.txt", "data/e2e/test.txt", "data/e2e/dev_mrs.json",
            "data/e2e/dev.npz", "data/webnlg/dev.jsonl", "analysis/similarity_layer0_q.png", "out/adapter.safetensors",
            "sweep_ranks/table.md"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *made], cwd=root, capture_output=True, text=True)
    assert done.stdout.split() == made
    kept = ["data/e2e/prepare.py", "data/e2e/batches.py", "lora_analysis.py"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *kept], cwd=root, capture_output=True, text=True)
    assert done.stdout.split() == []


def test_an_adapter_folder_must_be_a_run_folder_or_a_peft_folder(tiny_gpt2, tmp_path):
    from checkpoints.adapters import adapter_path, read_adapter

    run = tmp_path / "r4"
    run.mkdir()
    train_tiny_adapter(tiny_gpt2, run / "adapter.safetensors")
    assert adapter_path(run) == run / "adapter.safetensors"  # a train.py run folder: its adapter file
    assert read_adapter(run)[1].lora.rank == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty is a folder with neither adapter.safetensors \(a train.py run "
                                        r"folder\) nor adapter_config.json \(a PEFT adapter folder\)"):
        read_adapter(tmp_path / "empty")
    with pytest.raises(SystemExit, match=r"^error: .*empty is a folder with neither adapter.safetensors"):
        sample.main(["--adapter", str(tmp_path / "empty"), "--prompt", "x", "--device", "cpu"])


@pytest.mark.parametrize("content", ["", "meaning,text\nname[X],X is.\n"], ids=["empty", "wrong header"])
def test_a_failed_prepare_leaves_no_folder(content, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "devset.csv").write_text(content, encoding="utf-8")
    with pytest.raises(UserError):
        prepare.prepare(tmp_path / "out", source=src, splits=("dev",))
    assert not (tmp_path / "out").exists()


@tokenizer
def test_a_rank_above_n_embd_and_too_many_samples_are_refused_first(tiny_gpt2, e2e_small, tmp_path):
    """Two more numbers without an upper bound on 2026-12-02: --rank (the tiny model has n_embd 64, so r = 65 can
    only be a mistake: B A has rank at most 64) and --num_samples (drawn as one batch)."""
    with pytest.raises(SystemExit) as err:
        train.main(args_for(tiny_gpt2, e2e_small, tmp_path / "run", "--rank", "65"))
    assert str(err.value) == ("error: --rank 65: must be at most the model's n_embd (64): B A cannot have a higher "
                              "rank than its smaller side")
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit, match=r"^error: --num_samples 1025: at most 1024"):
        sample.main(["--model", str(tmp_path / "no-such-model"), "--num_samples", "1025"])


@tokenizer
def test_e2e_prepare_offline_names_every_missing_csv_and_leaves_no_folder(tmp_path, monkeypatch):
    """The README promises one error naming every file to fetch by hand; --out a/b/c is not left behind."""
    for split, name in prepare.SPLITS.items():
        monkeypatch.setitem(prepare.URLS, split, closed_port_url(name))
    with pytest.raises(SystemExit) as err:
        prepare.main(["--out", str(tmp_path / "a" / "b" / "c")])
    message = str(err.value)
    assert message.startswith("error: could not download") and "\n" not in message
    for name in prepare.SPLITS.values():
        assert f"E2E {name}: {prepare.URLS[[s for s, n in prepare.SPLITS.items() if n == name][0]]} -> " \
               f"{tmp_path / 'a' / 'b' / 'c' / name}" in message
    assert list(tmp_path.iterdir()) == []


def test_peft_export_takes_a_run_folder_like_every_command(tiny_gpt2, tmp_path):
    from tools import peft_adapter

    (tmp_path / "run").mkdir()
    train_tiny_adapter(tiny_gpt2, tmp_path / "run" / "adapter.safetensors", steps=1)
    out = peft_adapter.main(["export", str(tmp_path / "run"), str(tmp_path / "peft")])
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
