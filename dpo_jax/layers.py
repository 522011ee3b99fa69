"""The Flax modules of one decoder layer: RMSNorm, RoPE, grouped-query attention (training,
padded-row, packed-row and KV-cache paths), the gated MLP, and the pre-norm Block that
dpo_jax.model scans.

Shape legend (dpo_jax/__init__.py): B rows, T tokens, U key tokens, D model, N query heads,
K kv heads, G query heads per kv head, H head dim, F mlp, E segments per row (E1: E + 1).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpo_jax import attention, quant
from dpo_jax.model_config import (
    ACTIVATIONS,
    ModelConfig,
    rope_attention_factor,
    rope_inv_freq,
)

INIT = nn.initializers.normal(stddev=0.02)  # HF initializer_range


def rope_cos_sin(config: ModelConfig, positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    inv_freq_h = jnp.asarray(rope_inv_freq(config))
    inv_freq_1x1xh = inv_freq_h.reshape((1,) * positions_BxT.ndim + inv_freq_h.shape)
    freqs_BxTxh = positions_BxT[..., None].astype(jnp.float32) * inv_freq_1x1xh
    emb_BxTxH = jnp.concatenate([freqs_BxTxh, freqs_BxTxh], axis=-1)
    scale = rope_attention_factor(config)  # 1 but for YaRN, as transformers' attention_scaling
    return jnp.cos(emb_BxTxH) * scale, jnp.sin(emb_BxTxH) * scale


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
        return (x32 * trailing(scale32, x32)).astype(self.dtype)


def trailing(v: jax.Array, like: jax.Array) -> jax.Array:
    """`v` with leading 1-axes to `like`'s rank: explicit broadcasting (the tests run with
    rank promotion raising, where implicit broadcasting hides shape bugs)."""
    return v.reshape((1,) * (like.ndim - v.ndim) + v.shape)


def norm_layer(config: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(
        config.rms_norm_eps,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        unit_offset=config.rms_norm_unit_offset,
        name=name,
    )


class Einsum(nn.Module):
    """A kernel of `shape` applied by einsum `eqn`; optional bias over the kernel's output dims.

    The stored kernel may be quantized (a quant.Quantized, QLoRA's frozen base): it is
    dequantized here, one layer at a time, in the compute dtype. With `lora` = (rank, scale,
    dropout) the output gains scale · B(A(dropout(x))), A [*in, r] and B [r, *out] in the
    "lora" collection; applied without that collection (the reference: adapters off), the
    module is the bare projection. Dropout runs only when the caller passes a "dropout" rng."""

    eqn: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    dtype: str
    param_dtype: str
    bias_axes: tuple[str, ...] | None = None
    lora: tuple[int, float, float] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.eqn, x.astype(self.dtype), self._kernel())
        if self.lora is not None and (self.is_initializing() or self.has_variable("lora", "a")):
            y = y + self._adapter(x)
        if self.bias_axes is not None:
            bias_shape = self.shape[-len(self.bias_axes) :]
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes)
            bias = self.param("bias", bias_init, bias_shape, self.param_dtype).astype(self.dtype)
            y = y + trailing(bias, y)
        return y

    def _kernel(self) -> jax.Array:
        stored = None if self.is_initializing() else self.get_variable("params", "kernel")
        if isinstance(stored, quant.Quantized):
            return quant.dequantize(stored, self.dtype)
        init = nn.with_logical_partitioning(INIT, self.axes)
        return self.param("kernel", init, self.shape, self.param_dtype).astype(self.dtype)

    def _adapter(self, x: jax.Array) -> jax.Array:
        rank, scale, dropout = self.lora
        x_sub, rest = self.eqn.split(",")
        k_sub, out_sub = rest.split("->")
        n_in = sum(letter in x_sub for letter in k_sub)  # the kernel's contracted (input) dims
        in_sub, kout_sub = k_sub[:n_in], k_sub[n_in:]
        kept_sub = "".join(letter for letter in x_sub if letter not in in_sub)
        fan_in = math.prod(self.shape[:n_in])
        # PEFT's initialisation: A ~ U(±1/sqrt(fan_in)) (kaiming_uniform, a=sqrt(5)), B = 0,
        # so the adapted model starts as the base.
        bound = fan_in**-0.5
        a_init = nn.with_logical_partitioning(
            lambda rng, shape, dtype: jax.random.uniform(rng, shape, dtype, -bound, bound),
            (*self.axes[:n_in], "lora_rank"),
        )
        b_init = nn.with_logical_partitioning(
            nn.initializers.zeros, ("lora_rank", *self.axes[n_in:])
        )
        a = self.variable(
            "lora",
            "a",
            a_init,
            self.make_rng("params") if self.is_initializing() else None,
            (*self.shape[:n_in], rank),
            self.param_dtype,
        ).value
        b = self.variable(
            "lora", "b", b_init, None, (rank, *self.shape[n_in:]), self.param_dtype
        ).value
        x = x.astype(self.dtype)
        if dropout > 0.0 and self.has_rng("dropout"):
            x = nn.Dropout(dropout, deterministic=False)(x)
        h = jnp.einsum(f"{x_sub},{in_sub}r->{kept_sub}r", x, a.astype(self.dtype))
        y = jnp.einsum(f"{kept_sub}r,r{kout_sub}->{out_sub}", h, b.astype(self.dtype))
        return y * jnp.asarray(scale, self.dtype)


class Attention(nn.Module):
    """Grouped-query attention, causal within each segment (and within `window` if > 0).

    With decode=True the keys and values come from the KV cache instead (see `_cached`).
    With padded_rows=True the caller promises right-padded rows: configs without sliding
    windows or score caps then pass lengths, not a mask, to the kernel (the others, and
    decoding, ignore it; see `attention.padded_rows_attention`). Packed rows on cuDNN with
    max_segments_per_row set (same exclusions) pass segment offsets and lengths where the GPU
    and cuDNN allow it (`attention.packed_rows_attention`). Prefix-shared rows add branch
    ids: 0 for the shared prompt, 1 / 2 for the two replies; a reply's keys are hidden from
    the other's (always the mask path)."""

    config: ModelConfig
    decode: bool = False
    padded_rows: bool = False

    @nn.compact
    def __call__(
        self,
        x_BxTxD,
        cos_BxTxH,
        sin_BxTxH,
        positions_BxT,
        segment_ids_BxT,
        window,
        branch_ids_BxT=None,
    ):
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
            lora=c.lora_for("q_proj"),
            name="q_proj",
            **dt,
        )(x_BxTxD)
        k_BxTxKxH = Einsum(
            "BTD,DKH->BTKH",
            (d, k, h),
            kv_axes,
            bias_axes=kv_bias,
            lora=c.lora_for("k_proj"),
            name="k_proj",
            **dt,
        )(x_BxTxD)
        v_BxTxKxH = Einsum(
            "BTD,DKH->BTKH",
            (d, k, h),
            kv_axes,
            bias_axes=kv_bias,
            lora=c.lora_for("v_proj"),
            name="v_proj",
            **dt,
        )(x_BxTxD)
        if c.qk_norm:
            q_BxTxNxH = RMSNorm(c.rms_norm_eps, name="q_norm", **dt)(q_BxTxNxH)
            k_BxTxKxH = RMSNorm(c.rms_norm_eps, name="k_norm", **dt)(k_BxTxKxH)
        q_BxTxNxH = _apply_rope(q_BxTxNxH, cos_BxTxH, sin_BxTxH)
        k_BxTxKxH = _apply_rope(k_BxTxKxH, cos_BxTxH, sin_BxTxH)
        kernel = attention.kernel_for(
            c,
            decode=self.decode,
            padded_rows=self.padded_rows,
            prefix_shared=branch_ids_BxT is not None,
        )
        if kernel == attention.DECODE_MASK:
            k_BxUxKxH, v_BxUxKxH, mask_Bx1xTxU = self._cached(
                k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT, window
            )
            # The cache mask holds causality. cuDNN's flash kernels gain nothing on one query
            # and take arbitrary masks only as a bias; decoding uses XLA's.
            out_BxTxNxH = attention.masked_attention(
                q_BxTxNxH, k_BxUxKxH, v_BxUxKxH, mask_Bx1xTxU, c, is_causal=False, impl=None
            )
        elif kernel == attention.PADDED_ROWS:
            out_BxTxNxH = attention.padded_rows_attention(
                q_BxTxNxH,
                k_BxTxKxH,
                v_BxTxKxH,
                segment_ids_BxT,
                scale=(c.query_pre_attn_scalar or h) ** -0.5,
                implementation=c.attention_impl,
            )
        elif kernel == attention.CUDNN_PACKED:
            out_BxTxNxH = attention.packed_rows_attention(
                q_BxTxNxH,
                k_BxTxKxH,
                v_BxTxKxH,
                segment_ids_BxT,
                scale=(c.query_pre_attn_scalar or h) ** -0.5,
                max_segments=c.max_segments_per_row,
                api=attention.cudnn_packed_api(),
            )
        else:
            # Causal by index in the row AND same segment. Padding (segment 0) attends to
            # padding and every token sees itself, so no softmax row is empty (no NaN).
            mask_Bx1xTxU = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
            if c.sliding_window is not None:
                # transformers' sliding window: key position > query position - window.
                # Measured by position, not row index: a prefix-shared rejected reply sits a
                # whole chosen reply after the prompt it continues (within a segment the two
                # agree otherwise). `window` is traced under scan (alternating layers share
                # one compiled body); 0 = a full-attention layer.
                distance_Bx1xTxU = positions_BxT[:, None, :, None] - positions_BxT[:, None, None, :]
                mask_Bx1xTxU &= (window <= 0) | (distance_Bx1xTxU < window)
            if branch_ids_BxT is not None:
                key_branch_Bx1x1xU = branch_ids_BxT[:, None, None, :]
                mask_Bx1xTxU &= (key_branch_Bx1x1xU == 0) | (
                    key_branch_Bx1x1xU == branch_ids_BxT[:, None, :, None]
                )
            # Causal by index (is_causal): the fast kernels' own mask.
            out_BxTxNxH = attention.masked_attention(
                q_BxTxNxH,
                k_BxTxKxH,
                v_BxTxKxH,
                mask_Bx1xTxU,
                c,
                is_causal=True,
                impl=c.attention_impl,
            )
        return Einsum(
            "BTNH,NHD->BTD",
            (n, h, d),
            ("heads", "head_dim", "embed"),
            lora=c.lora_for("o_proj"),
            name="o_proj",
            **dt,
        )(out_BxTxNxH)

    def _cached(self, k_BxTxKxH, v_BxTxKxH, positions_BxT, segment_ids_BxT, window):
        """Writes this call's keys/values into the cache at slot = position (tokens with
        segment id 0, or past the cache, are not written) and returns the whole cache with
        the mask of the slots each query sees."""
        # At init (init_cache) the input is [B, U] and fixes the cache length U.
        cached_k = self.variable("cache", "k", jnp.zeros, k_BxTxKxH.shape, k_BxTxKxH.dtype)
        cached_v = self.variable("cache", "v", jnp.zeros, v_BxTxKxH.shape, v_BxTxKxH.dtype)
        filled = self.variable("cache", "filled", jnp.zeros, positions_BxT.shape, bool)
        s = filled.value.shape[1]
        slots_BxT = jnp.where(segment_ids_BxT != 0, positions_BxT, s)  # s: dropped
        rows_Bx1 = jnp.arange(slots_BxT.shape[0])[:, None]
        cached_k.value = cached_k.value.at[rows_Bx1, slots_BxT].set(k_BxTxKxH, mode="drop")
        cached_v.value = cached_v.value.at[rows_Bx1, slots_BxT].set(v_BxTxKxH, mode="drop")
        filled.value = filled.value.at[rows_Bx1, slots_BxT].set(True, mode="drop")
        distance_BxTxU = positions_BxT[:, :, None] - jnp.arange(s)[None, None, :]
        mask_BxTxU = filled.value[:, None, :] & (distance_BxTxU >= 0)
        if self.config.sliding_window is not None:
            mask_BxTxU &= (window <= 0) | (distance_BxTxU < window)
        return cached_k.value, cached_v.value, mask_BxTxU[:, None]


class Mlp(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU, or GeGLU (tanh gelu) for Gemma."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD):
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        dt = dict(dtype=c.dtype, param_dtype=c.param_dtype)

        def proj(eqn, shape, axes, name):
            return Einsum(eqn, shape, axes, lora=c.lora_for(name), name=name, **dt)

        gate_BxTxF = proj("BTD,DF->BTF", (d, f), ("embed", "mlp"), "gate_proj")(x_BxTxD)
        up_BxTxF = proj("BTD,DF->BTF", (d, f), ("embed", "mlp"), "up_proj")(x_BxTxD)
        h_BxTxF = ACTIVATIONS[c.mlp_activation](gate_BxTxF) * up_BxTxF
        return proj("BTF,FD->BTD", (f, d), ("mlp", "embed"), "down_proj")(h_BxTxF)


class Kernel(nn.Module):
    """A bare kernel parameter (the untied lm_head, applied outside the module)."""

    shape: tuple[int, ...]
    axes: tuple[str, ...]
    param_dtype: str

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.with_logical_partitioning(INIT, self.axes)
        return self.param("kernel", init, self.shape, self.param_dtype)


class Block(nn.Module):
    """Pre-norm decoder layer (plus Gemma 2's post-norms); returns (x, None) for nn.scan."""

    config: ModelConfig
    decode: bool = False
    padded_rows: bool = False

    @nn.compact
    def __call__(
        self,
        x_BxTxD,
        cos_BxTxH,
        sin_BxTxH,
        positions_BxT,
        segment_ids_BxT,
        window,
        branch_ids_BxT=None,
    ):
        c = self.config
        y_BxTxD = norm_layer(c, "attn_norm")(x_BxTxD)
        y_BxTxD = Attention(c, self.decode, self.padded_rows, name="attn")(
            y_BxTxD, cos_BxTxH, sin_BxTxH, positions_BxT, segment_ids_BxT, window, branch_ids_BxT
        )
        if c.post_norms:
            y_BxTxD = norm_layer(c, "post_attn_norm")(y_BxTxD)
        x_BxTxD = x_BxTxD + y_BxTxD
        y_BxTxD = Mlp(c, name="mlp")(norm_layer(c, "mlp_norm")(x_BxTxD))
        if c.post_norms:
            y_BxTxD = norm_layer(c, "post_mlp_norm")(y_BxTxD)
        return x_BxTxD + y_BxTxD, None
