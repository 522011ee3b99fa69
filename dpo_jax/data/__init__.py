"""Preference records → token ids → fixed-shape batches in the DESIGN layout.

    sources.py   files (.jsonl/.json/.parquet, globs) and hf: datasets, records located
    formats.py   layouts (explicit, conversational, implicit, ranked, HH) → validated Examples
    tokens.py    chat template, BOS/EOS, truncation, batched datasets.map tokenization
    cache.py     on-disk cache of tokenized sources
    batching.py  padded (length buckets) and packed (first-fit decreasing) batches
    iterator.py  deterministic order, mixtures, position, per-process rows, eval batches
    pipeline.py  settings, build_data (the trainer's entry point), the data report
    __main__.py  `python -m dpo_jax.data --config ...`: the report and rendered examples

Batch layout (one layout for padded and packed rows; R rows of T tokens, S sequences):
  tokens_RxT        input token ids (pad id where unused)
  positions_RxT     position of each token within its own sequence (restarts per sequence)
  segment_ids_RxT   1, 2, ... per sequence within a row; 0 marks padding
  labels_RxT        the next token of the same sequence (what position t predicts)
  loss_mask_RxT     True where labels_RxT is a completion token
  sequence_ids_RxT  which sequence a token belongs to: chosen of pair p is 2p, rejected 2p+1
  pair_mask_P       False for filler pairs (partial batches, unused packed pair slots)
Training batches carry a leading accumulation axis A: [A, R, T] and [A, P].
"""

from __future__ import annotations

from .batching import (
    bucket_for,
    empty_batch,
    packed_batch,
    padded_batch,
    resolve_buckets,
    stack_batches,
    write_sequence,
)
from .formats import Example, Layout
from .iterator import PairIterator, eval_batches
from .pipeline import (
    Data,
    DataSettings,
    build_data,
    length_stats,
    load_pairs,
    load_source,
    pad_token_id,
    summary,
    tokenize_records,
)
from .problems import DataError, Problems
from .sources import open_source, resolve_source
from .tokens import Lengths, Renderer, TokenizedPair


def read_records(path: str) -> list[tuple[str, object]]:
    """All (location, record) of one source; raises DataError on any unreadable record."""
    problems = Problems(path, "raise")
    _, read = open_source(resolve_source(path))
    records = list(read(problems))
    problems.finish()
    return records


__all__ = [
    "Data",
    "DataError",
    "DataSettings",
    "Example",
    "Layout",
    "Lengths",
    "PairIterator",
    "Renderer",
    "TokenizedPair",
    "bucket_for",
    "build_data",
    "empty_batch",
    "eval_batches",
    "length_stats",
    "load_pairs",
    "load_source",
    "packed_batch",
    "padded_batch",
    "read_records",
    "resolve_buckets",
    "pad_token_id",
    "stack_batches",
    "summary",
    "tokenize_records",
    "write_sequence",
]
