"""A training run's report: DIR/report.html (self-contained) and DIR/plots/*.png (drawn by
dpo_jax.plots).

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
import json
import os
import re
import sys

from dpo_jax import faults, metrics_log, plots
from dpo_jax.plots import SAMPLE_RATES

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
    figures = plots.make_plots(rows)
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
