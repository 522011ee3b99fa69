"""DPO training entry point and loop.

    python -m dpo_jax.train --config configs/tiny.py --workdir runs/tiny \
        [--config.training.beta=0.05 ...]

Re-running the same command resumes from the last checkpoint in --workdir. Writes
DIR/config.json, DIR/metrics.jsonl (a JSON object per log step; eval keys start "eval/"),
DIR/data_report.json and DIR/checkpoints/. settings → mesh → data → state and reference →
compiled steps → the loop (eval, samples, checkpoints) → export and report: each phase's
machinery lives in its own module; this one only orders them.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from absl import app, flags
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from dpo_jax import (
    checkpoint,
    cli,
    data,
    evaluate,
    export,
    faults,
    hf,
    lora,
    memory,
    metrics_log,
    model,
    optim,
    prefetch,
    reference,
    resume,
    samples,
    settings,
    sharding,
    state,
    throughput,
)
from dpo_jax import report as html_report
from dpo_jax.settings import Settings
from dpo_jax.step import (
    NonFiniteError,
    TrainState,
    jit_eval_sums,
    jit_reference_logps,
    jit_train_step,
)

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags, defined only when this module is the entry point."""
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
    flags.DEFINE_list(
        "allow_changed", [], "Config keys a resume may change (e.g. training.max_steps)."
    )


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    ref_params: object
    eval_metrics: dict  # the last evaluation (empty without a validation file)
    completed: bool  # False when stopped early by pre-emption
    stop_signal: int | None = None  # what stopped it early (SIGTERM, SIGINT)


def train(config, workdir: str, devices=None, allow_changed=()) -> TrainResult:
    """Runs (or resumes) training as `config` (a ConfigDict) says; `devices`: all by default."""
    return run(settings.from_config(config), workdir, devices, tuple(allow_changed))


def run(s: Settings, workdir: str, devices=None, allow_changed: tuple = ()) -> TrainResult:
    """Runs (or resumes) training with typed settings; one run per workdir at a time."""
    os.makedirs(workdir, exist_ok=True)
    lock = checkpoint.WorkdirLock(workdir) if jax.process_index() == 0 else None
    try:
        return _run(s, workdir, devices, allow_changed)
    finally:
        if lock is not None:
            lock.release()


def _run(s: Settings, workdir: str, devices, allow_changed: tuple) -> TrainResult:
    lead = jax.process_index() == 0
    ckpt = checkpoint.Checkpointer(
        workdir,
        max_to_keep=s.checkpoint.max_to_keep,
        async_save=s.checkpoint.async_save,
        keep_best=s.checkpoint.keep_best,
    )
    # A resume continues the run its checkpoints belong to: a changed config is refused
    # before anything (config.json included) is written.
    if (saved := ckpt.latest_config()) is not None:
        changes = resume.changes(saved, s.resolved, allow_changed)
        if changes and lead:
            print(f"resuming with config changes: {'; '.join(changes)}", flush=True)

    # --- mesh and model
    mesh = sharding.make_mesh(s.mesh.data, s.mesh.fsdp, s.mesh.tensor, devices)
    model_config = state.model_config(s.model)

    # --- data: each process builds only the rows its own devices hold
    tokenizer = hf.load_tokenizer(s.tokenizer)
    rows_key = "config training.batch_size / gradient_accumulation_steps"
    sharding.check_batch_rows(s.batch.micro_batch_rows, mesh, rows_key)
    sharding.check_batch_rows(2 * s.batch.eval_batch_size, mesh, "config eval.batch_size")
    built = data.build_data(
        s.data,
        tokenizer,
        batch_size=s.batch.batch_size,
        accumulation_steps=s.batch.accumulation_steps,
        seed=s.loop.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        row_multiple=sharding.data_parallel_size(mesh),
        barrier=lambda: multihost_utils.sync_global_devices("dpo_jax tokenized data"),
    )
    iterator, eval_sets = built.train, built.evals
    # Packed rows per micro-batch are sized from the data, or set by data.packed_rows.
    sharding.check_batch_rows(iterator.rows, mesh, "config data.packed_rows")
    if iterator.prefix_sharing:
        sharding.check_rows_process_major(mesh, iterator.rows)
    total_steps = s.loop.total_steps(iterator.total_steps)
    data_report = built.report | {"total_steps": total_steps}
    if lead:
        with open(os.path.join(workdir, "data_report.json"), "w") as f:
            json.dump(data_report, f, indent=2)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(s.resolved, f, indent=2)
        print(f"data: {json.dumps(data_report)}", flush=True)
        print(data.summary(data_report), flush=True)
        print(
            f"model: {model.num_params(model_config):,} parameters; mesh {dict(mesh.shape)}; "
            f"{jax.device_count()} {jax.devices()[0].platform} devices",
            flush=True,
        )

    # --- optimizer, state, reference
    optim_config = s.optim.for_steps(total_steps)
    optimizer, schedule = optim.make_optimizer(optim_config), optim.make_schedule(optim_config)
    adapters = s.model.lora.enabled
    shardings = state.state_shardings(
        model_config, optimizer, mesh, s.mesh.rules, with_reference=s.ref_sync is not None
    )
    # What the step reads but never updates: the LoRA base (policy and reference both), or
    # the frozen reference's weights; TR-DPO's reference is in the state instead.
    frozen_shardings = state.frozen_shardings(s, model_config, mesh, shardings)
    memory.check_state_fits(
        state.abstract_state(model_config, optimizer, shardings),
        model_config,
        mesh,
        frozen=state.abstract_frozen(s, model_config, frozen_shardings),
        rows=iterator.rows,
        row_length=iterator.pack_length,
        logits_chunk_size=s.loss.logits_chunk_size,
    )
    train_state = state.init_state(s.model, model_config, s.loop.seed, optimizer, shardings)
    # Reference = the initial policy (also on resume: the checkpoint is restored below).
    # Either frozen copies of its weights (never donated, never in the optimizer), or its
    # log-probs computed once here and carried in the batches. With LoRA it is the base.
    frozen, base_identity = state.frozen_weights(
        s, model_config, mesh, train_state, frozen_shardings
    )

    def policy():
        """The trained policy's weights (LoRA: the base with the state's adapters)."""
        return model.Adapted(frozen, train_state.params) if adapters else train_state.params

    def reference_weights():
        """The reference's weights now (None when only precomputed log-probs are kept)."""
        if s.ref_sync is not None:
            return train_state.reference
        return frozen if s.reference_on_device else None

    eval_reference = {}
    sampler = samples.make_sampler(
        workdir, s.samples, model_config, tokenizer, s.data.apply_chat_template
    )
    if s.precompute_reference:
        train_table, eval_reference = reference.precompute(
            jit_reference_logps(model_config, s.loss.logits_chunk_size, mesh, s.loss.ld_alpha),
            frozen if adapters else train_state.params,
            iterator.pairs,
            eval_sets,
            model_config=model_config,
            batches=lambda pairs: iterator.eval_batches(pairs, s.batch.eval_batch_size),
            batch_size=s.batch.eval_batch_size,
            mesh=mesh,
            cache_dir=reference.cache_dir_for(s.data.cache_dir, workdir),
            ld_alpha=s.loss.ld_alpha,
        )
        iterator.attach_reference(train_table)
        if sampler is not None:  # the reference's replies, while its weights are at hand
            sampler.sample_reference(frozen if adapters else train_state.params)

    # --- resume
    writer = metrics_log.MetricsWriter(workdir, total_steps, enabled=lead)
    start_step = ckpt.latest_step()
    if start_step is not None:
        start_step, train_state, position = ckpt.restore_latest_intact(
            checkpoint.abstract_like(train_state),
            log=lambda line: print(line, flush=True) if lead else None,
        )
        iterator.restore(position)
        if adapters:
            checkpoint.check_base(ckpt.read_base(start_step), base_identity, start_step)
        if lead:
            metrics_log.truncate_logs_after(workdir, start_step)
        print(
            f"resumed from step {start_step} (data epoch {iterator.epoch}, batch {iterator.index})",
            flush=True,
        )
    else:
        start_step = 0
        if lead:
            open(writer.path, "w").close()
    if jax.process_count() == 1:  # the distributed runtime watches SIGTERM itself
        ckpt.watch_preemption()

    # --- compiled steps and sinks
    step_fn = jit_train_step(
        model_config,
        s.loss,
        optimizer,
        schedule,
        shardings,
        mesh,
        frozen_shardings=frozen_shardings,
        padded_rows=not iterator.packing,
        skip_nonfinite=s.loop.skip_nonfinite,
        last_step_at_reference=optim.last_step_at_reference(schedule, total_steps),
        ref_sync=s.ref_sync,
        dropout_seed=s.loop.seed if adapters and s.model.lora.dropout > 0 else None,
    )
    eval_fn = jit_eval_sums(model_config, s.loss)
    if lead:
        writer.sinks = metrics_log.open_writers(
            workdir,
            tensorboard=s.logging.tensorboard,
            wandb=s.logging.wandb,
            wandb_project=s.logging.wandb_project,
            config=s.resolved,
            purge_step=start_step or None,
        )

    eval_metrics = {}

    def run_evals(step):
        if not eval_sets:
            return
        eval_metrics.clear()
        for name, pairs in eval_sets.items():
            batches = iterator.eval_batches(
                pairs, s.batch.eval_batch_size, eval_reference.get(name)
            )
            metrics = evaluate.eval_means(
                eval_fn,
                policy(),
                reference_weights(),
                batches,
                mesh=mesh,
                what=f"eval {name or 'validation'}",
            )
            prefix = f"eval/{name}/" if name else "eval/"
            eval_metrics.update({prefix + k: float(v) for k, v in metrics.items()})
        writer.write(step, eval_metrics)

    def sample(step):
        sample_metrics = sampler(step, policy(), reference_weights())
        if sample_metrics:
            eval_metrics.update(sample_metrics)
            writer.write(step, sample_metrics)

    # --- the loop. Metrics of step s are fetched after step s+1 is dispatched, so the
    # host never waits for the device except at log, eval and checkpoint points; the next
    # batches are built and placed on a background thread meanwhile (data.prefetch).
    pending = None  # (step, device metrics, window totals, window start)
    window = throughput.Window(throughput.peak_flops(mesh.devices.flat[0])[0], mesh.devices.size)

    def prepare(host_batch):
        totals = throughput.batch_totals(model_config, host_batch, s.reference_on_device)
        return sharding.put_batch(host_batch, mesh, row_axis=1), totals

    nonfinite_seen = 0

    def check_finite(count) -> None:
        """Acts on new non-finite steps (the state's count, or a metrics row's)."""
        nonlocal nonfinite_seen
        if int(count) <= nonfinite_seen:
            return
        first = int(jax.device_get(train_state.first_nonfinite_step))
        if not s.loop.skip_nonfinite:
            last = ckpt.latest_step()
            kept = "no checkpoint yet" if last is None else f"checkpoint {last} kept"
            raise NonFiniteError(
                f"non-finite loss or gradients at step {first}: its update was not applied and "
                f"training stopped ({kept}). Lower training.learning_rate or training.beta, look "
                "for extreme pairs in the data, or set training.nonfinite=skip to skip such steps"
            )
        nonfinite_seen = int(count)
        if lead:
            print(
                f"non-finite loss or gradients: {nonfinite_seen} step(s) skipped so far (the "
                f"first at step {first})",
                flush=True,
            )

    def flush(pending):
        step, metrics, totals, started, tokens_seen = pending
        metrics = jax.device_get(metrics)  # "pairs": the logged step's own pair count
        metrics["num_tokens"] = float(tokens_seen)  # TRL's: sequence tokens trained so far
        metrics |= window.rates(totals, started)
        if (peak_gb := memory.device_peak_gb()) is not None:
            metrics["memory/peak_gb"] = peak_gb
        writer.write(step, metrics)
        check_finite(metrics["nonfinite_steps"])
        ckpt.check()  # a failed async save (a full disk) stops the run here

    loop, samples_every = s.loop, s.samples.every_steps
    step, ending = start_step, None  # ending: how the loop was left, if by an exception
    try:
        with prefetch.Prefetcher(iterator, prepare, depth=s.batch.prefetch) as batches:
            while step < total_steps:
                (batch, totals), position = next(batches)
                window.add(totals)
                train_state, metrics = step_fn(train_state, frozen, batch)
                if pending is not None:
                    flush(pending)
                    pending = None
                if step % loop.log_every == 0 or step == total_steps - 1:
                    pending = (step, metrics, *window.take(), position["tokens_seen"])
                faults.pause_at(step, lambda: ckpt.stop_signal is not None)
                step += 1
                done = step == total_steps
                eval_now = done or (loop.eval_every > 0 and step % loop.eval_every == 0)
                stop = ckpt.should_stop(step)
                save_now = step % loop.checkpoint_every == 0 or done or stop
                save_now |= eval_now and ckpt.keep_best is not None  # a candidate for best
                sample_now = sampler is not None and (
                    (done and samples_every >= 0)
                    or (samples_every > 0 and step % samples_every == 0)
                )
                if pending is not None and (eval_now or save_now):
                    # Rows logged before a checkpoint must be on disk before it exists: a
                    # resumed run recomputes only the steps after the checkpoint.
                    flush(pending)
                    pending = None
                if eval_now or save_now or sample_now:  # never evaluate or save a bad step
                    check_finite(jax.device_get(train_state.nonfinite_steps))
                if eval_now:
                    run_evals(step)
                if sample_now:
                    sample(step)
                if save_now:
                    ranked = dict(eval_metrics) if eval_now else None
                    ckpt.save(
                        step, train_state, position, s.resolved, metrics=ranked, base=base_identity
                    )
                if stop:
                    print(
                        f"pre-empted: saved step {step}; re-run the same command to resume",
                        flush=True,
                    )
                    break
    except KeyboardInterrupt:
        ending = "stop now"  # a second Ctrl-C: no waiting for a save in flight
        raise
    except BaseException:
        ending = "failed"
        raise
    finally:
        ckpt.unwatch()
        if ending != "stop now":
            # After a failure that error is the one to report: a save in flight or a log
            # flushed onto the same full disk would only fail again.
            for close in (ckpt.wait, ckpt.close, writer.close):
                try:
                    close()
                except Exception:
                    if ending is None:
                        raise

    if lead and (best := ckpt.best_step()) is not None:
        metric = s.checkpoint.keep_best.metric
        value = ckpt.manager.metrics(best)[metric]
        print(
            f"best checkpoint: step {best} ({metric} {value:.4g}); export it with python -m "
            f"dpo_jax.export --workdir {workdir} --step best --out {workdir}/hf-best",
            flush=True,
        )

    # --- export and report
    if s.checkpoint.export_hf and step == total_steps:
        # Every process takes part (each holds shards); process 0 writes the files.
        out = os.path.join(workdir, "hf")
        export.write_hf(
            out,
            model_config,
            policy(),
            s.model.name,
            tokenizer=s.tokenizer if s.tokenizer != s.model.name else None,
            dtype=s.checkpoint.export_dtype,
            mesh_rules=(mesh, s.mesh.rules),
        )
        if lead:
            print(f"exported: {out}", flush=True)
            if adapters:
                print(f"exported the PEFT adapter: {lora.adapter_folder(out)}", flush=True)
    if lead and s.logging.report:
        print(f"report: {html_report.write_report(workdir)}", flush=True)
    return TrainResult(
        train_state,
        reference_weights(),
        eval_metrics,
        completed=step == total_steps,
        stop_signal=ckpt.stop_signal,
    )


# Exit statuses (dpo_jax.cli): 2 for input that cannot run, 1 for a run that failed.
BAD_INPUT = (*settings.USER_ERRORS, checkpoint.WorkdirBusy, checkpoint.BaseMismatch)
RUN_FAILURES = (NonFiniteError, checkpoint.CheckpointError, metrics_log.LogError)


def main(argv) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's per-save INFO lines
    cli.one_line_background_errors()
    sharding.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    try:
        result = run(
            settings.from_config(FLAGS.config), FLAGS.workdir, allow_changed=FLAGS.allow_changed
        )
    except BAD_INPUT as error:
        cli.fail(str(error), 2)
    except OSError as error:
        cli.fail(cli.os_error_line(error), 1)
    except RUN_FAILURES as error:
        cli.fail(str(error), 1)
    except KeyboardInterrupt:
        cli.stop_now("re-run the same command to resume from the last checkpoint")
    if not result.completed and result.stop_signal is not None:
        raise SystemExit(128 + int(result.stop_signal))


if __name__ == "__main__":
    define_flags()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main, flags_parser=cli.flags_parser(FLAGS))
