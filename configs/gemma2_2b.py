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

from dpo_jax.schema import default_config, with_overrides


def get_config():
    return with_overrides(
        default_config(),
        {
            "model.attention_impl": "xla",  # Gemma 2's soft-capped attention is its own einsum path
            "model.name": "google/gemma-2-2b-it",  # HF hub id or local folder
            "training.learning_rate": 5e-07,  # peak
        },
    )
