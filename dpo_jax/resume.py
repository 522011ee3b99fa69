"""What a resumed run may change of the config its checkpoints were trained with.

A resume continues one run: the same model, training data, data order and pairs per step.
dpo_jax.train compares the resolved config with the latest checkpoint's before it writes
anything, and refuses the changes that would silently mix two runs.
"""

from __future__ import annotations

from dpo_jax.settings import ConfigError

# What a resumed run may change. Free: what is logged, evaluated and saved, and how the
# same step is computed (mesh, kernels, remat, micro-batching). Fixed: what the checkpoint's
# weights and data position mean (the model, the training data and its order, pairs per
# step). Anything else (the loss, its beta, the schedule, the step count) changes the run's
# trajectory: refused unless named in --allow_changed.
FREE_ON_RESUME = (
    "logging.",
    "eval.",
    "checkpoint.",
    "mesh.",
    "data.prefetch",
    "data.num_proc",
    "data.cache_dir",
    "data.validation_file",
    "data.validation_files",
    "model.attention_impl",
    "model.remat_policy",
    "model.logits_chunk_size",
    "training.gradient_checkpointing",
    "training.gradient_accumulation_steps",
)
FIXED_ON_RESUME = ("model.", "data.", "training.batch_size", "training.seed")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def changes(saved: dict, now: dict, allowed: tuple[str, ...] = ()) -> list[str]:
    """The keys a resume changes ("key: old -> new"), when every one may change; else a
    ConfigError listing those that may not, and what to do."""
    before, after = _flat(saved), _flat(now)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    shown = [f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in changed]
    free = lambda key: key.startswith(FREE_ON_RESUME)  # noqa: E731
    fixed = [s for k, s in zip(changed, shown, strict=True) if not free(k)]
    fixed = [s for s in fixed if s.split(":")[0].startswith(FIXED_ON_RESUME)]
    refused = [
        s
        for k, s in zip(changed, shown, strict=True)
        if not free(k) and s not in fixed and k not in allowed
    ]
    if fixed:
        raise ConfigError(
            "the checkpoint to resume was trained with another model, data or batch: "
            f"{'; '.join(fixed)}. Use a new --workdir for a new run"
        )
    if refused:
        keys = ",".join(s.split(":")[0] for s in refused)
        raise ConfigError(
            f"resuming with a changed config: {'; '.join(refused)}. Restore the old values, "
            f"use a new --workdir, or allow the change with --allow_changed={keys}"
        )
    return shown
