"""Batched sampling: greedy, temperature, top-k, top-p, max new tokens, stop at EOS.

    python -m dpo_jax.generate --model <HF folder or workdir> --prompt "..." [--prompt ...]
    python -m dpo_jax.generate --model runs/tiny --prompts prompts.jsonl --out replies.jsonl

A workdir generates with its exported DIR/hf when there is one (else, or with --step, from a
checkpoint); --temperature 0 is greedy. Replies are printed, or written as JSONL
{"prompt", "reply"} with --out.

Static shapes throughout: prompts are right-padded into a [B, P + max_new_tokens] buffer and
one jitted loop writes one token per row per iteration, so a whole batch compiles once.
Two decoders share the sampling code: `kv_cache` (prefill once, then one token at a time
against cached keys/values) and `full_forward` (recompute the whole prefix each step; the
slow, obviously-correct oracle the cache is tested against).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax import data, export, hf, model, progress, settings
from dpo_jax.checkpoint import CheckpointError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    seed: int = 0


def filter_logits(logits_BxV: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (nucleus) on fp32 logits; removed entries → -inf."""
    logits_BxV = logits_BxV.astype(jnp.float32) / max(cfg.temperature, 1e-6)
    if cfg.top_k > 0:
        kth_BxK = jax.lax.top_k(logits_BxV, min(cfg.top_k, logits_BxV.shape[-1]))[0]
        logits_BxV = jnp.where(logits_BxV < kth_BxK[:, -1:], -jnp.inf, logits_BxV)
    if cfg.top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        keep_BxV = mass_before_BxV < cfg.top_p
        cutoff_B = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1)
        logits_BxV = jnp.where(logits_BxV < cutoff_B[:, None], -jnp.inf, logits_BxV)
    return logits_BxV


def choose_tokens(logits_BxV: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    if cfg.temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(rng, filter_logits(logits_BxV, cfg)).astype(jnp.int32)


def pad_prompts(prompts: list[list[int]], total_length: int, pad_id: int):
    """[B, total_length] right-padded token buffer and [B] prompt lengths."""
    buffer = np.full((len(prompts), total_length), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        buffer[row, : len(prompt)] = prompt
    return buffer, np.array([len(p) for p in prompts], np.int32)


def _last_logits(config, params, tokens_BxT, lengths_B):
    """Logits of the token after each row's current prefix, by a full forward pass."""
    positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
    valid_BxT = positions < lengths_B[:, None]
    logits_BxTxV = model.forward(config, params, tokens_BxT, positions, valid_BxT.astype(jnp.int32))
    return jnp.take_along_axis(logits_BxTxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]


# EOS ids are an array argument, not static: another tokenizer's EOS does not recompile.
@functools.partial(jax.jit, static_argnames=("config", "cfg", "pad_id"))
def decode_full_forward(config, params, tokens_BxT, lengths_B, rng, *, cfg, eos_ids, pad_id):
    """Reference decoder: every new token recomputes the whole prefix."""

    def body(i, carry):
        tokens_BxT, lengths_B, done_B, rng = carry
        rng, step_rng = jax.random.split(rng)
        next_B = choose_tokens(_last_logits(config, params, tokens_BxT, lengths_B), step_rng, cfg)
        next_B = jnp.where(done_B, pad_id, next_B)
        rows = jnp.arange(tokens_BxT.shape[0])
        tokens_BxT = tokens_BxT.at[rows, lengths_B].set(next_B, mode="drop")
        lengths_B = jnp.where(done_B, lengths_B, lengths_B + 1)
        done_B = done_B | jnp.isin(next_B, eos_ids)
        return tokens_BxT, lengths_B, done_B, rng

    done_B = jnp.zeros_like(lengths_B, bool)
    tokens_BxT, lengths_B, _, _ = jax.lax.fori_loop(
        0, cfg.max_new_tokens, body, (tokens_BxT, lengths_B, done_B, rng)
    )
    return tokens_BxT, lengths_B


@functools.partial(jax.jit, static_argnames=("config", "cfg", "pad_id"))
def decode_kv_cache(config, params, tokens_BxT, lengths_B, rng, *, cfg, eos_ids, pad_id):
    """Prefills the prompt buffer into a KV cache once, then runs one cached token per row per
    step; stops early once every row has emitted EOS. Same tokens and random stream as
    `decode_full_forward`."""
    b, total = tokens_BxT.shape
    prompt_len = total - cfg.max_new_tokens
    rows_B = jnp.arange(b)

    def emit(logits_BxV, tokens_BxT, lengths_B, done_B, rng):
        """Chooses each row's next token and appends it (finished rows get pad)."""
        rng, step_rng = jax.random.split(rng)
        next_B = jnp.where(done_B, pad_id, choose_tokens(logits_BxV, step_rng, cfg))
        tokens_BxT = tokens_BxT.at[rows_B, lengths_B].set(next_B, mode="drop")
        lengths_B = jnp.where(done_B, lengths_B, lengths_B + 1)
        return next_B, tokens_BxT, lengths_B, done_B | jnp.isin(next_B, eos_ids), rng

    positions_BxP = jnp.broadcast_to(jnp.arange(prompt_len), (b, prompt_len))
    logits_Bx1xV, cache = model.decode_step(
        config,
        params,
        model.init_cache(config, b, total),
        tokens_BxT[:, :prompt_len],
        positions_BxP,
        positions_BxP < lengths_B[:, None],
        last_only=True,
    )
    done_B = jnp.zeros_like(lengths_B, bool)
    carry = emit(logits_Bx1xV[:, 0], tokens_BxT, lengths_B, done_B, rng)

    def cond(state):
        i, (_, _, _, done_B, _), _ = state
        return (i < cfg.max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        i, (last_B, tokens_BxT, lengths_B, done_B, rng), cache = state
        # The last emitted token sits at lengths - 1; finished rows write nothing.
        logits_Bx1xV, cache = model.decode_step(
            config, params, cache, last_B[:, None], (lengths_B - 1)[:, None], ~done_B[:, None]
        )
        return i + 1, emit(logits_Bx1xV[:, 0], tokens_BxT, lengths_B, done_B, rng), cache

    _, (_, tokens_BxT, lengths_B, _, _), _ = jax.lax.while_loop(cond, body, (1, carry, cache))
    return tokens_BxT, lengths_B


DECODERS = {"kv_cache": decode_kv_cache, "full_forward": decode_full_forward}


def prompt_ids(tokenizer, prompts: list[str], apply_chat_template: bool = True) -> list[list[int]]:
    """Prompt token ids as training renders them: a user turn plus the generation prompt."""
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def generate_text(
    config,
    params,
    tokenizer,
    prompts: list[str],
    cfg: SamplingConfig,
    *,
    apply_chat_template: bool = True,
    batch_size: int = 32,
    eos_id: int | Sequence[int] | None = None,
) -> list[str]:
    """Replies (special tokens removed) to plain-text prompts; generation stops at `eos_id`
    (default: the tokenizer's EOS)."""
    ids = prompt_ids(tokenizer, prompts, apply_chat_template)
    pad_id = data.pad_token_id(tokenizer)
    new = generate(
        config,
        params,
        ids,
        cfg,
        eos_id=next(i for i in (eos_id, tokenizer.eos_token_id, -1) if i is not None),
        pad_id=pad_id,
        batch_size=batch_size,
    )
    return [tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in new]


def _place_like(params, array: np.ndarray) -> jax.Array:
    """Inputs replicated over the mesh the params live on (so sharded, even multi-process,
    params work); plain device arrays otherwise."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    if isinstance(sharding, NamedSharding):
        replicated = NamedSharding(sharding.mesh, PartitionSpec())
        return jax.make_array_from_callback(array.shape, replicated, lambda index: array[index])
    return jnp.asarray(array)


def _to_host(array: jax.Array) -> np.ndarray:
    """A replicated result, read from this process's first copy."""
    return np.asarray(array.addressable_data(0))


def generate(
    config: model.ModelConfig,
    params,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    *,
    eos_id: int | Sequence[int],
    pad_id: int,
    batch_size: int = 32,
    decoder: str = "kv_cache",
) -> list[list[int]]:
    """New tokens for each prompt (EOS included when reached), in prompt order."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r} not in {sorted(DECODERS)}")
    if not prompts or not all(prompts):
        raise ValueError("generate needs at least one prompt, each of at least one token")
    if cfg.max_new_tokens < 1:
        return [[] for _ in prompts]
    decode = DECODERS[decoder]
    batch_size = min(batch_size, len(prompts))  # no rows of filler for a few prompts
    eos_ids = _place_like(params, np.atleast_1d(np.asarray(eos_id, np.int32)))
    longest = max(len(p) for p in prompts)
    total = longest + cfg.max_new_tokens
    outputs = []
    rng = jax.random.key(cfg.seed)
    compiled_cfg = dataclasses.replace(cfg, seed=0)  # the seed lives in rng: no recompile
    starts = range(0, len(prompts), batch_size)
    for start in progress.bar(starts, what=f"sampling {len(prompts)} prompts", unit="batch"):
        chunk = prompts[start : start + batch_size]
        # Fixed batch shape: fill a short last batch with copies of its first prompt.
        filled = chunk + [chunk[0]] * (batch_size - len(chunk))
        tokens, lengths = pad_prompts(filled, total, pad_id)
        rng, batch_rng = jax.random.split(rng)
        out_tokens, out_lengths = decode(
            config,
            params,
            _place_like(params, tokens),
            _place_like(params, lengths),
            batch_rng,
            cfg=compiled_cfg,
            eos_ids=eos_ids,
            pad_id=pad_id,
        )
        out_tokens, out_lengths = _to_host(out_tokens), _to_host(out_lengths)
        for row, prompt in enumerate(chunk):
            outputs.append(out_tokens[row, len(prompt) : out_lengths[row]].tolist())
    return outputs


# ------------------------------------------------------------------------------ the CLI


class GenerateError(ValueError):
    """Bad command-line input, and why."""


def read_prompts(path: str) -> list[str]:
    """Prompts from .jsonl ({"prompt": ...} per line) or any other text file (one per line)."""
    if not os.path.isfile(path):
        raise GenerateError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not path.endswith(".jsonl"):
        return lines
    prompts = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise GenerateError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise GenerateError(f'{path}:{number}: expected an object with a string "prompt"')
        prompts.append(record["prompt"])
    return prompts


def _is_workdir(path: str) -> bool:
    if any(os.path.isdir(os.path.join(path, sub)) for sub in ("hf", "checkpoints")):
        return True
    try:  # a training run's config.json has a "model" section; an HF config.json does not
        with open(os.path.join(path, "config.json")) as f:
            return isinstance(json.load(f).get("model"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _eos_ids(tokenizer, folder: str) -> tuple[int, ...]:
    """The tokenizer's EOS plus generation_config.json's (Llama 3 instruct ends turns with
    <|eot_id|>, not the tokenizer's <|end_of_text|>)."""
    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids += [] if eos is None else np.ravel(eos).tolist()
    return tuple(sorted(set(ids))) or (-1,)  # -1: no EOS, never stop early


def load_model(path: str, step: int | str | None = None):
    """(ModelConfig, params, tokenizer, EOS ids, what was loaded) of an HF folder or hub id,
    or of a training workdir: its exported DIR/hf when there is one and no `step` is asked
    for, else a checkpoint (the latest by default) with the run's tokenizer."""
    if _is_workdir(path):
        exported = os.path.join(path, "hf")
        if step is None and os.path.isdir(exported):
            config, params = hf.load_pretrained(exported)
            tokenizer = hf.load_tokenizer(exported, setting="--model")
            return config, params, tokenizer, _eos_ids(tokenizer, exported), exported
        if not os.path.isdir(os.path.join(path, "checkpoints")):
            raise GenerateError(f"--model {path}: a training workdir without hf/ or checkpoints/")
        run, config, params, step = export.restore_params(path, step)
        source = hf.resolve_model_path(run.model.name)
        tokenizer = hf.load_tokenizer(
            run.tokenizer if run.tokenizer != run.model.name else source,
            setting=f"data.tokenizer in {path}/config.json",
        )
        return config, params, tokenizer, _eos_ids(tokenizer, source), f"{path} step {step}"
    if step is not None:
        raise GenerateError(f"--step {step}: only for a training workdir, not {path}")
    config, params = hf.load_pretrained(path)
    folder = hf.resolve_model_path(path)
    tokenizer = hf.load_tokenizer(folder, setting="--model")
    return config, params, tokenizer, _eos_ids(tokenizer, folder), folder


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad input
        raise SystemExit(f"error: {message} (see --help)")


def main(argv=None) -> None:
    parser = _Parser(
        prog="python -m dpo_jax.generate",
        description="\n\n".join(__doc__.split("\n\n")[:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="HF folder / hub id, or a training workdir")
    parser.add_argument("--step", default=None, help="workdir: this checkpoint (N or best)")
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    given.add_argument("--prompts", metavar="FILE", help='.jsonl of {"prompt": ...} or .txt')
    defaults = SamplingConfig()
    parser.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy")
    parser.add_argument("--top_k", type=int, default=defaults.top_k, help="0: off")
    parser.add_argument("--top_p", type=float, default=defaults.top_p, help="1: off")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch_size", type=int, default=32, help="prompts per compiled batch")
    parser.add_argument("--no_chat_template", action="store_true", help="prompts as plain text")
    parser.add_argument("--out", default=None, help="write JSONL {prompt, reply} here")
    args = parser.parse_args(argv)
    cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    try:
        for ok, what in [
            (cfg.max_new_tokens >= 1, f"--max_new_tokens {cfg.max_new_tokens}: must be >= 1"),
            (cfg.temperature >= 0, f"--temperature {cfg.temperature}: must be >= 0"),
            (cfg.top_k >= 0, f"--top_k {cfg.top_k}: must be >= 0"),
            (0 < cfg.top_p <= 1, f"--top_p {cfg.top_p}: must be in (0, 1]"),
            (args.batch_size >= 1, f"--batch_size {args.batch_size}: must be >= 1"),
        ]:
            if not ok:
                raise GenerateError(what)
        prompts = args.prompt or read_prompts(args.prompts)
        if not prompts:
            raise GenerateError(f"--prompts {args.prompts}: no prompts in it")
        config, params, tokenizer, eos_ids, loaded = load_model(args.model, args.step)
        print(f"model: {loaded}", file=sys.stderr, flush=True)
        replies = generate_text(
            config,
            params,
            tokenizer,
            prompts,
            cfg,
            apply_chat_template=not args.no_chat_template,
            batch_size=args.batch_size,
            eos_id=eos_ids,
        )
    except (
        GenerateError,
        export.ExportError,
        CheckpointError,
        OSError,
        *settings.USER_ERRORS,
    ) as error:
        raise SystemExit(f"error: {error}") from None
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for prompt, reply in zip(prompts, replies, strict=True):
                f.write(json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False) + "\n")
        print(f"wrote {len(replies)} replies to {args.out}")
    else:
        for prompt, reply in zip(prompts, replies, strict=True):
            print(f"{prompt}\n→ {reply}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
