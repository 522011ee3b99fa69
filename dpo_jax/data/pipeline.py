"""Settings → sources → cached tokenized pairs → the training stream, eval sets and report.

`build_data` is the one entry point of the trainer (dpo_jax.settings turns the loose
`config.data` into these typed DataSettings once, at the entry point).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np

from . import cache
from .formats import LAYOUTS, SKIPPED_TIE, Example, Layout, detect
from .iterator import PairIterator
from .problems import DataError, Problems, RecordError
from .sources import open_source, resolve_source
from .tokens import Lengths, Renderer, TokenizedPair, pairs_from_table, tokenize_examples
from .tokens import tokenizer_fingerprint as tokenizer_fingerprint

log = logging.getLogger("dpo_jax.data")
DETECT_RECORDS = 100  # records looked at to detect a source's layout


@dataclasses.dataclass(frozen=True)
class DataSettings:
    max_seq_length: int  # T: prompt + completion tokens of one sequence (packed row length)
    max_prompt_length: int | None = None  # prompts keep their last this-many tokens
    apply_chat_template: bool = True  # render through the tokenizer's chat template
    train_sources: tuple[str, ...] = ()  # source specs (see sources.py)
    train_weights: tuple[float, ...] = ()  # mixture weights, one per source (() = concatenate)
    validation_sources: tuple[tuple[str, str], ...] = ()  # (name, spec); name "" = "eval/"
    format: str = "auto"
    fields: tuple[tuple[str, str], ...] = ()
    roles: tuple[tuple[str, str], ...] = ()
    system_prompt: str = ""
    ranked_pairs: str = "best_worst"
    ranked_ties: str = "error"
    truncation: str = "truncate"
    on_error: str = "raise"
    packing: bool = False
    packed_rows: int = 0  # rows per micro-batch (0 = sized from the data's lengths)
    prefix_sharing: bool = False  # packed [prompt | chosen | rejected] groups, prompt once
    max_segments_per_row: int = 0  # packed sequences per row at most (0 = as many as fit)
    bucket_lengths: tuple[int, ...] | str = ()  # padded row lengths ("auto", (), or lengths)
    shuffle: bool = True
    num_proc: int = 0  # tokenization workers (0 = automatic)
    cache_dir: str | None = None  # None = no cache

    @property
    def layout(self) -> Layout:
        return Layout(
            self.format,
            self.fields,
            self.roles,
            self.system_prompt,
            self.ranked_pairs,
            self.ranked_ties,
            self.apply_chat_template,
        )

    @property
    def lengths(self) -> Lengths:
        return Lengths(self.max_seq_length, self.max_prompt_length, self.truncation)


# ------------------------------------------------------------------------ one source


def normalise_records(
    records: Iterable[tuple[str, object]], layout: Layout, problems: Problems
) -> tuple[list[Example], str, int]:
    """(examples, layout used, number of records read); bad records go to `problems`."""
    records = iter(records)
    head = list(itertools.islice(records, DETECT_RECORDS))
    fmt = layout.format
    if fmt == "auto":
        votes = Counter(f for _, r in head if (f := detect(r, layout)))
        if not votes and head:
            where, record = head[0]
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{where}: cannot tell the layout of {problems.source} (record has {keys}); "
                "expected {prompt, chosen, rejected}, {chosen, rejected} or {context, "
                "completions}: set data.format and map names with data.fields"
            )
        fmt = votes.most_common(1)[0][0] if votes else "explicit"
    normalise = LAYOUTS[fmt]
    examples, count = [], 0
    for where, record in itertools.chain(head, records):
        count += 1
        try:
            if not isinstance(record, dict):
                raise RecordError(
                    "not_object", f"expected a JSON object, got {type(record).__name__}"
                )
            normalised = normalise(where, record, layout)
            examples.extend(e for e in normalised if e is not SKIPPED_TIE)
            if ties := normalised.count(SKIPPED_TIE):
                problems.skip("tie", ties)
        except RecordError as e:
            if e.reason == "tie" and layout.ranked_ties == "skip":
                problems.skip("tie")
            else:
                problems.add(e.reason, where, e.message)
    return examples, fmt, count


def load_source(spec: str, tokenizer, settings: DataSettings, renderer: Renderer | None = None):
    """(pairs, report) of one source, through the cache."""
    renderer = renderer or Renderer(tokenizer, settings.apply_chat_template)
    content, read = open_source(resolve_source(spec))
    relevant = dataclasses.asdict(settings.layout) | dataclasses.asdict(settings.lengths)
    key = cache.cache_key(content, tokenizer_fingerprint(tokenizer), relevant, settings.on_error)
    problems = Problems(spec, settings.on_error)
    cached = cache.load(settings.cache_dir, key)
    if cached is not None:
        table, meta = cached
        problems.messages = meta["skipped_examples"]
        problems.counts, problems.policy = Counter(meta["errors"]), Counter(meta["policy"])
        problems.finish()  # warns again about skipped records
        return pairs_from_table(table), meta["report"] | {"source": spec, "cache": "hit"}
    examples, fmt, records = normalise_records(read(problems), settings.layout, problems)
    records += problems.counts["malformed_json"] + problems.counts["invalid_utf8"]  # unparsed
    if settings.on_error == "raise":
        problems.finish()  # before spending time on tokenization
    table, counts = tokenize_examples(
        examples, renderer, settings.lengths, problems, settings.num_proc, fingerprint=key
    )
    problems.finish()
    report = {
        "source": spec,
        "format": fmt,
        "records": records,
        "pairs": len(table),
        "truncated": {
            k.split(":")[1]: n for k, n in sorted(counts.items()) if k.startswith("truncated:")
        },
        "dropped": {
            k.split(":")[1]: n for k, n in sorted(counts.items()) if k.startswith("dropped:")
        },
    } | problems.report()
    meta = {
        "report": report,
        "errors": problems.counts,
        "policy": problems.policy,
        "skipped_examples": problems.messages,
    }
    cache.save(settings.cache_dir, key, table, meta)
    return pairs_from_table(table), report | {"cache": "miss" if settings.cache_dir else "off"}


def length_stats(pairs: Sequence[TokenizedPair]) -> dict:
    """Percentiles of sequence (prompt + completion) lengths in tokens."""
    lengths = np.array([n for pair in pairs for n in pair.lengths])
    return {f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 99)} | {
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
    }


def set_report(pairs: Sequence[TokenizedPair], sources: list[dict]) -> dict:
    def stats(values):
        values = np.asarray(values)
        return {f"p{q}": int(np.percentile(values, q)) for q in (5, 50, 90, 99)} | {
            "max": int(values.max()),
            "mean": round(float(values.mean()), 1),
        }

    report = {"pairs": len(pairs), "sources": sources}
    if pairs:
        report["lengths"] = {
            "prompt": stats([len(p.prompt) for p in pairs]),
            "chosen": stats([len(p.chosen) for p in pairs]),
            "rejected": stats([len(p.rejected) for p in pairs]),
            "sequence": stats([n for p in pairs for n in p.lengths]),
        }
    return report


# ---------------------------------------------------------------------- the entry point


def log_who_tokenized(
    reports: list[dict], process_index: int, lead_fills: bool, cache_dir: str | None
) -> None:
    """One line per process of a multi-process run: whether it tokenized or read the cache."""
    tokenized = [r["source"] for r in reports if r["cache"] != "hit"]
    if not tokenized:
        print(f"data: process {process_index} read the tokenized data from the cache", flush=True)
    elif process_index == 0 or not lead_fills:
        why = "" if lead_fills else " (data.cache_dir=none: every process tokenizes)"
        print(f"data: process {process_index} tokenized {', '.join(tokenized)}{why}", flush=True)
    else:  # process 0 filled a cache this process cannot see
        print(
            f"data: process {process_index} tokenized {', '.join(tokenized)} again: "
            f"data.cache_dir={cache_dir} is not shared with process 0; put "
            "it on a disk all hosts see to tokenize once",
            flush=True,
        )


class Data(NamedTuple):
    train: PairIterator  # next(train) → [A, R, T] batch; .state() / .restore(position)
    evals: dict[str, list[TokenizedPair]]  # name ("" = data.validation_file) → pairs
    report: dict  # DIR/data_report.json


def pad_token_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def build_data(
    settings: DataSettings,
    tokenizer,
    *,
    batch_size: int,
    accumulation_steps: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    row_multiple: int = 1,
    barrier: Callable[[], None] | None = None,
) -> Data:
    """Reads, validates, tokenizes (cached) and batches the configured data. Raises
    DataError before any training on bad input (data.on_error="raise"). Packed rows per
    micro-batch are sized as a multiple of `row_multiple` (the mesh's data-parallel size).

    Several processes with a cache and a `barrier` (all processes wait there): process 0
    tokenizes and fills the cache while the others wait, then they read it."""
    if not settings.train_sources:
        raise DataError("config data.train_file is empty; name a file, glob or hf: dataset")
    renderer = Renderer(tokenizer, settings.apply_chat_template)
    lead_fills = process_count > 1 and settings.cache_dir is not None and barrier is not None
    if lead_fills and process_index > 0:
        barrier()  # process 0 tokenizes meanwhile
    train_pairs, source_reports, sizes = [], [], []
    for spec in settings.train_sources:
        pairs, report = load_source(spec, tokenizer, settings, renderer)
        if not pairs:
            raise DataError(f"{spec}: no usable pairs ({report})")
        train_pairs += pairs
        sizes.append(len(pairs))
        source_reports.append(report)
    weights = settings.train_weights
    if weights and len(weights) != len(sizes):
        raise DataError(
            f"config data.train_weights has {len(weights)} weights for "
            f"{len(sizes)} sources in data.train_file"
        )
    evals, eval_reports = {}, {}
    for name, spec in settings.validation_sources:
        pairs, report = load_source(spec, tokenizer, settings, renderer)
        if not pairs:
            raise DataError(f"{spec}: no usable pairs ({report})")
        evals[name] = pairs
        eval_reports[name or "validation"] = set_report(pairs, [report])
    if lead_fills and process_index == 0:
        barrier()  # the cache is full: the others read it now
    if process_count > 1:
        every = source_reports + [r for e in eval_reports.values() for r in e["sources"]]
        log_who_tokenized(every, process_index, lead_fills, settings.cache_dir)
    from .batching import resolve_buckets

    iterator = PairIterator(
        train_pairs,
        batch_size=batch_size,
        accumulation_steps=accumulation_steps,
        row_length=settings.max_seq_length,
        pad_id=pad_token_id(tokenizer),
        seed=seed,
        shuffle=settings.shuffle,
        buckets=resolve_buckets(settings.bucket_lengths, settings.max_seq_length),
        packing=settings.packing,
        packed_rows=settings.packed_rows,
        row_multiple=row_multiple,
        prefix_sharing=settings.prefix_sharing,
        max_segments_per_row=settings.max_segments_per_row,
        sources=list(zip(sizes, weights, strict=True)) if weights else None,
        process_index=process_index,
        process_count=process_count,
    )
    train_report = set_report(train_pairs, source_reports)
    if weights:
        for report, quota, weight in zip(source_reports, iterator.quotas, weights, strict=True):
            report |= {"weight": weight, "pairs_per_epoch": quota}
    report = {
        "train": train_report,
        "validation": eval_reports,
        "batching": {"row_length": iterator.pack_length, "buckets": list(iterator.buckets)}
        | iterator.efficiency(0),
    }
    return Data(iterator, evals, report)


def summary(report: dict) -> str:
    """A few lines for the start of a run."""
    lines = []
    for name, part in [("train", report["train"])] + list(report["validation"].items()):
        for s in part["sources"]:
            skipped = sum(s["skipped"].values())
            lines.append(
                f"data {name}: {s['source']} [{s['format']}, cache {s['cache']}]: "
                f"{s['records']} records → {s['pairs']} pairs; skipped {skipped} "
                f"{s['skipped'] or ''}; dropped {s['dropped'] or 0}; truncated "
                f"{s['truncated'] or 0}"
            )
    b = report["batching"]
    efficiency = b.get("packing_efficiency", b.get("padding_efficiency"))
    lengths = report["train"].get("lengths", {}).get("sequence", {})
    pairs, tokens = b["pairs_per_step"], b["tokens_per_step"]
    lines.append(
        f"data batching: {b['mode']}, {b['rows_per_micro_batch']} rows × {b['row_length']} "
        f"tokens per micro-batch (buckets {b['buckets']}), {b['steps_per_epoch']} steps/epoch, "
        f"pairs/step mean {pairs['mean']} (min {pairs['min']}, max {pairs['max']}), "
        f"tokens/step {tokens['rows']} ({tokens['real']} real), efficiency {efficiency:.1%}; "
        f"sequence tokens p50 {lengths.get('p50')} p99 {lengths.get('p99')} "
        f"max {lengths.get('max')}"
    )
    return "\n".join(lines)


# ------------------------------------------------- single sources (evaluation, tests)


def tokenize_records(records, tokenizer, cfg: DataSettings) -> tuple[list[TokenizedPair], Counter]:
    """(where, record) pairs of one layout → pairs and counts of truncated and dropped pairs."""
    problems = Problems("records", cfg.on_error)
    examples, _, _ = normalise_records(records, cfg.layout, problems)
    problems.finish()
    renderer = Renderer(tokenizer, cfg.apply_chat_template)
    table, counts = tokenize_examples(examples, renderer, cfg.lengths, problems, num_proc=1)
    problems.finish()
    return pairs_from_table(table), counts


def load_pairs(path: str, tokenizer, cfg: DataSettings) -> tuple[list[TokenizedPair], Counter]:
    """The pairs of one source (a file, glob or hf: dataset) and their counts by reason."""
    pairs, report = load_source(path, tokenizer, cfg)
    if not pairs:
        raise DataError(f"{path}: no usable pairs ({report})")
    counts = Counter({f"truncated:{k}": n for k, n in report["truncated"].items()})
    counts.update({f"dropped:{k}": n for k, n in report["dropped"].items()})
    counts.update({f"skipped:{k}": n for k, n in report["skipped"].items()})
    return pairs, counts
