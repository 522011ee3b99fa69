"""Decoder of the common HF causal-LM families as a pure function of a params pytree.

Llama 2/3/3.1/3.2 (SmolLM, TinyLlama), Mistral, Qwen2/2.5, Qwen3 and Gemma 2: one Linen module
whose differences are ModelConfig fields (biases, q/k norm, sliding windows, Gemma 2's norm
offset, embedding scale, sandwich norms, GeGLU and logit soft-capping).

Shape legend: B rows, T tokens, S key tokens, D model, V vocab, N query heads, K kv heads,
G query heads per kv head, H head dim, F mlp, L layers.

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

HF -> ours (dpo_jax.hf holds the full table): q_proj.weight [N*H, D] is kernel.T reshaped to
[D, N, H]; o_proj.weight [D, N*H] is kernel reshaped to [N*H, D] then transposed; mlp weights
are transposed. RoPE uses HF's rotate_half (non-interleaved) layout, so no head_dim
permutation is needed. Llama's post_attention_layernorm is our mlp_norm; Gemma 2's is
post_attn_norm (its pre_feedforward_layernorm is mlp_norm). With rms_norm_unit_offset the
stored scale s is applied as (1 + s), exactly as HF stores Gemma weights.
With scan_layers=False the layers live under layers_0 ... layers_{L-1} without the [L] axis.

KV cache (`init_cache` / `decode_step`, generation): the same modules with decode=True keep
each layer's rotated keys and values in a "cache" collection, k/v [L, B, S, K, H] plus
filled [L, B, S] (scanned like the params), with slot = position. A query at position p
sees the filled slots s <= p (and p - s < window in sliding layers).
"""

from __future__ import annotations

import dataclasses
import functools
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
    # A query sees itself and the sliding_window - 1 keys before it (transformers' rule) in
    # the layers that layer_types marks "sliding_attention"; layer_types=None with a window
    # means every layer (Mistral).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # "sliding_attention" | "full_attention" per layer
    mlp_activation: Literal["silu", "gelu_tanh"] = "silu"  # gate activation (gelu_tanh: Gemma)
    rms_norm_unit_offset: bool = False  # norms apply (1 + scale); scales init to 0 (Gemma)
    scale_embeddings: bool = False  # embeddings * sqrt(hidden_size) in the compute dtype (Gemma)
    post_norms: bool = False  # RMSNorm on attention / mlp outputs before the residual (Gemma 2)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (None: H)
    attn_logit_softcap: float | None = None  # cap * tanh(scores / cap) before the mask (Gemma 2)
    # Applied to the output logits by `forward`; the vocab-chunked log-prob of the trainer must
    # apply it too (losses.chunked_token_logps(..., logit_softcap=final_logit_softcap)).
    final_logit_softcap: float | None = None
    architecture: str = "LlamaForCausalLM"  # the HF class this config came from / exports as
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: Literal["xla", "cudnn"] | None = None
    remat_policy: Literal["none", "dots_saveable", "full"] = "none"
    scan_layers: bool = True

    def __post_init__(self):
        if isinstance(self.layer_types, list):  # keep the config hashable
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of {self.num_kv_heads=}")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} not in {list(_REMAT_POLICIES)}")
        if self.mlp_activation not in _ACTIVATIONS:
            raise ValueError(f"mlp_activation={self.mlp_activation!r} not in {list(_ACTIVATIONS)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"{self.layer_types=} has not {self.num_layers} entries")
            unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
            if unknown:
                raise ValueError(f"layer_types {sorted(unknown)}: sliding_attention|full_attention")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 (or None)")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per-layer attention window (0 = the whole causal prefix)."""
        if self.sliding_window is None:
            return (0,) * self.num_layers
        types = self.layer_types or ("sliding_attention",) * self.num_layers
        return tuple(self.sliding_window if t == "sliding_attention" else 0 for t in types)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}
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
    layer += 2 * d if config.post_norms else 0
    head = 0 if config.tie_word_embeddings else d * config.vocab_size
    return config.vocab_size * d + config.num_layers * layer + d + head


def flops_per_token(config: ModelConfig, seq_len: int, *, backward: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul weight plus causal attention; x3 with backward."""
    d, h = config.hidden_size, config.resolved_head_dim
    n, k = config.num_heads, config.num_kv_heads
    matmul = config.num_layers * (2 * d * n * h + 2 * d * k * h + 3 * d * config.intermediate_size)
    matmul += d * config.vocab_size  # unembedding (the embedding lookup is free)
    # QK^T and PV: 4*N*H FLOPs per visible key; causal rows see seq_len/2 keys on average, and
    # a window W < seq_len leaves W - W^2 / (2 seq_len) of them.
    attention = 0.0
    for window in config.layer_windows:
        visible = seq_len / 2 if not 0 < window < seq_len else window - window**2 / (2 * seq_len)
        attention += 4 * n * h * visible
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
    """x * rsqrt(mean(x^2) + eps) * scale over the last axis, computed in fp32.

    With unit_offset the stored scale s multiplies as (1 + s) and starts at 0 (Gemma)."""

    eps: float
    dtype: str
    param_dtype: str
    unit_offset: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(init, ("norm",)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale32 = scale.astype(jnp.float32) + (1.0 if self.unit_offset else 0.0)
        return (x32 * scale32).astype(self.dtype)


def _norm(config: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(
        config.rms_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        unit_offset=config.rms_norm_unit_offset,
        name=name,
    )


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


def _softcap_attention(
    q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, *, scale, softcap, is_causal=True
):
    """GQA attention with Gemma 2's score cap: cap * tanh(q.k * scale / cap), fp32 scores and
    softmax (jax.nn.dot_product_attention has no soft-capping)."""
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k, n // k, h)
    scores_BxKxGxTxS = jnp.einsum(
        "BTKGH,BSKH->BKGTS", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    )
    scores_BxKxGxTxS = softcap * jnp.tanh(scores_BxKxGxTxS * scale / softcap)
    visible_Bx1x1xTxS = mask_Bx1xTxS[:, :, None]
    if is_causal:
        visible_Bx1x1xTxS &= jnp.tril(jnp.ones((t, k_BxSxKxH.shape[1]), bool))
    scores_BxKxGxTxS = jnp.where(visible_Bx1x1xTxS, scores_BxKxGxTxS, -1e30)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("BKGTS,BSKH->BTKGH", probs_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


class Attention(nn.Module):
    """Grouped-query attention, causal within each segment (and within `window` if > 0).

    With decode=True the keys and values come from the KV cache instead (see `_cached`)."""

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, positions_BxT, segment_ids_BxT, window):
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
        if self.decode:
            k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS = self._cached(
                k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT, window
            )
        else:
            k_BxSxKxH, v_BxSxKxH = k_BxTxKxH, v_BxTxKxH
            # Causal by index in the row AND same segment. Padding (segment 0) attends to
            # padding and every token sees itself, so no softmax row is empty (no NaN).
            mask_Bx1xTxS = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
            if c.sliding_window is not None:
                # transformers' sliding window: key index > query index - window. `window` is
                # traced under scan (alternating layers share one compiled body); 0 = a
                # full-attention layer.
                index_T = jnp.arange(x_BxTxD.shape[1])
                distance_TxS = index_T[:, None] - index_T[None, :]
                mask_Bx1xTxS &= (window <= 0) | (distance_TxS < window)
        # Training is causal by index (the fast kernels' own mask); the cache mask holds it.
        is_causal = not self.decode
        scale = (c.query_pre_attn_scalar or h) ** -0.5
        if c.attn_logit_softcap is not None:
            out_BxTxNxH = _softcap_attention(
                q_BxTxNxH,
                k_BxSxKxH,
                v_BxSxKxH,
                mask_Bx1xTxS,
                scale=scale,
                softcap=c.attn_logit_softcap,
                is_causal=is_causal,
            )
        else:
            out_BxTxNxH = jax.nn.dot_product_attention(
                q_BxTxNxH,
                k_BxSxKxH,
                v_BxSxKxH,
                mask=mask_Bx1xTxS,
                scale=scale,
                is_causal=is_causal,
                # cuDNN's flash kernels gain nothing on one query and take arbitrary masks
                # only as a bias; decoding uses XLA's.
                implementation=None if self.decode else c.attention_impl,
            )
        return Einsum(
            "BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"), name="o_proj", **dt
        )(out_BxTxNxH)

    def _cached(self, k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT, window):
        """Writes this call's keys/values into the cache at slot = position (tokens with
        segment id 0, or past the cache, are not written) and returns the whole cache with
        the mask of the slots each query sees."""
        # At init (init_cache) the input is [B, S] and fixes the cache length S.
        cached_k = self.variable("cache", "k", jnp.zeros, k_BxTxKxH.shape, k_BxTxKxH.dtype)
        cached_v = self.variable("cache", "v", jnp.zeros, v_BxTxKxH.shape, v_BxTxKxH.dtype)
        filled = self.variable("cache", "filled", jnp.zeros, positions_BxT.shape, bool)
        s = filled.value.shape[1]
        slots_BxT = jnp.where(segment_ids_BxT != 0, positions_BxT, s)  # s: dropped
        rows_Bx1 = jnp.arange(slots_BxT.shape[0])[:, None]
        cached_k.value = cached_k.value.at[rows_Bx1, slots_BxT].set(k_BxTxKxH, mode="drop")
        cached_v.value = cached_v.value.at[rows_Bx1, slots_BxT].set(v_BxTxKxH, mode="drop")
        filled.value = filled.value.at[rows_Bx1, slots_BxT].set(True, mode="drop")
        distance_BxTxS = positions_BxT[:, :, None] - jnp.arange(s)
        mask_BxTxS = filled.value[:, None, :] & (distance_BxTxS >= 0)
        if self.config.sliding_window is not None:
            mask_BxTxS &= (window <= 0) | (distance_BxTxS < window)
        return cached_k.value, cached_v.value, mask_BxTxS[:, None]


class Mlp(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU, or GeGLU (tanh gelu) for Gemma."""

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
        h_BxTxF = _ACTIVATIONS[c.mlp_activation](gate_BxTxF) * up_BxTxF
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
    """Pre-norm decoder layer (plus Gemma 2's post-norms); returns (x, None) for nn.scan."""

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, x_BxTxD, cos_BxTxH, sin_BxTxH, positions_BxT, segment_ids_BxT, window):
        c = self.config
        y_BxTxD = _norm(c, "attn_norm")(x_BxTxD)
        y_BxTxD = Attention(c, self.decode, name="attn")(
            y_BxTxD, cos_BxTxH, sin_BxTxH, positions_BxT, segment_ids_BxT, window
        )
        if c.post_norms:
            y_BxTxD = _norm(c, "post_attn_norm")(y_BxTxD)
        x_BxTxD = x_BxTxD + y_BxTxD
        y_BxTxD = Mlp(c, name="mlp")(_norm(c, "mlp_norm")(x_BxTxD))
        if c.post_norms:
            y_BxTxD = _norm(c, "post_mlp_norm")(y_BxTxD)
        return x_BxTxD + y_BxTxD, None


class Decoder(nn.Module):
    """tokens, positions, segment ids [B, T] -> final-normed hidden states [B, T, D] (dtype).

    decode=True: one sequence per row, attending to (and extending) the "cache" collection."""

    config: ModelConfig
    decode: bool = False

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT):
        c = self.config
        dt = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        embed_init = nn.with_logical_partitioning(_INIT, ("vocab", "embed"))
        x_BxTxD = nn.Embed(
            c.vocab_size, c.hidden_size, embedding_init=embed_init, name="embed", **dt
        )(tokens_BxT)
        if c.scale_embeddings:
            # HF rounds sqrt(D) to the compute dtype first (bf16: sqrt(2304) = 48.0 exactly,
            # sqrt(3584) -> 60.0 rather than 59.87).
            x_BxTxD = x_BxTxD * jnp.asarray(math.sqrt(c.hidden_size), c.dtype)
        cos_BxTxH, sin_BxTxH = _rope_cos_sin(c, positions_BxT)

        block = Block
        policy = None if self.decode else _REMAT_POLICIES[c.remat_policy]
        if policy is not None:
            # Under scan, CSE cannot merge the recomputation into the forward pass anyway.
            block = nn.remat(Block, policy=policy, prevent_cse=not c.scan_layers)
        windows = c.layer_windows
        if c.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0, "cache": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * 4 + (0,),
                length=c.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BxTxD, _ = stack(c, self.decode, name="layers")(
                x_BxTxD,
                cos_BxTxH,
                sin_BxTxH,
                positions_BxT,
                segment_ids_BxT,
                jnp.asarray(windows, jnp.int32),
            )
        else:
            for i in range(c.num_layers):
                x_BxTxD, _ = block(c, self.decode, name=f"layers_{i}")(
                    x_BxTxD, cos_BxTxH, sin_BxTxH, positions_BxT, segment_ids_BxT, windows[i]
                )
        if not c.tie_word_embeddings:
            # Created here so init makes it; applied by `forward` / the chunked log-prob path.
            shape = (c.hidden_size, c.vocab_size)
            Kernel(shape, ("embed", "vocab"), c.param_dtype, name="lm_head")()
        return _norm(c, "final_norm")(x_BxTxD)


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


def _logits(config: ModelConfig, params: Params, h_BxTxD: jax.Array) -> jax.Array:
    w_DxV = unembedding(config, params).astype(config.dtype)
    logits_BxTxV = jnp.einsum("BTD,DV->BTV", h_BxTxD, w_DxV, preferred_element_type=jnp.float32)
    if config.final_logit_softcap is not None:
        cap = config.final_logit_softcap
        logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)
    return logits_BxTxV


def forward(
    config: ModelConfig, params: Params, tokens_BxT, positions_BxT=None, segment_ids_BxT=None
) -> jax.Array:
    """Full float32 logits [B, T, V], soft-capped when the config says so (eval and tests;
    training uses the vocab-chunked path, which must apply config.final_logit_softcap too)."""
    h_BxTxD = hidden_states(config, params, tokens_BxT, positions_BxT, segment_ids_BxT)
    return _logits(config, params, h_BxTxD)


Cache = Any  # {"layers": {"attn": {"k", "v": [L, B, S, K, H], "filled": [L, B, S]}}} when scanned


def init_cache(config: ModelConfig, batch: int, max_len: int) -> Cache:
    """An empty KV cache for `batch` rows of up to `max_len` positions (jit-able)."""
    tokens_BxS = jnp.zeros((batch, max_len), jnp.int32)
    decoder = Decoder(config, decode=True)
    shapes = jax.eval_shape(
        lambda: decoder.init(jax.random.key(0), tokens_BxS, tokens_BxS, tokens_BxS + 1)["cache"]
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
    variables = {"params": nn.meta.unbox(params), "cache": cache}
    h_BxTxD, updated = Decoder(config, decode=True).apply(
        variables, tokens_BxT, positions_BxT, jnp.asarray(valid_BxT, jnp.int32), mutable=["cache"]
    )
    if last_only:
        last_B = jnp.argmax(jnp.where(valid_BxT, positions_BxT, -1), axis=1)
        h_BxTxD = jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)
    return _logits(config, params, h_BxTxD), updated["cache"]
