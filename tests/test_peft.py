"""tools/peft_adapter.py: our adapters as PEFT adapters and back, PEFT's adapters in our scripts, several adapters
on one base. transformers' GPT2LMHeadModel + peft.PeftModel on the same weights are the reference."""

import json
import shutil

import pytest
import torch
from conftest import write_hf_gpt2

import merge
from checkpoints import adapters as peft_adapter
from checkpoints.adapters import AdapterBank, read_adapter, save_adapter
from checkpoints.loading import load_model
from lora import LoRAConfig, apply_lora, config_of, lora_state_dict
from lora_analysis import similarity_grid
from model import GPT
from plumbing.errors import UserError
from plumbing.files import load_safetensors
from tools import analyze
from tools import peft_adapter as peft_cli

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny GPT-2 with every weight random (n_embd 64, 2 layers), written by transformers."""
    folder = tmp_path_factory.mktemp("base")
    write_hf_gpt2(folder, seed=3)
    return folder


def our_adapter(base, path, targets, rank=4, alpha=8, rslora=False, seed=0):
    """An adapter of ours with random non-zero A and B (an untrained one has B = 0 and would prove nothing)."""
    model = apply_lora(GPT.from_pretrained(base), LoRAConfig(rank=rank, alpha=alpha, targets=targets, rslora=rslora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_state_dict(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(model, path)
    return model.eval()


def peft_logits(base, folder):
    hf = transformers.GPT2LMHeadModel.from_pretrained(base)
    return peft.PeftModel.from_pretrained(hf, folder).eval()(TOKENS).logits


def logits(model):
    with torch.no_grad():
        return model.eval()(TOKENS)[0]


CASES = [(("q",), False), (("q", "v"), False), (("k", "o"), False), (("q", "k", "v", "o", "mlp"), True)]


@pytest.mark.parametrize("targets,rslora", CASES, ids=lambda c: ",".join(c) if isinstance(c, tuple) else f"rs{c}")
def test_export_is_loaded_by_peft_with_our_logits_and_reads_back_bit_for_bit(base, tmp_path, targets, rslora):
    model = our_adapter(base, tmp_path / "a.safetensors", targets, rslora=rslora)
    folder = peft_cli.main(["export", str(tmp_path / "a.safetensors"), str(tmp_path / "peft")])
    with torch.no_grad():
        diff = (peft_logits(base, folder) - logits(model)).abs().max().item()
    print(f"export {','.join(targets)} rslora={rslora}: max |PEFT - ours| logit difference {diff:.2e}")
    assert diff < 1e-5
    # back in: the same tensors, bit for bit, and the same settings
    tensors, info = read_adapter(folder)
    original, _ = load_safetensors(tmp_path / "a.safetensors")
    assert tensors.keys() == original.keys() and all(tensors[n].equal(t) for n, t in original.items())
    assert (info.lora.rank, info.lora.alpha, info.lora.targets, info.lora.rslora) == (4, 8, tuple(targets), rslora)
    assert logits(load_model(adapter=folder)[0]).equal(logits(model))  # the base found from base_model_name_or_path


def test_export_refuses_an_existing_folder_unless_forced(base, tmp_path):
    our_adapter(base, tmp_path / "a.safetensors", ("q", "v"))
    argv = ["export", str(tmp_path / "a.safetensors"), str(tmp_path / "peft")]
    peft_cli.main(argv)
    with pytest.raises(SystemExit, match="already exists"):
        peft_cli.main(argv)
    (tmp_path / "peft" / "stale.txt").write_text("x")
    peft_cli.main([*argv, "--force"])
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def make_peft(base, folder, seed=0, **options):
    """A PEFT LoRA made by get_peft_model on base and saved by save_pretrained, with random non-zero B."""
    hf = transformers.GPT2LMHeadModel.from_pretrained(base)
    torch.manual_seed(seed)
    model = peft.get_peft_model(hf, peft.LoraConfig(fan_in_fan_out=True, **{"r": 4, "lora_alpha": 16, **options}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    model.save_pretrained(folder)
    return folder


PEFT_CASES = {"c_attn": dict(target_modules=["c_attn"]),
              "c_attn+c_proj rslora": dict(target_modules=["c_attn", "c_proj"], use_rslora=True),
              "c_fc": dict(target_modules=["c_fc"], r=2, lora_alpha=3)}


@pytest.mark.tokenizer  # merge.py's check tokenizes its prompts
@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_gives_peft_logits_in_our_model_and_merges(base, tmp_path, case):
    folder = make_peft(base, tmp_path / "peft", **PEFT_CASES[case])
    model, data_format = load_model(adapter=folder)  # its base from base_model_name_or_path
    with torch.no_grad():
        diff = (logits(model) - peft_logits(base, folder)).abs().max().item()
    print(f"PEFT {case}: max |ours - PEFT| logit difference {diff:.2e}, as {list(config_of(model).targets)}")
    assert diff < 1e-5
    assert data_format == "paper"
    figures = merge.main(["--adapter", str(folder), "--model", str(base), "--check-only", "--device", "cpu",
                          "--n_check", "2", "--check_tokens", "8"])
    assert figures["same"] == figures["n"]


def test_switching_adapters_equals_loading_each_alone_and_holds_only_adapter_bytes(base, tmp_path):
    paths = {"qv": tmp_path / "qv.safetensors", "omlp": tmp_path / "omlp.safetensors", "peft": tmp_path / "peft"}
    our_adapter(base, paths["qv"], ("q", "v"), rank=4, seed=1)
    our_adapter(base, paths["omlp"], ("o", "mlp"), rank=2, alpha=5, seed=2)
    make_peft(base, paths["peft"], target_modules=["c_attn", "c_proj"])
    model = GPT.from_pretrained(base)
    base_state = {n: t.clone() for n, t in model.state_dict().items()}
    base_logits = logits(model)
    bank = AdapterBank(model)
    for name, path in paths.items():
        bank.add(name, path)
    for name in ["qv", "omlp", "peft", None, "peft", "qv"]:
        got = logits(bank.use(name))
        assert got.equal(base_logits if name is None else logits(load_model(adapter=paths[name])[0]))
    bank.use(None)
    assert all(t.equal(base_state[n]) for n, t in model.state_dict().items())  # W0 untouched by switching
    # memory: the model's tensors and the bank's, each storage counted once = the base + the adapters, no more
    bank.use("qv")
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    storages |= {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                 for tensors, _, _ in bank.adapters.values() for t in tensors.values()}
    base_bytes = sum(t.untyped_storage().nbytes() for t in {id(p): p for p in base_state.values()}.values()
                     if t is not base_state["lm_head.weight"])  # tied: the head is wte
    print(f"3 adapters: base {base_bytes:,} bytes, bank {bank.nbytes():,} bytes, in memory {sum(storages.values()):,}")
    assert sum(storages.values()) == base_bytes + bank.nbytes()


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


REFUSALS = {
    "another architecture": (dict(target_modules=["q_proj", "v_proj"]), "not one of GPT-2's"),
    "DoRA": (dict(use_dora=True), "use_dora=True"),
    "bias training": (dict(bias="lora_only"), "bias='lora_only'"),
    "modules_to_save": (dict(modules_to_save=["lm_head"]), "modules_to_save=['lm_head']"),
    "not Conv1D": (dict(fan_in_fan_out=False), "fan_in_fan_out=False"),
    "alpha_pattern we cannot honour": (dict(alpha_pattern={"attn.c_proj": 64}), "rank_pattern / alpha_pattern"),
    "rank not the tensors'": (dict(r=8), "has rank 4 tensors, but its config says 8"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_peft_adapters_we_cannot_compute_exactly_are_refused_in_one_line(base, tmp_path, case):
    changes, expected = REFUSALS[case]
    folder = make_peft(base, tmp_path / "peft", target_modules=["c_attn", "c_proj"])
    edit_config(folder, **changes)
    with pytest.raises(UserError) as info:
        load_model(adapter=folder)
    message = str(info.value)
    assert "\n" not in message and expected in message


def test_per_module_ranks_and_foreign_tensors_are_refused(base, tmp_path):
    folder = make_peft(base, tmp_path / "ranks", target_modules=["c_attn", "c_proj"], rank_pattern={"mlp.c_proj": 8})
    with pytest.raises(UserError, match=r"different ranks \(\[4, 8\]\)"):
        load_model(adapter=folder)
    folder = make_peft(base, tmp_path / "llama", target_modules=["c_attn"])
    tensors, metadata = load_safetensors(folder / "adapter_model.safetensors")
    renamed = {n.replace("attn.c_attn", "self_attn.q_proj"): t for n, t in tensors.items()}
    from plumbing.files import save_safetensors

    save_safetensors(renamed, folder / "adapter_model.safetensors", metadata)
    edit_config(folder, target_modules="q_proj")
    with pytest.raises(UserError, match="not a LoRA weight of a GPT-2 projection"):
        load_model(adapter=folder)


def table_rows(text):
    return [line.split() for line in text.splitlines() if line.split() and line.split()[0].isdigit()]


def test_analyze_gives_the_same_numbers_on_a_peft_folder(base, tmp_path, capsys):
    our_adapter(base, tmp_path / "a.safetensors", ("q", "v", "o"), rank=4, seed=5)
    our_adapter(base, tmp_path / "b.safetensors", ("q", "v", "o"), rank=4, seed=6)
    for name in "ab":
        peft_adapter.export(tmp_path / f"{name}.safetensors", tmp_path / f"{name}_peft")
    outputs = {}
    for form, (a, b) in {"ours": ("a.safetensors", "b.safetensors"), "peft": ("a_peft", "b_peft")}.items():
        analyze.main(["deltaw", str(tmp_path / a), "--out", str(tmp_path / form)])
        analyze.main(["similarity", str(tmp_path / a), str(tmp_path / b), "--out", str(tmp_path / form)])
        outputs[form] = table_rows(capsys.readouterr().out)
    assert len(outputs["ours"]) == 2 * 2 * 3  # deltaw's rows and similarity's: 2 layers x q, v, o
    assert outputs["peft"] == outputs["ours"]
    # a PEFT adapter that is not one of ours: its c_attn is q, k and v sharing one A
    folder = make_peft(base, tmp_path / "made_by_peft", target_modules=["c_attn"])
    tensors, config = peft_adapter.read_adapter(folder)
    assert analyze.adapted_projections(tensors, folder) == [(0, "q"), (0, "k"), (0, "v"), (1, "q"), (1, "k"), (1, "v")]
    assert analyze.lora_A(tensors, 1, "q").equal(analyze.lora_A(tensors, 1, "v"))
    assert similarity_grid(analyze.lora_A(tensors, 1, "q"), analyze.lora_A(tensors, 1, "k"))[3, 3] == \
        pytest.approx(1.0)
    shutil.rmtree(folder)
