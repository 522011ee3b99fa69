"""The optax chain from typed settings: AdamW, warmup + decay schedule, clipping, decay mask."""

from __future__ import annotations

import dataclasses

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
    state_dtype: str = "float32"  # dtype of Adam's moments ("bfloat16" halves their memory)


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


def decay_mask(params):
    """Weight decay on matrices only: norm scales and biases are left alone. Decided by
    the parameter's name, not its rank, because scanned layers add a leading axis."""

    def is_decayed(path, _):
        # The last dict key names the leaf; boxed (logically partitioned) leaves add
        # attribute entries after it, which must not change the answer.
        keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
        return not keys or keys[-1] not in ("scale", "bias")

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    schedule = make_schedule(cfg)
    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
            mu_dtype=jnp.dtype(cfg.state_dtype),
        )
    )
    return optax.chain(*parts)
