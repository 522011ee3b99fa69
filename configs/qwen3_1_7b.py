"""Qwen3 1.7B: DPO on UltraFeedback, one 8-GPU host (80 GB GPUs).

    python -m dpo_jax.train --config configs/qwen3_1_7b.py --workdir runs/qwen3_1_7b

On fewer GPUs raise training.gradient_accumulation_steps (1 GPU: 16).

Export any checkpoint (the run also writes runs/qwen3_1_7b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/qwen3_1_7b --out runs/qwen3_1_7b/hf-step-N --step N
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
            "model.name": "Qwen/Qwen3-1.7B",  # HF hub id or local folder
        }
    )
