"""dpo_jax.generate: the KV-cache decoder equals full-forward decoding and transformers'
greedy generate, sampling filters do what they say, and the CLI runs on the embedded model."""

import dataclasses
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from test_hf import hf_model

from dpo_jax import checkpoint, embedded, hf, model
from dpo_jax import generate as G
from dpo_jax.step import TrainState

GREEDY = G.SamplingConfig(max_new_tokens=10, temperature=0.0)
PROMPT_LENGTHS = [3, 17, 8, 1, 11]  # batch_size 2: three batches, the last one filled


@pytest.fixture(scope="module")
def tiny():
    """The embedded tiny Llama config with fresh random weights, and prompts of mixed lengths."""
    config = hf.read_model_config(embedded.TINY_MODEL_DIR)
    params = nn.meta.unbox(jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0)))
    # Weights x10 (std 0.2, as test_hf's models): at std 0.02 the tied embeddings make every
    # row repeat its last token, a comparison that proves little.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 10 if path[-1].key in ("kernel", "embedding") else x, params
    )
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    return config, params, prompts


def run(tiny, cfg, decoder, eos_id=-1):
    config, params, prompts = tiny
    return G.generate(
        config, params, prompts, cfg, eos_id=eos_id, pad_id=0, batch_size=2, decoder=decoder
    )


@pytest.fixture(scope="module")
def greedy_without_eos(tiny):
    return run(tiny, GREEDY, "kv_cache")


def test_kv_cache_greedy_equals_full_forward_and_stops_at_eos(tiny, greedy_without_eos):
    assert all(len(out) == GREEDY.max_new_tokens for out in greedy_without_eos)
    assert len({tuple(out) for out in greedy_without_eos}) == len(PROMPT_LENGTHS)
    # EOS := the 4th token of row 0 (not among its first 3): row 0 stops there, others may.
    row0 = greedy_without_eos[0]
    eos = next(t for i, t in enumerate(row0) if i >= 3 and t not in row0[:i])
    stop = row0.index(eos)
    kv_cache = run(tiny, GREEDY, "kv_cache", eos_id=eos)
    assert kv_cache == run(tiny, GREEDY, "full_forward", eos_id=eos)
    assert kv_cache[0] == row0[: stop + 1]
    for out, full in zip(kv_cache, greedy_without_eos, strict=True):
        n = full.index(eos) + 1 if eos in full else len(full)
        assert out == full[:n]  # stopping changes nothing before the EOS
    assert run(tiny, dataclasses.replace(GREEDY, max_new_tokens=0), "kv_cache") == [[]] * 5


def test_sampling_same_stream_as_full_forward_and_top_k_1_is_greedy(tiny, greedy_without_eos):
    sampled = G.SamplingConfig(max_new_tokens=10, temperature=0.7, top_p=0.9, seed=3)
    kv_cache = run(tiny, sampled, "kv_cache")
    assert kv_cache == run(tiny, sampled, "full_forward")
    assert kv_cache != greedy_without_eos
    assert run(tiny, dataclasses.replace(sampled, seed=4), "kv_cache") != kv_cache
    top_1 = G.SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=1, seed=5)
    assert run(tiny, top_1, "kv_cache") == greedy_without_eos


def test_decode_step_prefill_and_steps_match_forward(tiny):
    """Prefill of a right-padded buffer, then single tokens at each row's own position."""
    config, params, prompts = tiny
    decode_step = jax.jit(model.decode_step, static_argnums=0)
    tokens = np.zeros((2, 12), np.int32)  # row 0: a 3-token prompt, then token 0 fed as text
    tokens[0, :3], tokens[1] = prompts[0], prompts[1][:12]
    lengths = np.array([3, 12])
    expected = np.asarray(model.forward(config, params, tokens))
    cache = model.init_cache(config, 2, 12)
    positions = np.broadcast_to(np.arange(8), (2, 8))
    valid = positions < np.minimum(lengths, 8)[:, None]
    logits, cache = decode_step(config, params, cache, tokens[:, :8], positions, valid)
    np.testing.assert_allclose(logits[0, :3], expected[0, :3], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits[1], expected[1, :8], atol=1e-4, rtol=0)
    position = np.array([3, 8])
    for _ in range(4):
        step = tokens[[0, 1], position][:, None]
        logits, cache = decode_step(config, params, cache, step, position[:, None])
        np.testing.assert_allclose(logits[:, 0], expected[[0, 1], position], atol=1e-4, rtol=0)
        position += 1


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([[0.05, 0.5, 0.15, 0.3], [0.25, 0.25, 0.4, 0.1]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    for top_p, kept in [
        # Clear of the exact boundaries (0.4, 0.8, ...), where fp32 rounding decides.
        (0.38, [[1], [2]]),
        (0.75, [[1, 3], [0, 1, 2]]),  # row 2: the 0.25s tie at the cut, both stay
        (0.85, [[1, 2, 3], [0, 1, 2]]),
        (0.97, [[0, 1, 2, 3], [0, 1, 2, 3]]),
        (1.0, [[0, 1, 2, 3], [0, 1, 2, 3]]),
    ]:
        out = np.asarray(G.filter_logits(logits, G.SamplingConfig(top_p=top_p)))
        for row, keep in enumerate(kept):
            assert np.flatnonzero(np.isfinite(out[row])).tolist() == keep, (top_p, row)
            np.testing.assert_allclose(out[row, keep], np.log(probs[row, keep]), rtol=1e-6)
    # Top-k before top-p; temperature first (flatter: the nucleus grows).
    out = G.filter_logits(logits, G.SamplingConfig(top_k=2, top_p=0.95))
    assert np.isfinite(np.asarray(out)).sum(axis=1).tolist() == [2, 3]  # the tie stays
    out = G.filter_logits(logits, G.SamplingConfig(temperature=4.0, top_p=0.4))
    assert np.isfinite(np.asarray(out)).sum(axis=1).tolist() == [2, 3]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_greedy_equals_transformers_generate(family, tmp_path):
    """Per-row positions against transformers, one prompt at a time (gemma2: 4-token windows
    on layers 1 and 3, attention and final soft caps)."""
    torch_model = hf_model(family)
    torch_model.save_pretrained(tmp_path)
    config, params = hf.load_pretrained(str(tmp_path))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in (5, 9, 2)]
    cfg = G.SamplingConfig(max_new_tokens=12, temperature=0.0)
    ours = G.generate(config, params, prompts, cfg, eos_id=2, pad_id=0, batch_size=3)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = torch_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=cfg.max_new_tokens,
                eos_token_id=2,
                pad_token_id=0,
            )
        assert got == out[0, len(prompt) :].tolist()


# ------------------------------------------------------------------------------ CLI


QUESTIONS = ["How do I brew green tea?", "Can you help me write a haiku?", "hi"]


def cli(*args):
    G.main(["--temperature=0", "--max_new_tokens=24", *args])


def test_cli_prints_replies_of_an_hf_folder(capsys):
    cli("--model", embedded.TINY_MODEL_DIR, *(arg for q in QUESTIONS for arg in ("--prompt", q)))
    out = capsys.readouterr().out
    blocks = out.strip().split("\n\n")
    assert [b.split("\n→ ")[0] for b in blocks] == QUESTIONS
    assert all(len(b.split("\n→ ")[1]) > 10 for b in blocks)


def test_cli_writes_jsonl_from_a_workdir_export_and_checkpoint(tmp_path):
    from conftest import load_config

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS))
    cli("--model", embedded.TINY_MODEL_DIR, "--prompts", str(prompts), "--out", f"{tmp_path}/a")
    rows = [json.loads(line) for line in open(tmp_path / "a")]
    assert [r["prompt"] for r in rows] == QUESTIONS and all(r["reply"] for r in rows)

    # A workdir with an exported hf/ folder, then one with only a checkpoint (restored
    # fsdp-sharded over the 8 test devices), give the same greedy replies.
    exported = tmp_path / "exported"
    shutil.copytree(embedded.TINY_MODEL_DIR, exported / "hf")
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(QUESTIONS) + "\n")
    cli("--model", str(exported), "--prompts", str(text), "--out", f"{tmp_path}/b")
    assert [json.loads(line) for line in open(tmp_path / "b")] == rows

    run = load_config("tiny")
    _, params = hf.load_pretrained(embedded.TINY_MODEL_DIR)
    state = TrainState(step=jnp.asarray(7), params=params, opt_state=optax.sgd(0.1).init(params))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "trained"), async_save=False)
    ckpt.save(7, state, {"epoch": 0, "index": 7}, json.loads(run.to_json_best_effort()))
    ckpt.close()
    cli("--model", str(tmp_path / "trained"), "--prompts", str(prompts), "--out", f"{tmp_path}/c")
    assert [json.loads(line) for line in open(tmp_path / "c")] == rows


def test_cli_bad_input_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    cases = [
        (["--model", str(tmp_path / "none"), "--prompt", "x"], "no such folder"),
        (["--model", embedded.TINY_MODEL_DIR, "--prompts", str(tmp_path / "none")], "no such"),
        (["--model", embedded.TINY_MODEL_DIR, "--prompts", str(bad)], "bad.jsonl:2"),
        (["--model", embedded.TINY_MODEL_DIR, "--prompt", "x", "--top_p=0"], "--top_p"),
        (["--model", embedded.TINY_MODEL_DIR, "--prompt", "x", "--step=3"], "workdir"),
        (["--model", embedded.TINY_MODEL_DIR], "--prompt"),
        ([], "--model"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as raised:
            G.main(argv)
        message = str(raised.value.code)
        assert message.startswith("error: ") and expected in message and "\n" not in message
