"""Preference-optimisation losses: pure functions of arrays (no model, no config, no I/O).

    from dpo_jax.losses import PairLogps, preference_loss, LOSSES, token_logps, sequence_logps

Log-probs flow token -> sequence -> pair: `token_logps` (or `chunked_token_logps`, which never
builds the [M, V] logits), `sequence_logps` (segment sum, padded and packed rows alike),
`PairLogps.from_sequences` (chosen of pair p is sequence 2p, rejected 2p+1), then
`preference_loss`, which returns per-pair losses and metrics; the caller divides by the global
count of valid pairs. Loss names and meanings follow Hugging Face TRL's `DPOConfig.loss_type`.

Shape suffixes (the package's one legend, dpo_jax/__init__.py): P pairs, S sequences (2 per
pair), R rows, T tokens per row, M tokens with the leading dims flattened, D model dim,
V vocab, C vocab chunk. A leading `x` (`logits_xV`) means any leading dims. Every reduction
runs in float32, whatever the input dtype.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
_F32 = jnp.float32
log_sigmoid = jax.nn.log_sigmoid

# Token and sequence log-probs ------------------------------------------------------------


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


# Pair log-probs --------------------------------------------------------------------------


class PairLogps(NamedTuple):
    """[B] summed completion log-probs and completion token counts of each pair."""

    policy_chosen: Array
    policy_rejected: Array
    reference_chosen: Array
    reference_rejected: Array
    chosen_lengths: Array
    rejected_lengths: Array

    @classmethod
    def from_sequences(
        cls, policy_S: Array, reference_S: Array | None, lengths_S: Array
    ) -> PairLogps:
        """Splits sequence 2p (chosen) / 2p+1 (rejected); no reference means zeros."""
        if reference_S is None:
            reference_S = jnp.zeros_like(policy_S)
        return cls(
            policy_S[0::2],
            policy_S[1::2],
            reference_S[0::2],
            reference_S[1::2],
            lengths_S[0::2],
            lengths_S[1::2],
        )

    def averaged(self) -> PairLogps:
        """Per-token averages (lengths kept); an empty completion counts as length 1."""
        len_w_P = jnp.maximum(self.chosen_lengths, 1.0)
        len_l_P = jnp.maximum(self.rejected_lengths, 1.0)
        return self._replace(
            policy_chosen=self.policy_chosen / len_w_P,
            policy_rejected=self.policy_rejected / len_l_P,
            reference_chosen=self.reference_chosen / len_w_P,
            reference_rejected=self.reference_rejected / len_l_P,
        )

    def without_reference(self) -> PairLogps:
        """Reference log-probs set to 0 (a uniform reference: the reference-free variants)."""
        zeros_P = jnp.zeros_like(self.policy_chosen)
        return self._replace(reference_chosen=zeros_P, reference_rejected=zeros_P)


def _margin_P(lp: PairLogps) -> Array:
    """z = (log pi_w - log pi_l) - (log ref_w - log ref_l)."""
    return (lp.policy_chosen - lp.policy_rejected) - (lp.reference_chosen - lp.reference_rejected)


def _logratios_P(lp: PairLogps) -> tuple[Array, Array]:
    """(log pi_w - log ref_w, log pi_l - log ref_l)."""
    return lp.policy_chosen - lp.reference_chosen, lp.policy_rejected - lp.reference_rejected


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The losses that read the policy/reference log-ratios through an f-divergence (TRL's list;
# sft ignores it).
F_DIVERGENCE_LOSSES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)


def f_divergence_scores(lp: PairLogps, kind: str, alpha: float = 1.0) -> PairLogps:
    """f-DPO (arXiv 2309.16240): each log-ratio a = log pi - log ref becomes f'(pi / ref),
    returned as PairLogps whose policy fields hold the scores and whose reference is 0, so
    every loss's margin becomes score_w - score_l. reverse_kl (DPO): a; forward_kl:
    1 - e^-a; js_divergence: log 2 + log sig(a); alpha_divergence: (e^((alpha-1) a) - 1) /
    (alpha - 1), the exponent capped at 80 (as TRL, so float32 stays finite), reverse_kl
    when |alpha - 1| < 1e-6."""
    if kind not in F_DIVERGENCES:
        raise ValueError(f"unknown f-divergence {kind!r}; valid: {F_DIVERGENCES}")
    a_w_P, a_l_P = _logratios_P(lp)
    if kind == "forward_kl":
        score = lambda a: 1.0 - jnp.exp(-a)  # noqa: E731
    elif kind == "js_divergence":
        score = lambda a: math.log(2.0) + log_sigmoid(a)  # noqa: E731
    elif kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        score = lambda a: jnp.expm1(jnp.minimum((alpha - 1.0) * a, 80.0)) / (alpha - 1.0)  # noqa: E731
    else:
        score = lambda a: a  # noqa: E731
    zeros_P = jnp.zeros_like(a_w_P)
    return lp._replace(
        policy_chosen=score(a_w_P),
        policy_rejected=score(a_l_P),
        reference_chosen=zeros_P,
        reference_rejected=zeros_P,
    )


def _smoothed_logistic_P(x_P: Array, label_smoothing: float) -> Array:
    """-(1-e) log sig(x) - e log sig(-x): logistic loss with labels flipped with probability e."""
    return -(1.0 - label_smoothing) * log_sigmoid(x_P) - label_smoothing * log_sigmoid(-x_P)


def _valid(pair_mask_P: Array | None, like_P: Array) -> Array:
    return jnp.ones(like_P.shape, bool) if pair_mask_P is None else pair_mask_P.astype(bool)


# Per-pair losses: each takes prepared PairLogps, keyword-only hparams, returns loss_P ------


def sigmoid_loss(lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_) -> Array:
    """DPO (arXiv 2305.18290): -log sig(b z); label smoothing e gives cDPO (arXiv 2305.18290's
    note), -(1-e) log sig(b z) - e log sig(-b z). TRL 1.16's sigmoid ignores label_smoothing
    (it smooths only robust, exo_pair, aot and aot_unpaired): with e = 0 the two agree."""
    return _smoothed_logistic_P(beta * _margin_P(lp), label_smoothing)


def robust_loss(lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_) -> Array:
    """rDPO (arXiv 2403.00409): [-(1-e) log sig(bz) + e log sig(-bz)] / (1 - 2e), e < 1/2."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    x_P = beta * _margin_P(lp)
    eps = label_smoothing
    return (-(1.0 - eps) * log_sigmoid(x_P) + eps * log_sigmoid(-x_P)) / (1.0 - 2.0 * eps)


def hinge_loss(lp: PairLogps, *, beta: float, **_) -> Array:
    """SLiC (arXiv 2305.10425): max(0, 1 - beta z)."""
    return jax.nn.relu(1.0 - beta * _margin_P(lp))


def ipo_loss(lp: PairLogps, *, beta: float, **_) -> Array:
    """IPO (arXiv 2310.12036, eq. 17): (z - 1/(2 beta))^2 on length-averaged log-probs."""
    return jnp.square(_margin_P(lp) - 0.5 / beta)


def exo_pair_loss(lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, **_) -> Array:
    """EXO (arXiv 2402.00856, eq. 16), reverse KL between sig(bz) and the smoothed label:

    sig(bz) [log sig(bz) - log(1-e)] + sig(-bz) [log sig(-bz) - log e], e = 1e-3 when 0 (as TRL).
    """
    eps = label_smoothing if label_smoothing != 0 else 1e-3
    x_P = beta * _margin_P(lp)
    agree_P = jax.nn.sigmoid(x_P) * (log_sigmoid(x_P) - math.log(1.0 - eps))
    return agree_P + jax.nn.sigmoid(-x_P) * (log_sigmoid(-x_P) - math.log(eps))


def nca_pair_loss(lp: PairLogps, *, beta: float, **_) -> Array:
    """NCA (arXiv 2402.05369): -log sig(r_w) - log sig(-r_w)/2 - log sig(-r_l)/2, r = b*logratio."""
    reward_w_P, reward_l_P = (beta * r_P for r_P in _logratios_P(lp))
    return -log_sigmoid(reward_w_P) - 0.5 * (log_sigmoid(-reward_w_P) + log_sigmoid(-reward_l_P))


def bco_pair_loss(lp: PairLogps, *, beta: float, bco_delta: float = 0.0, **_) -> Array:
    """BCO (arXiv 2404.04656) as TRL 1.16 has it: -log sig(r_w - delta) - log sig(-(r_l - delta)),
    r = beta * logratio, delta = `bco_delta` (0, TRL 1.16's: it dropped the running mean of
    the rewards older TRL kept). A fixed delta keeps the loss per pair, so accumulation and
    sharding give exactly the one-big-batch loss."""
    reward_w_P, reward_l_P = (beta * r_P for r_P in _logratios_P(lp))
    return -log_sigmoid(reward_w_P - bco_delta) - log_sigmoid(-(reward_l_P - bco_delta))


def sppo_hard_loss(lp: PairLogps, *, beta: float, **_) -> Array:
    """SPPO, hard labels (arXiv 2405.00675, eq. 4.7 with P = 1 for the winner, 0 for the loser):
    (a_w - 1/(2 beta))^2 + (a_l + 1/(2 beta))^2, a = logratio (not scaled by beta)."""
    logratio_w_P, logratio_l_P = _logratios_P(lp)
    return jnp.square(logratio_w_P - 0.5 / beta) + jnp.square(logratio_l_P + 0.5 / beta)


def _sorted_gap_P(a_P: Array, b_P: Array, pair_mask_P: Array | None) -> Array:
    """sort(a) - sort(b) over valid pairs; the k-th gap goes to the k-th valid pair, 0 elsewhere."""
    valid_P = _valid(pair_mask_P, a_P)
    # Invalid pairs sort to the end of both arrays, so valid ranks line up whatever they hold.
    fill = jnp.finfo(_F32).max
    gap_P = jnp.sort(jnp.where(valid_P, a_P, fill)) - jnp.sort(jnp.where(valid_P, b_P, fill))
    rank_P = jnp.maximum(jnp.cumsum(valid_P) - 1, 0)
    return jnp.where(valid_P, gap_P[rank_P], 0.0)


def aot_loss(
    lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, pair_mask=None, **_
) -> Array:
    """AOT paired (arXiv 2406.05882): smoothed -log sig(beta d) with
    d = sort_batch(log pi_w - log pi_l) - sort_batch(log ref_w - log ref_l).
    Entry k is the k-th rank's loss (sorting is per call: per micro-batch under accumulation)."""
    policy_P = lp.policy_chosen - lp.policy_rejected
    gap_P = _sorted_gap_P(policy_P, lp.reference_chosen - lp.reference_rejected, pair_mask)
    return jnp.where(
        _valid(pair_mask, gap_P), _smoothed_logistic_P(beta * gap_P, label_smoothing), 0
    )


def aot_unpaired_loss(
    lp: PairLogps, *, beta: float, label_smoothing: float = 0.0, pair_mask=None, **_
) -> Array:
    """AOT unpaired (arXiv 2406.05882): smoothed -log sig(beta d) with
    d = sort_batch(a_w) - sort_batch(a_l), a = logratio. Entry k is the k-th rank's loss."""
    gap_P = _sorted_gap_P(*_logratios_P(lp), pair_mask)
    return jnp.where(
        _valid(pair_mask, gap_P), _smoothed_logistic_P(beta * gap_P, label_smoothing), 0
    )


def apo_zero_loss(lp: PairLogps, *, beta: float, **_) -> Array:
    """APO-zero (arXiv 2408.06266, eq. 7): 1 - sig(beta a_w) + sig(beta a_l), a = logratio."""
    logratio_w_P, logratio_l_P = _logratios_P(lp)
    return 1.0 - jax.nn.sigmoid(beta * logratio_w_P) + jax.nn.sigmoid(beta * logratio_l_P)


def apo_down_loss(lp: PairLogps, *, beta: float, **_) -> Array:
    """APO-down (arXiv 2408.06266, eq. 8): sig(beta a_w) + 1 - sig(beta (a_w - a_l))."""
    logratio_w_P, logratio_l_P = _logratios_P(lp)
    return (
        jax.nn.sigmoid(beta * logratio_w_P)
        + 1.0
        - jax.nn.sigmoid(beta * (logratio_w_P - logratio_l_P))
    )


def discopop_loss(lp: PairLogps, *, beta: float, discopop_tau: float = 0.05, **_) -> Array:
    """DiscoPOP / LRML (arXiv 2406.08414, eq. 5), t = beta z, m = sig(t / tau):
    (1 - m) (-log sig(t)) + m exp(-t)."""
    t_P = beta * _margin_P(lp)
    # m * exp(-t) as exp(log m - t): exp(-t) alone overflows for t << 0, where m is ~0.
    exp_part_P = jnp.exp(log_sigmoid(t_P / discopop_tau) - t_P)
    return -jax.nn.sigmoid(-t_P / discopop_tau) * log_sigmoid(t_P) + exp_part_P


def sigmoid_norm_loss(lp: PairLogps, *, beta: float, **_) -> Array:
    """TRL's length-normalised DPO: -log sig(beta z) on per-token-averaged log-probs."""
    return -log_sigmoid(beta * _margin_P(lp))


def sft_loss(lp: PairLogps, *, sft_average_log_probs: bool = True, **_) -> Array:
    """NLL of the chosen completion: per token (TRL) or summed (NeMo RL's default).

    Per pair; TRL's batch value is a token mean over the batch, here a mean of pair means.
    """
    if sft_average_log_probs:
        return -lp.policy_chosen / jnp.maximum(lp.chosen_lengths, 1.0)
    return -lp.policy_chosen


def simpo_loss(
    lp: PairLogps, *, beta: float, simpo_gamma: float = 0.5, label_smoothing: float = 0.0, **_
) -> Array:
    """SimPO (arXiv 2405.14734): -log sig(beta (avg_w - avg_l) - gamma), smoothed as TRL's CPO."""
    x_P = beta * (lp.policy_chosen - lp.policy_rejected) - simpo_gamma
    return _smoothed_logistic_P(x_P, label_smoothing)


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    x = jnp.minimum(x, -1e-20)  # x = 0 (certainty) would give log 0
    near_zero = x > -math.log(2.0)
    # Each branch sees only inputs where it is finite, so where() never back-propagates a NaN.
    near_P = jnp.log(-jnp.expm1(jnp.where(near_zero, x, -1.0)))
    far_P = jnp.log1p(-jnp.exp(jnp.where(near_zero, -1.0, x)))
    return jnp.where(near_zero, near_P, far_P)


def orpo_loss(lp: PairLogps, *, beta: float, **_) -> Array:
    """ORPO (arXiv 2403.07691): -beta log sig(log_odds) - a_w, a = average log-prob,
    log_odds = (a_w - a_l) - (log(1 - e^a_w) - log(1 - e^a_l))."""
    avg_w_P, avg_l_P = lp.policy_chosen, lp.policy_rejected
    log_odds_P = (avg_w_P - avg_l_P) - (_log1mexp(avg_w_P) - _log1mexp(avg_l_P))
    return -beta * log_sigmoid(log_odds_P) - avg_w_P


LOSSES: dict[str, Callable[..., Array]] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "sft": sft_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
# preference_loss feeds these length-averaged log-probs whatever preference_average_log_probs.
AVERAGED_LOSSES = frozenset({"ipo", "simpo", "orpo", "sigmoid_norm"})
# ...and reports rewards of averaged log-probs only for these (TRL's CPO and ORPO trainers
# do; its DPO trainer reports summed ones for every loss, ipo and sigmoid_norm included).
AVERAGED_REWARD_LOSSES = frozenset({"simpo", "orpo"})
# ...and these never look at the reference (zero reference log-probs whatever
# reference_free; sft is the NLL of the chosen reply alone).
REFERENCE_FREE_LOSSES = frozenset({"simpo", "orpo", "sft"})


# The combined loss -----------------------------------------------------------------------


def wpo_weights(
    aligned_w_P: Array, aligned_l_P: Array, chosen_lengths_P: Array, rejected_lengths_P: Array
) -> Array:
    """WPO (arXiv 2406.11827, eq. 2, as TRL's use_weighting): each pair's weight
    exp(mean_t a_t(chosen)) * exp(mean_t a_t(rejected)), a_t = log p(y_t) - log sum_v p_v^2
    (the token's log-prob aligned to the policy's own sampling distribution), from the
    summed a_t of each completion (`aligned_*`); no gradient flows through it."""
    mean_w_P = aligned_w_P / jnp.maximum(chosen_lengths_P, 1.0)
    mean_l_P = aligned_l_P / jnp.maximum(rejected_lengths_P, 1.0)
    return lax.stop_gradient(jnp.exp(mean_w_P + mean_l_P))


def masked_mean(x_P: Array, mask_P: Array) -> Array:
    """sum(x * mask) / max(sum(mask), 1), in fp32."""
    mask_P = mask_P.astype(_F32)
    return jnp.sum(x_P.astype(_F32) * mask_P) / jnp.maximum(jnp.sum(mask_P), 1.0)


def _prepare(
    lp: PairLogps,
    *,
    average: bool,
    reference_free: bool,
    f_divergence: str = "reverse_kl",
    f_alpha: float = 1.0,
) -> PairLogps:
    """What a loss sees: reference-free, then the f-divergence's scores of the (summed)
    log-ratios, then per-token averages (TRL's order: ipo averages the scores)."""
    lp = lp.without_reference() if reference_free else lp
    if f_divergence != "reverse_kl":
        lp = f_divergence_scores(lp, f_divergence, f_alpha)
    return lp.averaged() if average else lp


def preference_loss(
    loss_type: str | Sequence[str],
    logps: PairLogps,
    *,
    beta: float,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    preference_average_log_probs: bool = False,
    sft_average_log_probs: bool = True,
    preference_loss_weight: float = 1.0,
    sft_loss_weight: float = 0.0,
    pair_mask: Array | None = None,
    pair_weights: Array | None = None,
    f_divergence: str = "reverse_kl",
    f_alpha_divergence_coef: float = 1.0,
    **hparams,
) -> tuple[Array, dict[str, Array]]:
    """Per-pair loss_P and per-pair float32 metrics (zero on pairs where pair_mask is False).

    loss = preference_loss_weight * sum_{i not sft} w_i L_i + sum_{i sft} w_i L_sft
           + sft_loss_weight * L_sft.
    Loss names are TRL's (see LOSSES). `preference_average_log_probs` (NeMo RL) averages log-probs
    per token for every preference loss; AVERAGED_LOSSES always average, REFERENCE_FREE_LOSSES
    never use the reference. Rewards mean what TRL's names mean: beta times the summed
    log-ratios, averaged only with `preference_average_log_probs` or when every preference
    loss is simpo / orpo, reference-free when all of them are. `f_divergence`
    (f_divergence_scores) changes what the F_DIVERGENCE_LOSSES see, not the rewards (as
    TRL). `pair_weights` (e.g. wpo_weights) multiply every term of each pair's loss (TRL's
    use_weighting; TRL's SFT term is one batch value, which it scales by the weights' mean).
    Extra hparams: bco_delta, discopop_tau, simpo_gamma.
    Loss names and hparams are Python values (static under jit).
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    unknown = [name for name in names if name not in LOSSES]
    if not names or unknown:
        raise ValueError(f"unknown loss_type {unknown or names}; valid: {sorted(LOSSES)}")
    weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} loss types")
    accepted = {
        p.name
        for fn in LOSSES.values()
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY
    }
    if bad := sorted(set(hparams) - accepted):
        raise ValueError(f"unknown loss hyper-parameters {bad}; valid: {sorted(accepted)}")
    if f_divergence not in F_DIVERGENCES:
        raise ValueError(f"unknown f_divergence {f_divergence!r}; valid: {F_DIVERGENCES}")
    if f_divergence != "reverse_kl" and (off := sorted(set(names) - F_DIVERGENCE_LOSSES)):
        raise ValueError(
            f"f_divergence={f_divergence!r} is defined for {sorted(F_DIVERGENCE_LOSSES)}, "
            f"not {off}; use reverse_kl with these losses"
        )

    logps = PairLogps(*(jnp.asarray(x).astype(_F32) for x in logps))
    valid_P = _valid(pair_mask, logps.policy_chosen)
    hparams = dict(hparams, beta=beta, label_smoothing=label_smoothing, pair_mask=valid_P)

    sft_P = sft_loss(logps, sft_average_log_probs=sft_average_log_probs)
    preference_P = jnp.zeros_like(logps.policy_chosen)
    weighted_sft_P = jnp.zeros_like(logps.policy_chosen)
    for name, weight in zip(names, weights, strict=True):
        if name == "sft":
            weighted_sft_P += weight * sft_P
            continue
        prepared = _prepare(
            logps,
            average=preference_average_log_probs or name in AVERAGED_LOSSES,
            reference_free=reference_free or name in REFERENCE_FREE_LOSSES,
            f_divergence=f_divergence,
            f_alpha=f_alpha_divergence_coef,
        )
        preference_P += weight * LOSSES[name](prepared, **hparams)
    preference_P *= preference_loss_weight
    loss_P = preference_P + weighted_sft_P + sft_loss_weight * sft_P
    if pair_weights is not None:
        pair_weights = lax.stop_gradient(jnp.asarray(pair_weights, _F32))
        preference_P, loss_P = preference_P * pair_weights, loss_P * pair_weights

    preference_names = [name for name in names if name != "sft"]
    rewarded = _prepare(
        logps,
        average=preference_average_log_probs
        or (bool(preference_names) and all(n in AVERAGED_REWARD_LOSSES for n in preference_names)),
        reference_free=reference_free
        or (bool(preference_names) and all(n in REFERENCE_FREE_LOSSES for n in preference_names)),
    )
    reward_w_P, reward_l_P = (beta * r for r in _logratios_P(rewarded))
    metrics = {
        "rewards/chosen": reward_w_P,
        "rewards/rejected": reward_l_P,
        "rewards/margins": reward_w_P - reward_l_P,
        "rewards/accuracies": (reward_w_P > reward_l_P).astype(_F32),
        "logps/chosen": logps.policy_chosen,
        "logps/rejected": logps.policy_rejected,
        "preference_loss": preference_P,
        "sft_loss": sft_P,
    }
    # where, not multiply: an inf/NaN in a padding pair must not reach the caller's sums.
    metrics = {k: lax.stop_gradient(jnp.where(valid_P, v, 0.0)) for k, v in metrics.items()}
    return jnp.where(valid_P, loss_P, 0.0), metrics
