"""Embedded default dataset and tiny model/tokenizer files for offline, CPU-sized DPO runs.

Everything here ships inside the package so a newcomer can run DPO end to end with no network:

* ``data/train.jsonl`` / ``data/validation.jsonl`` -- the synthetic "courtesy" preference pairs
  (one ``{"chosen", "prompt", "rejected"}`` JSON object per line). Validation prompts never occur
  in the training file. See :mod:`dpo_jax.embedded.courtesy` for the task, the generator and the
  rule-based checker :func:`~dpo_jax.embedded.courtesy.is_preferred`.
* ``data/validation_prompts.jsonl`` -- the distinct held-out prompts (``{"prompt": ...}`` per line),
  for sampling replies from the reference model and the DPO policy and scoring them.
* ``tiny/`` -- a byte-level BPE tokenizer trained on the training data (``tokenizer.json``,
  ``tokenizer_config.json`` with the chat template, ``special_tokens_map.json``), plus
  ``config.json`` (a tiny ``LlamaConfig``), ``generation_config.json`` and ``model.safetensors``:
  the starting model of the default, supervised fine-tuned by ``scripts/make_tiny_sft.py``
  with this project's trainer to imitate the polite and the rude replies equally.

Regenerate with ``python scripts/make_embedded_data.py`` then
``python scripts/train_embedded_tokenizer.py``; both are deterministic.
"""

from __future__ import annotations

import os

EMBEDDED_DIR: str = os.path.dirname(os.path.abspath(__file__))
DATA_DIR: str = os.path.join(EMBEDDED_DIR, "data")
TRAIN_FILE: str = os.path.join(DATA_DIR, "train.jsonl")
VALIDATION_FILE: str = os.path.join(DATA_DIR, "validation.jsonl")
VALIDATION_PROMPTS_FILE: str = os.path.join(DATA_DIR, "validation_prompts.jsonl")
TINY_MODEL_DIR: str = os.path.join(EMBEDDED_DIR, "tiny")

__all__ = [
    "DATA_DIR",
    "EMBEDDED_DIR",
    "TINY_MODEL_DIR",
    "TRAIN_FILE",
    "VALIDATION_FILE",
    "VALIDATION_PROMPTS_FILE",
]
