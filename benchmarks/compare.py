"""Side-by-side table of benchmark JSON lines (dpo_jax.bench and benchmarks/trl_dpo.py).

    python benchmarks/compare.py results.jsonl [more.jsonl ...]

Each input line is a bare JSON result, or {"case": NAME, "command": ..., "result": {...}} as
benchmarks/gpu_check.sh writes it ({"case", "command", "error"} for a run that gave none).
Prints the environment, a Markdown table in RESULTS.md's format (one row per run), then the
pairs: runs of the same workload (the PAIR_KEYS fields: model, lengths, pairs per step,
precision policy, reference mode, LoRA rank and base quantization) are compared dpo_jax
against TRL, whatever each trainer did to run it (packing, remat), and those differences are
named next to the ratio.
"""

from __future__ import annotations

import json
import sys

# What makes two runs the same workload. Packing, remat, attention and the like are how a
# trainer runs it and may differ within a pair.
PAIR_KEYS = (
    "preset",
    "lengths",
    "prompt_length",
    "completion_length",
    "max_seq_length",
    "batch_size",
    "gradient_accumulation_steps",
    "seed",
    "precision",
    "precompute_ref_log_probs",
    "lora_rank",
    "quantization",
)
# What a result line without a PAIR_KEYS field ran (lines written before LoRA existed).
PAIR_DEFAULTS = {"lora_rank": 0, "quantization": "none"}
# How a trainer ran it: named in a pair's line when set.
HOW_KEYS = ("packing", "prefix_sharing", "cudnn_packed_layout", "remat_policy", "attention_impl")

COLUMNS = (
    ("case", "case"),
    ("trainer", "trainer"),
    ("workload", "workload"),
    ("precision", "precision"),
    ("how", "how"),
    ("step_s", "step s"),
    ("pairs_per_s", "pairs/s"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
    ("padding_fraction", "padding"),
    ("peak_memory_gb", "peak GiB"),
    ("compile_s", "compile s"),
)


def read(paths):
    """(results, failures): results as dicts with case/command added; failures as records."""
    results, failures = [], []
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
                if "error" in record and "result" not in record:
                    failures.append(record)
                elif "result" in record:
                    result = dict(record["result"], case=record.get("case", ""))
                    result["command"] = record.get("command", "")
                    results.append(result)
                else:
                    results.append(dict(record, case=record.get("case", record.get("preset", ""))))
    return results, failures


def workload(r) -> str:
    """e.g. 'llama3_2_1b, 512+512 ×4' or 'llama3_2_1b, hh ≤1024 ×8, ref precomputed'."""
    if r.get("lengths") == "fixed":
        lengths = f"{r.get('prompt_length')}+{r.get('completion_length')}"
    else:
        lengths = f"{r.get('lengths')} ≤{r.get('max_seq_length')}"
    text = f"{r.get('preset')}, {lengths} ×{r.get('pairs_per_step')}"
    if (r.get("gradient_accumulation_steps") or 1) > 1:
        text += f" in {r['gradient_accumulation_steps']} micro-batches"
    if r.get("precompute_ref_log_probs"):
        text += ", ref precomputed"
    if r.get("lora_rank"):
        base = r.get("quantization") or "none"
        text += f", LoRA r{r['lora_rank']}" + ("" if base == "none" else f" on {base} base")
    return text


def how(r) -> str:
    """How the trainer ran it: packed or padded rows, remat, attention."""
    rows = "packed" if r.get("packing") else "padded"
    if r.get("prefix_sharing"):
        rows += " prefix-shared"
    if r.get("cudnn_packed_layout"):
        rows += f" (≤{r['max_segments_per_row']} segments: cuDNN packed layout)"
    if r.get("tokens_per_micro_batch") is not None:
        rows += f" {r['tokens_per_micro_batch']:g} tok/µb"
    remat = r.get("remat_policy")
    parts = [rows] + ([f"remat {remat}"] if remat and remat != "none" else [])
    if r.get("attention_impl"):
        parts.append(str(r["attention_impl"]))
    return ", ".join(parts)


def cell(key, r):
    if key == "workload":
        return workload(r)
    if key == "how":
        return how(r)
    value = r.get(key)
    if value is None:
        return "–"
    if key in ("mfu", "padding_fraction"):
        return f"{100 * value:.1f}%"
    if key == "tokens_per_s":
        return f"{value / 1000:.1f}k"
    return str(value)


def pairs(results) -> list[str]:
    """One line per (dpo_jax, trl) pair of runs of the same workload."""
    groups: dict[tuple, list] = {}
    for r in results:
        workload_key = tuple(r.get(key, PAIR_DEFAULTS.get(key)) for key in PAIR_KEYS)
        groups.setdefault(workload_key, []).append(r)
    lines = []
    for group in groups.values():
        ours = [r for r in group if r.get("trainer") == "dpo_jax"]
        theirs = [r for r in group if r.get("trainer") == "trl"]
        for a in ours:
            for b in theirs:
                text = (
                    f"- {workload(a)}, {a.get('precision')}: dpo_jax {a.get('case')} "
                    f"({how(a)}) / trl {b.get('case')} ({how(b)}): "
                    f"pairs/s {a['pairs_per_s'] / b['pairs_per_s']:.2f}×"
                )
                if a.get("peak_memory_gb") and b.get("peak_memory_gb"):
                    text += f", peak memory {a['peak_memory_gb'] / b['peak_memory_gb']:.2f}×"
                if a.get("device") != b.get("device"):
                    text += f" (different devices: {a.get('device')} / {b.get('device')})"
                lines.append(text)
    return lines


def table(results) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in results:
        lines.append("| " + " | ".join(cell(key, r) for key, _ in COLUMNS) + " |")
    paired = pairs(results)
    return "\n".join(lines + ([""] + paired if paired else []))


def environment(results) -> str:
    keys = ("device", "jax", "trl", "transformers", "torch", "cuda", "accelerate")
    seen = {}
    for r in results:
        for key in keys:
            if r.get(key) is not None:
                seen.setdefault(key, r[key])
    return ", ".join(f"{key} {value}" for key, value in seen.items())


def main(argv) -> None:
    if not argv:
        raise SystemExit(__doc__)
    results, failures = read(argv)
    if not results and not failures:
        raise SystemExit("no results")
    print(environment(results))
    print()
    print(table(results))
    if failures:
        print()
        for f in failures:
            print(f"- {f.get('case')}: no result ({f.get('error')}): `{f.get('command')}`")
    commands = [(r["case"], r["trainer"], r["command"]) for r in results if r.get("command")]
    if commands:
        print()
        for case, trainer, command in commands:
            print(f"- {case} / {trainer}: `{command}`")


if __name__ == "__main__":
    main(sys.argv[1:])
