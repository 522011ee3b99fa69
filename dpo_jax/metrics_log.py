"""DIR/metrics.jsonl with its console line, and the sinks beside it: TensorBoard event files
and, optionally, Weights & Biases.

Each writer has write(step, metrics) and close(). Train metrics and eval/ metrics go to two
TensorBoard runs, DIR/tensorboard/train and DIR/tensorboard/eval, under the same tags
("loss", "rewards/margins", ...), so TensorBoard draws train and eval on one chart.

    python -m dpo_jax.metrics_log DIR    # (re)writes DIR/tensorboard from DIR/metrics.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import secrets
import shutil
import string
import sys
import time
import warnings

from dpo_jax import faults

EVAL_PREFIX = "eval/"


class MetricsWriter:
    """DIR/metrics.jsonl plus a console line and the sinks; written by process 0 only."""

    def __init__(self, workdir: str, total_steps: int, *, enabled: bool, clock=time.monotonic):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.total_steps = total_steps
        self.enabled = enabled
        self.sinks = None  # TensorBoard / W&B writers (MultiWriter)
        self.clock = clock
        self.started = clock()
        self.first_row = None  # (step, time) of this process's first train row

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)} | {k: float(v) for k, v in metrics.items()}
        # When the row was written (Unix seconds): the report's wall time and pace. The
        # sinks keep their own timestamps, so it stays out of their curves.
        stamped = row | {"time": round(time.time(), 3)}
        line = json.dumps(stamped) + "\n"
        with open(self.path, "a") as f:
            faults.write(f, line, f"metrics@{step}")
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
                f"lr {row['learning_rate']:.2e} | {row.get('tokens_per_sec', 0):,.0f} tok/s | "
                f"{self.timing(step)}",
                flush=True,
            )
        else:
            headline = ("/loss", "/rewards/accuracies", "/rewards/margins", "_preferred_rate")
            shown = {k: round(v, 4) for k, v in row.items() if k.endswith(headline)}
            print(f"eval  {step:5d} | {shown}", flush=True)

    def timing(self, step: int) -> str:
        """ "elapsed H:MM:SS, eta H:MM:SS": elapsed since this process started the run (a
        resumed run counts afresh); the ETA from the pace since the first train row, so
        compilation and the reference precompute before it do not inflate it."""
        now = self.clock()
        if self.first_row is None:
            self.first_row = (step, now)
        first_step, first_time = self.first_row
        left = self.total_steps - 1 - step
        if step > first_step:
            eta = clock_time((now - first_time) / (step - first_step) * left)
        else:
            eta = "0:00:00" if left == 0 else "?"
        return f"elapsed {clock_time(now - self.started)}, eta {eta}"


def clock_time(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogError(ValueError):
    """A log file of the workdir that cannot be continued, and where."""


def truncate_logs_after(workdir: str, step: int) -> None:
    """On resume, drop log rows written after the checkpoint (they will be recomputed).
    Eval and sample rows of the checkpoint's own step stay: they ran before it was saved.
    A last line cut short (the run was killed while writing it) is dropped too; a damaged
    line before it is an error naming the line."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = os.path.join(workdir, name)
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.strip()]
        kept = []
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                row_step = row["step"]
            except (ValueError, KeyError, TypeError):
                if number == len(lines):  # the write the kill interrupted
                    break
                raise LogError(
                    f"{path}:{number}: not a metrics row ({line.strip()[:80]!r}); delete that "
                    "line to resume"
                ) from None
            if row_step < step or (row_step == step and "loss" not in row):
                kept.append(line if line.endswith("\n") else line + "\n")
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(temporary, path)  # a crash here leaves the old file, never half of it


def split_metrics(metrics: dict) -> dict[str, dict[str, float]]:
    """{"train": {tag: value}, "eval": {tag: value}}: eval/ keys lose their prefix."""
    runs: dict[str, dict[str, float]] = {"train": {}, "eval": {}}
    for key, value in metrics.items():
        if key == "step":
            continue
        if key.startswith(EVAL_PREFIX):
            runs["eval"][key[len(EVAL_PREFIX) :]] = float(value)
        else:
            runs["train"][key] = float(value)
    return runs


class TensorBoardWriter:
    """Scalars into DIR/tensorboard/{train,eval}/events.* (tensorboardX; no TensorFlow).

    `purge_step`: on resume, the checkpoint step k training restarts from; TensorBoard then
    hides what an interrupted run logged after the checkpoint, as it is recomputed: train
    rows of steps >= k, eval rows of steps > k (the eval at k ran before checkpoint k)."""

    def __init__(self, logdir: str, purge_step: int | None = None):
        from tensorboardX import SummaryWriter  # imported here: only runs that log need it

        self.logdir = logdir
        purge = {"train": purge_step, "eval": None if purge_step is None else purge_step + 1}
        self.writers = {
            run: SummaryWriter(os.path.join(logdir, run), purge_step=purge[run])
            for run in ("train", "eval")
        }

    def write(self, step: int, metrics: dict) -> None:
        for run, scalars in split_metrics(metrics).items():
            for tag, value in scalars.items():
                self.writers[run].add_scalar(tag, value, global_step=int(step))

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class WandbWriter:
    """Weights & Biases run of the workdir; a resumed training continues the same W&B run
    (its id is kept in DIR/wandb_run_id) and none of its rows is dropped."""

    def __init__(self, workdir: str, *, project: str, config: dict | None = None, name=None):
        import wandb

        self.wandb = wandb
        id_path = os.path.join(workdir, "wandb_run_id")
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            # Our own id, W&B's form (8 of [a-z0-9]): wandb.util.generate_id is gone in 0.31.
            alphabet = string.ascii_lowercase + string.digits
            run_id = "".join(secrets.choice(alphabet) for _ in range(8))
            with open(id_path, "w") as f:
                f.write(run_id)
        self.run = wandb.init(
            project=project,
            name=name or os.path.basename(os.path.abspath(workdir)),
            id=run_id,
            resume="allow",
            dir=workdir,
            config=config,
        )
        # Our step is a logged value that every chart uses as its x-axis, not W&B's own step:
        # W&B drops a row whose step it has seen, and a resume recomputes the steps between
        # the checkpoint and the stop (their values are equal: the resume is exact).
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def write(self, step: int, metrics: dict) -> None:
        values = {k: float(v) for k, v in metrics.items() if k != "step"}
        self.run.log({"step": int(step)} | values)

    def close(self) -> None:
        self.run.finish()


def _installed(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


class MultiWriter:
    """Fans write/close out to several writers."""

    def __init__(self, writers):
        self.writers = list(writers)

    def write(self, step: int, metrics: dict) -> None:
        for writer in self.writers:
            writer.write(step, metrics)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def open_writers(
    workdir: str,
    *,
    tensorboard: bool = True,
    wandb: bool = False,
    wandb_project: str = "dpo_jax",
    config: dict | None = None,
    purge_step: int | None = None,
) -> MultiWriter:
    """The sinks a run asked for. W&B is skipped, with a warning, when it is not installed."""
    writers = []
    if tensorboard:
        if _installed("tensorboardX"):
            writers.append(TensorBoardWriter(os.path.join(workdir, "tensorboard"), purge_step))
        else:
            warnings.warn(
                "tensorboardX is not installed (pip install tensorboardX); no TensorBoard "
                "event files, metrics.jsonl only",
                stacklevel=2,
            )
    if wandb:
        if _installed("wandb"):
            writers.append(WandbWriter(workdir, project=wandb_project, config=config))
        else:
            warnings.warn(
                "config logging.wandb=True but wandb is not installed (pip install wandb); "
                "logging to metrics.jsonl and TensorBoard only",
                stacklevel=2,
            )
    return MultiWriter(writers)


def export_tensorboard(workdir: str) -> str:
    """Rewrites DIR/tensorboard from DIR/metrics.jsonl (e.g. for a run logged without it)."""
    from dpo_jax.report import read_jsonl

    logdir = os.path.join(workdir, "tensorboard")
    shutil.rmtree(logdir, ignore_errors=True)
    writer = TensorBoardWriter(logdir)
    for row in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if "step" in row:
            scalars = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            scalars.pop("time", None)  # when the row was written: not a curve
            writer.write(row["step"], scalars)
    writer.close()
    return logdir


def read_events(logdir: str):
    """(run, Event proto) of every event under `logdir`, run = the sub-folder ("train")."""
    import struct

    from tensorboardX.proto import event_pb2

    for root, _, files in sorted(os.walk(logdir)):
        for name in sorted(files):
            if not name.startswith("events."):
                continue
            with open(os.path.join(root, name), "rb") as f:
                buffer = f.read()
            offset = 0
            # TFRecord framing: u64 length, u32 crc, payload, u32 crc
            while offset + 12 <= len(buffer):
                (length,) = struct.unpack_from("<Q", buffer, offset)
                payload = buffer[offset + 12 : offset + 12 + length]
                offset += 12 + length + 4
                yield os.path.relpath(root, logdir), event_pb2.Event.FromString(payload)


def read_scalars(logdir: str) -> list[tuple[str, int, str, float]]:
    """(run, step, tag, value) of every scalar under `logdir` (for tests and quick looks
    without TensorBoard installed)."""
    return [
        (run, int(event.step), value.tag, float(value.simple_value))
        for run, event in read_events(logdir)
        for value in event.summary.value
    ]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_jax.metrics_log",
        description="Write DIR/tensorboard event files from DIR/metrics.jsonl.",
    )
    parser.add_argument("workdir")
    args = parser.parse_args(argv)
    if not os.path.exists(os.path.join(args.workdir, "metrics.jsonl")):
        raise SystemExit(f"error: {args.workdir}/metrics.jsonl not found")
    print(f"wrote {export_tensorboard(args.workdir)} (tensorboard --logdir {args.workdir})")


if __name__ == "__main__":
    main(sys.argv[1:])
