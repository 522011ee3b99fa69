"""Model FLOPs and MFU, shared by the trainer's logs and the benchmark.

Model FLOPs (DESIGN): 6N per real token for the policy (forward + backward), +2N when the
reference forward runs in the step, plus causal attention over each sequence's own length;
padding is never counted. MFU divides by the card's dense bf16 peak, read from its name.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np

from dpo_jax import model

# Dense bf16 peak FLOP/s by device name (first match wins; most specific first).
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v4", 275e12),
    ("TPU v6", 918e12),
)


def peak_flops(device) -> tuple[float, str]:
    """(FLOP/s, how it was obtained) for one device."""
    name = getattr(device, "device_kind", "")
    for key, flops in PEAK_FLOPS:
        if key in name:
            return flops, f"{name} dense bf16 peak"
    # CPU: a nominal figure (2 GHz × 32 fp32 FLOP/cycle with AVX2 FMA, per core of this
    # process), so that MFU is comparable between CPU runs, not an absolute truth.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return cores * 2e9 * 32 / jax.local_device_count(), f"{name or 'cpu'} nominal"


def sequence_flops(model_config, sequence_lengths, with_reference: bool, signs=None) -> float:
    """Model FLOPs of training on sequences of these lengths (no padding anywhere); `signs`
    (±1 per length) lets a prefix-shared group count as two sequences minus its prompt."""
    lengths = np.asarray(sequence_lengths).ravel()
    signs = np.ones(len(lengths)) if signs is None else np.asarray(signs).ravel()
    total = 0.0
    for n, sign in zip(lengths, signs, strict=True):
        n = int(n)
        if n <= 0:
            continue
        per_token = model.flops_per_token(model_config, n, backward=True)
        if with_reference:
            per_token += model.flops_per_token(model_config, n, backward=False)
        total += sign * per_token * n
    return total


def batch_sequence_lengths(batch: dict) -> np.ndarray:
    """Real lengths of every sequence of a host batch in the DESIGN layout (any leading
    axes): tokens per (row, segment id ≠ 0). A prefix-shared group is one length here."""
    segments = np.asarray(batch["segment_ids"])
    lengths = []
    for row in segments.reshape(-1, segments.shape[-1]):
        counts = np.bincount(row)
        lengths.extend(int(c) for c in counts[1:] if c)
    return np.array(lengths, np.int64)


def batch_flops(model_config, batch: dict, with_reference: bool) -> float:
    """Model FLOPs of one host batch. A prefix-shared group [prompt | chosen | rejected]
    (branch ids 0 / 1 / 2) counts as the sequences prompt+chosen and prompt+rejected less
    the prompt it computes once: exactly its matmul and causal-attention FLOPs."""
    branches = batch.get("branch_ids")
    if branches is None:
        return sequence_flops(model_config, batch_sequence_lengths(batch), with_reference)
    segments = np.asarray(batch["segment_ids"])
    width = segments.shape[-1]
    branches = np.asarray(branches).reshape(-1, width)
    lengths, signs = [], []
    for row, row_branches in zip(segments.reshape(-1, width), branches, strict=True):
        for segment in np.unique(row[row > 0]):
            prompt, chosen, rejected = np.bincount(row_branches[row == segment], minlength=3)[:3]
            lengths += [prompt + chosen, prompt + rejected, prompt]
            signs += [1, 1, -1]
    return sequence_flops(model_config, lengths, with_reference, signs)


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens in the rows of a host batch."""
    return int(np.count_nonzero(np.asarray(batch["segment_ids"])))


def batch_totals(model_config, host_batch: dict, with_reference: bool) -> np.ndarray:
    """[real tokens, pairs, model FLOPs] of one step's batch over all processes. Only this
    process's rows are here; the slices of all processes are of equal size, so tokens and
    FLOPs are process_count times this process's. Pair-level arrays (pair_mask) are whole
    on every process."""
    count = jax.process_count()
    return np.array(
        [
            count * batch_tokens(host_batch),
            np.count_nonzero(host_batch["pair_mask"]),
            count * batch_flops(model_config, host_batch, with_reference),
        ],
        np.float64,
    )


class Window:
    """Totals of the steps since the last log line, and the rates they give."""

    def __init__(self, peak_flops_per_device: float, num_devices: int):
        self.peak = peak_flops_per_device * num_devices
        self.reset()

    def reset(self) -> None:
        self.totals = np.zeros(3)
        self.started = time.perf_counter()

    def add(self, totals: np.ndarray) -> None:
        self.totals = self.totals + totals

    def take(self) -> tuple[np.ndarray, float]:
        """(totals, start time) of the window so far; a new window starts now."""
        taken = (self.totals, self.started)
        self.reset()
        return taken

    def rates(self, totals: np.ndarray, started: float) -> dict[str, float]:
        """Non-padding tokens and pairs per second and the MFU of all devices since
        `started` (the first window includes compilation)."""
        elapsed = max(time.perf_counter() - started, 1e-9)
        return {
            "tokens_per_sec": totals[0] / elapsed,
            "pairs_per_sec": totals[1] / elapsed,
            "mfu": totals[2] / elapsed / self.peak,
        }
