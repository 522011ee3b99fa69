"""Token and sequence log-probs: `token_logps` (or `chunked_token_logps`, which never builds
the [M, V] logits), `sequence_logps` (segment sum, padded and packed rows alike) and LD-DPO's
`desensitized_logps`. Shape suffixes as in dpo_jax.losses."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_F32 = jnp.float32


def token_logps(logits_xV: Array, labels_x: Array) -> Array:
    """log p(label) under softmax(logits), computed in fp32; labels must lie in [0, V)."""
    logits_xV = logits_xV.astype(_F32)
    label_logit_x = jnp.take_along_axis(logits_xV, labels_x[..., None], axis=-1)[..., 0]
    return label_logit_x - jax.nn.logsumexp(logits_xV, axis=-1)


class TokenStats(NamedTuple):
    """Per-token statistics of softmax(logits) that the metrics and WPO read; [M] float32
    each, no gradient (chunked_token_stats)."""

    entropy: Array  # -sum_v p_v log p_v
    top1: Array  # 1.0 where the label has the largest logit (TRL's mean_token_accuracy)
    log_sum_sq_probs: Array  # log sum_v p_v^2 (WPO's aligned log-probs subtract it)


def chunked_token_logps(
    hidden_MxD: Array,
    unembed_DxV: Array,
    labels_M: Array,
    *,
    chunk_size: int = 4096,
    logit_softcap: float | None = None,
) -> tuple[Array, Array]:
    """(log p(label), mean logit over the vocab) per token, without materialising [M, V].

    Equals `token_logps(hidden @ unembed, labels)` and `(hidden @ unembed).mean(-1)` (after the
    optional Gemma-2 soft cap `cap * tanh(logits / cap)`), values and gradients. Callers flatten
    leading dims to N first. The matmuls run in the input dtype with fp32 accumulation; the
    backward recomputes one [M, C] chunk at a time and returns grads in the input dtypes.
    """
    logps_M, mean_M, _ = chunked_token_stats(
        hidden_MxD, unembed_DxV, labels_M, chunk_size=chunk_size, logit_softcap=logit_softcap
    )
    return logps_M, mean_M


def chunked_token_stats(
    hidden_MxD: Array,
    unembed_DxV: Array,
    labels_M: Array,
    *,
    chunk_size: int = 4096,
    logit_softcap: float | None = None,
) -> tuple[Array, Array, TokenStats]:
    """chunked_token_logps's two outputs and the TokenStats, from the same pass over the
    vocabulary (the statistics are running sums beside the logsumexp's; no gradient flows
    through them)."""
    if hidden_MxD.ndim != 2 or unembed_DxV.ndim != 2 or labels_M.ndim != 1:
        raise ValueError("expected hidden [M, D], unembed [D, V], labels [M]; flatten leading dims")
    chunk = min(int(chunk_size), unembed_DxV.shape[1])
    softcap = None if logit_softcap is None else float(logit_softcap)
    logps_M, mean_M, entropy_M, top1_M, log_sum_sq_M = _chunked_logps(
        hidden_MxD, unembed_DxV, labels_M.astype(jnp.int32), chunk, softcap
    )
    stats = TokenStats(*(lax.stop_gradient(x) for x in (entropy_M, top1_M, log_sum_sq_M)))
    return logps_M, mean_M, stats


def _chunk_logits(hidden_MxD, unembed_DxV, index, chunk, softcap):
    """fp32 logits of vocab chunk `index`; `fresh_C` masks columns an earlier chunk counted."""
    vocab = unembed_DxV.shape[1]
    # The last chunk slides back to end at V instead of padding V up to a multiple of C: same
    # masked-column semantics, but the [D, V] unembedding is never copied.
    start = jnp.minimum(index * chunk, vocab - chunk)
    unembed_DxC = lax.dynamic_slice_in_dim(unembed_DxV, start, chunk, axis=1)
    logits_MxC = jnp.einsum("MD,DC->MC", hidden_MxD, unembed_DxC, preferred_element_type=_F32)
    if softcap is not None:
        logits_MxC = softcap * jnp.tanh(logits_MxC / softcap)
    vocab_ids_C = start + jnp.arange(chunk)
    fresh_C = vocab_ids_C >= index * chunk
    return start, unembed_DxC, logits_MxC, vocab_ids_C, fresh_C


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _chunked_logps(hidden_MxD, unembed_DxV, labels_M, chunk, softcap):
    return _chunked_fwd(hidden_MxD, unembed_DxV, labels_M, chunk, softcap)[0]


def _chunked_fwd(hidden_MxD, unembed_DxV, labels_M, chunk, softcap):
    num_tokens, vocab = hidden_MxD.shape[0], unembed_DxV.shape[1]

    def step(carry, index):
        max_M, sumexp_M, label_logit_M, logit_sum_M, plogit_M, sumsq_M = carry
        _, _, logits_MxC, vocab_ids_C, fresh_C = _chunk_logits(
            hidden_MxD, unembed_DxV, index, chunk, softcap
        )
        masked_MxC = jnp.where(fresh_C[None, :], logits_MxC, -jnp.inf)
        # Online logsumexp: rescale the running sums to the new running max.
        new_max_M = jnp.maximum(max_M, masked_MxC.max(axis=-1))
        rescale_M = jnp.exp(max_M - new_max_M)
        exp_MxC = jnp.exp(masked_MxC - new_max_M[:, None])  # 0 on columns counted before
        sumexp_M = sumexp_M * rescale_M + exp_MxC.sum(axis=-1)
        # For the entropy (sum of e^(l-max) * l) and for sum p^2 (sum of e^(2(l-max))).
        plogit_M = plogit_M * rescale_M + (exp_MxC * jnp.where(fresh_C, logits_MxC, 0.0)).sum(-1)
        sumsq_M = sumsq_M * jnp.square(rescale_M) + jnp.square(exp_MxC).sum(axis=-1)
        is_label_MxC = (vocab_ids_C[None, :] == labels_M[:, None]) & fresh_C[None, :]
        label_logit_M += jnp.where(is_label_MxC, logits_MxC, 0.0).sum(axis=-1)
        logit_sum_M += jnp.where(fresh_C[None, :], logits_MxC, 0.0).sum(axis=-1)
        return (new_max_M, sumexp_M, label_logit_M, logit_sum_M, plogit_M, sumsq_M), None

    zeros_M = jnp.zeros((num_tokens,), _F32)
    init = (jnp.full((num_tokens,), -jnp.inf, _F32), *(zeros_M,) * 5)
    num_chunks = -(-vocab // chunk)
    (max_M, sumexp_M, label_logit_M, logit_sum_M, plogit_M, sumsq_M), _ = lax.scan(
        step, init, jnp.arange(num_chunks)
    )
    logsumexp_M = max_M + jnp.log(sumexp_M)
    entropy_M = logsumexp_M - plogit_M / sumexp_M  # -sum p (l - lse) = lse - sum p l
    top1_M = (label_logit_M >= max_M).astype(_F32)
    log_sum_sq_M = jnp.log(sumsq_M) - 2.0 * jnp.log(sumexp_M)  # log sum (e^(l-max) / s)^2
    outputs = (label_logit_M - logsumexp_M, logit_sum_M / vocab, entropy_M, top1_M, log_sum_sq_M)
    return outputs, (hidden_MxD, unembed_DxV, labels_M, logsumexp_M)


def _chunked_bwd(chunk, softcap, residuals, cotangents):
    hidden_MxD, unembed_DxV, labels_M, logsumexp_M = residuals
    # The TokenStats outputs are metrics (stop-gradient in chunked_token_stats): their
    # cotangents are dropped.
    dlogps_M, dmean_M = (c.astype(_F32) for c in cotangents[:2])
    vocab = unembed_DxV.shape[1]

    def step(carry, index):
        dhidden_MxD, dunembed_DxV = carry
        start, unembed_DxC, logits_MxC, vocab_ids_C, fresh_C = _chunk_logits(
            hidden_MxD, unembed_DxV, index, chunk, softcap
        )
        # d logp / d logits = onehot(label) - softmax;  d mean / d logits = 1 / V.
        probs_MxC = jnp.exp(logits_MxC - logsumexp_M[:, None])
        onehot_MxC = (vocab_ids_C[None, :] == labels_M[:, None]).astype(_F32)
        dlogits_MxC = dlogps_M[:, None] * (onehot_MxC - probs_MxC) + dmean_M[:, None] / vocab
        if softcap is not None:  # d/dz cap*tanh(z/cap) = 1 - tanh^2 = 1 - (logit/cap)^2
            dlogits_MxC *= 1.0 - jnp.square(logits_MxC / softcap)
        dlogits_MxC = jnp.where(fresh_C[None, :], dlogits_MxC, 0.0)
        dhidden_MxD += jnp.einsum(
            "MC,DC->MD",
            dlogits_MxC.astype(unembed_DxC.dtype),
            unembed_DxC,
            preferred_element_type=_F32,
        )
        dunembed_DxC = jnp.einsum(
            "MD,MC->DC",
            hidden_MxD,
            dlogits_MxC.astype(hidden_MxD.dtype),
            preferred_element_type=_F32,
        )
        # Add rather than overwrite: the slid-back last chunk overlaps the one before it
        # (its overlapping columns contribute exact zeros).
        old_DxC = lax.dynamic_slice_in_dim(dunembed_DxV, start, chunk, axis=1)
        new_DxC = (old_DxC.astype(_F32) + dunembed_DxC).astype(dunembed_DxV.dtype)
        dunembed_DxV = lax.dynamic_update_slice_in_dim(dunembed_DxV, new_DxC, start, axis=1)
        return (dhidden_MxD, dunembed_DxV), None

    init = (jnp.zeros(hidden_MxD.shape, _F32), jnp.zeros_like(unembed_DxV))
    num_chunks = -(-vocab // chunk)
    (dhidden_MxD, dunembed_DxV), _ = lax.scan(step, init, jnp.arange(num_chunks))
    return dhidden_MxD.astype(hidden_MxD.dtype), dunembed_DxV, None


_chunked_logps.defvjp(_chunked_fwd, _chunked_bwd)


def sequence_logps(
    token_logps_RxT: Array, loss_mask_RxT: Array, sequence_ids_RxT: Array, num_sequences: int
) -> tuple[Array, Array]:
    """(summed loss-token log-probs, loss-token count) per sequence id; both [S] float32.

    Padded rows (one sequence per row) and packed rows (several per row) are the same call.
    Masked tokens are dropped with `where`, so a -inf or NaN logp there cannot leak.
    """
    mask_RxT = loss_mask_RxT.astype(bool)
    values_RxT = jnp.where(mask_RxT, token_logps_RxT.astype(_F32), 0.0)
    ids_M = sequence_ids_RxT.reshape(-1)
    logps_S = jax.ops.segment_sum(values_RxT.reshape(-1), ids_M, num_segments=num_sequences)
    lengths_S = jax.ops.segment_sum(
        mask_RxT.astype(_F32).reshape(-1), ids_M, num_segments=num_sequences
    )
    return logps_S, lengths_S


def desensitized_logps(
    token_logps_RxT: Array,
    loss_mask_RxT: Array,
    sequence_ids_RxT: Array,
    lengths_S: Array,
    alpha: float,
    offsets_S: Array | None = None,
) -> Array:
    """LD-DPO (arXiv 2409.06411, TRL's ld_alpha): per sequence, the summed log-probs of its
    first min(len_w, len_l) completion tokens (both replies of pair p = sequences 2p, 2p+1)
    plus `alpha` times those of the rest, so a longer reply's tail weighs alpha. `lengths_S`
    are the completions' full lengths; `offsets_S`: completion tokens of a sequence that lie
    before its rows' own (the prefix-shared rejected reply's first token, computed apart;
    never in the tail, since the shared part is at least one token)."""
    num_sequences = lengths_S.shape[0]
    mask_RxT = loss_mask_RxT.astype(bool)
    ids_M = sequence_ids_RxT.reshape(-1)
    mask_M = mask_RxT.reshape(-1)
    # 1-based position of each completion token in its sequence: a running count per row,
    # less the count before the sequence's first token (sequences never span rows).
    count_M = jnp.cumsum(mask_RxT.astype(jnp.int32), axis=-1).reshape(-1)
    first_S = jax.ops.segment_min(
        jnp.where(mask_M, count_M, jnp.iinfo(jnp.int32).max), ids_M, num_segments=num_sequences
    )
    position_M = count_M - first_S[ids_M] + 1
    if offsets_S is not None:
        position_M = position_M + offsets_S.astype(jnp.int32)[ids_M]
    shared_P = jnp.minimum(lengths_S[0::2], lengths_S[1::2])
    shared_S = jnp.repeat(shared_P, 2)
    weight_M = jnp.where(position_M > shared_S[ids_M], alpha, 1.0)
    values_M = jnp.where(mask_M, token_logps_RxT.astype(_F32).reshape(-1) * weight_M, 0.0)
    return jax.ops.segment_sum(values_M, ids_M, num_segments=num_sequences)
