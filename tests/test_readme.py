"""The README's commands and examples are what CI runs and what users paste."""

import os
import re
import subprocess
import sys

from conftest import REPO


def readme():
    with open(os.path.join(REPO, "README.md")) as f:
        return f.read()


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_second():
    quickstart = readme().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", quickstart, re.S)
    assert len(commands) == 2
    assert "--config configs/tiny.py --workdir" in commands[0]
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert commands[1] in f.read()


def test_research_example_runs():
    example = re.search(r"```python\n(.*?)\n```", readme(), re.S).group(1)
    assert "from dpo_jax.losses import" in example
    done = subprocess.run(
        [sys.executable, "-c", example],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, XLA_FLAGS=""),
    )
    assert done.returncode == 0, done.stderr
    assert "sigmoid" in done.stdout
