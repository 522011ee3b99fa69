"""The fault matrix, with the real CLI on the embedded default: every fault ends in one clear
line and an exit status that says what happened, loses nothing (the last good checkpoint
intact, metrics.jsonl consistent with it), and re-running the same command continues exactly
as an uninterrupted run (every metrics row equal). Faults no signal can time from outside
come from dpo_jax.faults' test-only environment hooks."""

import asyncio
import contextlib
import gc
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import pytest
from conftest import (
    FAST,
    REPO,
    assert_rows_close,
    fast_config,
    load_config,
    read_metrics,
)

from dpo_jax import checkpoint, cli, report, settings, train
from dpo_jax.step import NonFiniteError

STEPS = 8
# Checkpoints every 2 steps, 2 kept; the 64-pair training file; one device like the baseline.
RUN = {"training.max_steps": STEPS, "checkpoint.every_steps": 2, "eval.every_steps": 4}
DEADLINE_S = 600  # a CLI run takes ~15 s on an idle 2-core machine


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, small_train, small_validation):
    """The uninterrupted run every faulted one must equal."""
    workdir = str(tmp_path_factory.mktemp("uninterrupted"))
    overrides = RUN | {"data.train_file": small_train}
    train.train(fast_config(small_validation, **overrides), workdir, devices=jax.devices()[:1])
    return workdir


def cli_args(workdir, small_train, small_validation, **overrides):
    values = FAST | RUN | {"data.train_file": small_train}
    values |= {"data.validation_file": small_validation} | overrides
    args = [sys.executable, "-m", "dpo_jax.train", "--config", f"{REPO}/configs/tiny.py"]
    return args + ["--workdir", workdir] + [f"--config.{k}={v}" for k, v in values.items()]


def start(args, log_path, **env):
    log = open(log_path, "w")  # noqa: SIM115  (the child writes it; closed by the OS)
    return subprocess.Popen(
        args,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, XLA_FLAGS="", **env),
        cwd=REPO,
    )


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def wait_for(process, log_path, text) -> None:
    deadline = time.time() + DEADLINE_S
    while text not in read(log_path):
        assert process.poll() is None, read(log_path)[-3000:]
        assert time.time() < deadline, f"no {text!r} in time:\n{read(log_path)[-3000:]}"
        time.sleep(0.05)


def finish(process, log_path) -> tuple[int, str]:
    process.wait(timeout=DEADLINE_S)
    return process.returncode, read(log_path)


def run_cli(args, log_path, **env) -> tuple[int, str]:
    return finish(start(args, log_path, **env), log_path)


def assert_one_line_error(output: str, *fragments: str) -> None:
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, output[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def assert_continues_exactly(baseline, workdir, args, tmp_path, resumed_from):
    code, output = run_cli(args, tmp_path / "resume.log")
    assert code == 0, output[-3000:]
    assert f"resumed from step {resumed_from} " in output, output[-3000:]
    expected, got = read_metrics(baseline), read_metrics(workdir)
    assert [r["step"] for r in expected] == [r["step"] for r in got]
    for a, b in zip(expected, got, strict=True):
        assert_rows_close(a, b)
    assert os.path.isdir(os.path.join(workdir, "hf"))


def interrupt(args, log_path, pause_at, *signals):
    """Runs `args` paused after step `pause_at`, sends `signals` (each once the previous one
    was acknowledged), and returns (exit status, output)."""
    process = start(args, log_path, DPO_JAX_PAUSE_AT_STEP=str(pause_at))
    wait_for(process, log_path, f"paused at step {pause_at}")
    for number, sig in enumerate(signals):
        if number:  # the first Ctrl-C's notice: the run is saving
            wait_for(process, log_path, "stopping: saving at the end of this step")
        process.send_signal(sig)
    return finish(process, log_path)


def test_sigterm_ctrl_c_and_a_second_ctrl_c_each_stop_and_resume_exactly(
    baseline, small_train, small_validation, tmp_path
):
    """One workdir through the three interruptions in a row; the last re-run ends as the
    uninterrupted run (every metrics row)."""
    workdir = str(tmp_path / "run")
    args = cli_args(workdir, small_train, small_validation, **{"checkpoint.async_save": True})

    # SIGTERM (a scheduler): the step ends, checkpoint 4 is saved, exit 143, no traceback.
    code, output = interrupt(args, tmp_path / "term.log", 3, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, output[-3000:]
    assert "pre-empted: saved step 4" in output and "Traceback" not in output, output[-3000:]
    assert checkpoint.Checkpointer(workdir).steps() == [2, 4]

    # Ctrl-C: the same from the resumed run, exit 130.
    code, output = interrupt(args, tmp_path / "int.log", 4, signal.SIGINT)
    assert code == 128 + signal.SIGINT, output[-3000:]
    assert "resumed from step 4 " in output and "pre-empted: saved step 5" in output
    assert "Traceback" not in output, output[-3000:]
    assert checkpoint.Checkpointer(workdir).steps() == [4, 5]

    # Ctrl-C twice: stops at once (exit 130). Whichever async saves (steps 6 and 7) the
    # second one cut short, a complete checkpoint is what the re-run continues from.
    code, output = interrupt(args, tmp_path / "twice.log", 6, signal.SIGINT, signal.SIGINT)
    assert code == 130 and "Traceback" not in output, output[-3000:]
    last = checkpoint.Checkpointer(workdir).steps()[-1]
    assert last in (5, 6, 7), checkpoint.Checkpointer(workdir).steps()
    assert_continues_exactly(baseline, workdir, args, tmp_path, resumed_from=last)


def folder_bytes(path) -> int:
    return sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, files in os.walk(path)
        for name in files
    )


@contextlib.contextmanager
def small_disk(path, size_bytes):
    """A real tmpfs of `size_bytes` at `path` (this machine's CI runs as root), and a way to
    free space on it: remount it larger, contents kept."""
    os.makedirs(path)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, f"this test mounts a tmpfs and needs root: {done.stderr}"

    def grow(new_size):
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(path)], check=True)

    try:
        yield grow
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_disk_full_kill_in_save_damaged_checkpoint_and_torn_log_line_all_resume(
    baseline, small_train, small_validation, tmp_path
):
    """One workdir on a small real disk through five faults in a row, each leaving the last
    good checkpoint and a re-run that continues; the last ends as the uninterrupted run."""
    # Room for the run's logs and two checkpoints and a half: the third (6) fills the disk.
    checkpoint_bytes = folder_bytes(os.path.join(baseline, "checkpoints", str(STEPS)))
    logs_bytes = folder_bytes(baseline) - folder_bytes(os.path.join(baseline, "checkpoints"))
    logs_bytes -= folder_bytes(os.path.join(baseline, "hf"))
    with small_disk(tmp_path / "disk", int(2.5 * checkpoint_bytes + 2 * logs_bytes)) as grow:
        workdir = str(tmp_path / "disk" / "run")
        args = cli_args(workdir, small_train, small_validation, **{"checkpoint.async_save": True})
        ckpt_dir = os.path.join(workdir, "checkpoints")

        # 1. The disk fills while checkpoint 6 is written in the background: the next log
        # step stops the run in one line, exit 1; its half is removed, 2 and 4 are intact.
        code, output = run_cli(args, tmp_path / "full.log")
        assert code == 1, output[-3000:]
        assert_one_line_error(output, "checkpoint 6 could not be written (disk full", "4 is intact")
        assert checkpoint.Checkpointer(workdir).steps() == [2, 4]
        assert sorted(os.listdir(ckpt_dir)) == ["2", "4"]
        grow("512m")  # space freed

        # 2. Killed (SIGKILL) while the async save of checkpoint 6 is in flight: the re-run
        # resumes from 4; the half-written 6 is never taken for a checkpoint.
        code, output = run_cli(args, tmp_path / "kill.log", DPO_JAX_KILL_IN_SAVE="6")
        assert code == -signal.SIGKILL, output[-3000:]
        assert "resumed from step 4 " in output
        assert checkpoint.Checkpointer(workdir).steps() == [2, 4]

        # 3. Checkpoint 4's weights are truncated: the re-run says so and falls back to 2; then
        # the disk fills while step 5's metrics row is written: one line, a torn last row.
        for folder, _, files in os.walk(os.path.join(ckpt_dir, "4", "state")):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)
        code, output = run_cli(
            args, tmp_path / "damaged.log", DPO_JAX_DISK_FULL_WRITING="metrics@5"
        )
        assert code == 1, output[-3000:]
        assert "checkpoint 4 cannot be restored" in output and "resumed from step 2 " in output
        assert_one_line_error(output, "No space left on device", "metrics.jsonl", "re-run")
        assert not read(os.path.join(workdir, "metrics.jsonl")).endswith("\n")

        # 4. The disk fills during the export: no half model in hf/, checkpoint 8 intact.
        code, output = run_cli(args, tmp_path / "export.log", DPO_JAX_DISK_FULL_WRITING="export")
        assert code == 1, output[-3000:]
        assert "resumed from step 4 " in output
        assert_one_line_error(output, "No space left on device", "model.safetensors")
        assert os.listdir(os.path.join(workdir, "hf")) == []
        assert checkpoint.Checkpointer(workdir).latest_step() == STEPS

        # 5. The re-run exports and ends as the uninterrupted run, every metrics row equal.
        assert_continues_exactly(baseline, workdir, args, tmp_path, resumed_from=STEPS)
        assert os.path.isfile(os.path.join(workdir, "hf", "model.safetensors"))


def _unretrieved_task_error_log(code_file: str) -> str:
    """What asyncio logs when the collector frees a task whose error nobody retrieved, as
    Orbax's sibling writes do after a full disk, for a coroutine compiled as `code_file`."""
    namespace = {}
    exec(
        compile("async def write():\n    raise OSError(28, 'No space left')", code_file, "exec"),
        namespace,
    )
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    only_these = cli._OneLineBackgroundErrors()
    logging.getLogger("asyncio").addFilter(only_these)
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(namespace["write"]())
        loop.run_until_complete(asyncio.sleep(0))
        del task
        gc.collect()  # the collector logs the error, at a moment a run cannot choose
    finally:
        loop.close()
        logging.getLogger("asyncio").removeFilter(only_these)
        logging.getLogger().removeHandler(handler)
    return stream.getvalue()


def test_orbax_tasks_unretrieved_errors_log_one_line_and_others_keep_their_traceback():
    """The asyncio half of the full-disk test's "no traceback", which that test sees only when
    the collector runs before the process ends."""
    orbax_log = _unretrieved_task_error_log("/site-packages/orbax/checkpoint/serialization.py")
    assert "Task exception was never retrieved" in orbax_log, orbax_log
    assert "Traceback" not in orbax_log and len(orbax_log.splitlines()) == 1, orbax_log
    ours_log = _unretrieved_task_error_log("/work/dpo_jax/something.py")
    assert "Traceback" in ours_log, ours_log  # a bug of ours is never hidden


def test_a_full_disk_leaves_the_previous_report(baseline, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    shutil.copytree(baseline, workdir)
    before = read(report.write_report(workdir))
    monkeypatch.setenv("DPO_JAX_DISK_FULL_WRITING", "report")
    with pytest.raises(OSError, match="No space left on device"):
        report.write_report(workdir)
    assert read(os.path.join(workdir, "report.html")) == before
    assert not os.path.exists(os.path.join(workdir, "report.html.tmp"))


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_checkpoint(
    small_train, small_validation, tmp_path
):
    """beta = 1e38 makes the gradients infinite from the first step: the run stops there
    with nothing NaN saved, evaluated or exported (the CLI turns the error into one line and
    exit 1, as for the disk-full fault)."""
    workdir = str(tmp_path / "run")
    overrides = RUN | {"data.train_file": small_train, "training.beta": 1e38}
    with pytest.raises(NonFiniteError, match="at step 0: .*training.nonfinite=skip") as error:
        train.train(fast_config(small_validation, **overrides), workdir, devices=jax.devices()[:1])
    assert "\n" not in str(error.value)
    assert checkpoint.Checkpointer(workdir).steps() == []
    assert not os.path.exists(os.path.join(workdir, "hf"))
    assert not any("eval/loss" in row for row in read_metrics(workdir))


def test_nonfinite_steps_are_skipped_when_asked(small_train, small_validation, tmp_path):
    overrides = RUN | {"data.train_file": small_train, "training.nonfinite": "skip"}
    overrides |= {"training.max_steps": 3, "training.beta": 1e38, "checkpoint.export_hf": False}
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    result = train.train(
        fast_config(small_validation, **overrides), str(tmp_path), devices=jax.devices()[:1]
    )
    # An in-process run (a notebook, a test) leaves Ctrl-C and SIGTERM as they were.
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers
    rows = [row for row in read_metrics(str(tmp_path)) if "loss" in row]
    assert [row["nonfinite_steps"] for row in rows] == [1.0, 2.0, 3.0]
    assert int(result.state.nonfinite_steps) == 3 and int(result.state.first_nonfinite_step) == 0
    # No update was applied: the weights are still the reference's.
    jax.tree.map(
        lambda a, b: None if (a == b).all() else pytest.fail("weights moved"),
        result.state.params,
        result.ref_params,
    )


def test_a_resume_with_a_changed_config_is_refused_unless_allowed(
    baseline, small_train, small_validation, tmp_path
):
    workdir = str(tmp_path / "run")
    shutil.copytree(baseline, workdir)
    config_json = read(os.path.join(workdir, "config.json"))
    base = RUN | {"data.train_file": small_train}

    def resume(allow=(), **changes):
        config = fast_config(small_validation, **base | changes)
        return train.train(config, workdir, devices=jax.devices()[:1], allow_changed=allow)

    with pytest.raises(settings.ConfigError, match=r"training.beta: 0.1 -> 0.2.*allow_changed"):
        resume(**{"training.beta": 0.2})
    with pytest.raises(settings.ConfigError, match="another model, data or batch"):
        resume(allow=("data.max_seq_length",), **{"data.max_seq_length": 64})
    assert read(os.path.join(workdir, "config.json")) == config_json  # nothing written
    # What is logged or how often it is saved may change; more steps when allowed.
    resume(**{"logging.every_steps": 2, "checkpoint.export_hf": False})
    resume(allow=("training.max_steps",), **{"training.max_steps": STEPS + 2})
    assert checkpoint.Checkpointer(workdir).latest_step() == STEPS + 2


def test_a_second_run_on_a_workdir_refuses_to_start(small_train, small_validation, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    lock = checkpoint.WorkdirLock(workdir)  # a run in progress
    try:
        code, output = run_cli(cli_args(workdir, small_train, small_validation), tmp_path / "l")
    finally:
        lock.release()
    assert code == 2
    assert_one_line_error(output, "is in use by another run", f"pid {os.getpid()}")
    assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("training.betaa=1", '--config.training.betaa: no such config key; Did you mean "beta"'),
        ("training.batch_size=-1", "config training.batch_size=-1: a positive number"),
        ("model.name=/nonexistent/model", "/nonexistent/model"),
        ("training.beta=abc", "--config.training.beta=abc: could not convert string to float"),
    ],
    ids=["typo", "out_of_range", "missing_model", "bad_type"],
)
def test_bad_config_is_one_line_exit_2(override, fragment, small_train, small_validation, tmp_path):
    args = cli_args(str(tmp_path / "run"), small_train, small_validation)
    code, output = run_cli(args + [f"--config.{override}"], tmp_path / "bad.log")
    assert code == 2, output[-3000:]
    assert_one_line_error(output, fragment)


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("training.beta", -0.1, "a positive number"),
        ("training.learning_rate", -1e-3, "a learning rate >= 0"),
        ("training.gradient_accumulation_steps", 3, "a positive divisor of training.batch_size"),
        ("training.num_epochs", 0, "a positive number of epochs"),
        ("eval.batch_size", 0, "a positive number of pairs"),
        ("logging.every_steps", 0, "a positive number"),
        ("checkpoint.every_steps", 0, "a positive number of steps"),
        ("checkpoint.max_to_keep", 0, "at least 1"),
        ("training.nonfinite", "maybe", "stop (end the run"),
        ("data.max_segments_per_row", 1, "at least 2"),
        ("model.init", "zeros", "use 'pretrained'"),
        ("training.beta", "abc", "expected a number"),
        ("training.sft_normalization", "tokens", "use 'pair'"),
        ("training.f_divergence_type", "kl", "use one of reverse_kl"),
        ("training.f_divergence_type", "forward_kl", "not nca_pair; keep reverse_kl"),
        ("data.packed_rows", 1, "at least 2 rows"),
        ("training.use_weighting", True, "aot compares the batch's sorted ratios"),
        ("training.ld_alpha", 1.5, "a weight in [0, 1]"),
    ],
)
def test_every_out_of_range_value_names_its_key(key, value, fragment):
    values = load_config("tiny").to_dict()
    section, name = key.split(".")
    values[section][name] = value
    values["data"]["packing"] = key in ("data.max_segments_per_row", "data.packed_rows")
    if value == "forward_kl":
        values["training"]["loss_type"] = "nca_pair"
    if key == "training.use_weighting":
        values["training"]["loss_type"] = "aot"
    with pytest.raises(settings.ConfigError, match=f"config {key}=") as error:
        settings.from_config(ml_collections.ConfigDict(values))
    assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_a_misspelt_override_or_a_missing_key_names_the_key():
    with pytest.raises(KeyError, match="training.learnig_rate: not a config key"):
        load_config("tiny", **{"training.learnig_rate": 1e-3})
    values = load_config("tiny").to_dict()
    del values["training"]["adam_b2"]  # a config.json of an older version, say
    with pytest.raises(settings.ConfigError, match="config has no key training.adam_b2"):
        settings.from_config(ml_collections.ConfigDict(values))


def test_a_missing_or_failing_config_file_is_one_line_exit_2(tmp_path):
    failing = tmp_path / "failing.py"
    failing.write_text("def get_config():\n    return 1 / 0\n")
    for config, fragment in [
        (tmp_path / "missing.py", "missing.py: no such file"),
        (failing, "get_config() failed (ZeroDivisionError"),
    ]:
        args = [sys.executable, "-m", "dpo_jax.train", "--config", str(config), "--workdir", "w"]
        code, output = run_cli(args, tmp_path / "bad.log")
        assert code == 2, output[-3000:]
        assert_one_line_error(output, fragment)


@pytest.mark.parametrize(
    "config, fragment",
    [
        ("configs/tiny.py", "no bench section"),
        ("configs/bench.py:nope", "bench.preset='nope': choose tiny or one of"),
    ],
)
def test_a_bad_benchmark_config_is_one_line_exit_2(config, fragment, tmp_path):
    args = [sys.executable, "-m", "dpo_jax.bench", "--config", f"{REPO}/{config}"]
    code, output = run_cli(args, tmp_path / "bench.log")
    assert code == 2, output[-3000:]
    assert_one_line_error(output, fragment)
