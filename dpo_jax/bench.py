"""Benchmark of the jitted DPO train step on synthetic pairs.

    python -m dpo_jax.bench --config configs/bench.py[:preset] [--config.a.b=v ...]

The step timed is the trainer's own: the same settings path (dpo_jax.settings), loss,
optimizer, state and jitted program (dpo_jax.step.jit_train_step); only the pairs are
synthetic. Every step trains on `training.batch_size` fresh synthetic pairs
(`synthetic_steps`, also what benchmarks/trl_dpo.py feeds TRL), split in order into the
accumulation micro-batches. Each micro-batch is padded (one sequence per row of
`data.max_seq_length`) or, with `data.packing`, packed first-fit-decreasing into
`data.packed_rows` such rows: the same pairs per step either way, only the padding changes.
With `training.precompute_ref_log_probs` the batches carry reference log-probs (`ref_logps`)
and no reference weights exist on the device.

Model FLOPs (dpo_jax.throughput): 6N per real token, +2N when the reference forward runs in
the step, plus causal attention over each sequence's own length, counted from the real
sequences of the built batches; padding never counts. Prints one JSON line at the end.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dpo_jax import (
    attention,
    cli,
    data,
    hf,
    lora,
    memory,
    model,
    optim,
    settings,
    sharding,
    state,
    throughput,
)
from dpo_jax.data.batching import packed_row_length, pair_parts
from dpo_jax.data.batching import rows_needed as rows_needed_for
from dpo_jax.settings import BenchSettings, Settings
from dpo_jax.step import jit_train_step

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
# Llama 3.1 70B: the 8B's family at 80 layers of width 8192 (memory estimates: bench.estimate_only).
PRESETS["llama3_1_70b"] = PRESETS["llama3_1_8b"] | dict(
    hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
)


@dataclasses.dataclass(frozen=True)
class Workload:
    """A benchmark run: the trainer's settings and the benchmark's own."""

    s: Settings
    b: BenchSettings

    @property
    def packing(self) -> bool:
        return self.s.data.packing

    @property
    def prefix_sharing(self) -> bool:
        return self.s.data.packing and self.s.data.prefix_sharing


def workload(config) -> Workload:
    """configs/bench.py's ConfigDict → the typed workload (a bad value: ConfigError)."""
    return Workload(settings.from_config(config), settings.bench_settings(config))


def model_config_for(w: Workload) -> model.ModelConfig:
    """The preset's architecture with the settings' dtypes, attention, remat and segment
    bound: tiny reads the embedded model folder (model.name), the others PRESETS."""
    if w.b.preset == "tiny":
        return state.model_config(w.s.model)
    if w.b.preset not in PRESETS:
        raise settings.ConfigError(
            f"config bench.preset={w.b.preset!r}: choose tiny or one of {sorted(PRESETS)}"
        )
    m = w.s.model
    return hf.model_config_from_hf(
        PRESETS[w.b.preset],
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        attention_impl=m.attention_impl,
        remat_policy=m.remat_policy,
        max_segments_per_row=m.max_segments_per_row,
        **m.lora.model_fields(),
    )


def precision(param_dtype: str, optimizer_state_dtype: str, dtype: str) -> str:
    """One label for a precision policy, the same for both trainers ("pure bf16", or
    "fp32 weights, fp32 Adam, bf16 compute"); benchmarks/compare.py pairs runs by it."""
    p, o, d = (SHORT_DTYPES.get(x, x) for x in (param_dtype, optimizer_state_dtype, dtype))
    return f"pure {p}" if p == o == d else f"{p} weights, {o} Adam, {d} compute"


# ------------------------------------------------------------------ synthetic pairs


def synthetic_lengths(w: Workload, rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, 3] prompt / chosen / rejected lengths, each pair side ≤ max_seq_length."""
    b, max_len = w.b, w.s.data.max_seq_length
    if b.lengths == "fixed":
        if b.prompt_length + b.completion_length > max_len:
            raise settings.ConfigError(
                f"config bench.prompt_length + bench.completion_length = "
                f"{b.prompt_length + b.completion_length} exceeds data.max_seq_length={max_len}"
            )
        return np.tile([b.prompt_length, b.completion_length, b.completion_length], (count, 1))
    # Like Anthropic HH: prompt + response median ~145 tokens, p95 ~450, long tail to max.
    total = np.exp(rng.normal(np.log(145), np.log(450 / 145) / 1.645, count))
    total = np.clip(total, 16, max_len).astype(int)
    prompt = np.maximum(4, (total * rng.uniform(0.4, 0.8, count)).astype(int))
    chosen = np.maximum(1, total - prompt)
    rejected = np.clip((chosen * rng.uniform(0.6, 1.4, count)).astype(int), 1, max_len - prompt)
    return np.stack([prompt, chosen, rejected], axis=1)


def synthetic_pairs(
    w: Workload, vocab_size: int, rng: np.random.Generator, count: int
) -> list[data.TokenizedPair]:
    """`count` pairs: lengths from synthetic_lengths, then token ids in [3, vocab_size)."""
    return [
        data.TokenizedPair(
            *(rng.integers(3, vocab_size, n).astype(np.int32) for n in row), source="synthetic"
        )
        for row in synthetic_lengths(w, rng, count)
    ]


def synthetic_steps(w: Workload, vocab_size: int, num_steps: int) -> list[list[data.TokenizedPair]]:
    """The pairs of each step, `training.batch_size` per step, from `bench.seed`: the one
    source of pairs for dpo_jax.bench and benchmarks/trl_dpo.py."""
    rng = np.random.default_rng(w.b.seed)
    return [synthetic_pairs(w, vocab_size, rng, w.s.batch.batch_size) for _ in range(num_steps)]


def micro_batches(w: Workload, pairs: list) -> list[list]:
    """A step's pairs in order, split into the accumulation micro-batches (as TRL's
    sequential sampler splits them)."""
    accumulation = w.s.batch.accumulation_steps
    micro = len(pairs) // accumulation
    return [pairs[a * micro : (a + 1) * micro] for a in range(accumulation)]


# ------------------------------------------------------------------------ batches


def segments_cap(w: Workload) -> int:
    """Sequences per packed row at most (0 = no bound), as the trainer's packer takes it:
    data.max_segments_per_row in every packed layout (the model sees the bound only where
    cuDNN's packed layout may use it)."""
    return w.s.data.max_segments_per_row


def rows_needed(
    pairs: list, row_length: int, shared: bool = False, max_segments_per_row: int = 0
) -> int:
    """Fewest rows of `row_length` that first-fit decreasing packs these pairs into."""
    first, second = pair_parts(pairs, shared)
    return rows_needed_for(
        range(len(pairs)),
        first,
        second,
        row_length=row_length,
        max_segments_per_row=max_segments_per_row,
    )


def row_length_of(w: Workload) -> int:
    """Row length of the built batches, by the trainer's rule."""
    return packed_row_length(w.s.data.max_seq_length, w.prefix_sharing)


def packed_rows(w: Workload, steps: list, data_parallel: int) -> int:
    """Rows per packed micro-batch: `data.packed_rows`, or (0) the fewest that hold every
    micro-batch of every step, rounded up to a multiple of the data-parallel size."""
    row_length = row_length_of(w)
    need = max(
        rows_needed(m, row_length, w.prefix_sharing, segments_cap(w))
        for pairs in steps
        for m in micro_batches(w, pairs)
    )
    rows = w.s.data.packed_rows
    if rows == 0:
        return -(-need // data_parallel) * data_parallel
    if rows < need:
        raise settings.ConfigError(
            f"config data.packed_rows={rows}: the pairs of a micro-batch need {need} rows of "
            f"{row_length} tokens when packed; set data.packed_rows to at least {need}, or 0 "
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


def build_batch(w: Workload, pairs: list, rows: int, vocab_size: int, rng: np.random.Generator):
    """One step's host batch [A, R, T] in the DESIGN layout, pairs in order (slot p = pair p
    of its micro-batch); with ref_logps [A, 2P] when they are precomputed."""
    row_length = row_length_of(w)
    parts = []
    for micro in micro_batches(w, pairs):
        if w.packing:
            parts.append(
                data.packed_batch(
                    micro,
                    len(micro),
                    rows,
                    row_length,
                    PAD_ID,
                    prefix_sharing=w.prefix_sharing,
                    max_segments_per_row=segments_cap(w),
                )
            )
        else:
            parts.append(data.padded_batch(micro, len(micro), row_length, PAD_ID))
    batch = data.stack_batches(parts)
    if w.s.precompute_reference:
        batch["ref_logps"] = synthetic_ref_logps(batch, vocab_size, rng)
    return batch


# ---------------------------------------------------------------------------- run


def run(config, devices=None) -> dict:
    """Benchmarks the trainer's step for configs/bench.py's `config` on `devices` (default:
    all) and returns the JSON fields."""
    return run_workload(workload(config), devices)


def run_workload(w: Workload, devices=None) -> dict:
    s, b = w.s, w.b
    model_config = model_config_for(w)
    mesh = sharding.make_mesh(s.mesh.data, s.mesh.fsdp, s.mesh.tensor, devices)
    data_parallel = sharding.data_parallel_size(mesh)

    # Pairs and batches first: a packing that does not fit stops before any compilation.
    steps = synthetic_steps(w, model_config.vocab_size, 1 + b.warmup_steps + b.steps)
    rows = packed_rows(w, steps, data_parallel) if w.packing else s.batch.micro_batch_rows
    what = "data.packed_rows" if w.packing else "2 × training.batch_size / accumulation"
    sharding.check_batch_rows(rows, mesh, f"rows per micro-batch ({what})")
    ref_rng = np.random.default_rng([b.seed, 1])  # apart from the pairs' draws
    batches = [build_batch(w, pairs, rows, model_config.vocab_size, ref_rng) for pairs in steps]

    # The trainer's optimizer, state, reference and memory check (dpo_jax.train.run).
    optim_config = s.optim.for_steps(len(steps))
    optimizer, schedule = optim.make_optimizer(optim_config), optim.make_schedule(optim_config)
    shardings = state.state_shardings(model_config, optimizer, mesh, s.mesh.rules)
    frozen_shardings = state.frozen_shardings(s, model_config, mesh, shardings)
    row_length = row_length_of(w)
    # The trainer's estimate, printed but not enforced: an out-of-memory run is a result.
    parts = memory.check_state_fits(
        state.abstract_state(model_config, optimizer, shardings),
        model_config,
        mesh,
        frozen=state.abstract_frozen(s, model_config, frozen_shardings),
        rows=rows,
        row_length=row_length,
        logits_chunk_size=s.loss.logits_chunk_size,
        enforce=False,
    )
    if b.estimate_only:  # shapes only: nothing was allocated
        return (
            {"preset": b.preset, "devices": int(mesh.devices.size)}
            | workload_fields(w, model_config, rows, row_length)
            | {f"estimated_{name}_gb": round(v / memory.GiB, 2) for name, v in parts.items()}
        )
    train_state = state.init_state(s.model, model_config, s.loop.seed, optimizer, shardings)
    # The frozen reference (or LoRA base) exists only when the step reads it.
    ref, _ = state.frozen_weights(s, model_config, mesh, train_state, frozen_shardings)
    step_fn = jit_train_step(
        model_config,
        s.loss,
        optimizer,
        schedule,
        shardings,
        mesh,
        frozen_shardings=frozen_shardings,
        padded_rows=not w.packing,
        dropout_seed=s.loop.seed if s.model.lora.enabled and s.model.lora.dropout > 0 else None,
    )
    placed = [sharding.put_batch(batch, mesh, row_axis=1) for batch in batches]

    started = time.perf_counter()
    compiled = step_fn.lower(train_state, ref, placed[0]).compile()
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
        train_state, metrics = compiled(train_state, ref, batch)
    jax.block_until_ready(metrics)
    times = []
    for batch in placed[1 + b.warmup_steps :]:
        started = time.perf_counter()
        train_state, metrics = compiled(train_state, ref, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)

    # Figures of the timed steps, from the real tokens of the batches as built.
    timed = batches[1 + b.warmup_steps :]
    step_s = float(np.median(times))
    tokens = float(np.mean([(batch["segment_ids"] != 0).sum() for batch in timed]))
    slots = float(np.mean([batch["segment_ids"].size for batch in timed]))
    flops = float(
        np.mean(
            [throughput.batch_flops(model_config, batch, s.reference_on_device) for batch in timed]
        )
    )
    device = mesh.devices.flat[0]
    peak, peak_source = throughput.peak_flops(device)
    memory_gb = memory.device_peak_gb()
    return {
        "trainer": "dpo_jax",
        "preset": b.preset,
        "device": device.device_kind,
        "devices": int(mesh.devices.size),
        "pairs_per_step": s.batch.batch_size,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "pairs_per_s": round(s.batch.batch_size / step_s, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "tokens_per_step": tokens,
        "padding_fraction": round(1 - tokens / slots, 4),
        "mfu": round(flops / step_s / (peak * mesh.devices.size), 4),
        "peak_flops_source": peak_source,
        "peak_memory_gb": None if memory_gb is None else round(memory_gb, 2),
        "loss": float(metrics["loss"]),
        "estimated_memory_gb": round(parts["total"] / memory.GiB, 2),
        "compiled_temp_gb": None if temp_gb is None else round(temp_gb, 2),
    } | workload_fields(w, model_config, rows, row_length)


def workload_fields(w: Workload, model_config, rows: int, row_length: int) -> dict:
    """What was run: benchmarks/compare.py pairs runs by the workload's fields."""
    s, b = w.s, w.b
    fixed = b.lengths == "fixed"
    m, t = s.model, s.optim
    segments_bound = model_config.max_segments_per_row
    lora_on = m.lora.enabled
    return {
        "params": model.num_params(model_config),
        "trainable_params": lora.adapter_count(model_config)
        if lora_on
        else model.num_params(model_config),
        "lora_rank": m.lora.rank,
        "quantization": m.lora.quantization,
        "lengths": b.lengths,
        "prompt_length": b.prompt_length if fixed else None,
        "completion_length": b.completion_length if fixed else None,
        "max_seq_length": s.data.max_seq_length,
        "row_length": row_length,
        "batch_size": s.batch.batch_size,
        "gradient_accumulation_steps": s.batch.accumulation_steps,
        "seed": b.seed,
        "precision": precision(m.param_dtype, t.state_dtype, m.dtype),
        "precompute_ref_log_probs": s.precompute_reference,
        # ... and how this trainer ran it.
        "packing": w.packing,
        "prefix_sharing": w.prefix_sharing,
        "max_segments_per_row": segments_bound,
        # Whether the attention really took cuDNN's packed segment layout (it falls back to
        # the mask without cuDNN >= 9.6 on Hopper, or when JAX's private API moved).
        "cudnn_packed_layout": w.packing
        and attention.kernel_for(
            model_config, decode=False, padded_rows=False, prefix_shared=w.prefix_sharing
        )
        == attention.CUDNN_PACKED,
        "rows_per_micro_batch": rows,
        "tokens_per_micro_batch": rows * row_length,
        "remat_policy": model_config.remat_policy,
        "dtype": m.dtype,
        "param_dtype": m.param_dtype,
        "optimizer_state_dtype": t.state_dtype,
        "attention_impl": m.attention_impl or "xla",
        "logits_chunk_size": s.loss.logits_chunk_size,
        "jax": jax.__version__,
    }


def main(argv) -> None:
    del argv
    try:
        result = run(flags.FLAGS.config)
    except settings.USER_ERRORS as error:
        cli.fail(str(error), 2)
    for key, value in result.items():
        print(f"{key:>28}: {value}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.flags_parser(flags.FLAGS))
