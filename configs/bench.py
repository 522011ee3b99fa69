"""Benchmark of the DPO train step on synthetic pairs (random-init model presets).

    python -m dpo_jax.bench --config configs/bench.py                        # tiny, CPU
    python -m dpo_jax.bench --config configs/bench.py:llama3_2_1b            # one H100
    python -m dpo_jax.bench --config configs/bench.py:llama3_2_1b \
        --config.bench.lengths=hh --config.training.batch_size=8 \
        --config.bench.packing=True                                         # HH-like, packed
    python -m dpo_jax.bench --config configs/bench.py:llama3_1_8b \
        --config.training.precompute_ref_log_probs=True \
        --config.model.remat_policy=full                                    # 8B on one H100

Prints compile time, median step time, pairs/s, non-pad tokens/s, MFU and peak memory, and
one JSON line at the end (the same fields as benchmarks/trl_dpo.py).
"""

import ml_collections

from dpo_jax.sharding import DEFAULT_RULES


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    gpu = preset != "tiny"
    c = ml_collections.ConfigDict()
    c.bench = ml_collections.ConfigDict()
    c.bench.preset = preset  # tiny | llama3_2_1b | qwen2_5_0_5b | llama3_1_8b
    c.bench.lengths = "fixed"  # fixed: exactly prompt_length + completion_length; hh: HH-like mix
    c.bench.prompt_length = 512 if gpu else 24
    c.bench.completion_length = 512 if gpu else 24
    c.bench.warmup_steps = 3  # untimed steps after compilation
    c.bench.steps = 10  # timed steps (median reported)
    c.bench.seed = 0  # pair generator (benchmarks/trl_dpo.py draws the same pairs from it)
    c.bench.packing = False  # pack each micro-batch's pairs first-fit-decreasing into rows
    # With packing: each pair one [prompt | chosen | rejected] group, the prompt computed
    # once (rows of 2 x max_seq_length, as data.prefix_sharing in training).
    c.bench.prefix_sharing = False
    # Packed rows on cuDNN (Hopper, cuDNN >= 9.6): segments per row bound that sends them to
    # the flash kernel's packed layout (-1 = the most any row holds; 0 = the mask as a bias).
    c.bench.max_segments_per_row = 0
    c.bench.packed_rows = 0  # rows per packed micro-batch; 0 = fewest that hold every step

    c.model = ml_collections.ConfigDict()
    c.model.init = "random"
    c.model.dtype = "bfloat16" if gpu else "float32"  # compute dtype
    c.model.param_dtype = "bfloat16" if gpu else "float32"  # master weights
    c.model.attention_impl = "cudnn" if gpu else "xla"
    c.model.remat_policy = "none"  # none | dots_saveable | full
    c.model.logits_chunk_size = 8192 if gpu else 4096

    c.data = ml_collections.ConfigDict()
    c.data.max_seq_length = 1024 if gpu else 48  # row length (longest pair side)

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 4 if gpu else 8  # pairs per step
    c.training.gradient_accumulation_steps = 1
    c.training.seed = 0
    c.training.beta = 0.1
    c.training.loss_type = "sigmoid"
    c.training.reference_free = False  # False: the reference forward runs in the step
    # True: batches carry reference log-probs; no reference weights, no reference forward.
    c.training.precompute_ref_log_probs = False
    c.training.learning_rate = 1e-6
    c.training.optimizer_state_dtype = "bfloat16" if gpu else "float32"

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    c.mesh.rules = DEFAULT_RULES
    return c
