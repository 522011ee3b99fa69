"""Benchmark of the DPO train step on synthetic pairs (random-init model presets).

    python -m dpo_jax.bench --config configs/bench.py                        # tiny, CPU
    python -m dpo_jax.bench --config configs/bench.py:llama3_2_1b            # one H100
    python -m dpo_jax.bench --config configs/bench.py:llama3_2_1b \
        --config.bench.lengths=hh --config.training.batch_size=8 \
        --config.data.packing=True                                          # HH-like, packed
    python -m dpo_jax.bench --config configs/bench.py:llama3_1_8b \
        --config.training.precompute_ref_log_probs=True \
        --config.model.remat_policy=full                                    # 8B on one H100
    python -m dpo_jax.bench --config configs/bench.py:llama3_1_8b --config.lora.rank=16 \
        --config.lora.quantization=nf4 --config.model.remat_policy=full     # 8B QLoRA
    python -m dpo_jax.bench --config configs/bench.py:llama3_1_70b --config.lora.rank=16 \
        --config.lora.quantization=nf4 --config.bench.estimate_only=True    # memory, no GPU

The trainer's schema (dpo_jax/schema.py) with a `bench` section: every training key means
what it means in training (data.packing, data.prefix_sharing, data.packed_rows,
data.max_segments_per_row, the loss and optimizer keys), and the step timed is the
trainer's. Prints compile time, median step time, pairs/s, non-pad tokens/s, MFU and peak
memory, and one JSON line at the end (the same fields as benchmarks/trl_dpo.py).
"""

import ml_collections

from dpo_jax import embedded
from dpo_jax.schema import default_config, with_overrides


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    gpu = preset != "tiny"
    c = default_config()
    c.bench = ml_collections.ConfigDict()
    c.bench.preset = preset  # tiny | llama3_2_1b | qwen2_5_0_5b | llama3_1_8b | llama3_1_70b
    c.bench.lengths = "fixed"  # fixed: exactly prompt_length + completion_length; hh: HH-like mix
    c.bench.prompt_length = 512 if gpu else 24
    c.bench.completion_length = 512 if gpu else 24
    c.bench.warmup_steps = 3  # untimed steps after compilation
    c.bench.steps = 10  # timed steps (median reported)
    c.bench.seed = 0  # pair generator (benchmarks/trl_dpo.py draws the same pairs from it)
    c.bench.estimate_only = False  # True: print the per-device memory estimate; run nothing
    return with_overrides(
        c,
        {
            # tiny: the embedded model's architecture; the others: dpo_jax.bench_workload.PRESETS.
            "model.name": embedded.TINY_MODEL_DIR,
            "model.init": "random",
            "model.dtype": "bfloat16" if gpu else "float32",  # compute dtype
            "model.param_dtype": "bfloat16" if gpu else "float32",  # master weights
            "model.attention_impl": "cudnn" if gpu else "xla",
            "model.remat_policy": "none",  # none | dots_saveable | full
            "model.logits_chunk_size": 8192 if gpu else 4096,
            "data.max_seq_length": 1024 if gpu else 48,  # row length (longest pair side)
            "model.max_length": 1 << 20,  # no bound of its own: rows are data.max_seq_length
            "training.gradient_checkpointing": False,  # model.remat_policy says it
            "training.batch_size": 4 if gpu else 8,  # pairs per step
            "training.gradient_accumulation_steps": 1,
            "data.packing": False,  # padded unless asked: the layout TRL's benchmark times
            "data.max_segments_per_row": 0,
            "training.optimizer_state_dtype": "bfloat16" if gpu else "float32",
        },
    )
