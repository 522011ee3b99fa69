"""Evaluate a training run's checkpoint on one or more preference sets.

    python -m dpo_jax.evaluate --workdir runs/tiny [--step N|best] [--data FILE ...]

Restores the policy of DIR/checkpoints/<step> (the latest by default), rebuilds the frozen
reference exactly as training built it (the initial policy), and for each named eval set —
the config's data.validation_file as "validation" by default, else each --data FILE named
by its stem (or NAME=FILE) — computes the training eval metrics plus the mean
policy − reference log-ratio of the chosen and rejected completions. Writes
DIR/eval_<step>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax
import jax.numpy as jnp

from dpo_jax import checkpoint, data, hf, model, progress, settings, sharding, state
from dpo_jax.batch_loss import finalize
from dpo_jax.settings import Settings
from dpo_jax.step import jit_eval_sums

# The metrics shown in the console table, in this order (the JSON holds every metric).
TABLE_METRICS = (
    "loss",
    "rewards/accuracies",
    "rewards/margins",
    "rewards/chosen",
    "rewards/rejected",
    "logps/chosen",
    "logps/rejected",
    "logratio/chosen",
    "logratio/rejected",
)


class EvaluateError(ValueError):
    """A workdir, step or eval set that cannot be evaluated, and why."""


def read_settings(workdir: str) -> Settings:
    """The run's settings, from DIR/config.json (written by train.py)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise EvaluateError(f"{path}: not found; is {workdir!r} a training workdir?")
    with open(path) as f:
        return settings.from_config(settings.from_json(json.load(f)))


def parse_eval_sets(validation_file: str, data_files) -> dict[str, str]:
    """{name: file}: --data FILE (named by its stem) or NAME=FILE; default the validation file."""
    if not data_files:
        if not validation_file:
            raise EvaluateError(
                "the run has no data.validation_file; name eval sets with --data FILE"
            )
        return {"validation": validation_file}
    sets = {}
    for spec in data_files:
        match = re.fullmatch(r"([\w.-]+)=(.+)", spec)
        if match and not os.path.exists(spec):
            name, path = match.groups()
        else:
            path = spec
            name = os.path.splitext(os.path.basename(path))[0]
        if name in sets:
            raise EvaluateError(
                f"two eval sets are named {name!r} ({sets[name]}, {path}); "
                f"name them with --data NAME=FILE"
            )
        sets[name] = path
    return sets


def eval_means(eval_fn, params, ref_params, batches, *, mesh, what: str = "eval") -> dict:
    """Means over every pair of `batches` (host eval batches of this process's rows);
    `eval_fn` is step.jit_eval_sums's program."""
    totals = None
    for batch in progress.bar(batches, what=what, unit="batch"):
        sums = eval_fn(params, ref_params, sharding.put_batch(batch, mesh, row_axis=0))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    metrics = jax.device_get(finalize(totals))
    del metrics["pairs"]
    return metrics


def evaluate(
    workdir: str,
    step: int | str | None = None,
    data_files=None,
    *,
    devices=None,
    mesh_shape: tuple[int, int, int] | None = None,
    batch_size: int | None = None,
) -> dict:
    """Evaluates DIR's checkpoint `step` (latest if None); writes and returns eval_<step>.json.

    Returns {"step", "workdir", "sets": {name: {"file", "pairs", "metrics": {...}}}}.
    """
    s = read_settings(workdir)
    mesh_shape = mesh_shape or (s.mesh.data, s.mesh.fsdp, s.mesh.tensor)
    mesh = sharding.make_mesh(*mesh_shape, devices)
    model_config = state.model_config(s.model)
    batch_size = int(batch_size or s.batch.eval_batch_size)
    sharding.check_batch_rows(2 * batch_size, mesh, "eval batch size")
    validation = dict(s.data.validation_sources).get("", "")
    eval_sets = parse_eval_sets(validation, data_files)

    # --- the eval sets first: bad data fails before any model work
    tokenizer = hf.load_tokenizer(s.tokenizer)
    pad_id = data.pad_token_id(tokenizer)
    eval_pairs = {
        name: data.load_pairs(path, tokenizer, s.data)[0] for name, path in eval_sets.items()
    }

    # --- which checkpoint; the reference is the initial policy, built as training built it
    # (LoRA: the base; TR-DPO: the checkpoint's synced reference), and the restored policy
    # takes the same shardings (no optimizer: only params are read).
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    try:
        step = ckpt.resolve_step(step, s.checkpoint.keep_best)
        params = state.restore_policy(ckpt, step, s, model_config, mesh)
        ref_params = None
        if isinstance(params, model.Adapted):
            ref_params = params.base
        elif s.ref_sync is not None:
            ref_params = state.restore_reference(ckpt, step, model_config, params)
        elif s.loss.needs_reference:
            shardings = state.param_shardings(model_config, mesh, s.mesh.rules)
            ref_params = state.initial_params(s.model, model_config, s.loop.seed, shardings)
    finally:
        ckpt.close()

    # --- every eval set
    eval_fn = jit_eval_sums(model_config, s.loss)

    result = {"step": int(step), "workdir": os.path.abspath(workdir), "sets": {}}
    for name, pairs in eval_pairs.items():
        batches = data.eval_batches(
            pairs,
            batch_size=batch_size,
            row_length=s.data.max_seq_length,
            pad_id=pad_id,
            buckets=data.resolve_buckets(s.data.bucket_lengths, s.data.max_seq_length),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        metrics = eval_means(eval_fn, params, ref_params, batches, mesh=mesh)
        metrics = {k: float(v) for k, v in metrics.items()}
        # rewards = β · (policy − reference) log-ratio, on the log-probs the loss saw
        # (per-token averages for averaged losses, reference ≡ 0 when reference-free).
        for side in ("chosen", "rejected"):
            metrics[f"logratio/{side}"] = metrics[f"rewards/{side}"] / s.loss.beta
        result["sets"][name] = {
            "file": os.path.abspath(eval_sets[name]),
            "pairs": len(pairs),
            "metrics": metrics,
        }

    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{step}.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def format_table(result: dict) -> str:
    """Metrics as rows, eval sets as columns."""
    names = list(result["sets"])
    width = max([len(m) for m in TABLE_METRICS] + [6])
    columns = [max(len(n), 10) for n in names]
    lines = [
        f"step {result['step']} — {result['workdir']}",
        " ".join(
            [f"{'metric':<{width}}"] + [f"{n:>{c}}" for n, c in zip(names, columns, strict=True)]
        ),
    ]
    lines.append(
        " ".join(
            [f"{'pairs':<{width}}"]
            + [f"{result['sets'][n]['pairs']:>{c}d}" for n, c in zip(names, columns, strict=True)]
        )
    )
    for metric in TABLE_METRICS:
        cells = []
        for n, c in zip(names, columns, strict=True):
            value = result["sets"][n]["metrics"].get(metric)
            cells.append(f"{'—':>{c}}" if value is None else f"{value:>{c}.4f}")
        lines.append(" ".join([f"{metric:<{width}}"] + cells))
    return "\n".join(lines)


USER_ERRORS = (EvaluateError, checkpoint.CheckpointError, *settings.USER_ERRORS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_jax.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("--step", default=None, help="checkpoint step: N, latest or best")
    parser.add_argument(
        "--data",
        nargs="+",
        action="extend",
        default=[],
        metavar="FILE",
        help="eval sets (.jsonl/.json), named by stem or NAME=FILE; default: the validation file",
    )
    parser.add_argument("--batch_size", type=int, default=None, help="pairs per eval batch")
    parser.add_argument(
        "--mesh", default=None, metavar="DATA,FSDP,TENSOR", help="mesh (default: the run's)"
    )
    parser.add_argument("--coordinator_address", default=None, help="multi-process: host:port")
    parser.add_argument("--num_processes", type=int, default=None, help="multi-process runs")
    parser.add_argument("--process_id", type=int, default=None, help="multi-process runs")
    args = parser.parse_args(argv)
    # Like train.py: a multi-host run's checkpoint is restored by every process together.
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    try:
        mesh_shape = None
        if args.mesh:
            try:
                mesh_shape = tuple(int(x) for x in args.mesh.split(","))
            except ValueError:
                mesh_shape = ()
            if len(mesh_shape) != 3:
                raise EvaluateError(
                    f"--mesh={args.mesh!r}: expected three integers DATA,FSDP,TENSOR"
                )
        result = evaluate(
            args.workdir,
            args.step,
            args.data,
            mesh_shape=mesh_shape,
            batch_size=args.batch_size,
        )
    except USER_ERRORS as error:
        raise SystemExit(f"error: {error}") from None
    if jax.process_index() == 0:
        print(format_table(result))
        path = os.path.join(args.workdir, f"eval_{result['step']}.json")
        print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
