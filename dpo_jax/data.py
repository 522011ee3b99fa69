"""Preference records → token ids → fixed-shape batches in the DESIGN layout.

Batch layout (one layout for padded and packed rows; R rows of T tokens, S sequences):
  tokens_RxT        input token ids (pad id where unused)
  positions_RxT     position of each token within its own sequence (restarts per sequence)
  segment_ids_RxT   1, 2, ... per sequence within a row; 0 marks padding
  labels_RxT        the next token of the same sequence (what position t predicts)
  loss_mask_RxT     True where labels_RxT is a completion token
  sequence_ids_RxT  which sequence a token belongs to: chosen of pair p is 2p, rejected 2p+1
  pair_mask_P       False for filler pairs that complete a partial batch
Training batches carry a leading accumulation axis A: [A, R, T] and [A, P].
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np

FIELDS = ("prompt", "chosen", "rejected")


class DataError(ValueError):
    """Bad input data, with the file, record and field that caused it."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    max_seq_length: int  # T: prompt + completion tokens of one sequence
    max_prompt_length: int | None = None  # prompts keep their last this-many tokens
    apply_chat_template: bool = True  # render the prompt as a user turn of the chat template


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    prompt: np.ndarray  # int32 prompt ids (template and BOS included)
    chosen: np.ndarray  # int32 completion ids, EOS-terminated unless truncated
    rejected: np.ndarray
    source: str  # "file:line" of the record, for messages

    @property
    def lengths(self) -> tuple[int, int]:
        return len(self.prompt) + len(self.chosen), len(self.prompt) + len(self.rejected)


# --------------------------------------------------------------------------- reading


def read_records(path: str) -> list[tuple[str, dict]]:
    """Reads .jsonl (one object per line) or .json (a list of objects).

    Returns (where, record) with `where` = "file:line" (jsonl) or "file:record N" (json).
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if path.endswith(".jsonl"):
        records = []
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, start=1):
                where = f"{path}:{line_number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{where}: invalid UTF-8 ({e.reason} at byte {e.start})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{where}: malformed JSON ({e.msg} at column {e.colno})"
                    ) from None
                records.append((where, record))
        return records
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(loaded, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(loaded).__name__}")
        return [(f"{path}:record {i}", record) for i, record in enumerate(loaded)]
    raise DataError(f"{path}: unsupported file type; use .jsonl or .json")


def validate_record(where: str, record) -> tuple[str, str, str]:
    """Checks one {"prompt","chosen","rejected"} record; raises DataError naming the field."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    values = []
    for field in FIELDS:
        if field not in record:
            raise DataError(
                f"{where}: missing field {field!r} (record has {sorted(record)}); every record "
                f"needs {list(FIELDS)}"
            )
        value = record[field]
        if not isinstance(value, str):
            raise DataError(
                f"{where}: field {field!r} must be a string, got {type(value).__name__}"
            )
        if field != "prompt" and not value.strip():
            raise DataError(f"{where}: field {field!r} is empty")
        values.append(value)
    if values[1] == values[2]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical; a pair needs two sides")
    return values[0], values[1], values[2]


# ---------------------------------------------------------------------- tokenizing


def render_prompts(tokenizer, prompts: Sequence[str], apply_chat_template: bool) -> list[list[int]]:
    """Prompt ids. With the chat template the prompt becomes a user turn followed by the
    generation prompt; the template text already holds BOS, so no special tokens are added
    again. Without it the tokenizer adds its own special tokens (BOS for Llama, none for Qwen)."""
    if apply_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "config data.apply_chat_template=True but the tokenizer has no chat template; "
                "set data.apply_chat_template=False or use a tokenizer with one"
            )
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def render_completions(tokenizer, completions: Sequence[str]) -> list[list[int]]:
    """Completion ids followed by EOS, so the model learns where an answer ends."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no eos_token; completions must end with one")
    ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return [list(x) + [tokenizer.eos_token_id] for x in ids]


def tokenize_records(
    records: Sequence[tuple[str, dict]], tokenizer, cfg: DataConfig
) -> tuple[list[TokenizedPair], Counter]:
    """Validates, tokenizes and truncates records. Returns the pairs and counts of
    dropped and truncated pairs by reason.

    Truncation keeps the end of the prompt (the question sits there) and the start of each
    completion; a pair whose prompt leaves no room for a completion token is dropped.
    """
    validated = [(where, *validate_record(where, record)) for where, record in records]
    prompts = render_prompts(tokenizer, [v[1] for v in validated], cfg.apply_chat_template)
    chosen = render_completions(tokenizer, [v[2] for v in validated])
    rejected = render_completions(tokenizer, [v[3] for v in validated])
    pairs, counts = [], Counter()
    for (where, *_), p, c, r in zip(validated, prompts, chosen, rejected, strict=True):
        if cfg.max_prompt_length is not None and len(p) > cfg.max_prompt_length:
            p = p[len(p) - cfg.max_prompt_length :]
            counts["truncated:prompt"] += 1
        room = cfg.max_seq_length - len(p)
        if room < 1:
            counts["dropped:prompt_too_long"] += 1
            continue
        if len(c) > room or len(r) > room:
            counts["truncated:completion"] += 1
        pairs.append(
            TokenizedPair(
                prompt=np.asarray(p, np.int32),
                chosen=np.asarray(c[:room], np.int32),
                rejected=np.asarray(r[:room], np.int32),
                source=where,
            )
        )
    return pairs, counts


def load_pairs(path: str, tokenizer, cfg: DataConfig) -> tuple[list[TokenizedPair], Counter]:
    pairs, counts = tokenize_records(read_records(path), tokenizer, cfg)
    if not pairs:
        raise DataError(f"{path}: no usable pairs (dropped: {dict(counts)})")
    return pairs, counts


# ------------------------------------------------------------------------ batching


def empty_batch(num_rows: int, row_length: int, num_pairs: int, pad_id: int) -> dict:
    return {
        "tokens": np.full((num_rows, row_length), pad_id, np.int32),
        "positions": np.zeros((num_rows, row_length), np.int32),
        "segment_ids": np.zeros((num_rows, row_length), np.int32),
        "labels": np.full((num_rows, row_length), pad_id, np.int32),
        "loss_mask": np.zeros((num_rows, row_length), bool),
        "sequence_ids": np.zeros((num_rows, row_length), np.int32),
        "pair_mask": np.zeros((num_pairs,), bool),
    }


def write_sequence(
    batch: dict,
    row: int,
    start: int,
    segment: int,
    sequence_id: int,
    prompt: np.ndarray,
    completion: np.ndarray,
) -> int:
    """Writes one prompt+completion at batch[row, start:]; returns the end offset."""
    tokens = np.concatenate([prompt, completion])
    end = start + len(tokens)
    span = slice(start, end)
    batch["tokens"][row, span] = tokens
    batch["positions"][row, span] = np.arange(len(tokens))
    batch["segment_ids"][row, span] = segment
    batch["sequence_ids"][row, span] = sequence_id
    # Position t predicts token t+1; the last token of a sequence predicts nothing.
    batch["labels"][row, start : end - 1] = tokens[1:]
    batch["loss_mask"][row, start + len(prompt) - 1 : end - 1] = True
    return end


def padded_batch(
    pairs: Sequence[TokenizedPair], num_pairs: int, row_length: int, pad_id: int
) -> dict:
    """One sequence per row: row 2p is the chosen of pair p, row 2p+1 its rejected."""
    batch = empty_batch(2 * num_pairs, row_length, num_pairs, pad_id)
    for p, pair in enumerate(pairs):
        write_sequence(batch, 2 * p, 0, 1, 2 * p, pair.prompt, pair.chosen)
        write_sequence(batch, 2 * p + 1, 0, 1, 2 * p + 1, pair.prompt, pair.rejected)
        batch["pair_mask"][p] = True
    return batch


def packed_batch(
    pairs: Sequence[TokenizedPair], num_pairs: int, num_rows: int, row_length: int, pad_id: int
) -> dict:
    """Several sequences per row, placed first-fit by decreasing length.

    Raises DataError when the sequences do not fit in num_rows rows."""
    batch = empty_batch(num_rows, row_length, num_pairs, pad_id)
    sequences = []
    for p, pair in enumerate(pairs):
        sequences.append((2 * p, pair.prompt, pair.chosen))
        sequences.append((2 * p + 1, pair.prompt, pair.rejected))
        batch["pair_mask"][p] = True
    sequences.sort(key=lambda s: -(len(s[1]) + len(s[2])))
    used = [0] * num_rows
    segments = [0] * num_rows
    for sequence_id, prompt, completion in sequences:
        length = len(prompt) + len(completion)
        row = next((r for r in range(num_rows) if used[r] + length <= row_length), None)
        if row is None:
            raise DataError(
                f"packing: {len(sequences)} sequences do not fit in {num_rows} rows of "
                f"{row_length} tokens"
            )
        segments[row] += 1
        used[row] = write_sequence(
            batch, row, used[row], segments[row], sequence_id, prompt, completion
        )
    return batch


def stack_batches(batches: Sequence[dict]) -> dict:
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


class PairIterator:
    """Endless, deterministic stream of training batches.

    The order of epoch e is a permutation drawn from (seed, e), so the stream is a pure
    function of (seed, epoch, index): its position is two integers, saved with each
    checkpoint and restored on resume. A partial last batch of an epoch is dropped.
    """

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        *,
        batch_size: int,
        accumulation_steps: int,
        row_length: int,
        pad_id: int,
        seed: int,
        shuffle: bool = True,
    ):
        if batch_size % accumulation_steps:
            raise DataError(
                f"config training.batch_size={batch_size} is not divisible by "
                f"training.gradient_accumulation_steps={accumulation_steps}"
            )
        if len(pairs) < batch_size:
            raise DataError(
                f"training data has {len(pairs)} pairs, fewer than training.batch_size={batch_size}"
            )
        self.pairs = pairs
        self.batch_size = batch_size
        self.accumulation_steps = accumulation_steps
        self.row_length = row_length
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # batches already taken from this epoch

    @property
    def steps_per_epoch(self) -> int:
        return len(self.pairs) // self.batch_size

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.pairs))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def restore(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        if self.index >= self.steps_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = self.epoch_order(self.epoch)
        start = self.index * self.batch_size
        chosen = [self.pairs[i] for i in order[start : start + self.batch_size]]
        self.index += 1
        micro = self.batch_size // self.accumulation_steps
        return stack_batches(
            [
                padded_batch(
                    chosen[a * micro : (a + 1) * micro], micro, self.row_length, self.pad_id
                )
                for a in range(self.accumulation_steps)
            ]
        )


def eval_batches(
    pairs: Sequence[TokenizedPair], *, batch_size: int, row_length: int, pad_id: int
) -> Iterator[dict]:
    """Every pair exactly once, in file order; the last batch is completed with filler pairs
    (pair_mask False) so that the shape never changes."""
    for start in range(0, len(pairs), batch_size):
        yield padded_batch(pairs[start : start + batch_size], batch_size, row_length, pad_id)


def length_stats(pairs: Sequence[TokenizedPair]) -> dict:
    lengths = np.array([n for pair in pairs for n in pair.lengths])
    return {f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)} | {
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
    }
