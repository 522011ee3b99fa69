"""What is optimised: config.training's loss keys → LossConfig, config.lora → LoraSettings,
TR-DPO's reference sync, and the metric that ranks checkpoints (checkpoint.keep_best*)."""

from __future__ import annotations

import dataclasses

from dpo_jax import losses, quant
from dpo_jax.batch_loss import SFT_NORMALIZATIONS, LossConfig, metric_names
from dpo_jax.data import DataSettings
from dpo_jax.lora import TARGETS, LoraSettings
from dpo_jax.settings.values import ConfigError, as_tuple, check, get, number
from dpo_jax.step import RefSync


@dataclasses.dataclass(frozen=True)
class KeepBest:
    metric: str  # an eval row's name, e.g. "eval/loss"
    mode: str  # "min" or "max"
    count: int


def keep_best_settings(c, loss: LossConfig, data: DataSettings) -> KeepBest | None:
    """checkpoint.keep_best*: the metric must be one that every evaluation writes."""
    metric = str(get(c, "keep_best", "") or "")
    if not metric:
        return None
    prefixes = [f"eval/{name}/" if name else "eval/" for name, _ in data.validation_sources]
    if not prefixes:
        raise ConfigError(
            f"config checkpoint.keep_best={metric!r}: needs held-out data to rank checkpoints "
            "by; set data.validation_file (or data.validation_files)"
        )
    names = [prefix + name for prefix in prefixes for name in metric_names(loss)]
    check(metric in names, "checkpoint.keep_best", metric, f"one of {', '.join(names)}")
    mode = str(get(c, "keep_best_mode", "auto"))
    check(mode in ("auto", "min", "max"), "checkpoint.keep_best_mode", mode, "auto, min or max")
    if mode == "auto":
        mode = "min" if metric.endswith("loss") else "max"
    count = number(c, "keep_best_count", "checkpoint.keep_best_count", int, 1)
    check(count > 0, "checkpoint.keep_best_count", count, "at least 1 checkpoint")
    return KeepBest(metric, mode, count)


def lora_settings(config) -> LoraSettings:
    """config.lora (absent in configs older than LoRA: full fine-tuning)."""
    section = get(config, "lora", None)
    if section is None:
        return LoraSettings()
    rank = number(section, "rank", "lora.rank", int, 0)
    check(rank >= 0, "lora.rank", rank, "0 (full fine-tuning) or the adapters' rank, e.g. 8")
    alpha = number(section, "alpha", "lora.alpha", float, 16.0)
    check(alpha > 0, "lora.alpha", alpha, "a positive scale (the update is alpha / rank)")
    dropout = number(section, "dropout", "lora.dropout", float, 0.0)
    check(0.0 <= dropout < 1.0, "lora.dropout", dropout, "a rate in [0, 1)")
    targets = as_tuple(get(section, "targets", ",".join(TARGETS)), str) or ()
    unknown = sorted(set(targets) - set(TARGETS))
    check(
        bool(targets) and not unknown,
        "lora.targets",
        get(section, "targets"),
        f"a comma-separated subset of {','.join(TARGETS)}",
    )
    quantization = str(get(section, "quantization", "none"))
    check(
        quantization in quant.QUANTIZATIONS,
        "lora.quantization",
        quantization,
        f"one of {', '.join(quant.QUANTIZATIONS)} (nf4: QLoRA's 4-bit base)",
    )
    check(
        quantization == "none" or rank > 0,
        "lora.quantization",
        quantization,
        "quantizes the frozen base of LoRA; set lora.rank > 0 (full fine-tuning trains every "
        "weight) or keep none",
    )
    ordered = tuple(name for name in TARGETS if name in targets)
    return LoraSettings(rank, alpha, dropout, ordered, quantization)


def ref_sync_settings(config, loss: LossConfig, lora: LoraSettings) -> RefSync | None:
    """training.sync_ref_model and its two numbers (TR-DPO), or None."""
    t = config.training
    if not bool(get(t, "sync_ref_model", False)):
        return None
    every = number(t, "ref_model_sync_steps", "training.ref_model_sync_steps", int, 512)
    check(every >= 1, "training.ref_model_sync_steps", every, "a positive number of steps")
    alpha = number(t, "ref_model_mixup_alpha", "training.ref_model_mixup_alpha", float, 0.6)
    check(0.0 < alpha <= 1.0, "training.ref_model_mixup_alpha", alpha, "a weight in (0, 1]")
    why = None
    if lora.enabled:
        why = (
            "with LoRA the reference is the frozen base itself (no copy to move); set "
            "lora.rank=0 for TR-DPO"
        )
    elif not loss.needs_reference:
        why = "the loss uses no reference model"
    elif bool(get(t, "precompute_ref_log_probs", False)):
        why = (
            "precomputed reference log-probs are of a fixed reference; set "
            "training.precompute_ref_log_probs=False"
        )
    check(why is None, "training.sync_ref_model", True, f"cannot be used: {why}")
    return RefSync(every=every, alpha=alpha)


def loss_settings(config) -> LossConfig:
    t = config.training
    beta = number(t, "beta", "training.beta", float)
    loss_types = as_tuple(t.loss_type, str) or ()
    check(
        beta > 0 or set(loss_types) <= {"sft"},  # the NLL alone never reads beta
        "training.beta",
        beta,
        "a positive number (DPO's temperature, e.g. 0.1)",
    )
    chunk = number(config.model, "logits_chunk_size", "model.logits_chunk_size", int)
    check(chunk > 0, "model.logits_chunk_size", chunk, "a positive number of vocabulary rows")
    normalization = str(get(t, "sft_normalization", "pair"))
    check(
        normalization in SFT_NORMALIZATIONS,
        "training.sft_normalization",
        normalization,
        "use 'pair' (each pair's NLL, averaged over pairs) or 'batch_tokens' (TRL's: the NLL "
        "of every chosen token of the step over their count)",
    )
    divergence = str(get(t, "f_divergence_type", "reverse_kl"))
    check(
        divergence in losses.F_DIVERGENCES,
        "training.f_divergence_type",
        divergence,
        f"use one of {', '.join(losses.F_DIVERGENCES)}",
    )
    if divergence != "reverse_kl":
        off = sorted(set(as_tuple(t.loss_type, str) or ()) - losses.F_DIVERGENCE_LOSSES)
        check(
            not off,
            "training.f_divergence_type",
            divergence,
            f"defined for the losses {', '.join(sorted(losses.F_DIVERGENCE_LOSSES))}, not "
            f"{', '.join(off)}; keep reverse_kl with those",
        )
    weighting = bool(get(t, "use_weighting", False))
    sorted_losses = sorted({"aot", "aot_unpaired"} & set(as_tuple(t.loss_type, str) or ()))
    check(
        not (weighting and sorted_losses),
        "training.use_weighting",
        weighting,
        f"WPO weights single pairs; {', '.join(sorted_losses)} compares the batch's sorted "
        "ratios: set it False",
    )
    ld_alpha = number(t, "ld_alpha", "training.ld_alpha", float, 1.0)
    check(0.0 <= ld_alpha <= 1.0, "training.ld_alpha", ld_alpha, "a weight in [0, 1] (1 = off)")
    return LossConfig(
        loss_type=as_tuple(t.loss_type, str),
        loss_weights=as_tuple(t.loss_weights, float),
        beta=beta,
        label_smoothing=number(t, "label_smoothing", "training.label_smoothing", float),
        reference_free=bool(t.reference_free),
        preference_average_log_probs=bool(t.preference_average_log_probs),
        sft_average_log_probs=bool(t.sft_average_log_probs),
        preference_loss_weight=float(t.preference_loss_weight),
        sft_loss_weight=float(t.sft_loss_weight),
        sft_normalization=normalization,
        f_divergence=divergence,
        use_weighting=weighting,
        ld_alpha=ld_alpha,
        f_alpha_divergence_coef=number(
            t, "f_alpha_divergence_coef", "training.f_alpha_divergence_coef", float, 1.0
        ),
        hparams=tuple(sorted((k, float(v)) for k, v in t.loss_hparams.items())),
        logits_chunk_size=chunk,
    )
