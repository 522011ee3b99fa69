"""The combined loss: `preference_loss` (every loss of LOSSES by name, weighted, plus the SFT
term, with TRL's rewards and metrics), WPO's pair weights and the masked mean."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from dpo_jax.losses.pairs import (
    AVERAGED_LOSSES,
    AVERAGED_REWARD_LOSSES,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCES,
    LOSSES,
    REFERENCE_FREE_LOSSES,
    PairLogps,
    _logratios_P,
    _valid,
    f_divergence_scores,
    sft_loss,
)

Array = jax.Array
_F32 = jnp.float32


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
