"""The pure train and eval steps: batch → policy/reference sequence log-probs → loss → update.
The batch's loss and metric sums are dpo_jax.batch_loss's; here they are differentiated,
accumulated over micro-batches, applied (with TR-DPO's reference sync) and compiled.

Shape legend (dpo_jax/__init__.py): A accumulation micro-batches, R rows, T tokens per row,
S sequences (2 per pair), P pairs, M tokens flattened, D model width, V vocabulary.

Normalisation is global: every loss and metric is a sum over valid pairs of the whole
optimizer step divided by the number of valid pairs in it (the SFT term with
sft_normalization="batch_tokens": by the number of chosen completion tokens in it), so
micro-batching and sharding change nothing but float rounding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dpo_jax import model, sharding
from dpo_jax.batch_loss import LossConfig, finalize, pair_sums, reference_logps, sequence_stats
from dpo_jax.model import ModelConfig


class NonFiniteError(RuntimeError):
    """A step's loss or gradients were not finite (training.nonfinite=stop)."""


def _no_steps() -> jax.Array:
    return jnp.zeros((), jnp.int32)


def _never() -> jax.Array:
    return jnp.full((), -1, jnp.int32)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    # Steps whose loss or gradients were not finite (their update was not applied), and the
    # first such step (-1: none). Checked in the step; the host reads them with the metrics.
    nonfinite_steps: jax.Array = dataclasses.field(default_factory=_no_steps)
    first_nonfinite_step: jax.Array = dataclasses.field(default_factory=_never)
    # TR-DPO (RefSync): the reference's weights, which the step mixes towards the policy, so
    # they are state and checkpointed. None otherwise (the reference is then frozen and
    # passed beside the state, or the LoRA base, or precomputed log-probs).
    reference: Any = None


@dataclasses.dataclass(frozen=True)
class RefSync:
    """TR-DPO (TRL's sync_ref_model): after every `every` steps the reference becomes
    alpha · policy + (1 - alpha) · reference."""

    every: int
    alpha: float


def synced_reference(reference, params, new_step, sync: RefSync):
    """The reference after step `new_step` - 1 has updated the policy to `params`."""

    def mix(trees):
        ref, policy = trees
        return jax.tree.map(
            lambda r, p: (
                sync.alpha * p.astype(jnp.float32) + (1.0 - sync.alpha) * r.astype(jnp.float32)
            ).astype(r.dtype),
            ref,
            policy,
        )

    return jax.lax.cond(new_step % sync.every == 0, mix, lambda t: t[0], (reference, params))


def train_step(
    state: TrainState,
    frozen,
    batch_A: dict,
    *,
    model_config: ModelConfig,
    loss_config: LossConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    padded_rows: bool = False,
    skip_nonfinite: bool = False,
    last_step_at_reference: int = -1,
    adapters: bool = False,
    ref_sync: RefSync | None = None,
    dropout_seed: int | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer step over A micro-batches (leading axis of every batch array);
    `padded_rows` when the batches are padded, one sequence per row (not packed). Steps up
    to `last_step_at_reference` (optim.last_step_at_reference: no update has moved the
    weights yet) use the policy's log-probs as the reference's (pair_sums).

    `frozen`: the frozen reference's weights (None when the batches carry precomputed
    reference log-probs, or the loss needs no reference); with `adapters` (LoRA) the
    frozen base instead, state.params being the adapters: the policy is
    model.Adapted(base, adapters) and the reference the base itself. With `ref_sync`
    (TR-DPO) the reference is state.reference, mixed towards the policy after the update.
    `dropout_seed`: LoRA dropout's rng, derived from (seed, step, micro-batch).

    A step whose loss or gradients are not finite applies no update (the state stays the
    last finite one) and is counted. With `skip_nonfinite` False the state then freezes:
    later steps apply nothing either, so whenever the host notices (at its next metrics read
    or checkpoint) the parameters are those before the first bad step."""

    # The step's own denominators, from the whole batch before any micro-batch runs: each
    # micro-batch's objective is then its exact share of the step's mean loss.
    pairs = jnp.maximum(jnp.sum(batch_A["pair_mask"]), 1).astype(jnp.float32)
    chosen = batch_A["loss_mask"] & (batch_A["sequence_ids"] % 2 == 0)
    chosen_tokens = jnp.maximum(jnp.sum(chosen), 1).astype(jnp.float32)

    at_reference = state.step <= last_step_at_reference
    reference = state.reference if ref_sync is not None else frozen

    def policy(trainable):
        return model.Adapted(frozen, trainable) if adapters else trainable

    def objective(params, micro_batch, index=0):
        rng = None
        if dropout_seed is not None:
            rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
            rng = jax.random.fold_in(rng, index)
        ref_S = reference_logps(model_config, reference, micro_batch, loss_config, padded_rows)
        _, sums = pair_sums(
            model_config,
            loss_config,
            policy(params),
            ref_S,
            micro_batch,
            padded_rows,
            at_reference,
            rng,
        )
        share = sums["loss"] / pairs
        if loss_config.token_sft:
            share += sums["count/sft_weighted_nll"] / chosen_tokens
        return share, sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)

    def accumulate(carry, indexed):
        grads_sum, sums = carry
        index, micro_batch = indexed
        (_, micro_sums), grads = grad_fn(state.params, micro_batch, index)
        return (
            jax.tree.map(jnp.add, grads_sum, grads),
            jax.tree.map(jnp.add, sums, micro_sums),
        ), None

    first = jax.tree.map(lambda x: x[0], batch_A)
    zero_sums = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype),
        jax.eval_shape(lambda: objective(state.params, first)[1]),
    )
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    num_micro = jax.tree.leaves(batch_A)[0].shape[0]
    (grads_sum, sums), _ = jax.lax.scan(
        accumulate, (zero_grads, zero_sums), (jnp.arange(num_micro), batch_A)
    )

    grads = grads_sum  # the micro-batches' shares add up to the step's mean loss
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = finalize(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = schedule(state.step)

    # The norm is inf/NaN as soon as one gradient element is.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    apply = finite if skip_nonfinite else finite & (state.nonfinite_steps == 0)
    keep = lambda new, old: jnp.where(apply, new, old)  # noqa: E731
    nonfinite_steps = state.nonfinite_steps + (~finite).astype(jnp.int32)
    first = jnp.where(
        (state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step
    )
    metrics["nonfinite_steps"] = nonfinite_steps.astype(jnp.float32)
    new_params = jax.tree.map(keep, params, state.params)
    new_reference = state.reference
    if ref_sync is not None:
        new_reference = synced_reference(state.reference, new_params, state.step + 1, ref_sync)
    new_state = TrainState(
        step=state.step + 1,
        params=new_params,
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        nonfinite_steps=nonfinite_steps,
        first_nonfinite_step=first,
        reference=new_reference,
    )
    return new_state, metrics


def eval_sums(
    params, ref_params, batch: dict, *, model_config, loss_config, padded_rows: bool = False
) -> dict:
    """Sums (not means) over one eval batch, so a whole eval set is normalised exactly.
    `padded_rows`: as in train_step (True for data.eval_batches, which are padded)."""
    ref_S = reference_logps(model_config, ref_params, batch, loss_config, padded_rows)
    _, sums = pair_sums(model_config, loss_config, params, ref_S, batch, padded_rows)
    return sums


# --------------------------------------------------------------- the compiled programs


def jit_train_step(
    model_config: ModelConfig,
    loss_config: LossConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    shardings: TrainState,
    mesh,
    *,
    frozen_shardings,
    padded_rows: bool,
    skip_nonfinite: bool = False,
    last_step_at_reference: int = -1,
    ref_sync: RefSync | None = None,
    dropout_seed: int | None = None,
):
    """train_step jitted with the state's shardings (donated) and replicated metrics: the
    trainer's step and the benchmark's are this one program. `frozen_shardings`: those of
    train_step's `frozen` argument (None when it is None); LoRA when the model config has
    adapters."""
    return jax.jit(
        functools.partial(
            train_step,
            model_config=model_config,
            loss_config=loss_config,
            optimizer=optimizer,
            schedule=schedule,
            padded_rows=padded_rows,
            skip_nonfinite=skip_nonfinite,
            last_step_at_reference=last_step_at_reference,
            adapters=model_config.lora_rank > 0,
            ref_sync=ref_sync,
            dropout_seed=dropout_seed,
        ),
        in_shardings=(shardings, frozen_shardings, None),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def jit_eval_sums(model_config: ModelConfig, loss_config: LossConfig):
    """eval_sums jitted for eval batches (padded rows)."""
    return jax.jit(
        functools.partial(
            eval_sums, model_config=model_config, loss_config=loss_config, padded_rows=True
        )
    )


def jit_reference_logps(model_config: ModelConfig, chunk_size: int, mesh, ld_alpha: float = 1.0):
    """(weights, placed eval batch) → per-sequence log-probs (LD-DPO's with `ld_alpha` < 1),
    replicated. The weights are an argument, not a closure: closed-over arrays become
    constants."""
    return jax.jit(
        lambda weights, batch: sequence_stats(
            model_config, weights, batch, chunk_size, padded_rows=True, ld_alpha=ld_alpha
        )[0],
        out_shardings=sharding.replicated(mesh),
    )
