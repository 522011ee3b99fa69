"""What the model will be trained on: the data report and a few rendered examples.

    python -m dpo_jax.data --config configs/tiny.py [--config.data.packing=True ...]
        [--examples 3] [--report_out data_report.json]

Reads, validates and tokenizes the configured data exactly as training does (filling the
same cache), prints data_report.json's content, a summary, and the first pairs of the first
training step, decoded with the trained (loss-masked) tokens between ⟦ and ⟧.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from dpo_jax import settings
from dpo_jax.hf_config import load_tokenizer

from .pipeline import build_data, summary

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_integer("examples", 3, "Pairs of the first training step to print.")
flags.DEFINE_string("report_out", "", "Also write the report to this JSON file.")
FLAGS = flags.FLAGS
OPEN, CLOSE = "⟦", "⟧"


def render_sequence(tokenizer, tokens: np.ndarray, trained: np.ndarray) -> str:
    """Decodes tokens, wrapping runs of trained tokens in ⟦ ⟧ (special tokens shown)."""
    pieces, start = [], 0
    for end in range(1, len(tokens) + 1):
        if end == len(tokens) or trained[end] != trained[start]:
            text = tokenizer.decode(tokens[start:end].tolist(), skip_special_tokens=False)
            pieces.append(f"{OPEN}{text}{CLOSE}" if trained[start] else text)
            start = end
    return "".join(pieces)


def sequences(batch: dict, micro: int = 0):
    """(sequence id, tokens, trained) of every sequence in one micro-batch."""
    for row in range(batch["tokens"].shape[1]):
        ids = batch["sequence_ids"][micro, row]
        segments = batch["segment_ids"][micro, row]
        for segment in np.unique(segments[segments > 0]):
            where = np.flatnonzero(segments == segment)
            tokens = batch["tokens"][micro, row, where]
            # Token j is trained when position j-1 predicts it.
            trained = np.zeros(len(where), bool)
            trained[1:] = batch["loss_mask"][micro, row, where[:-1]]
            yield int(ids[where[0]]), tokens, trained


def show_examples(tokenizer, batch: dict, count: int) -> str:
    found = {s: (tokens, trained) for s, tokens, trained in sequences(batch)}
    lines = []
    for p in range(min(count, int(batch["pair_mask"][0].sum()))):
        lines.append(f"--- pair {p} (trained tokens between {OPEN} {CLOSE})")
        for side, s in (("chosen", 2 * p), ("rejected", 2 * p + 1)):
            tokens, trained = found[s]
            lines.append(f"[{side}: {len(tokens)} tokens, {int(trained.sum())} trained]")
            lines.append(render_sequence(tokenizer, tokens, trained))
    return "\n".join(lines)


def main(argv) -> None:
    del argv
    try:
        s = settings.from_config(FLAGS.config)
        tokenizer = load_tokenizer(s.tokenizer)
        data = build_data(
            s.data,
            tokenizer,
            batch_size=s.batch.batch_size,
            accumulation_steps=s.batch.accumulation_steps,
            seed=s.loop.seed,
        )
    except settings.USER_ERRORS as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps(data.report, indent=2))
    if FLAGS.report_out:
        with open(FLAGS.report_out, "w") as f:
            json.dump(data.report, f, indent=2)
    print(summary(data.report))
    if FLAGS.examples > 0:
        print(show_examples(tokenizer, next(data.train), FLAGS.examples))
    sys.stdout.flush()


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
