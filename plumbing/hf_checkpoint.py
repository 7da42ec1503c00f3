"""GPT-2 checkpoints in OpenAI's / Hugging Face's layout: finding, downloading, reading and writing them.

model.py's from_pretrained calls read() and does the two things a student should see (the Conv1D transpose and
the tied head); everything here is file plumbing:
- the four released checkpoints by name, downloaded once into the cache folder;
- a folder with model.safetensors (+ an optional config.json), or a bare .safetensors file;
- names with or without the 'transformer.' prefix, the old attention-mask buffers dropped; check_state_fits checks
  every name and shape against the model, so a wrong file is a one-line error, not a load_state_dict traceback;
- hf_state_dict / hf_config: the exact inverse, for writing a checkpoint transformers loads (merge.py).
"""

import json
from pathlib import Path

from plumbing import files
from plumbing.errors import UserError

# The four checkpoints OpenAI released, by their Hugging Face names.
PRETRAINED = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
RELEASED_SHAPE = dict(vocab_size=50257, block_size=1024)  # what all four share
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size")  # a GPT-2's shape: GPTConfig's fields
HUB_URL = "https://huggingface.co/openai-community/{name}/resolve/main/model.safetensors"

# OpenAI's code stored these four weights as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hub_file(name):
    """Where a released checkpoint lives once downloaded (it need not be there yet)."""
    return files.cache_dir() / name / "model.safetensors"


def known_shape(name_or_path):
    """The shape of a released model or of a folder with a config.json, read without loading any weight; None when
    only the weights could tell."""
    if name_or_path in PRETRAINED:
        return {**PRETRAINED[name_or_path], **RELEASED_SHAPE}
    config_file = Path(name_or_path) / "config.json"
    return read_config_json(config_file)[0] if config_file.is_file() else None


def locate(name_or_path):
    """(model.safetensors path, config.json path or None), downloading a released model when needed."""
    if name_or_path in PRETRAINED:
        file = files.download(HUB_URL.format(name=name_or_path), hub_file(name_or_path),
                              desc=f"{name_or_path} weights")
        return file, None
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise UserError(f"{path} has no model.safetensors")
        config = path / "config.json"
        return path / "model.safetensors", config if config.is_file() else None
    if path.is_file():
        config = path.parent / "config.json"
        return path, config if config.is_file() else None
    raise UserError(f"unknown model {name_or_path!r}: use one of {', '.join(PRETRAINED)}, "
                     f"or a folder or .safetensors file")


def read(name_or_path):
    """(tensors, shape) of a GPT-2 checkpoint: fp32 tensors under our names in OpenAI's layout (Conv1D weights
    still (in, out), no lm_head), and shape = dict(n_layer, n_head, n_embd, vocab_size, block_size)."""
    path, config_file = locate(str(name_or_path))
    raw, _ = files.load_safetensors(path)
    tensors = {}
    for name, tensor in raw.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # the causal mask that old code stored as a buffer; the head, tied to wte (checked below)
        tensors[name if name.startswith("transformer.") else "transformer." + name] = tensor.float().contiguous()
    head, wte = raw.get("lm_head.weight"), tensors.get("transformer.wte.weight")
    if head is not None and wte is not None and not head.float().equal(wte):
        raise UserError(f"{path}: lm_head is not tied to wte; GPT-2 ties them")
    return tensors, _read_shape(config_file, tensors, str(name_or_path), path)


def check_state_fits(state, model, path):
    """A one-line error, naming the tensor, unless state (our layout) has exactly model's tensors and shapes:
    load_state_dict would say it in a traceback of every mismatch."""
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items() if name != "lm_head.weight"}
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    if missing or unexpected:
        raise UserError(f"{path} is not a GPT-2 checkpoint of this shape: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != ours[name]:
            raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)} in our layout, "
                             f"expected {ours[name]}")


def shape_of(config):
    """{SHAPE_KEYS: value} of a GPTConfig."""
    return {key: getattr(config, key) for key in SHAPE_KEYS}


def read_config_json(config_file):
    """(the model's shape (SHAPE_KEYS), the whole config) from a Hugging Face config.json; a one-line error unless
    it describes GPT-2's architecture."""
    hf = None
    try:
        hf = json.loads(Path(config_file).read_text())
        shape = dict(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], vocab_size=hf["vocab_size"],
                     block_size=hf["n_positions"])
    except OSError as e:
        raise UserError(f"cannot read {config_file} ({e.strerror or e})") from None
    except (ValueError, KeyError, TypeError) as e:
        if isinstance(hf, dict) and hf.get("model_type", "gpt2") != "gpt2":
            raise UserError(f"{config_file} describes a {hf['model_type']!r} model, not GPT-2") from None
        raise UserError(f"{config_file} is not a GPT-2 config.json ({e!r})") from None
    if hf.get("n_inner") not in (None, 4 * shape["n_embd"]) or hf.get("activation_function") != "gelu_new":
        raise UserError(f"{config_file}: only GPT-2's 4x MLP with gelu_new is supported")
    return shape, hf


def _read_shape(config_file, tensors, name_or_path, path):
    """The model's shape from config.json, else from the table of the four released models."""
    if config_file is not None:
        return read_config_json(config_file)[0]
    if name_or_path in PRETRAINED:
        return {**PRETRAINED[name_or_path], **RELEASED_SHAPE}
    # A bare file: it is one of the released models if its shapes say so (n_head cannot be read off shapes).
    wte = tensors.get("transformer.wte.weight")
    n_layer = len({n.split(".")[2] for n in tensors if n.startswith("transformer.h.")})
    for shape in PRETRAINED.values():
        if wte is not None and tuple(wte.shape) == (50257, shape["n_embd"]) and n_layer == shape["n_layer"]:
            return {**shape, **RELEASED_SHAPE}
    raise UserError(f"{path}: no config.json beside it and its shapes are none of {', '.join(PRETRAINED)}")


def hf_state_dict(state_dict):
    """GPT-2 weights as OpenAI / Hugging Face store them, the inverse of loading: the four Conv1D weights
    transposed back to (in, out), no lm_head (tied to wte, tied again on loading), no LoRA tensors."""
    return {name: tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor
            for name, tensor in state_dict.items() if name != "lm_head.weight" and ".lora." not in name}


def hf_config(config):
    """A config.json that transformers reads as GPT2LMHeadModel (and GPT.from_pretrained reads too)."""
    if not config.bias:
        raise UserError("GPT-2 checkpoints always have biases; this model has none")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # the old name of n_positions, still read by some tools
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # None means 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation of GELU that GPT-2 was trained with
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": 0.1,  # OpenAI's training dropout, as in the released configs; off at inference
        "embd_pdrop": 0.1,
        "attn_pdrop": 0.1,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": "float32",
    }
