"""dpo_jax.evaluate on a tiny trained run: its numbers are the training run's eval rows."""

import json
import math
import os

import jax
import pytest
from conftest import fast_config

from dpo_jax import embedded, evaluate, train

# conftest's FAST run, shortened: 4 steps, checkpoints and evals at steps 2 and 4.
OVERRIDES = {"training.max_steps": 4, "eval.every_steps": 2, "checkpoint.every_steps": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step run on one device with a 12-pair validation file (1.5 batches)."""
    root = tmp_path_factory.mktemp("evaluate")
    validation = root / "validation.jsonl"
    with open(embedded.VALIDATION_FILE) as src:
        validation.write_text("".join(src.readlines()[:12]))
    workdir = str(root / "run")
    config = fast_config(str(validation), **OVERRIDES)
    train.train(config, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = {r["step"]: r for r in map(json.loads, f) if "eval/loss" in r}
    return workdir, str(validation), evals


def assert_matches_eval_row(metrics, row, beta=0.1):
    for key, value in row.items():
        if key.startswith("eval/"):
            name = key[len("eval/") :]
            assert math.isclose(metrics[name], value, rel_tol=1e-5, abs_tol=1e-5), (name, value)
    for side in ("chosen", "rejected"):
        assert math.isclose(
            metrics[f"logratio/{side}"], metrics[f"rewards/{side}"] / beta, rel_tol=1e-6
        )


def test_latest_checkpoint_equals_last_training_eval(run):
    workdir, _, evals = run
    result = evaluate.evaluate(workdir, devices=jax.devices()[:1])
    assert result["step"] == 4 and list(result["sets"]) == ["validation"]
    validation = result["sets"]["validation"]
    assert validation["pairs"] == 12
    assert_matches_eval_row(validation["metrics"], evals[4])
    # DPO moved the policy away from the reference: chosen up relative to rejected.
    assert validation["metrics"]["logratio/chosen"] > validation["metrics"]["logratio/rejected"]
    with open(os.path.join(workdir, "eval_4.json")) as f:
        assert json.load(f) == result


def test_cli_earlier_step_named_sets_and_other_mesh(run, capsys):
    """--step 2 on the default 8-device mesh (the checkpoint was written from 1 device)."""
    workdir, validation, evals = run
    evaluate.main(
        ["--workdir", workdir, "--step", "2", "--data", validation, f"again={validation}"]
    )
    out = capsys.readouterr().out
    assert "validation" in out and "again" in out and "logratio/chosen" in out
    with open(os.path.join(workdir, "eval_2.json")) as f:
        result = json.load(f)
    assert list(result["sets"]) == ["validation", "again"]
    for name in ("validation", "again"):
        assert_matches_eval_row(result["sets"][name]["metrics"], evals[2])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--step", "3"], "--step 3: not among the checkpoints of"),
        (["--step", "best"], "--step best: no checkpoint"),
        (["--data", "a.jsonl", "x/a.jsonl"], "two eval sets are named 'a'"),
        (["--mesh", "2,2"], "expected three integers"),
        (["--data", "missing.jsonl"], "missing.jsonl: file not found"),
    ],
)
def test_cli_errors_are_one_line(run, args, message):
    with pytest.raises(SystemExit) as error:
        evaluate.main(["--workdir", run[0], *args])
    assert str(error.value).startswith("error: ") and message in str(error.value)


def test_not_a_workdir(tmp_path):
    with pytest.raises(SystemExit, match="config.json: not found"):
        evaluate.main(["--workdir", str(tmp_path)])
