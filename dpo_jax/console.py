"""The `dpo-jax` command: `dpo-jax <command> [args]` is `python -m dpo_jax.<module> [args]`.

dpo-jax train --config configs/tiny.py --workdir runs/tiny
dpo-jax evaluate | generate | export | report | rate | tensorboard | data | bench ...
"""

from __future__ import annotations

import runpy
import sys

# command -> (module run as __main__, what it does)
COMMANDS = {
    "train": ("dpo_jax.train", "train or resume (a workdir's checkpoints)"),
    "evaluate": ("dpo_jax.evaluate", "preference accuracy of a checkpoint on held-out pairs"),
    "generate": ("dpo_jax.generate", "replies of a checkpoint (and its reference) to prompts"),
    "export": ("dpo_jax.export", "a checkpoint as a Hugging Face folder"),
    "report": ("dpo_jax.report", "DIR/report.html from a run's files"),
    "rate": ("dpo_jax.rating", "blind human rating sheets of samples, and their scores"),
    "tensorboard": ("dpo_jax.metrics_log", "DIR/tensorboard event files from metrics.jsonl"),
    "data": ("dpo_jax.data", "the data report and first batch, as training will see them"),
    "bench": ("dpo_jax.bench", "train-step throughput and memory benchmark"),
}


def usage() -> str:
    lines = ["usage: dpo-jax <command> [args]   (dpo-jax <command> --help for its args)", ""]
    lines += [f"  {name:<12} {what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    command, *rest = argv
    if command not in COMMANDS:
        print(f"error: dpo-jax: no command {command!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module = COMMANDS[command][0]
    sys.argv = [f"dpo-jax {command}", *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
