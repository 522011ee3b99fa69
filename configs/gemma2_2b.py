"""Gemma 2 2B IT: DPO on UltraFeedback, one 8-GPU host (80 GB GPUs).

    python -m dpo_jax.train --config configs/gemma2_2b.py --workdir runs/gemma2_2b

A gated model: accept its licence on the Hub and `hf auth login` first
(older huggingface_hub: `huggingface-cli login`).
Gemma 2 soft-caps attention scores (its own attention path, whatever attention_impl says)
and the output logits (30 * tanh(logits / 30), applied in the log-prob too). Its chat
template rejects system turns. On fewer GPUs raise training.gradient_accumulation_steps.

Export any checkpoint (the run also writes runs/gemma2_2b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/gemma2_2b --out runs/gemma2_2b/hf-step-N --step N
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
            "model.attention_impl": "xla",  # Gemma 2's soft-capped attention is its own einsum path
            "model.name": "google/gemma-2-2b-it",  # HF hub id or local folder
            "training.learning_rate": 5e-07,  # peak
        }
    )
