"""benchmarks/trl_dpo.py (TRL's DPOTrainer on our benchmark's model, pairs and batch) runs on
CPU with the tiny preset and reports dpo_jax.bench's fields with the same meaning.

Needs TRL (pip install trl==1.16.0); a missing TRL fails here rather than skipping."""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
from conftest import REPO, load_config

from dpo_jax import bench, bench_workload

SCRIPT = os.path.join(REPO, "benchmarks", "trl_dpo.py")


def load_script(name: str = "trl_dpo"):
    path = os.path.join(REPO, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_gets_our_pairs_and_its_collator_pads_as_counted():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trl_dpo = load_script()
    args = trl_dpo.parse_args(
        ["--preset", "tiny", "--lengths", "hh", "--max_length", "256", "--pairs_per_step", "8"]
    )
    # What TRL's dataset holds: bench_workload.synthetic_steps of the config the flags make.
    theirs = bench_workload.synthetic_steps(
        bench_workload.workload(trl_dpo.workload_config(args)), 1024, 3
    )
    columns = trl_dpo.dataset_columns(theirs)
    assert len(columns["prompt_ids"]) == 3 * 8

    config = load_config("bench", **{"bench.lengths": "hh", "data.max_seq_length": 256})
    workload = bench_workload.workload(config)
    rng = np.random.default_rng(0)
    ours = [
        bench_workload.build_batch(workload, pairs, 16, 1024, rng)
        for pairs in bench_workload.synthetic_steps(workload, 1024, 3)
    ]
    collate = DataCollatorForPreference(pad_token_id=0, max_length=args.max_length)
    for step, (batch, pairs) in enumerate(zip(ours, theirs, strict=True)):
        # Identical token ids: row 2p / 2p+1 of our batch is TRL's prompt + chosen / rejected.
        rows = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
        examples = []
        for p in range(8):
            example = {name: columns[name][8 * step + p] for name in columns}
            for side, name in enumerate(("chosen_ids", "rejected_ids")):
                sequence = example["prompt_ids"] + example[name]
                np.testing.assert_array_equal(rows[2 * p + side, : len(sequence)], sequence)
                assert (rows[2 * p + side, len(sequence) :] == 0).all()
            examples.append(example)
        out = collate(examples)  # what TRL's step receives
        assert out["input_ids"].numel() == trl_dpo.padded_tokens(pairs, micro=8)
        assert int(out["attention_mask"].sum()) == trl_dpo.real_tokens(pairs)
        assert int(out["attention_mask"].sum()) == int((batch["segment_ids"] != 0).sum())
        assert int(out["input_ids"].numel()) > trl_dpo.real_tokens(pairs)  # HH mix pads


def test_trl_benchmark_runs_tiny_on_cpu_with_our_fields():
    shared = {"steps": 2, "warmup_steps": 1, "lengths": "hh", "max_length": 128}
    run = subprocess.run(
        [sys.executable, SCRIPT, "--preset", "tiny"]
        + [f"--{key}={value}" for key, value in shared.items()],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    trl = json.loads(run.stdout.strip().splitlines()[-1])

    config = load_config(
        "bench",
        **{
            "bench.steps": shared["steps"],
            "bench.warmup_steps": shared["warmup_steps"],
            "bench.lengths": shared["lengths"],
            "data.max_seq_length": shared["max_length"],
            "mesh.fsdp": 1,
            "mesh.data": -1,
        },
    )
    ours = bench.run(config)

    assert set(ours) - {"jax"} <= set(trl), set(ours) - set(trl)
    for key in load_script("compare").PAIR_KEYS:  # the same workload, so a pair
        assert trl[key] == ours[key], (key, trl[key], ours[key])
    assert trl["trainer"] == "trl" and trl["trl"] and trl["torch"] and trl["transformers"]
    for key in ("pairs_per_s", "tokens_per_s", "mfu", "step_s", "compile_s", "tokens_per_step"):
        assert math.isfinite(trl[key]) and trl[key] > 0, (key, trl[key])
    assert trl["peak_memory_gb"] is None and trl["device"] == "cpu"  # no CUDA here
    assert math.isfinite(trl["loss"]) and abs(trl["loss"] - math.log(2)) < 0.05
    # Same model, same batch, same pairs.
    assert trl["params"] == ours["params"] == trl["dpo_jax_params"]
    assert trl["pairs_per_step"] == ours["pairs_per_step"] == 8
    assert trl["peak_flops_source"] == ours["peak_flops_source"]
    ours_tokens = ours["tokens_per_s"] * ours["step_s"]
    assert math.isclose(trl["tokens_per_step"], ours_tokens, rel_tol=1e-3)
    assert math.isclose(trl["tokens_per_s"] * trl["step_s"], ours_tokens, rel_tol=1e-3)
    # Same FLOPs per step over the same (whole-process) peak: MFU × step time agrees.
    assert math.isclose(trl["mfu"] * trl["step_s"], ours["mfu"] * ours["step_s"], rel_tol=0.02)
    # TRL pads each batch to its longest row, ours (without packing) to max_seq_length rows.
    assert 0 < trl["padding_fraction"] <= ours["padding_fraction"] < 1


def test_compare_pairs_runs_of_the_same_workload_whatever_each_trainer_did(tmp_path):
    compare = load_script("compare")
    workload = {
        "preset": "llama3_2_1b",
        "lengths": "hh",
        "prompt_length": None,
        "completion_length": None,
        "max_seq_length": 1024,
        "batch_size": 8,
        "pairs_per_step": 8,
        "gradient_accumulation_steps": 1,
        "seed": 0,
        "precision": "pure bf16",
        "precompute_ref_log_probs": False,
    }
    runs = [
        ("hh8", dict(workload, trainer="dpo_jax", packing=True, pairs_per_s=30.0)),
        ("hh8", dict(workload, trainer="trl", packing=False, pairs_per_s=10.0)),
        ("fp32", dict(workload, trainer="dpo_jax", precision="fp32 weights", pairs_per_s=5.0)),
        # QLoRA is another workload than TRL's full fine-tuning (its lines say rank 0).
        ("q", dict(workload, trainer="dpo_jax", lora_rank=16, quantization="nf4", pairs_per_s=9.0)),
    ]
    path = tmp_path / "results.jsonl"
    lines = [json.dumps({"case": c, "command": "x", "result": r}) for c, r in runs]
    lines.append(json.dumps({"case": "big", "command": "y", "error": "timeout after 200 s"}))
    path.write_text("\n".join(lines) + "\n")
    results, failures = compare.read([str(path)])
    assert len(results) == 4 and failures[0]["case"] == "big"
    (pair,) = compare.pairs(results)  # neither the fp32 nor the QLoRA run has a TRL partner
    assert "pairs/s 3.00×" in pair and "packed" in pair and "padded" in pair
    table = compare.table(results)
    assert table.count("\n| ") == 4  # a row per run under the header
    assert table.count("LoRA r16 on nf4 base") == 1


def test_data_bench_runs_trls_preparation_beside_ours(tmp_path):
    """python -m dpo_jax.data.bench on a few pairs: both tokenizations run on the same file
    and agree token for token wherever neither truncates (figures, not a timed test)."""
    result = subprocess.run(
        [sys.executable, "-m", "dpo_jax.data.bench", "--pairs", "300", "--batch_size", "8"]
        + ["--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "ours, cold: 300 pairs" in out and "ours, warm: 300 pairs" in out
    match = re.search(r"token ids equal to ours in (\d+) of (\d+) untruncated pairs", out)
    assert match and int(match[1]) == int(match[2]) >= 100, out
    assert re.search(r"vs TRL's preparation alone: [\d.]+x faster", out), out
    assert re.search(r"packed: efficiency [\d.]+%, \d+ rows", out), out
