"""Evaluate a training run's checkpoint on one or more preference sets.

    python -m dpo_jax.evaluate --workdir runs/tiny [--step N] [--data FILE ...]

Restores the policy of DIR/checkpoints/<step> (the latest by default), rebuilds the frozen
reference exactly as training built it (the initial policy), and for each named eval set —
the config's data.validation_file as "validation" by default, else each --data FILE named
by its stem (or NAME=FILE) — computes the training eval metrics plus the mean
policy − reference log-ratio of the chosen and rejected completions. Writes
DIR/eval_<step>.json and prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys

import jax
import ml_collections

from dpo_jax import checkpoint, data, hf, sharding, train
from dpo_jax.step import eval_sums

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


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """DIR/config.json (written by train.py) → ConfigDict."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise EvaluateError(f"{path}: not found; is {workdir!r} a training workdir?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def total_steps_of(workdir: str) -> int:
    """The run's schedule length (the optimizer state's structure does not depend on it)."""
    path = os.path.join(workdir, "data_report.json")
    if os.path.exists(path):
        with open(path) as f:
            return int(json.load(f).get("total_steps", 1))
    return 1


def parse_eval_sets(config, data_files) -> dict[str, str]:
    """{name: file}: --data FILE (named by its stem) or NAME=FILE; default the validation file."""
    if not data_files:
        if not config.data.validation_file:
            raise EvaluateError(
                "the run has no data.validation_file; name eval sets with --data FILE"
            )
        return {"validation": config.data.validation_file}
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


def evaluate(
    workdir: str,
    step: int | None = None,
    data_files=None,
    *,
    devices=None,
    mesh_shape: tuple[int, int, int] | None = None,
    batch_size: int | None = None,
) -> dict:
    """Evaluates DIR's checkpoint `step` (latest if None); writes and returns eval_<step>.json.

    Returns {"step", "workdir", "sets": {name: {"file", "pairs", "metrics": {...}}}}.
    """
    config = read_config(workdir)
    mesh_shape = mesh_shape or (config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    mesh = sharding.make_mesh(*mesh_shape, devices)
    # JSON turned the rules' tuples into lists; flax wants (name, axis | (axes…) | None).
    rules = tuple(
        (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.mesh.rules
    )
    model_config = train.model_config_from(config)
    loss_config = train.loss_config_from(config)
    data_settings = data.settings_from_config(config.data, config.model.max_length)
    batch_size = int(batch_size or config.eval.batch_size)
    sharding.check_batch_rows(2 * batch_size, mesh, "eval batch size")
    eval_sets = parse_eval_sets(config, data_files)

    # --- the eval sets first: bad data fails before any model work
    tokenizer = hf.load_tokenizer(config.data.tokenizer or config.model.name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eval_pairs = {
        name: data.load_pairs(path, tokenizer, data_settings)[0] for name, path in eval_sets.items()
    }

    # --- which checkpoint
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    try:
        steps = sorted(ckpt.manager.all_steps())
        if not steps:
            raise EvaluateError(f"{ckpt.directory}: no checkpoints")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise EvaluateError(f"{ckpt.directory}: no checkpoint of step {step} (have {steps})")

        # --- reference = the initial policy, built as train.train builds it; the restored
        # policy takes the same shardings.
        optimizer, _ = train.build_optimizer(config, total_steps_of(workdir))
        shardings = train.state_shardings(model_config, optimizer, mesh, rules)
        initial = train.init_state(config, model_config, optimizer, shardings)
        ref_params = initial.params if loss_config.needs_reference else None
        state, _ = ckpt.restore(step, checkpoint.abstract_like(initial))
        del initial  # its optimizer state; the reference keeps the params alive
    finally:
        ckpt.close()
    params = state.params
    del state

    # --- every eval set
    eval_fn = jax.jit(
        functools.partial(
            eval_sums, model_config=model_config, loss_config=loss_config, padded_rows=True
        )
    )

    result = {"step": int(step), "workdir": os.path.abspath(workdir), "sets": {}}
    for name, pairs in eval_pairs.items():
        batches = data.eval_batches(
            pairs,
            batch_size=batch_size,
            row_length=data_settings.max_seq_length,
            pad_id=pad_id,
            buckets=data.resolve_buckets(
                data_settings.bucket_lengths, data_settings.max_seq_length
            ),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        metrics = train.run_eval(eval_fn, params, ref_params, batches, mesh=mesh)
        metrics = {k: float(v) for k, v in metrics.items()}
        # rewards = β · (policy − reference) log-ratio, on the log-probs the loss saw
        # (per-token averages for averaged losses, reference ≡ 0 when reference-free).
        for side in ("chosen", "rejected"):
            metrics[f"logratio/{side}"] = metrics[f"rewards/{side}"] / loss_config.beta
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


USER_ERRORS = (EvaluateError, *train.USER_ERRORS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m dpo_jax.evaluate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workdir", required=True, help="training run directory")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
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
