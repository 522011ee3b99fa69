"""The training stream: a pure function of (data, seed, epoch, step), and eval batches.

Epoch e's order is a permutation drawn from (seed, e); with a weighted mixture each source
first contributes its share of the epoch (sampled from (seed, e, source), repeated when a
small source is upsampled). A step is training.batch_size pairs in every layout: padded
steps take the next batch_size pairs of that order; packed steps are packed first-fit-
decreasing into rows per micro-batch sized from the data's lengths (`size_packed_rows`):
first the pairs the step before passed on, then the next ones up to batch_size, and, where
those leave pair slots and room, pairs of the next LOOK_AHEAD batches of the order that fit. So a
step holds the same pairs as padded whenever they fit, nearly every step is full, and a
pair that does not fit waits one step. Either way the pairs beyond the epoch's last full
batch are left to later epochs' shuffles, and the shapes never change. The position is
{"epoch", "index", "fingerprint", "tokens_seen"} (JSON, saved with checkpoints).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
from collections.abc import Iterator, Sequence

import numpy as np

from .batching import (
    bucket_for,
    fill_packed,
    fill_shared,
    pack_step,
    packed_row_length,
    padded_batch,
    pair_parts,
    process_rows,
    reference_columns,
    stack_batches,
)
from .problems import DataError
from .tokens import TokenizedPair

SIZING_STEPS = 64  # packed steps of epoch 0 planned to size the rows
SIZING_FILL = 0.99  # of batch_size, the mean pairs per step those steps must reach
LOOK_AHEAD = 2  # batches of the order beyond a step's own whose pairs may fill its gaps


def mixture_quotas(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Pairs per epoch from each source: the epoch keeps its natural size, split by weight
    (largest remainders, so the quotas add up exactly)."""
    total, weight = sum(sizes), float(sum(weights))
    if len(weights) != len(sizes) or weight <= 0 or min(weights) < 0:
        raise DataError(
            f"config data.train_weights={list(weights)}: need one non-negative "
            f"weight per training source ({len(sizes)}), not all zero"
        )
    exact = [total * w / weight for w in weights]
    quotas = [math.floor(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: quotas[i] - exact[i])[: total - sum(quotas)]:
        quotas[i] += 1
    return quotas


class PairIterator:
    """Endless, deterministic stream of training batches [A, R, T] / [A, P]."""

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
        buckets: Sequence[int] = (),
        packing: bool = False,
        packed_rows: int = 0,
        row_multiple: int = 1,
        prefix_sharing: bool = False,
        max_segments_per_row: int = 0,
        sources: Sequence[tuple[int, float]] | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size % accumulation_steps:
            raise DataError(
                f"config training.batch_size={batch_size} is not divisible by "
                f"training.gradient_accumulation_steps={accumulation_steps}"
            )
        self.pairs, self.seed, self.shuffle = pairs, seed, shuffle
        self.batch_size, self.accumulation_steps = batch_size, accumulation_steps
        self.row_length, self.pad_id = row_length, pad_id
        self.buckets = tuple(buckets) or (row_length,)
        self.packing = packing
        # Prefix sharing: each pair is one [prompt | chosen | rejected] group, in rows twice
        # as long.
        self.prefix_sharing = prefix_sharing
        if prefix_sharing and not packing:
            raise DataError("config data.prefix_sharing=True needs data.packing=True")
        self.pack_length = packed_row_length(row_length, prefix_sharing)
        self.max_segments_per_row = max_segments_per_row  # 0 = as many as fit
        self.process_index, self.process_count = process_index, process_count
        # (size, weight) per source, in the order the sources are concatenated in `pairs`.
        self.sources = list(sources) if sources else None
        if self.sources and sum(n for n, _ in self.sources) != len(pairs):
            raise ValueError("sources must add up to the number of pairs")
        self.quotas = (
            mixture_quotas([n for n, _ in self.sources], [w for _, w in self.sources])
            if self.sources
            else [len(pairs)]
        )
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order): epoch_order
        self.chosen_lengths, self.rejected_lengths = pair_parts(pairs)
        self.group_lengths, _ = pair_parts(pairs, prefix_sharing=True)
        micro = batch_size // accumulation_steps
        if len(pairs) < batch_size:
            raise DataError(
                f"training data has {len(pairs)} pairs, fewer than training.batch_size={batch_size}"
            )
        self.pair_slots = micro  # pairs per micro-batch, packed or padded
        # Packed rows per micro-batch: data.packed_rows, or sized from the lengths as a
        # multiple of `row_multiple` (the data-parallel size and the process count).
        self.rows = 2 * micro
        if packing:
            multiple = math.lcm(row_multiple, process_count)
            self.rows = packed_rows or self.size_packed_rows(multiple)
        self.row_range = process_rows(self.rows, process_index, process_count)
        # Precomputed reference log-probs [pairs, 2] (reference.py); batches then carry
        # ref_logps [A, 2P].
        self.reference_logps: np.ndarray | None = None
        self.epoch = 0
        self.index = 0  # steps already taken from this epoch
        self.tokens_seen = 0  # sequence tokens of every step taken (TRL's num_tokens)
        self._plan: tuple[int, list] | None = None  # (epoch, packed steps) of the last epoch
        self._steps: dict[int, int] = {}  # packed steps per epoch

    def attach_reference(self, table: np.ndarray) -> None:
        """Precomputed reference log-probs [pairs, 2] of `self.pairs`: every batch from now
        on carries its pairs' rows as ref_logps."""
        self.reference_logps = table

    @property
    def pair_tokens(self) -> np.ndarray:
        """Row tokens each pair takes: both sequences, or its prefix-shared group."""
        if self.prefix_sharing:
            return self.group_lengths
        return self.chosen_lengths + self.rejected_lengths

    def part_lengths(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Each pair's parts as the packer places them (see batching.pair_parts)."""
        if self.prefix_sharing:
            return self.group_lengths, None
        return self.chosen_lengths, self.rejected_lengths

    def size_packed_rows(self, multiple: int = 1) -> int:
        """The fewest rows per micro-batch (a multiple of `multiple`) with which the first
        SIZING_STEPS packed steps of epoch 0 hold SIZING_FILL × batch_size pairs on average,
        tried from a micro-batch's mean tokens up; at most the padded layout's rows (one
        sequence or group per row, where every pair always fits)."""
        most = self.pair_slots if self.prefix_sharing else 2 * self.pair_slots
        # Two rows at least without prefix sharing: each of a pair's sequences may fill one.
        least = 1 if self.prefix_sharing else 2
        mean_tokens = float(self.pair_tokens.mean()) * self.pair_slots
        rows = max(least, math.ceil(mean_tokens / self.pack_length))
        if self.max_segments_per_row:  # sequences (or groups) per row are bounded too
            parts = 1 if self.prefix_sharing else 2
            rows = max(rows, math.ceil(parts * self.pair_slots / self.max_segments_per_row))
        rows = -(-rows // multiple) * multiple
        order = self.epoch_order(0).tolist()
        while rows < most:
            steps = list(itertools.islice(self.plan_steps(order, rows), SIZING_STEPS))
            placed = sum(len(plan) for step in steps for plan in step)
            if placed >= SIZING_FILL * self.batch_size * len(steps):
                return rows
            rows += multiple
        return most

    # ------------------------------------------------------------------- order and plan

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's pair order (read-only), drawn once per epoch: every step asks for it
        (its pairs, its token count, reference columns), and a draw is a permutation of all
        pairs."""
        if self._order is None or self._order[0] != epoch:
            order = self._draw_order(epoch)
            order.setflags(write=False)
            self._order = (epoch, order)
        return self._order[1]

    def _draw_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        if self.sources is None:
            return rng.permutation(len(self.pairs)) if self.shuffle else np.arange(len(self.pairs))
        parts, start = [], 0
        for s, ((size, _), quota) in enumerate(zip(self.sources, self.quotas, strict=True)):
            source_rng = np.random.default_rng([self.seed, epoch, s])
            repeats = -(-quota // size) if size else 0
            drawn = np.concatenate(
                [source_rng.permutation(size) for _ in range(repeats)] or [np.zeros(0, np.int64)]
            )
            parts.append(start + drawn[:quota])
            start += size
        order = np.concatenate(parts)
        return rng.permutation(order) if self.shuffle else order

    def plan_steps(self, order: list, rows: int) -> Iterator[list]:
        """Packed steps of one epoch order, [micro-batch] → [(pair index, slot per part…)]
        each (see the module docstring); once the last full batch of the order is taken,
        steps go on until no pair is waiting."""
        queue = collections.deque(order[: len(order) // self.batch_size * self.batch_size])
        waiting, taken_ahead = [], set()  # passed on; placed early from the look-ahead

        def pop() -> int:
            while (i := queue.popleft()) in taken_ahead:
                taken_ahead.discard(i)
            return i

        while waiting or len(queue) > len(taken_ahead):
            head = list(waiting)
            while len(head) < self.batch_size and len(queue) > len(taken_ahead):
                head.append(pop())
            reach = itertools.islice(queue, len(taken_ahead) + LOOK_AHEAD * self.batch_size)
            ahead = [i for i in reach if i not in taken_ahead][: LOOK_AHEAD * self.batch_size]
            plan, left = pack_step(
                head + ahead,
                *self.part_lengths(),
                micro_batches=self.accumulation_steps,
                rows=rows,
                row_length=self.pack_length,
                pair_slots=self.pair_slots,
                max_segments_per_row=self.max_segments_per_row,
                splits=(len(waiting), len(head)),
            )
            if len(left) == len(head) + len(ahead):  # cannot happen: a pair fits an empty batch
                raise DataError(f"packing: no pair of {head[:4]}… fits {rows} rows")
            unplaced = set(left)
            waiting = [i for i in head if i in unplaced]
            taken_ahead |= {i for i in ahead if i not in unplaced}
            yield plan

    def packed_plan(self, epoch: int) -> list:
        """[step][micro-batch] → [(pair index, slot per part…)] for one epoch."""
        if self._plan is None or self._plan[0] != epoch:
            order = self.epoch_order(epoch).tolist()
            self._plan = (epoch, list(self.plan_steps(order, self.rows)))
        return self._plan[1]

    def steps_in_epoch(self, epoch: int) -> int:
        if not self.packing:
            return sum(self.quotas) // self.batch_size
        if epoch not in self._steps:  # plans are rebuilt on demand; their lengths are kept
            self._steps[epoch] = len(self.packed_plan(epoch))
        return self._steps[epoch]

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_in_epoch(0)

    def total_steps(self, num_epochs: int) -> int:
        return sum(self.steps_in_epoch(e) for e in range(num_epochs))

    # ------------------------------------------------------------------------- position

    def fingerprint(self) -> str:
        h = hashlib.sha256(
            json.dumps(
                [
                    self.seed,
                    self.shuffle,
                    self.batch_size,
                    self.accumulation_steps,
                    self.row_length,
                    self.buckets,
                    self.packing,
                    self.prefix_sharing,
                    self.max_segments_per_row,
                    self.rows,
                    self.pair_slots,
                    self.sources,
                ]
            ).encode()
        )
        h.update(self.chosen_lengths.tobytes() + self.rejected_lengths.tobytes())
        if self.prefix_sharing:  # its plans follow the group lengths (prompt counted once)
            h.update(self.group_lengths.tobytes())
        return h.hexdigest()[:16]

    def state(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "fingerprint": self.fingerprint(),
            "tokens_seen": self.tokens_seen,
        }

    def restore(self, state: dict) -> None:
        saved = state.get("fingerprint")
        if saved is not None and saved != self.fingerprint():
            raise DataError(
                "the checkpoint's data position belongs to other training data or batch "
                "settings (data files, tokenizer, lengths, batch size, packing, seed); "
                "restore the original settings or start in a new --workdir"
            )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if "tokens_seen" in state:
            self.tokens_seen = int(state["tokens_seen"])
        else:  # a position saved before the count existed: replay the steps' lengths
            self.tokens_seen = sum(
                self.step_tokens(e, k)
                for e in range(self.epoch + 1)
                for k in range(self.index if e == self.epoch else self.steps_in_epoch(e))
            )

    def step_tokens(self, epoch: int, index: int) -> int:
        """Tokens of a step's sequences, each pair's prompt counted with both replies (what
        TRL's num_tokens counts, whatever the layout)."""
        step = [i for micro in self.step_pairs(epoch, index) for i in micro]
        return int(self.chosen_lengths[step].sum() + self.rejected_lengths[step].sum())

    # -------------------------------------------------------------------------- batches

    def step_pairs(self, epoch: int, index: int) -> list:
        """The pair indices of one step, per micro-batch (pair slot order)."""
        if self.packing:
            return [[entry[0] for entry in plan] for plan in self.packed_plan(epoch)[index]]
        order = self.epoch_order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return [list(x) for x in np.split(order, self.accumulation_steps)]

    def build_step(self, epoch: int, index: int) -> dict:
        batch = self._build_rows(epoch, index)
        if self.reference_logps is not None:
            batch["ref_logps"] = reference_columns(
                self.reference_logps, self.step_pairs(epoch, index), self.pair_slots
            )
        return batch

    def _build_rows(self, epoch: int, index: int) -> dict:
        if self.packing:
            fill = fill_shared if self.prefix_sharing else fill_packed
            return stack_batches(
                [
                    fill(
                        plan,
                        self.pairs,
                        num_rows=self.rows,
                        row_length=self.pack_length,
                        num_pairs=self.pair_slots,
                        pad_id=self.pad_id,
                        rows=self.row_range,
                    )
                    for plan in self.packed_plan(epoch)[index]
                ]
            )
        micro = self.step_pairs(epoch, index)
        longest = max(
            max(self.chosen_lengths[i], self.rejected_lengths[i]) for m in micro for i in m
        )
        row_length = bucket_for(int(longest), self.buckets)
        return stack_batches(
            [
                padded_batch(
                    [self.pairs[i] for i in m],
                    self.pair_slots,
                    row_length,
                    self.pad_id,
                    rows=self.row_range,
                )
                for m in micro
            ]
        )

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        while self.index >= self.steps_in_epoch(self.epoch):
            self.epoch, self.index = self.epoch + 1, 0
        batch = self.build_step(self.epoch, self.index)
        self.tokens_seen += self.step_tokens(self.epoch, self.index)
        self.index += 1
        return batch

    def eval_batches(
        self,
        pairs: Sequence[TokenizedPair],
        batch_size: int,
        reference_logps: np.ndarray | None = None,
    ) -> Iterator[dict]:
        """eval_batches with this stream's row length, buckets, padding and process slice."""
        return eval_batches(
            pairs,
            reference_logps=reference_logps,
            batch_size=batch_size,
            row_length=self.row_length,
            pad_id=self.pad_id,
            buckets=self.buckets,
            process_index=self.process_index,
            process_count=self.process_count,
        )

    # ----------------------------------------------------------------------- statistics

    def efficiency(self, epoch: int = 0) -> dict:
        """Real tokens / row tokens of one epoch's steps, pairs and tokens per step, without
        building the batches."""
        real = slots = 0
        pairs_per_step, shapes = [], {}
        for index in range(self.steps_in_epoch(epoch)):
            micro = self.step_pairs(epoch, index)
            step = [i for m in micro for i in m]
            real += int(self.pair_tokens[step].sum())
            pairs_per_step.append(len(step))
            if self.packing:
                row_length = self.pack_length
            else:
                longest = max(max(self.chosen_lengths[step]), max(self.rejected_lengths[step]))
                row_length = bucket_for(int(longest), self.buckets)
            shapes[row_length] = shapes.get(row_length, 0) + 1
            slots += self.accumulation_steps * self.rows * row_length
        key = "packing_efficiency" if self.packing else "padding_efficiency"
        counts = np.array(pairs_per_step or [0])
        steps = max(len(pairs_per_step), 1)
        mode = "padded"
        if self.packing:
            mode = "packed, prefix-shared" if self.prefix_sharing else "packed"
        return {
            "mode": mode,
            key: round(real / max(slots, 1), 4),
            "steps_per_epoch": len(pairs_per_step),
            "rows_per_micro_batch": self.rows,
            "pair_slots_per_micro_batch": self.pair_slots,
            "pairs_per_step": {
                "min": int(counts.min()),
                "mean": round(float(counts.mean()), 2),
                "max": int(counts.max()),
            },
            # Row tokens a step computes (padding included), and the pairs' own tokens.
            "tokens_per_step": {"rows": round(slots / steps), "real": round(real / steps)},
            "steps_by_row_length": {str(k): v for k, v in sorted(shapes.items())},
            # Beyond the epoch's last full batch: left to later epochs' shuffles.
            "pairs_left_per_epoch": sum(self.quotas) % self.batch_size,
        }


def eval_batches(
    pairs: Sequence[TokenizedPair],
    *,
    batch_size: int,
    row_length: int,
    pad_id: int,
    buckets: Sequence[int] = (),
    process_index: int = 0,
    process_count: int = 1,
    reference_logps: np.ndarray | None = None,
) -> Iterator[dict]:
    """Every pair exactly once, in file order, padded [2·batch_size, T] with T the smallest
    bucket that fits the batch; the last batch is completed with filler pairs (pair_mask
    False) so that the shape never changes. With `reference_logps` ([pairs, 2]) the
    batches carry ref_logps [2·batch_size]."""
    buckets = tuple(buckets) or (row_length,)
    rows = process_rows(2 * batch_size, process_index, process_count)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        longest = max(max(p.lengths) for p in chunk)
        batch = padded_batch(chunk, batch_size, bucket_for(longest, buckets), pad_id, rows=rows)
        if reference_logps is not None:
            indices = range(start, start + len(chunk))
            batch["ref_logps"] = reference_columns(reference_logps, [indices], batch_size)[0]
        yield batch
