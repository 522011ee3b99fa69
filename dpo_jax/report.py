"""A training run's report: DIR/report.html (self-contained) and DIR/plots/*.png.

    python -m dpo_jax.report runs/tiny

Reads DIR/metrics.jsonl (train rows and eval/ rows), DIR/samples.jsonl (policy next to
reference replies, when present), DIR/eval_<step>.json (from dpo_jax.evaluate, when present)
and DIR/config.json. Train and eval series of a metric share one plot; an eval set other
than the default one logs as eval/<set>/<metric> and gets its own line.

Every text read from those files (prompts, replies, metric and set names, steps, config
values, the path) is HTML-escaped where it lands in the page: replies are model output.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import glob
import html
import io
import json
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dpo_jax import faults, metrics_log  # noqa: E402

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
MAX_SAMPLE_ROWS = 50  # of the last sampled step, in the HTML table
SUMMARY_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
)


# --------------------------------------------------------------------------- reading


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a run killed mid-write) is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


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


# --------------------------------------------------------------------------- plotting


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


# ------------------------------------------------------------------------------ HTML


def _fmt(value) -> str:
    """A table cell's HTML; anything but a number is escaped (replies are model output)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def table(header: list[str], body: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in body)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def summary_section(rows: list[dict]) -> str:
    """The last train row and the last eval row, side by side."""
    last_train = next((r for r in reversed(rows) if "loss" in r), None)
    last_eval = next((r for r in reversed(rows) if "eval/loss" in r), None)
    if last_train is None and last_eval is None:
        return "<p>No metrics yet.</p>"
    header = ["metric"]
    if last_train:
        header.append(f"train (step {last_train['step']})")
    if last_eval:
        header.append(f"eval (step {last_eval['step']})")
    body = []
    for metric in SUMMARY_METRICS:
        row = [metric]
        if last_train:
            row.append(last_train.get(metric, "—"))
        if last_eval:
            row.append(last_eval.get(f"eval/{metric}", "—"))
        body.append(row)
    return table(header, body)


def run_section(rows: list[dict]) -> str:
    """How the run went as a whole: steps, wall time, pace, utilisation, memory. Means skip
    the first logged step (it includes compilation) unless it is the only one."""
    train = [r for r in rows if "loss" in r]
    if not train:
        return ""
    paced = train[1:] or train

    def mean(key):
        values = [r[key] for r in paced if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else "—"

    times = [r["time"] for r in train if isinstance(r.get("time"), (int, float))]
    wall = "—"
    if len(times) > 1:
        wall = metrics_log.clock_time(times[-1] - times[0])
    memory = [r["memory/peak_gb"] for r in train if "memory/peak_gb" in r]
    body = [
        ["steps trained", train[-1]["step"] + 1],
        [f"wall time, step {train[0]['step']} to {train[-1]['step']}", wall],
        ["mean tokens/s", mean("tokens_per_sec")],
        ["mean pairs/s", mean("pairs_per_sec")],
        ["mean MFU", mean("mfu")],
        ["peak device memory (GiB)", max(memory) if memory else "not measured (CPU)"],
    ]
    return f"<h2>Run</h2>{table(['', 'value'], body)}"


def sample_rates_section(rows: list[dict]) -> str:
    rates = [r for r in rows if any(k.startswith(SAMPLE_RATES) for k in r)]
    if not rates:
        return ""
    keys = sorted({k for r in rates for k in r if k.startswith(SAMPLE_RATES)})
    body = [[r["step"]] + [r.get(k, "—") for k in keys] for r in rates]
    header = ["step"] + [k[len(SAMPLE_RATES) :] for k in keys]
    return "<h2>Preferred property of sampled replies</h2>" + table(header, body)


SIDES = ("reference", "policy")


def samples_section(samples: list[dict]) -> str:
    if not samples:
        return ""
    steps = sorted({s.get("step", 0) for s in samples})
    parts = ["<h2>Samples</h2>"]
    # Per step: how often each side's reply has the preferred property (when checked).
    checked = [s for s in samples if "policy_preferred" in s or "reference_preferred" in s]
    if checked:
        body = []
        for step in steps:
            at = [s for s in checked if s.get("step", 0) == step]
            if not at:
                continue
            rates = [sum(bool(s.get(f"{side}_preferred")) for s in at) / len(at) for side in SIDES]
            body.append([step, len(at), *rates])
        parts.append(table(["step", "prompts", "reference preferred", "policy preferred"], body))
    last = [s for s in samples if s.get("step", 0) == steps[-1]]
    shown = last[:MAX_SAMPLE_ROWS]
    total = f" (all steps: {len(samples)} rows in samples.jsonl)" if len(steps) > 1 else ""
    step = html.escape(str(steps[-1]))  # samples.jsonl is only trusted to be JSON
    parts.append(f"<p>Step {step}: {len(shown)} of {len(last)} prompts{total}.</p>")
    body = [
        [
            s.get("prompt", ""),
            s.get("reference", ""),
            s.get("reference_preferred", "—"),
            s.get("policy", ""),
            s.get("policy_preferred", "—"),
        ]
        for s in shown
    ]
    parts.append(table(["prompt", "reference", "pref.", "policy", "pref."], body, cls="samples"))
    return "".join(parts)


def evaluations_section(workdir: str) -> str:
    """Tables of DIR/eval_<step>.json files written by dpo_jax.evaluate."""
    found = []
    for path in glob.glob(os.path.join(workdir, "eval_*.json")):
        if re.fullmatch(r"eval_\d+\.json", os.path.basename(path)):
            try:
                with open(path) as f:
                    found.append(json.load(f))
            except (OSError, json.JSONDecodeError):
                continue
    if not found:
        return ""
    parts = ["<h2>Evaluations (dpo_jax.evaluate)</h2>"]
    metrics = (*SUMMARY_METRICS, "logratio/chosen", "logratio/rejected")
    for result in sorted(found, key=lambda r: r.get("step", 0)):
        sets = result.get("sets", {})
        header = ["metric"] + [f"{name} ({s.get('pairs', '?')} pairs)" for name, s in sets.items()]
        body = [[m] + [s.get("metrics", {}).get(m, "—") for s in sets.values()] for m in metrics]
        step = html.escape(str(result.get("step", "?")))  # a hand-edited file may hold any text
        parts.append(f"<h3>step {step}</h3>" + table(header, body))
    return "".join(parts)


def _data_set_rows(name: str, report: dict) -> list[list]:
    """One row per source of a data set: records read, pairs kept, what was cut or dropped."""
    rows = []
    for source in report.get("sources", []):
        lost = {
            f"{kind} {reason}": count
            for kind in ("truncated", "dropped", "skipped")
            for reason, count in source.get(kind, {}).items()
        }
        rows.append(
            [
                name,
                os.path.basename(str(source.get("source", ""))),
                source.get("format", ""),
                source.get("records", ""),
                source.get("pairs", ""),
                ", ".join(f"{k}: {v}" for k, v in lost.items()) or "none",
            ]
        )
    return rows


def data_section(workdir: str) -> str:
    """What the run trained and evaluated on (DIR/data_report.json): pairs per source and
    what was cut, token lengths, and how the batches were laid out."""
    path = os.path.join(workdir, "data_report.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        report = json.load(f)
    sets = {"train": report.get("train", {})}
    sets |= {f"eval {name or 'validation'}": r for name, r in report.get("validation", {}).items()}
    sources = [row for name, r in sets.items() for row in _data_set_rows(name, r)]
    parts = [
        "<h2>Data</h2>",
        table(["set", "file", "format", "records", "pairs", "truncated / dropped"], sources),
    ]
    lengths = [
        [name, side] + [r["lengths"][side].get(q, "") for q in ("p50", "p90", "p99", "max")]
        for name, r in sets.items()
        for side in ("prompt", "chosen", "rejected", "sequence")
        if side in r.get("lengths", {})
    ]
    if lengths:
        parts.append(table(["set", "tokens of", "p50", "p90", "p99", "max"], lengths))
    batching = report.get("batching", {})
    if batching:
        shown = {k: v for k, v in batching.items() if not isinstance(v, (dict, list))}
        for key in ("pairs_per_step", "tokens_per_step"):
            if key in batching:
                shown[key] = ", ".join(f"{k} {v}" for k, v in batching[key].items())
        if "total_steps" in report:
            shown["total_steps"] = report["total_steps"]
        parts.append(table(["batching", "value"], [[k, v] for k, v in shown.items()]))
    return "".join(parts)


def config_section(workdir: str) -> str:
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        text = f.read()
    return "<details><summary>config.json</summary><pre>" + html.escape(text) + "</pre></details>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1350px; color: #222; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(620px, 1fr)); gap: 1em; }
figure { margin: 0; } figure img { width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } table.samples td { max-width: 28em; white-space: pre-wrap; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.8em; }
"""


def render_html(workdir: str, rows: list[dict], samples: list[dict], figures) -> str:
    title = f"DPO run report — {os.path.basename(os.path.abspath(workdir))}"
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(caption)}'
        f" (plots/{html.escape(name)}.png)</figcaption></figure>"
        for name, caption, png in figures
    )
    generated = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
        f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(os.path.basename(os.path.abspath(workdir)))} · generated {generated} · "
        f"{sum('loss' in r for r in rows)} train rows, {sum('eval/loss' in r for r in rows)} "
        "eval rows in metrics.jsonl</p>"
        f"<h2>Summary</h2>{summary_section(rows)}{run_section(rows)}"
        f"{sample_rates_section(rows)}"
        f'<h2>Curves</h2><div class="plots">{images or "<p>No metrics to plot.</p>"}</div>'
        f"{evaluations_section(workdir)}{samples_section(samples)}{data_section(workdir)}"
        f"{config_section(workdir)}"
        "</body></html>"
    )


def write_report(workdir: str) -> str:
    """Writes DIR/plots/*.png and DIR/report.html from the run's files; returns the HTML path."""
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    samples = read_jsonl(os.path.join(workdir, "samples.jsonl"))
    figures = make_plots(rows)
    plots_dir = os.path.join(workdir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    for name, _, png in figures:
        with open(os.path.join(plots_dir, f"{name}.png"), "wb") as f:
            f.write(png)
    path = os.path.join(workdir, "report.html")
    # Write then rename: a browser never sees half a report.
    try:
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            faults.write(f, render_html(workdir, rows, samples, figures), "report")
    except OSError:
        os.remove(path + ".tmp")  # a full disk: the previous report stays
        raise
    os.replace(path + ".tmp", path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_jax.report", description="Write DIR/report.html and DIR/plots/."
    )
    parser.add_argument("workdir", help="training run directory (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.workdir, "metrics.jsonl")):
        raise SystemExit(f"error: {args.workdir}/metrics.jsonl not found; not a training workdir?")
    print(f"wrote {write_report(args.workdir)}")


if __name__ == "__main__":
    main(sys.argv[1:])
