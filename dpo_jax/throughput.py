"""Model FLOPs and MFU, shared by the trainer's logs and the benchmark.

Model FLOPs (DESIGN): 6N per real token for the policy (forward + backward), +2N when the
reference forward runs in the step, plus causal attention over each sequence's own length;
padding is never counted. MFU divides by the card's dense bf16 peak, read from its name.
"""

from __future__ import annotations

import os

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


def sequence_flops(model_config, sequence_lengths, with_reference: bool) -> float:
    """Model FLOPs of training on sequences of these lengths (no padding anywhere)."""
    total = 0.0
    for n in np.asarray(sequence_lengths).ravel():
        n = int(n)
        if n <= 0:
            continue
        per_token = model.flops_per_token(model_config, n, backward=True)
        if with_reference:
            per_token += model.flops_per_token(model_config, n, backward=False)
        total += per_token * n
    return total


def batch_sequence_lengths(batch: dict) -> np.ndarray:
    """Real lengths of every sequence of a host batch in the DESIGN layout (any leading
    axes): tokens per (row, segment id ≠ 0)."""
    segments = np.asarray(batch["segment_ids"])
    rows = segments.reshape(-1, segments.shape[-1])
    lengths = []
    for row in rows:
        counts = np.bincount(row)
        lengths.extend(int(c) for c in counts[1:] if c)
    return np.array(lengths, np.int64)
