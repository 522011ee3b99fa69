"""Build, shard and restore the train state and the reference, for every entry point.

The train state's shardings come from the parameters' logical axis names (optax builds its
moments with the same boxes, so they shard like their params). Fresh weights are placed
straight into their shardings, never as a full host copy. Evaluation, export and generation
restore parameters only, without an optimizer.

With LoRA (model config lora_rank > 0) the state trains the adapters only: state.params is
the "lora" tree and the base is loaded apart (`load_base`), frozen, optionally quantized,
and identified by a fingerprint of its weights that checkpoints keep and resumes check.
With TR-DPO the reference's weights are state too (TrainState.reference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax import checkpoint, hf, model, quant, reference, sharding
from dpo_jax.model import ModelConfig
from dpo_jax.step import TrainState

if TYPE_CHECKING:
    from dpo_jax.settings import ModelSettings, Settings


def model_config(m: ModelSettings) -> ModelConfig:
    """The HF folder's architecture with the run's dtypes, attention, remat and LoRA."""
    return hf.read_model_config(
        m.name,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        attention_impl=m.attention_impl,
        remat_policy=m.remat_policy,
        max_segments_per_row=m.max_segments_per_row,
        **m.lora.model_fields(),
    )


def trained(config: ModelConfig):
    """The boxed init of what the optimizer trains: the adapters with LoRA, else the params."""
    return model.init_adapters if config.lora_rank > 0 else model.init_params


def new_state(params, optimizer, reference=None) -> TrainState:
    """Step 0 of `params` with a fresh optimizer state (and TR-DPO's reference weights)."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        reference=reference,
    )


def _fresh(config: ModelConfig, optimizer, with_reference: bool, boxed: bool):
    def build():
        key = jax.random.key(0)
        unbox = (lambda x: x) if boxed else nn.meta.unbox
        ref = unbox(model.init_params(config, key)) if with_reference else None
        return new_state(unbox(trained(config)(config, key)), optimizer, ref)

    return build


def state_shardings(
    config: ModelConfig, optimizer, mesh, rules, with_reference: bool = False
) -> TrainState:
    """NamedShardings of the whole TrainState (`with_reference`: TR-DPO's)."""
    specs = nn.get_partition_spec(jax.eval_shape(_fresh(config, optimizer, with_reference, True)))
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
    with_reference = shardings.reference is not None
    return abstract(_fresh(config, optimizer, with_reference, False), shardings)


def abstract_params(config: ModelConfig, shardings):
    return abstract(lambda: nn.meta.unbox(model.init_params(config, jax.random.key(0))), shardings)


def initial_params(m: ModelSettings, config: ModelConfig, seed: int, shardings, dtype=None):
    """The run's starting weights in `shardings` (and `dtype`, default the param dtype):
    model.name's, or fresh ones from `seed`. The reference of a run is these weights, on
    resume too."""
    if m.init == "random":
        cast = (lambda x: x) if dtype is None else (lambda x: x.astype(dtype))  # noqa: E731
        return jax.jit(
            lambda rng: jax.tree.map(cast, nn.meta.unbox(model.init_params(config, rng))),
            out_shardings=shardings,
        )(jax.random.key(seed))
    return hf.load_params(m.name, config, shardings, dtype)


def init_state(m: ModelSettings, config: ModelConfig, seed: int, optimizer, shardings):
    """A fresh TrainState placed straight into its shardings: LoRA's adapters (A random
    from `seed`, B zero), or the run's starting weights (with TR-DPO, their copy as the
    reference)."""
    with_reference = shardings.reference is not None
    if config.lora_rank > 0 or m.init == "random":  # built in one program: nothing on the host
        init = trained(config)
        return jax.jit(
            lambda rng: new_state(
                nn.meta.unbox(init(config, rng)),
                optimizer,
                nn.meta.unbox(model.init_params(config, rng)) if with_reference else None,
            ),
            out_shardings=shardings,
        )(jax.random.key(seed))
    params = initial_params(m, config, seed, shardings.params)
    return jax.jit(
        lambda p: new_state(p, optimizer, jax.tree.map(jnp.copy, p) if with_reference else None),
        out_shardings=shardings,
        donate_argnums=0,
    )(params)


def base_shardings(config: ModelConfig, mesh, rules, quantization: str = "none"):
    """Shardings of the frozen LoRA base: the params', each projection kernel's becoming a
    quant.Quantized of shardings when the base is stored quantized."""
    shardings = param_shardings(config, mesh, rules)
    if quantization == "none":
        return shardings
    return quant.quantized_shardings(shardings, abstract_params(config, shardings), quantization)


def abstract_base(config: ModelConfig, shardings, quantization: str = "none"):
    """ShapeDtypeStructs of the frozen base as `load_base` places it (no memory used)."""
    float_shardings = jax.tree.map(
        lambda s: s.codes if isinstance(s, quant.Quantized) else s,
        shardings,
        is_leaf=lambda s: isinstance(s, quant.Quantized),
    )
    float_base = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, config.dtype, sharding=x.sharding),
        abstract_params(config, float_shardings),
    )
    if quantization == "none":
        return float_base
    return quant.abstract_quantized(float_base, quantization, shardings)


def load_base(m: ModelSettings, config: ModelConfig, seed: int, mesh, rules):
    """(frozen base in base_shardings, its fingerprint): model.name's weights (or fresh ones
    from `seed`), quantized kernel by kernel when m.lora.quantization says so, so the float
    copy of one kernel at a time is all that exists beside the quantized base. The
    fingerprint hashes the float weights' exact values, whatever the file format or mesh.

    The base is held in the compute dtype (model.dtype): frozen weights need no float32
    master copy (the adapters keep model.param_dtype)."""
    quantization = m.lora.quantization
    shardings = param_shardings(config, mesh, rules)
    params = initial_params(m, config, seed, shardings, dtype=config.dtype)
    fingerprint = reference.params_fingerprint(params, mesh)
    if quantization == "none":
        return params, fingerprint
    target = base_shardings(config, mesh, rules, quantization)

    def place(path, leaf, leaf_target):
        if not quant.is_projection_kernel(path):
            return leaf
        return jax.jit(lambda x: quant.quantize(x, quantization), out_shardings=leaf_target)(leaf)

    quantized = {}  # built leaf by leaf; each float kernel is dropped once quantized
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    targets = jax.tree_util.tree_flatten(target, is_leaf=lambda s: isinstance(s, quant.Quantized))[
        0
    ]
    del params
    for i, leaf_target in enumerate(targets):
        # Take the float leaf out of `flat` first: a reference left there would keep every
        # float kernel alive until the end, the float and the quantized base side by side.
        (path, leaf), flat[i] = flat[i], None
        hf.set_path(quantized, tuple(entry.key for entry in path), place(path, leaf, leaf_target))
        del leaf
    return quantized, fingerprint


def copy_params(params, shardings):
    """Separate buffers for the frozen reference: the policy's are donated every step."""
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def restore_params(ckpt: checkpoint.Checkpointer, step: int, config: ModelConfig, shardings):
    """The policy parameters of checkpoint `step` (with LoRA: its adapters), onto
    `shardings` (the optimizer state is never read)."""
    if config.lora_rank > 0:
        init = lambda: nn.meta.unbox(model.init_adapters(config, jax.random.key(0)))  # noqa: E731
        return ckpt.restore_params(step, abstract(init, shardings))
    return ckpt.restore_params(step, abstract_params(config, shardings))


def adapter_shardings(config: ModelConfig, mesh, rules):
    """NamedShardings of the LoRA adapters alone."""
    specs = nn.get_partition_spec(
        jax.eval_shape(lambda: model.init_adapters(config, jax.random.key(0)))
    )
    return sharding.logical_shardings(specs, mesh, rules)


def restore_policy(ckpt: checkpoint.Checkpointer, step: int, s, config: ModelConfig, mesh):
    """The policy of checkpoint `step` of a run with Settings `s`, onto `mesh`: its params,
    or with LoRA model.Adapted(its base, the checkpoint's adapters), after checking that the
    base loaded now is the one the adapters were trained on."""
    if config.lora_rank <= 0:
        return restore_params(ckpt, step, config, param_shardings(config, mesh, s.mesh.rules))
    base, fingerprint = load_base(s.model, config, s.loop.seed, mesh, s.mesh.rules)
    checkpoint.check_base(
        ckpt.read_base(step), checkpoint.base_identity(s.model, fingerprint), step
    )
    adapters = restore_params(ckpt, step, config, adapter_shardings(config, mesh, s.mesh.rules))
    return model.Adapted(base, adapters)


def restore_reference(ckpt: checkpoint.Checkpointer, step: int, config: ModelConfig, like):
    """TR-DPO's reference weights at checkpoint `step`, onto the shardings of `like` (the
    restored policy params)."""
    return ckpt.restore_params(step, checkpoint.abstract_like(like), field="reference")


# ------------------------------------------------ what the step reads but never updates


def frozen_shardings(s: Settings, config: ModelConfig, mesh, shardings: TrainState):
    """Shardings of train_step's `frozen` argument: the LoRA base (policy and reference
    both), or the frozen reference's weights; None when there is none (precomputed or no
    reference, or TR-DPO's, which is in the state)."""
    if s.model.lora.enabled:
        return base_shardings(config, mesh, s.mesh.rules, s.model.lora.quantization)
    if s.reference_on_device and s.ref_sync is None:
        return shardings.params
    return None


def abstract_frozen(s: Settings, config: ModelConfig, shardings):
    """ShapeDtypeStructs of the frozen weights (memory estimate), or None."""
    if shardings is None:
        return None
    if not s.model.lora.enabled:  # the reference: a copy of the params
        return abstract_params(config, shardings)
    return abstract_base(config, shardings, s.model.lora.quantization)


def frozen_weights(s: Settings, config: ModelConfig, mesh, train_state: TrainState, shardings):
    """(the frozen weights in `shardings`, the LoRA base's identity for checkpoints): the
    loaded base, or a copy of the fresh state's params (the reference = the initial policy,
    on resume too); (None, None) without frozen weights."""
    if s.model.lora.enabled:
        base, fingerprint = load_base(s.model, config, s.loop.seed, mesh, s.mesh.rules)
        return base, checkpoint.base_identity(s.model, fingerprint)
    if shardings is None:
        return None, None
    return copy_params(train_state.params, shardings), None
