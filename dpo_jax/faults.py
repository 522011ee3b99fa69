"""Test-only fault injection, driven by environment variables, for the faults no signal can
time from outside (the fault-matrix tests in tests/test_faults.py set them). Unset, every
hook is a no-op costing one dictionary lookup.

    DPO_JAX_PAUSE_AT_STEP=N        after step N is dispatched, wait (up to 10 min) until a
                                   signal asks the run to stop; prints "paused at step N"
    DPO_JAX_PAUSE_SECONDS=S        ...or just S seconds (several processes: only JAX's
                                   pre-emption sync point knows that one was signalled)
    DPO_JAX_KILL_IN_SAVE=N         SIGKILL this process while checkpoint N is being written
    DPO_JAX_DISK_FULL_AT_SAVE=N    checkpoint N's save fails with ENOSPC (No space left)
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


def before_save(step: int) -> None:
    if _step("DPO_JAX_DISK_FULL_AT_SAVE") == step:
        raise OSError(errno.ENOSPC, f"No space left on device (saving checkpoint {step})")


def during_save(step: int) -> None:
    """Called after an (asynchronous) save of `step` has started, before it is waited for."""
    if _step("DPO_JAX_KILL_IN_SAVE") == step:
        os.kill(os.getpid(), signal.SIGKILL)
