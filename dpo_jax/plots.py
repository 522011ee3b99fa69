"""The report's figures: DIR/plots/*.png, one per entry of PLOTS, from metrics.jsonl's rows.
Train and eval series of a metric share one figure (panels where their scales differ); an
eval set other than the default one gets its own line; the sampled replies' rates get one
figure of their own."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

# (file stem, title, metrics drawn together, y-axis scale: linear | log | fraction (0..1))
PLOTS = (
    ("loss", "Total loss (what is minimised)", ("loss",), "linear"),
    (
        "preference_loss",
        "Preference loss alone (ln 2 = 0.693 at the start)",
        ("preference_loss",),
        "linear",
    ),
    ("sft_loss", "SFT loss (NLL of the chosen reply)", ("sft_loss",), "linear"),
    ("accuracy", "Reward accuracy (chosen reward > rejected)", ("rewards/accuracies",), "fraction"),
    ("margins", "Reward margin (chosen − rejected)", ("rewards/margins",), "linear"),
    ("rewards", "Rewards β·log π/π_ref", ("rewards/chosen", "rewards/rejected"), "linear"),
    ("logps", "Policy log-probs of the completions", ("logps/chosen", "logps/rejected"), "linear"),
    ("learning_rate", "Learning rate", ("learning_rate",), "linear"),
    ("grad_norm", "Gradient norm (before clipping)", ("grad_norm",), "linear"),
    ("tokens_per_sec", "Throughput (tokens/s)", ("tokens_per_sec",), "log"),
    ("mfu", "Model FLOPs utilisation", ("mfu",), "fraction"),
    ("memory", "Peak device memory (GiB)", ("memory/peak_gb",), "linear"),
)
SAMPLE_RATES = "eval/samples/"


def series(rows: list[dict], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """{label: (steps, values)} of `metric`: "train" for the bare key, "eval" for eval/<metric>,
    "eval/<set>" for eval/<set>/<metric>."""
    found: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        if "step" not in row:
            continue
        for key, value in row.items():
            if key == metric:
                label = "train"
            elif key.startswith("eval/") and key.endswith("/" + metric):
                middle = key[len("eval/") : -len(metric) - 1]
                if middle.startswith("samples"):
                    continue
                label = "eval" if not middle else f"eval/{middle}"
            else:
                continue
            if not isinstance(value, (int, float)) or value != value:  # NaN: a gap
                continue
            steps, values = found.setdefault(label, ([], []))
            steps.append(int(row["step"]))
            values.append(float(value))
    return found


def sample_rate_series(rows: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    found: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key.startswith(SAMPLE_RATES) and isinstance(value, (int, float)):
                steps, values = found.setdefault(key[len(SAMPLE_RATES) :], ([], []))
                steps.append(int(row["step"]))
                values.append(float(value))
    return found


SPLIT_COLORS = {"train": "tab:blue", "eval": "tab:orange"}  # other eval sets: the cycle
SIDE_COLORS = {"chosen": "tab:green", "rejected": "tab:red"}
EXTRA_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")


def legend_order(lines) -> list[str]:
    """Train first, then eval, then other eval sets: the order legends and panels read in."""
    return sorted(lines, key=lambda k: (not k.startswith("train"), k != "eval", k))


def panels(lines: dict[str, tuple[list[int], list[float]]], scale: str) -> list[list[str]]:
    """The labels drawn on each panel: one panel, or one per split (train, eval, eval/<set>)
    when sharing an axis would squash each split's own curve into less than a third of it
    (train vs eval log-probs of a memorising model: -7 vs -156)."""
    order = legend_order(lines)
    splits: dict[str, list[str]] = {}
    for label in order:
        splits.setdefault(label.split(" ")[0], []).append(label)
    if len(splits) < 2 or scale != "linear":
        return [order]
    values = {
        split: [v for label in group for v in lines[label][1]] for split, group in splits.items()
    }
    everything = [v for group in values.values() for v in group]
    floor = 0.05 * max(abs(v) for v in everything)  # a flat or one-point curve still has a size
    own = max(max(max(group) - min(group), floor) for group in values.values())
    shared = max(everything) - min(everything)
    return list(splits.values()) if shared > 3 * own else [order]


def plot(
    title: str,
    lines: dict[str, tuple[list[int], list[float]]],
    scale: str = "linear",
    colors: dict[str, str] | None = None,
) -> bytes:
    """PNG bytes of one figure: one line per label; train solid, eval dashed with markers;
    splits whose scales differ get panels side by side."""
    groups = panels(lines, scale) if lines else [[]]
    fig, axes = plt.subplots(
        1, len(groups), figsize=(6.4, 3.6), dpi=100, squeeze=False, sharex=True
    )  # panels side by side keep one step axis
    order = legend_order(lines)
    for ax, group in zip(axes[0], groups, strict=True):
        for label in group:
            steps, values = lines[label]
            is_eval = label.startswith("eval")
            ax.plot(
                steps,
                values,
                label=label,
                color=(colors or {}).get(
                    label, EXTRA_COLORS[order.index(label) % len(EXTRA_COLORS)]
                ),
                # a sparse series (one eval, one sampled step) must still show as points
                marker="o" if is_eval or len(steps) <= 12 else None,
                markersize=4,
                linewidth=1.8 if is_eval else 1.4,
                linestyle="--" if is_eval else "-",
            )
        if scale == "log" and all(v > 0 for label in group for v in lines[label][1]):
            ax.set_yscale("log")
        elif scale == "fraction":
            ax.set_ylim(-0.03, 1.03)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if group:
            ax.legend(fontsize=8)
    if len(groups) > 1:
        fig.suptitle(f"{title} (own scale per panel)", fontsize=11)
    else:
        axes[0][0].set_title(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def make_plots(rows: list[dict]) -> list[tuple[str, str, bytes]]:
    """[(file stem, title, PNG)] of every plot that has data."""
    figures = []
    for stem, title, metrics, scale in PLOTS:
        lines, colors = {}, {}
        for metric in metrics:
            side = metric.split("/")[-1]
            for label, data in series(rows, metric).items():
                # Two metrics on one axis: "train chosen", "eval rejected", ...
                name = label if len(metrics) == 1 else f"{label} {side}"
                lines[name] = data
                color = SIDE_COLORS.get(side) if len(metrics) > 1 else SPLIT_COLORS.get(label)
                if color and (label in SPLIT_COLORS):
                    colors[name] = color
        if stem == "sft_loss" and not any(v for _, values in lines.values() for v in values):
            continue  # no SFT term in this run
        if lines:
            figures.append((stem, title, plot(title, lines, scale, colors)))
    if rates := sample_rate_series(rows):
        title = "Sampled replies with the preferred property"
        colors = {k: "tab:green" if "policy" in k else "tab:gray" for k in rates}
        figures.append(("samples_preferred_rate", title, plot(title, rates, "fraction", colors)))
    return figures
