"""The one boundary between config and code: the ConfigDict → frozen typed settings
conversion, raising each config error as one line (key, value, what is allowed). Only the
CLIs' main() and this module read a ConfigDict's keys; everything else takes the settings
below or plain values. The keys themselves, with their defaults, are dpo_jax.schema's.
Here: the settings types and the sections they own; values.py reads one value (ConfigError),
objective.py the loss, LoRA, TR-DPO and keep-best keys, data_section.py config.data.
"""

from __future__ import annotations

import dataclasses
import json

import ml_collections

from dpo_jax import hf, optim
from dpo_jax.batch_loss import LossConfig
from dpo_jax.data import DataError, DataSettings
from dpo_jax.lora import LoraSettings
from dpo_jax.settings.data_section import data_settings, packed_segments_bound
from dpo_jax.settings.objective import (
    KeepBest,
    keep_best_settings,
    lora_settings,
    loss_settings,
    ref_sync_settings,
)
from dpo_jax.settings.values import ConfigError, as_tuple, check, get, missing_key, number
from dpo_jax.sharding import MeshError, mesh_rules
from dpo_jax.step import RefSync

# Imported from here by the rest of dpo_jax (and by tests): one name for each.
__all__ = [
    "USER_ERRORS",
    "BenchSettings",
    "ConfigError",
    "KeepBest",
    "ModelSettings",
    "SampleSettings",
    "Settings",
    "as_tuple",
    "bench_settings",
    "data_settings",
    "from_config",
    "from_json",
    "resolved",
]


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

    preset: str  # tiny | a dpo_jax.bench_workload.PRESETS name
    lengths: str  # fixed | hh
    prompt_length: int  # fixed lengths only
    completion_length: int
    warmup_steps: int  # untimed steps after compilation
    steps: int  # timed steps (median reported)
    seed: int  # pair generator
    estimate_only: bool = False  # print the memory estimate from shapes; run nothing


# ------------------------------------------------------------------------ conversion


def model_settings(config) -> ModelSettings:
    m = config.model
    remat = m.remat_policy
    if get(config.training, "gradient_checkpointing", False) and remat == "none":
        remat = "full"
    check(
        m.init in ("pretrained", "random"),
        "model.init",
        m.init,
        "use 'pretrained' (weights from model.name) or 'random' (fresh weights from training.seed)",
    )
    check(
        number(m, "max_length", "model.max_length", int) > 0,
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


def optim_settings(t) -> OptimSettings:
    field = lambda name, cast=float: number(t, name, f"training.{name}", cast)  # noqa: E731
    lr = field("learning_rate")
    check(lr >= 0, "training.learning_rate", lr, "a learning rate >= 0 (e.g. 1e-6)")
    warmup = field("warmup_steps", int)
    check(warmup >= 0, "training.warmup_steps", warmup, "a number of steps >= 0")
    return OptimSettings(
        learning_rate=lr,
        warmup_steps=warmup,
        schedule=str(t.lr_schedule),
        min_lr_ratio=field("min_lr_ratio"),
        weight_decay=field("weight_decay"),
        b1=field("adam_b1"),
        b2=field("adam_b2"),
        eps=field("adam_eps"),
        max_grad_norm=field("max_grad_norm"),
        state_dtype=str(t.optimizer_state_dtype),
    )


def batch_settings(config) -> BatchSettings:
    t = config.training
    size = number(t, "batch_size", "training.batch_size", int)
    check(size > 0, "training.batch_size", size, "a positive number of pairs per step")
    accumulation = number(
        t, "gradient_accumulation_steps", "training.gradient_accumulation_steps", int
    )
    check(
        accumulation > 0 and size % accumulation == 0,
        "training.gradient_accumulation_steps",
        accumulation,
        f"a positive divisor of training.batch_size={size}",
    )
    eval_size = number(config.eval, "batch_size", "eval.batch_size", int)
    check(eval_size > 0, "eval.batch_size", eval_size, "a positive number of pairs per batch")
    prefetch = number(config.data, "prefetch", "data.prefetch", int, 0)
    check(prefetch >= 0, "data.prefetch", prefetch, "0 (off) or a number of batches")
    return BatchSettings(size, accumulation, eval_size, prefetch)


def mesh_settings(m) -> MeshSettings:
    return MeshSettings(
        data=number(m, "data", "mesh.data", int),
        fsdp=number(m, "fsdp", "mesh.fsdp", int),
        tensor=number(m, "tensor", "mesh.tensor", int),
        rules=mesh_rules(m.rules),
    )


def loop_settings(config) -> LoopSettings:
    t = config.training
    every = lambda section, key: number(  # noqa: E731
        config[section], key, f"{section}.{key}", int
    )
    loop = LoopSettings(
        seed=number(t, "seed", "training.seed", int),
        num_epochs=number(t, "num_epochs", "training.num_epochs", int),
        max_steps=number(t, "max_steps", "training.max_steps", int),
        log_every=every("logging", "every_steps"),
        eval_every=every("eval", "every_steps"),
        checkpoint_every=every("checkpoint", "every_steps"),
        skip_nonfinite=get(t, "nonfinite", "stop") == "skip",
    )
    check(
        get(t, "nonfinite", "stop") in ("stop", "skip"),
        "training.nonfinite",
        get(t, "nonfinite"),
        "stop (end the run at a non-finite step) or skip (count it and go on)",
    )
    check(
        loop.max_steps > 0 or loop.num_epochs > 0,
        "training.num_epochs",
        loop.num_epochs,
        "a positive number of epochs (or set training.max_steps > 0)",
    )
    check(loop.log_every > 0, "logging.every_steps", loop.log_every, "a positive number")
    check(
        loop.checkpoint_every > 0,
        "checkpoint.every_steps",
        loop.checkpoint_every,
        "a positive number of steps",
    )
    return loop


def sample_settings(e) -> SampleSettings:
    return SampleSettings(
        prompts_file=str(e.sample_prompts_file or ""),
        every_steps=number(e, "sample_every_steps", "eval.sample_every_steps", int),
        num_prompts=number(e, "num_sample_prompts", "eval.num_sample_prompts", int),
        max_new_tokens=number(e, "sample_max_new_tokens", "eval.sample_max_new_tokens", int),
        temperature=number(e, "sample_temperature", "eval.sample_temperature", float),
        top_k=number(e, "sample_top_k", "eval.sample_top_k", int),
        top_p=number(e, "sample_top_p", "eval.sample_top_p", float),
        seed=number(e, "sample_seed", "eval.sample_seed", int),
        checker=str(e.sample_checker or ""),
    )


def from_config(config) -> Settings:
    """Every section of a training config → Settings; the first bad value raises ConfigError
    (a missing key too: a config.json of an older version, or a hand-made config)."""
    try:
        return _from_config(config)
    except (AttributeError, KeyError) as error:
        raise missing_key(str(error).split("\n")[0].strip("'\"")) from None


def _from_config(config) -> Settings:
    loss = loss_settings(config)
    c = config.checkpoint
    max_to_keep = number(c, "max_to_keep", "checkpoint.max_to_keep", int)
    check(max_to_keep > 0, "checkpoint.max_to_keep", max_to_keep, "at least 1 checkpoint")
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
    field = lambda name: number(b, name, f"bench.{name}", int)  # noqa: E731
    check(b.lengths in ("fixed", "hh"), "bench.lengths", b.lengths, "choose fixed or hh")
    result = BenchSettings(
        preset=str(b.preset),
        lengths=str(b.lengths),
        prompt_length=field("prompt_length"),
        completion_length=field("completion_length"),
        warmup_steps=field("warmup_steps"),
        steps=field("steps"),
        seed=field("seed"),
        estimate_only=bool(get(b, "estimate_only", False)),
    )
    check(result.steps > 0, "bench.steps", result.steps, "at least 1 timed step")
    check(result.warmup_steps >= 0, "bench.warmup_steps", result.warmup_steps, "0 or more")
    return result
