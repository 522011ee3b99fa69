"""The optax chain from typed settings: AdamW, warmup + decay schedule, clipping, decay mask.

Adam's two moments may be stored in bfloat16 (`state_dtype`), which halves the optimizer's
memory (for an 8B model: 32 GiB instead of 64). The update itself is always computed in
float32; only the stored moments are rounded, and stochastically: with b2 = 0.999 the
second moment changes by ~0.1% per step, below bfloat16's resolution (0.4%), so
round-to-nearest would freeze it, while stochastic rounding keeps it right on average.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    min_lr_ratio: float = 0.0  # final learning rate as a fraction of the peak
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    state_dtype: str = "float32"  # dtype of both Adam moments ("bfloat16" halves their memory)


SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then the chosen decay to min_lr_ratio × peak."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"config training.lr_schedule={cfg.schedule!r}: choose one of {SCHEDULES}")
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warmup = max(0, min(cfg.warmup_steps, cfg.total_steps))
    decay_steps = max(1, cfg.total_steps - warmup)
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def last_step_at_reference(schedule: optax.Schedule, total_steps: int) -> int:
    """The last step whose forward still sees the initial weights: every step before it had
    learning rate 0 (warmup's first step does), so no update moved them. total_steps when
    no step's rate is above 0."""
    for step in range(total_steps):
        if float(schedule(step)) > 0.0:
            return step
    return total_steps


def decay_mask(params):
    """Weight decay on matrices only: norm scales and biases are left alone. Decided by
    the parameter's name, not its rank, because scanned layers add a leading axis."""

    def is_decayed(path, _):
        # The last dict key names the leaf; boxed (logically partitioned) leaves add
        # attribute entries after it, which must not change the answer.
        keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return not keys or keys[-1] not in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(is_decayed, params)


class AdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def stochastic_round(x_f32: jax.Array, dtype, salt: jax.Array) -> jax.Array:
    """float32 → `dtype`; to bfloat16 rounded up or down with probability proportional to
    the distance (unbiased), else a plain cast.

    The random bits are a cheap integer hash of (element index, value bits, salt), so the
    rounding is deterministic and the same on any mesh, and costs no RNG state."""
    if jnp.dtype(dtype) != jnp.bfloat16:
        return x_f32.astype(dtype)
    bits = jax.lax.bitcast_convert_type(x_f32, jnp.uint32)
    index = jax.lax.iota(jnp.uint32, x_f32.size).reshape(x_f32.shape)
    h = index * jnp.uint32(0x9E3779B1) ^ bits ^ salt.astype(jnp.uint32) * jnp.uint32(0x85EBCA77)
    h ^= h >> 15
    h *= jnp.uint32(0x2C1B3C6D)
    h ^= h >> 12
    # bfloat16 keeps the top 16 bits of a float32: adding 16 random low bits, then cutting
    # them, rounds up with probability (low bits) / 2^16. Inf and NaN pass unchanged.
    rounded = (bits + (h & jnp.uint32(0xFFFF))) & jnp.uint32(0xFFFF0000)
    rounded = jnp.where(jnp.isfinite(x_f32), rounded, bits)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)


def scale_by_adam(
    b1: float, b2: float, eps: float, state_dtype="float32"
) -> optax.GradientTransformation:
    """Adam's bias-corrected direction mu_hat / (sqrt(nu_hat) + eps), computed in float32,
    with both moments stored in `state_dtype` (equal to optax.scale_by_adam for float32)."""
    dtype = jnp.dtype(state_dtype)

    def init(params):
        zeros = lambda p: jnp.zeros(jnp.shape(p), dtype)  # noqa: E731
        return AdamState(
            jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params)
        )

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        f32 = jnp.float32
        mu = jax.tree.map(
            lambda g, m: b1 * m.astype(f32) + (1 - b1) * g.astype(f32), updates, state.mu
        )
        nu = jax.tree.map(
            lambda g, v: b2 * v.astype(f32) + (1 - b2) * jnp.square(g.astype(f32)),
            updates,
            state.nu,
        )
        mu_correction = 1 - b1 ** count.astype(f32)
        nu_correction = 1 - b2 ** count.astype(f32)
        direction = jax.tree.map(
            lambda g, m, v: ((m / mu_correction) / (jnp.sqrt(v / nu_correction) + eps)).astype(
                g.dtype
            ),
            updates,
            mu,
            nu,
        )
        # Different salts for the two moments, so their roundings are independent.
        store_mu = jax.tree.map(lambda m: stochastic_round(m, dtype, 2 * count), mu)
        store_nu = jax.tree.map(lambda v: stochastic_round(v, dtype, 2 * count + 1), nu)
        return direction, AdamState(count, store_mu, store_nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    schedule = make_schedule(cfg)
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    # Nested as optax.adamw nests it, so the optimizer state keeps the tree of checkpoints
    # written with optax.adamw.
    parts.append(
        optax.chain(
            scale_by_adam(cfg.b1, cfg.b2, cfg.eps, cfg.state_dtype),
            optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
            optax.scale_by_learning_rate(schedule),
        )
    )
    return optax.chain(*parts)
