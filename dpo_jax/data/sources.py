"""Where records come from, each with its location for messages.

A source is a string:
  path/to/file.jsonl             one file (.jsonl, .json, .parquet)
  data/*.parquet                 a glob (sorted; all matches form one source)
  hf:ORG/NAME[:CONFIG][@SPLIT]   datasets.load_dataset(ORG/NAME, CONFIG, split=SPLIT);
                                 SPLIT defaults to "train" and may slice ("train[:1000]");
                                 a local folder works the same (hf:/data/my_set@test), as does
                                 a folder written by Dataset.save_to_disk
Config values that hold several sources separate them by commas (or are lists).
Locations: "file:line" for JSON lines and JSON lists, "file:row N" for parquet and datasets.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .problems import DataError, Problems

HUB_PREFIX = "hf:"
EXTENSIONS = (".jsonl", ".json", ".parquet")
Records = Iterator[tuple[str, Any]]
_WHITESPACE = re.compile(r"[ \t\n\r]*")


@dataclasses.dataclass(frozen=True)
class Source:
    spec: str  # as written in the config
    files: tuple[str, ...] = ()  # local files, for file sources
    hub: tuple[str, str | None, str] | None = None  # (path, config name, split)


def split_list(value) -> list[str]:
    """ "a,b" or ["a", "b"] → ["a", "b"]; None and "" → []."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value]


def parse_mapping(value, what: str) -> dict[str, str]:
    """ "k=v,k2=v2" or a mapping → {k: v} (config values that must survive CLI overrides)."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping) or hasattr(value, "items"):
        return {str(k): str(v) for k, v in value.items()}
    mapping = {}
    for item in split_list(value):
        key, sep, val = item.partition("=")
        if not sep or not key.strip() or not val.strip():
            raise DataError(f"config {what}={value!r}: expected 'key=value,key2=value2'")
        mapping[key.strip()] = val.strip()
    return mapping


def resolve_source(spec: str) -> Source:
    """Checks that a source exists; expands globs."""
    if spec.startswith(HUB_PREFIX):
        rest, at, split = spec[len(HUB_PREFIX) :].rpartition("@")
        if not at:
            rest, split = split, "train"
        path, _, name = rest.partition(":")
        if not path:
            raise DataError(f"data source {spec!r}: expected hf:ORG/NAME[:CONFIG][@SPLIT]")
        return Source(spec, hub=(path, name or None, split or "train"))
    files = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not files:
        raise DataError(f"data source {spec!r}: no files match")
    for path in files:
        if not os.path.isfile(path):
            hint = f"; for a dataset folder write hf:{path}" if os.path.isdir(path) else ""
            raise DataError(f"{path}: file not found{hint}")
        if not path.endswith(EXTENSIONS):
            raise DataError(f"{path}: unsupported file type; use {', '.join(EXTENSIONS)}")
    return Source(spec, files=tuple(files))


# ---------------------------------------------------------------------------- files


def read_jsonl(path: str, problems: Problems) -> Records:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            where = f"{path}:{line_number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.add("invalid_utf8", where, f"invalid UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                problems.add(
                    "malformed_json", where, f"malformed JSON ({e.msg} at column {e.colno})"
                )


def read_json(path: str, problems: Problems) -> Records:
    """A JSON list of records, each located by the line it starts on. A file whose text
    starts with "{" is JSON lines (what Dataset.to_json writes)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    pos = _WHITESPACE.match(text).end()
    if text[pos : pos + 1] == "{":
        yield from read_jsonl(path, problems)
        return
    if text[pos : pos + 1] != "[":
        raise DataError(f"{path}: expected a JSON list of records (or JSON lines)")
    decoder = json.JSONDecoder()
    pos = _WHITESPACE.match(text, pos + 1).end()
    line, counted = 1, 0
    if text[pos : pos + 1] == "]":
        return
    while True:
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"
            ) from None
        line += text.count("\n", counted, pos)
        counted = pos
        yield f"{path}:{line}", record
        pos = _WHITESPACE.match(text, end).end()
        if text[pos : pos + 1] == ",":
            pos = _WHITESPACE.match(text, pos + 1).end()
        elif text[pos : pos + 1] == "]":
            return
        else:
            at = line + text.count("\n", counted, pos)
            raise DataError(f"{path}:{at}: malformed JSON (expected ',' or ']' after a record)")


def read_parquet(path: str, problems: Problems) -> Records:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield f"{path}:row {row}", record


READERS = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ------------------------------------------------------------------------ datasets


def load_hub(source: Source):
    import datasets

    path, name, split = source.hub
    if os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json")
    ):
        loaded = datasets.load_from_disk(path)  # a folder written by save_to_disk
        return loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    try:
        return datasets.load_dataset(path, name, split=split)
    except (FileNotFoundError, ValueError, ConnectionError) as e:
        raise DataError(f"data source {source.spec!r}: {type(e).__name__}: {e}") from None


def read_dataset(spec: str, dataset) -> Records:
    row = 0
    for batch in dataset.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            row += 1
            yield f"{spec}:row {row}", dict(zip(columns, values, strict=True))


# -------------------------------------------------------------------------- opening


def open_source(source: Source) -> tuple[str, Callable[[Problems], Records]]:
    """(fingerprint of the content, a function that reads the records). The fingerprint is
    cheap next to parsing, so a cached source is never parsed."""
    if source.hub is not None:
        dataset = load_hub(source)
        fingerprint = f"{source.spec}|{dataset._fingerprint}|{len(dataset)}"
        return fingerprint, lambda problems: read_dataset(source.spec, dataset)
    parts = [f"{os.path.abspath(p)}|{file_digest(p)}" for p in source.files]

    def records(problems: Problems) -> Records:
        for path in source.files:
            yield from READERS[os.path.splitext(path)[1]](path, problems)

    return "\n".join(parts), records
