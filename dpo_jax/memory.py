"""Per-device memory estimate at start-up: what must fit, and which knobs make it fit.

Exact for what has a sharding (parameters, optimizer state, reference, gradients: the bytes
of each array's shard on one device); an estimate for activations, from the tensors each
layer keeps for the backward pass under the chosen remat policy.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from dpo_jax import sharding
from dpo_jax.model import ModelConfig

GiB = 2**30


def shard_bytes(tree) -> int:
    """Bytes one device holds of a pytree of arrays or ShapeDtypeStructs with shardings."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def activation_bytes(
    config: ModelConfig, tokens_per_device: int, row_length: int, logits_chunk_size: int
) -> int:
    """Activations kept for the backward pass of one micro-batch on one device."""
    b = np.dtype(config.dtype).itemsize
    d, f, h = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    n, k = config.num_heads, config.num_kv_heads
    # Softmax probabilities of the XLA attention: fp32, one row of T keys per head.
    attention_probs = n * row_length * 4
    per_token = {
        # norms' inputs, q/k/v, attention out, o_proj out, gate/up/product, down out
        "none": (4 * d + 2 * n * h + 2 * k * h + 3 * f) * b + attention_probs,
        # only the outputs of weight matmuls are kept; attention is recomputed
        "dots_saveable": (n * h + 2 * k * h + 2 * d + 2 * f) * b,
        # only each layer's input (the scan carry) is kept
        "full": d * b,
    }[config.remat_policy]
    layers = config.num_layers * per_token * tokens_per_device
    # The layer being recomputed under remat holds its full activations once.
    one_layer = (
        0
        if config.remat_policy == "none"
        else ((4 * d + 2 * n * h + 2 * k * h + 3 * f) * b + attention_probs) * tokens_per_device
    )
    # Final hidden states (+ their gradient) and one vocabulary chunk of fp32 logits,
    # softmax and gradient in the chunked log-prob.
    head = tokens_per_device * (2 * d * b + 3 * min(logits_chunk_size, config.vocab_size) * 4)
    return layers + one_layer + head


def estimate(
    state,
    frozen,
    config: ModelConfig,
    *,
    tokens_per_device: int,
    row_length: int,
    logits_chunk_size: int,
) -> dict[str, int]:
    """Bytes per device by part; `state`/`frozen` may be arrays or ShapeDtypeStructs.

    `frozen`: the weights the step reads but does not train: the reference's, or with LoRA
    the base (quantized or not; "params" then are the adapters). TR-DPO's reference is part
    of `state` (state.reference)."""
    params = shard_bytes(state.params)
    lora = config.lora_rank > 0
    parts = {
        "base" if lora else "params": shard_bytes(frozen) if lora else params,
        "adapters" if lora else "reference": params if lora else shard_bytes(frozen or []),
        "optimizer": shard_bytes(state.opt_state),
        "gradients": params,  # accumulated in the parameters' dtype and sharding
        "activations": activation_bytes(config, tokens_per_device, row_length, logits_chunk_size),
    }
    if state.reference is not None:
        parts["reference"] = shard_bytes(state.reference)
    parts["total"] = sum(parts.values())
    return parts


def describe(parts: dict[str, int]) -> str:
    return ", ".join(f"{name} {size / GiB:.2f} GiB" for name, size in parts.items())


FIT_KNOBS = (
    "training.gradient_accumulation_steps (more, smaller micro-batches)",
    "training.gradient_checkpointing=True or model.remat_policy=dots_saveable|full",
    "mesh.fsdp (shard parameters and optimizer state over more devices)",
    "training.precompute_ref_log_probs=True (no reference weights on the device)",
    "training.optimizer_state_dtype=bfloat16 (Adam moments at half the memory)",
    "lora.rank=16 (train adapters only: no optimizer state or gradients for the base)",
    "lora.quantization=nf4 (with LoRA: the frozen base at ~4.5 bits per weight)",
    "data.max_seq_length (shorter rows)",
    "model.logits_chunk_size (smaller vocabulary chunks)",
    "training.batch_size (fewer pairs per step)",
)


def device_limit_bytes(device) -> int | None:
    """Usable memory of an accelerator; None on CPU, where the OS pages instead."""
    if device.platform == "cpu":
        return None
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit")


def check_fits(parts: dict[str, int], limit_bytes: int | None) -> None:
    """Raises MemoryError before compilation when the estimate exceeds the device."""
    if limit_bytes is None or parts["total"] <= limit_bytes:
        return
    knobs = "\n  - ".join(FIT_KNOBS)
    raise MemoryError(
        f"estimated {parts['total'] / GiB:.1f} GiB per device ({describe(parts)}) exceeds the "
        f"{limit_bytes / GiB:.1f} GiB available. Knobs that reduce it:\n  - {knobs}"
    )


def check_state_fits(
    abstract_state,
    config: ModelConfig,
    mesh,
    *,
    frozen,
    rows: int,
    row_length: int,
    logits_chunk_size: int,
    enforce: bool = True,
) -> dict[str, int]:
    """Prints the per-device estimate for a state of ShapeDtypeStructs and micro-batches of
    `rows` rows as the iterator builds them; on an accelerator (with `enforce`), stops before
    compiling when it cannot fit, naming the knobs that would make it fit. `frozen`: see
    `estimate` (ShapeDtypeStructs). Returns the parts."""
    data_parallel = sharding.data_parallel_size(mesh)
    parts = estimate(
        abstract_state,
        frozen,
        config,
        tokens_per_device=max(1, rows // data_parallel) * row_length,
        row_length=row_length,
        logits_chunk_size=logits_chunk_size,
    )
    if jax.process_index() == 0:
        print(f"memory per device (estimate): {describe(parts)}", flush=True)
    if enforce:
        check_fits(parts, device_limit_bytes(mesh.devices.flat[0]))
    return parts


def device_peak_gb() -> float | None:
    """Peak memory of this process's first device so far (None where it is not tracked)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / GiB
