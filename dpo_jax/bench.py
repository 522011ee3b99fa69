"""Benchmark of the jitted DPO train step on synthetic pairs.

    python -m dpo_jax.bench --config configs/bench.py[:preset] [--config.a.b=v ...]

Model FLOPs (DESIGN): 6N per real token for the policy (forward + backward), +2N when the
reference forward runs in the step, plus causal attention over each sequence's own length;
padding is never counted. MFU divides by the card's dense bf16 peak, read from its name.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dpo_jax import data, hf, memory, model, optim, sharding, train
from dpo_jax.step import LossConfig, train_step

config_flags.DEFINE_config_file("config", None, "configs/bench.py[:preset]", lock_config=True)

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

# Dense bf16 peak FLOP/s by device name (first match wins; most specific first).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v4", 275e12),
    ("TPU v6", 918e12),
)


def peak_flops(device) -> tuple[float, str]:
    """(FLOP/s, how it was obtained) for one device."""
    name = getattr(device, "device_kind", "")
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops, f"{name} dense bf16 peak"
    # CPU: a nominal figure (2 GHz × 32 fp32 FLOP/cycle with AVX2 FMA, per core of this
    # process), so that MFU is comparable between CPU runs, not an absolute truth.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores * 2e9 * 32 / jax.local_device_count(), f"{name or 'cpu'} nominal"


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


def synthetic_lengths(config, rng: np.random.Generator, count: int) -> np.ndarray:
    """[count, 3] prompt / chosen / rejected lengths, each pair side ≤ max_seq_length."""
    b, max_len = config.bench, config.data.max_seq_length
    if b.lengths == "fixed":
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


def synthetic_batches(config, vocab_size: int, num_batches: int):
    rng = np.random.default_rng(config.bench.seed)
    pairs_per_step = config.training.batch_size
    accumulation = config.training.gradient_accumulation_steps
    micro = pairs_per_step // accumulation
    for _ in range(num_batches):
        lengths = synthetic_lengths(config, rng, pairs_per_step)
        pairs = [
            data.TokenizedPair(
                *(rng.integers(3, vocab_size, n).astype(np.int32) for n in row), source="synthetic"
            )
            for row in lengths
        ]
        yield (
            data.stack_batches(
                [
                    data.padded_batch(
                        pairs[a * micro : (a + 1) * micro],
                        micro,
                        config.data.max_seq_length,
                        pad_id=0,
                    )
                    for a in range(accumulation)
                ]
            ),
            lengths,
        )


def step_flops(model_config, lengths: np.ndarray, with_reference: bool) -> float:
    """Model FLOPs of one step: every real token of every sequence, no padding."""
    total = 0.0
    for prompt, *completions in lengths:
        for completion in completions:
            n = int(prompt + completion)
            per_token = model.flops_per_token(model_config, n, backward=True)
            if with_reference:
                per_token += model.flops_per_token(model_config, n, backward=False)
            total += per_token * n
    return total


def run(config) -> dict:
    model_config = model_config_for(config)
    t = config.training
    loss_config = LossConfig(
        loss_type=(t.loss_type,),
        beta=t.beta,
        reference_free=t.reference_free,
        logits_chunk_size=config.model.logits_chunk_size,
    )
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    optim_config = optim.OptimConfig(
        learning_rate=t.learning_rate, total_steps=1000, state_dtype=t.optimizer_state_dtype
    )
    optimizer, schedule = optim.make_optimizer(optim_config), optim.make_schedule(optim_config)
    shardings = train.state_shardings(model_config, optimizer, mesh, tuple(config.mesh.rules))
    state = train.init_state(config, model_config, optimizer, shardings)
    ref = train.copy_params(state.params, shardings.params) if loss_config.needs_reference else None
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model_config=model_config,
            loss_config=loss_config,
            optimizer=optimizer,
            schedule=schedule,
        ),
        in_shardings=(shardings, shardings.params if ref is not None else None, None),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    b = config.bench
    batches = list(synthetic_batches(config, model_config.vocab_size, 1 + b.warmup_steps + b.steps))
    placed = [sharding.put_batch(batch, mesh, row_axis=1) for batch, _ in batches]

    started = time.perf_counter()
    compiled = step_fn.lower(state, ref, placed[0]).compile()
    compile_s = time.perf_counter() - started
    for batch in placed[: 1 + b.warmup_steps]:
        state, metrics = compiled(state, ref, batch)
    jax.block_until_ready(metrics)
    times = []
    for batch in placed[1 + b.warmup_steps :]:
        started = time.perf_counter()
        state, metrics = compiled(state, ref, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)

    timed = [lengths for _, lengths in batches[1 + b.warmup_steps :]]
    step_s = float(np.median(times))
    tokens = float(
        np.mean([(lengths[:, 0] * 2 + lengths[:, 1] + lengths[:, 2]).sum() for lengths in timed])
    )
    flops = float(
        np.mean(
            [step_flops(model_config, lengths, loss_config.needs_reference) for lengths in timed]
        )
    )
    rows_tokens = 2 * config.training.batch_size * config.data.max_seq_length
    peak, peak_source = peak_flops(mesh.devices.flat[0])
    memory_gb = train.device_memory_gb()
    result = {
        "trainer": "dpo_jax",
        "preset": b.preset,
        "device": mesh.devices.flat[0].device_kind,
        "devices": int(mesh.devices.size),
        "params": model.num_params(model_config),
        "pairs_per_step": config.training.batch_size,
        "compile_s": round(compile_s, 2),
        "step_s": round(step_s, 4),
        "pairs_per_s": round(config.training.batch_size / step_s, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "padding_fraction": round(1 - tokens / rows_tokens, 4),
        "mfu": round(flops / step_s / (peak * mesh.devices.size), 4),
        "peak_flops_source": peak_source,
        "peak_memory_gb": None if memory_gb is None else round(memory_gb, 2),
        "loss": float(metrics["loss"]),
        "jax": jax.__version__,
    }
    parts = memory.estimate(
        state,
        ref,
        model_config,
        tokens_per_device=rows_tokens // sharding.data_parallel_size(mesh),
        row_length=config.data.max_seq_length,
        logits_chunk_size=loss_config.logits_chunk_size,
    )
    result["estimated_memory_gb"] = round(parts["total"] / memory.GiB, 2)
    return result


def main(argv) -> None:
    del argv
    result = run(flags.FLAGS.config)
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
