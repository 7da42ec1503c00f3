"""The adapter file, the one reader and writer of LoRA adapters: our format and Hugging Face PEFT's, both ways.

Our format (train.py writes it): one .safetensors file holding every lora_A and lora_B under the model's own
names (transformer.h.0.attn.c_attn.lora.q.lora_A), with the LoRAConfig, the base model's name and shape and the
data format it was trained on as plain strings in the header's metadata. save_adapter writes it, read_adapter
reads it (or a PEFT folder), put_adapter puts the tensors on a base model; AdapterBank switches several on one base.

    python -m tools.peft_adapter export out/adapter.safetensors out/peft      # a folder PEFT loads

and every script that takes --adapter also takes such a PEFT folder (checkpoints.loading.load_model reads it here).

The two formats hold the same mathematics. PEFT puts one LoRA on each nn.Module it targets: lora_A (r x in) and
lora_B (out x r), nn.Linear-shaped even on GPT-2's Conv1D layers (fan_in_fan_out only transposes the base
weight), with scale lora_alpha / r (or / sqrt(r), use_rslora). Ours puts one update on each slice of a module:
- attn.c_proj (o), mlp.c_fc and mlp.c_proj (mlp) are one update on the whole module: the same tensors.
- attn.c_attn is fused [q | k | v]. Our q and v at rank r are one PEFT LoRA of rank 2r with A = [A_q; A_v] and
  B block-diagonal (B_q in the q rows and first r columns, B_v in the v rows and last r columns, zeros
  elsewhere), lora_alpha scaled so that PEFT's scale equals ours (rank_pattern / alpha_pattern say so).
  The other way, a PEFT c_attn LoRA with a dense B is our q, k and v updates, each with a copy of the shared
  A and its third of B: B A x restricted to the q rows is B_q (A x).
A projection that a PEFT adapter leaves alone in some layer (layers_to_transform, or c_fc without c_proj) gets a
zero update (A = B = 0), which adds exactly 0: our format has one set of targets for every layer.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import lora
from lora import LoRAConfig
from plumbing.errors import UserError
from plumbing.files import load_safetensors, read_safetensors_header, save_safetensors
from plumbing.hf_checkpoint import PRETRAINED, RELEASED_SHAPE, SHAPE_KEYS, read_config_json, shape_of
from plumbing.outputs import check_new_folder, new_folder

# ----------------------------------------------------------------------------------------------------------
# Our format.


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter says besides its tensors."""

    lora: LoRAConfig
    base_model: str  # the base model's name or path, "None" when it is not known
    data_format: str  # the prompt format of the data it was trained on (data/e2e/prepare.py)
    shape: dict  # the base model's SHAPE_KEYS; None for an entry a PEFT adapter cannot tell


def save_adapter(model, path, data_format="paper"):
    """Write the model's adapter (LoRA tensors + LoRAConfig + the base model's name and shape + the data format it
    was trained on) atomically. Every tensor must be finite: a NaN adapter is never written."""
    tensors, c = lora.lora_state_dict(model), lora.config_of(model)
    if not all(t.isfinite().all() for t in tensors.values()):
        raise UserError(f"not writing {path}: the LoRA tensors are not all finite")
    metadata = {"format": "lora-gpt-adapter", "rank": str(c.rank), "alpha": str(c.alpha),
                "targets": ",".join(c.targets), "scaling": "alpha/sqrt(r)" if c.rslora else "alpha/r",
                "init": c.init, "dropout": str(c.dropout), "base_model": str(model.name_or_path),
                "data_format": data_format, **{key: str(v) for key, v in shape_of(model.config).items()}}
    save_safetensors(tensors, path, metadata)


def read_config(path):
    """The AdapterInfo in the header of one of our adapter files (no tensors are read)."""
    _, meta = read_safetensors_header(path)
    if meta.get("format") != "lora-gpt-adapter":
        raise UserError(f"{path} is not a lora-gpt adapter file (no adapter metadata in its header)")
    try:
        config = LoRAConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=meta["targets"].split(","),
                            dropout=float(meta["dropout"]), rslora=meta["scaling"] == "alpha/sqrt(r)",
                            init=meta["init"])
        return AdapterInfo(config, meta["base_model"], meta.get("data_format", "plain"),
                           {key: int(meta[key]) for key in SHAPE_KEYS})
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: adapter metadata is incomplete or damaged ({e!r})") from None


QKV = ("q", "k", "v")
# each module PEFT may adapt in a GPT-2 block -> the key of its update in our LoRALinear (c_attn: q, k, v)
OTHER_MODULES = {"attn.c_proj": "o", "mlp.c_fc": "mlp", "mlp.c_proj": "mlp"}
MODULES = ("attn.c_attn", *OTHER_MODULES)
PEFT_NAME = re.compile(r"base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                       r"\.lora_([AB])\.weight")
HINT_KEY = "lora_gpt"  # our settings, in the exported file's safetensors metadata: PEFT ignores them
HUB_ORG = "openai-community/"  # the Hub's name for OpenAI's checkpoints, e.g. openai-community/gpt2
# PEFT options that change what the adapter computes and that we do not implement; off is None/False/"none"/[]/{}
UNSUPPORTED = ("use_dora", "bias", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices",
               "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora", "arrow_config",
               "kasa_config", "monteclora_config", "velora_config", "megatron_config")


def ours(layer, module, key, which):
    """Our tensor name, e.g. transformer.h.0.attn.c_attn.lora.q.lora_A."""
    return f"transformer.h.{layer}.{module}.lora.{key}.lora_{which}"


def peft_name(layer, module, which):
    return f"base_model.model.transformer.h.{layer}.{module}.lora_{which}.weight"


def qkv_targets(targets):
    return [t for t in QKV if t in targets]


# ----------------------------------------------------------------------------------------------------------
# Export: our adapter -> PEFT.


def to_peft(tensors, info):
    """(PEFT tensors, adapter_config.json dict) of an adapter in our format (its tensors and AdapterInfo)."""
    c = info.lora
    r, alpha, rslora, targets = c.rank, c.alpha, c.rslora, c.targets
    qkv, n_layer = qkv_targets(targets), info.shape["n_layer"]
    out = {}
    for layer in range(n_layer):
        if qkv:
            A = torch.cat([tensors[ours(layer, "attn.c_attn", t, "A")] for t in qkv])
            C = A.shape[1]
            B = A.new_zeros(3 * C, r * len(qkv))
            for j, t in enumerate(qkv):
                start, end = lora.qkv_slices(C)[t]
                B[start:end, j * r:(j + 1) * r] = tensors[ours(layer, "attn.c_attn", t, "B")]
            out[peft_name(layer, "attn.c_attn", "A")], out[peft_name(layer, "attn.c_attn", "B")] = A, B
        for module, key in OTHER_MODULES.items():
            if key in targets:
                for which in "AB":
                    out[peft_name(layer, module, which)] = tensors[ours(layer, module, key, which)]
    modules = [m for m in MODULES if (m == "attn.c_attn" and qkv) or OTHER_MODULES.get(m) in targets]
    # c_attn's rank is r per q, k, v chosen; its alpha keeps PEFT's alpha / rank (or alpha / sqrt(rank)) ours
    n = len(qkv)
    patterns = n > 1
    base = None if info.base_model in ("", "None") else info.base_model
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r, "lora_alpha": number(alpha), "use_rslora": rslora, "target_modules": modules,
        "rank_pattern": {"attn.c_attn": r * n} if patterns else {},
        "alpha_pattern": {"attn.c_attn": number(alpha * (math.sqrt(n) if rslora else n))} if patterns else {},
        "fan_in_fan_out": True, "lora_dropout": c.dropout, "bias": "none", "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "init_lora_weights": True,
        "inference_mode": True,
    }
    return out, adapter_config


def number(x):
    """32.0 -> 32: an integer alpha stays an integer in adapter_config.json."""
    return int(x) if float(x).is_integer() else x


def export(adapter, out, force=False):
    """Write our adapter file `adapter` (or the one in a train.py run folder) as a PEFT adapter folder `out`,
    made whole under a temporary name (plumbing/outputs.py); returns out."""
    check_new_folder(out, force)
    adapter = adapter_path(adapter)
    info = read_config(adapter)
    tensors, _ = load_safetensors(adapter)
    peft_tensors, adapter_config = to_peft(tensors, info)
    hint = dict(targets=list(info.lora.targets), alpha=info.lora.alpha, init=info.lora.init,
                data_format=info.data_format, shape=info.shape)
    with new_folder(out, force) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
        save_safetensors(peft_tensors, tmp / "adapter_model.safetensors", {"format": "pt", HINT_KEY: json.dumps(hint)})
    return Path(out)


# ----------------------------------------------------------------------------------------------------------
# Import: PEFT -> our tensor names and an AdapterInfo.


def is_peft_folder(path):
    return Path(path).is_dir() and (Path(path) / "adapter_config.json").is_file()


def base_name(name):
    """openai-community/gpt2 -> gpt2, which GPT.from_pretrained knows; anything else as it is."""
    name = str(name)
    return name.removeprefix(HUB_ORG) if name.removeprefix(HUB_ORG) in PRETRAINED else name


def base_shape(name):
    """The base model's shape (SHAPE_KEYS) from its name or its config.json, or None if it cannot be told.
    A folder whose config.json is not GPT-2's is refused: the adapter was made for another architecture."""
    if name in PRETRAINED:
        return {**PRETRAINED[name], **RELEASED_SHAPE}
    config_file = Path(name) / "config.json"
    return read_config_json(config_file)[0] if config_file.is_file() else None


def pattern_value(pattern, default, module):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key that
    matches the end of the module's name at a dot."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_peft_config(cfg, folder):
    """Refuse, in one line, what is not a GPT-2 LoRA we can compute exactly."""
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        raise UserError(f"{folder} is a {cfg.get('peft_type') if isinstance(cfg, dict) else None!r} "
                         "PEFT adapter; only LoRA is supported")
    for key in UNSUPPORTED:
        if cfg.get(key) not in (None, False, "none", [], {}):
            raise UserError(f"{folder} uses PEFT's {key}={cfg[key]!r}, which lora-gpt does not implement")
    if cfg.get("fan_in_fan_out") is not True:
        raise UserError(f"{folder} has fan_in_fan_out={cfg.get('fan_in_fan_out')!r}, but GPT-2's layers are "
                         "Conv1D (fan_in_fan_out=true): it was not made for GPT-2")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):  # a string is a regex (or "all-linear"): the tensors' names are checked instead
        gpt2 = [f"transformer.h.0.{m}" for m in MODULES]
        for target in targets:
            if not any(m == target or m.endswith("." + target) for m in gpt2):
                raise UserError(f"{folder} targets {target!r}, which is not one of GPT-2's "
                                 f"{', '.join(MODULES)}: a PEFT adapter for another architecture?")


def read_peft(folder):
    """(tensors under our names, AdapterInfo) of a PEFT LoRA folder for GPT-2."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {folder / 'adapter_config.json'} ({e})") from None
    check_peft_config(cfg, folder)
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        raise UserError(f"{folder} has no adapter_model.safetensors (only PEFT's safetensors format is read)")
    raw, metadata = load_safetensors(file)
    try:
        hint = json.loads(metadata.get(HINT_KEY, "{}"))
    except ValueError:
        hint = {}
    found = {}  # (layer, module) -> {"A": tensor, "B": tensor}
    for name, tensor in raw.items():
        match = PEFT_NAME.fullmatch(name)
        if match is None:
            raise UserError(f"{folder} holds {name}, which is not a LoRA weight of a GPT-2 projection "
                             "(a PEFT adapter for another architecture?)")
        found.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    if not found:
        raise UserError(f"{folder} holds no LoRA weights")
    base = base_name(cfg.get("base_model_name_or_path") or "None")
    shape = hint.get("shape") or base_shape(base)
    n_layer = shape["n_layer"] if shape else max(layer for layer, _ in found) + 1
    rslora = bool(cfg.get("use_rslora"))

    # every module's rank and scale, from its tensors and the config that PEFT would read
    scales, n_embd = {}, None
    for (layer, module), pair in found.items():
        A, B = pair.get("A"), pair.get("B")
        where = f"layer {layer} {module}"
        if A is None or B is None or A.ndim != 2 or B.ndim != 2 or B.shape[1] != A.shape[0]:
            raise UserError(f"{folder}: the LoRA weights of {where} are incomplete or of mismatched shapes")
        key = f"transformer.h.{layer}.{module}"
        rank = pattern_value(cfg.get("rank_pattern") or {}, cfg.get("r"), key)
        if rank != A.shape[0]:
            raise UserError(f"{folder}: {where} has rank {A.shape[0]} tensors, but its config says {rank}")
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, cfg.get("lora_alpha"), key)
        scales[layer, module] = lora.scale(alpha, rank, rslora)
        C = A.shape[1] if module != "mlp.c_proj" else A.shape[1] // 4
        if n_embd not in (None, C):
            raise UserError(f"{folder}: its LoRA weights are for models of different widths")
        n_embd = C
    if shape is not None and (shape["n_embd"] != n_embd or any(layer >= shape["n_layer"] for layer, _ in found)):
        raise UserError(f"{folder} does not fit its base model {base} (n_embd {n_embd} vs {shape['n_embd']}, "
                         f"or more layers)")

    split = split_c_attn(found, hint)
    tensors, ranks = {}, set()
    for (layer, module), (key, A, B) in ((k, u) for k, updates in split.items() for u in updates):
        tensors[ours(layer, module, key, "A")], tensors[ours(layer, module, key, "B")] = A, B
        ranks.add(A.shape[0])
    if len(ranks) > 1 or not math.isclose(min(scales.values()), max(scales.values()), rel_tol=1e-9):
        raise UserError(f"{folder}: its modules have different ranks ({sorted(ranks)}) or scales "
                         f"({min(scales.values()):g} to {max(scales.values()):g}); lora-gpt has one rank and "
                         "one alpha for every update (a rank_pattern / alpha_pattern it cannot honour)")
    rank, scale = ranks.pop(), next(iter(scales.values()))
    alpha = scale * (math.sqrt(rank) if rslora else rank)
    if "alpha" in hint and math.isclose(hint["alpha"], alpha, rel_tol=1e-9):
        alpha = hint["alpha"]  # exactly what was exported, not alpha rounded through PEFT's alpha_pattern
    targets = [t for t in lora.TARGETS
               if any(f".lora.{t}." in name for name in tensors)]
    fill_zeros(tensors, targets, n_layer, rank, n_embd)
    config = LoRAConfig(rank=rank, alpha=alpha, targets=targets, dropout=float(cfg.get("lora_dropout") or 0.0),
                        rslora=rslora, init=hint.get("init", "kaiming"))
    shape = shape or dict.fromkeys(SHAPE_KEYS) | {"n_layer": n_layer, "n_embd": n_embd}
    return tensors, AdapterInfo(config, base, hint.get("data_format", "paper"), shape)


def split_c_attn(found, hint):
    """{(layer, module): [(our key, A, B)]}. c_attn becomes one update per third of its rows: block-diagonal
    (each third using its own columns: what to_peft writes) when every layer's B is, else each third with a
    copy of the shared A. Thirds whose B is zero in every layer are dropped (they add nothing)."""
    c_attn = {layer: pair for (layer, module), pair in found.items() if module == "attn.c_attn"}
    nonzero = set()
    for pair in c_attn.values():
        C = pair["B"].shape[0] // 3
        nonzero |= {t for t in QKV if pair["B"][lora.qkv_slices(C)[t][0]:lora.qkv_slices(C)[t][1]].any()}
    # the exported file says which of q, k, v it holds (their B may be zero: untrained); else B's non-zero thirds
    chosen = qkv_targets(hint.get("targets", [])) or qkv_targets(nonzero) or list(QKV)
    if not nonzero <= set(chosen):
        chosen = qkv_targets(nonzero)
    rank = next(iter(c_attn.values()))["A"].shape[0] if c_attn else 0
    r = rank // len(chosen)
    block = rank % len(chosen) == 0 and all(is_block_diagonal(pair["B"], chosen, r) for pair in c_attn.values())
    split = {}
    for (layer, module), pair in found.items():
        A, B = pair["A"], pair["B"]
        if module != "attn.c_attn":
            split[layer, module] = [(OTHER_MODULES[module], A, B)]
            continue
        C = B.shape[0] // 3
        updates = []
        for j, t in enumerate(chosen):
            start, end = lora.qkv_slices(C)[t]
            if block:
                updates.append((t, A[j * r:(j + 1) * r].clone(), B[start:end, j * r:(j + 1) * r].clone()))
            else:
                updates.append((t, A.clone(), B[start:end].clone()))
        split[layer, module] = updates
    return split


def is_block_diagonal(B, chosen, r):
    """Whether B (3C x len(chosen) r) is zero outside the blocks [third of t, columns j r .. (j + 1) r)."""
    mask = torch.ones_like(B, dtype=torch.bool)
    C = B.shape[0] // 3
    for j, t in enumerate(chosen):
        start, end = lora.qkv_slices(C)[t]
        mask[start:end, j * r:(j + 1) * r] = False
    return not B[mask].any()


def fill_zeros(tensors, targets, n_layer, rank, n_embd):
    """A zero update (A = B = 0, adding exactly 0) wherever our layout has an update the PEFT adapter lacks."""
    C = n_embd
    sizes = {**{("attn.c_attn", t): (C, C) for t in QKV}, ("attn.c_proj", "o"): (C, C),
             ("mlp.c_fc", "mlp"): (C, 4 * C), ("mlp.c_proj", "mlp"): (4 * C, C)}  # (in, out)
    dtype = next(iter(tensors.values())).dtype
    for layer in range(n_layer):
        for (module, key), (n_in, n_out) in sizes.items():
            if key in targets and ours(layer, module, key, "A") not in tensors:
                tensors[ours(layer, module, key, "A")] = torch.zeros(rank, n_in, dtype=dtype)
                tensors[ours(layer, module, key, "B")] = torch.zeros(n_out, rank, dtype=dtype)


RUN_ADAPTER = "adapter.safetensors"  # the adapter file in a train.py run folder


def adapter_path(path):
    """Where the adapter named by `path` is: the file itself, a PEFT folder, or a train.py run folder's
    adapter.safetensors. Any other folder is a one-line error saying what it must hold."""
    path = Path(path)
    if not path.is_dir() or is_peft_folder(path):
        return path
    if (path / RUN_ADAPTER).is_file():
        return path / RUN_ADAPTER
    raise UserError(f"{path} is a folder with neither {RUN_ADAPTER} (a train.py run folder) nor adapter_config.json "
                    f"(a PEFT adapter folder): pass the adapter file, or one of those folders")


def read_adapter(path):
    """(tensors, AdapterInfo) of an adapter in either format: our .safetensors file (or the run folder holding it) or
    a PEFT folder. One with a NaN or infinite number (a diverged run, or another tool's) is refused: it would only
    generate garbage."""
    path = adapter_path(path)
    tensors, info = read_peft(path) if is_peft_folder(path) else (load_safetensors(path)[0], read_config(path))
    if not all(t.isfinite().all() for t in tensors.values()):
        raise UserError(f"{path} holds NaN or infinite numbers: its training diverged")
    return tensors, info


# ----------------------------------------------------------------------------------------------------------
# Loading into a model, and several adapters on one base.


def check_adapter_fits(model, info, path):
    """Refuse an adapter made for another model shape (unknown entries of a PEFT adapter's shape pass)."""
    have = shape_of(model.config)
    differ = [f"{k} {info.shape[k]} vs {have[k]}" for k in SHAPE_KEYS if info.shape[k] not in (None, have[k])]
    if differ:
        raise UserError(f"{path} was made for {info.base_model} and does not fit this model "
                         f"({model.name_or_path}): {', '.join(differ)}")


def put_adapter(model, tensors, info, path):
    """Give model (without LoRA layers) LoRA layers with info's LoRAConfig holding exactly these tensors (the
    tensors themselves where they already have the model's device and dtype: no copy)."""
    check_adapter_fits(model, info, path)
    lora.apply_lora(model, info.lora)
    expected = {name: tuple(t.shape) for name, t in lora.lora_state_dict(model).items()}
    if {name: tuple(t.shape) for name, t in tensors.items()} != expected:
        raise UserError(f"{path} does not hold the tensors its header describes: "
                        f"{tensors_unlike_header(tensors, expected, info.lora)}")
    p = model.transformer.wte.weight
    for name, tensor in tensors.items():
        owner, leaf = name.rsplit(".", 1)
        parameter = nn.Parameter(tensor.to(device=p.device, dtype=p.dtype), requires_grad=False)
        setattr(model.get_submodule(owner), leaf, parameter)
    return model


def tensors_unlike_header(tensors, expected, config):
    """How an adapter's tensors differ from those its header's LoRAConfig makes on the model (expected: their
    shapes), in words: the rank first, which is what a hand-made or mixed-up file gets wrong most often."""
    ranks = sorted({t.shape[0] for name, t in tensors.items() if name.endswith("lora_A")})
    if set(tensors) == set(expected) and len(ranks) == 1 and ranks[0] != config.rank:
        return f"its tensors have rank {ranks[0]}, but its header says rank {config.rank}"
    targets = ",".join(config.targets)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    more = lambda names: f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    if missing:
        return f"it lacks {missing[0]}{more(missing)}, which its header's targets ({targets}) call for"
    if unexpected:
        return f"it holds {unexpected[0]}{more(unexpected)}, which its header's targets ({targets}) do not have"
    name = next(name for name, shape in expected.items() if tuple(tensors[name].shape) != shape)
    return (f"{name} is {' x '.join(map(str, tensors[name].shape))} where rank {config.rank} on this model makes it "
            f"{' x '.join(map(str, expected[name]))}")


def remove_lora(model):
    """Undo apply_lora: every LoRALinear back to a plain nn.Linear holding the same W0 and b (unmerged first)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, lora.LoRALinear):
            module.unmerge()
            out_features, in_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias  # the base's own tensors, not copies
            owner, leaf = name.rsplit(".", 1)
            setattr(model.get_submodule(owner), leaf, linear)
    return model


class AdapterBank:
    """Several adapters on one base model in memory: bank.add(name, path), then bank.use(name) or use(None).

    The bank holds each adapter's tensors (on the CPU, as read); use() takes the model's LoRA layers off and
    puts on the chosen adapter's, so the base weights are loaded once and switching costs an adapter's size.
    """

    def __init__(self, model):
        if lora.lora_layers(model):
            raise UserError("the adapter bank needs a base model without LoRA layers")
        self.model, self.adapters, self.active = model, {}, None

    def add(self, name, path):
        tensors, info = read_adapter(path)
        check_adapter_fits(self.model, info, path)
        self.adapters[name] = (tensors, info, path)

    def use(self, name):
        """Switch the model to adapter `name` (None: the base model alone); returns the model."""
        if name is not None and name not in self.adapters:
            raise UserError(f"no adapter named {name!r} (have {', '.join(self.adapters)})")
        remove_lora(self.model)
        if name is not None:
            put_adapter(self.model, *self.adapters[name])
        self.active = name
        return self.model

    def nbytes(self):
        """Bytes of the adapter tensors the bank holds."""
        return sum(t.numel() * t.element_size() for tensors, _, _ in self.adapters.values() for t in tensors.values())
