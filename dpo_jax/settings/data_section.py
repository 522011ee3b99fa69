"""config.data → DataSettings (the data pipeline's own settings type), and the bound on
sequences per packed row that the model's attention may rely on."""

from __future__ import annotations

from dpo_jax.data import DataError, DataSettings
from dpo_jax.data import cache as data_cache
from dpo_jax.data.sources import parse_mapping, split_list
from dpo_jax.settings.values import check, get, number


def packed_segments_bound(d) -> int | None:
    """The bound on sequences per packed row that cuDNN's packed layout relies on, or None
    (every other case: the mask). The packer enforces the same bound (data batching)."""
    bound = number(d, "max_segments_per_row", "data.max_segments_per_row", int, 0)
    if bound == 0 or not get(d, "packing", False) or get(d, "prefix_sharing", False):
        return None
    check(
        bound >= 2,
        "data.max_segments_per_row",
        bound,
        "use 0 (no bound) or at least 2; one sequence per row is padding (data.packing=False)",
    )
    return bound


def data_settings(d, model_max_length: int | None = None) -> DataSettings:
    """`config.data` (a ConfigDict or dict; keys it lacks take their defaults) → settings."""
    value = lambda key, default=None: get(d, key, default)  # noqa: E731
    max_seq_length = number(d, "max_seq_length", "data.max_seq_length", int)
    check(max_seq_length > 0, "data.max_seq_length", max_seq_length, "a positive number")
    if model_max_length is not None and max_seq_length > model_max_length:
        raise DataError(  # what the data pipeline raised first; its tests expect it
            f"config data.max_seq_length={max_seq_length} exceeds model.max_length="
            f"{model_max_length}; lower one or raise the other"
        )
    validation = [("", spec) for spec in split_list(value("validation_file", ""))][:1]
    validation += list(
        parse_mapping(value("validation_files", ""), "data.validation_files").items()
    )
    cache_dir = value("cache_dir", "")
    weights = tuple(float(w) for w in split_list(value("train_weights", "")))
    buckets = value("bucket_lengths", "")
    packed_rows = number(d, "packed_rows", "data.packed_rows", int, 0)
    shared = bool(value("prefix_sharing", False))
    check(
        packed_rows == 0 or packed_rows >= (1 if shared else 2),
        "data.packed_rows",
        packed_rows,
        "use 0 (sized from the data's lengths) or at least 2 rows (1 with data.prefix_sharing)",
    )
    return DataSettings(
        max_seq_length=max_seq_length,
        max_prompt_length=int(value("max_prompt_length") or 0) or None,
        apply_chat_template=bool(value("apply_chat_template", True)),
        train_sources=tuple(split_list(value("train_file", ""))),
        train_weights=weights,
        validation_sources=tuple(validation),
        format=str(value("format", "auto")),
        fields=tuple(parse_mapping(value("fields", ""), "data.fields").items()),
        roles=tuple(parse_mapping(value("roles", ""), "data.roles").items()),
        system_prompt=str(value("system_prompt", "") or ""),
        ranked_pairs=str(value("ranked_pairs", "best_worst")),
        ranked_ties=str(value("ranked_ties", "error")),
        truncation=str(value("truncation", "truncate")),
        on_error=str(value("on_error", "raise")),
        packing=bool(value("packing", False)),
        packed_rows=packed_rows,
        prefix_sharing=shared,
        max_segments_per_row=int(value("max_segments_per_row", 0)),
        bucket_lengths=buckets if isinstance(buckets, str) else tuple(buckets),
        shuffle=bool(value("shuffle", True)),
        num_proc=int(value("num_proc", 0)),
        cache_dir=None if cache_dir == "none" else (cache_dir or data_cache.default_cache_dir()),
    )
