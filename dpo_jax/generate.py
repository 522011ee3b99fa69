"""Batched sampling: greedy, temperature, top-k, top-p, max new tokens, stop at EOS.

    python -m dpo_jax.generate --model <HF folder or workdir> --prompt "..." [--prompt ...]
    python -m dpo_jax.generate --model runs/tiny --prompts prompts.jsonl --out replies.jsonl

Static shapes throughout: prompts are right-padded into a [B, P + max_new_tokens] buffer and
one jitted loop writes one token per row per iteration, so a whole batch compiles once.
Two decoders share the sampling code: `kv_cache` (prefill once, then one token at a time
against cached keys/values) and `full_forward` (recompute the whole prefix each step; the
slow, obviously-correct oracle the cache is tested against).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax import model


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


@functools.partial(jax.jit, static_argnames=("config", "cfg", "eos_id", "pad_id"))
def decode_full_forward(config, params, tokens_BxT, lengths_B, rng, *, cfg, eos_id, pad_id):
    """Reference decoder: every new token recomputes the whole prefix."""

    def body(i, carry):
        tokens_BxT, lengths_B, done_B, rng = carry
        rng, step_rng = jax.random.split(rng)
        next_B = choose_tokens(_last_logits(config, params, tokens_BxT, lengths_B), step_rng, cfg)
        next_B = jnp.where(done_B, pad_id, next_B)
        rows = jnp.arange(tokens_BxT.shape[0])
        tokens_BxT = tokens_BxT.at[rows, lengths_B].set(next_B, mode="drop")
        lengths_B = jnp.where(done_B, lengths_B, lengths_B + 1)
        done_B = done_B | (next_B == eos_id)
        return tokens_BxT, lengths_B, done_B, rng

    done_B = jnp.zeros_like(lengths_B, bool)
    tokens_BxT, lengths_B, _, _ = jax.lax.fori_loop(
        0, cfg.max_new_tokens, body, (tokens_BxT, lengths_B, done_B, rng)
    )
    return tokens_BxT, lengths_B


DECODERS = {"full_forward": decode_full_forward}


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
) -> list[str]:
    """Replies (special tokens removed) to plain-text prompts."""
    ids = prompt_ids(tokenizer, prompts, apply_chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    new = generate(
        config,
        params,
        ids,
        cfg,
        eos_id=tokenizer.eos_token_id,
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
    eos_id: int,
    pad_id: int,
    batch_size: int = 32,
    decoder: str = "kv_cache",
) -> list[list[int]]:
    """New tokens for each prompt (EOS included when reached), in prompt order."""
    if decoder not in DECODERS:
        decoder = (
            "full_forward" if decoder == "kv_cache" and "kv_cache" not in DECODERS else decoder
        )
    decode = DECODERS[decoder]
    longest = max(len(p) for p in prompts)
    total = longest + cfg.max_new_tokens
    outputs = []
    rng = jax.random.key(cfg.seed)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        # Fixed batch shape: fill a short last batch with copies of its first prompt.
        filled = chunk + [chunk[0]] * (batch_size - len(chunk))
        tokens, lengths = pad_prompts(filled, total, pad_id)
        rng, batch_rng = jax.random.split(rng)
        out_tokens, out_lengths = decode(
            config,
            params,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            batch_rng,
            cfg=cfg,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        out_tokens, out_lengths = np.asarray(out_tokens), np.asarray(out_lengths)
        for row, prompt in enumerate(chunk):
            outputs.append(out_tokens[row, len(prompt) : out_lengths[row]].tolist())
    return outputs
