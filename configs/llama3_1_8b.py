"""Llama 3.1 8B Instruct: DPO on UltraFeedback, one 8-GPU host (80 GB GPUs).

    python -m dpo_jax.train --config configs/llama3_1_8b.py --workdir runs/llama3_1_8b

A gated model: accept its licence on the Hub and `hf auth login` first
(older huggingface_hub: `huggingface-cli login`).
Parameters, gradients and Adam moments (fp32) are fsdp-sharded over the 8 GPUs, ~16 GB each;
the reference's log-probs are computed once before training (and cached), so no reference
weights are held and no reference forward runs in the step. Several hosts: the same command
on each (see launch/).

Export any checkpoint (the run also writes runs/llama3_1_8b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/llama3_1_8b --out runs/llama3_1_8b/hf-step-N --step N
"""

from dpo_jax.schema import default_config, with_overrides


def get_config():
    return with_overrides(
        default_config(),
        {
            "model.name": "meta-llama/Llama-3.1-8B-Instruct",  # HF hub id or local folder
            "model.remat_policy": "full",  # none | dots_saveable | full
            "training.precompute_ref_log_probs": True,
            "training.gradient_accumulation_steps": 4,  # 16 pairs per micro-batch, packed
            "training.learning_rate": 5e-07,  # peak
        },
    )
