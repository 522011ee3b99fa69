"""Every command in docs/tutorial.md runs, in order, on the tiny default (shortened)."""

import csv
import os
import re
import shlex
import subprocess
import sys

from conftest import REPO

# Keeps the training command short; everything else runs exactly as written.
SHORT_TRAINING = [
    "--config.training.max_steps=6",
    "--config.training.batch_size=8",
    "--config.eval.every_steps=3",
    "--config.eval.num_sample_prompts=8",
    "--config.checkpoint.every_steps=3",
    "--config.logging.every_steps=2",
]


def tutorial_commands():
    with open(os.path.join(REPO, "docs", "tutorial.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)\n```", f.read(), re.S)
    return [line for block in blocks for line in block.splitlines() if line.strip()]


def fill_sheet(path):
    """What a human rater does between `rating export` and `rating score`."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
        fields = list(rows[0].keys())
    for i, row in enumerate(rows):
        for column in fields:
            if column.startswith(("A_", "B_")):
                row[column] = str(1 + (i + len(column)) % 5)
        row["preferred"] = "AB"[i % 2]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_every_tutorial_command_runs(tmp_path):
    commands = tutorial_commands()
    assert len(commands) >= 7
    workdir = str(tmp_path / "tutorial")
    env = dict(os.environ, XLA_FLAGS="", HF_HUB_OFFLINE="1")
    for command in commands:
        args = shlex.split(command.replace("runs/tutorial", workdir))
        assert args[:2] == ["python", "-m"], command
        args[0] = sys.executable
        if args[2] == "dpo_jax.train":
            args += SHORT_TRAINING
        if args[2:4] == ["dpo_jax.rating", "score"]:
            fill_sheet(args[4])
        done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    for name in ("metrics.jsonl", "report.html", "samples.jsonl", "hf/model.safetensors"):
        assert os.path.exists(os.path.join(workdir, name)), name
