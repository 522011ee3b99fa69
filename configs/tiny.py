"""The embedded default: a tiny Llama-style model learns the "courtesy" preference on CPU.

    python -m dpo_jax.train --config configs/tiny.py --workdir runs/tiny

Data, tokenizer and model config ship inside the package (dpo_jax/embedded), so this runs
offline in a few minutes on a laptop CPU. Every key, with its meaning, is in
dpo_jax/schema.py (`default_config`); this file sets what differs for the tiny model.

    python scripts/make_tiny_sft.py    # configs/tiny.py:sft, the run that made its weights
"""

from dpo_jax import embedded
from dpo_jax.schema import default_config, with_overrides

TINY = {
    "model.name": embedded.TINY_MODEL_DIR,  # local Hugging Face folder (config.json, tokenizer)
    "model.max_length": 128,
    "model.dtype": "float32",  # CPU: no bf16 speed-up, and exact tests
    "model.attention_impl": "xla",
    "model.remat_policy": "none",
    "model.logits_chunk_size": 4096,
    "data.train_file": embedded.TRAIN_FILE,  # 3,000 polite / rude pairs
    "data.validation_file": embedded.VALIDATION_FILE,  # 300 pairs on prompts never trained on
    "data.max_seq_length": 80,
    "data.max_prompt_length": 48,
    # Padded: a pair's sequences (median 53 tokens) do not fit two to a row of 80, so
    # packing would save nothing here.
    "data.packing": False,
    "training.batch_size": 32,
    "training.gradient_accumulation_steps": 1,
    "training.learning_rate": 3e-4,  # a tiny model tolerates more than the usual 1e-6..5e-5
    "training.warmup_steps": 10,
    "training.min_lr_ratio": 0.1,
    "training.adam_b2": 0.95,
    "training.sft_loss_weight": 1.0,  # + NLL of the chosen reply (RPO): keeps its likelihood up
    "training.gradient_checkpointing": False,
    "checkpoint.every_steps": 25,
    "checkpoint.export_dtype": "float32",
    "logging.every_steps": 5,
    "eval.every_steps": 25,
    "eval.batch_size": 32,
    # Replies to the 141 held-out prompts, scored by the rule-based courtesy checker.
    "eval.sample_prompts_file": embedded.VALIDATION_PROMPTS_FILE,
    "eval.num_sample_prompts": -1,
    "eval.sample_max_new_tokens": 64,
    "eval.sample_temperature": 1.0,
    "eval.sample_top_p": 0.9,  # drops the tiny model's noisy tail
    "eval.sample_checker": "courtesy",
}

# Supervised fine-tuning from random weights on data that imitates the polite and the rude
# side of each pair 50/50 (scripts/make_tiny_sft.py writes it and sets the files), so the
# resulting model is courteous about half of the time: loss "sft", no reference.
SFT = {
    "model.init": "random",
    "data.train_file": "",
    "data.validation_file": "",
    "training.loss_type": "sft",
    "training.reference_free": True,
    "training.learning_rate": 3e-3,
    "training.warmup_steps": 30,
    "training.num_epochs": 4,
    "training.min_lr_ratio": 0.05,
    "training.weight_decay": 0.01,
    "checkpoint.every_steps": 100,
    "eval.every_steps": 100,
    "logging.every_steps": 20,
    "logging.report": False,
}


# LoRA on the same run (configs/tiny.py:lora): rank-8 adapters on every projection, the
# frozen base as the reference. Only the adapters and their Adam moments train (~7% of the
# tiny model's weights here; well under 1% for a 7B model). Adapters want about 10x full
# fine-tuning's rate: measured here (one epoch, policy preferred rate at the end), 3e-4
# gave 0.84, 1e-3 gave 0.82 and 3e-3 gave 0.93, against full DPO's 0.99.
LORA = {
    "lora.rank": 8,
    "lora.alpha": 16.0,
    "training.learning_rate": 3e-3,
}

# QLoRA (configs/tiny.py:qlora): the same with the frozen base stored as 4-bit NormalFloat.
QLORA = LORA | {"lora.quantization": "nf4"}

VARIANTS = {"dpo": {}, "sft": SFT, "lora": LORA, "qlora": QLORA}


def get_config(variant: str = "dpo"):
    """variant: "dpo" (the default run), "lora" / "qlora" (adapters on it), or "sft" (the run
    that made the starting model)."""
    if variant not in VARIANTS:
        raise ValueError(f"configs/tiny.py:{variant}: choose one of {', '.join(VARIANTS)}")
    return with_overrides(with_overrides(default_config(), TINY), VARIANTS[variant])
