"""Mistral 7B Instruct v0.3: DPO on UltraFeedback, one 8-GPU host (80 GB GPUs).

    python -m dpo_jax.train --config configs/mistral_7b.py --workdir runs/mistral_7b

A gated model: accept its licence on the Hub and `hf auth login` first
(older huggingface_hub: `huggingface-cli login`).
Parameters, gradients and Adam moments (fp32) are fsdp-sharded over the 8 GPUs.

Export any checkpoint (the run also writes runs/mistral_7b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/mistral_7b --out runs/mistral_7b/hf-step-N --step N
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
            "model.name": "mistralai/Mistral-7B-Instruct-v0.3",  # HF hub id or local folder
            "model.remat_policy": "full",  # none | dots_saveable | full
            "training.gradient_accumulation_steps": 4,  # 8 GPUs x 4 rows per micro-batch
            "training.learning_rate": 5e-07,  # peak
        }
    )
