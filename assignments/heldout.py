"""The grader's held-out cases: the public checks on other shapes and seeds. Not copied into the starter.

Same format as checks.PUBLIC: name -> (part, check, keyword arguments).
"""

HELDOUT = {
    "part0 held-out: 3 layers, 4 heads": (0, "loading", dict(seed=7, n_layer=3, n_head=4, n_embd=24, vocab_size=53)),
    "part0 held-out: dropout 0.2 in every module, 3 layers": (0, "loading_for_training", dict(
        seed=8, dropout=0.2, n_layer=3, n_head=4, n_embd=24, vocab_size=53)),
    "part1 held-out: 4 heads, chunks 2, 3, 1": (1, "attention", dict(seed=5, batch=3, n_head=4, n_embd=24,
                                                                      prompt=3, chunks=[2, 3, 1], layer=0)),
    "part1 held-out: a prompt of 1, then 5 at once": (1, "attention", dict(seed=6, batch=1, n_head=1, n_embd=8,
                                                                            prompt=1, chunks=[5, 2])),
    "part1 held-out: left-padded prompts of 1, 6, 4 then 3 steps, 4 heads": (1, "attention_padded", dict(
        seed=7, n_head=4, n_embd=24, lengths=[1, 6, 4], steps=3)),
    "part1 held-out: KVCache.store": (1, "cache_store", dict(seed=3, batch=1, n_head=3, head_size=2, steps=[1, 4])),
    "part1 held-out: KVCache.mask, pads 0, 6, 2, 1 after 5 slots, 1 new": (1, "cache_mask", dict(
        pads=[0, 6, 2, 1], length=5, T=1)),
    "part1 held-out: KVCache.mask, pads 4, 0 on an empty cache, 3 new": (1, "cache_mask", dict(pads=[4, 0], length=0,
                                                                                                T=3)),
    "part1 held-out: attention dropout 0.3, 4 heads": (1, "attention_training", dict(
        seed=4, batch=1, n_head=4, n_embd=24, T=7, dropout=0.3)),
    "part2 held-out: q, k, v at r=3": (2, "lora_layer", dict(seed=11, in_features=20, out_features=60, rank=3,
                                                             alpha=7, slices={"q": (0, 20), "k": (20, 40),
                                                                              "v": (40, 60)})),
    "part2 held-out: MLP width, r=8": (2, "lora_layer", dict(seed=12, in_features=12, out_features=48, rank=8,
                                                             alpha=16, slices={"mlp": (0, 48)})),
    "part2 held-out: train mode, dropout 0.25, q, k, v": (2, "lora_training", dict(
        seed=13, in_features=12, out_features=36, rank=2, alpha=5, slices={"q": (0, 12), "k": (12, 24),
                                                                             "v": (24, 36)}, dropout=0.25)),
    "part3 held-out: other shape and targets": (3, "placement", dict(seed=4, rank=3, alpha=6, n_layer=3, n_head=4,
                                                                     n_embd=24, settings=[("q", "k", "v", "o"),
                                                                                          ("v", "q"), ("mlp",)])),
    "part3 held-out: Table 5 on GPT-3 Medium's width": (3, "table5", dict(n_layer=24, n_embd=1024, n_head=16)),
    "part3 held-out: bfloat16 model, o and mlp": (3, "placement_in_use", dict(
        seed=5, rank=2, alpha=4, dropout=0.05, targets=("mlp", "o"), dtype="bfloat16", n_layer=1, n_head=2,
        n_embd=8)),
    "part4 held-out: left-padded prompts of 2, 7, 7, 3 then 3 steps, 3 layers": (4, "forward_padded", dict(
        seed=4, lengths=[2, 7, 7, 3], steps=3, n_layer=3)),
    "part4 held-out: make_batch padded to 8": (4, "batching", dict(seed=9, n_examples=11, pad_to=8)),
    "part4 held-out: label smoothing, 3 layers": (4, "forward_and_step", dict(seed=3, batch=3, label_smoothing=0.1,
                                                                              n_layer=3, n_head=4, n_embd=24)),
    "part4 held-out: train mode, dropout 0.2, 3 layers": (4, "forward_in_training", dict(
        seed=6, batch=3, dropout=0.2, label_smoothing=0.05, n_layer=3, n_head=4, n_embd=24, block_size=12)),
    "part5 held-out: subspace similarity": (5, "similarity", dict(seed=8, d=40, r1=8, r2=3)),
    "part5 held-out: amplification, r=4": (5, "amplification", dict(seed=8, out_features=20, in_features=30, r=4)),
    "part5 held-out: i, j out of range, other shapes": (5, "analysis_contract", dict(seed=9, d=10, r1=5, r2=2)),
}
