"""Build, shard and restore the train state and the reference, for every entry point.

The train state's shardings come from the parameters' logical axis names (optax builds its
moments with the same boxes, so they shard like their params). Fresh weights are placed
straight into their shardings, never as a full host copy. Evaluation, export and generation
restore parameters only, without an optimizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax import checkpoint, hf, model, sharding
from dpo_jax.model import ModelConfig
from dpo_jax.step import TrainState

if TYPE_CHECKING:
    from dpo_jax.settings import ModelSettings


def model_config(m: ModelSettings) -> ModelConfig:
    """The HF folder's architecture with the run's dtypes, attention and remat."""
    return hf.read_model_config(
        m.name,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        attention_impl=m.attention_impl,
        remat_policy=m.remat_policy,
        max_segments_per_row=m.max_segments_per_row,
    )


def new_state(params, optimizer) -> TrainState:
    """Step 0 of `params` with a fresh optimizer state."""
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
    )


def state_shardings(config: ModelConfig, optimizer, mesh, rules) -> TrainState:
    """NamedShardings of the whole TrainState."""
    boxed = lambda: new_state(model.init_params(config, jax.random.key(0)), optimizer)  # noqa: E731
    specs = nn.get_partition_spec(jax.eval_shape(boxed))
    return sharding.logical_shardings(specs, mesh, rules)


def param_shardings(config: ModelConfig, mesh, rules):
    """NamedShardings of the parameters alone (no optimizer state)."""
    specs = nn.get_partition_spec(
        jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
    )
    return sharding.logical_shardings(specs, mesh, rules)


def abstract(tree_fn, shardings):
    """ShapeDtypeStructs of what `tree_fn()` builds, carrying `shardings`: no memory used."""
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(tree_fn),
        shardings,
    )


def abstract_state(config: ModelConfig, optimizer, shardings: TrainState) -> TrainState:
    unboxed = lambda: new_state(  # noqa: E731
        nn.meta.unbox(model.init_params(config, jax.random.key(0))), optimizer
    )
    return abstract(unboxed, shardings)


def abstract_params(config: ModelConfig, shardings):
    return abstract(lambda: nn.meta.unbox(model.init_params(config, jax.random.key(0))), shardings)


def initial_params(m: ModelSettings, config: ModelConfig, seed: int, shardings):
    """The run's starting weights in `shardings`: model.name's, or fresh ones from `seed`.
    The reference of a run is these weights, on resume too."""
    if m.init == "random":
        return jax.jit(
            lambda rng: nn.meta.unbox(model.init_params(config, rng)), out_shardings=shardings
        )(jax.random.key(seed))
    return hf.load_params(m.name, config, shardings)


def init_state(m: ModelSettings, config: ModelConfig, seed: int, optimizer, shardings):
    """A fresh TrainState placed straight into its shardings."""
    if m.init == "random":  # params and moments built in one program: nothing on the host
        return jax.jit(
            lambda rng: new_state(nn.meta.unbox(model.init_params(config, rng)), optimizer),
            out_shardings=shardings,
        )(jax.random.key(seed))
    params = initial_params(m, config, seed, shardings.params)
    return jax.jit(lambda p: new_state(p, optimizer), out_shardings=shardings, donate_argnums=0)(
        params
    )


def copy_params(params, shardings):
    """Separate buffers for the frozen reference: the policy's are donated every step."""
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def restore_params(ckpt: checkpoint.Checkpointer, step: int, config: ModelConfig, shardings):
    """The policy parameters of checkpoint `step`, onto `shardings` (the optimizer state is
    never read)."""
    return ckpt.restore_params(step, abstract_params(config, shardings))
