"""Orbax checkpoints of the train state, the data position and the config (and, for LoRA,
the frozen base's identity); auto-resume; pre-emption (SIGTERM, Ctrl-C); one run per
workdir."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import math
import os
import shutil
import signal
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from dpo_jax import faults


class CheckpointError(RuntimeError):
    """No checkpoint of a workdir can be restored, and why."""


class WorkdirBusy(RuntimeError):
    """Another run holds the workdir."""


class BaseMismatch(ValueError):
    """LoRA adapters restored onto other base weights than those they were trained on."""


def base_identity(m, fingerprint: str) -> dict:
    """What LoRA checkpoints record of their frozen base (settings.ModelSettings `m`)."""
    return {
        "model": m.name,
        "init": m.init,
        "fingerprint": fingerprint,
        "quantization": m.lora.quantization,
    }


def check_base(saved: dict | None, current: dict, step: int) -> None:
    """Raises BaseMismatch unless checkpoint `step`'s base is the base loaded now: adapters
    mean something only on the weights they were trained on."""
    if saved is None:
        raise BaseMismatch(
            f"checkpoint {step} records no LoRA base: it was not written by a LoRA run (lora.rank"
            " > 0); resume it with the config it was trained with, or use a new workdir"
        )
    if saved.get("fingerprint") != current["fingerprint"]:
        raise BaseMismatch(
            f"checkpoint {step} holds LoRA adapters trained on model.name={saved.get('model')!r} "
            f"(weights fingerprint {str(saved.get('fingerprint'))[:12]}), but the base loaded "
            f"now, model.name={current['model']!r}, has fingerprint "
            f"{current['fingerprint'][:12]}: point model.name at the same weights, or train "
            "these in a new workdir"
        )


class WorkdirLock:
    """An exclusive lock on DIR/.lock for the life of a run (process 0 only). The kernel
    drops it when the process ends, however it ends, so a crash never leaves it stale."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, ".lock")
        self.file = open(self.path, "a+")  # noqa: SIM115  (held until release)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise WorkdirBusy(
                f"{workdir} is in use by another run ({holder}); wait for it to end or use "
                "another --workdir"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()


class Checkpointer:
    """Saves {state, data position, config} under DIR/checkpoints/<step>.

    Orbax writes each step to a temporary directory and renames it when complete, so a run
    killed mid-save leaves the previous checkpoint as the latest one.
    """

    def __init__(
        self, workdir: str, *, max_to_keep: int = 2, async_save: bool = True, keep_best=None
    ):
        """keep_best (settings.KeepBest or None): also keep the best checkpoints of those
        saved with metrics (save(..., metrics=)), ranked by keep_best.metric."""
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.keep_best = keep_best
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                enable_async_checkpointing=async_save,
                create=True,
                **_preservation_options(max_to_keep, keep_best),
            ),
        )
        self.stop_signal = None  # the signal that asked the run to save and stop
        self.in_flight = None  # the step of the last save started (async: maybe unfinished)
        self.previous_handlers = {}  # signal -> handler, while watch_preemption's are set

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def best_step(self, keep_best=None) -> int | None:
        """The kept checkpoint with the best keep_best metric (this run's, or the one given:
        a reader that did not train) or None: keep_best off, or no checkpoint with metrics."""
        keep_best = keep_best or self.keep_best
        if keep_best is None:
            return None
        ranked = [(step, self.manager.metrics(step)) for step in self.steps()]
        ranked = [(_rank_value(keep_best, m), step) for step, m in ranked if m]
        return max(ranked)[1] if ranked else None

    def resolve_step(self, step, keep_best=None) -> int:
        """The step a `--step` value names: None / "latest", "best" (by `keep_best`, the
        run's checkpoint.keep_best) or a number among the kept steps."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"{self.directory}: no checkpoints (has the run saved one?)")
        if step in (None, "", "latest"):
            return steps[-1]
        if step == "best":
            best = self.best_step(keep_best)
            if best is None:
                raise CheckpointError(
                    f"--step best: no checkpoint of {self.directory} was ranked (train with "
                    "checkpoint.keep_best set to an eval metric); kept steps: {steps}"
                )
            return best
        if not (str(step).isdigit() and int(step) in steps):
            raise CheckpointError(
                f"--step {step}: not among the checkpoints of {self.directory} ({steps}); "
                "give one of them, latest or best"
            )
        return int(step)

    def read_config(self, step: int) -> dict:
        """The resolved config the run saved with checkpoint `step`."""
        return self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        ).config

    def save(
        self, step: int, state, data_position: dict, config: dict, metrics=None, base=None
    ) -> None:
        """`metrics` (an evaluation's {name: value}) make the checkpoint a candidate for
        keep_best; Orbax stores them with it, so the ranking survives a resume. `base`: a
        LoRA run's base_identity."""
        self.wait()  # Orbax would wait for a save in flight anyway; a failure is named as its
        items = {"base": ocp.args.JsonSave(base)} if base is not None else {}
        with self._failing_as(step):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_position),
                    config=ocp.args.JsonSave(config),
                    **items,
                ),
                metrics=metrics if self.keep_best else None,
                force=True,
            )
        self.in_flight = step
        faults.during_save(step)

    def check(self) -> None:
        """Raises CheckpointError if an asynchronous save has failed; never waits for one in
        flight. The loop calls it at each log step, so a full disk stops the run within a
        log interval, not at the next save. (With several processes the failure is raised
        at the next save or at the end, where every process waits for the save together.)"""
        if self.in_flight is None or jax.process_count() > 1:
            return
        if not self.manager.is_saving_in_progress():
            self.wait()  # finished: returns at once, or raises its error

    @contextlib.contextmanager
    def _failing_as(self, step):
        """Turns whatever Orbax raises while writing checkpoint `step` into one CheckpointError
        line, after removing its half-written folder (the space it took is needed again)."""
        try:
            yield
        except Exception as error:  # noqa: BLE001  (Orbax and TensorStore raise many kinds)
            text = " ".join(str(error).split()) or type(error).__name__
            full = getattr(error, "errno", None) == errno.ENOSPC or any(
                sign in text for sign in ("No space left", "RESOURCE_EXHAUSTED", "quota")
            )
            if jax.process_index() == 0:
                for name in os.listdir(self.directory):
                    if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            older = [s for s in self.steps() if step is None or s < step]
            kept = f"checkpoint {older[-1]} is intact" if older else "no checkpoint was kept"
            fix = f"free space in {self.directory}" if full else "fix the cause"
            reason = "disk full: no space left on device" if full else text[:240]
            raise CheckpointError(
                f"checkpoint {step} could not be written ({reason}); {kept}: {fix} and re-run "
                "the same command to resume"
            ) from None

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restores onto the shardings held by `abstract_state` (ShapeDtypeStructs)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data

    def restore_latest_intact(self, abstract_state, log=print) -> tuple[int, object, dict]:
        """(step, state, data position) of the newest checkpoint that restores. A damaged
        one (a truncated or deleted file) is reported and the next older one tried; process
        0 then moves the damaged ones aside (checkpoints/damaged-<step>-<time>, for a look) so
        that training can write their steps again."""
        problems, damaged = [], []
        for step in reversed(self.steps()):
            try:
                state, position = self.restore(step, abstract_state)
            except Exception as error:  # noqa: BLE001  (Orbax raises many kinds)
                reason = " ".join(str(error).split())[:200] or type(error).__name__
                problems.append(f"step {step}: {reason}")
                damaged.append(step)
                log(f"checkpoint {step} cannot be restored ({reason}); trying an older one")
                continue
            if damaged:
                multihost_utils.sync_global_devices("damaged checkpoints read")
                if jax.process_index() == 0:
                    for bad in damaged:
                        aside = f"damaged-{bad}-{time.strftime('%Y%m%d-%H%M%S')}"
                        os.replace(
                            os.path.join(self.directory, str(bad)),
                            os.path.join(self.directory, aside),
                        )
                self.manager.reload()  # forget the steps just moved
            return step, state, position
        raise CheckpointError(
            f"{self.directory}: no checkpoint can be restored ({'; '.join(problems)}); move "
            "the folder away to start afresh"
        )

    def read_base(self, step: int) -> dict | None:
        """The base_identity that LoRA checkpoint `step` was saved with (None: none)."""
        if not os.path.isdir(os.path.join(self.directory, str(step), "base")):
            return None
        return self.manager.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore())).base

    def latest_config(self) -> dict | None:
        """The config of the newest checkpoint whose config reads (None: nothing to resume)."""
        for step in reversed(self.steps()):
            try:
                return self.read_config(step)
            except Exception:  # noqa: BLE001, S112  (a damaged step: the older one decides)
                continue
        return None

    def restore_params(self, step: int, abstract_params, field: str = "params"):
        """The policy parameters alone (or the state's other `field`, e.g. TR-DPO's
        "reference"; the optimizer state is never read), onto the shardings held by
        `abstract_params`."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={field: abstract_params},
                    restore_args={
                        field: ocp.checkpoint_utils.construct_restore_args(abstract_params)
                    },
                    partial_restore=True,
                )
            ),
        )
        return restored.state[field]

    def watch_preemption(self) -> None:
        """On SIGTERM (what SLURM and Kubernetes send before a kill) or Ctrl-C, finish the
        current step, save, and exit; the same command then resumes. A second Ctrl-C stops
        at once (KeyboardInterrupt): the last complete checkpoint is what a resume uses."""

        def handler(signum, frame):
            self.stop_signal = signum
            if signum == signal.SIGINT:
                print("\nstopping: saving at the end of this step (Ctrl-C again: stop now)")
                signal.signal(signal.SIGINT, signal.default_int_handler)

        # The handlers before this run come back at close(): train() called from a notebook
        # or a test leaves Ctrl-C and SIGTERM as they were.
        self.previous_handlers = {
            sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def should_stop(self, step: int) -> bool:
        """Whether to save and exit now. With several processes every one must reach the
        same answer at the same step, so JAX's preemption sync point decides (the
        distributed runtime installs its own SIGTERM notice)."""
        if jax.process_count() > 1:
            if multihost_utils.reached_preemption_sync_point(step):
                self.stop_signal = self.stop_signal or signal.SIGTERM
                return True
            return False
        return self.stop_signal is not None

    def wait(self) -> None:
        with self._failing_as(self.in_flight):
            self.manager.wait_until_finished()
        self.in_flight = None

    def unwatch(self) -> None:
        """Puts back the signal handlers watch_preemption replaced."""
        for sig, previous in self.previous_handlers.items():
            signal.signal(sig, previous)
        self.previous_handlers = {}

    def close(self) -> None:
        self.unwatch()
        self.manager.close()


def _rank_value(keep_best, metrics) -> float:
    """Higher is better, whatever the mode; a missing or non-finite value ranks last."""
    value = float((metrics or {}).get(keep_best.metric, math.nan))
    if not math.isfinite(value):
        return -math.inf
    return value if keep_best.mode == "max" else -value


def _preservation_options(max_to_keep: int, keep_best) -> dict:
    """CheckpointManagerOptions for what is kept: the max_to_keep latest (what a resume
    uses), and with keep_best also its `count` best of the checkpoints saved with metrics.
    best_fn is set as well because Orbax writes a checkpoint's metrics to disk only then;
    the preservation policy decides what is deleted."""
    if keep_best is None:
        return {"max_to_keep": max_to_keep}
    policies = ocp.checkpoint_managers
    rank = functools.partial(_rank_value, keep_best)
    return {
        "best_fn": rank,
        "best_mode": "max",  # rank() is higher-is-better in both modes
        "preservation_policy": policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=max_to_keep),
                policies.BestN(
                    get_metric_fn=rank,
                    reverse=False,  # ascending: the last `count` are kept
                    n=keep_best.count,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        ),
    }


class _NoMetricsWarning(logging.Filter):
    """With keep_best, saves between evaluations carry no metrics on purpose; Orbax warns
    about each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoMetricsWarning())


def abstract_like(tree):
    """ShapeDtypeStructs carrying the shardings of `tree`, for restoring in place."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
