"""Two processes × 4 emulated CPU devices through launch/local.sh equal one process, and a
killed two-process run resumes with the same command. The two-process run uses precomputed
reference log-probs (computed by both processes, loaded from the cache on resume) against
the one-process run's in-step reference."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import FAST, REPO, assert_rows_close, fast_config, read_metrics
from safetensors.numpy import load_file

from dpo_jax import train

STEPS = 6


def launch_args(workdir, small_validation, cache_dir):
    args = [
        "bash",
        os.path.join(REPO, "launch", "local.sh"),
        "2",
        "--",
        "--config",
        os.path.join(REPO, "configs", "tiny.py"),
        "--workdir",
        workdir,
    ]
    args += [f"--config.{k}={v}" for k, v in FAST.items()]
    args += [
        f"--config.data.validation_file={small_validation}",
        f"--config.training.max_steps={STEPS}",
        "--config.mesh.fsdp=-1",
        "--config.training.precompute_ref_log_probs=True",
        f"--config.data.cache_dir={cache_dir}",
    ]
    return args


def launch_env():
    # Each process sets its own device count; don't inherit the test session's 8.
    return dict(os.environ, PYTHON=sys.executable, XLA_FLAGS="", DEVICES_PER_PROCESS="4")


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, small_validation):
    workdir = str(tmp_path_factory.mktemp("single"))
    train.train(
        fast_config(small_validation, **{"training.max_steps": STEPS}),
        workdir,
        devices=jax.devices()[:1],
    )
    return workdir


def test_two_processes_killed_and_resumed_match_one_process(
    single_process, small_validation, tmp_path
):
    workdir = str(tmp_path / "two")
    args = launch_args(workdir, small_validation, str(tmp_path / "cache" / "data"))
    process = subprocess.Popen(
        args,
        env=launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    checkpoint = os.path.join(workdir, "checkpoints", "2")
    deadline = time.time() + 300
    while not os.path.isdir(checkpoint) and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both trainers, no clean-up
    output = process.communicate()[0].decode(errors="replace")
    assert os.path.isdir(checkpoint), output[-3000:]
    assert not os.path.isdir(os.path.join(workdir, "checkpoints", str(STEPS))), "killed too late"

    finished = subprocess.run(args, env=launch_env(), capture_output=True, text=True, timeout=420)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "resumed from step" in finished.stdout
    assert "reference log-probs of training data: 3000 pairs computed" in output
    assert "reference log-probs of training data: 3000 pairs loaded" in finished.stdout
    assert "'data': 1, 'fsdp': 8" in finished.stdout  # one mesh over both processes

    expected, got = read_metrics(single_process), read_metrics(workdir)
    assert [r["step"] for r in expected] == [r["step"] for r in got]
    for a, b in zip(expected, got, strict=True):
        assert_rows_close(a, b)

    # Both processes took part in the export at the end; it matches the one-process export
    # (same files, weights equal to float rounding of the two runs' last updates).
    one, two = os.path.join(single_process, "hf"), os.path.join(workdir, "hf")
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    a, b = (
        load_file(os.path.join(one, "model.safetensors")),
        load_file(os.path.join(two, "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
