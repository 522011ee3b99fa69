"""The one boundary between config and code: the ConfigDict → frozen typed settings
conversion, raising each config error as one line (key, value, what is allowed). Only the
CLIs' main() and this module read a ConfigDict's keys; everything else takes the settings
below or plain values. The keys themselves, with their defaults, are dpo_jax.schema's.
"""

from __future__ import annotations

import dataclasses
import json
import math

import ml_collections

from dpo_jax import hf, losses, optim, quant
from dpo_jax.data import DataError, DataSettings
from dpo_jax.data import cache as data_cache
from dpo_jax.data.sources import parse_mapping, split_list
from dpo_jax.lora import TARGETS, LoraSettings
from dpo_jax.sharding import MeshError, mesh_rules
from dpo_jax.step import SFT_NORMALIZATIONS, LossConfig, RefSync, metric_names


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


# Errors caused by the user's config, data or files: the CLIs print them as one line.
USER_ERRORS = (ConfigError, DataError, hf.HFError, MeshError, MemoryError)


# ------------------------------------------------------------------------ the settings


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    name: str  # HF folder or hub id
    init: str  # pretrained | random
    max_length: int
    dtype: str
    param_dtype: str
    attention_impl: str | None  # None = XLA
    remat_policy: str
    # Sequences per packed row at most, when cuDNN's packed layout may use it (None = mask).
    max_segments_per_row: int | None
    lora: LoraSettings = LoraSettings()  # rank 0: full fine-tuning


@dataclasses.dataclass(frozen=True)
class BatchSettings:
    batch_size: int  # pairs per optimizer step
    accumulation_steps: int
    eval_batch_size: int  # pairs per eval batch
    prefetch: int  # host batches placed ahead of the step

    @property
    def micro_batch_rows(self) -> int:
        """Padded rows per micro-batch: chosen and rejected of each of its pairs."""
        return 2 * self.batch_size // self.accumulation_steps


@dataclasses.dataclass(frozen=True)
class MeshSettings:
    data: int
    fsdp: int
    tensor: int
    rules: tuple  # ((logical name, mesh axis | (axes…) | None), ...)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    seed: int  # init and data order
    num_epochs: int
    max_steps: int  # > 0 overrides num_epochs
    log_every: int
    eval_every: int  # 0 = only at the end
    checkpoint_every: int
    skip_nonfinite: bool  # training.nonfinite == "skip"

    def total_steps(self, steps_of_epochs) -> int:
        """max_steps, or the steps of num_epochs (`steps_of_epochs(n)` from the data)."""
        return self.max_steps if self.max_steps > 0 else steps_of_epochs(self.num_epochs)


@dataclasses.dataclass(frozen=True)
class KeepBest:
    metric: str  # an eval row's name, e.g. "eval/loss"
    mode: str  # "min" or "max"
    count: int


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
    max_to_keep: int
    async_save: bool
    export_hf: bool
    export_dtype: str
    keep_best: KeepBest | None  # None: only the latest are kept


@dataclasses.dataclass(frozen=True)
class LoggingSettings:
    tensorboard: bool
    wandb: bool
    wandb_project: str
    report: bool


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    prompts_file: str  # "" = no samples
    every_steps: int  # 0 = at the end only; -1 = never
    num_prompts: int  # -1 = all
    max_new_tokens: int
    temperature: float  # 0 = greedy
    top_k: int  # 0 = off
    top_p: float  # 1 = off
    seed: int
    checker: str  # "" = none


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    """optim.OptimConfig without the schedule length, which the data decides."""

    learning_rate: float
    warmup_steps: int
    schedule: str
    min_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    eps: float
    max_grad_norm: float
    state_dtype: str

    def for_steps(self, total_steps: int) -> optim.OptimConfig:
        return optim.OptimConfig(total_steps=total_steps, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Settings:
    model: ModelSettings
    loss: LossConfig
    optim: OptimSettings
    data: DataSettings
    tokenizer: str  # data.tokenizer or model.name
    batch: BatchSettings
    mesh: MeshSettings
    loop: LoopSettings
    checkpoint: CheckpointSettings
    logging: LoggingSettings
    samples: SampleSettings
    precompute_reference: bool  # reference log-probs computed once, not in the step
    resolved: dict  # the whole config as JSON values (config.json, checkpoints, W&B)
    ref_sync: RefSync | None = None  # TR-DPO

    @property
    def reference_on_device(self) -> bool:
        """Whether the step runs a reference forward: frozen reference weights next to the
        policy (with LoRA the base itself; with TR-DPO the state's reference)."""
        return self.loss.needs_reference and not self.precompute_reference


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """The benchmark's own keys (config.bench): the synthetic workload and its timing."""

    preset: str  # tiny | a dpo_jax.bench.PRESETS name
    lengths: str  # fixed | hh
    prompt_length: int  # fixed lengths only
    completion_length: int
    warmup_steps: int  # untimed steps after compilation
    steps: int  # timed steps (median reported)
    seed: int  # pair generator
    estimate_only: bool = False  # print the memory estimate from shapes; run nothing


def keep_best_settings(c, loss: LossConfig, data: DataSettings) -> KeepBest | None:
    """checkpoint.keep_best*: the metric must be one that every evaluation writes."""
    metric = str(_get(c, "keep_best", "") or "")
    if not metric:
        return None
    prefixes = [f"eval/{name}/" if name else "eval/" for name, _ in data.validation_sources]
    if not prefixes:
        raise ConfigError(
            f"config checkpoint.keep_best={metric!r}: needs held-out data to rank checkpoints "
            "by; set data.validation_file (or data.validation_files)"
        )
    names = [prefix + name for prefix in prefixes for name in metric_names(loss)]
    _check(metric in names, "checkpoint.keep_best", metric, f"one of {', '.join(names)}")
    mode = str(_get(c, "keep_best_mode", "auto"))
    _check(mode in ("auto", "min", "max"), "checkpoint.keep_best_mode", mode, "auto, min or max")
    if mode == "auto":
        mode = "min" if metric.endswith("loss") else "max"
    count = _number(c, "keep_best_count", "checkpoint.keep_best_count", int, 1)
    _check(count > 0, "checkpoint.keep_best_count", count, "at least 1 checkpoint")
    return KeepBest(metric, mode, count)


# ------------------------------------------------------------------------ conversion


def _check(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}={value!r}: {allowed}")


def _get(section, key: str, default=None):
    return section.get(key, default) if hasattr(section, "get") else default


def _number(section, name: str, key: str, cast, default=None):
    """section.<name> as `cast` (int or float), or a ConfigError naming the key."""
    if default is None and not (hasattr(section, "get") and name in section):
        raise _missing(key)
    value = _get(section, name, default)
    try:
        if cast is int and (isinstance(value, bool) or float(value) != int(value)):
            raise ValueError
        number = cast(value)
    except (TypeError, ValueError):
        kind = "an integer" if cast is int else "a number"
        raise ConfigError(f"config {key}={value!r}: expected {kind}") from None
    if cast is float and not math.isfinite(number):
        raise ConfigError(f"config {key}={value!r}: expected a finite number")
    return number


def as_tuple(value, cast):
    """Config lists may be given as a list or a comma-separated string (CLI overrides)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return tuple(cast(v) for v in value)


def packed_segments_bound(d) -> int | None:
    """The bound on sequences per packed row that cuDNN's packed layout relies on, or None
    (every other case: the mask). The packer enforces the same bound (data batching)."""
    bound = _number(d, "max_segments_per_row", "data.max_segments_per_row", int, 0)
    if bound == 0 or not _get(d, "packing", False) or _get(d, "prefix_sharing", False):
        return None
    _check(
        bound >= 2,
        "data.max_segments_per_row",
        bound,
        "use 0 (no bound) or at least 2; one sequence per row is padding (data.packing=False)",
    )
    return bound


def lora_settings(config) -> LoraSettings:
    """config.lora (absent in configs older than LoRA: full fine-tuning)."""
    section = _get(config, "lora", None)
    if section is None:
        return LoraSettings()
    rank = _number(section, "rank", "lora.rank", int, 0)
    _check(rank >= 0, "lora.rank", rank, "0 (full fine-tuning) or the adapters' rank, e.g. 8")
    alpha = _number(section, "alpha", "lora.alpha", float, 16.0)
    _check(alpha > 0, "lora.alpha", alpha, "a positive scale (the update is alpha / rank)")
    dropout = _number(section, "dropout", "lora.dropout", float, 0.0)
    _check(0.0 <= dropout < 1.0, "lora.dropout", dropout, "a rate in [0, 1)")
    targets = as_tuple(_get(section, "targets", ",".join(TARGETS)), str) or ()
    unknown = sorted(set(targets) - set(TARGETS))
    _check(
        bool(targets) and not unknown,
        "lora.targets",
        _get(section, "targets"),
        f"a comma-separated subset of {','.join(TARGETS)}",
    )
    quantization = str(_get(section, "quantization", "none"))
    _check(
        quantization in quant.QUANTIZATIONS,
        "lora.quantization",
        quantization,
        f"one of {', '.join(quant.QUANTIZATIONS)} (nf4: QLoRA's 4-bit base)",
    )
    _check(
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
    if not bool(_get(t, "sync_ref_model", False)):
        return None
    every = _number(t, "ref_model_sync_steps", "training.ref_model_sync_steps", int, 512)
    _check(every >= 1, "training.ref_model_sync_steps", every, "a positive number of steps")
    alpha = _number(t, "ref_model_mixup_alpha", "training.ref_model_mixup_alpha", float, 0.6)
    _check(0.0 < alpha <= 1.0, "training.ref_model_mixup_alpha", alpha, "a weight in (0, 1]")
    why = None
    if lora.enabled:
        why = (
            "with LoRA the reference is the frozen base itself (no copy to move); set "
            "lora.rank=0 for TR-DPO"
        )
    elif not loss.needs_reference:
        why = "the loss uses no reference model"
    elif bool(_get(t, "precompute_ref_log_probs", False)):
        why = (
            "precomputed reference log-probs are of a fixed reference; set "
            "training.precompute_ref_log_probs=False"
        )
    _check(why is None, "training.sync_ref_model", True, f"cannot be used: {why}")
    return RefSync(every=every, alpha=alpha)


def model_settings(config) -> ModelSettings:
    m = config.model
    remat = m.remat_policy
    if _get(config.training, "gradient_checkpointing", False) and remat == "none":
        remat = "full"
    _check(
        m.init in ("pretrained", "random"),
        "model.init",
        m.init,
        "use 'pretrained' (weights from model.name) or 'random' (fresh weights from training.seed)",
    )
    _check(
        _number(m, "max_length", "model.max_length", int) > 0,
        "model.max_length",
        m.max_length,
        "a positive number of tokens",
    )
    return ModelSettings(
        name=str(m.name),
        init=str(m.init),
        max_length=int(m.max_length),
        dtype=str(m.dtype),
        param_dtype=str(m.param_dtype),
        attention_impl=m.attention_impl or None,
        remat_policy=remat,
        max_segments_per_row=packed_segments_bound(config.data),
        lora=lora_settings(config),
    )


def loss_settings(config) -> LossConfig:
    t = config.training
    beta = _number(t, "beta", "training.beta", float)
    loss_types = as_tuple(t.loss_type, str) or ()
    _check(
        beta > 0 or set(loss_types) <= {"sft"},  # the NLL alone never reads beta
        "training.beta",
        beta,
        "a positive number (DPO's temperature, e.g. 0.1)",
    )
    chunk = _number(config.model, "logits_chunk_size", "model.logits_chunk_size", int)
    _check(chunk > 0, "model.logits_chunk_size", chunk, "a positive number of vocabulary rows")
    normalization = str(_get(t, "sft_normalization", "pair"))
    _check(
        normalization in SFT_NORMALIZATIONS,
        "training.sft_normalization",
        normalization,
        "use 'pair' (each pair's NLL, averaged over pairs) or 'batch_tokens' (TRL's: the NLL "
        "of every chosen token of the step over their count)",
    )
    divergence = str(_get(t, "f_divergence_type", "reverse_kl"))
    _check(
        divergence in losses.F_DIVERGENCES,
        "training.f_divergence_type",
        divergence,
        f"use one of {', '.join(losses.F_DIVERGENCES)}",
    )
    if divergence != "reverse_kl":
        off = sorted(set(as_tuple(t.loss_type, str) or ()) - losses.F_DIVERGENCE_LOSSES)
        _check(
            not off,
            "training.f_divergence_type",
            divergence,
            f"defined for the losses {', '.join(sorted(losses.F_DIVERGENCE_LOSSES))}, not "
            f"{', '.join(off)}; keep reverse_kl with those",
        )
    weighting = bool(_get(t, "use_weighting", False))
    sorted_losses = sorted({"aot", "aot_unpaired"} & set(as_tuple(t.loss_type, str) or ()))
    _check(
        not (weighting and sorted_losses),
        "training.use_weighting",
        weighting,
        f"WPO weights single pairs; {', '.join(sorted_losses)} compares the batch's sorted "
        "ratios: set it False",
    )
    ld_alpha = _number(t, "ld_alpha", "training.ld_alpha", float, 1.0)
    _check(0.0 <= ld_alpha <= 1.0, "training.ld_alpha", ld_alpha, "a weight in [0, 1] (1 = off)")
    return LossConfig(
        loss_type=as_tuple(t.loss_type, str),
        loss_weights=as_tuple(t.loss_weights, float),
        beta=beta,
        label_smoothing=_number(t, "label_smoothing", "training.label_smoothing", float),
        reference_free=bool(t.reference_free),
        preference_average_log_probs=bool(t.preference_average_log_probs),
        sft_average_log_probs=bool(t.sft_average_log_probs),
        preference_loss_weight=float(t.preference_loss_weight),
        sft_loss_weight=float(t.sft_loss_weight),
        sft_normalization=normalization,
        f_divergence=divergence,
        use_weighting=weighting,
        ld_alpha=ld_alpha,
        f_alpha_divergence_coef=_number(
            t, "f_alpha_divergence_coef", "training.f_alpha_divergence_coef", float, 1.0
        ),
        hparams=tuple(sorted((k, float(v)) for k, v in t.loss_hparams.items())),
        logits_chunk_size=chunk,
    )


def optim_settings(t) -> OptimSettings:
    number = lambda name, cast=float: _number(t, name, f"training.{name}", cast)  # noqa: E731
    lr = number("learning_rate")
    _check(lr >= 0, "training.learning_rate", lr, "a learning rate >= 0 (e.g. 1e-6)")
    warmup = number("warmup_steps", int)
    _check(warmup >= 0, "training.warmup_steps", warmup, "a number of steps >= 0")
    return OptimSettings(
        learning_rate=lr,
        warmup_steps=warmup,
        schedule=str(t.lr_schedule),
        min_lr_ratio=number("min_lr_ratio"),
        weight_decay=number("weight_decay"),
        b1=number("adam_b1"),
        b2=number("adam_b2"),
        eps=number("adam_eps"),
        max_grad_norm=number("max_grad_norm"),
        state_dtype=str(t.optimizer_state_dtype),
    )


def data_settings(d, model_max_length: int | None = None) -> DataSettings:
    """`config.data` (a ConfigDict or dict; keys it lacks take their defaults) → settings."""
    get = lambda key, default=None: _get(d, key, default)  # noqa: E731
    max_seq_length = _number(d, "max_seq_length", "data.max_seq_length", int)
    _check(max_seq_length > 0, "data.max_seq_length", max_seq_length, "a positive number")
    if model_max_length is not None and max_seq_length > model_max_length:
        raise DataError(  # what the data pipeline raised first; its tests expect it
            f"config data.max_seq_length={max_seq_length} exceeds model.max_length="
            f"{model_max_length}; lower one or raise the other"
        )
    validation = [("", spec) for spec in split_list(get("validation_file", ""))][:1]
    validation += list(parse_mapping(get("validation_files", ""), "data.validation_files").items())
    cache_dir = get("cache_dir", "")
    weights = tuple(float(w) for w in split_list(get("train_weights", "")))
    buckets = get("bucket_lengths", "")
    packed_rows = _number(d, "packed_rows", "data.packed_rows", int, 0)
    shared = bool(get("prefix_sharing", False))
    _check(
        packed_rows == 0 or packed_rows >= (1 if shared else 2),
        "data.packed_rows",
        packed_rows,
        "use 0 (sized from the data's lengths) or at least 2 rows (1 with data.prefix_sharing)",
    )
    return DataSettings(
        max_seq_length=max_seq_length,
        max_prompt_length=int(get("max_prompt_length") or 0) or None,
        apply_chat_template=bool(get("apply_chat_template", True)),
        train_sources=tuple(split_list(get("train_file", ""))),
        train_weights=weights,
        validation_sources=tuple(validation),
        format=str(get("format", "auto")),
        fields=tuple(parse_mapping(get("fields", ""), "data.fields").items()),
        roles=tuple(parse_mapping(get("roles", ""), "data.roles").items()),
        system_prompt=str(get("system_prompt", "") or ""),
        ranked_pairs=str(get("ranked_pairs", "best_worst")),
        ranked_ties=str(get("ranked_ties", "error")),
        truncation=str(get("truncation", "truncate")),
        on_error=str(get("on_error", "raise")),
        packing=bool(get("packing", False)),
        packed_rows=packed_rows,
        prefix_sharing=shared,
        max_segments_per_row=int(get("max_segments_per_row", 0)),
        bucket_lengths=buckets if isinstance(buckets, str) else tuple(buckets),
        shuffle=bool(get("shuffle", True)),
        num_proc=int(get("num_proc", 0)),
        cache_dir=None if cache_dir == "none" else (cache_dir or data_cache.default_cache_dir()),
    )


def batch_settings(config) -> BatchSettings:
    t = config.training
    size = _number(t, "batch_size", "training.batch_size", int)
    _check(size > 0, "training.batch_size", size, "a positive number of pairs per step")
    accumulation = _number(
        t, "gradient_accumulation_steps", "training.gradient_accumulation_steps", int
    )
    _check(
        accumulation > 0 and size % accumulation == 0,
        "training.gradient_accumulation_steps",
        accumulation,
        f"a positive divisor of training.batch_size={size}",
    )
    eval_size = _number(config.eval, "batch_size", "eval.batch_size", int)
    _check(eval_size > 0, "eval.batch_size", eval_size, "a positive number of pairs per batch")
    prefetch = _number(config.data, "prefetch", "data.prefetch", int, 0)
    _check(prefetch >= 0, "data.prefetch", prefetch, "0 (off) or a number of batches")
    return BatchSettings(size, accumulation, eval_size, prefetch)


def mesh_settings(m) -> MeshSettings:
    return MeshSettings(
        data=_number(m, "data", "mesh.data", int),
        fsdp=_number(m, "fsdp", "mesh.fsdp", int),
        tensor=_number(m, "tensor", "mesh.tensor", int),
        rules=mesh_rules(m.rules),
    )


def loop_settings(config) -> LoopSettings:
    t = config.training
    every = lambda section, key: _number(  # noqa: E731
        config[section], key, f"{section}.{key}", int
    )
    loop = LoopSettings(
        seed=_number(t, "seed", "training.seed", int),
        num_epochs=_number(t, "num_epochs", "training.num_epochs", int),
        max_steps=_number(t, "max_steps", "training.max_steps", int),
        log_every=every("logging", "every_steps"),
        eval_every=every("eval", "every_steps"),
        checkpoint_every=every("checkpoint", "every_steps"),
        skip_nonfinite=_get(t, "nonfinite", "stop") == "skip",
    )
    _check(
        _get(t, "nonfinite", "stop") in ("stop", "skip"),
        "training.nonfinite",
        _get(t, "nonfinite"),
        "stop (end the run at a non-finite step) or skip (count it and go on)",
    )
    _check(
        loop.max_steps > 0 or loop.num_epochs > 0,
        "training.num_epochs",
        loop.num_epochs,
        "a positive number of epochs (or set training.max_steps > 0)",
    )
    _check(loop.log_every > 0, "logging.every_steps", loop.log_every, "a positive number")
    _check(
        loop.checkpoint_every > 0,
        "checkpoint.every_steps",
        loop.checkpoint_every,
        "a positive number of steps",
    )
    return loop


def sample_settings(e) -> SampleSettings:
    return SampleSettings(
        prompts_file=str(e.sample_prompts_file or ""),
        every_steps=_number(e, "sample_every_steps", "eval.sample_every_steps", int),
        num_prompts=_number(e, "num_sample_prompts", "eval.num_sample_prompts", int),
        max_new_tokens=_number(e, "sample_max_new_tokens", "eval.sample_max_new_tokens", int),
        temperature=_number(e, "sample_temperature", "eval.sample_temperature", float),
        top_k=_number(e, "sample_top_k", "eval.sample_top_k", int),
        top_p=_number(e, "sample_top_p", "eval.sample_top_p", float),
        seed=_number(e, "sample_seed", "eval.sample_seed", int),
        checker=str(e.sample_checker or ""),
    )


def from_config(config) -> Settings:
    """Every section of a training config → Settings; the first bad value raises ConfigError
    (a missing key too: a config.json of an older version, or a hand-made config)."""
    try:
        return _from_config(config)
    except (AttributeError, KeyError) as error:
        raise _missing(str(error).split("\n")[0].strip("'\"")) from None


def _missing(key: str) -> ConfigError:
    return ConfigError(
        f"config has no key {key}: every key of dpo_jax/schema.py must be there (start the "
        "config from schema.default_config(); a run's config.json written by an older "
        "version needs the keys added since)"
    )


def _from_config(config) -> Settings:
    loss = loss_settings(config)
    c = config.checkpoint
    max_to_keep = _number(c, "max_to_keep", "checkpoint.max_to_keep", int)
    _check(max_to_keep > 0, "checkpoint.max_to_keep", max_to_keep, "at least 1 checkpoint")
    data = data_settings(config.data, int(config.model.max_length))
    model = model_settings(config)
    return Settings(
        model=model,
        loss=loss,
        optim=optim_settings(config.training),
        data=data,
        tokenizer=str(config.data.tokenizer or config.model.name),
        batch=batch_settings(config),
        mesh=mesh_settings(config.mesh),
        loop=loop_settings(config),
        checkpoint=CheckpointSettings(
            max_to_keep=max_to_keep,
            async_save=bool(c.async_save),
            export_hf=bool(c.export_hf),
            export_dtype=str(c.export_dtype),
            keep_best=keep_best_settings(c, loss, data),
        ),
        logging=LoggingSettings(
            tensorboard=bool(config.logging.tensorboard),
            wandb=bool(config.logging.wandb),
            wandb_project=str(config.logging.wandb_project),
            report=bool(config.logging.report),
        ),
        samples=sample_settings(config.eval),
        precompute_reference=loss.needs_reference
        and bool(config.training.precompute_ref_log_probs),
        resolved=resolved(config),
        ref_sync=ref_sync_settings(config, loss, model.lora),
    )


def resolved(config) -> dict:
    """The config as JSON values (what config.json and the checkpoints hold)."""
    return json.loads(config.to_json_best_effort())


def from_json(values: dict) -> ml_collections.ConfigDict:
    """A run's config.json (or a checkpoint's config) back to a ConfigDict."""
    return ml_collections.ConfigDict(values)


def bench_settings(config) -> BenchSettings:
    if "bench" not in config:
        raise ConfigError(
            "config has no bench section: run the benchmark with --config configs/bench.py"
            "[:preset] (training configs time nothing)"
        )
    b = config.bench
    number = lambda name: _number(b, name, f"bench.{name}", int)  # noqa: E731
    _check(b.lengths in ("fixed", "hh"), "bench.lengths", b.lengths, "choose fixed or hh")
    result = BenchSettings(
        preset=str(b.preset),
        lengths=str(b.lengths),
        prompt_length=number("prompt_length"),
        completion_length=number("completion_length"),
        warmup_steps=number("warmup_steps"),
        steps=number("steps"),
        seed=number("seed"),
        estimate_only=bool(_get(b, "estimate_only", False)),
    )
    _check(result.steps > 0, "bench.steps", result.steps, "at least 1 timed step")
    _check(result.warmup_steps >= 0, "bench.warmup_steps", result.warmup_steps, "0 or more")
    return result
