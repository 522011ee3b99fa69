"""The benchmark's code path runs on CPU (tiny preset) and reports sane figures."""

import math

import jax
import numpy as np
import pytest
from conftest import load_config

from dpo_jax import bench, bench_workload, lora, memory, model, settings, state, throughput

# Every field a result must carry (benchmarks/trl_dpo.py prints the same ones).
FIELDS = (
    "lengths",
    "prompt_length",
    "completion_length",
    "max_seq_length",
    "batch_size",
    "gradient_accumulation_steps",
    "packing",
    "prefix_sharing",
    "precompute_ref_log_probs",
    "remat_policy",
    "dtype",
    "param_dtype",
    "optimizer_state_dtype",
    "attention_impl",
    "logits_chunk_size",
    "tokens_per_micro_batch",
    "precision",
)

# HH-like lengths in rows of 256 (the tiny model's context): pairs vary, so padding shows.
HH = {
    "bench.lengths": "hh",
    "data.max_seq_length": 256,
    "bench.steps": 1,
    "bench.warmup_steps": 0,
}


def assert_positive_finite(result):
    for key in ("pairs_per_s", "tokens_per_s", "mfu", "step_s", "compile_s"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])


def test_tiny_benchmark_reports_positive_finite_figures():
    config = load_config(
        "bench", **{"bench.steps": 2, "bench.warmup_steps": 1, "mesh.fsdp": 1, "mesh.data": -1}
    )
    result = bench.run(config)
    assert_positive_finite(result)
    assert result["padding_fraction"] == 0.0  # fixed lengths fill the rows exactly
    assert result["devices"] == 8
    assert set(FIELDS) <= set(result), set(FIELDS) - set(result)
    assert result["tokens_per_micro_batch"] == 2 * 8 * 48  # 16 rows of 48
    assert result["tokens_per_step"] == 8 * 2 * (24 + 24)
    assert result["precision"] == "pure fp32" and not result["packing"]
    assert result["lengths"] == "fixed" and result["prompt_length"] == 24


def test_packing_lowers_padding_and_precomputed_reference_holds_no_weights(monkeypatch):
    one_device = jax.devices()[:1]
    padded = bench.run(load_config("bench", **HH), devices=one_device)

    def no_reference_copy(*args):
        raise AssertionError("precomputed reference log-probs must not copy the weights")

    monkeypatch.setattr(state, "copy_params", no_reference_copy)
    packed = bench.run(
        load_config(
            "bench",
            **HH,
            **{"data.packing": True, "training.precompute_ref_log_probs": True},
        ),
        devices=one_device,
    )
    for result in (padded, packed):
        assert_positive_finite(result)
        assert set(FIELDS) <= set(result)
        assert result["prompt_length"] is None and result["completion_length"] is None
    # The same pairs and tokens per step, in fewer rows.
    assert packed["tokens_per_step"] == padded["tokens_per_step"]
    assert packed["pairs_per_step"] == padded["pairs_per_step"] == 8
    assert packed["rows_per_micro_batch"] < padded["rows_per_micro_batch"] == 16
    assert 0 < packed["padding_fraction"] < padded["padding_fraction"]
    assert packed["packing"] and packed["precompute_ref_log_probs"]
    assert math.isfinite(packed["loss"])
    # No reference forward: 6N per token instead of 8N, so less MFU per token/s.
    mfu_per_token = {r["packing"]: r["mfu"] / r["tokens_per_s"] for r in (padded, packed)}
    assert mfu_per_token[True] < 0.8 * mfu_per_token[False]


def test_prefix_sharing_gives_the_same_loss_on_fewer_tokens():
    """The same pairs and initial weights, packed as separate sequences and as prefix-shared
    groups: the step-0 loss agrees, fewer tokens are computed, and the FLOPs counted are
    those of the shared layout (the prompt once)."""
    one_device = jax.devices()[:1]
    packed_config = load_config("bench", **HH, **{"data.packing": True})
    packed = bench.run(packed_config, devices=one_device)
    shared = bench.run(
        load_config("bench", **HH, **{"data.packing": True, "data.prefix_sharing": True}),
        devices=one_device,
    )
    assert_positive_finite(shared)
    assert shared["prefix_sharing"] and not packed["prefix_sharing"]
    assert shared["row_length"] == 2 * packed["row_length"] == 512
    assert math.isclose(shared["loss"], packed["loss"], rel_tol=1e-5)
    # The one timed step is the second (the first compiles).
    workload = bench_workload.workload(packed_config)
    vocab_size = bench_workload.model_config_for(workload).vocab_size
    _, pairs = bench_workload.synthetic_steps(workload, vocab_size, 2)
    prompts = sum(len(p.prompt) for p in pairs)
    assert shared["tokens_per_step"] == packed["tokens_per_step"] - prompts


def test_synthetic_pairs_packed_and_padded_hold_the_same_sequences():
    config = load_config("bench", **HH, **{"training.gradient_accumulation_steps": 2})
    workload = bench_workload.workload(config)
    (pairs,) = bench_workload.synthetic_steps(workload, 1024, 1)
    lengths = np.array([[len(p.prompt), len(p.chosen), len(p.rejected)] for p in pairs])
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(lengths, bench_workload.synthetic_lengths(workload, rng, 8))
    assert 0 < (lengths[:, 0] + np.maximum(lengths[:, 1], lengths[:, 2])).max() <= 256

    padded = bench_workload.build_batch(workload, pairs, 8, 1024, rng)
    config.data.packing = True
    workload = bench_workload.workload(config)
    rows = bench_workload.packed_rows(workload, [pairs], data_parallel=1)
    packed = bench_workload.build_batch(workload, pairs, rows, 1024, rng)
    assert padded["tokens"].shape == (2, 8, 256) and packed["tokens"].shape == (2, rows, 256)
    assert rows <= 8  # never more rows than padding needs
    # Padding never counts: the same real sequences, so the same model FLOPs.
    same = [np.sort(throughput.batch_sequence_lengths(b)) for b in (padded, packed)]
    np.testing.assert_array_equal(*same)
    np.testing.assert_array_equal(np.sort(same[0]), np.sort([n for p in pairs for n in p.lengths]))


def test_packing_builds_fixed_rows_and_says_which_key_when_pairs_do_not_fit():
    config = load_config("bench", **HH, **{"data.packing": True})
    workload = bench_workload.workload(config)
    steps = bench_workload.synthetic_steps(workload, 1024, 3)
    need = max(bench_workload.rows_needed(pairs, 256) for pairs in steps)
    assert bench_workload.packed_rows(workload, steps, data_parallel=1) == need
    assert bench_workload.packed_rows(workload, steps, data_parallel=4) == -(-need // 4) * 4
    batch = bench_workload.build_batch(workload, steps[0], need, 1024, np.random.default_rng(0))
    assert batch["tokens"].shape == (1, need, 256)
    assert batch["pair_mask"].shape == (1, 8) and batch["pair_mask"].all()
    # Chosen of pair p is sequence 2p, rejected 2p+1, whatever row they landed in.
    for p, pair in enumerate(steps[0]):
        for side, n in enumerate(pair.lengths):
            real = batch["segment_ids"][0] != 0
            assert ((batch["sequence_ids"][0] == 2 * p + side) & real).sum() == n

    config.data.packed_rows = need - 1
    with pytest.raises(settings.ConfigError, match=r"data\.packed_rows"):
        bench_workload.packed_rows(bench_workload.workload(config), steps, data_parallel=1)


def test_precomputed_reference_log_probs_are_finite_and_zero_in_empty_slots():
    config = load_config("bench", **HH, **{"training.precompute_ref_log_probs": True})
    workload = bench_workload.workload(config)
    (pairs,) = bench_workload.synthetic_steps(workload, 1024, 1)
    batch = bench_workload.build_batch(workload, pairs[:5], 16, 1024, np.random.default_rng(0))
    ref = batch["ref_logps"]
    assert ref.shape == (1, 10) and ref.dtype == np.float32 and np.isfinite(ref).all()
    assert (ref < 0).all()  # -ln V per completion token, about a random model's
    # An empty pair slot (a padded micro-batch of fewer pairs) carries zeros.
    batch["pair_mask"][0, 4] = False
    again = bench_workload.synthetic_ref_logps(batch, 1024, np.random.default_rng(0))
    assert (again[0, 8:] == 0).all() and (again[0, :8] < 0).all()


def test_precision_labels_match_between_trainers():
    assert bench_workload.precision("bfloat16", "bfloat16", "bfloat16") == "pure bf16"
    assert (
        bench_workload.precision("float32", "float32", "bfloat16")
        == "fp32 weights, fp32 Adam, bf16 compute"
    )


def test_segment_bound_follows_the_trainers_rule_and_the_packer_keeps_it():
    """data.max_segments_per_row means in the benchmark what it means in training: 0 = the
    mask, >= 2 a bound the packed rows keep (cuDNN's packed layout), 1 a config error, and
    prefix-shared rows always the mask."""
    bound = lambda **o: (
        bench_workload.model_config_for(  # noqa: E731
            bench_workload.workload(load_config("bench", **HH, **{"data.packing": True} | o))
        ).max_segments_per_row
    )
    assert bound() is None
    assert bound(**{"data.max_segments_per_row": 2}) == 2
    assert bound(**{"data.max_segments_per_row": 2, "data.prefix_sharing": True}) is None
    with pytest.raises(settings.ConfigError, match="data.max_segments_per_row=1"):
        bound(**{"data.max_segments_per_row": 1})

    # Sequences of 16 tokens in rows of 64: four to a row when nothing bounds them.
    short = {"data.packing": True, "bench.prompt_length": 8, "bench.completion_length": 8}
    short["data.max_seq_length"] = 64
    free = bench_workload.workload(load_config("bench", **short))
    capped = bench_workload.workload(
        load_config("bench", **short, **{"data.max_segments_per_row": 2})
    )
    steps = bench_workload.synthetic_steps(free, 1024, 2)
    rows = [bench_workload.packed_rows(w, steps, data_parallel=1) for w in (free, capped)]
    most = [
        bench_workload.build_batch(w, steps[0], n, 1024, None)["segment_ids"].max()
        for w, n in zip((free, capped), rows, strict=True)
    ]
    assert most[0] == 4
    assert most[1] == 2 and rows[1] > rows[0]
    # Prefix-shared rows take the mask, but the packer keeps the bound as the trainer's does.
    shared = short | {"data.max_segments_per_row": 2, "data.prefix_sharing": True}
    shared = bench_workload.workload(load_config("bench", **shared))
    assert (
        bench_workload.segments_cap(shared) == 2
        and bench_workload.model_config_for(shared).max_segments_per_row is None
    )


def test_qlora_benchmark_trains_only_the_adapters_on_a_4bit_base():
    """The tiny QLoRA case runs the trainer's step: the figures are finite, the result says
    what ran, and only the adapters count as trainable."""
    lora_settings = {"lora.rank": 4, "lora.alpha": 8.0, "lora.quantization": "nf4"}
    config = load_config("bench", **HH, **lora_settings)
    result = bench.run(config, devices=jax.devices()[:1])
    assert_positive_finite(result)
    assert math.isfinite(result["loss"])
    assert result["lora_rank"] == 4 and result["quantization"] == "nf4"
    model_config = bench_workload.model_config_for(bench_workload.workload(config))
    assert result["trainable_params"] == lora.adapter_count(model_config)
    assert result["trainable_params"] < result["params"] // 5


# Llama-3.1-8B by hand (its HF config: width 4096, MLP 14336, 32 layers, 8 KV heads of 128,
# vocabulary 128256, untied head). The 7 projections of a layer, then everything else.
LLAMA_8B_PROJECTIONS = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
LLAMA_8B_OTHER = 2 * 128256 * 4096 + (2 * 32 + 1) * 4096  # embedding, head, RMSNorm scales
# Rank-r adapters hold r·(in + out) per projection.
LLAMA_8B_ADAPTERS_PER_RANK = 32 * (2 * 8192 + 2 * 5120 + 3 * 18432)


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_8b_lora_memory_estimate_follows_the_stored_bytes(quantization):
    """estimate_only on Llama-3.1-8B's shapes (nothing allocated): the frozen base costs
    0.5 (NF4) or 1 (int8) byte per projection weight plus a float32 scale per 64-element
    block, 2 bytes (bf16) for the rest and for an unquantized base; the adapters and their two
    Adam moments are 2 bytes per rank-16 adapter weight."""
    config = load_config(
        "bench",
        "llama3_1_8b",
        **{
            "lora.rank": 16,
            "lora.quantization": quantization,
            "model.remat_policy": "full",
            "bench.estimate_only": True,
        },
    )
    result = bench.run(config, devices=jax.devices()[:1])
    assert result["params"] == LLAMA_8B_PROJECTIONS + LLAMA_8B_OTHER == 8_030_261_248
    adapters = 16 * LLAMA_8B_ADAPTERS_PER_RANK
    assert result["trainable_params"] == adapters == 41_943_040
    per_weight = {"nf4": 0.5 + 4 / 64, "int8": 1 + 4 / 64, "none": 2.0}[quantization]
    base_bytes = LLAMA_8B_PROJECTIONS * per_weight + LLAMA_8B_OTHER * 2
    # Figures are printed in GiB to 2 decimals: within half a unit of the last digit.
    half_unit = 0.005 + 1e-9
    assert abs(result["estimated_base_gb"] - base_bytes / memory.GiB) <= half_unit
    assert abs(result["estimated_adapters_gb"] - 2 * adapters / memory.GiB) <= half_unit
    assert abs(result["estimated_optimizer_gb"] - 4 * adapters / memory.GiB) <= half_unit
    assert "estimated_reference_gb" not in result  # the base is the reference
    parts = ("base", "adapters", "optimizer", "gradients", "activations")
    total = sum(result[f"estimated_{part}_gb"] for part in parts)
    assert abs(result["estimated_total_gb"] - total) <= len(parts) * half_unit
    if quantization == "nf4":  # QLoRA's promise: an 8B base in about 5 GiB, not 15
        assert 5.0 < result["estimated_base_gb"] < 6.0


def test_lora_step_flops_have_no_weight_gradients_for_the_frozen_base():
    """MFU's FLOPs with LoRA: the frozen base's matmuls run forward and input-gradient only
    (2 FLOPs per weight less per token than full training), and the adapters' 2·r·(in + out)
    per projection count x3; the reference forward (adapters off) is the base's."""
    full = bench_workload.model_config_for(
        bench_workload.workload(load_config("bench", "llama3_1_8b"))
    )
    adapted = bench_workload.model_config_for(
        bench_workload.workload(load_config("bench", "llama3_1_8b", **{"lora.rank": 16}))
    )
    matmul_weights = LLAMA_8B_PROJECTIONS + 128256 * 4096  # and the head; lookups are free
    adapters = 16 * LLAMA_8B_ADAPTERS_PER_RANK
    for seq_len in (512, 2048):
        saved = model.flops_per_token(full, seq_len) - model.flops_per_token(adapted, seq_len)
        assert saved == 2 * matmul_weights - 3 * 2 * adapters
        forward = [model.flops_per_token(c, seq_len, backward=False) for c in (full, adapted)]
        assert forward[0] == forward[1]
