"""Progress bars for the phases that take more than a few seconds (tokenization, the
reference precompute, evaluation, sampling, export): a tqdm bar with rate and ETA on a
terminal, on process 0 only. When stderr is not a terminal (a SLURM or CI log) there is no
bar: those logs keep only the periodic lines each phase prints itself."""

from __future__ import annotations

import sys
from collections.abc import Iterable


def on_terminal() -> bool:
    if not sys.stderr.isatty():
        return False
    # Not importing JAX here (seconds, for `python -m dpo_jax.data.bench`): a process that
    # has not loaded it is no part of a multi-process run.
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


def bar(iterable: Iterable, *, what: str, unit: str, total: int | None = None) -> Iterable:
    """`iterable` itself, shown as a bar while it is consumed where there is a terminal."""
    if not on_terminal():
        return iterable
    from tqdm import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=what,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr,
    )
