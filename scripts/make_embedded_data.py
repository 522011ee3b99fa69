#!/usr/bin/env python
"""(Re)generate the committed embedded courtesy dataset in ``dpo_jax/embedded/data``.

Deterministic: running it twice gives byte-identical ``train.jsonl``, ``validation.jsonl`` and
``validation_prompts.jsonl``. After changing the data, also rerun
``scripts/train_embedded_tokenizer.py`` (the tokenizer is trained on ``train.jsonl``).
"""

from __future__ import annotations

import sys

from dpo_jax.embedded import DATA_DIR
from dpo_jax.embedded.courtesy import main

if __name__ == "__main__":
    main(["--out", DATA_DIR, *sys.argv[1:]])
