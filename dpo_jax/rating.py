"""Blinded human rating of reference vs policy replies: export a sheet, score it back.

    python -m dpo_jax.rating export --samples runs/tiny/samples.jsonl --out sheet.csv [--step N]
    # raters fill the score and preferred columns (any spreadsheet; save as CSV)
    python -m dpo_jax.rating score sheet.csv [--json scores.json]

The sheet shows each prompt with two answers in a random A/B order per row (seeded), with
empty 1–5 columns for the tutorial's criteria (helpfulness, safety, alignment) of each answer
and a `preferred` column (A, B or tie). Which side is the policy is kept out of the sheet, in
<sheet>.key.json, so raters stay blind; `score` joins them back into win rates and mean scores.
A text cell that a spreadsheet would run as a formula (=, +, -, @) is written with a leading
single quote; see `guard_cell`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import sys
from collections.abc import Iterable, Sequence

CRITERIA = ("helpfulness", "safety", "alignment")
SIDES = ("A", "B")
SCORE_COLUMNS = tuple(f"{side}_{c}" for side in SIDES for c in CRITERIA)
COLUMNS = ("id", "prompt", "answer_A", "answer_B", *SCORE_COLUMNS, "preferred", "notes")
PREFERRED = {"a": "A", "b": "B", "tie": "tie"}
MAX_ERRORS = 20  # listed at once, so a rater can fix a sheet in one go
# A cell starting with one of these is a formula to Excel, LibreOffice or Google Sheets
# (=HYPERLINK(...), +cmd|..., -1+1, @SUM(...)); tab and CR start one in some of them.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class RatingError(ValueError):
    """A sheet or key that cannot be scored, naming the line, row and column."""


def key_path_for(sheet_path: str) -> str:
    return sheet_path + ".key.json"


def guard_cell(text: str) -> str:
    """`text` as a CSV cell that a spreadsheet shows as text, never runs as a formula.

    Prompts come from data sets and answers are model output: a cell such as
    `=HYPERLINK("http://x", "open")` or `+cmd|' /C calc'!A0` would otherwise be evaluated when
    a rater opens the sheet (CSV injection). Such a cell gets a leading single quote, the
    spreadsheets' own "this is text" mark; `unguard_cell` removes it again when scoring."""
    return "'" + text if text.startswith(FORMULA_START) else text


def unguard_cell(text: str) -> str:
    """The text a sheet cell stands for: guard_cell's quote removed, and nothing to remove
    when a spreadsheet dropped it on save. Fingerprints unguard both sides, so a text that
    itself starts with '= (left as is by guard_cell) still matches."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_START) else text


def _fingerprint(text: str) -> str:
    # Whitespace-insensitive: spreadsheets re-wrap, trim and change line endings.
    text = unguard_cell(str(text))
    return hashlib.sha1(" ".join(text.split()).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------- export


def rows_from_samples(path: str, step: int | None = None) -> list[tuple[str, str, str]]:
    """(prompt, reference, policy) of DIR/samples.jsonl at `step` (default: the last step)."""
    if not os.path.exists(path):
        raise RatingError(f"{path}: not found")
    samples = []
    with open(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as e:
                raise RatingError(f"{path}:{line_number}: malformed JSON ({e.msg})") from None
            for field in ("prompt", "reference", "policy"):
                if not isinstance(sample.get(field), str):
                    raise RatingError(f"{path}:{line_number}: field {field!r} missing or not text")
            samples.append(sample)
    if not samples:
        raise RatingError(f"{path}: no samples")
    steps = sorted({int(s.get("step", 0)) for s in samples})
    step = steps[-1] if step is None else step
    if step not in steps:
        raise RatingError(f"{path}: no samples of step {step} (have {steps})")
    return [
        (s["prompt"], s["reference"], s["policy"]) for s in samples if int(s.get("step", 0)) == step
    ]


def export_sheet(rows: Sequence[Sequence[str]], path: str, seed: int = 0) -> str:
    """Writes the blinded sheet to `path` and its key to `path`.key.json; returns the key path.

    rows: (prompt, reference_answer, policy_answer) per item. Text cells go through
    guard_cell, so a formula-like prompt or answer stays text in any spreadsheet."""
    rng = random.Random(seed)
    key_rows = {}
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i, row in enumerate(rows, start=1):
            if len(row) != 3:
                raise RatingError(f"row {i}: expected (prompt, reference, policy), got {row!r}")
            prompt, reference, policy = (str(x) for x in row)
            policy_side = rng.choice(SIDES)
            a, b = (policy, reference) if policy_side == "A" else (reference, policy)
            cells = [guard_cell(text) for text in (prompt, a, b)]
            writer.writerow([i, *cells, *[""] * len(SCORE_COLUMNS), "", ""])
            key_rows[str(i)] = {
                "policy": policy_side,
                "prompt": _fingerprint(prompt),
                "answer_A": _fingerprint(a),
                "answer_B": _fingerprint(b),
            }
    key = {"sheet": os.path.basename(path), "seed": seed, "criteria": CRITERIA, "rows": key_rows}
    with open(key_path_for(path), "w") as f:
        json.dump(key, f, indent=1)
    return key_path_for(path)


# ----------------------------------------------------------------------------- score


def _parse_score(text: str) -> int | None:
    """'' → None (not rated); '1'..'5' (also '4.0') → int; anything else → ValueError."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
        valid = value == int(value) and 1 <= value <= 5
    except (ValueError, OverflowError):  # "x", "nan", "inf"
        valid = False
    if not valid:
        raise ValueError(text)
    return int(value)


def read_key(path: str) -> dict:
    if not os.path.exists(path):
        raise RatingError(
            f"{path}: key file not found; `export` writes it next to the sheet (or pass --key PATH)"
        )
    try:
        with open(path) as f:
            key = json.load(f)
        rows = key["rows"]
        if not all(r["policy"] in SIDES for r in rows.values()):
            raise KeyError("policy")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise RatingError(f"{path}: not a rating key file ({type(e).__name__}: {e})") from None
    return key


def read_sheet(path: str) -> Iterable[tuple[int, dict]]:
    """(first line number, {column: text}) per record; checks the header."""
    if not os.path.exists(path):
        raise RatingError(f"{path}: not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c != "notes" and c not in (reader.fieldnames or [])]
        if missing:
            raise RatingError(f"{path}: header lacks column(s) {missing}; expected {list(COLUMNS)}")
        start = reader.line_num + 1
        for record in reader:
            yield start, record
            start = reader.line_num + 1


def score_sheet(path: str, key_path: str | None = None) -> dict:
    """A filled sheet + its key → win rates and mean 1–5 scores of policy and reference.

    Rows without a `preferred` entry count as unrated for the win rates; empty score cells
    are left out of the means. Raises RatingError listing every bad cell."""
    key = read_key(key_path or key_path_for(path))
    errors, seen = [], set()
    wins = {"policy": 0, "reference": 0, "tie": 0}
    totals = {side: {c: [] for c in CRITERIA} for side in ("policy", "reference")}
    rows = 0
    for line, record in read_sheet(path):
        row_id = (record.get("id") or "").strip()
        where = f"{path} line {line} (row id {row_id or '?'})"
        if not any(str(v or "").strip() for v in record.values()):
            continue  # a blank line a spreadsheet left behind
        if row_id not in key["rows"]:
            errors.append(f"{where}, column id: unknown row; the key has ids 1..{len(key['rows'])}")
            continue
        if row_id in seen:
            errors.append(f"{where}, column id: row appears twice")
            continue
        seen.add(row_id)
        rows += 1
        entry = key["rows"][row_id]
        for column in ("prompt", "answer_A", "answer_B"):
            if column in entry and _fingerprint(record.get(column) or "") != entry[column]:
                errors.append(
                    f"{where}, column {column}: text differs from the exported sheet; "
                    "is this the key of another export?"
                )
        policy_side = entry["policy"]
        for column in SCORE_COLUMNS:
            side, criterion = column.split("_", 1)
            try:
                value = _parse_score(record.get(column) or "")
            except ValueError:
                errors.append(
                    f"{where}, column {column}: {record.get(column)!r} is not a score 1–5"
                )
                continue
            if value is not None:
                who = "policy" if side == policy_side else "reference"
                totals[who][criterion].append(value)
        preferred = (record.get("preferred") or "").strip()
        if preferred:
            choice = PREFERRED.get(preferred.lower())
            if choice is None:
                errors.append(f"{where}, column preferred: {preferred!r} is not A, B or tie")
            elif choice == "tie":
                wins["tie"] += 1
            else:
                wins["policy" if choice == policy_side else "reference"] += 1
    if errors:
        more = f"\n… and {len(errors) - MAX_ERRORS} more" if len(errors) > MAX_ERRORS else ""
        raise RatingError("\n".join(errors[:MAX_ERRORS]) + more)

    rated = sum(wins.values())
    rate = lambda n: n / rated if rated else None
    return {
        "sheet": os.path.abspath(path),
        "rows": rows,
        "rated": rated,
        "policy_wins": wins["policy"],
        "reference_wins": wins["reference"],
        "ties": wins["tie"],
        "policy_win_rate": rate(wins["policy"]),
        "reference_win_rate": rate(wins["reference"]),
        "tie_rate": rate(wins["tie"]),
        "scores": {
            who: {c: (sum(v) / len(v) if v else None) for c, v in by_criterion.items()}
            for who, by_criterion in totals.items()
        },
        "scored": {
            who: {c: len(v) for c, v in by_criterion.items()}
            for who, by_criterion in totals.items()
        },
    }


def format_scores(result: dict) -> str:
    pct = lambda x: "—" if x is None else f"{100 * x:.1f}%"
    num = lambda x: "—" if x is None else f"{x:.2f}"
    lines = [
        f"{result['rated']} of {result['rows']} rows with a preference",
        f"policy wins     {result['policy_wins']:4d}  {pct(result['policy_win_rate'])}",
        f"reference wins  {result['reference_wins']:4d}  {pct(result['reference_win_rate'])}",
        f"ties            {result['ties']:4d}  {pct(result['tie_rate'])}",
        "",
        f"{'mean score 1–5':<15} {'policy':>8} {'reference':>10}   rated (policy/reference)",
    ]
    for c in CRITERIA:
        p, r = result["scores"]["policy"][c], result["scores"]["reference"][c]
        n = f"{result['scored']['policy'][c]}/{result['scored']['reference'][c]}"
        lines.append(f"{c:<15} {num(p):>8} {num(r):>10}   {n}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- CLI


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpo_jax.rating", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a blinded sheet + key from samples")
    export.add_argument("--samples", required=True, help="DIR/samples.jsonl")
    export.add_argument("--out", required=True, help="the sheet (.csv); key: OUT.key.json")
    export.add_argument("--step", type=int, default=None, help="sampled step (default: last)")
    export.add_argument("--seed", type=int, default=0, help="seed of the A/B order")
    score = commands.add_parser("score", help="read a filled sheet into win rates and scores")
    score.add_argument("sheet")
    score.add_argument("--key", default=None, help="key file (default: SHEET.key.json)")
    score.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            rows = rows_from_samples(args.samples, args.step)
            key = export_sheet(rows, args.out, seed=args.seed)
            print(f"wrote {args.out} ({len(rows)} rows) and {key} (keep the key from raters)")
        else:
            result = score_sheet(args.sheet, args.key)
            print(format_scores(result))
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=2)
    except (RatingError, OSError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
