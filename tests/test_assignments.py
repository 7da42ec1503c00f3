"""The course kit (assignments/): the starter is the project with holes, and the autograder can fail.

One grade run scores, side by side: the project itself (full marks), the starter (0 on every part), one
copy of the project per planted bug (exactly that part lost), a correct solution written differently (full
marks), a syntax error and an endless loop (only the parts that need them lost).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from assignments import splice
from assignments.cases import PUBLIC
from assignments.grade import gradescope
from assignments.parts import AUTOGRADED, PARTS, part_files, product_files

ROOT = Path(__file__).resolve().parents[1]

# name -> (file, [(text in the project, text that plants the bug), ...], the part that must lose its points,
#          the case that must catch it)
BUGS = {
    # part 0
    "Conv1D weights not transposed": ("model.py", [("tensor.t() if name.endswith(hf_checkpoint.CONV1D_WEIGHTS)",
                                                    "tensor if name.endswith(hf_checkpoint.CONV1D_WEIGHTS)")], 0,
                                      "part0 load a 2-layer checkpoint"),
    "dropout in the config, not in the modules": ("model.py", [
        ("model = cls(GPTConfig(**shape, dropout=dropout))", "model = cls(GPTConfig(**shape))"),
        ("model.name_or_path = str(name_or_path)", "model.name_or_path = str(name_or_path)\n"
                                                   "        model.config.dropout = dropout")], 0,
        "part0 load for training: dropout in every module"),
    # part 1
    "the causal mask is off by one": ("model.py", [("((key <= query) & real)", "((key <= query + 1) & real)")], 1,
                                      "part1 attention, prompt 4 then chunks 3, 1"),
    "a real token attends to the pads": ("model.py", [("real = key >= self.pad[:B, None, None, None]",
                                                       "real = key >= 0 * self.pad[:B, None, None, None]")], 1,
                                         "part1 attention, left-padded prompts of 5, 2, 3 then 2 steps"),
    "a pad's softmax row is empty (0 or NaN, by kernel)": ("model.py", [(" | (key == query)", "")], 1,
                                                             "part1 KVCache.mask: pads 3, 0, 5 after 2 slots, 4 new"),
    "attention dropout in eval mode too": ("model.py", [("dropout = self.attn_dropout if self.training else 0.0",
                                                         "dropout = self.attn_dropout")], 1,
                                           "part1 attention dropout: eval mode off, train mode on the weights"),
    # part 2
    "scale alpha, not alpha / r": ("lora.py", [("else alpha / rank", "else alpha")], 2, "part2 LoRALinear on q and v"),
    "B starts random, not zero": ("lora.py", [("self.lora_B = nn.Parameter(torch.zeros(out_features, rank))",
                                               "self.lora_B = nn.Parameter(torch.randn(out_features, rank))")], 2,
                                  "part2 LoRALinear on q and v"),
    "LoRA dropout on the frozen path too": ("lora.py", [(
        "        h = F.linear(x, self.weight, self.bias)\n        if self.merged:\n            return h\n"
        "        x = self.dropout(x)\n",
        "        x = self.dropout(x)\n        h = F.linear(x, self.weight, self.bias)\n        if self.merged:\n"
        "            return h\n")], 2, "part2 LoRALinear in train mode, dropout 0.1"),
    "LoRA dropout in eval mode too": ("lora.py", [("x = self.dropout(x)", "x = F.dropout(x, self.config.dropout)")], 2,
                                      "part2 LoRALinear in train mode, dropout 0.1"),
    "LoRA dropout on the update, not its input": ("lora.py", [
        ("        x = self.dropout(x)\n", ""),
        ("delta = self.scale * F.linear(F.linear(x, update.lora_A), update.lora_B)",
         "delta = self.dropout(self.scale * F.linear(F.linear(x, update.lora_A), update.lora_B))")], 2,
        "part2 LoRALinear in train mode, dropout 0.1"),
    # part 3
    "A and B left in fp32 on another dtype": ("lora.py", [
        ("    model.to(device=p.device, dtype=p.dtype)  # A and B where and as the base weights are\n", "")], 3,
        "part3 apply_lora on a float64 model, twice"),
    "a second apply_lora is not refused": ("lora.py", [(
        "    if lora_layers(model):\n        c = config_of(model)\n        raise UserError(f\"this model already has "
        "LoRA layers (rank {c.rank}, targets {list(c.targets)})\")\n", "")], 3,
        "part3 apply_lora on a float64 model, twice"),
    # part 4
    "the prompt is not masked": ("data/e2e/batches.py", [("y[b, :split.prompt_lens[i] - 1] = -1", "y[b, :0] = -1")],
                                 4, "part4 make_batch"),
    "the last prompt token's target masked too": ("data/e2e/batches.py", [(
        "y[b, :split.prompt_lens[i] - 1] = -1", "y[b, :split.prompt_lens[i]] = -1")], 4, "part4 make_batch"),
    "no dropout on the embeddings": ("model.py", [(
        "x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))",
        "x = self.transformer.wte(idx) + self.transformer.wpe(pos)")], 4,
        "part4 forward in train mode: dropout, label smoothing; a full cache"),
    "label smoothing ignored": ("model.py", [(
        "targets[keep], label_smoothing=label_smoothing)", "targets[keep])")], 4,
        "part4 forward in train mode: dropout, label smoothing; a full cache"),
    "the cache's past not counted against block_size": ("model.py", [(
        "if past + T > self.config.block_size:", "if T > self.config.block_size:")], 4,
        "part4 forward in train mode: dropout, label smoothing; a full cache"),
    "a padded row's positions count from its first pad": ("model.py", [(
        "return (slots - self.pad[:B, None]).clamp(min=0)", "return slots.expand(B, T)")], 4,
        "part4 forward, left-padded prompts of 4, 1, 6 then 2 steps"),
    # part 5
    "phi divided by max(i, j)": ("lora_analysis.py", [("** 2 / min(i, j))", "** 2 / max(i, j))")], 5,
                                 "part5 subspace similarity"),
    "i, j out of range not refused": ("lora_analysis.py", [(
        "    if not (1 <= i <= U1.shape[1] and 1 <= j <= U2.shape[1]):\n        raise ValueError(f\"need 1 <= i <= "
        "{U1.shape[1]} and 1 <= j <= {U2.shape[1]}, got i={i}, j={j}\")\n", "")], 5,
        "part5 i, j out of range; the random reference's seed"),
    "the random reference ignores seed": ("lora_analysis.py", [(
        "    g = torch.Generator().manual_seed(seed)\n    random = torch.randn",
        "    g = torch.Generator().manual_seed(0)\n    random = torch.randn")], 5,
        "part5 i, j out of range; the random reference's seed"),
}


def bug_copies():
    """The planted bugs, packed: copy k holds the k-th bug of every part. A part is graded with only its own
    functions taken from the copy (the other parts' are the instructor's), so bugs of different parts in one
    copy are graded as if each were alone; one copy per bug would only make the run longer."""
    copies, seen = {}, {}
    for name, (_, _, part, _) in BUGS.items():
        k = seen[part] = seen.get(part, -1) + 1
        copies.setdefault(f"planted bugs #{k}", []).append(name)
    return copies


COPIES = bug_copies()
COPY_OF = {bug: copy for copy, bugs in COPIES.items() for bug in bugs}

# A correct solution written another way: einsum instead of matmul, other loop orders, other helpers.
ALTERNATIVE = {
    "model.py": {
        "KVCache.store": '''
    def store(self, layer, k, v):
        n = k.shape[2]
        self.k[layer].narrow(2, self.length, n).copy_(k)
        self.v[layer].narrow(2, self.length, n).copy_(v)
        return self.k[layer].narrow(2, 0, self.length + n), self.v[layer].narrow(2, 0, self.length + n)
''',
        "KVCache.mask": '''
    def mask(self, B, T):
        seen = torch.zeros(B, 1, T, self.length + T, dtype=torch.bool)
        for b in range(B):
            first = int(self.pad[b])
            for t in range(T):
                slot = self.length + t
                seen[b, 0, t, (first if slot >= first else 0):slot + 1] = True  # a pad sees the pads up to itself
        return seen.to(self.pad.device)
''',
        "KVCache.positions": '''
    def positions(self, B, T):
        start = self.length - self.pad[:B, None]
        return torch.maximum(start + torch.arange(T, device=start.device), torch.zeros_like(start))
''',
        "CausalSelfAttention.forward": '''
    def forward(self, x, mask=None, cache=None, layer=0):
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = (t.transpose(1, 2) for t in self.c_attn(x).view(B, T, 3, self.n_head, hs).unbind(dim=2))
        if cache is not None:
            k, v = cache.store(layer, k, v)
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(hs)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        weights = F.dropout(weights, self.attn_dropout, self.training)
        y = torch.einsum("bhqk,bhkd->bqhd", weights, v).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))
''',
        "GPT.forward": '''
    def forward(self, idx, targets=None, label_smoothing=0.0, cache=None):
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if T + past > self.config.block_size:
            raise ValueError("too long")
        mask = None
        positions = torch.arange(T, device=idx.device).expand(B, T)
        if cache is not None:
            positions, mask = cache.positions(B, T), cache.mask(B, T)
        h = self.transformer.wte(idx) + self.transformer.wpe(positions)
        h = self.transformer.drop(h)
        for i in range(self.config.n_layer):
            h = self.transformer.h[i](h, mask, cache, i)
        h = self.transformer.ln_f(h)
        if cache is not None:
            cache.length = past + T
        if targets is None:
            return self.lm_head(h), None
        flat = targets.reshape(-1)
        rows = (flat >= 0).nonzero().squeeze(1)
        logits = self.lm_head(h.reshape(B * T, -1).index_select(0, rows))
        loss = F.cross_entropy(logits.float(), flat[rows], label_smoothing=label_smoothing, reduction="sum")
        return logits, loss / rows.numel()
''',
        "GPT.from_pretrained": '''
    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0):
        tensors, shape = hf_checkpoint.read(name_or_path)
        model = cls(GPTConfig(**shape, dropout=dropout))
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for name, param in model.named_parameters():  # lm_head is wte: listed once, stays tied
                source = tensors[name]
                param.copy_(source.T if any(name.endswith(c) for c in conv1d) else source)
        model.name_or_path = str(name_or_path)
        return model
''',
    },
    "lora.py": {
        "scale": '''
def scale(alpha, rank, rslora=False):
    return alpha * rank ** -0.5 if rslora else alpha * (1.0 / rank)
''',
        "LoRAUpdate.__init__": '''
    def __init__(self, in_features, out_features, rank, init="kaiming"):
        super().__init__()
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        if init == "kaiming":
            bound = 1 / math.sqrt(in_features)
            self.lora_A = nn.Parameter(torch.empty(rank, in_features).uniform_(-bound, bound))
        else:
            self.lora_A = nn.Parameter(torch.randn(rank, in_features) / rank)
''',
        "LoRALinear.forward": '''
    def forward(self, x):
        h = x @ self.weight.T
        if self.bias is not None:
            h = h + self.bias
        if self.merged:
            return h
        x = self.dropout(x)
        delta = torch.zeros_like(h)
        for name, update in self.lora.items():
            start, end = self.slices[name]
            ax = torch.einsum("...i,ri->...r", x, update.lora_A)
            delta[..., start:end] = self.scale * torch.einsum("...r,or->...o", ax, update.lora_B)
        return h + delta
''',
        "LoRALinear.merge": '''
    @torch.no_grad()
    def merge(self):
        if not self.merged:
            for name in self.lora:
                start, end = self.slices[name]
                update = self.lora[name]
                delta = torch.einsum("or,ri->oi", update.lora_B.double(), update.lora_A.double()) * self.scale
                self.weight[start:end] = (self.weight[start:end].double() + delta).to(self.weight.dtype)
            self.merged = True
''',
        "LoRALinear.unmerge": '''
    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            for name, update in self.lora.items():
                start, end = self.slices[name]
                delta = (update.lora_B.double() @ update.lora_A.double()) * self.scale
                self.weight[start:end] = (self.weight[start:end].double() - delta).to(self.weight.dtype)
            self.merged = False
''',
        "apply_lora": '''
def apply_lora(model, config=LoRAConfig()):
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("LoRA is on this model already")
    chosen = [t for t in TARGETS if t in set(config.targets)]
    model.requires_grad_(False)
    C = model.config.n_embd
    slices = qkv_slices(C)
    for i in reversed(range(len(model.transformer.h))):
        block = model.transformer.h[i]
        if "mlp" in chosen:
            block.mlp.c_proj = LoRALinear(block.mlp.c_proj, {"mlp": [0, C]}, config)
            block.mlp.c_fc = LoRALinear(block.mlp.c_fc, {"mlp": [0, 4 * C]}, config)
        if "o" in chosen:
            block.attn.c_proj = LoRALinear(block.attn.c_proj, {"o": (0, C)}, config)
        qkv = {t: slices[t] for t in ("q", "k", "v") if t in chosen}
        if qkv:
            block.attn.c_attn = LoRALinear(block.attn.c_attn, qkv, config)
    for update in model.modules():
        if isinstance(update, LoRAUpdate):
            update.to(model.lm_head.weight.dtype)
    return model
''',
    },
    "data/e2e/batches.py": {
        "make_batch": '''
def make_batch(split, indices, pad_to=1):
    examples = []
    for i in indices:
        tokens = torch.from_numpy(split.tokens[split.offsets[i]:split.offsets[i + 1]].astype(np.int64))
        targets = tokens[1:].clone()
        targets[:int(split.prompt_lens[i]) - 1] = -1
        examples.append((tokens[:-1], targets))
    longest = max(len(x) for x, _ in examples)
    T = (longest + pad_to - 1) // pad_to * pad_to
    x = torch.full((len(examples), T), EOT, dtype=torch.long)
    y = torch.full_like(x, -1)
    for row, (inputs, targets) in enumerate(examples):
        x[row, :len(inputs)] = inputs
        y[row, :len(targets)] = targets
    return x, y
''',
    },
    "lora_analysis.py": {
        "subspace_similarity": '''
def subspace_similarity(A1, A2, i, j):
    _, _, vh1 = np.linalg.svd(np.asarray(A1, dtype=np.float64), full_matrices=False)
    _, _, vh2 = np.linalg.svd(np.asarray(A2, dtype=np.float64), full_matrices=False)
    if i < 1 or j < 1 or i > len(vh1) or j > len(vh2):
        raise ValueError("i or j out of range")
    overlap = np.einsum("kd,ld->kl", vh1[:i], vh2[:j])
    return float((overlap ** 2).sum() / min(i, j))
''',
        "projection_norms": '''
def projection_norms(delta, W, r, seed=0):
    W = torch.as_tensor(W, dtype=torch.float64)
    delta = torch.as_tensor(delta, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    random = torch.rand(W.shape, generator=g, dtype=torch.float64) - 0.5

    def projected(M):
        U, _, Vh = torch.linalg.svd(M)
        return torch.einsum("oa,oi,bi->ab", U[:, :r], W, Vh[:r]).norm().item()

    norms = {"w_norm": W.norm().item(), "delta_norm": delta.norm().item()}
    for name, M in (("random", random), ("w", W), ("delta", delta)):
        norms[name] = projected(M)
    norms["amplification"] = norms["delta_norm"] / norms["delta"] if norms["delta"] else math.inf
    return norms
''',
    },
}


def copy_project(dest):
    for file in product_files(ROOT):
        (dest / file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / file, dest / file)
    return dest


def edit(repo, file, old, new):
    text = (repo / file).read_text()
    assert text.count(old) == 1, f"{file} no longer holds {old!r} once: update this test's planted bug"
    (repo / file).write_text(text.replace(old, new))


def plant(repo, bug):
    file, edits, _, _ = BUGS[bug]
    for old, new in edits:
        edit(repo, file, old, new)


def with_functions(repo, functions):
    """repo with whole functions replaced, {file: {qualname: source}}, reindented as the project's are."""
    for file, texts in functions.items():
        text = (repo / file).read_text()
        (repo / file).write_text(splice.transplant(text, {n: t.strip("\n") + "\n" for n, t in texts.items()}, file))
    return repo


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """{repo name: grade report}, one grade run for all, and the result of the starter's own public tests."""
    tmp = tmp_path_factory.mktemp("kit")
    make = subprocess.run([sys.executable, "-m", "assignments.make", str(tmp / "starter")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert make.returncode == 0, make.stderr
    repos = {"project": ROOT, "starter": tmp / "starter"}
    for copy, bugs in COPIES.items():
        repos[copy] = copy_project(tmp / f"bugs{len(repos)}")
        for bug in bugs:
            plant(repos[copy], bug)
    repos["alternative"] = with_functions(copy_project(tmp / "alternative"), ALTERNATIVE)
    repos["syntax error in lora.py"] = copy_project(tmp / "syntax")
    edit(repos["syntax error in lora.py"], "lora.py", "def lora_layers(model):", "def lora_layers(model)")
    repos["endless loop in phi"] = with_functions(copy_project(tmp / "loop"), {"lora_analysis.py": {
        "subspace_similarity": "def subspace_similarity(A1, A2, i, j):\n    while True:\n        pass\n"}})
    # the starter's public tests run alongside the grading
    public = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                              cwd=tmp / "starter", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    report = tmp / "grades.json"
    done = subprocess.run([sys.executable, "-m", "assignments.grade", *map(str, repos.values()), "--json",
                           str(report), "--case-timeout", "3", "--part-timeout", "60"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    public_out, _ = public.communicate(timeout=300)
    reports = dict(zip(repos, json.loads(report.read_text()), strict=True))
    return dict(reports=reports, public=(public.returncode, public_out), starter=tmp / "starter")


def scores(report):
    return {p["part"]: p["score"] for p in report["parts"]}


FULL = {part.number: part.points for part in PARTS}


def test_the_project_scores_full_marks(graded):
    report = graded["reports"]["project"]
    assert scores(report) == FULL, report
    assert report["score"] == report["max_score"] == sum(FULL.values())


def test_the_starter_scores_zero_and_its_public_tests_run_to_the_end(graded):
    report = graded["reports"]["starter"]
    assert scores(report) == {n: 0 for n in FULL}
    for part in report["parts"]:
        assert part["passed"] == 0
        assert all("NotImplementedError" in case["output"] for case in part["cases"].values()), part
    returncode, output = graded["public"]
    n_public = sum(1 for line in output.splitlines() if line.startswith("FAILED"))
    assert returncode == 1 and n_public == len(PUBLIC) and "passed" not in output, output


@pytest.mark.parametrize("bug", list(BUGS))
def test_a_planted_bug_loses_exactly_its_part(graded, bug):
    _, _, lost, case = BUGS[bug]
    report = graded["reports"][COPY_OF[bug]]
    packed = {BUGS[other][2] for other in COPIES[COPY_OF[bug]]}  # one bug per part in each copy
    assert scores(report) == {**FULL, **{n: 0 for n in packed}}
    assert not report["parts"][lost]["cases"][case]["passed"], report["parts"][lost]["cases"]


def test_a_correct_solution_written_differently_scores_full_marks(graded):
    report = graded["reports"]["alternative"]
    assert scores(report) == FULL, [c for p in report["parts"] for c in p["cases"].values() if not c["passed"]]


def test_a_syntax_error_costs_only_the_parts_in_that_file(graded):
    lora_parts = {n for n, part in AUTOGRADED.items() if "lora.py" in part.functions}
    assert lora_parts == {2, 3}
    report = graded["reports"]["syntax error in lora.py"]
    assert scores(report) == {n: 0 if n in lora_parts else p for n, p in FULL.items()}
    assert "lora.py does not parse" in report["parts"][2]["cases"]["part2 LoRALinear on q and v"]["output"]


def test_an_endless_loop_costs_only_its_part(graded):
    report = graded["reports"]["endless loop in phi"]
    assert scores(report) == {**FULL, 5: 0}
    outputs = [c["output"] for c in report["parts"][5]["cases"].values() if not c["passed"]]
    assert outputs and all("longer than" in o or "killed" in o for o in outputs), outputs


def test_gradescope_results_have_gradescopes_schema(graded):
    copy = COPY_OF["the causal mask is off by one"]
    lost = {BUGS[bug][2] for bug in COPIES[copy]}
    results = gradescope(graded["reports"][copy])
    assert results["score"] == sum(p for n, p in FULL.items() if n not in lost)
    assert {"name", "score", "max_score", "output"} <= set(results["tests"][0])
    assert [t["score"] for t in results["tests"][:len(PARTS)]] == [0 if n in lost else p for n, p in FULL.items()]
    json.dumps(results)


def test_the_starter_differs_from_the_project_only_in_the_blanked_bodies(graded):
    starter = graded["starter"]
    for file in part_files():
        project = (ROOT / file).read_text()
        names = [name for part in PARTS for name in part.functions.get(file, [])]
        texts = {name: splice.function_text(project, name) for name in names}
        assert splice.transplant((starter / file).read_text(), texts) == project
    unchanged = [f for f in product_files(ROOT) if f not in part_files()]
    assert all((starter / f).read_bytes() == (ROOT / f).read_bytes() for f in unchanged)
    assert not (starter / "assignments" / "heldout.py").exists()


def test_make_and_grade_refuse_mistakes(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    make = subprocess.run([sys.executable, "-m", "assignments.make", str(tmp_path / "full")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert make.returncode == 1 and make.stderr.startswith("error: ") and "not empty" in make.stderr
    grade = subprocess.run([sys.executable, "-m", "assignments.grade", str(tmp_path), str(tmp_path),
                            "--gradescope", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True,
                           timeout=60)
    assert grade.returncode == 1 and grade.stderr.startswith("error: ") and "exactly one" in grade.stderr
