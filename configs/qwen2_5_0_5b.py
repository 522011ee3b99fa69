"""Qwen2.5 0.5B Instruct: DPO on UltraFeedback, one GPU (24 GB is enough).

    python -m dpo_jax.train --config configs/qwen2_5_0_5b.py --workdir runs/qwen2_5_0_5b

On an 8-GPU host set training.gradient_accumulation_steps=1 (the same result).

Export any checkpoint (the run also writes runs/qwen2_5_0_5b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/qwen2_5_0_5b --out runs/qwen2_5_0_5b/hf-step-N --step N
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "hf_dpo_base", os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_dpo_base.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    return _base.with_overrides(
        {
            "data.max_prompt_length": 512,  # prompts keep their last this-many tokens
            "data.max_seq_length": 1024,  # prompt + completion tokens per sequence (row length)
            "model.max_length": 1024,  # longest sequence the model is run on
            "model.name": "Qwen/Qwen2.5-0.5B-Instruct",  # HF hub id or local folder
            "training.gradient_accumulation_steps": 8,  # 1 GPU x 16 rows per micro-batch
        }
    )
