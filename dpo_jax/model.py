"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM) as a pure function of params.

Shape legend: B rows, T tokens, D model, V vocab, N query heads, K kv heads, H head dim, F mlp,
L layers.

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
    layers/mlp_norm/scale           [L, D]      ("layers", "norm")
    layers/mlp/{gate,up}_proj/kernel [L, D, F]  ("layers", "embed", "mlp")
    layers/mlp/down_proj/kernel     [L, F, D]   ("layers", "mlp", "embed")
    final_norm/scale                [D]         ("norm",)
    lm_head/kernel                  [D, V]      ("embed", "vocab")  untied only

HF -> ours: q_proj.weight [N*H, D] is kernel.T reshaped to [D, N, H]; o_proj.weight [D, N*H] is
kernel reshaped to [N*H, D] then transposed; mlp weights are transposed. RoPE uses HF's
rotate_half (non-interleaved) layout, so no head_dim permutation is needed.
With scan_layers=False the layers live under layers_0 ... layers_{L-1} without the [L] axis.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
_INIT = nn.initializers.normal(stddev=0.02)  # HF initializer_range


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ("llama3" rope_type) frequency scaling."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus runtime options; hashable so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: Literal["xla", "cudnn"] | None = None
    remat_policy: Literal["none", "dots_saveable", "full"] = "none"
    scan_layers: bool = True

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of {self.num_kv_heads=}")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} not in {list(_REMAT_POLICIES)}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


_REMAT_POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def num_params(config: ModelConfig) -> int:
    """Exact number of parameters."""
    d, f, h = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    n, k = config.num_heads, config.num_kv_heads
    layer = 2 * d * n * h + 2 * d * k * h + 3 * d * f + 2 * d
    layer += (n + 2 * k) * h if config.attention_bias else 0
    layer += 2 * h if config.qk_norm else 0
    head = 0 if config.tie_word_embeddings else d * config.vocab_size
    return config.vocab_size * d + config.num_layers * layer + d + head


def flops_per_token(config: ModelConfig, seq_len: int, *, backward: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul weight plus causal attention; x3 with backward."""
    d, h = config.hidden_size, config.resolved_head_dim
    n, k = config.num_heads, config.num_kv_heads
    matmul = config.num_layers * (2 * d * n * h + 2 * d * k * h + 3 * d * config.intermediate_size)
    matmul += d * config.vocab_size  # unembedding (the embedding lookup is free)
    # QK^T and PV: 4*N*H FLOPs per visible key; causal rows see seq_len/2 keys on average.
    attention = config.num_layers * 2 * n * h * seq_len
    return (3.0 if backward else 1.0) * (2 * matmul + attention)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """[H/2] float32 inverse frequencies, as transformers computes them (incl. llama3 scaling)."""
    dim = config.resolved_head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / np.float32(config.rope_theta) ** exponent).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _rope_cos_sin(config: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    freqs_BxTxh = positions_BxT[..., None].astype(jnp.float32) * rope_inv_freq(config)
    emb_BxTxH = jnp.concatenate([freqs_BxTxh, freqs_BxTxh], axis=-1)
    return jnp.cos(emb_BxTxH), jnp.sin(emb_BxTxH)


def _apply_rope(x_BxTxNxH: jax.Array, cos_BxTxH: jax.Array, sin_BxTxH: jax.Array) -> jax.Array:
    # fp32 rotation; rotate_half pairs dim i with i + H/2 (HF layout, not interleaved).
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x * cos_BxTxH[:, :, None, :] + rotated * sin_BxTxH[:, :, None, :]
    return out.astype(x_BxTxNxH.dtype)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, computed in fp32."""

    eps: float
    dtype: str
    param_dtype: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class Einsum(nn.Module):
    """A kernel of `shape` applied by einsum `eqn`; optional bias over the kernel's output dims."""

    eqn: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: str
    param_dtype: str
    bias_axes: tuple[str, ...] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(_INIT, self.axes)
        kernel = self.param("kernel", init, self.shape, self.param_dtype)
        y = jnp.einsum(self.eqn, x.astype(self.dtype), kernel.astype(self.dtype))
        if self.bias_axes is not None:
            bias_shape = self.shape[-len(self.bias_axes) :]
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes)
            y = y + self.param("bias", bias_init, bias_shape, self.param_dtype).astype(self.dtype)
        return y


class Attention(nn.Module):
    """Grouped-query attention, causal within each segment."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT):
        c = self.config
        d, h, n, k = c.hidden_size, c.resolved_head_dim, c.num_heads, c.num_kv_heads
        dt = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        q_bias = ("heads", "head_dim") if c.attention_bias else None
        kv_bias = ("kv_heads", "head_dim") if c.attention_bias else None
        kv_axes = ("embed", "kv_heads", "head_dim")
        q_BxTxNxH = Einsum(
            "BTD,DNH->BTNH",
            (d, n, h),
            ("embed", "heads", "head_dim"),
            bias_axes=q_bias,
            name="q_proj",
            **dt,
        )(x_BxTxD)
        k_BxTxKxH = Einsum(
            "BTD,DKH->BTKH", (d, k, h), kv_axes, bias_axes=kv_bias, name="k_proj", **dt
        )(x_BxTxD)
        v_BxTxKxH = Einsum(
            "BTD,DKH->BTKH", (d, k, h), kv_axes, bias_axes=kv_bias, name="v_proj", **dt
        )(x_BxTxD)
        if c.qk_norm:
            q_BxTxNxH = RMSNorm(c.rms_norm_eps, name="q_norm", **dt)(q_BxTxNxH)
            k_BxTxKxH = RMSNorm(c.rms_norm_eps, name="k_norm", **dt)(k_BxTxKxH)
        q_BxTxNxH = _apply_rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH)
        k_BxTxKxH = _apply_rope(k_BxTxKxH, cos_BxTxH, sin_BxTxH)
        # Causal by index in the row AND same segment. Padding (segment 0) attends to padding and
        # every token sees itself, so no softmax row is empty (no NaN).
        mask_Bx1xTxT = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
        out_BxTxNxH = jax.nn.dot_product_attention(
            q_BxTxNxH,
            k_BxTxKxH,
            v_BxTxKxH,
            mask=mask_Bx1xTxT,
            is_causal=True,
            implementation=c.attention_impl,
        )
        return Einsum(
            "BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), name="o_proj", **dt
        )(out_BxTxNxH)


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        dt = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        gate_BxTxF = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), name="gate_proj", **dt)(
            x_BxTxD
        )
        up_BxTxF = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), name="up_proj", **dt)(x_BxTxD)
        h_BxTxF = jax.nn.silu(gate_BxTxF) * up_BxTxF
        return Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), name="down_proj", **dt)(h_BxTxF)


class Kernel(nn.Module):
    """A bare kernel parameter (the untied lm_head, applied outside the module)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    param_dtype: str

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.with_logical_partitioning(_INIT, self.axes)
        return self.param("kernel", init, self.shape, self.param_dtype)


class Block(nn.Module):
    """Pre-norm decoder layer; returns (x, None) so it can be the body of nn.scan."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT):
        c = self.config
        dt = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        y_BxTxD = RMSNorm(c.rms_norm_eps, name="attn_norm", **dt)(x_BxTxD)
        x_BxTxD = x_BxTxD + Attention(c, name="attn")(
            y_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT
        )
        y_BxTxD = RMSNorm(c.rms_norm_eps, name="mlp_norm", **dt)(x_BxTxD)
        x_BxTxD = x_BxTxD + Mlp(c, name="mlp")(y_BxTxD)
        return x_BxTxD, None


class Decoder(nn.Module):
    """tokens, positions, segment ids [B, T] -> final-normed hidden states [B, T, D] (dtype)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT):
        c = self.config
        dt = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        embed_init = nn.with_logical_partitioning(_INIT, ("vocab", "embed"))
        x_BxTxD = nn.Embed(
            c.vocab_size, c.hidden_size, embedding_init=embed_init, name="embed", **dt
        )(tokens_BxT)
        cos_BxTxH, sin_BxTxH = _rope_cos_sin(c, positions_BxT)

        block = Block
        policy = _REMAT_POLICIES[c.remat_policy]
        if policy is not None:
            # Under scan, CSE cannot merge the recomputation into the forward pass anyway.
            block = nn.remat(Block, policy=policy, prevent_cse=not c.scan_layers)
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxTxD, _ = stack(c, name="layers")(x_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT)
        else:
            for i in range(c.num_layers):
                x_BxTxD, _ = block(c, name=f"layers_{i}")(
                    x_BxTxD, cos_BxTxH, sin_BxTxH, segment_ids_BxT
                )
        if not c.tie_word_embeddings:
            # Created here so init makes it; applied by `forward` / the chunked log-prob path.
            shape = (c.hidden_size, c.vocab_size)
            Kernel(shape, ("embed", "vocab"), c.param_dtype, name="lm_head")()
        return RMSNorm(c.rms_norm_eps, name="final_norm", **dt)(x_BxTxD)


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """Boxed (logically partitioned) params; jit-able, and shape-only under jax.eval_shape."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config).init(rng, tokens, tokens, jnp.ones_like(tokens))["params"]


def logical_axes(config: ModelConfig) -> Params:
    """Pytree of PartitionSpecs of logical axis names, matching the params tree (no allocation)."""
    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    return nn.get_partition_spec(abstract)


def hidden_states(
    config: ModelConfig, params: Params, tokens_BxT, positions_BxT=None, segment_ids_BxT=None
) -> jax.Array:
    """Final-normed hidden states [B, T, D] in the compute dtype."""
    tokens_BxT = jnp.asarray(tokens_BxT)
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones_like(tokens_BxT)
    variables = {"params": nn.meta.unbox(params)}
    return Decoder(config).apply(variables, tokens_BxT, positions_BxT, segment_ids_BxT)


def unembedding(config: ModelConfig, params: Params) -> jax.Array:
    """The [D, V] output matrix in param dtype: embedding.T when tied, else the lm_head kernel."""
    params = nn.meta.unbox(params)
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def forward(
    config: ModelConfig, params: Params, tokens_BxT, positions_BxT=None, segment_ids_BxT=None
) -> jax.Array:
    """Full float32 logits [B, T, V] (eval and tests; training uses the vocab-chunked path)."""
    h_BxTxD = hidden_states(config, params, tokens_BxT, positions_BxT, segment_ids_BxT)
    w_DxV = unembedding(config, params).astype(config.dtype)
    return jnp.einsum("BTD,DV->BTV", h_BxTxD, w_DxV, preferred_element_type=jnp.float32)
