"""Qwen2.5 0.5B Instruct: DPO on UltraFeedback, one GPU (24 GB is enough).

    python -m dpo_jax.train --config configs/qwen2_5_0_5b.py --workdir runs/qwen2_5_0_5b

On an 8-GPU host set training.gradient_accumulation_steps=1 (the same result).

Export any checkpoint (the run also writes runs/qwen2_5_0_5b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/qwen2_5_0_5b --out runs/qwen2_5_0_5b/hf-step-N --step N
"""

from dpo_jax.schema import default_config, with_overrides


def get_config():
    return with_overrides(
        default_config(),
        {
            "data.max_prompt_length": 512,  # prompts keep their last this-many tokens
            "data.max_seq_length": 1024,  # prompt + completion tokens per sequence (row length)
            "model.max_length": 1024,  # longest sequence the model is run on
            "model.name": "Qwen/Qwen2.5-0.5B-Instruct",  # HF hub id or local folder
            "training.gradient_accumulation_steps": 8,  # 8 pairs per micro-batch, packed
        },
    )
