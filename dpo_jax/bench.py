"""Benchmark of the jitted DPO train step on synthetic pairs.

    python -m dpo_jax.bench --config configs/bench.py[:preset] [--config.a.b=v ...]

Every step trains on `training.batch_size` fresh synthetic pairs (`synthetic_steps`, also
what benchmarks/trl_dpo.py feeds TRL), split in order into the accumulation micro-batches.
Each micro-batch is padded (one sequence per row of `data.max_seq_length`) or, with
`bench.packing`, packed first-fit-decreasing into `bench.packed_rows` such rows: the same
pairs per step either way, only the padding changes. With
`training.precompute_ref_log_probs` the batches carry reference log-probs (`ref_logps`) and
no reference weights exist on the device.

Model FLOPs (dpo_jax.throughput): 6N per real token, +2N when the reference forward runs in
the step, plus causal attention over each sequence's own length, counted from the real
sequences of the built batches; padding never counts. Prints one JSON line at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dpo_jax import attention, data, hf, memory, model, optim, sharding, throughput, train
from dpo_jax.data.batching import pack_step, packed_row_length, pair_parts
from dpo_jax.step import LossConfig, train_step

config_flags.DEFINE_config_file("config", None, "configs/bench.py[:preset]", lock_config=True)

PAD_ID = 0
SHORT_DTYPES = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}

# Shapes of real checkpoints (config.json fields); weights are random.
PRESETS = {
    "llama3_2_1b": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "qwen2_5_0_5b": dict(
        architectures=["Qwen2ForCausalLM"],
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
    ),
    "llama3_1_8b": dict(
        architectures=["LlamaForCausalLM"],
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
}


def model_config_for(config) -> model.ModelConfig:
    runtime = dict(
        dtype=config.model.dtype,
        param_dtype=config.model.param_dtype,
        attention_impl=config.model.attention_impl or None,
        remat_policy=config.model.remat_policy,
    )
    if config.bench.preset == "tiny":
        from dpo_jax import embedded

        return hf.read_model_config(embedded.TINY_MODEL_DIR, **runtime)
    if config.bench.preset not in PRESETS:
        raise SystemExit(
            f"config bench.preset={config.bench.preset!r}: choose tiny or one of {sorted(PRESETS)}"
        )
    return hf.model_config_from_hf(PRESETS[config.bench.preset], **runtime)


def packed_segments_bound(config, batches: list) -> int | None:
    """bench.max_segments_per_row for plain packed rows (cuDNN's packed layout; ignored on
    XLA): -1 = the most sequences any built row holds (at least 2), 0 = none (the mask)."""
    b = config.bench
    if not b.packing or b.prefix_sharing or b.max_segments_per_row == 0:
        return None
    most = max(int(batch["segment_ids"].max()) for batch in batches)
    if b.max_segments_per_row < 0:
        return max(2, most)
    if b.max_segments_per_row < most or b.max_segments_per_row < 2:
        raise SystemExit(
            f"config bench.max_segments_per_row={b.max_segments_per_row}: packed rows hold up "
            f"to {most} sequences; use 0 (mask), -1 (automatic) or at least {max(2, most)}"
        )
    return b.max_segments_per_row


def precision(param_dtype: str, optimizer_state_dtype: str, dtype: str) -> str:
    """One label for a precision policy, the same for both trainers ("pure bf16", or
    "fp32 weights, fp32 Adam, bf16 compute"); benchmarks/compare.py pairs runs by it."""
    p, o, d = (SHORT_DTYPES.get(x, x) for x in (param_dtype, optimizer_state_dtype, dtype))
    return f"pure {p}" if p == o == d else f"{p} weights, {o} Adam, {d} compute"


# ------------------------------------------------------------------ synthetic pairs


def synthetic_lengths(config, rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, 3] prompt / chosen / rejected lengths, each pair side ≤ max_seq_length."""
    b, max_len = config.bench, config.data.max_seq_length
    if b.lengths == "fixed":
        if b.prompt_length + b.completion_length > max_len:
            raise SystemExit(
                f"config bench.prompt_length + bench.completion_length = "
                f"{b.prompt_length + b.completion_length} exceeds data.max_seq_length={max_len}"
            )
        return np.tile([b.prompt_length, b.completion_length, b.completion_length], (count, 1))
    if b.lengths != "hh":
        raise SystemExit(f"config bench.lengths={b.lengths!r}: choose fixed or hh")
    # Like Anthropic HH: prompt + response median ~145 tokens, p95 ~450, long tail to max.
    total = np.exp(rng.normal(np.log(145), np.log(450 / 145) / 1.645, count))
    total = np.clip(total, 16, max_len).astype(int)
    prompt = np.maximum(4, (total * rng.uniform(0.4, 0.8, count)).astype(int))
    chosen = np.maximum(1, total - prompt)
    rejected = np.clip((chosen * rng.uniform(0.6, 1.4, count)).astype(int), 1, max_len - prompt)
    return np.stack([prompt, chosen, rejected], axis=1)


def synthetic_pairs(
    config, vocab_size: int, rng: np.random.Generator, count: int
) -> list[data.TokenizedPair]:
    """`count` pairs: lengths from synthetic_lengths, then token ids in [3, vocab_size)."""
    return [
        data.TokenizedPair(
            *(rng.integers(3, vocab_size, n).astype(np.int32) for n in row), source="synthetic"
        )
        for row in synthetic_lengths(config, rng, count)
    ]


def synthetic_steps(config, vocab_size: int, num_steps: int) -> list[list[data.TokenizedPair]]:
    """The pairs of each step, `training.batch_size` per step, from `bench.seed`: the one
    source of pairs for dpo_jax.bench and benchmarks/trl_dpo.py."""
    rng = np.random.default_rng(config.bench.seed)
    return [
        synthetic_pairs(config, vocab_size, rng, config.training.batch_size)
        for _ in range(num_steps)
    ]


def micro_batches(config, pairs: list) -> list[list]:
    """A step's pairs in order, split into the accumulation micro-batches (as TRL's
    sequential sampler splits them)."""
    accumulation = config.training.gradient_accumulation_steps
    if len(pairs) % accumulation:
        raise SystemExit(
            f"config training.batch_size={len(pairs)} is not divisible by "
            f"training.gradient_accumulation_steps={accumulation}"
        )
    micro = len(pairs) // accumulation
    return [pairs[a * micro : (a + 1) * micro] for a in range(accumulation)]


# ------------------------------------------------------------------------ batches


def rows_needed(pairs: list, row_length: int, shared: bool = False) -> int:
    """Fewest rows of `row_length` that first-fit decreasing packs these pairs into."""
    first, second = pair_parts(pairs, shared)
    total = int(first.sum() + (0 if second is None else second.sum()))
    rows = max(1, -(-total // row_length))
    while True:
        # With more rows the first ones fill exactly as before, so the first fit is the fewest.
        _, left = pack_step(
            range(len(pairs)),
            first,
            second,
            micro_batches=1,
            rows=rows,
            row_length=row_length,
            pair_slots=len(pairs),
        )
        if not left:
            return rows
        rows += 1


def row_length_of(config) -> int:
    """Row length of the built batches, by the trainer's rule."""
    shared = bool(config.bench.packing and config.bench.prefix_sharing)
    return packed_row_length(config.data.max_seq_length, shared)


def packed_rows(config, steps: list, data_parallel: int) -> int:
    """Rows per packed micro-batch: `bench.packed_rows`, or (0) the fewest that hold every
    micro-batch of every step, rounded up to a multiple of the data-parallel size."""
    row_length, shared = row_length_of(config), bool(config.bench.prefix_sharing)
    need = max(
        rows_needed(m, row_length, shared) for pairs in steps for m in micro_batches(config, pairs)
    )
    rows = config.bench.packed_rows
    if rows == 0:
        return -(-need // data_parallel) * data_parallel
    if rows < need:
        raise SystemExit(
            f"config bench.packed_rows={rows}: the pairs of a micro-batch need {need} rows of "
            f"{row_length} tokens when packed; set bench.packed_rows to at least {need}, or 0 "
            "to choose automatically"
        )
    return rows


def synthetic_ref_logps(batch: dict, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    """[A, 2P] stand-ins for precomputed reference log-probs: about what a random-init model
    gives (-ln V per completion token), 0 for empty pair slots. The step's time does not
    depend on their values."""
    accumulation, num_pairs = batch["pair_mask"].shape
    out = np.zeros((accumulation, 2 * num_pairs), np.float32)
    for a in range(accumulation):
        ids = batch["sequence_ids"][a][batch["loss_mask"][a]]
        tokens = np.bincount(ids, minlength=2 * num_pairs)
        out[a] = -tokens * np.log(vocab_size) + rng.normal(0.0, 1.0, 2 * num_pairs)
    valid = np.repeat(batch["pair_mask"], 2, axis=1)
    return np.where(valid, out, 0.0).astype(np.float32)


def build_batch(config, pairs: list, rows: int, vocab_size: int, rng: np.random.Generator):
    """One step's host batch [A, R, T] in the DESIGN layout, pairs in order (slot p = pair p
    of its micro-batch); with ref_logps [A, 2P] when they are precomputed."""
    row_length = row_length_of(config)
    parts = []
    for micro in micro_batches(config, pairs):
        if config.bench.packing:
            shared = bool(config.bench.prefix_sharing)
            parts.append(
                data.packed_batch(
                    micro, len(micro), rows, row_length, PAD_ID, prefix_sharing=shared
                )
            )
        else:
            parts.append(data.padded_batch(micro, len(micro), row_length, PAD_ID))
    batch = data.stack_batches(parts)
    if config.training.precompute_ref_log_probs:
        batch["ref_logps"] = synthetic_ref_logps(batch, vocab_size, rng)
    return batch


# ---------------------------------------------------------------------------- run


def run(config, devices=None) -> dict:
    """Benchmarks the step on `devices` (default: all) and returns the JSON fields."""
    model_config = model_config_for(config)
    t, b = config.training, config.bench
    loss_config = LossConfig(
        loss_type=(t.loss_type,),
        beta=t.beta,
        reference_free=t.reference_free,
        logits_chunk_size=config.model.logits_chunk_size,
    )
    precompute = loss_config.needs_reference and bool(t.precompute_ref_log_probs)
    in_step_reference = loss_config.needs_reference and not precompute
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    data_parallel = sharding.data_parallel_size(mesh)

    # Pairs and batches first: a packing that does not fit stops before any compilation.
    steps = synthetic_steps(config, model_config.vocab_size, 1 + b.warmup_steps + b.steps)
    micro = t.batch_size // t.gradient_accumulation_steps
    rows = packed_rows(config, steps, data_parallel) if b.packing else 2 * micro
    what = "bench.packed_rows" if b.packing else "2 × training.batch_size / accumulation"
    sharding.check_batch_rows(rows, mesh, f"rows per micro-batch ({what})")
    ref_rng = np.random.default_rng([b.seed, 1])  # apart from the pairs' draws
    batches = [
        build_batch(config, pairs, rows, model_config.vocab_size, ref_rng) for pairs in steps
    ]
    segments_bound = packed_segments_bound(config, batches)
    model_config = dataclasses.replace(model_config, max_segments_per_row=segments_bound)

    optim_config = optim.OptimConfig(
        learning_rate=t.learning_rate, total_steps=1000, state_dtype=t.optimizer_state_dtype
    )
    optimizer, schedule = optim.make_optimizer(optim_config), optim.make_schedule(optim_config)
    shardings = train.state_shardings(model_config, optimizer, mesh, tuple(config.mesh.rules))
    state = train.init_state(config, model_config, optimizer, shardings)
    # The frozen reference exists only when its forward runs in the step.
    ref = train.copy_params(state.params, shardings.params) if in_step_reference else None
    row_length = row_length_of(config)
    parts = memory.estimate(
        state,
        ref,
        model_config,
        tokens_per_device=rows * row_length // data_parallel,
        row_length=row_length,
        logits_chunk_size=loss_config.logits_chunk_size,
    )
    print(f"memory per device (estimate): {memory.describe(parts)}", flush=True)

    step_fn = jax.jit(
        functools.partial(
            train_step,
            model_config=model_config,
            loss_config=loss_config,
            optimizer=optimizer,
            schedule=schedule,
            padded_rows=not b.packing,
        ),
        in_shardings=(shardings, shardings.params if ref is not None else None, None),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    placed = [sharding.put_batch(batch, mesh, row_axis=1) for batch in batches]

    started = time.perf_counter()
    compiled = step_fn.lower(state, ref, placed[0]).compile()
    compile_s = time.perf_counter() - started
    # XLA's own plan (before running, so an out-of-memory run still leaves it in the log).
    analysis = compiled.memory_analysis()
    temp_gb = None if analysis is None else analysis.temp_size_in_bytes / memory.GiB
    if analysis is not None:
        print(
            f"compiled step memory: arguments {analysis.argument_size_in_bytes / memory.GiB:.2f}"
            f" GiB, temporaries {temp_gb:.2f} GiB",
            flush=True,
        )
    for batch in placed[: 1 + b.warmup_steps]:
        state, metrics = compiled(state, ref, batch)
    jax.block_until_ready(metrics)
    times = []
    for batch in placed[1 + b.warmup_steps :]:
        started = time.perf_counter()
        state, metrics = compiled(state, ref, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)

    # Figures of the timed steps, from the real tokens of the batches as built.
    timed = batches[1 + b.warmup_steps :]
    step_s = float(np.median(times))
    tokens = float(np.mean([(batch["segment_ids"] != 0).sum() for batch in timed]))
    slots = float(np.mean([batch["segment_ids"].size for batch in timed]))
    flops = float(
        np.mean([throughput.batch_flops(model_config, batch, in_step_reference) for batch in timed])
    )
    device = mesh.devices.flat[0]
    peak, peak_source = throughput.peak_flops(device)
    memory_gb = train.device_memory_gb()
    fixed = b.lengths == "fixed"
    return {
        "trainer": "dpo_jax",
        "preset": b.preset,
        "device": device.device_kind,
        "devices": int(mesh.devices.size),
        "params": model.num_params(model_config),
        "pairs_per_step": t.batch_size,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "pairs_per_s": round(t.batch_size / step_s, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "padding_fraction": round(1 - tokens / slots, 4),
        "mfu": round(flops / step_s / (peak * mesh.devices.size), 4),
        "peak_flops_source": peak_source,
        "peak_memory_gb": None if memory_gb is None else round(memory_gb, 2),
        "loss": float(metrics["loss"]),
        "estimated_memory_gb": round(parts["total"] / memory.GiB, 2),
        "compiled_temp_gb": None if temp_gb is None else round(temp_gb, 2),
        # The workload (benchmarks/compare.py pairs runs by these) ...
        "lengths": b.lengths,
        "prompt_length": b.prompt_length if fixed else None,
        "completion_length": b.completion_length if fixed else None,
        "max_seq_length": config.data.max_seq_length,
        "row_length": row_length,
        "batch_size": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "seed": b.seed,
        "precision": precision(
            config.model.param_dtype, t.optimizer_state_dtype, config.model.dtype
        ),
        "precompute_ref_log_probs": precompute,
        # ... and how this trainer ran it.
        "packing": bool(b.packing),
        "prefix_sharing": bool(b.packing and b.prefix_sharing),
        "max_segments_per_row": segments_bound,
        # Whether the attention really took cuDNN's packed segment layout (it falls back to
        # the mask without cuDNN >= 9.6 on Hopper, or when JAX's private API moved).
        "cudnn_packed_layout": bool(
            segments_bound
            and model_config.attention_impl == "cudnn"
            and model_config.sliding_window is None
            and model_config.attn_logit_softcap is None
            and attention.cudnn_packed_api() is not None
        ),
        "rows_per_micro_batch": rows,
        "tokens_per_micro_batch": rows * row_length,
        "tokens_per_step": tokens,
        "remat_policy": config.model.remat_policy,
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "optimizer_state_dtype": t.optimizer_state_dtype,
        "attention_impl": config.model.attention_impl or "xla",
        "logits_chunk_size": loss_config.logits_chunk_size,
        "jax": jax.__version__,
    }


def main(argv) -> None:
    del argv
    result = run(flags.FLAGS.config)
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
