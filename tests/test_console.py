"""The `dpo-jax` console command ([project.scripts]) runs the same programs as `python -m`."""

import os
import subprocess
import sys

import pytest

from dpo_jax import console

SCRIPT = os.path.join(os.path.dirname(sys.executable), "dpo-jax")


def run(*args):
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=300)


def test_the_installed_command_lists_its_commands_and_runs_one(tmp_path):
    assert os.path.isfile(SCRIPT), f"{SCRIPT}: not installed (pip install -e .)"
    listing = run("--help")
    assert listing.returncode == 0
    for name in console.COMMANDS:
        assert f"  {name} " in listing.stdout
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 0.69}\n')
    done = run("report", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert os.path.isfile(tmp_path / "report.html")


def test_an_unknown_command_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        console.main(["trian"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.startswith("error: dpo-jax: no command 'trian'")


def test_every_command_names_a_runnable_module():
    import importlib.util

    for module, _ in console.COMMANDS.values():
        spec = importlib.util.find_spec(module)
        assert spec is not None, module
        if spec.submodule_search_locations:  # a package: python -m runs its __main__
            assert importlib.util.find_spec(module + ".__main__") is not None, module
