"""Precomputed reference log-probs: the frozen reference runs once over the data, not in
every step.

The reference of DPO never changes, so its per-sequence log-probs can be computed in one
forward pass before training and carried in the batches (`ref_logps`). Training then
runs no reference forward (8N → 6N FLOPs per token) and holds no reference weights on the
device, which is what lets an 8B model train on one 80 GB card.

Tables are [pairs, 2] float32 (chosen, rejected) per data set, cached on disk under a key
made of the reference weights (an exact fingerprint of the arrays, whatever their
sharding), the model settings that change the numbers, and the tokenized pairs. A later
run on the same data and model (a sweep over beta, a resumed run) loads them instead.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import progress, sharding
from dpo_jax.data import TokenizedPair
from dpo_jax.data import cache as data_cache

VERSION = 1  # bump when the computation changes in a way the key cannot see


def _leaf_hashes(x: jax.Array) -> jax.Array:
    """Two wrapping uint32 sums of a hash of (element index, value bits). Integer sums are
    exact in any order, so the result does not depend on the mesh."""
    width = jnp.dtype(x.dtype).itemsize * 8
    if width > 32:
        x = x.astype(jnp.float32)
        width = 32
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)
    index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
    h = (bits ^ (index * jnp.uint32(0x9E3779B1))) * jnp.uint32(0x85EBCA77)
    h ^= h >> 13
    g = (bits + index * jnp.uint32(0xC2B2AE3D)) * jnp.uint32(0x27D4EB2F)
    g ^= g >> 15
    return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(g, dtype=jnp.uint32)])


def params_fingerprint(params, mesh) -> str:
    """A hex digest of every parameter's name, shape and dtype, and a 64-bit hash of its
    exact values."""
    named = jax.tree_util.tree_leaves_with_path(params)
    sums = jax.jit(
        lambda leaves: jnp.stack([_leaf_hashes(x) for x in leaves]),
        out_shardings=sharding.replicated(mesh),
    )([x for _, x in named])
    digest = hashlib.sha256(np.asarray(sums).tobytes())
    for path, x in named:
        digest.update(f"{jax.tree_util.keystr(path)}:{x.shape}:{x.dtype};".encode())
    return digest.hexdigest()[:32]


def pairs_fingerprint(pairs: Sequence[TokenizedPair]) -> str:
    """A hex digest of the token ids of every pair, in order."""
    digest = hashlib.sha256(str(len(pairs)).encode())
    for pair in pairs:
        for ids in (pair.prompt, pair.chosen, pair.rejected):
            ids = np.asarray(ids, np.int32)
            digest.update(np.int64(len(ids)).tobytes())  # boundaries are part of the key
            digest.update(ids.tobytes())
    return digest.hexdigest()[:32]


def table_key(
    weights: str, model_config, pairs: Sequence[TokenizedPair], ld_alpha: float = 1.0
) -> str:
    # Remat changes memory, not values; everything else in the model config may change them.
    numeric = dataclasses.replace(model_config, remat_policy="none")
    parts = ["reference_logps", VERSION, weights, repr(numeric), pairs_fingerprint(pairs)]
    if ld_alpha != 1.0:  # LD-DPO's log-probs (plain ones keep their earlier keys)
        parts.append(f"ld_alpha={ld_alpha!r}")
    return data_cache.cache_key(*parts)


def load_table(cache_dir: str, key: str, num_pairs: int) -> np.ndarray | None:
    path = os.path.join(cache_dir, f"{key}.npy")
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return table if table.shape == (num_pairs, 2) else None


def save_table(cache_dir: str, key: str, table: np.ndarray) -> str:
    """Written under a unique name and renamed: readers never see half a file, and
    several processes may write the same entry."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"{key}.npy")
    temporary = f"{path}.{uuid.uuid4().hex}.tmp.npy"
    np.save(temporary, table)
    os.replace(temporary, path)
    return path


def compute_table(
    logps_fn: Callable[[dict], jax.Array],
    batches: Iterable[dict],
    num_pairs: int,
    batch_size: int,
    mesh,
    what: str = "reference log-probs",
) -> np.ndarray:
    """[num_pairs, 2] from eval batches in file order (batch b holds pairs b·batch_size…);
    `logps_fn(placed batch)` returns the replicated per-sequence log-probs [2·batch_size]."""
    table = np.zeros((num_pairs, 2), np.float32)
    batches = progress.bar(batches, what=what, unit="batch", total=-(-num_pairs // batch_size))
    for b, batch in enumerate(batches):
        logps_S = np.asarray(logps_fn(sharding.put_batch(batch, mesh, row_axis=0)))
        start = b * batch_size
        count = min(batch_size, num_pairs - start)
        table[start : start + count] = logps_S[: 2 * count].reshape(count, 2)
    return table


def all_processes_agree(have: bool) -> bool:
    """True only if every process has it (each process decides the same way, so either all
    of them compute, a collective, or none)."""
    if jax.process_count() == 1:
        return have
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([have], np.int32))
    return bool(np.all(flags))


def precompute_tables(
    named_pairs: dict[str, Sequence[TokenizedPair]],
    *,
    weights_fingerprint: str,
    model_config,
    logps_fn: Callable[[dict], jax.Array],
    batches: Callable[[Sequence[TokenizedPair]], Iterable[dict]],
    batch_size: int,
    mesh,
    cache_dir: str,
    log: Callable[[str], None] = print,
    ld_alpha: float = 1.0,
) -> dict[str, np.ndarray]:
    """One table per named data set: loaded from `cache_dir`, else computed and saved."""
    tables = {}
    for name, pairs in named_pairs.items():
        key = table_key(weights_fingerprint, model_config, pairs, ld_alpha)
        table = load_table(cache_dir, key, len(pairs))
        if all_processes_agree(table is not None):
            log(f"reference log-probs of {name}: {len(pairs)} pairs loaded from {cache_dir}")
        else:
            log(f"reference log-probs of {name}: computing {len(pairs)} pairs")
            started = time.perf_counter()
            table = compute_table(
                logps_fn, batches(pairs), len(pairs), batch_size, mesh, what=f"reference {name}"
            )
            if not np.all(np.isfinite(table)):
                raise FloatingPointError(
                    f"reference log-probs of {name} are not finite: check the model weights "
                    "and model.dtype"
                )
            seconds = time.perf_counter() - started
            try:
                where = f"→ {save_table(cache_dir, key, table)}"
            except OSError as error:  # the table is in memory: training goes on
                where = f"(not cached: {error})"
            log(
                f"reference log-probs of {name}: {len(pairs)} pairs computed in "
                f"{seconds:.1f} s {where}"
            )
        tables[name] = table
    return tables


def cache_dir_for(data_cache_dir: str | None, workdir: str) -> str:
    """Reference tables live in the tokenization cache (shared by runs on the same data and
    model), or in the workdir when there is none (data.cache_dir="none")."""
    return os.path.join(data_cache_dir or workdir, "reference_logps")


def precompute(
    logps_fn: Callable,
    params,
    train_pairs: Sequence[TokenizedPair],
    eval_sets: dict[str, Sequence[TokenizedPair]],
    *,
    model_config,
    batches: Callable[[Sequence[TokenizedPair]], Iterable[dict]],
    batch_size: int,
    mesh,
    cache_dir: str,
    ld_alpha: float = 1.0,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Reference log-probs of the training pairs and of every eval set (by name; "" = the
    validation file) from `params` (the initial policy, which is the reference);
    `logps_fn(params, placed batch)` is the jitted per-sequence forward. Process 0 prints
    what was loaded or computed."""
    named = {"training data": train_pairs}
    named |= {
        f"eval set {name!r}" if name else "validation data": pairs
        for name, pairs in eval_sets.items()
    }
    tables = precompute_tables(
        named,
        weights_fingerprint=params_fingerprint(params, mesh),
        model_config=model_config,
        logps_fn=functools.partial(logps_fn, params),
        batches=batches,
        batch_size=batch_size,
        mesh=mesh,
        cache_dir=cache_dir,
        log=lambda line: print(line, flush=True) if jax.process_index() == 0 else None,
        ld_alpha=ld_alpha,
    )
    train_table = tables.pop("training data")
    return train_table, dict(zip(eval_sets, tables.values(), strict=True))
