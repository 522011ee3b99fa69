"""On-disk cache of tokenized sources, keyed by everything that changes the token ids.

One entry per source: DIR/<key>/pairs.arrow (Arrow IPC: where, prompt_ids, chosen_ids,
rejected_ids) and DIR/<key>/meta.json (record counts, skips, truncations: the source's part
of the data report). The key hashes the source's content (file bytes or the dataset's
fingerprint), the tokenizer (vocabulary, merges, special tokens, chat template) and every
setting of layout and lengths. Entries are written to a temporary folder and renamed, so
concurrent processes (several hosts on a shared disk) never read half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid

CACHE_VERSION = 1  # bump when tokenization changes in a way the key cannot see


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "dpo_jax", "data")


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], default=str).encode()).hexdigest()[
        :32
    ]


def load(cache_dir: str | None, key: str):
    """(Arrow table, meta) or None."""
    if not cache_dir:
        return None
    folder = os.path.join(cache_dir, key)
    try:
        import pyarrow.feather as feather

        with open(os.path.join(folder, "meta.json")) as f:
            meta = json.load(f)
        return feather.read_table(os.path.join(folder, "pairs.arrow"), memory_map=True), meta
    except (OSError, ValueError):
        return None


def save(cache_dir: str | None, key: str, table, meta: dict) -> None:
    if not cache_dir:
        return
    import pyarrow.feather as feather

    os.makedirs(cache_dir, exist_ok=True)
    folder = os.path.join(cache_dir, key)
    temporary = f"{folder}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(temporary)
    try:
        feather.write_feather(
            table, os.path.join(temporary, "pairs.arrow"), compression="uncompressed"
        )
        with open(os.path.join(temporary, "meta.json"), "w") as f:
            json.dump(meta, f)
        os.rename(temporary, folder)
    except OSError:
        if not os.path.isdir(folder):  # another process won the race: theirs is as good
            raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
