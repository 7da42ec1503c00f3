"""Pictures of a training run and of a sweep (matplotlib is optional: without it, a one-line error says how to get it).

    python -m tools.plot out                       # out/loss.png: training and dev loss, and the learning rate
    python -m tools.plot out --out run.pdf --force # another file (.png, .pdf or .svg), replacing an earlier one

A run folder is what train.py writes: log.jsonl has one line per optimizer step, {"step", "loss", "lr",
"tokens_per_s"}, and "val_loss" on the steps where the dev loss was measured. A sweep (tools/sweep.py) calls
sweep_figure_beside() to draw its table next to table.md: Table 18 as dev loss and BLEU against the rank, Tables 5
and 6 as bars per target set.

Every drawing function returns (path, series): series is {label: (xs, ys)} read back from the figure's Axes after
drawing (each line's data, each bar's height with its tick label), so a test can check the numbers a picture
shows against the numbers it came from. Figures are drawn by the Agg backend into memory (no display, no pyplot
state) and written atomically.
"""

import argparse
import io
import json
from pathlib import Path

from plumbing import outputs
from plumbing.errors import UserError, reported
from plumbing.files import atomic_write

INSTALL = "pip install matplotlib"
FORMATS = ("png", "pdf", "svg")
RUN_FIGURE = "loss.png"  # in the run folder, unless --out
SWEEP_FIGURE = "figure.png"  # beside the sweep's table.md and table.csv


def have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def require_matplotlib(what):
    if not have_matplotlib():
        raise UserError(f"matplotlib is not installed, and {what} needs it: {INSTALL}")


def check_out(path, force):
    """The output path, refused before any work if it is not a picture format, or by plumbing.outputs.check_file
    (a folder, a place that cannot be written, a file it would replace without --force)."""
    path = Path(path)
    if not path.is_dir() and path.suffix.lower().lstrip(".") not in FORMATS:
        raise UserError(f"{path}: the picture's name must end in {', '.join('.' + f for f in FORMATS)}")
    outputs.check_file(path, force)
    return path


# ----------------------------------------------------------------------------------------------------------
# A training run.


def read_log(run):
    """The lines of run/log.jsonl (a list of dicts with step, loss, lr, maybe val_loss); a one-line error if the
    folder holds no log, or one that is empty or damaged."""
    path = Path(run) / "log.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: give a folder that train.py wrote (its --out)")
    lines = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON line (is the file damaged?)") from None
        if not isinstance(line, dict) or not {"step", "loss", "lr"} <= line.keys():
            raise UserError(f"{path}:{number}: a log line needs step, loss and lr")
        lines.append(line)
    if not lines:
        raise UserError(f"{path} is empty: the run has not finished a step yet")
    return lines


def run_series(log):
    """{label: (steps, values)} of a log: the training loss and learning rate at every step, the dev loss where
    it was measured."""
    dev = [line for line in log if "val_loss" in line]
    return {"training loss": ([line["step"] for line in log], [line["loss"] for line in log]),
            "dev loss": ([line["step"] for line in dev], [line["val_loss"] for line in dev]),
            "learning rate": ([line["step"] for line in log], [line["lr"] for line in log])}


def plot_run(run, out=None, force=False):
    """Draw run/log.jsonl: the training loss per step and the dev loss where measured (top), the learning rate
    (bottom), into `out` (run/loss.png by default). Returns (path, series drawn)."""
    require_matplotlib("tools.plot")
    path = check_out(Path(run) / RUN_FIGURE if out is None else out, force)
    series = run_series(read_log(run))
    fig = new_figure(figsize=(7.0, 5.0))
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    steps, loss = series["training loss"]
    loss_ax.plot(steps, loss, color="tab:blue", linewidth=0.8, alpha=0.8, label="training loss")
    if series["dev loss"][0]:
        loss_ax.plot(*series["dev loss"], color="tab:orange", marker="o", markersize=4, label="dev loss")
    loss_ax.set_ylabel("loss (per target token)")
    loss_ax.set_title(f"{Path(run).resolve().name}: {steps[-1]:,} steps", fontsize=10)
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)
    lr_ax.plot(*series["learning rate"], color="tab:green", label="learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lr_ax.grid(alpha=0.3)
    return save(fig, path)


# ----------------------------------------------------------------------------------------------------------
# A sweep's table (rows as tools/sweep.py makes them: setting, targets, rank, ..., val_loss, BLEU in [0, 1]).


def sweep_figure(rows, kind, path):
    """The sweep's picture: for a rank sweep (kind "ranks", Table 18) the dev loss and BLEU against r, for a target
    sweep ("targets", Tables 5 and 6) one bar per setting. BLEU is drawn x100, as the paper prints it; its panel
    is left out when the sweep did not evaluate. Returns (path, series drawn)."""
    require_matplotlib("the sweep's figure")
    if not rows:
        raise UserError("the sweep has no rows to draw")
    path = Path(path)
    panels = [("val_loss", "dev loss")] + ([("BLEU", "BLEU x100")] if any(r.get("BLEU") is not None for r in rows)
                                           else [])
    fig = new_figure(figsize=(4.2 * len(panels), 3.8))
    for ax, (column, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        kept = [r for r in rows if r.get(column) is not None]
        values = [100 * r[column] if column == "BLEU" else r[column] for r in kept]
        if kind == "ranks":
            ax.plot([r["rank"] for r in kept], values, marker="o", label=label)
            ax.set_xscale("log", base=2)  # the paper's ranks double: 1, 2, 4, 8, ...
            ax.set_xticks([r["rank"] for r in kept], [str(r["rank"]) for r in kept])
            ax.set_xlabel(f"rank r (on {rows[0]['targets']})")
        else:
            bars = ax.bar(range(len(kept)), values, width=0.6, label=label)
            ax.bar_label(bars, fmt="%.1f" if column == "BLEU" else "%.3f", fontsize=8)  # differences can be small
            ax.set_xticks(range(len(kept)), [f"{r['targets']} r={r['rank']}" for r in kept], rotation=30,
                          ha="right")
            ax.set_xlabel("adapted weights and rank")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y" if kind != "ranks" else "both")
        if column == "BLEU":  # in points from 0, at least 0 to 1: less than a point apart is not a difference
            ax.set_ylim(0, max([1.0, *values]) * 1.08)
    fig.suptitle("LoRA rank sweep (Table 18)" if kind == "ranks" else "LoRA target sweep (Tables 5, 6)",
                 fontsize=10)
    return save(fig, path)


def sweep_figure_beside(folder, rows, kind):
    """Write the sweep's figure beside its tables, or say once how to get it. Returns its path, or None."""
    if not have_matplotlib():
        print(f"(no figure: {INSTALL} for {Path(folder) / SWEEP_FIGURE})")
        return None
    path, _ = sweep_figure(rows, kind, Path(folder) / SWEEP_FIGURE)
    print(f"figure: {path}")
    return path


# ----------------------------------------------------------------------------------------------------------
# Drawing and saving.


def new_figure(figsize):
    """A matplotlib Figure on the Agg canvas (drawn into memory: no display, no pyplot and its global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def drawn(fig):
    """{label: (xs, ys)} of what the figure's Axes show: each labelled line's data, and each labelled bar
    series as (tick labels under the bars, bar heights)."""
    series = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                series[line.get_label()] = ([float(x) for x in line.get_xdata()],
                                            [float(y) for y in line.get_ydata()])
        for bars in ax.containers:
            ticks = {round(float(t)): label.get_text() for t, label in zip(ax.get_xticks(), ax.get_xticklabels(),
                                                                             strict=True)}
            series[bars.get_label()] = ([ticks.get(round(b.get_x() + b.get_width() / 2)) for b in bars],
                                        [float(b.get_height()) for b in bars])
    return series


def save(fig, path):
    """Render the figure into memory in the format of path's suffix, then write it atomically; (path, drawn)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lower().lstrip("."), dpi=100)
    series = drawn(fig)  # after savefig: the tick labels are laid out
    with atomic_write(path) as f:
        f.write(buffer.getvalue())
    return path, series


# ----------------------------------------------------------------------------------------------------------
# The command line.


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.plot", description="Draw a training run's loss and dev-loss "
                                "curves with its learning rate, from the run folder's log.jsonl (needs matplotlib: "
                                f"{INSTALL}).")
    p.add_argument("run", type=Path, help="the run folder (train.py's --out)")
    p.add_argument("--out", type=Path, default=None, help=f"the picture to write, .png, .pdf or .svg (default: "
                   f"RUN/{RUN_FIGURE})")
    p.add_argument("--force", action="store_true", help="replace the picture if it exists (default: refuse)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with reported():
        path, series = plot_run(args.run, args.out, args.force)
    steps, dev = series["training loss"][0], series["dev loss"][1]
    last = f", last dev loss {dev[-1]:.4f}" if dev else ""
    print(f"wrote {path}: {int(steps[-1]):,} steps{last}")
    return path, series


if __name__ == "__main__":
    main()
