"""Llama 3.2 1B Instruct: DPO on UltraFeedback, one 8-GPU host (80 GB GPUs).

    python -m dpo_jax.train --config configs/llama3_2_1b.py --workdir runs/llama3_2_1b

A gated model: accept its licence on the Hub and `hf auth login` first
(older huggingface_hub: `huggingface-cli login`).
On fewer GPUs raise training.gradient_accumulation_steps (1 GPU: 16).

Export any checkpoint (the run also writes runs/llama3_2_1b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/llama3_2_1b --out runs/llama3_2_1b/hf-step-N --step N
"""

from dpo_jax.schema import default_config, with_overrides


def get_config():
    # The shared settings are this model's; the name is restated so the file says it.
    return with_overrides(default_config(), {"model.name": "meta-llama/Llama-3.2-1B-Instruct"})
