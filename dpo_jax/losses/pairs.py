"""Pair log-probs and the per-pair losses: `PairLogps` (chosen of pair p is sequence 2p,
rejected 2p+1), f-divergence scores, and one small pure function per loss in `LOSSES`, each
taking prepared PairLogps and keyword-only hyper-parameters and returning loss_P."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array
_F32 = jnp.float32
log_sigmoid = jax.nn.log_sigmoid


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
