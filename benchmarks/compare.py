"""Side-by-side table of benchmark JSON lines (dpo_jax.bench and benchmarks/trl_dpo.py).

    python benchmarks/compare.py results.jsonl [more.jsonl ...]

Each input line is either a bare JSON result or {"case": NAME, "command": ..., "result": {...}}
as benchmarks/gpu_check.sh writes it. Prints a Markdown table in RESULTS.md's format, one row
per run, and per case the ratio dpo_jax / trl of pairs/s and of peak memory.
"""

from __future__ import annotations

import json
import sys

COLUMNS = (
    ("case", "case"),
    ("trainer", "trainer"),
    ("pairs_per_step", "pairs/step"),
    ("step_s", "step s"),
    ("pairs_per_s", "pairs/s"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
    ("padding_fraction", "padding"),
    ("peak_memory_gb", "peak GiB"),
    ("compile_s", "compile s"),
)


def read(paths):
    records = []
    for path in paths:
        with open(path) as f:
            for number, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    print(f"{path}:{number}: not JSON, skipped", file=sys.stderr)
                    continue
                if "result" in record:
                    result = dict(record["result"], case=record.get("case", ""))
                    result["command"] = record.get("command", "")
                else:
                    result = dict(record, case=record.get("case", record.get("preset", "")))
                records.append(result)
    return records


def cell(key, value):
    if value is None:
        return "–"
    if key == "mfu" or key == "padding_fraction":
        return f"{100 * value:.1f}%"
    if key == "tokens_per_s":
        return f"{value / 1000:.1f}k"
    return str(value)


def table(records) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in records:
        lines.append("| " + " | ".join(cell(key, r.get(key)) for key, _ in COLUMNS) + " |")
    ratios = []
    for case in dict.fromkeys(r["case"] for r in records):
        by = {r["trainer"]: r for r in records if r["case"] == case}
        if {"dpo_jax", "trl"} <= by.keys():
            ours, trl = by["dpo_jax"], by["trl"]
            text = (
                f"- {case}: dpo_jax / trl pairs/s = {ours['pairs_per_s'] / trl['pairs_per_s']:.2f}×"
            )
            if ours.get("peak_memory_gb") and trl.get("peak_memory_gb"):
                text += f", peak memory {ours['peak_memory_gb'] / trl['peak_memory_gb']:.2f}×"
            ratios.append(text)
    return "\n".join(lines + ([""] + ratios if ratios else []))


def environment(records) -> str:
    keys = ("device", "jax", "trl", "transformers", "torch", "cuda", "accelerate")
    seen = {}
    for r in records:
        for key in keys:
            if r.get(key) is not None:
                seen.setdefault(key, r[key])
    return ", ".join(f"{key} {value}" for key, value in seen.items())


def main(argv) -> None:
    if not argv:
        raise SystemExit(__doc__)
    records = read(argv)
    if not records:
        raise SystemExit("no results")
    print(environment(records))
    print()
    print(table(records))
    commands = [(r["case"], r["trainer"], r["command"]) for r in records if r.get("command")]
    if commands:
        print()
        for case, trainer, command in commands:
            print(f"- {case} / {trainer}: `{command}`")


if __name__ == "__main__":
    main(sys.argv[1:])
