"""Qwen3 1.7B: DPO on UltraFeedback, one 8-GPU host (80 GB GPUs).

    python -m dpo_jax.train --config configs/qwen3_1_7b.py --workdir runs/qwen3_1_7b

On fewer GPUs raise training.gradient_accumulation_steps (1 GPU: 16).

Export any checkpoint (the run also writes runs/qwen3_1_7b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/qwen3_1_7b --out runs/qwen3_1_7b/hf-step-N --step N
"""

from dpo_jax.schema import default_config, with_overrides


def get_config():
    return with_overrides(
        default_config(),
        {
            "model.name": "Qwen/Qwen3-1.7B",  # HF hub id or local folder
        },
    )
