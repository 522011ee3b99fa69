"""The benchmark's workload: the preset model shapes (config.json fields of real checkpoints,
random weights), the trainer's settings beside the benchmark's own, and the synthetic pairs
and batches every step trains on. benchmarks/trl_dpo.py builds TRL's run from the same
presets and pairs, so both trainers time the same work."""

from __future__ import annotations

import dataclasses

import numpy as np

from dpo_jax import data, hf, model, settings, state
from dpo_jax.data.batching import packed_row_length, pair_parts
from dpo_jax.data.batching import rows_needed as rows_needed_for
from dpo_jax.settings import BenchSettings, Settings

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
