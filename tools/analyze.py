"""What did LoRA learn? The analyses of Hu et al. (2021), section 7 and appendix H, on trained adapter files.

Two questions, two commands:

    python -m tools.analyze similarity A.safetensors B.safetensors  # 7.2: do two adapters learn the same things?
    python -m tools.analyze deltaw A.safetensors                     # 7.3: how does Delta W relate to W?

The maths (subspace similarity, eq. 4; Delta W against W, Table 7, Figure 8, appendix H) is lora_analysis.py; this
file reads adapter files and base weights, draws the plots (optional: only when matplotlib is installed) and is
the command line.
"""

import argparse
import io
import re
from pathlib import Path

from checkpoints.adapters import read_adapter
from lora import TARGETS
from lora_analysis import (
    expected_random_grid,
    projection_norms,
    random_baseline,
    random_w_similarity,
    similarity_grid,
    top_tenth,
    w_delta_similarity,
)
from model import GPT
from plumbing import files as checkpoint
from plumbing import outputs
from plumbing.errors import UserError, reported
from plumbing.files import removed_on_failure
from plumbing.hf_checkpoint import shape_of

# ----------------------------------------------------------------------------------------------------------
# Delta W of an adapter's tensors (the maths of sections 7.2 and 7.3 is in lora_analysis.py).


def delta_w(tensors, layer, projection, scale):
    """Delta W = scale * B A (out x in, fp32) of one projection in one layer, from an adapter's tensors."""
    prefix = tensor_prefix(layer, projection)
    try:
        A, B = tensors[prefix + ".lora_A"], tensors[prefix + ".lora_B"]
    except KeyError:
        raise UserError(f"the adapter has no update for {projection} in layer {layer}") from None
    return scale * (B.float() @ A.float())


# ----------------------------------------------------------------------------------------------------------
# Adapter files and base weights. Each adapted projection is named by one of PROJECTIONS.

# projection -> (its Linear inside a transformer block, the key of its update inside that LoRALinear)
PROJECTIONS = {
    "q": ("attn.c_attn", "q"), "k": ("attn.c_attn", "k"), "v": ("attn.c_attn", "v"),
    "o": ("attn.c_proj", "o"), "mlp_fc": ("mlp.c_fc", "mlp"), "mlp_proj": ("mlp.c_proj", "mlp"),
}
QKV_ROWS = {"q": 0, "k": 1, "v": 2}  # which third of c_attn's output rows (and weight rows) each one is
LORA_A_NAME = re.compile(r"transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
                         r"\.lora\.(\w+)\.lora_A")


def tensor_prefix(layer, projection):
    """'transformer.h.3.attn.c_attn.lora.q': the adapter tensors' names, less '.lora_A' / '.lora_B'."""
    module, key = PROJECTIONS[projection]
    return f"transformer.h.{layer}.{module}.lora.{key}"


def shape_differences(theirs, ours):
    """'n_embd 64 vs 32, ...' for the shape entries that differ (a PEFT adapter may leave some unknown: None)."""
    return ", ".join(f"{k} {theirs[k]} vs {v}" for k, v in ours.items()
                     if None not in (theirs[k], v) and theirs[k] != v)


def adapted_projections(tensors, path="adapter"):
    """Every (layer, projection) the adapter updates, in layer order then PROJECTIONS order."""
    found = set()
    by_module = {(module, key): name for name, (module, key) in PROJECTIONS.items()}
    for name in tensors:
        if name.endswith(".lora_B"):
            continue
        match = LORA_A_NAME.fullmatch(name)
        if match is None or (match[2], match[3]) not in by_module:
            raise UserError(f"{path} holds a tensor this tool does not know: {name}")
        found.add((int(match[1]), by_module[match[2], match[3]]))
    order = list(PROJECTIONS)
    return sorted(found, key=lambda item: (item[0], order.index(item[1])))


def lora_A(tensors, layer, projection):
    """The r x in matrix A of one projection, fp32."""
    return tensors[tensor_prefix(layer, projection) + ".lora_A"].float()


def base_weight(model, layer, projection):
    """W0 (out x in, fp32) of one projection: for q, k, v their third of the rows of the fused c_attn."""
    module, _ = PROJECTIONS[projection]
    weight = model.transformer.h[layer].get_submodule(module).weight.detach().float()
    if projection in QKV_ROWS:
        C = model.config.n_embd
        start = QKV_ROWS[projection] * C
        weight = weight[start:start + C]
    return weight


def parse_targets(targets):
    """--targets (some of lora.TARGETS, as train.py takes them) -> projection names: 'mlp' is both MLP matrices,
    mlp_fc and mlp_proj; None means all."""
    if targets is None:
        return None
    return [name for target in targets for name in (["mlp_fc", "mlp_proj"] if target == "mlp" else [target])]


def parse_layer(text, n_layer):
    """--layer N or 'all' -> the list of layers to analyse."""
    if text is None or text == "all":
        return list(range(n_layer))
    try:
        layer = int(text)
    except ValueError:
        raise UserError(f"--layer must be a number or 'all', got {text!r}") from None
    if not 0 <= layer < n_layer:
        raise UserError(f"--layer {layer} does not exist: the model has layers 0..{n_layer - 1}")
    return [layer]


def select(pairs, layers, targets):
    """The (layer, projection) pairs asked for; a one-line error if a requested projection was not adapted."""
    if targets is not None:
        missing = sorted(set(targets) - {p for _, p in pairs})
        if missing:
            raise UserError(f"the adapter has no updates on {', '.join(missing)}")
    chosen = [(layer, p) for layer, p in pairs if layer in layers and (targets is None or p in targets)]
    if not chosen:
        raise UserError("nothing to analyse: no adapted projection in the chosen layers")
    return chosen


# ----------------------------------------------------------------------------------------------------------
# Plots: only when matplotlib is installed. Each PNG is rendered into memory, then written atomically.

PLOT_HINT = "(tables only: pip install matplotlib for the heatmaps)"


def plot_paths_free(args, kind, chosen):
    """True; a one-line error, before any work, if a heatmap would replace an earlier one without --force."""
    outputs.check_folder(args.out, [f"{kind}_layer{layer}_{proj}.png" for layer, proj in chosen], args.force)
    return True


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_heatmaps(path, title, panels, xlabel, ylabel):
    """One PNG of side-by-side heatmaps, panels = [(subtitle, 2-D array with rows i and columns j)].

    Rows are drawn top to bottom from i = 1 and columns left to right from j = 1, colours from 0 to 1.
    """
    # A Figure drawn by the Agg backend straight into memory: no display, no pyplot and its global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(4.2 * len(panels), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (subtitle, grid) in zip(axes, panels, strict=True):
        rows, cols = grid.shape
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest",
                          extent=(0.5, cols + 0.5, rows + 0.5, 0.5))
        ax.set_title(subtitle, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # i and j count directions: whole numbers
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="phi")
    fig.suptitle(title, fontsize=10)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    with checkpoint.atomic_write(path) as f:
        f.write(buffer.getvalue())
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# The command line.


def run_similarity(args):
    """Section 7.2 on two adapter files: a table of phi per layer and projection, and heatmaps."""
    tensors1, info1 = read_adapter(args.adapter1)  # our file or a PEFT folder, under our names
    tensors2, info2 = read_adapter(args.adapter2)
    differ = shape_differences(info1.shape, info2.shape)
    if differ:
        raise UserError(f"the two adapters are for models of different shapes ({differ})")
    if info1.base_model != info2.base_model:
        print(f"note: the adapters were trained from different base models ({info1.base_model} and "
              f"{info2.base_model})")
    pairs1 = adapted_projections(tensors1, args.adapter1)
    pairs2 = set(adapted_projections(tensors2, args.adapter2))
    shared = [pair for pair in pairs1 if pair in pairs2]
    if not shared:
        raise UserError("the two adapters update no projection in common")
    chosen = select(shared, parse_layer(args.layer, info1.shape["n_layer"]), parse_targets(args.targets))
    plots = have_matplotlib() and plot_paths_free(args, "similarity", chosen)
    r1, r2 = info1.lora.rank, info2.lora.rank
    m = min(r1, r2)
    print(f"subspace similarity phi (Hu et al. 2021, eq. 4) between the A matrices of\n"
          f"  1: {args.adapter1} (r={r1})\n  2: {args.adapter2} (r={r2})\n"
          f"mean over i, j <= {m}; 'random' is its expected value for unrelated subspaces, max(i, j) / d")
    print(f"{'layer':>5} {'proj':>8} {'r1':>4} {'r2':>4} {'phi(1,1)':>9} {'mean phi':>9} {'random':>9}")
    for layer, projection in chosen:
        A1, A2 = lora_A(tensors1, layer, projection), lora_A(tensors2, layer, projection)
        grid = similarity_grid(A1, A2)
        expected = expected_random_grid(m, m, A1.shape[1])
        print(f"{layer:>5} {projection:>8} {A1.shape[0]:>4} {A2.shape[0]:>4} {grid[0, 0]:>9.4f} "
              f"{grid[:m, :m].mean():>9.4f} {expected.mean():>9.4f}")
        if plots:
            path = Path(args.out) / f"similarity_layer{layer}_{projection}.png"
            save_heatmaps(path, f"layer {layer}, W{projection}: phi(A_r={r1}, A_r={r2}, i, j)",
                          [("adapters", grid), ("random Gaussian", random_baseline(A1, A2, seed=layer))],
                          xlabel=f"j (adapter 2, r={r2})", ylabel=f"i (adapter 1, r={r1})")
            print(f"wrote {path}")
    if not plots:
        print(PLOT_HINT)


def run_deltaw(args):
    """Section 7.3 on one adapter file and its base model: Table 7 per projection, and Figure-8 heatmaps."""
    tensors, info = read_adapter(args.adapter)
    chosen = select(adapted_projections(tensors, args.adapter), parse_layer(args.layer, info.shape["n_layer"]), None)
    name = args.model or info.base_model
    model = GPT.from_pretrained(name)
    differ = shape_differences(info.shape, shape_of(model.config))
    if differ:
        raise UserError(f"{args.adapter} does not fit the model {name} ({differ})")
    r, scale = info.lora.rank, info.lora.scale
    plots = have_matplotlib() and plot_paths_free(args, "deltaw", chosen)
    print(f"Delta W = {scale:g} * B A of {args.adapter} (r={r}) against W of {name}\n"
          f"||U^T W V^T||_F: W projected on the top-{r} singular vectors U, V of Delta W / W / a random "
          f"matrix (Table 7)\n"
          f"amplification = ||Delta W||_F / ||U^T W V^T||_F with U, V from Delta W (appendix H.4)\n"
          f"phi W10%: phi between W's top-10% and Delta W's top-{r} left singular directions (Figure 8);\n"
          f"  'rand' is its value for unrelated directions, max(10% of k, r) / out, k = min(out, in)")
    print(f"{'layer':>5} {'proj':>8} {'||dW||_F':>10} {'||W||_F':>10} {'U,V: dW':>10} {'U,V: W':>10} "
          f"{'U,V: rand':>10} {'amplif.':>9} {'phi W10%':>9} {'rand':>7}")
    zero = []
    for layer, projection in chosen:
        delta = delta_w(tensors, layer, projection, scale)
        W = base_weight(model, layer, projection)
        norms = projection_norms(delta, W, r, seed=layer)
        if norms["delta_norm"] == 0:
            zero.append(f"{layer}/{projection}")
        grid = w_delta_similarity(W, delta, r)
        ten = top_tenth(W)
        print(f"{layer:>5} {projection:>8} {norms['delta_norm']:>10.4f} {norms['w_norm']:>10.4f} "
              f"{norms['delta']:>10.4f} {norms['w']:>10.4f} {norms['random']:>10.4f} "
              f"{norms['amplification']:>9.2f} {grid[ten - 1, r - 1]:>9.4f} {max(ten, r) / W.shape[0]:>7.4f}")
        if plots:
            path = Path(args.out) / f"deltaw_layer{layer}_{projection}.png"
            title = f"layer {layer}, W{projection}: phi(W top-i, Delta W top-j), left singular vectors"
            save_heatmaps(path, title,
                          [(f"Delta W (r={r})", grid), ("random", random_w_similarity(W, r, seed=layer))],
                          xlabel="j (Delta W)", ylabel="i (W)")
            print(f"wrote {path}")
    if zero:
        print(f"note: Delta W is zero at {', '.join(zero)} (B = 0: an untrained adapter?)")
    if not plots:
        print(PLOT_HINT)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    sim = commands.add_parser("similarity", help="phi between two adapters' A matrices (section 7.2)")
    sim.add_argument("adapter1", help="adapter file (.safetensors written by train.py) or PEFT folder")
    sim.add_argument("adapter2", help="a second adapter file of the same base model")
    sim.add_argument("--layer", default="all", help="a layer number, or 'all' (default)")
    sim.add_argument("--targets", "--target", nargs="+", choices=TARGETS, default=None,
                     help="which projections, as train.py's --targets (default: all in both adapters)")
    sim.add_argument("--out", default="analysis", help="folder for the PNG heatmaps (default: analysis)")
    sim.add_argument("--force", action="store_true", help="replace heatmaps written before (default: refuse)")
    sim.set_defaults(run=run_similarity)
    dw = commands.add_parser("deltaw", help="Delta W against W: Table 7 and Figure 8 (section 7.3)")
    dw.add_argument("adapter", help="adapter file (.safetensors written by train.py) or PEFT folder")
    dw.add_argument("--model", default=None,
                    help="base model name or path (default: the base model named in the adapter)")
    dw.add_argument("--layer", default="all", help="a layer number, or 'all' (default)")
    dw.add_argument("--out", default="analysis", help="folder for the PNG heatmaps (default: analysis)")
    dw.add_argument("--force", action="store_true", help="replace heatmaps written before (default: refuse)")
    dw.set_defaults(run=run_deltaw)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    with reported(), removed_on_failure(args.out):  # a heatmap folder made for a run that fails goes
        args.run(args)


if __name__ == "__main__":
    main()
