"""Supervised fine-tuning that makes the embedded default's starting model.

    python scripts/make_tiny_sft.py            # writes the data, runs this config, exports

The data (written by the script) imitates the polite and the rude side of each pair 50/50
(`courtesy.sft_records`), so the resulting model is courteous about half of the time; the
DPO default (configs/tiny.py) then starts from it. Same model, tokenizer and trainer; the
loss is `sft` (NLL of the "chosen" slot) without a reference model.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    "configs_tiny", os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
)
_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny)


def get_config():
    c = _tiny.get_config()
    c.model.init = "random"  # from scratch: this run makes the weights model.name will hold
    c.data.train_file = ""  # set by scripts/make_tiny_sft.py (sft_train.jsonl)
    c.data.validation_file = ""  # set by scripts/make_tiny_sft.py (sft_validation.jsonl)
    c.training.loss_type = "sft"
    c.training.reference_free = True
    c.training.learning_rate = 3e-3
    c.training.warmup_steps = 30
    c.training.num_epochs = 4
    c.training.min_lr_ratio = 0.05
    c.training.weight_decay = 0.01
    c.checkpoint.every_steps = 100
    c.eval.every_steps = 100
    c.logging.every_steps = 20
    c.logging.report = False
    return c
