"""Test-only fault injection, driven by environment variables, for the faults no signal can
time from outside (the fault-matrix tests in tests/test_faults.py set them). Unset, every
hook is a no-op costing one dictionary lookup.

    DPO_JAX_PAUSE_AT_STEP=N        after step N is dispatched, wait (up to 10 min) until a
                                   signal asks the run to stop; prints "paused at step N"
    DPO_JAX_PAUSE_SECONDS=S        ...or just S seconds (several processes: only JAX's
                                   pre-emption sync point knows that one was signalled)
    DPO_JAX_KILL_IN_SAVE=N         SIGKILL this process while checkpoint N is being written
    DPO_JAX_DISK_FULL_WRITING=W    the disk fills while W is written: "metrics@N" (half of
                                   step N's row written), "export" (after the first file),
                                   "report" (before report.html)

A full disk during a checkpoint save needs no hook: tests/test_faults.py fills a real tmpfs.
"""

from __future__ import annotations

import errno
import os
import signal
import time


def _step(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value is None else int(value)


def pause_at(step: int, stopping) -> None:
    """Blocks at `step` until `stopping()` is true (a signal arrived)."""
    if _step("DPO_JAX_PAUSE_AT_STEP") != step:
        return
    print(f"paused at step {step}", flush=True)
    if "DPO_JAX_PAUSE_SECONDS" in os.environ:
        time.sleep(float(os.environ["DPO_JAX_PAUSE_SECONDS"]))
        return
    deadline = time.monotonic() + 600
    while not stopping() and time.monotonic() < deadline:
        time.sleep(0.02)


def disk_full(what: str, path: str) -> None:
    """Raises the OSError a full disk gives while `path` is written, if asked for `what`."""
    if os.environ.get("DPO_JAX_DISK_FULL_WRITING") == what:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def write(file, text: str, what: str) -> None:
    """file.write(text); asked to fill the disk at `what`, half of it and then the error."""
    if os.environ.get("DPO_JAX_DISK_FULL_WRITING") == what:
        file.write(text[: len(text) // 2])
        file.flush()
        disk_full(what, file.name)
    file.write(text)


def during_save(step: int) -> None:
    """Called after an (asynchronous) save of `step` has started, before it is waited for."""
    if _step("DPO_JAX_KILL_IN_SAVE") == step:
        os.kill(os.getpid(), signal.SIGKILL)
