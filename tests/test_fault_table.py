"""The fault table: every command that reads or writes a user's files, against every class of fault.

Each cell runs one entry point's main() in this process and asserts the README's promise:
  - it stops with a one-line `error: ...` (SystemExit, no traceback), or with exit status 130 when interrupted;
  - nothing is left in the place of its output that was not there before (a snapshot of the whole test folder
    before and after: no empty folder, no half-written file, no temporary name);
  - nothing the user made is changed (the same snapshot: every file's bytes).

The classes of fault (FAULTS):
  readonly  --out inside a folder that cannot be written (read-only for root too: see `readonly_place`)
  file      --out names an existing file where a folder is wanted (or a folder where a file is wanted)
  exists    --out already holds what the command would write (the user's, not to be overwritten)
  offline   the inputs that can be downloaded are absent (--source dropped, the model `gpt2` with an empty cache,
            --data a folder not made yet) and every download URL is a closed local port
  interrupt Ctrl-C (KeyboardInterrupt) inside the command's work, raised by the function ROWS names
  damaged   every input file the command reads is replaced by a damaged copy

A new command joins the table with one line in ROWS. A cell that does not apply to a command is absent: the row
leaves its field empty (no output place: no readonly / file / exists; nothing downloaded: no offline; nothing
read from the user: no damaged).
"""

import hashlib
import importlib
import os
import shlex
import shutil
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import train_tiny_adapter, write_e2e_csv

from data.dart import prepare as dart
from data.e2e import prepare
from data.webnlg import prepare as webnlg
from plumbing import hf_checkpoint

pytestmark = pytest.mark.tokenizer  # most commands tokenize text (see conftest.py)

TRAIN = "--max_iters 1 --warmup 1 --batch_size 4 --eval_examples 4 --device cpu"


@dataclass
class Row:
    """One entry point. argv: its arguments, with {placeholders} for the inputs (INPUTS) and {out}. out: what its
    output is, "folder" (files written into a folder that may exist), "new" (a folder made whole) or "file".
    exists: a file of the output the user already has (a name inside the folder; "" for the output itself).
    interrupt: "module:attr" raising KeyboardInterrupt when called. stub: "module:attr" replaced in every cell by
    a fake that skips work the cells do not need (grading takes minutes)."""
    name: str
    main: str
    argv: str
    out: str | None = None
    exists: str | None = None
    interrupt: str | None = None
    offline: bool = False
    damaged: bool = False
    stub: str | None = None
    suffix: str = ""  # the output file's name ends so (a picture's format)


ROWS = [
    Row("train", "train:main", f"--model {{model}} --data {{data}} --out {{out}} {TRAIN}", "folder", "log.jsonl",
        "train:apply_lora", offline=True, damaged=True),
    Row("sample", "sample:main", "--model {model} --adapter {adapter} --prompt x --max_new_tokens 2 --device cpu",
        interrupt="sample:load_model", offline=True, damaged=True),
    Row("merge", "merge:main", "--adapter {adapter} --model {model} --out {out} --n_check 1 --check_tokens 2 "
        "--device cpu", "new", "", "merge:compare", offline=True, damaged=True),
    Row("eval", "eval:main", "--adapter {adapter} --model {model} --data {data} --split dev --limit 2 --beam 1 "
        "--max_new_tokens 2 --no_val_loss --no_meteor --device cpu --out {out}", "folder", "predictions_dev.txt",
        "eval:metrics.score_all", offline=True, damaged=True),
    Row("e2e prepare", "data.e2e.prepare:main", "--source {e2e_src} --out {out} --splits dev", "folder", "dev.npz",
        "data.e2e.prepare:np.savez", offline=True, damaged=True),
    Row("webnlg prepare", "data.webnlg.prepare:main", "--source {webnlg_src} --out {out} --splits dev", "folder",
        "dev.npz", "data.tasks:np.savez", offline=True, damaged=True),
    Row("dart prepare", "data.dart.prepare:main", "--source {dart_src} --out {out} --splits dev", "folder",
        "dev.npz", "data.tasks:np.savez", offline=True, damaged=True),
    Row("data/tasks.py", "data.tasks:main", "--train {jsonl} --dev {jsonl} --out {out}", "folder", "dev.npz",
        "data.tasks:np.savez", damaged=True),
    Row("peft export", "tools.peft_adapter:main", "export {adapter} {out}", "new", "",
        "checkpoints.adapters:save_safetensors", damaged=True),
    Row("analyze similarity", "tools.analyze:main", "similarity {adapter} {adapter} --out {out}", "folder",
        "similarity_layer0_q.png", "tools.analyze:save_heatmaps", damaged=True),
    Row("analyze deltaw", "tools.analyze:main", "deltaw {adapter} --model {model} --out {out}", "folder",
        "deltaw_layer0_q.png", "tools.analyze:save_heatmaps", offline=True, damaged=True),
    Row("sweep", "tools.sweep:main", "ranks --ranks 1 --no_eval --out {out} --data {data} -- --model {model} "
        f"{TRAIN}", "folder", None, "tools.sweep:run_script"),
    Row("assignments make", "assignments.make:main", "{out}", "new", "", "assignments.make:shutil.copy2"),
    Row("assignments grade", "assignments.grade:main", "{kit_repo} --json {out}", "file", "",
        "assignments.grade:grade", stub="assignments.grade:grade"),
    Row("assignments tiny_model", "assignments.tiny_model:main", "{out}", "folder", "model.safetensors",
        "plumbing.hf_checkpoint:hf_config"),
    Row("plot", "tools.plot:main", "{run} --out {out}", "file", "", "tools.plot:drawn", damaged=True, suffix=".png"),
    Row("bench --write", "tools.bench:main", "--sections 4 --write {out}", "file", "", "tools.bench:Workspace",
        suffix=".md"),
]
# Not in the table: tools.gpu_check writes only into temporary folders of its own and reads nothing of the user's.

FAULTS = ["readonly", "file", "exists", "offline", "interrupt", "damaged"]


def applies(row, fault):
    return {"readonly": row.out is not None, "file": row.out is not None, "exists": row.exists is not None,
            "offline": row.offline, "interrupt": row.interrupt is not None, "damaged": row.damaged}[fault]


CELLS = [pytest.param(row, fault, id=f"{row.name}-{fault}") for row in ROWS for fault in FAULTS if applies(row, fault)]


# ----------------------------------------------------------------------------------------------------------
# The inputs, and their damaged copies.

def webnlg_json(path):
    entry = {"category": "Airport", "size": "1", "modifiedtripleset": [{"subject": "Aarhus_Airport", "property":
             "cityServed", "object": "Aarhus"}], "lexicalisations": [{"comment": "good", "lex": "It serves Aarhus."}]}
    path.write_text(f'{{"entries": [{{"1": {__import__("json").dumps(entry)}}}]}}', encoding="utf-8")


def dart_json(path):
    path.write_text('[{"tripleset": [["Zizzi", "eatType", "pub"]], "annotations": [{"source": "e2e", "text": '
                    '"Zizzi is a pub."}]}]', encoding="utf-8")


def fake_report(repos, *args, **kwargs):
    return [dict(repo=str(repo), parts=[], score=0, max_score=0,
                 written=dict(part=7, title="written", points=0, found=False, status="missing")) for repo in repos]


@pytest.fixture(scope="module")
def inputs(tiny_gpt2, e2e_small, e2e_src, tmp_path_factory):
    """{placeholder: path} of good inputs, and of damaged ones."""
    root = tmp_path_factory.mktemp("fault_inputs")
    good = dict(model=tiny_gpt2, data=e2e_small, e2e_src=e2e_src)
    (root / "run").mkdir()
    good["adapter"] = train_tiny_adapter(tiny_gpt2, root / "run" / "adapter.safetensors", steps=1)
    for name, write, folder in ((webnlg.SPLITS["dev"], webnlg_json, "webnlg_src"),
                                (dart.SPLITS["dev"], dart_json, "dart_src")):
        (root / folder).mkdir()
        write(root / folder / name)
        good[folder] = root / folder
    good["jsonl"] = root / "mine.jsonl"
    good["jsonl"].write_text('{"prompt": "a", "completion": "b"}\n', encoding="utf-8")
    good["run"] = root / "run"  # train.py's log of two steps, the second with a dev loss
    (root / "run" / "log.jsonl").write_text('{"step": 1, "loss": 10.9, "lr": 0.001}\n'
                                            '{"step": 2, "loss": 10.8, "lr": 0.002, "val_loss": 10.85}\n')
    good["kit_repo"] = root / "student"
    good["kit_repo"].mkdir()

    bad = dict(good)
    (root / "bad_model").mkdir()
    shutil.copy(tiny_gpt2 / "config.json", root / "bad_model" / "config.json")
    (root / "bad_model" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    bad["model"] = root / "bad_model"
    bad["adapter"] = root / "bad_adapter.safetensors"
    bad["adapter"].write_bytes(good["adapter"].read_bytes()[:200])
    bad["data"] = root / "bad_data"
    shutil.copytree(e2e_small, bad["data"])
    for npz in bad["data"].glob("*.npz"):
        npz.write_bytes(npz.read_bytes()[:64])
    bad["e2e_src"] = root / "bad_e2e"
    bad["e2e_src"].mkdir()
    write_e2e_csv(bad["e2e_src"] / prepare.SPLITS["dev"], [])  # a header and no rows
    for folder, name in (("webnlg_src", webnlg.SPLITS["dev"]), ("dart_src", dart.SPLITS["dev"])):
        (root / f"bad_{folder}").mkdir()
        (root / f"bad_{folder}" / name).write_text("<benchmark><entries>", encoding="utf-8")  # XML, not JSON
        bad[folder] = root / f"bad_{folder}"
    bad["run"] = root / "bad_run"
    bad["run"].mkdir()
    (bad["run"] / "log.jsonl").write_text('{"step": 1, "loss": 10.9, "lr": 0.0\n')
    bad["jsonl"] = root / "bad.jsonl"
    bad["jsonl"].write_text('{"prompt": "a", "completion": \n', encoding="utf-8")
    return good, bad


def closed_port_url(name):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def go_offline(monkeypatch, tmp_path):
    """Every download fails (a closed local port) and the weights' cache is empty."""
    monkeypatch.setenv("LORA_GPT_CACHE", str(tmp_path / "place" / "cache"))
    monkeypatch.setattr(hf_checkpoint, "HUB_URL", closed_port_url("{name}/model.safetensors"))
    for module in (prepare, webnlg, dart):
        for split, name in module.SPLITS.items():
            monkeypatch.setitem(module.URLS, split, closed_port_url(name))


def without_source(argv):
    """argv less its --source DIR: the files are to be downloaded."""
    i = argv.index("--source") if "--source" in argv else None
    return argv if i is None else argv[:i] + argv[i + 2:]


def readonly_place(monkeypatch, folder):
    """A folder nobody may write into. chmod is not enough where the tests run as root (root ignores permission
    bits), so os.access, which the commands ask before any work, is made to answer as for any other user."""
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        inside = Path(os.path.abspath(path)).is_relative_to(folder)
        return False if inside and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)


def snapshot(folder):
    """{relative path: kind and content hash} of everything under folder."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink() or not path.is_file():
            found[key] = "folder" if path.is_dir() else "other"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def resolve(spec):
    """"module:a.b" -> (the object holding b, "b")."""
    module, _, attr = spec.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("row, fault", CELLS)
def test_fault_table(row, fault, inputs, tmp_path, monkeypatch):
    good, bad = inputs
    place = tmp_path / "place"
    place.mkdir()
    monkeypatch.chdir(place)  # a default output in the working folder would land here, and be seen
    out = place / "a" / "b" / f"c{row.suffix}"  # a new output: every folder on the way is made by the command
    values = dict(bad if fault == "damaged" else good)
    if row.stub:
        monkeypatch.setattr(*resolve(row.stub), fake_report)
    if fault == "readonly":
        readonly_place(monkeypatch, place / "ro")
        out = place / "ro" / f"out{row.suffix}"
    elif fault == "file":
        out = place / f"taken{row.suffix}"
        if row.out == "file":
            out.mkdir()
            (out / "mine.txt").write_text("mine\n")
        else:
            out.write_text("mine\n")
    elif fault == "exists":
        out = place / f"out{row.suffix}"
        mine = out if row.out == "file" else out / (row.exists or "mine.txt")
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.write_text("mine\n")
    elif fault == "offline":
        go_offline(monkeypatch, tmp_path)
        values.update(model="gpt2", data=place / "data" / "new")
    elif fault == "interrupt":
        monkeypatch.setattr(*resolve(row.interrupt), interrupted)
    argv = [arg.format(out=out, **values) for arg in shlex.split(row.argv)]
    if fault == "offline":
        argv = without_source(argv)
    main = getattr(importlib.import_module(row.main.partition(":")[0]), row.main.partition(":")[2])

    before = snapshot(tmp_path)
    try:
        with pytest.raises(SystemExit) as stopped:
            main(argv)
    finally:
        if fault == "readonly":
            (place / "ro").chmod(stat.S_IRWXU)
    after = snapshot(tmp_path)

    if fault == "interrupt":
        assert stopped.value.code == 130
    else:
        message = str(stopped.value.code)
        assert message.startswith("error: ") and "\n" not in message, message
    assert after == before, f"left or changed: {sorted(set(after.items()) ^ set(before.items()))}"
