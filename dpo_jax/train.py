"""DPO training entry point.

    python -m dpo_jax.train --config configs/tiny.py --workdir runs/tiny \
        [--config.training.beta=0.05 ...]

Re-running the same command resumes from the last checkpoint in --workdir.
Writes DIR/config.json, DIR/metrics.jsonl (one JSON object per log step; eval entries have
keys starting with "eval/"), DIR/data_report.json and DIR/checkpoints/.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from dpo_jax import (
    checkpoint,
    data,
    export,
    hf,
    memory,
    metrics_log,
    model,
    optim,
    prefetch,
    reference,
    samples,
    sharding,
    throughput,
)
from dpo_jax import report as html_report
from dpo_jax.data import cache as data_cache
from dpo_jax.step import (
    LossConfig,
    TrainState,
    eval_sums,
    finalize,
    sequence_stats,
    train_step,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when this module is the entry point (other entry
    points such as dpo_jax.bench and dpo_jax.evaluate import it as a library)."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


class ConfigError(ValueError):
    """A config value that cannot work, named by its key."""


# ----------------------------------------------------------------- typed settings


def as_tuple(value, cast):
    """Config lists may be given as a list or a comma-separated string (CLI overrides)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return tuple(cast(v) for v in value)


def loss_config_from(config) -> LossConfig:
    t = config.training
    return LossConfig(
        loss_type=as_tuple(t.loss_type, str),
        loss_weights=as_tuple(t.loss_weights, float),
        beta=float(t.beta),
        label_smoothing=float(t.label_smoothing),
        reference_free=bool(t.reference_free),
        preference_average_log_probs=bool(t.preference_average_log_probs),
        sft_average_log_probs=bool(t.sft_average_log_probs),
        preference_loss_weight=float(t.preference_loss_weight),
        sft_loss_weight=float(t.sft_loss_weight),
        hparams=tuple(sorted((k, float(v)) for k, v in t.loss_hparams.items())),
        logits_chunk_size=int(config.model.logits_chunk_size),
    )


def model_config_from(config) -> model.ModelConfig:
    m = config.model
    remat = m.remat_policy
    if config.training.gradient_checkpointing and remat == "none":
        remat = "full"
    return hf.read_model_config(
        m.name,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        attention_impl=m.attention_impl or None,
        remat_policy=remat,
        max_segments_per_row=packed_segments_bound(config.data),
    )


def packed_segments_bound(d) -> int | None:
    """The bound on sequences per packed row that cuDNN's packed layout relies on, or None
    (every other case: the mask). The packer enforces the same bound (data batching)."""
    bound = int(d.get("max_segments_per_row", 0))
    if bound == 0 or not d.get("packing", False) or d.get("prefix_sharing", False):
        return None
    if bound < 2:
        raise ConfigError(
            f"config data.max_segments_per_row={bound}: use 0 (no bound) or at least 2; one "
            "sequence per row is padding (data.packing=False)"
        )
    return bound


def build_optimizer(config, total_steps: int):
    t = config.training
    optim_config = optim.OptimConfig(
        learning_rate=t.learning_rate,
        total_steps=total_steps,
        warmup_steps=t.warmup_steps,
        schedule=t.lr_schedule,
        min_lr_ratio=t.min_lr_ratio,
        weight_decay=t.weight_decay,
        b1=t.adam_b1,
        b2=t.adam_b2,
        eps=t.adam_eps,
        max_grad_norm=t.max_grad_norm,
        state_dtype=t.optimizer_state_dtype,
    )
    return optim.make_optimizer(optim_config), optim.make_schedule(optim_config)


# ------------------------------------------------------------------ state set-up


def state_shardings(model_config, optimizer, mesh, rules):
    """NamedShardings of the whole TrainState, derived from the parameters' logical names
    (optax builds its moments with the same boxes, so they shard like their params)."""

    def boxed_state():
        params = model.init_params(model_config, jax.random.key(0))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    specs = nn.get_partition_spec(jax.eval_shape(boxed_state))
    return sharding.logical_shardings(specs, mesh, rules)


def init_state(config, model_config, optimizer, shardings):
    """A fresh TrainState placed straight into its shardings (never a full host copy):
    random weights from training.seed, or the weights of the HF folder model.name."""

    def build(params):
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    if config.model.init == "random":
        return jax.jit(
            lambda rng: build(nn.meta.unbox(model.init_params(model_config, rng))),
            out_shardings=shardings,
        )(jax.random.key(config.training.seed))
    if config.model.init == "pretrained":
        params = hf.load_params(config.model.name, model_config, shardings.params)
        return jax.jit(build, out_shardings=shardings, donate_argnums=0)(params)
    raise ConfigError(
        f"config model.init={config.model.init!r}: use 'pretrained' (weights from model.name) "
        "or 'random' (fresh weights from training.seed)"
    )


def make_sampler(config, workdir, model_config, tokenizer, data_config):
    """The generated-samples hook (None when eval.sample_prompts_file is empty)."""
    e = config.eval
    if not e.sample_prompts_file:
        return None
    prompts = samples.read_prompts(e.sample_prompts_file)
    if e.num_sample_prompts > 0:
        prompts = prompts[: e.num_sample_prompts]
    return samples.SampleWriter(
        workdir,
        model_config,
        tokenizer,
        prompts,
        samples.sampling_from(e),
        samples.load_checker(e.sample_checker),
        data_config.apply_chat_template,
    )


def check_memory(
    config, model_config, optimizer, shardings, mesh, reference_on_device, rows, row_length
) -> None:
    """Prints the per-device memory estimate; on an accelerator, stops before compiling
    when it cannot fit, naming the knobs that would make it fit."""

    def unboxed_state():
        params = nn.meta.unbox(model.init_params(model_config, jax.random.key(0)))
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params)
        )

    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(unboxed_state),
        shardings,
    )
    # Rows of one micro-batch as the iterator builds them (packed rows may be set apart
    # from the batch size; prefix-shared ones are twice as long).
    rows_per_device = max(1, rows // sharding.data_parallel_size(mesh))
    parts = memory.estimate(
        abstract,
        abstract.params if reference_on_device else None,
        model_config,
        tokens_per_device=rows_per_device * row_length,
        row_length=row_length,
        logits_chunk_size=int(config.model.logits_chunk_size),
    )
    if jax.process_index() == 0:
        print(f"memory per device (estimate): {memory.describe(parts)}", flush=True)
    memory.check_fits(parts, memory.device_limit_bytes(mesh.devices.flat[0]))


def copy_params(params, shardings):
    """Separate buffers for the frozen reference: the policy's are donated every step."""
    return jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)(params)


def reference_cache_dir(config, workdir: str) -> str:
    """Reference tables live in the tokenization cache (shared by runs on the same data and
    model), or in the workdir when data.cache_dir is "none"."""
    if config.data.cache_dir == "none":
        return os.path.join(workdir, "reference_logps")
    return os.path.join(config.data.cache_dir or data_cache.default_cache_dir(), "reference_logps")


def precompute_reference(
    config, workdir, model_config, loss_config, params, iterator, eval_sets, mesh
):
    """Reference log-probs of the training pairs and every eval set, from `params` (the
    initial policy, which is the reference); attached to the iterator's batches. Returns
    the eval tables by eval-set name."""
    # The weights are an argument, not a closure: closed-over arrays become constants.
    forward = jax.jit(
        lambda weights, batch: sequence_stats(
            model_config, weights, batch, loss_config.logits_chunk_size, padded_rows=True
        )[0],
        out_shardings=sharding.replicated(mesh),
    )
    batch_size = int(config.eval.batch_size)
    named = {"training data": iterator.pairs}
    named |= {
        f"eval set {name!r}" if name else "validation data": pairs
        for name, pairs in eval_sets.items()
    }
    tables = reference.precompute_tables(
        named,
        weights_fingerprint=reference.params_fingerprint(params, mesh),
        model_config=model_config,
        logps_fn=functools.partial(forward, params),
        batches=lambda pairs: iterator.eval_batches(pairs, batch_size),
        batch_size=batch_size,
        mesh=mesh,
        cache_dir=reference_cache_dir(config, workdir),
        log=lambda line: print(line, flush=True) if jax.process_index() == 0 else None,
    )
    iterator.reference_logps = tables.pop("training data")
    return dict(zip(eval_sets, tables.values(), strict=True))


# ---------------------------------------------------------------------- logging


class MetricsWriter:
    """DIR/metrics.jsonl plus a console line; written by process 0 only."""

    def __init__(self, workdir: str, total_steps: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.total_steps = total_steps
        self.enabled = jax.process_index() == 0
        self.sinks = None  # TensorBoard / W&B writers (metrics_log.MultiWriter)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)} | {k: float(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.sinks is not None:
            self.sinks.write(step, row)
        self.console(step, row)

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()

    def console(self, step: int, row: dict) -> None:
        if "loss" in row:
            print(
                f"step {step:5d}/{self.total_steps} | loss {row['loss']:.4f} | "
                f"acc {row['rewards/accuracies']:.3f} | margin {row['rewards/margins']:+.3f} | "
                f"lr {row['learning_rate']:.2e} | {row.get('tokens_per_sec', 0):,.0f} tok/s",
                flush=True,
            )
        else:
            shown = {
                k: round(v, 4)
                for k, v in row.items()
                if k.endswith(("/loss", "/rewards/accuracies", "/rewards/margins"))
            }
            print(f"eval  {step:5d} | {shown}", flush=True)


def truncate_logs_after(workdir: str, step: int) -> None:
    """On resume, drop log rows written after the checkpoint (they will be recomputed).
    Eval and sample rows of the checkpoint's own step stay: they ran before it was saved."""
    if jax.process_index() != 0:
        return
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(workdir, name)
        if not os.path.exists(path):
            continue

        def keep(row):
            return row["step"] < step or (row["step"] == step and "loss" not in row)

        with open(path, encoding="utf-8") as f:
            rows = [line for line in f if line.strip() and keep(json.loads(line))]
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(rows)


def device_memory_gb() -> float | None:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**30


# ----------------------------------------------------------------------- the loop


def run_eval(eval_step, params, ref_params, batches, *, mesh):
    """Means over every pair of `batches` (host eval batches of this process's rows)."""
    totals = None
    for batch in batches:
        sums = eval_step(params, ref_params, sharding.put_batch(batch, mesh, row_axis=0))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    metrics = jax.device_get(finalize(totals))
    del metrics["pairs"]
    return metrics


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    ref_params: object
    eval_metrics: dict  # the last evaluation (empty without a validation file)
    completed: bool  # False when stopped early by pre-emption


def train(config, workdir: str, devices=None) -> TrainResult:
    """Runs (or resumes) training as configured; `devices` defaults to all devices."""
    os.makedirs(workdir, exist_ok=True)
    t = config.training

    # --- mesh and typed settings
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    model_config = model_config_from(config)
    loss_config = loss_config_from(config)
    data_settings = data.settings_from_config(config.data, config.model.max_length)

    # --- data: each process builds only the rows its own devices hold
    tokenizer = hf.load_tokenizer(config.data.tokenizer or config.model.name)
    accumulation = int(t.gradient_accumulation_steps)
    sharding.check_batch_rows(
        2 * t.batch_size // accumulation,
        mesh,
        "config training.batch_size / gradient_accumulation_steps",
    )
    sharding.check_batch_rows(2 * config.eval.batch_size, mesh, "config eval.batch_size")
    built = data.build_data(
        data_settings,
        tokenizer,
        batch_size=t.batch_size,
        accumulation_steps=accumulation,
        seed=t.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    iterator, eval_sets = built.train, built.evals
    # Packed rows per micro-batch may be set apart from the batch size (data.packed_rows).
    sharding.check_batch_rows(iterator.rows, mesh, "rows per micro-batch (data.packed_rows)")
    if iterator.prefix_sharing:
        sharding.check_rows_process_major(mesh, iterator.rows)
    total_steps = t.max_steps if t.max_steps > 0 else iterator.total_steps(t.num_epochs)
    data_report = built.report | {"total_steps": total_steps}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "data_report.json"), "w") as f:
            json.dump(data_report, f, indent=2)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        print(f"data: {json.dumps(data_report)}", flush=True)
        print(
            f"model: {model.num_params(model_config):,} parameters; mesh {dict(mesh.shape)}; "
            f"{jax.device_count()} {jax.devices()[0].platform} devices",
            flush=True,
        )

    # --- optimizer, state, reference
    optimizer, schedule = build_optimizer(config, total_steps)
    shardings = state_shardings(model_config, optimizer, mesh, rules)
    precompute = loss_config.needs_reference and bool(t.precompute_ref_log_probs)
    reference_on_device = loss_config.needs_reference and not precompute
    check_memory(
        config,
        model_config,
        optimizer,
        shardings,
        mesh,
        reference_on_device,
        iterator.rows,
        iterator.pack_length,
    )
    state = init_state(config, model_config, optimizer, shardings)
    # Reference = the initial policy (also on resume: the checkpoint is restored below).
    # Either frozen copies of its weights (never donated, never in the optimizer), or its
    # log-probs computed once here and carried in the batches.
    ref_params = copy_params(state.params, shardings.params) if reference_on_device else None
    eval_reference = {}
    sampler = make_sampler(config, workdir, model_config, tokenizer, data_settings)
    if precompute:
        eval_reference = precompute_reference(
            config, workdir, model_config, loss_config, state.params, iterator, eval_sets, mesh
        )
        if sampler is not None:  # the reference's replies, while its weights are at hand
            sampler.sample_reference(state.params)

    ckpt = checkpoint.Checkpointer(
        workdir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
    )
    writer = MetricsWriter(workdir, total_steps)
    start_step = ckpt.latest_step()
    if start_step is not None:
        state, position = ckpt.restore(start_step, checkpoint.abstract_like(state))
        iterator.restore(position)
        truncate_logs_after(workdir, start_step)
        print(
            f"resumed from step {start_step} (data epoch {iterator.epoch}, batch {iterator.index})",
            flush=True,
        )
    else:
        start_step = 0
        if jax.process_index() == 0:
            open(writer.path, "w").close()
    if jax.process_count() == 1:  # the distributed runtime watches SIGTERM itself
        ckpt.watch_preemption()

    # --- compiled steps
    ref_shardings = shardings.params if ref_params is not None else None
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model_config=model_config,
            loss_config=loss_config,
            optimizer=optimizer,
            schedule=schedule,
            padded_rows=not iterator.packing,
        ),
        in_shardings=(shardings, ref_shardings, None),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(
            eval_sums, model_config=model_config, loss_config=loss_config, padded_rows=True
        )
    )
    config_json = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:
        writer.sinks = metrics_log.open_writers(
            workdir,
            tensorboard=config.logging.tensorboard,
            wandb=config.logging.wandb,
            wandb_project=config.logging.wandb_project,
            config=config_json,
            purge_step=start_step or None,
        )

    eval_metrics = {}

    def evaluate(step):
        if not eval_sets:
            return
        eval_metrics.clear()
        for name, pairs in eval_sets.items():
            metrics = run_eval(
                eval_fn,
                state.params,
                ref_params,
                iterator.eval_batches(pairs, config.eval.batch_size, eval_reference.get(name)),
                mesh=mesh,
            )
            prefix = f"eval/{name}/" if name else "eval/"
            eval_metrics.update({prefix + k: float(v) for k, v in metrics.items()})
        writer.write(step, eval_metrics)

    def sample(step):
        sample_metrics = sampler(step, state.params, ref_params)
        if sample_metrics:
            eval_metrics.update(sample_metrics)
            writer.write(step, sample_metrics)

    # --- the loop. Metrics of step s are fetched after step s+1 is dispatched, so the
    # host never waits for the device except at log, eval and checkpoint points; the next
    # batches are built and placed on a background thread meanwhile (data.prefetch).
    pending = None  # (step, device metrics, window totals, time of last log)
    window = np.zeros(3)  # real tokens, pairs, model FLOPs since the last log line
    window_start = time.perf_counter()
    peak, _ = throughput.peak_flops(mesh.devices.flat[0])

    def prepare(host_batch):
        # Only this process's rows are here; the slices of all processes are of equal size,
        # so tokens and FLOPs of the step are estimated as process_count times this
        # process's. Pair-level arrays (pair_mask) are whole on every process.
        rows = jax.process_count() * np.array(
            [
                throughput.batch_tokens(host_batch),
                throughput.batch_flops(model_config, host_batch, reference_on_device),
            ]
        )
        totals = np.array([rows[0], np.count_nonzero(host_batch["pair_mask"]), rows[1]])
        return sharding.put_batch(host_batch, mesh, row_axis=1), totals

    def flush(pending):
        step, metrics, totals, started = pending
        metrics = jax.device_get(metrics)
        elapsed = max(time.perf_counter() - started, 1e-9)
        del metrics["pairs"]
        # Since the previous log line (the first window includes compilation): non-padding
        # tokens and pairs per second, and model FLOPs utilisation of all devices.
        metrics["tokens_per_sec"] = totals[0] / elapsed
        metrics["pairs_per_sec"] = totals[1] / elapsed
        metrics["mfu"] = totals[2] / elapsed / (peak * mesh.devices.size)
        if (memory := device_memory_gb()) is not None:
            metrics["memory/peak_gb"] = memory
        writer.write(step, metrics)

    with prefetch.Prefetcher(iterator, prepare, depth=int(config.data.prefetch)) as batches:
        step = start_step
        while step < total_steps:
            (batch, totals), position = next(batches)
            window += totals
            state, metrics = step_fn(state, ref_params, batch)
            if pending is not None:
                flush(pending)
                pending = None
            if step % config.logging.every_steps == 0 or step == total_steps - 1:
                pending = (step, metrics, window, window_start)
                window, window_start = np.zeros(3), time.perf_counter()
            step += 1
            done = step == total_steps
            eval_every = config.eval.every_steps
            run_eval_now = done or (eval_every > 0 and step % eval_every == 0)
            stop = ckpt.should_stop(step)
            save_now = step % config.checkpoint.every_steps == 0 or done or stop
            if pending is not None and (run_eval_now or save_now):
                # Rows logged before a checkpoint must be on disk before it exists: a resumed
                # run recomputes only the steps after the checkpoint.
                flush(pending)
                pending = None
            if run_eval_now:
                evaluate(step)
            sample_every = config.eval.sample_every_steps
            if sampler is not None and (
                (done and sample_every >= 0) or (sample_every > 0 and step % sample_every == 0)
            ):
                sample(step)
            if save_now:
                ckpt.save(step, state, position, config_json)
            if stop:
                print(
                    f"pre-empted: saved step {step}; re-run the same command to resume", flush=True
                )
                break
    ckpt.wait()
    ckpt.close()
    if config.checkpoint.export_hf and step == total_steps:
        # Every process takes part (each holds shards); process 0 writes the files.
        out = os.path.join(workdir, "hf")
        export.write_hf(
            out,
            model_config,
            state.params,
            config.model.name,
            tokenizer=config.data.tokenizer or None,
            dtype=config.checkpoint.export_dtype,
        )
        if jax.process_index() == 0:
            print(f"exported: {out}", flush=True)
    writer.close()
    if jax.process_index() == 0 and config.logging.report:
        print(f"report: {html_report.write_report(workdir)}", flush=True)
    return TrainResult(state, ref_params, eval_metrics, completed=step == total_steps)


# Errors caused by the user's config or data: one clear line, no traceback.
USER_ERRORS = (ConfigError, data.DataError, hf.HFError, sharding.MeshError, MemoryError)


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's per-save INFO lines
    sharding.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    try:
        train(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
