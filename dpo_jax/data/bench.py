"""Tokenization throughput and packing efficiency on a realistic length mix.

    python -m dpo_jax.data.bench [--pairs 100000] [--num_proc 0] [--out DIR]

Writes synthetic pairs whose prompt and completion lengths are drawn like public preference
sets (log-normal, medians ~180 and ~260 tokens, a long tail past the row length), tokenizes
them cold through the cache (prints pairs/s), again warm, then reports the padding and packing
efficiency of the resulting batches. The same file then works with
`python -m dpo_jax.data --config ... --config.data.train_file=DIR/pairs.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np

from .batching import resolve_buckets
from .iterator import PairIterator
from .pipeline import DataSettings, load_source

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


def write_synthetic(path: str, n: int, tokenizer, seed: int = 0, scale: float = 1.0) -> None:
    words = np.array(single_token_words(tokenizer))
    rng = np.random.default_rng(seed + 1)
    with open(path, "w") as f:
        for p, c, r in realistic_lengths(n, seed, scale=scale):
            text = lambda k: "".join(rng.choice(words, k)).strip()
            f.write(json.dumps({"prompt": text(p), "chosen": text(c), "rejected": text(r)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--num_proc", type=int, default=0)
    parser.add_argument("--out", default="")
    parser.add_argument("--tokenizer", default="")
    parser.add_argument("--max_seq_length", type=int, default=1024)
    parser.add_argument("--max_prompt_length", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--scale", type=float, default=1.0, help="times the median lengths")
    args = parser.parse_args()
    from dpo_jax import embedded
    from dpo_jax.hf_config import HFError, load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer or embedded.TINY_MODEL_DIR, setting="--tokenizer")
    except HFError as error:
        raise SystemExit(f"error: {error}") from None
    out = args.out or tempfile.mkdtemp(prefix="dpo_jax_bench_")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "pairs.jsonl")
    if not os.path.exists(path):
        started = time.perf_counter()
        write_synthetic(path, args.pairs, tokenizer, scale=args.scale)
        print(f"wrote {args.pairs} pairs to {path} in {time.perf_counter() - started:.1f}s")
    settings = DataSettings(
        max_seq_length=args.max_seq_length,
        max_prompt_length=args.max_prompt_length,
        num_proc=args.num_proc,
        cache_dir=os.path.join(out, f"cache-{time.time_ns()}"),
    )
    for run in ("cold", "warm"):
        started = time.perf_counter()
        pairs, report = load_source(path, tokenizer, settings)
        seconds = time.perf_counter() - started
        tokens = sum(sum(p.lengths) for p in pairs)
        print(
            f"{run}: {len(pairs)} pairs in {seconds:.1f}s = {len(pairs) / seconds:,.0f} pairs/s"
            f" ({tokens / seconds:,.0f} tokens/s, {tokens / len(pairs) / 2:.0f} per sequence;"
            f" cache {report['cache']}; truncated "
            f"{report['truncated']}; dropped {report['dropped']})"
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
            f"{name}: efficiency {efficiency:.1%}, {stats['steps_per_epoch']} steps/epoch, "
            f"pairs/step {stats['pairs_per_step']} (planned in "
            f"{time.perf_counter() - started:.1f}s)"
        )


if __name__ == "__main__":
    main()
