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

import json
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dpo_jax import (
    attention,
    cli,
    lora,
    memory,
    model,
    optim,
    settings,
    sharding,
    state,
    throughput,
)
from dpo_jax.bench_workload import (
    Workload,
    build_batch,
    model_config_for,
    packed_rows,
    precision,
    row_length_of,
    synthetic_steps,
    workload,
)
from dpo_jax.step import jit_train_step

config_flags.DEFINE_config_file("config", None, "configs/bench.py[:preset]", lock_config=True)

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
