"""One batch through the model to the loss: per-sequence log-probs and token statistics
(`sequence_stats`, vocabulary-chunked), the reference's (`reference_logps`), then the sums
over valid pairs of the loss and every metric (`pair_sums`), which `finalize` turns into the
step's global means. The loss's own settings are `LossConfig`. Pure functions: dpo_jax.step
differentiates, accumulates and compiles them.

Shape legend (dpo_jax/__init__.py): R rows, T tokens per row, S sequences (2 per pair),
P pairs, M tokens flattened, D model width, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dpo_jax import losses, model
from dpo_jax.losses import REFERENCE_FREE_LOSSES
from dpo_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class LossConfig:
    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    preference_average_log_probs: bool = False
    sft_average_log_probs: bool = True
    preference_loss_weight: float = 1.0
    sft_loss_weight: float = 0.0
    sft_normalization: str = "pair"  # pair | batch_tokens (see SFT_NORMALIZATIONS)
    f_divergence: str = "reverse_kl"  # losses.F_DIVERGENCES (f-DPO)
    f_alpha_divergence_coef: float = 1.0
    use_weighting: bool = False  # WPO: each pair's loss times its two sequences' weights
    ld_alpha: float = 1.0  # LD-DPO: weight of the longer reply's tail (1 = plain DPO)
    hparams: tuple[tuple[str, float], ...] = ()  # loss-specific: simpo_gamma, discopop_tau…
    logits_chunk_size: int = 4096  # vocabulary chunk of the log-prob; bounds logits memory

    @property
    def token_sft(self) -> bool:
        """The SFT term is normalised by the step's chosen tokens, not its pairs."""
        return self.sft_normalization == "batch_tokens" and self.sft_weight != 0.0

    @property
    def sft_weight(self) -> float:
        """The SFT term's total weight: sft_loss_weight plus the weights of "sft" entries."""
        weights = self.loss_weights or (1.0,) * len(self.loss_type)
        listed = sum(w for name, w in zip(self.loss_type, weights, strict=True) if name == "sft")
        return self.sft_loss_weight + listed

    @property
    def needs_reference(self) -> bool:
        return not self.reference_free and not set(self.loss_type) <= REFERENCE_FREE_LOSSES


# pair: each pair's SFT NLL averaged over pairs (NeMo RL); batch_tokens: TRL's token mean.
SFT_NORMALIZATIONS = ("pair", "batch_tokens")


def sequence_stats(
    model_config: ModelConfig,
    params,
    batch: dict,
    chunk_size: int,
    padded_rows: bool = False,
    ld_alpha: float = 1.0,
    dropout_rng=None,
):
    """Per-sequence summed completion log-probs, completion lengths, summed mean-logits and
    token-statistic sums {"entropy", "top1", "aligned"} over completion tokens ([S] each; see
    losses.TokenStats; "aligned" sums WPO's log p - log sum p^2). With `ld_alpha` < 1 the
    log-probs are LD-DPO's (losses.desensitized_logps).

    The log-prob is computed from the final hidden states one vocabulary chunk at a time,
    so the [R·T, V] logits never exist in memory. `padded_rows` promises one sequence per
    row from index 0 (padded batches), which lets attention take row lengths, not a mask.
    Prefix-shared batches (branch_ids) add one prediction per pair: the rejected reply's
    first token from the prompt's last position (extra_index, extra_label). `params` may
    be a model.Adapted LoRA policy; `dropout_rng` turns its adapter dropout on."""
    hidden_RxTxD = model.hidden_states(
        model_config,
        params,
        batch["tokens"],
        batch["positions"],
        batch["segment_ids"],
        branch_ids_BxT=batch.get("branch_ids"),
        padded_rows=padded_rows,
        dropout_rng=dropout_rng,
    )
    num_rows, row_length, width = hidden_RxTxD.shape
    hidden_MxD = hidden_RxTxD.reshape(num_rows * row_length, width)
    unembedding = model.unembedding(model_config, params)
    logps_M, mean_logits_M, stats_M = losses.chunked_token_stats(
        hidden_MxD,
        unembedding,
        batch["labels"].reshape(-1),
        chunk_size=chunk_size,
        logit_softcap=model_config.final_logit_softcap,
    )
    num_sequences = 2 * batch["pair_mask"].shape[-1]
    shape = (num_rows, row_length)

    def per_sequence(values_M):
        return losses.sequence_logps(
            values_M.reshape(shape), batch["loss_mask"], batch["sequence_ids"], num_sequences
        )[0]

    def token_values(logps, stats: losses.TokenStats) -> dict:
        """The per-token quantities whose sums per sequence token_sums_S holds."""
        aligned = jax.lax.stop_gradient(logps) - stats.log_sum_sq_probs
        return {"entropy": stats.entropy, "top1": stats.top1, "aligned": aligned}

    logps_S, lengths_S = losses.sequence_logps(
        logps_M.reshape(shape), batch["loss_mask"], batch["sequence_ids"], num_sequences
    )
    logit_sums_S = per_sequence(mean_logits_M)
    token_sums_S = {k: per_sequence(v) for k, v in token_values(logps_M, stats_M).items()}
    shared = "extra_index" in batch
    if shared:
        valid_P = batch["pair_mask"]
        lengths_S = lengths_S.at[1::2].add(valid_P.astype(lengths_S.dtype))
    if ld_alpha != 1.0:  # from the rows; a shared rejected reply's first token is apart
        offsets_S = jnp.zeros_like(lengths_S).at[1::2].set(1.0) if shared else None
        logps_S = losses.desensitized_logps(
            logps_M.reshape(shape),
            batch["loss_mask"],
            batch["sequence_ids"],
            lengths_S,
            ld_alpha,
            offsets_S,
        )
    if shared:
        extra_logps_P, extra_mean_logits_P, extra_stats_P = losses.chunked_token_stats(
            hidden_MxD[batch["extra_index"]],
            unembedding,
            batch["extra_label"],
            chunk_size=chunk_size,
            logit_softcap=model_config.final_logit_softcap,
        )
        add = lambda S, P: S.at[1::2].add(jnp.where(valid_P, P, 0.0))  # noqa: E731
        logps_S = add(logps_S, extra_logps_P)
        logit_sums_S = add(logit_sums_S, extra_mean_logits_P)
        extra_P = token_values(extra_logps_P, extra_stats_P)
        token_sums_S = {k: add(v, extra_P[k]) for k, v in token_sums_S.items()}
    return logps_S, lengths_S, jax.lax.stop_gradient(logit_sums_S), token_sums_S


def reference_logps(
    model_config: ModelConfig,
    ref_params,
    batch: dict,
    loss_config: LossConfig,
    padded_rows: bool = False,
):
    """Per-sequence reference log-probs [S]: None for reference-free losses; precomputed
    ones when the batch carries them (`ref_logps`, then `ref_params` is None); else a
    forward pass of the frozen reference."""
    if not loss_config.needs_reference:
        return None
    if "ref_logps" in batch:
        return batch["ref_logps"]
    logps_S = sequence_stats(
        model_config,
        ref_params,
        batch,
        loss_config.logits_chunk_size,
        padded_rows,
        loss_config.ld_alpha,
    )[0]
    return jax.lax.stop_gradient(logps_S)


def pair_sums(
    model_config: ModelConfig,
    loss_config: LossConfig,
    params,
    ref_logps_S,
    batch,
    padded_rows: bool = False,
    at_reference=None,
    dropout_rng=None,
):
    """(Σ loss over valid pairs, {metric: Σ over valid pairs, count/…: denominators}).

    `at_reference` (a traced bool): the policy still is the reference, so the reference
    log-probs are taken to be the policy's own. The reference forward (or table) is a
    different program that rounds an ulp apart; this makes the rewards exactly 0 there, as
    TRL reports them, instead of rounding noise counted as wins or losses."""
    policy_S, lengths_S, logit_sums_S, token_sums_S = sequence_stats(
        model_config,
        params,
        batch,
        loss_config.logits_chunk_size,
        padded_rows,
        loss_config.ld_alpha,
        dropout_rng,
    )
    if at_reference is not None and ref_logps_S is not None:
        ref_logps_S = jnp.where(at_reference, jax.lax.stop_gradient(policy_S), ref_logps_S)
    pair_logps = losses.PairLogps.from_sequences(policy_S, ref_logps_S, lengths_S)
    pair_mask_P = batch["pair_mask"]
    weights_P = None
    if loss_config.use_weighting:
        aligned_S = token_sums_S["aligned"]
        weights_P = losses.wpo_weights(
            aligned_S[0::2], aligned_S[1::2], lengths_S[0::2], lengths_S[1::2]
        )
    loss_P, metrics = _pair_losses(loss_config, pair_logps, pair_mask_P, weights_P)
    valid_P = pair_mask_P.astype(jnp.float32)
    sums = {name: jnp.sum(value * valid_P) for name, value in metrics.items()}
    sums["loss"] = jnp.sum(jnp.where(pair_mask_P, loss_P, 0.0))
    if loss_config.token_sft:
        # loss_P holds each pair's summed SFT NLL here (the metrics carry no gradient, so
        # both parts come from loss_P and the log-probs): "loss" keeps the preference part,
        # and the SFT part waits for the step's token count (finalize, train_step).
        sft_nll_P = jnp.where(pair_mask_P, -pair_logps.policy_chosen, 0.0)
        weighted_P = loss_config.sft_weight * sft_nll_P
        in_loss_P = weighted_P if weights_P is None else weights_P * weighted_P
        sums["loss"] = sums["loss"] - jnp.sum(in_loss_P)
        sums["count/sft_weighted_nll"] = jnp.sum(weighted_P)
    # TRL's logits/* are means over completion tokens (and the vocabulary) of the logits.
    sums["logits/chosen"] = jnp.sum(logit_sums_S[0::2] * valid_P)
    sums["logits/rejected"] = jnp.sum(logit_sums_S[1::2] * valid_P)
    # TRL's entropy (over all completion tokens) and mean_token_accuracy (chosen tokens):
    # sums that finalize divides by token counts, not pairs.
    sums["count/entropy_sum"] = jnp.sum(
        (token_sums_S["entropy"][0::2] + token_sums_S["entropy"][1::2]) * valid_P
    )
    sums["count/top1_sum"] = jnp.sum(token_sums_S["top1"][0::2] * valid_P)
    sums["count/pairs"] = jnp.sum(valid_P)
    sums["count/chosen_tokens"] = jnp.sum(lengths_S[0::2] * valid_P)
    sums["count/rejected_tokens"] = jnp.sum(lengths_S[1::2] * valid_P)
    return sums["loss"], sums


def _pair_losses(loss_config: LossConfig, pair_logps, pair_mask_P, pair_weights_P=None):
    """(per-pair loss, {metric: per-pair value}) of the configured loss."""
    return losses.preference_loss(
        loss_config.loss_type,
        pair_logps,
        beta=loss_config.beta,
        loss_weights=loss_config.loss_weights,
        label_smoothing=loss_config.label_smoothing,
        reference_free=loss_config.reference_free,
        preference_average_log_probs=loss_config.preference_average_log_probs,
        # Token-normalised SFT starts from each pair's summed NLL (pair_sums divides).
        sft_average_log_probs=loss_config.sft_average_log_probs and not loss_config.token_sft,
        preference_loss_weight=loss_config.preference_loss_weight,
        sft_loss_weight=loss_config.sft_loss_weight,
        pair_mask=pair_mask_P,
        pair_weights=pair_weights_P,
        f_divergence=loss_config.f_divergence,
        f_alpha_divergence_coef=loss_config.f_alpha_divergence_coef,
        **dict(loss_config.hparams),
    )


def metric_names(loss_config: LossConfig) -> tuple[str, ...]:
    """The names of the means finalize() gives for this loss (train rows; eval rows add
    "eval/"), found by tracing the loss on one dummy pair: nothing is computed, so a config
    can be checked against them before any model work."""
    one_pair = losses.PairLogps.from_sequences(-jnp.ones(2), -jnp.ones(2), jnp.ones(2))
    _, metrics = jax.eval_shape(
        lambda logps: _pair_losses(loss_config, logps, jnp.ones(1, bool)), one_pair
    )
    finalized = {"loss", "logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"}
    return tuple(sorted({*metrics, *finalized}))


def finalize(sums: dict) -> dict:
    """Sums over valid pairs → global means (the count/… denominators are dropped)."""
    pairs = jnp.maximum(sums["count/pairs"], 1.0)
    metrics = {k: v / pairs for k, v in sums.items() if not k.startswith(("count/", "logits/"))}
    if "count/sft_weighted_nll" in sums:  # sft_normalization="batch_tokens"
        tokens = jnp.maximum(sums["count/chosen_tokens"], 1.0)
        metrics["sft_loss"] = sums["sft_loss"] / tokens
        metrics["loss"] = metrics["loss"] + sums["count/sft_weighted_nll"] / tokens
    metrics["logits/chosen"] = sums["logits/chosen"] / jnp.maximum(sums["count/chosen_tokens"], 1.0)
    metrics["logits/rejected"] = sums["logits/rejected"] / jnp.maximum(
        sums["count/rejected_tokens"], 1.0
    )
    tokens = sums["count/chosen_tokens"] + sums["count/rejected_tokens"]
    metrics["entropy"] = sums["count/entropy_sum"] / jnp.maximum(tokens, 1.0)
    metrics["mean_token_accuracy"] = sums["count/top1_sum"] / jnp.maximum(
        sums["count/chosen_tokens"], 1.0
    )
    metrics["pairs"] = sums["count/pairs"]
    return metrics
