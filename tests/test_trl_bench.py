"""benchmarks/trl_dpo.py (TRL's DPOTrainer on our benchmark's model, pairs and batch) runs on
CPU with the tiny preset and reports dpo_jax.bench's fields with the same meaning.

Needs TRL (pip install trl==1.16.0); a missing TRL fails here rather than skipping."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
from conftest import REPO, load_config

from dpo_jax import bench

SCRIPT = os.path.join(REPO, "benchmarks", "trl_dpo.py")


def load_script():
    spec = importlib.util.spec_from_file_location("trl_dpo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_gets_our_pairs_and_its_collator_pads_as_counted():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    trl_dpo = load_script()
    args = trl_dpo.parse_args(
        ["--preset", "tiny", "--lengths", "hh", "--max_length", "256", "--pairs_per_step", "8"]
    )
    config = load_config("bench", **{"bench.lengths": "hh", "data.max_seq_length": 256})
    ours = list(bench.synthetic_batches(config, 1024, 3))
    theirs = trl_dpo.synthetic_steps(args, 1024, 3)
    collate = DataCollatorForPreference(pad_token_id=0, max_length=args.max_length)
    for (batch, lengths), (trl_lengths, pairs) in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(lengths, trl_lengths)
        rows = batch["tokens"].reshape(-1, batch["tokens"].shape[-1])
        for p, (prompt, chosen, rejected) in enumerate(pairs):
            for side, completion in enumerate((chosen, rejected)):
                sequence = np.concatenate([prompt, completion])
                np.testing.assert_array_equal(rows[2 * p + side, : len(sequence)], sequence)
        examples = [
            {"prompt_ids": a.tolist(), "chosen_ids": b.tolist(), "rejected_ids": c.tolist()}
            for a, b, c in pairs
        ]
        out = collate(examples)  # what TRL's step receives
        assert out["input_ids"].numel() == trl_dpo.padded_tokens(lengths, micro=8)
        assert int(out["attention_mask"].sum()) == trl_dpo.real_tokens(lengths)
        assert int(out["input_ids"].numel()) > trl_dpo.real_tokens(lengths)  # HH mix pads


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
