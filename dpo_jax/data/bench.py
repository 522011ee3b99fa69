"""Tokenization throughput against TRL's, and packing efficiency, on a realistic length mix.

    python -m dpo_jax.data.bench [--pairs 100000] [--num_proc 0] [--out DIR] [--skip_trl]

Writes synthetic conversational pairs (a user turn, two assistant replies) whose token
counts are drawn like public preference sets (log-normal, medians ~180 and ~260 tokens, a
long tail past the row length), then, side by side on the same file, tokenizer and number
of processes:
  ours   the trainer's data.load_source, cold (the tokenization cache empty) and warm;
  TRL    TRL's own DPO dataset preparation (DPOTrainer._prepare_dataset: prompt extraction,
         chat template and tokenization, TRL >= 1.16), after datasets.load_dataset("json").
Both render the tokenizer's chat template; the token ids of the pairs neither truncates
are compared. Then the padding and packing efficiency of our batches. The same file works
with `python -m dpo_jax.data --config ... --config.data.train_file=DIR/pairs.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import types

import numpy as np

from .batching import resolve_buckets
from .iterator import PairIterator
from .pipeline import DataSettings, load_source
from .tokens import worker_count

PROMPT_MEDIAN, COMPLETION_MEDIAN = 180, 260  # tokens


def single_token_words(tokenizer, limit: int = 2000) -> list[str]:
    """Words (with their leading space) that the tokenizer keeps as one token."""
    words = []
    for token_id in range(len(tokenizer)):
        text = tokenizer.decode([token_id])
        if (
            text.startswith(" ")
            and text[1:].isalpha()
            and tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]
        ):
            words.append(text)
            if len(words) == limit:
                break
    return words


def realistic_lengths(n: int, seed: int = 0, max_length: int = 1500, scale: float = 1.0):
    """[n, 3] prompt, chosen, rejected token counts (medians times `scale`)."""
    rng = np.random.default_rng(seed)
    prompt = rng.lognormal(np.log(PROMPT_MEDIAN * scale), 0.8, n)
    completions = rng.lognormal(np.log(COMPLETION_MEDIAN * scale), 0.7, (n, 2))
    lengths = np.concatenate([prompt[:, None], completions], axis=1)
    return np.clip(lengths, 4, max_length).astype(int)


def write_synthetic(
    path: str, n: int, tokenizer, seed: int = 0, scale: float = 1.0, conversational=False
) -> None:
    """n pairs of single-token words: {"prompt", "chosen", "rejected"} strings, or (with
    `conversational`) a user message and two assistant messages."""
    words = np.array(single_token_words(tokenizer))
    rng = np.random.default_rng(seed + 1)
    with open(path, "w") as f:
        for p, c, r in realistic_lengths(n, seed, scale=scale):
            text = lambda k: "".join(rng.choice(words, k)).strip()
            record = {"prompt": text(p), "chosen": text(c), "rejected": text(r)}
            if conversational:
                record = {
                    "prompt": [{"role": "user", "content": record["prompt"]}],
                    "chosen": [{"role": "assistant", "content": record["chosen"]}],
                    "rejected": [{"role": "assistant", "content": record["rejected"]}],
                }
            f.write(json.dumps(record) + "\n")


def trl_prepare(path: str, tokenizer, num_proc: int, max_length: int):
    """(TRL's prepared dataset, seconds to load the JSON, seconds TRL's preparation took).
    The preparation is TRL's DPOTrainer._prepare_dataset itself, called without building a
    trainer (it reads only the tokenizer from it); nothing is cached between runs."""
    import datasets
    import trl
    from trl.trainer.dpo_trainer import DPOTrainer

    datasets.disable_caching()  # an in-memory dataset: map() writes no cache to reuse
    started = time.perf_counter()
    dataset = datasets.load_dataset(
        "json",
        data_files=path,
        split="train",
        keep_in_memory=True,
        cache_dir=tempfile.mkdtemp(prefix="dpo_jax_bench_trl_"),
    )
    dataset = dataset.add_column("row", list(range(len(dataset))))  # kept through map()
    loaded = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as output_dir:
        args = trl.DPOConfig(
            output_dir=output_dir,
            max_length=max_length,
            dataset_num_proc=num_proc if num_proc > 1 else None,
            use_cpu=True,
            bf16=False,
            report_to="none",
        )
        started = time.perf_counter()
        prepared = DPOTrainer._prepare_dataset(
            types.SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args, "train"
        )
        return prepared, loaded, time.perf_counter() - started


def same_ids(ours: list, theirs, limit: int = 2000) -> tuple[int, int]:
    """(equal, compared): pairs neither side truncated, by the record's line number."""
    by_row = {}
    for pair in ours:
        row = int(pair.source.rsplit(":", 1)[1]) - 1
        by_row[row] = pair
    equal = compared = 0
    for record in theirs.select(range(min(limit, len(theirs)))):
        pair = by_row.get(record["row"])
        if pair is None:
            continue
        untruncated = len(pair.chosen) == len(record["chosen_ids"]) and len(pair.rejected) == len(
            record["rejected_ids"]
        )
        if not untruncated or len(pair.prompt) != len(record["prompt_ids"]):
            continue
        compared += 1
        equal += all(
            list(getattr(pair, side)) == record[f"{side}_ids"]
            for side in ("prompt", "chosen", "rejected")
        )
    return equal, compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--num_proc", type=int, default=0, help="processes (0 = automatic)")
    parser.add_argument("--out", default="")
    parser.add_argument("--tokenizer", default="", help="a local HF tokenizer folder")
    parser.add_argument("--max_seq_length", type=int, default=1024)
    parser.add_argument("--max_prompt_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0, help="times the median lengths")
    parser.add_argument("--skip_trl", action="store_true", help="only ours (TRL not installed)")
    args = parser.parse_args()
    from dpo_jax import embedded
    from dpo_jax.hf_config import HFError, load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer or embedded.TINY_MODEL_DIR, setting="--tokenizer")
    except HFError as error:
        raise SystemExit(f"error: {error}") from None
    if not args.skip_trl:
        try:
            import trl
        except ImportError:
            raise SystemExit(
                "error: TRL is not installed: pip install trl==1.16.0, or pass --skip_trl"
            ) from None
    out = args.out or tempfile.mkdtemp(prefix="dpo_jax_bench_")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"pairs-{args.pairs}-{args.scale}.jsonl")
    if not os.path.exists(path):
        started = time.perf_counter()
        write_synthetic(path, args.pairs, tokenizer, scale=args.scale, conversational=True)
        print(f"wrote {args.pairs} pairs to {path} in {time.perf_counter() - started:.1f}s")
    num_proc = worker_count(args.pairs, args.num_proc)
    print(f"{num_proc} tokenization process(es) each, {os.cpu_count()} CPUs", flush=True)
    settings = DataSettings(
        max_seq_length=args.max_seq_length,
        max_prompt_length=args.max_prompt_length,
        num_proc=num_proc,
        cache_dir=os.path.join(out, f"cache-{time.time_ns()}"),
    )
    seconds = {}
    for run in ("cold", "warm"):
        started = time.perf_counter()
        pairs, report = load_source(path, tokenizer, settings)
        seconds[run] = time.perf_counter() - started
        tokens = sum(sum(p.lengths) for p in pairs)
        print(
            f"ours, {run}: {len(pairs)} pairs in {seconds[run]:.1f}s = "
            f"{len(pairs) / seconds[run]:,.0f} pairs/s ({tokens / seconds[run]:,.0f} row "
            f"tokens/s; cache {report['cache']}; truncated {report['truncated']}; dropped "
            f"{report['dropped']})",
            flush=True,
        )
    if not args.skip_trl:
        prepared, loaded, prepare = trl_prepare(path, tokenizer, num_proc, args.max_seq_length)
        equal, compared = same_ids(pairs, prepared)
        print(
            f"TRL {trl.__version__}: {len(prepared)} pairs prepared in {prepare:.1f}s "
            f"(+ {loaded:.1f}s datasets.load_dataset) = {len(prepared) / prepare:,.0f} pairs/s; "
            f"token ids equal to ours in {equal} of {compared} untruncated pairs compared"
        )
        print(
            f"ours (cold, reading included) vs TRL's preparation alone: "
            f"{prepare / seconds['cold']:.2f}x faster"
        )
    common = dict(
        batch_size=args.batch_size,
        accumulation_steps=1,
        pad_id=0,
        seed=0,
        row_length=args.max_seq_length,
    )
    for name, kwargs in (
        ("padded", {}),
        ("padded, auto buckets", {"buckets": resolve_buckets("auto", args.max_seq_length)}),
        ("packed", {"packing": True}),
    ):
        started = time.perf_counter()
        stats = PairIterator(pairs, **common, **kwargs).efficiency(0)
        efficiency = stats.get("packing_efficiency", stats.get("padding_efficiency"))
        print(
            f"{name}: efficiency {efficiency:.1%}, {stats['rows_per_micro_batch']} rows, "
            f"{stats['steps_per_epoch']} steps/epoch, pairs/step {stats['pairs_per_step']}, "
            f"tokens/step {stats['tokens_per_step']} (planned in "
            f"{time.perf_counter() - started:.1f}s)"
        )


if __name__ == "__main__":
    main()
