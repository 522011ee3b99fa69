"""Tokenized pairs → fixed-shape host batches in the DESIGN layout (see the package docstring).

Padded: one sequence per row (row 2p = chosen of pair p, 2p+1 = its rejected), row length
a bucket from a short static list, so XLA compiles once per bucket, not once per batch.
Packed: several sequences per row, whole pairs placed first-fit-decreasing into a static
number of rows and pair slots per micro-batch; positions restart and segment ids count up
within each row, so attention never crosses sequences.

A process builds only its own rows: `rows=(start, stop)` of the rows of a micro-batch.
Pair-level arrays (pair_mask) are whole on every process.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from .problems import DataError
from .tokens import TokenizedPair

# A packed sequence placement: (row, offset, segment id).
Slot = tuple[int, int, int]


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


def process_rows(num_rows: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The contiguous block of rows that process `process_index` builds."""
    if num_rows % process_count:
        raise DataError(
            f"{num_rows} rows per micro-batch cannot be split evenly over {process_count} "
            "processes; make the rows per micro-batch a multiple of the process count"
        )
    size = num_rows // process_count
    return process_index * size, (process_index + 1) * size


def padded_batch(
    pairs: Sequence[TokenizedPair],
    num_pairs: int,
    row_length: int,
    pad_id: int,
    rows: tuple[int, int] | None = None,
) -> dict:
    """One sequence per row: row 2p is the chosen of pair p, row 2p+1 its rejected."""
    start, stop = rows or (0, 2 * num_pairs)
    batch = empty_batch(stop - start, row_length, num_pairs, pad_id)
    for p, pair in enumerate(pairs):
        batch["pair_mask"][p] = True
        for side, completion in enumerate((pair.chosen, pair.rejected)):
            if start <= 2 * p + side < stop:
                write_sequence(
                    batch, 2 * p + side - start, 0, 1, 2 * p + side, pair.prompt, completion
                )
    return batch


def resolve_buckets(spec, max_seq_length: int) -> tuple[int, ...]:
    """Padded row lengths: "" → (max_seq_length,); "auto" → quarters of it (multiples of 8);
    "128,256" or a list → those, capped and completed by max_seq_length."""
    if spec is None or spec == "" or spec == ():
        return (max_seq_length,)
    if spec == "auto":
        lengths = [-(-max_seq_length * k // 4) for k in (1, 2, 3)]
        lengths = [-(-n // 8) * 8 for n in lengths]
    else:
        values = spec.split(",") if isinstance(spec, str) else spec
        try:
            lengths = [int(v) for v in values if str(v).strip()]
        except ValueError:
            raise DataError(f"config data.bucket_lengths={spec!r}: expected integers") from None
        if any(n < 2 for n in lengths):
            raise DataError(f"config data.bucket_lengths={spec!r}: lengths must be >= 2")
    return tuple(sorted({n for n in lengths if n < max_seq_length} | {max_seq_length}))


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    for bucket in buckets:
        if bucket >= length:
            return bucket
    raise DataError(f"a sequence of {length} tokens is longer than the row length {buckets[-1]}")


# --------------------------------------------------------------------------- packing


def pack_step(
    window: Sequence[int],
    chosen_lengths: np.ndarray,
    rejected_lengths: np.ndarray | None,
    *,
    micro_batches: int,
    rows: int,
    row_length: int,
    pair_slots: int,
    max_segments_per_row: int = 0,
    splits: Sequence[int] = (),
) -> tuple[list[list[tuple]], list[int]]:
    """First-fit decreasing of whole pairs into one optimizer step.

    Pairs go, in groups (the window cut at `splits`; each group longest first, ties in
    window order), to the micro-batch with the most free tokens among those with a free pair
    slot whose rows fit every part of the pair, each part first-fit into its rows.
    A pair's parts are its chosen and rejected sequences, or, with `rejected_lengths`
    None, one prefix-shared group [prompt | chosen | rejected] of `chosen_lengths` tokens.
    Returns per micro-batch [(pair index, slot per part…)] in slot order, and the pairs of
    `window` that did not fit (in window order) for the next step. A row holds at most
    `max_segments_per_row` parts when that is > 0 (cuDNN's packed layout needs the bound).
    """
    cap = max_segments_per_row if max_segments_per_row > 0 else np.iinfo(np.int64).max
    parts = (chosen_lengths,) if rejected_lengths is None else (chosen_lengths, rejected_lengths)
    free = np.full((micro_batches, rows), row_length, np.int64)
    segments = np.zeros((micro_batches, rows), np.int64)
    plans: list[list] = [[] for _ in range(micro_batches)]
    placed = set()
    window = list(window)
    bounds = [0, *splits, len(window)]
    placing = []
    for a, b in itertools.pairwise(bounds):
        placing += sorted(window[a:b], key=lambda i: -sum(int(n[i]) for n in parts))
    for i in placing:
        lengths = [int(part[i]) for part in parts]
        order = sorted(range(len(parts)), key=lambda k: -lengths[k])  # longer part first
        counts = np.array([len(p) for p in plans])
        room = (free >= lengths[order[0]]) & (segments < cap)
        # The emptiest micro-batch first: first fit would fill micro-batch 0 with the longest
        # pairs of the step (its pair slots run out long before its rows do).
        open_ = np.flatnonzero((counts < pair_slots) & room.any(1))
        for a in open_[np.argsort(-free[open_].sum(1), kind="stable")]:
            slots: list = [None] * len(parts)
            for k in order:
                fits = (free[a] >= lengths[k]) & (segments[a] < cap)
                if not fits.any():
                    break
                row = int(np.argmax(fits))
                segments[a, row] += 1
                slots[k] = (row, row_length - int(free[a, row]), int(segments[a, row]))
                free[a, row] -= lengths[k]
            if any(slot is None for slot in slots):  # undo the parts already placed
                for slot, length in zip(slots, lengths, strict=True):
                    if slot is not None:
                        free[a, slot[0]] += length
                        segments[a, slot[0]] -= 1
                continue
            plans[a].append((i, *slots))
            placed.add(i)
            break
    return plans, [i for i in window if i not in placed]


def rows_needed(
    pairs: Sequence[int],
    first_parts: np.ndarray,
    second_parts: np.ndarray | None,
    *,
    row_length: int,
    max_segments_per_row: int = 0,
    minimum: int = 1,
) -> int:
    """Fewest rows of `row_length` that first-fit decreasing packs these pairs (indices into
    the part lengths, as pack_step takes them) into, at least `minimum`."""
    pairs = list(pairs)
    total = sum(int(part[pairs].sum()) for part in (first_parts, second_parts) if part is not None)
    rows = max(minimum, -(-total // row_length))
    while True:
        _, left = pack_step(
            pairs,
            first_parts,
            second_parts,
            micro_batches=1,
            rows=rows,
            row_length=row_length,
            pair_slots=len(pairs),
            max_segments_per_row=max_segments_per_row,
        )
        if not left:
            return rows
        rows += 1


def fill_packed(
    plan: Sequence[tuple[int, Slot, Slot]],
    pairs: Sequence[TokenizedPair],
    *,
    num_rows: int,
    row_length: int,
    num_pairs: int,
    pad_id: int,
    rows: tuple[int, int] | None = None,
) -> dict:
    """One packed micro-batch from its plan; pair p of the plan is sequences 2p and 2p+1."""
    start, stop = rows or (0, num_rows)
    batch = empty_batch(stop - start, row_length, num_pairs, pad_id)
    for p, (i, *slots) in enumerate(plan):
        batch["pair_mask"][p] = True
        pair = pairs[i]
        for side, (row, offset, segment) in enumerate(slots):
            if start <= row < stop:
                completion = pair.rejected if side else pair.chosen
                write_sequence(
                    batch, row - start, offset, segment, 2 * p + side, pair.prompt, completion
                )
    return batch


def write_group(
    batch: dict,
    row: int,
    start: int,
    segment: int,
    pair_slot: int,
    prompt: np.ndarray,
    chosen: np.ndarray,
    rejected: np.ndarray,
) -> int:
    """Writes one prefix-shared pair [prompt | chosen | rejected] at batch[row, start:].

    The rejected reply continues the prompt's positions and sees the prompt but not the
    chosen reply (branch ids 0 / 1 / 2: a key of branch b > 0 is visible only to queries of
    the same branch). Its first token is predicted from the prompt's last position, which
    already predicts the chosen reply's first token: that one prediction is carried per
    pair slot (extra_index, extra_label) and computed apart (batch_loss.sequence_stats)."""
    lp, lc, lr = len(prompt), len(chosen), len(rejected)
    tokens = np.concatenate([prompt, chosen, rejected])
    end = start + len(tokens)
    batch["tokens"][row, start:end] = tokens
    batch["positions"][row, start:end] = np.concatenate([np.arange(lp + lc), lp + np.arange(lr)])
    batch["segment_ids"][row, start:end] = segment
    batch["branch_ids"][row, start:end] = np.repeat([0, 1, 2], [lp, lc, lr])
    batch["sequence_ids"][row, start:end] = 2 * pair_slot
    batch["sequence_ids"][row, start + lp + lc : end] = 2 * pair_slot + 1
    # Prompt and chosen: position t predicts t+1, the chosen reply's tokens are trained.
    batch["labels"][row, start : start + lp + lc - 1] = tokens[1 : lp + lc]
    batch["loss_mask"][row, start + lp - 1 : start + lp + lc - 1] = True
    # Rejected: its tokens after the first (the first is the extra prediction).
    batch["labels"][row, start + lp + lc : end - 1] = rejected[1:]
    batch["loss_mask"][row, start + lp + lc : end - 1] = True
    return end


def fill_shared(
    plan: Sequence[tuple[int, Slot]],
    pairs: Sequence[TokenizedPair],
    *,
    num_rows: int,
    row_length: int,
    num_pairs: int,
    pad_id: int,
    rows: tuple[int, int] | None = None,
) -> dict:
    """One packed micro-batch of prefix-shared pairs (see write_group) from its plan."""
    start, stop = rows or (0, num_rows)
    batch = empty_batch(stop - start, row_length, num_pairs, pad_id)
    batch["branch_ids"] = np.zeros((stop - start, row_length), np.int32)
    # Pair-level (whole on every process): the flat index of the prompt's last token in
    # the rows of all processes, and the rejected reply's first token.
    batch["extra_index"] = np.zeros((num_pairs,), np.int32)
    batch["extra_label"] = np.full((num_pairs,), pad_id, np.int32)
    for p, (i, (row, offset, segment)) in enumerate(plan):
        pair = pairs[i]
        batch["pair_mask"][p] = True
        batch["extra_index"][p] = row * row_length + offset + len(pair.prompt) - 1
        batch["extra_label"][p] = pair.rejected[0]
        if start <= row < stop:
            write_group(
                batch, row - start, offset, segment, p, pair.prompt, pair.chosen, pair.rejected
            )
    return batch


def pair_parts(
    pairs: Sequence[TokenizedPair], prefix_sharing: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Row tokens of each pair's parts, as pack_step takes them: its chosen and rejected
    sequences, or (prefix sharing) one [prompt | chosen | rejected] group and None."""
    if prefix_sharing:
        groups = [len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs]
        return np.array(groups, np.int64), None
    chosen, rejected = ([p.lengths[side] for p in pairs] for side in (0, 1))
    return np.array(chosen, np.int64), np.array(rejected, np.int64)


def packed_row_length(max_seq_length: int, prefix_sharing: bool) -> int:
    """Packed rows: max_seq_length, or twice that for prefix-shared groups (a group holds up
    to two sequences of max_seq_length less one prompt)."""
    return 2 * max_seq_length if prefix_sharing else max_seq_length


def packed_batch(
    pairs: Sequence[TokenizedPair],
    num_pairs: int,
    num_rows: int,
    row_length: int,
    pad_id: int,
    prefix_sharing: bool = False,
    max_segments_per_row: int = 0,
) -> dict:
    """All of `pairs` packed into one micro-batch of num_rows rows (pair p keeps slot p), as
    separate sequences or as prefix-shared groups, at most `max_segments_per_row` sequences
    per row when > 0. Raises DataError when they do not fit."""
    (plan,), left = pack_step(
        range(len(pairs)),
        *pair_parts(pairs, prefix_sharing),
        micro_batches=1,
        rows=num_rows,
        row_length=row_length,
        pair_slots=num_pairs,
        max_segments_per_row=max_segments_per_row,
    )
    if left:
        raise DataError(
            f"packing: {len(pairs)} pairs do not fit in {num_rows} rows of {row_length} tokens"
        )
    fill = fill_shared if prefix_sharing else fill_packed
    plan = sorted(plan)  # slot p = pair p, as in padded_batch
    return fill(
        plan, pairs, num_rows=num_rows, row_length=row_length, num_pairs=num_pairs, pad_id=pad_id
    )


def stack_batches(batches: Sequence[dict]) -> dict:
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def reference_columns(
    table: np.ndarray, pair_lists: Sequence[Sequence[int]], num_pairs: int
) -> np.ndarray:
    """Precomputed reference log-probs [A, 2·num_pairs] for micro-batches whose pair slots
    hold `pair_lists[a]` (indices into `table`, [pairs, 2] of chosen, rejected): sequence
    2p is the chosen of slot p, 2p+1 its rejected; unused slots are 0."""
    columns = np.zeros((len(pair_lists), 2 * num_pairs), np.float32)
    for a, indices in enumerate(pair_lists):
        indices = np.asarray(indices, np.int64)
        columns[a, : 2 * len(indices)] = table[indices].reshape(-1)
    return columns
