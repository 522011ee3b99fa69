"""Blinded rating sheet: export → fill → score round trip, and errors that name the cell."""

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from dpo_jax import rating

ROWS = [
    (f"Prompt {i}?", f"Ugh. Reference answer {i}.", f"Sure! Policy answer {i}.") for i in range(8)
]


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_rows(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=rating.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def fill(path, verdicts):
    """A rater who can tell the policy (its answers say "Policy"): verdicts[i] is
    "policy", "reference", "tie" or None (not rated); the policy gets 5s, the reference 2s."""
    rows = read_rows(path)
    for row, verdict in zip(rows, verdicts, strict=True):
        if verdict is None:
            continue
        policy_side = "A" if "Policy" in row["answer_A"] else "B"
        other = "B" if policy_side == "A" else "A"
        for criterion in rating.CRITERIA:
            row[f"{policy_side}_{criterion}"] = "5"
            row[f"{other}_{criterion}"] = "2"
        row["preferred"] = {"policy": policy_side, "reference": other, "tie": "tie"}[verdict]
    write_rows(path, rows)


def test_sheet_is_blinded_and_seeded(tmp_path):
    sheet = str(tmp_path / "sheet.csv")
    key = rating.export_sheet(ROWS, sheet, seed=0)
    assert key == sheet + ".key.json"
    rows = read_rows(sheet)
    assert list(rows[0]) == list(rating.COLUMNS)
    assert [r["prompt"] for r in rows] == [p for p, _, _ in ROWS]
    sides = ["A" if "Policy" in r["answer_A"] else "B" for r in rows]
    assert set(sides) == {"A", "B"}  # both orders occur
    with open(key) as f:
        assert [v["policy"] for v in json.load(f)["rows"].values()] == sides
    assert all(r[c] == "" for r in rows for c in (*rating.SCORE_COLUMNS, "preferred"))
    rating.export_sheet(ROWS, str(tmp_path / "again.csv"), seed=0)
    assert read_rows(str(tmp_path / "again.csv")) == rows  # same seed, same order
    rating.export_sheet(ROWS, str(tmp_path / "other.csv"), seed=1)
    assert read_rows(str(tmp_path / "other.csv")) != rows


def test_filled_sheet_round_trips_into_win_rates_and_scores(tmp_path):
    sheet = str(tmp_path / "sheet.csv")
    rating.export_sheet(ROWS, sheet, seed=3)
    fill(sheet, ["policy"] * 5 + ["reference", "tie", None])
    result = rating.score_sheet(sheet)
    assert (result["rows"], result["rated"]) == (8, 7)
    assert (result["policy_wins"], result["reference_wins"], result["ties"]) == (5, 1, 1)
    assert result["policy_win_rate"] == pytest.approx(5 / 7)
    assert result["tie_rate"] == pytest.approx(1 / 7)
    for criterion in rating.CRITERIA:
        assert result["scores"]["policy"][criterion] == 5.0
        assert result["scores"]["reference"][criterion] == 2.0
        assert result["scored"]["policy"][criterion] == 7
    text = rating.format_scores(result)
    assert "policy wins        5  71.4%" in text and "helpfulness" in text


def test_cli_export_from_samples_and_score(tmp_path):
    samples = tmp_path / "samples.jsonl"
    lines = [
        {"step": step, "prompt": p, "reference": r, "policy": f"{pol} (step {step})"}
        for step in (5, 10)
        for p, r, pol in ROWS[:4]
    ]
    samples.write_text("".join(json.dumps(x) + "\n" for x in lines))
    sheet = str(tmp_path / "sheet.csv")
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "dpo_jax.rating", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    done = run("export", "--samples", str(samples), "--out", sheet)
    assert done.returncode == 0, done.stderr
    rows = read_rows(sheet)
    assert len(rows) == 4 and all("(step 10)" in r["answer_A"] + r["answer_B"] for r in rows)
    fill(sheet, ["policy", "policy", "tie", "reference"])
    out = str(tmp_path / "scores.json")
    done = run("score", sheet, "--json", out)
    assert done.returncode == 0, done.stderr
    assert "policy wins        2  50.0%" in done.stdout
    with open(out) as f:
        assert json.load(f)["ties"] == 1
    os.remove(sheet + ".key.json")
    done = run("score", sheet)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "key file not found" in done.stderr


def edited(tmp_path, edit):
    sheet = str(tmp_path / "sheet.csv")
    rating.export_sheet(ROWS, sheet, seed=0)
    fill(sheet, ["policy"] * len(ROWS))
    rows = read_rows(sheet)
    edit(rows)
    write_rows(sheet, rows)
    return sheet


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda rows: rows[1].update(A_safety="7"), "line 3 (row id 2), column A_safety: '7'"),
        (lambda rows: rows[0].update(B_alignment="3.5"), "column B_alignment: '3.5' is not"),
        (lambda rows: rows[2].update(preferred="C"), "row id 3), column preferred: 'C'"),
        (lambda rows: rows[4].update(id="99"), "row id 99), column id: unknown row"),
        (lambda rows: rows[4].update(id="1"), "column id: row appears twice"),
        (lambda rows: rows[5].update(answer_A="edited"), "column answer_A: text differs"),
    ],
)
def test_bad_cells_are_named(tmp_path, edit, message):
    sheet = edited(tmp_path, edit)
    with pytest.raises(rating.RatingError) as error:
        rating.score_sheet(sheet)
    assert message in str(error.value)
    with pytest.raises(SystemExit) as exit_:
        rating.main(["score", sheet])
    assert str(exit_.value).startswith("error: ") and message in str(exit_.value)


def test_every_bad_cell_is_listed_and_multiline_answers_keep_line_numbers(tmp_path):
    rows = [("Q1", "line one\nline two", "policy\nanswer"), ("Q2", "ref", "pol")]
    sheet = str(tmp_path / "sheet.csv")
    rating.export_sheet(rows, sheet, seed=0)
    filled = read_rows(sheet)
    filled[0]["A_helpfulness"] = "0"
    filled[1]["B_safety"] = "high"
    write_rows(sheet, filled)
    with pytest.raises(rating.RatingError) as error:
        rating.score_sheet(sheet)
    lines = str(error.value).splitlines()
    assert "line 2 (row id 1), column A_helpfulness: '0'" in lines[0]
    assert "line 5 (row id 2), column B_safety: 'high'" in lines[1]


def test_a_key_from_another_export_is_refused(tmp_path):
    sheet = str(tmp_path / "sheet.csv")
    rating.export_sheet(ROWS, sheet, seed=0)
    other = str(tmp_path / "other.csv")
    rating.export_sheet(ROWS, other, seed=1)
    with pytest.raises(rating.RatingError, match="text differs"):
        rating.score_sheet(sheet, key_path=other + ".key.json")


def test_missing_columns_and_samples_errors(tmp_path):
    sheet = tmp_path / "sheet.csv"
    sheet.write_text("id,prompt\n1,x\n")
    (tmp_path / "sheet.csv.key.json").write_text(json.dumps({"rows": {"1": {"policy": "A"}}}))
    with pytest.raises(rating.RatingError, match="header lacks column"):
        rating.score_sheet(str(sheet))
    samples = tmp_path / "samples.jsonl"
    samples.write_text('{"step": 1, "prompt": "p", "reference": "r"}\n')
    with pytest.raises(rating.RatingError, match="samples.jsonl:1: field 'policy'"):
        rating.rows_from_samples(str(samples))
    samples.write_text('{"step": 1, "prompt": "p", "reference": "r", "policy": "q"}\n')
    with pytest.raises(rating.RatingError, match=r"no samples of step 2 \(have \[1\]\)"):
        rating.rows_from_samples(str(samples), step=2)
