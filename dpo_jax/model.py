"""Decoder of the common HF causal-LM families as a pure function of a params pytree.

Llama 2/3/3.1/3.2 (SmolLM, TinyLlama), Mistral, Qwen2/2.5, Qwen3 and Gemma 2: one Linen module
whose differences are ModelConfig fields (biases, q/k norm, sliding windows, Gemma 2's norm
offset, embedding scale, sandwich norms, GeGLU and logit soft-capping).

Shape legend (dpo_jax/__init__.py): B rows, T tokens, U key tokens (cache slots), D model,
V vocab, N query heads, K kv heads, G query heads per kv head, H head dim, F mlp, L layers.

Parameter tree (`init_params` returns it boxed with logical names; every public function also
takes the plain, unboxed tree). Stacked layer params carry a leading [L] axis named "layers":

    embed/embedding                 [V, D]      ("vocab", "embed")
    layers/attn_norm/scale          [L, D]      ("layers", "norm")
    layers/attn/q_proj/kernel       [L, D, N, H] ("layers", "embed", "heads", "head_dim")
    layers/attn/q_proj/bias         [L, N, H]   ("layers", "heads", "head_dim")  attention_bias
    layers/attn/{k,v}_proj/kernel   [L, D, K, H] ("layers", "embed", "kv_heads", "head_dim")
    layers/attn/{k,v}_proj/bias     [L, K, H]   ("layers", "kv_heads", "head_dim")  attention_bias
    layers/attn/o_proj/kernel       [L, N, H, D] ("layers", "heads", "head_dim", "embed")
    layers/attn/{q,k}_norm/scale    [L, H]      ("layers", "norm")  qk_norm
    layers/post_attn_norm/scale     [L, D]      ("layers", "norm")  post_norms (Gemma 2)
    layers/mlp_norm/scale           [L, D]      ("layers", "norm")
    layers/mlp/{gate,up}_proj/kernel [L, D, F]  ("layers", "embed", "mlp")
    layers/mlp/down_proj/kernel     [L, F, D]   ("layers", "mlp", "embed")
    layers/post_mlp_norm/scale      [L, D]      ("layers", "norm")  post_norms (Gemma 2)
    final_norm/scale                [D]         ("norm",)
    lm_head/kernel                  [D, V]      ("embed", "vocab")  untied only

HF -> ours (dpo_jax.hf_tensors holds the full table): q_proj.weight [N*H, D] is kernel.T
reshaped to [D, N, H]; o_proj.weight [D, N*H] is kernel reshaped to [N*H, D] then transposed;
mlp weights are transposed. RoPE uses HF's rotate_half (non-interleaved) layout, so no head_dim
permutation is needed. Llama's post_attention_layernorm is our mlp_norm; Gemma 2's is
post_attn_norm (its pre_feedforward_layernorm is mlp_norm). With rms_norm_unit_offset the
stored scale s is applied as (1 + s), exactly as HF stores Gemma weights.
With scan_layers=False the layers live under layers_0 ... layers_{L-1} without the [L] axis.

KV cache (`init_cache` / `decode_step`, generation): the same modules with decode=True keep
each layer's rotated keys and values in a "cache" collection, k/v [L, B, U, K, H] plus
filled [L, B, U] (scanned like the params), with slot = position. A query at position p
sees the filled slots s <= p (and p - s < window in sliding layers).

LoRA (config.lora_rank > 0): the targeted projections also create A and B in a "lora"
collection, scanned like the params (layers/attn/q_proj/a [L, D, r], b [L, r, N, H], ...).
Every public function takes `Adapted(base, adapters)` where it takes params: the policy;
the bare base is the same model with the adapters off (the LoRA reference).

The layer modules live in dpo_jax.layers, ModelConfig and its counts in dpo_jax.model_config;
this module re-exports the latter, so callers import everything model-related from here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dpo_jax.layers import (  # noqa: F401  (Attention, Einsum, Mlp, RMSNorm: re-exported)
    INIT,
    Attention,
    Block,
    Einsum,
    Kernel,
    Mlp,
    RMSNorm,
    norm_layer,
    rope_cos_sin,
)
from dpo_jax.model_config import (  # noqa: F401  (re-exported)
    REMAT_POLICIES,
    ModelConfig,
    RopeScaling,
    flops_per_token,
    num_params,
    rope_attention_factor,
    rope_inv_freq,
)

Params = Any


@flax.struct.dataclass
class Adapted:
    """A LoRA policy: the frozen base params and the trained adapters (the "lora" tree)."""

    base: Params
    adapters: Params


def base_params(params) -> Params:
    """The base weights of `params` (Adapted or plain), unboxed."""
    return nn.meta.unbox(params.base if isinstance(params, Adapted) else params)


def variables_of(params) -> dict:
    """The Flax variables of plain params or an Adapted policy."""
    variables = {"params": base_params(params)}
    if isinstance(params, Adapted):
        variables["lora"] = nn.meta.unbox(params.adapters)
    return variables


class Decoder(nn.Module):
    """tokens, positions, segment ids [B, T] -> final-normed hidden states [B, T, D] (dtype).

    decode=True: one sequence per row, attending to (and extending) the "cache" collection.
    padded_rows=True: rows are right-padded single sequences (see `hidden_states`)."""

    config: ModelConfig
    decode: bool = False
    padded_rows: bool = False

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT, branch_ids_BxT=None):
        c = self.config
        dt = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        embed_init = nn.with_logical_partitioning(INIT, ("vocab", "embed"))
        x_BxTxD = nn.Embed(
            c.vocab_size, c.hidden_size, embedding_init=embed_init, name="embed", **dt
        )(tokens_BxT)
        if c.scale_embeddings:
            # HF rounds sqrt(D) to the compute dtype first (bf16: sqrt(2304) = 48.0 exactly,
            # sqrt(3584) -> 60.0 rather than 59.87).
            x_BxTxD = x_BxTxD * jnp.asarray(math.sqrt(c.hidden_size), c.dtype)
        cos_BxTxH, sin_BxTxH = rope_cos_sin(c, positions_BxT)

        block = Block
        policy = None if self.decode else REMAT_POLICIES[c.remat_policy]
        if policy is not None:
            # Under scan, CSE cannot merge the recomputation into the forward pass anyway.
            block = nn.remat(Block, policy=policy, prevent_cse=not c.scan_layers)
        windows = c.layer_windows
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0, "lora": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * 4 + (0, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxTxD, _ = stack(c, self.decode, self.padded_rows, name="layers")(
                x_BxTxD,
                cos_BxTxH,
                sin_BxTxH,
                positions_BxT,
                segment_ids_BxT,
                jnp.asarray(windows, jnp.int32),
                branch_ids_BxT,
            )
        else:
            for i in range(c.num_layers):
                x_BxTxD, _ = block(c, self.decode, self.padded_rows, name=f"layers_{i}")(
                    x_BxTxD,
                    cos_BxTxH,
                    sin_BxTxH,
                    positions_BxT,
                    segment_ids_BxT,
                    windows[i],
                    branch_ids_BxT,
                )
        if not c.tie_word_embeddings:
            # Created here so init makes it; applied by `forward` / the chunked log-prob path.
            shape = (c.hidden_size, c.vocab_size)
            Kernel(shape, ("embed", "vocab"), c.param_dtype, name="lm_head")()
        return norm_layer(c, "final_norm")(x_BxTxD)


def _init(config: ModelConfig, rng: jax.Array) -> dict:
    tokens = jnp.zeros((1, 1), jnp.int32)
    # The weights do not depend on the attention kernel; XLA's traces anywhere, so shapes
    # (a memory estimate, an abstract state) come out on a machine without cuDNN too.
    config = dataclasses.replace(config, attention_impl="xla")
    return Decoder(config).init(rng, tokens, tokens, jnp.ones_like(tokens))


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Boxed (logically partitioned) params; jit-able, and shape-only under jax.eval_shape."""
    return _init(config, rng)["params"]


def init_adapters(config: ModelConfig, rng: jax.Array) -> Params:
    """Boxed LoRA adapters (A random, B zero: the policy starts as the base), from the same
    init as `init_params` (under jit the base's unused init is dead code)."""
    if config.lora_rank <= 0:
        raise ValueError("init_adapters needs a config with lora_rank > 0")
    return _init(config, rng)["lora"]


def logical_axes(config: ModelConfig) -> Params:
    """Pytree of PartitionSpecs of logical axis names, matching the params tree (no allocation)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return nn.get_partition_spec(abstract)


def hidden_states(
    config: ModelConfig,
    params: Params,
    tokens_BxT,
    positions_BxT=None,
    segment_ids_BxT=None,
    *,
    branch_ids_BxT=None,
    padded_rows: bool = False,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """Final-normed hidden states [B, T, D] in the compute dtype.

    `params`: plain or Adapted (LoRA); `dropout_rng` turns LoRA dropout on (training only).

    branch_ids_BxT (prefix-shared rows, data.batching.write_group): 0 on a pair's prompt,
    1 / 2 on its chosen / rejected reply; a reply's tokens are hidden from the other's.

    padded_rows=True promises one sequence per row, starting at index 0, with segment id 1 on
    its tokens and 0 on the trailing padding (not packed rows). Attention then gets each row's
    length instead of a [B, 1, T, U] mask, which cuDNN runs in its flash kernel rather than as
    a bias; configs with sliding windows or score caps keep the mask. Hidden states at padded
    positions differ from the mask path's (they are finite, and meaningless either way)."""
    tokens_BxT = jnp.asarray(tokens_BxT)
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones_like(tokens_BxT)
    decoder = Decoder(config, padded_rows=padded_rows)
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    return decoder.apply(
        variables_of(params),
        tokens_BxT,
        positions_BxT,
        segment_ids_BxT,
        branch_ids_BxT,
        rngs=rngs,
    )


def unembedding(config: ModelConfig, params: Params) -> jax.Array:
    """The [D, V] output matrix in param dtype: embedding.T when tied, else the lm_head kernel."""
    params = base_params(params)
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def _logits(config: ModelConfig, params: Params, h_BxTxD: jax.Array) -> jax.Array:
    w_DxV = unembedding(config, params).astype(config.dtype)
    logits_BxTxV = jnp.einsum("BTD,DV->BTV", h_BxTxD, w_DxV, preferred_element_type=jnp.float32)
    if config.final_logit_softcap is not None:
        cap = config.final_logit_softcap
        logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)
    return logits_BxTxV


def forward(
    config: ModelConfig,
    params: Params,
    tokens_BxT,
    positions_BxT=None,
    segment_ids_BxT=None,
    *,
    padded_rows: bool = False,
) -> jax.Array:
    """Full float32 logits [B, T, V], soft-capped when the config says so (eval and tests;
    training uses the vocab-chunked path, which must apply config.final_logit_softcap too).
    padded_rows: as in `hidden_states`."""
    h_BxTxD = hidden_states(
        config, params, tokens_BxT, positions_BxT, segment_ids_BxT, padded_rows=padded_rows
    )
    return _logits(config, params, h_BxTxD)


Cache = Any  # {"layers": {"attn": {"k", "v": [L, B, U, K, H], "filled": [L, B, U]}}} when scanned


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
    """An empty KV cache for `batch` rows of up to `max_len` positions (jit-able)."""
    tokens_BxU = jnp.zeros((batch, max_len), jnp.int32)
    decoder = Decoder(config, decode=True)
    shapes = jax.eval_shape(
        lambda: decoder.init(jax.random.key(0), tokens_BxU, tokens_BxU, tokens_BxU + 1)["cache"]
    )
    return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)


def decode_step(
    config: ModelConfig,
    params: Params,
    cache: Cache,
    tokens_BxT,
    positions_BxT,
    valid_BxT=None,
    *,
    last_only: bool = False,
) -> tuple[jax.Array, Cache]:
    """Runs T new tokens per row at their positions against the cache and adds them to it.

    Prefill: the right-padded prompt buffer with valid_BxT marking its tokens; a step: one
    token per row at the row's own length. Invalid tokens are neither cached nor seen, and
    their logits are meaningless. Returns (float32 logits [B, T, V], or [B, 1, V] of each
    row's last valid token with last_only (so a long prompt never makes [B, P, V]), cache).
    """
    tokens_BxT, positions_BxT = jnp.asarray(tokens_BxT), jnp.asarray(positions_BxT)
    if valid_BxT is None:
        valid_BxT = jnp.ones(tokens_BxT.shape, bool)
    variables = variables_of(params) | {"cache": cache}
    h_BxTxD, updated = Decoder(config, decode=True).apply(
        variables, tokens_BxT, positions_BxT, jnp.asarray(valid_BxT, jnp.int32), mutable=["cache"]
    )
    if last_only:
        last_B = jnp.argmax(jnp.where(valid_BxT, positions_BxT, -1), axis=1)
        h_BxTxD = jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)
    return _logits(config, params, h_BxTxD), updated["cache"]
