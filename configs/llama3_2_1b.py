"""Llama 3.2 1B Instruct: DPO on UltraFeedback, one 8-GPU host (80 GB GPUs).

    python -m dpo_jax.train --config configs/llama3_2_1b.py --workdir runs/llama3_2_1b

A gated model: accept its licence on the Hub and `hf auth login` first
(older huggingface_hub: `huggingface-cli login`).
On fewer GPUs raise training.gradient_accumulation_steps (1 GPU: 16).

Export any checkpoint (the run also writes runs/llama3_2_1b/hf/ at the end):

    python -m dpo_jax.export --workdir runs/llama3_2_1b --out runs/llama3_2_1b/hf-step-N --step N
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "hf_dpo_base", os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_dpo_base.py")
)
_base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_base)


def get_config():
    # The shared settings are this model's; the name is restated so the file says it.
    return _base.with_overrides({"model.name": "meta-llama/Llama-3.2-1B-Instruct"})
