"""Mistral 7B Instruct v0.3: DPO on UltraFeedback, one 8-GPU host (80 GB GPUs).

    python -m dpo_jax.train --config configs/mistral_7b.py --workdir runs/mistral_7b

A gated model: accept its licence on the Hub and `hf auth login` first
(older huggingface_hub: `huggingface-cli login`).
Parameters, gradients and Adam moments (fp32) are fsdp-sharded over the 8 GPUs.

Export any checkpoint (the run also writes runs/mistral_7b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/mistral_7b --out runs/mistral_7b/hf-step-N --step N
"""

from dpo_jax.schema import default_config, with_overrides


def get_config():
    return with_overrides(
        default_config(),
        {
            "model.name": "mistralai/Mistral-7B-Instruct-v0.3",  # HF hub id or local folder
            "model.remat_policy": "full",  # none | dots_saveable | full
            "training.gradient_accumulation_steps": 4,  # 16 pairs per micro-batch, packed
            "training.learning_rate": 5e-07,  # peak
        },
    )
