"""TRL parity: the same tiny Hugging Face model, pairs and settings through TRL 1.16's
DPOTrainer (PyTorch, fp32) and through our trainer, and every TRL metric compared step by
step.

Both runs start from the embedded tiny checkpoint and take the first 40 pairs of the
embedded training file in file order, 8 per step, for 5 steps of AdamW (weight decay,
linear warmup then linear decay, clipping). Warmup's first rate is 0, so steps 0 and 1 both
run at policy = reference; steps 2-4 have moved. TRL gets our token ids, so any difference is
in the training math, not in tokenization.

Tolerance: fp32 on both sides, summed in different orders by different libraries. After
updates the runs agree to ~1e-6 relative, and 1e-4 is the bound the issue sets. A wrong
normalisation, loss or schedule moves some metric by > 1e-3. While the policy is the
reference the rewards and their accuracy are exactly 0 on both sides; later, the accuracy
is compared where the margins are clear of zero (a tie is decided by rounding), and the
rewards (β times a difference of two log-probs of ~-80 in float32, ~1e-6 apart) to 1e-6
absolute where they are too small for a relative bound.
"""

import json
import math
import os

import jax
import numpy as np
import pytest
from conftest import load_config, read_metrics, train_rows

from dpo_jax import data, embedded, train

STEPS, PAIRS_PER_STEP = 5, 8
COMMON = {  # our keys; TRL's DPOConfig is set from the same values in trl_run
    "training.learning_rate": 3e-4,
    "training.warmup_steps": 1,
    "training.lr_schedule": "linear",
    "training.min_lr_ratio": 0.0,
    "training.weight_decay": 0.01,
    "training.adam_b1": 0.9,
    "training.adam_b2": 0.95,
    "training.adam_eps": 1e-8,
    "training.max_grad_norm": 1.0,
    "training.beta": 0.1,
}
CASES = {
    "sigmoid": {"training.loss_type": "sigmoid"},
    "ipo": {"training.loss_type": "ipo"},
    "sigmoid_sft": {
        "training.loss_type": "sigmoid,sft",
        "training.loss_weights": "1.0,0.5",
        "training.sft_normalization": "batch_tokens",
    },
    "hinge": {"training.loss_type": "hinge"},
    "apo_zero": {"training.loss_type": "apo_zero"},
    "sigmoid_ld": {"training.loss_type": "sigmoid", "training.ld_alpha": 0.5},
}
# TRL's metric names that we log under the same name.
METRICS = (
    "loss",
    "grad_norm",
    "learning_rate",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "train.jsonl"
    with open(embedded.TRAIN_FILE) as src:
        path.write_text("".join(src.readlines()[: STEPS * PAIRS_PER_STEP]))
    return str(path)


def our_config(pairs_file, case):
    return load_config(
        "tiny",
        **COMMON
        | CASES[case]
        | {
            "data.train_file": pairs_file,
            "data.validation_file": "",
            "data.shuffle": False,
            "data.cache_dir": "none",
            "training.batch_size": PAIRS_PER_STEP,
            "training.max_steps": STEPS,
            "training.sft_loss_weight": 0.0,
            "logging.every_steps": 1,
            "checkpoint.every_steps": 100,
            "checkpoint.async_save": False,
            "checkpoint.export_hf": False,
            "eval.every_steps": 0,
            "eval.sample_prompts_file": "",
            "logging.report": False,
        },
    )


def trl_run(pairs_file, case, tmp_path) -> list[dict]:
    """TRL's log history, one dict per step, from TRL's own DPOTrainer."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from dpo_jax import settings

    s = settings.from_config(our_config(pairs_file, case))
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.TINY_MODEL_DIR)
    pairs, _ = data.load_pairs(pairs_file, tokenizer, s.data)  # our token ids
    columns = {
        f"{side}_ids": [getattr(p, side).tolist() for p in pairs]
        for side in ("prompt", "chosen", "rejected")
    }

    class Pretokenized(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    torch.manual_seed(0)
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
        embedded.TINY_MODEL_DIR, dtype=torch.float32
    )
    loss = s.loss
    config = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=PAIRS_PER_STEP,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=COMMON["training.learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=COMMON["training.warmup_steps"],
        weight_decay=COMMON["training.weight_decay"],
        adam_beta1=COMMON["training.adam_b1"],
        adam_beta2=COMMON["training.adam_b2"],
        adam_epsilon=COMMON["training.adam_eps"],
        max_grad_norm=COMMON["training.max_grad_norm"],
        beta=loss.beta,
        loss_type=list(loss.loss_type),
        loss_weights=list(loss.loss_weights) if loss.loss_weights else None,
        ld_alpha=None if loss.ld_alpha == 1.0 else loss.ld_alpha,
        max_length=None,  # our tokens are truncated already
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = Pretokenized(
        model=load(),
        ref_model=load(),
        args=config,
        train_dataset=datasets.Dataset.from_dict(columns),
        processing_class=tokenizer,
    )
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    trainer.train()
    return [row for row in trainer.state.log_history if "loss" in row][:STEPS]


@pytest.mark.parametrize("case", sorted(CASES))
def test_trl_and_dpo_jax_agree_step_by_step(case, pairs_file, tmp_path):
    theirs = trl_run(pairs_file, case, tmp_path)
    train.train(our_config(pairs_file, case), str(tmp_path / "ours"), devices=jax.devices()[:1])
    ours = train_rows(read_metrics(str(tmp_path / "ours")))
    assert len(theirs) == len(ours) == STEPS
    worst = {}
    for step, trl_row in enumerate(theirs):
        row = ours[step]
        moved = any(theirs[j]["learning_rate"] > 0 for j in range(step))
        for name in METRICS:
            want, got = trl_row[name], row[name]
            if name.startswith("rewards/") and not moved:
                assert got == want == 0.0, (step, name, got, want)  # exact, as TRL's
                continue
            tied = abs(row["rewards/margins"]) < 1e-3
            if name == "rewards/accuracies" and abs(want) < 1.0 and tied:
                continue  # a pair's margin this small is decided by rounding
            relative = abs(got - want) / max(abs(want), 1e-6)
            worst[name] = max(worst.get(name, 0.0), relative)
            assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-6), (step, name, got, want)
    # The per-metric maxima, for the record (pytest -s prints them).
    print(json.dumps({"case": case, "max_relative_difference": worst}))
    path = os.environ.get("DPO_JAX_PARITY_OUT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, "worst": worst}) + "\n")
    assert np.isfinite(list(worst.values())).all()
