"""Llama 3.1 8B Instruct: QLoRA DPO on UltraFeedback, one 80 GB GPU.

    python -m dpo_jax.train --config configs/llama3_1_8b_qlora.py --workdir runs/llama3_1_8b_qlora

A gated model: accept its licence on the Hub and `hf auth login` first.
The frozen base is stored as 4-bit NormalFloat (5.61 GiB by the memory estimate, with its
scales, the embeddings and the head in bfloat16), dequantized layer by layer in each
matmul; rank-16 adapters on every projection are all that trains (42M weights and their
Adam moments). The reference is the base with the adapters off, so no second copy of the
weights exists and no precompute is needed. Without a GPU, the memory estimate:
`python -m dpo_jax.bench --config configs/bench.py:llama3_1_8b --config.lora.rank=16
--config.lora.quantization=nf4 --config.model.remat_policy=full
--config.bench.estimate_only=True`.

The run ends with runs/llama3_1_8b_qlora/hf/ (the merged model) and hf-adapter/ (the PEFT
adapter: `peft.PeftModel.from_pretrained(base, "runs/llama3_1_8b_qlora/hf-adapter")`).
"""

from dpo_jax.schema import default_config, with_overrides


def get_config():
    return with_overrides(
        default_config(),
        {
            "model.name": "meta-llama/Llama-3.1-8B-Instruct",  # HF hub id or local folder
            "model.remat_policy": "full",
            "mesh.fsdp": 1,  # one GPU
            "lora.rank": 16,
            "lora.alpha": 32.0,
            "lora.dropout": 0.05,
            "lora.quantization": "nf4",
            "training.batch_size": 64,
            "training.gradient_accumulation_steps": 8,  # 8 pairs per micro-batch, packed
            "training.learning_rate": 5e-06,  # adapters take ~10x full fine-tuning's rate
            "checkpoint.export_dtype": "bfloat16",
        },
    )
