"""build_data end to end: several sources and named validation sets, the report, the
tokenization cache (a second run reuses it), num_proc workers, and `python -m dpo_jax.data`."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from transformers import AutoTokenizer

from dpo_jax import data, embedded
from dpo_jax.data import bench, pipeline
from dpo_jax.settings import data_settings

# The data keys the trainer's config gains (defaults), for a config wrapper until they are in
# configs/tiny.py; keys the config already has are left alone.
NEW_KEYS = dict(
    train_weights="",
    validation_files="",
    format="auto",
    fields="",
    roles="",
    system_prompt="",
    ranked_pairs="best_worst",
    ranked_ties="error",
    truncation="truncate",
    on_error="raise",
    packing=False,
    packed_rows=0,
    packed_pairs=0,
    bucket_lengths="",
    shuffle=True,
    num_proc=0,
    cache_dir="",
)
WRAPPER = """
import importlib.util
spec = importlib.util.spec_from_file_location("tiny", {tiny!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)

def get_config():
    c = tiny.get_config()
    with c.unlocked():
        for key, value in {keys!r}.items():
            if key not in c.data:
                c.data[key] = value
    return c
"""


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded.TINY_MODEL_DIR)


def lines(path, n, start=0):
    with open(path) as f:
        rows = f.readlines()[start : start + n]
    return rows


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    paths = {}
    for name, source, n, start in (
        ("a", embedded.TRAIN_FILE, 60, 0),
        ("b", embedded.TRAIN_FILE, 12, 100),
        ("val", embedded.VALIDATION_FILE, 10, 0),
        ("val2", embedded.VALIDATION_FILE, 5, 50),
    ):
        paths[name] = str(folder / f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(lines(source, n, start))
    return paths


def settings(files, cache_dir, **overrides):
    values = {
        "train_file": f"{files['a']},{files['b']}",
        "validation_file": files["val"],
        "validation_files": f"small={files['val2']}",
        "max_seq_length": 80,
        "max_prompt_length": 48,
        "cache_dir": str(cache_dir),
    } | overrides
    return data_settings(values)


def test_build_data_sources_mixture_named_evals_and_report(files, tmp_path, tokenizer):
    built = data.build_data(
        settings(files, tmp_path, train_weights="1,1"),
        tokenizer,
        batch_size=8,
        accumulation_steps=2,
        seed=0,
    )
    assert sorted(built.evals) == ["", "small"]
    assert [len(built.evals[k]) for k in ("", "small")] == [10, 5]
    assert built.train.quotas == [36, 36] and built.train.steps_per_epoch == 9
    batch = next(built.train)
    assert batch["tokens"].shape == (2, 8, 80) and batch["pair_mask"].shape == (2, 4)
    report = json.loads(json.dumps(built.report))  # what train.py writes: plain JSON
    train = report["train"]
    assert train["pairs"] == 72 and [s["records"] for s in train["sources"]] == [60, 12]
    assert train["sources"][1] | {"weight": 1.0, "pairs_per_epoch": 36} == train["sources"][1]
    for key in ("format", "skipped", "dropped", "truncated", "cache"):
        assert key in train["sources"][0]
    assert set(train["lengths"]) == {"prompt", "chosen", "rejected", "sequence"}
    assert set(train["lengths"]["sequence"]) == {"p5", "p50", "p90", "p99", "max", "mean"}
    assert report["validation"]["small"]["pairs"] == 5
    assert 0 < report["batching"]["padding_efficiency"] <= 1
    text = data.summary(report)
    assert "data train:" in text and "data small:" in text and "efficiency" in text
    eval_batches = list(built.train.eval_batches(built.evals["small"], batch_size=4))
    assert [int(b["pair_mask"].sum()) for b in eval_batches] == [4, 1]


def test_second_run_reuses_the_tokenization_cache(files, tmp_path, tokenizer, monkeypatch):
    first = data.build_data(
        settings(files, tmp_path), tokenizer, batch_size=8, accumulation_steps=1, seed=0
    )
    assert {s["cache"] for s in first.report["train"]["sources"]} == {"miss"}

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "tokenize_examples", no_tokenizing)
        second = data.build_data(
            settings(files, tmp_path), tokenizer, batch_size=8, accumulation_steps=1, seed=0
        )
    assert {s["cache"] for s in second.report["train"]["sources"]} == {"hit"}
    for a, b in zip(first.train.pairs, second.train.pairs, strict=True):
        assert a.source == b.source and np.array_equal(a.prompt, b.prompt)
        assert np.array_equal(a.chosen, b.chosen) and np.array_equal(a.rejected, b.rejected)
    for a, b in zip(next(first.train).values(), next(second.train).values(), strict=True):
        np.testing.assert_array_equal(a, b)
    # Any setting that changes the ids is part of the key.
    changed = data.build_data(
        settings(files, tmp_path, max_prompt_length=20),
        tokenizer,
        batch_size=8,
        accumulation_steps=1,
        seed=0,
    )
    assert {s["cache"] for s in changed.report["train"]["sources"]} == {"miss"}


def test_worker_processes_tokenize_the_same(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(lines(embedded.TRAIN_FILE, 2000)))
    one, _ = data.load_source(str(path), tokenizer, data.DataSettings(80, 48, num_proc=1))
    two, _ = data.load_source(str(path), tokenizer, data.DataSettings(80, 48, num_proc=2))
    assert [p.source for p in one] == [p.source for p in two]
    assert all(np.array_equal(a.chosen, b.chosen) for a, b in zip(one, two, strict=True))


def run_cli(tmp_path, *overrides):
    config = tmp_path / "config.py"
    config.write_text(
        WRAPPER.format(
            tiny=os.path.join(REPO, "configs", "tiny.py"),
            keys=NEW_KEYS | {"cache_dir": str(tmp_path / "cache")},
        )
    )
    args = [sys.executable, "-m", "dpo_jax.data", "--config", str(config), *overrides]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_cli_reports_packing_efficiency_and_marks_trained_tokens(tmp_path, tokenizer):
    path = str(tmp_path / "realistic.jsonl")
    bench.write_synthetic(path, 800, tokenizer)
    result = run_cli(
        tmp_path,
        f"--config.data.train_file={path}",
        "--config.data.validation_file=",
        "--config.data.packing=True",
        "--config.data.max_seq_length=1024",
        "--config.data.max_prompt_length=512",
        "--config.model.max_length=1024",
        "--config.training.batch_size=32",
        "--examples=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report, end = json.JSONDecoder().raw_decode(result.stdout)
    batching = report["batching"]
    assert batching["mode"] == "packed" and batching["rows_per_micro_batch"] < 64
    assert batching["packing_efficiency"] >= 0.8, batching  # measured 0.84 (800 pairs)
    assert batching["pairs_per_step"]["max"] == 32
    assert batching["pairs_per_step"]["mean"] >= 0.98 * 32, batching
    assert 150 <= report["train"]["lengths"]["sequence"]["p50"] <= 800
    rest = result.stdout[end:]
    assert "data batching: packed" in rest and "--- pair 0" in rest
    assert "[chosen:" in rest and "⟦" in rest and "<|eos|>⟧" in rest


def test_cli_on_bad_data_names_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(lines(embedded.TRAIN_FILE, 1)[0] + '{"prompt": "a", "chosen": 1}\n')
    result = run_cli(tmp_path, f"--config.data.train_file={path}", "--examples=0")
    assert result.returncode != 0
    assert f"error: {path}:2: missing field 'rejected'" in result.stderr


def test_training_on_packed_batches_with_named_eval_sets(files, tmp_path):
    """Packed batches and two named eval sets through the trainer."""
    import jax
    from conftest import load_config

    from dpo_jax import train

    overrides = {
        "training.batch_size": 8,
        "training.max_steps": 3,
        "training.warmup_steps": 1,
        "training.sft_loss_weight": 0.0,
        "checkpoint.every_steps": 3,
        "checkpoint.async_save": False,
        "logging.every_steps": 1,
        "logging.report": False,
        "logging.tensorboard": False,
        "eval.every_steps": 3,
        "eval.batch_size": 4,
        "eval.sample_every_steps": -1,
        "data.train_file": files["a"],
        "data.validation_file": files["val"],
        "data.validation_files": f"small={files['val2']}",
        "data.packing": True,
        "data.cache_dir": str(tmp_path / "cache"),
    }
    workdir = str(tmp_path / "run")
    train.train(load_config("tiny", **overrides), workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert abs(rows[0]["loss"] - np.log(2)) < 1e-5
    evals = [r for r in rows if "eval/loss" in r]
    assert evals and "eval/small/loss" in evals[-1] and "eval/small/rewards/margins" in evals[-1]
    with open(os.path.join(workdir, "data_report.json")) as f:
        report = json.load(f)
    assert report["batching"]["mode"] == "packed" and report["train"]["pairs"] == 60


def test_packed_embedded_data_keeps_batch_size_pairs_per_step(tokenizer):
    """The embedded training data packed into rows of 128 (two or three sequences each):
    every step holds at most training.batch_size=32 pairs, on average at least 98% of it,
    in fewer rows than padding's 64; the report and the console line say so."""
    from conftest import load_config

    from dpo_jax import settings

    s = settings.from_config(
        load_config(
            "tiny",
            **{
                "data.packing": True,
                "data.max_seq_length": 128,
                "data.cache_dir": "none",
                "data.validation_file": "",
            },
        )
    )
    built = data.build_data(s.data, tokenizer, batch_size=32, accumulation_steps=1, seed=0)
    batching = built.report["batching"]
    assert batching["mode"] == "packed" and batching["rows_per_micro_batch"] < 64
    assert batching["pairs_per_step"]["max"] == 32
    assert batching["pairs_per_step"]["mean"] >= 0.98 * 32, batching
    assert batching["steps_per_epoch"] >= 3000 // 32
    line = data.summary(built.report).splitlines()[-1]
    rows = batching["rows_per_micro_batch"]
    assert f"packed, {rows} rows × 128 tokens per micro-batch" in line
    assert f"pairs/step mean {batching['pairs_per_step']['mean']}" in line and "tokens/step" in line
