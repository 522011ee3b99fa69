"""Attention kernels behind dpo_jax.layers.Attention: the mask path (XLA, or cuDNN with the
mask as a bias), right-padded rows as row lengths (cuDNN's flash kernel), packed rows as
cuDNN's packed segment layout where available, and Gemma 2's score-capped attention.

Shape legend (dpo_jax/__init__.py): B rows, T tokens, U key tokens, N query heads, K kv
heads, G query heads per kv head, H head dim, E segments per row (E1: E + 1).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp


def softcap_attention(
    q_BxTxNxH, k_BxUxKxH, v_BxUxKxH, mask_Bx1xTxU, *, scale, softcap, is_causal=True
):
    """GQA attention with Gemma 2's score cap: cap * tanh(q.k * scale / cap), fp32 scores and
    softmax (jax.nn.dot_product_attention has no soft-capping)."""
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxUxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k, n // k, h)
    scores_BxKxGxTxU = jnp.einsum(
        "BTKGH,BUKH->BKGTU", q_BxTxKxGxH, k_BxUxKxH, preferred_element_type=jnp.float32
    )
    scores_BxKxGxTxU = softcap * jnp.tanh(scores_BxKxGxTxU * scale / softcap)
    visible_Bx1x1xTxU = mask_Bx1xTxU[:, :, None]
    if is_causal:
        visible_Bx1x1xTxU &= jnp.tril(jnp.ones((t, k_BxUxKxH.shape[1]), bool))[None, None, None]
    scores_BxKxGxTxU = jnp.where(visible_Bx1x1xTxU, scores_BxKxGxTxU, -1e30)
    probs_BxKxGxTxU = jax.nn.softmax(scores_BxKxGxTxU, axis=-1).astype(v_BxUxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("BKGTU,BUKH->BTKGH", probs_BxKxGxTxU, v_BxUxKxH)
    return out_BxTxKxGxH.reshape(b, t, n, h)


def zeroed_outside(valid_BxT, kernel, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH):
    """kernel(q, k, v) with zeros selected at invalid tokens on the way in and out.

    What a kernel leaves at tokens outside every sequence (outputs, and dq/dk/dv in the
    backward pass) is its own business: JAX's XLA path zeroes them, a fused kernel need not.
    Selecting zeros keeps it from ever reaching a real token or a parameter gradient (a
    select's gradient drops the unselected side, NaN included); a fused elementwise pass."""
    valid_BxTx1x1 = valid_BxT[:, :, None, None]
    zero = lambda x: jnp.where(valid_BxTx1x1, x, jnp.zeros((), x.dtype))  # noqa: E731
    return zero(kernel(zero(q_BxTxNxH), zero(k_BxTxKxH), zero(v_BxTxKxH)))


def padded_rows_attention(
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, scale, implementation
):
    """Causal attention of right-padded rows (one sequence per row, from index 0; segment id 0
    only on trailing padding), told to the kernel as sequence lengths rather than a mask:
    cuDNN runs lengths inside its flash kernel (PADDING_CAUSAL) but any [B, 1, T, U] mask
    only as a dense bias, which is much slower."""
    valid_BxT = segment_ids_BxT != 0
    lengths_B = jnp.sum(valid_BxT, axis=1, dtype=jnp.int32)
    kernel = functools.partial(
        jax.nn.dot_product_attention,
        scale=scale,
        is_causal=True,
        query_seq_lengths=lengths_B,
        key_value_seq_lengths=lengths_B,
        implementation=implementation,
    )
    return zeroed_outside(valid_BxT, kernel, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)


def packed_segments(segment_ids_BxT: jax.Array, max_segments: int) -> tuple[jax.Array, jax.Array]:
    """(offsets [B, E+1], lengths [B, E]) int32 of segments 1..E of each row (E = max_segments),
    as JAX's cuDNN packed-layout attention takes them: entry m - 1 holds segment m's first index
    in the row and its token count, or -1 in both where the row has no segment m.

    JAX flattens the rows into cuDNN's one list of segments by keeping the entries >= 0 of each
    array separately, so the two must agree on which entries are -1 (a length 0 would be kept).
    The last offset column is always -1: a row's end is not an offset (flattened, it would sit
    next to the next row's first start and shift every later segment); cuDNN ends a segment at
    start + length, so trailing padding (segment 0) lies outside every segment. Segments must
    be contiguous; ids above M are left out, like padding."""
    ids_E = jnp.arange(1, max_segments + 1, dtype=jnp.int32)
    in_BxTxE = segment_ids_BxT[:, :, None] == ids_E[None, None, :]
    lengths_BxE = jnp.sum(in_BxTxE, axis=1, dtype=jnp.int32)
    present_BxE = lengths_BxE > 0
    starts_BxE = jnp.argmax(in_BxTxE, axis=1).astype(jnp.int32)  # first index of segment m
    offsets_BxE = jnp.where(present_BxE, starts_BxE, -1)
    offsets_BxE1 = jnp.pad(offsets_BxE, ((0, 0), (0, 1)), constant_values=-1)
    return offsets_BxE1, jnp.where(present_BxE, lengths_BxE, -1)


# What JAX's private cuDNN entry point must accept for the packed layout.
PACKED_ARGS = ("q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "scale", "mask_type")


@functools.cache
def cudnn_packed_api():
    """(jax._src.cudnn.fused_attention_stablehlo, whether its packed layout handles K < N kv
    heads), or None where the packed layout is out of reach: no cuDNN (CPU), cuDNN < 9.6 (JAX's
    own packed-layout test needs 9.6), a GPU before Hopper (JAX refuses packed layouts there), or
    a JAX whose private API moved (checked by name: the caller then keeps the mask)."""
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        params = inspect.signature(fa.dot_product_attention).parameters
        cudnn_version = fa.check_cudnn_version()  # RuntimeError without cuDNN
        capability = jax.devices()[0].compute_capability  # AttributeError off CUDA
        major_minor = tuple(int(x) for x in capability.split(".")[:2])
    except (ImportError, AttributeError, RuntimeError, TypeError, ValueError):
        return None
    if not all(name in params for name in PACKED_ARGS):
        return None
    if not hasattr(getattr(fa, "MaskType", None), "PADDING_CAUSAL"):
        return None
    if cudnn_version < 90600 or major_minor < (9, 0):
        return None
    return fa, native_gqa_offsets(fa)


def native_gqa_offsets(fa) -> bool:
    """Whether `fa` steps kv offsets by the key's own width (K * H per token). Older JAX (0.10
    included) steps them by the query's N * H, so with K < N each segment's keys are read from
    the wrong tokens, silently (jax-ml/jax#39521). Probed on a toy input rather than read off a
    version number; anything unexpected counts as the old stride (the caller then repeats the kv
    heads up to N, right on either)."""
    try:
        with jax.ensure_compile_time_eval():
            lengths_1x2 = jnp.array([[1, 1]], jnp.int32)
            offsets_1x3 = jnp.array([[0, 1, -1]], jnp.int32)
            q_1x2x2x1 = jnp.zeros((1, 2, 2, 1), jnp.bfloat16)  # N = 2
            k_1x2x1x1 = jnp.zeros((1, 2, 1, 1), jnp.bfloat16)  # K = 1
            fixed = fa._fix_seqlen_offsets(
                lengths_1x2, lengths_1x2, offsets_1x3, offsets_1x3, q_1x2x2x1, k_1x2x1x1
            )
            return int(jnp.ravel(fixed[3])[1]) == 1  # token 1 at K * H = 1, not N * H = 2
    except Exception:  # a private helper that changed: assume the old stride
        return False


def packed_rows_attention(
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, scale, max_segments, api
):
    """Causal attention within each segment of packed rows (segment ids 1, 2, ... contiguous
    along the row, 0 on trailing padding), told to cuDNN as segment offsets and lengths in its
    packed ("THD") layout: flash attention with PADDING_CAUSAL per segment, where a [B, 1, T, U]
    mask would run as a dense bias."""
    fa, native_gqa = api
    offsets_BxE1, lengths_BxE = packed_segments(segment_ids_BxT, max_segments)
    # The kernel writes no output and no dq/dk/dv for tokens outside every segment.
    valid_BxT = (segment_ids_BxT > 0) & (segment_ids_BxT <= max_segments)
    n, k = q_BxTxNxH.shape[2], k_BxTxKxH.shape[2]
    if not native_gqa and k != n:  # query head i reads kv head i // G, as in the mask path
        k_BxTxKxH = jnp.repeat(k_BxTxKxH, n // k, axis=2)
        v_BxTxKxH = jnp.repeat(v_BxTxKxH, n // k, axis=2)
    kernel = functools.partial(
        fa.dot_product_attention,
        q_seqlen=lengths_BxE,
        kv_seqlen=lengths_BxE,
        q_offsets=offsets_BxE1,
        kv_offsets=offsets_BxE1,
        scale=scale,
        mask_type=fa.MaskType.PADDING_CAUSAL,
        qkv_layout="BTNH",
    )
    return zeroed_outside(valid_BxT, kernel, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)


# The attention paths of the model, chosen in one place (kernel_for).
DECODE_MASK = "decode mask"  # one query against the KV cache: XLA with the cache mask
PADDED_ROWS = "padded rows"  # one sequence per row from index 0: row lengths, no mask
CUDNN_PACKED = "cudnn packed"  # packed rows as segments of cuDNN's flash kernel
MASK = "mask"  # causal and same-segment (window, branches) mask; cuDNN takes it as a bias


def kernel_for(config, *, decode: bool, padded_rows: bool, prefix_shared: bool) -> str:
    """Which attention path a layer of `config` takes for these rows. Sliding windows, logit
    soft-caps and prefix-shared branches need the explicit mask; cuDNN's packed layout
    needs its bound on segments per row and JAX's private API (cudnn_packed_api)."""
    if decode:
        return DECODE_MASK
    plain = not prefix_shared and config.sliding_window is None
    plain = plain and config.attn_logit_softcap is None
    if padded_rows and plain:
        return PADDED_ROWS
    if (
        plain
        and config.attention_impl == "cudnn"
        and config.max_segments_per_row is not None
        and cudnn_packed_api() is not None
    ):
        return CUDNN_PACKED
    return MASK


def masked_attention(q_BxTxNxH, k_BxUxKxH, v_BxUxKxH, mask_Bx1xTxU, config, *, is_causal, impl):
    scale = (config.query_pre_attn_scalar or config.resolved_head_dim) ** -0.5
    if config.attn_logit_softcap is not None:
        return softcap_attention(
            q_BxTxNxH,
            k_BxUxKxH,
            v_BxUxKxH,
            mask_Bx1xTxU,
            scale=scale,
            softcap=config.attn_logit_softcap,
            is_causal=is_causal,
        )
    return jax.nn.dot_product_attention(
        q_BxTxNxH,
        k_BxUxKxH,
        v_BxUxKxH,
        mask=mask_Bx1xTxU,
        scale=scale,
        is_causal=is_causal,
        implementation=impl,
    )
