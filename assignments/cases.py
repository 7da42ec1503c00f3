"""The public cases: name -> (part, check in checks.py, keyword arguments). No torch here: the grader's own
process reads these without importing it."""

CASE_SECONDS = 20  # time limit of one case

PUBLIC = {
    "part0 load a 2-layer checkpoint": (0, "loading", dict(seed=0, n_layer=2, n_head=2, n_embd=16)),
    "part0 load with dropout": (0, "loading", dict(seed=1, n_layer=1, n_head=4, n_embd=32, dropout=0.1)),
    "part0 load for training: dropout in every module": (0, "loading_for_training",
                                                          dict(seed=2, dropout=0.1, n_layer=2, n_head=2, n_embd=16)),
    "part1 attention, prompt 4 then chunks 3, 1": (1, "attention", dict(seed=0, batch=2, n_head=2, n_embd=16,
                                                                         prompt=4, chunks=[3, 1])),
    "part1 KVCache.store": (1, "cache_store", dict(seed=0, batch=2, n_head=2, head_size=4, steps=[3, 1, 2])),
    "part1 KVCache.mask: pads 3, 0, 5 after 2 slots, 4 new": (1, "cache_mask", dict(pads=[3, 0, 5], length=2, T=4)),
    "part1 attention dropout: eval mode off, train mode on the weights": (1, "attention_training", dict(
        seed=0, batch=2, n_head=2, n_embd=16, T=6, dropout=0.1)),
    "part1 attention, left-padded prompts of 5, 2, 3 then 2 steps": (1, "attention_padded", dict(
        seed=0, n_head=2, n_embd=16, lengths=[5, 2, 3], steps=2)),
    "part2 LoRALinear on q and v": (2, "lora_layer", dict(seed=0, in_features=16, out_features=48, rank=4,
                                                          alpha=32, slices={"q": (0, 16), "v": (32, 48)})),
    "part2 LoRALinear, rsLoRA, Gaussian A": (2, "lora_layer", dict(seed=1, in_features=24, out_features=12,
                                                                   rank=2, alpha=8, slices={"o": (0, 12)},
                                                                   rslora=True, init="gaussian")),
    "part2 LoRALinear in train mode, dropout 0.1": (2, "lora_training", dict(
        seed=0, in_features=16, out_features=48, rank=4, alpha=32, slices={"q": (0, 16), "v": (32, 48)},
        dropout=0.1)),
    "part3 apply_lora placements": (3, "placement", dict(seed=0, rank=4, alpha=32, n_layer=2, n_head=2,
                                                         n_embd=16, settings=[("q", "v"), ("k",), ("o", "mlp")])),
    "part3 Table 5 on GPT-3's shape": (3, "table5", dict()),
    "part3 apply_lora on a float64 model, twice": (3, "placement_in_use", dict(
        seed=0, rank=4, alpha=32, dropout=0.1, targets=("q", "v"), dtype="float64", n_layer=2, n_head=2,
        n_embd=16)),
    "part4 make_batch": (4, "batching", dict(seed=0, n_examples=8, pad_to=1)),
    "part4 forward, loss, cache, one step": (4, "forward_and_step", dict(seed=0, batch=2, label_smoothing=0.0)),
    "part4 forward in train mode: dropout, label smoothing; a full cache": (4, "forward_in_training", dict(
        seed=0, batch=2, dropout=0.1, label_smoothing=0.1)),
    "part4 forward, left-padded prompts of 4, 1, 6 then 2 steps": (4, "forward_padded", dict(
        seed=0, lengths=[4, 1, 6], steps=2)),
    "part5 subspace similarity": (5, "similarity", dict(seed=0, d=32, r1=4, r2=6)),
    "part5 amplification": (5, "amplification", dict(seed=0, out_features=24, in_features=16, r=2)),
    "part5 i, j out of range; the random reference's seed": (5, "analysis_contract", dict(seed=0, d=16, r1=3,
                                                                                           r2=4)),
}


def public_cases(part):
    return [name for name, case in PUBLIC.items() if case[0] == part]
