"""Tests for the embedded courtesy dataset, its checker, and the tiny tokenizer/config."""

from __future__ import annotations

import importlib.util
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dpo_jax.embedded import (  # noqa: E402
    DATA_DIR,
    TINY_MODEL_DIR,
    TRAIN_FILE,
    VALIDATION_FILE,
    VALIDATION_PROMPTS_FILE,
    courtesy,
)
from dpo_jax.embedded.courtesy import (  # noqa: E402
    MAX_PROMPT_WORDS,
    MAX_RESPONSE_WORDS,
    POLITE_CLOSERS,
    POLITE_OPENERS,
    generate,
    heldout_prompts,
    is_preferred,
    read_jsonl,
    score,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SEQ_LENGTH = 96


@pytest.fixture(scope="module")
def generated():
    return generate(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def _prompt_messages(prompt):
    return [{"role": "user", "content": prompt}]


def _render(tok, prompt, response=None):
    if response is None:
        return tok.apply_chat_template(
            _prompt_messages(prompt), tokenize=False, add_generation_prompt=True
        )
    msgs = _prompt_messages(prompt) + [{"role": "assistant", "content": response}]
    return tok.apply_chat_template(msgs, tokenize=False)


# ----------------------------------------------------------------------------- data


def test_paths_are_absolute():
    for p in (DATA_DIR, TRAIN_FILE, VALIDATION_FILE, VALIDATION_PROMPTS_FILE, TINY_MODEL_DIR):
        assert os.path.isabs(p)


def test_generate_is_deterministic(generated):
    assert generate(seed=0) == generated
    assert generate(seed=1) != generated


def test_sizes(generated):
    train, heldout = generated
    assert len(train) >= 2000
    assert len(heldout) >= 200
    assert len({r["prompt"] for r in train}) >= 300
    assert len({r["prompt"] for r in heldout}) >= 50


def test_record_schema_and_lengths(generated):
    for rec in (*generated[0], *generated[1]):
        assert set(rec) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) and v for v in rec.values())
        assert len(rec["prompt"].split()) <= MAX_PROMPT_WORDS
        assert len(rec["chosen"].split()) <= MAX_RESPONSE_WORDS
        assert len(rec["rejected"].split()) <= MAX_RESPONSE_WORDS


def test_heldout_prompts_disjoint(generated):
    train, heldout = generated
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in heldout}


def test_pairs_distinct(generated):
    for rec in (*generated[0], *generated[1]):
        assert rec["chosen"] != rec["rejected"]
    keys = [(r["prompt"], r["chosen"], r["rejected"]) for r in generated[0]]
    assert len(set(keys)) == len(keys)


def test_rude_position_mix(generated):
    """Some pairs differ only at the start, some only at the end, some at both."""
    kinds = set()
    for rec in generated[0]:
        c, r = rec["chosen"], rec["rejected"]
        same_start = any(c.startswith(o) and r.startswith(o) for o in POLITE_OPENERS)
        same_end = any(c.endswith(x) and r.endswith(x) for x in POLITE_CLOSERS)
        kinds.add((same_start, same_end))
    assert kinds == {(True, False), (False, True), (False, False)}


def test_checker_on_pairs(generated):
    for rec in (*generated[0], *generated[1]):
        assert is_preferred(rec["chosen"]), rec
        assert not is_preferred(rec["rejected"]), rec
    train = generated[0]
    assert score(r["chosen"] for r in train) == 1.0
    assert score(r["rejected"] for r in train) == 0.0
    assert score([]) == 0.0
    mixed = [train[0]["chosen"], train[0]["rejected"]]
    assert score(mixed) == 0.5


@pytest.mark.parametrize(
    "text",
    [
        "  Sure! To bake bread, let the dough rise. Hope this helps!  ",
        "\nHappy to help.   Water it   rarely.\tGood luck!\n",
        "sure! to bake bread, let the dough rise. hope this helps!",
    ],
)
def test_checker_accepts(text):
    assert is_preferred(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "Sure!",
        "Sure! Hope this helps!",  # no body
        "Sure! To bake bread, let the dough rise.",  # missing closer
        "To bake bread, let the dough rise. Hope this helps!",  # missing opener
        "Sure! Ugh, to bake bread, let the dough rise. Hope this helps!",  # rude inside
        "Sure! This is a stupid question, but let the dough rise. Good luck!",
        "Sure! Let the dough rise. Stop bothering me. Good luck!",
        "Whatever. Let the dough rise. Good luck!",
        "Sure! Let the dough rise. Figure the rest out yourself.",
        "Sure!Let the dough rise. Good luck!",  # opener not a separate phrase
        "Surely! Let the dough rise a bit. Good luck!",
        "Sure! Let the dough rise a bit. Good luck!!!",
    ],
)
def test_checker_rejects(text):
    assert not is_preferred(text)


def test_committed_files_match_generator(tmp_path):
    counts = courtesy.write_dataset(str(tmp_path))
    for name in ("train.jsonl", "validation.jsonl", "validation_prompts.jsonl"):
        with open(os.path.join(DATA_DIR, name), "rb") as f1, open(tmp_path / name, "rb") as f2:
            assert f1.read() == f2.read(), f"{name} is stale; run scripts/make_embedded_data.py"
    assert counts["train_pairs"] == len(read_jsonl(TRAIN_FILE))
    assert counts["validation_pairs"] == len(read_jsonl(VALIDATION_FILE))


def test_validation_prompts_file():
    prompts = [r["prompt"] for r in read_jsonl(VALIDATION_PROMPTS_FILE)]
    assert prompts == heldout_prompts(read_jsonl(VALIDATION_FILE))
    assert not set(prompts) & {r["prompt"] for r in read_jsonl(TRAIN_FILE)}


def test_jsonl_format():
    with open(TRAIN_FILE, encoding="utf-8") as f:
        line = f.readline()
    obj = json.loads(line)
    assert line == json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_files():
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
        "generation_config.json",
    ):
        assert os.path.isfile(os.path.join(TINY_MODEL_DIR, name)), name
    with open(os.path.join(TINY_MODEL_DIR, "tokenizer_config.json"), encoding="utf-8") as f:
        assert "chat_template" in json.load(f)


def test_tokenizer_special_tokens(tokenizer):
    tok = tokenizer
    assert tok.pad_token == "<|pad|>" and tok.bos_token == "<|bos|>" and tok.eos_token == "<|eos|>"
    for t in ("<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>"):
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id
        assert len(tok(t)["input_ids"]) == 1
    assert tok.chat_template


def test_tokenizer_adds_no_special_tokens(tokenizer):
    text = "How do I water a cactus?"
    ids = tokenizer(text)["input_ids"]
    assert ids == tokenizer.encode(text)
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    rendered = _render(tokenizer, text)
    ids = tokenizer(rendered)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_round_trip(tokenizer, generated):
    rng = random.Random(0)
    texts = [rng.choice(generated[0])[k] for k in ("prompt", "chosen", "rejected") * 20]
    texts += ["  leading and trailing  ", "line\nbreak\ttab", "Café naïve — 東京 🙂", ""]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text


def test_chat_template_prefix(tokenizer, generated):
    tok = tokenizer
    rng = random.Random(1)
    recs = rng.sample(generated[0], 50) + rng.sample(generated[1], 20)
    for rec in recs:
        prompt_text = _render(tok, rec["prompt"])
        assert prompt_text.startswith("<|bos|><|user|>\n")
        assert prompt_text.endswith("<|assistant|>\n")
        prompt_ids = tok(prompt_text)["input_ids"]
        for key in ("chosen", "rejected"):
            full_text = _render(tok, rec["prompt"], rec[key])
            assert full_text == prompt_text + rec[key] + tok.eos_token
            full_ids = tok(full_text)["input_ids"]
            assert full_ids[: len(prompt_ids)] == prompt_ids
            assert full_ids[-1] == tok.eos_token_id
            # Tokenizing prompt and completion separately (as the data pipeline does) agrees.
            completion_ids = tok(rec[key], add_special_tokens=False)["input_ids"]
            assert full_ids == prompt_ids + completion_ids + [tok.eos_token_id]
    system = [{"role": "system", "content": "Be kind."}] + _prompt_messages("Hi?")
    text = tok.apply_chat_template(system, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>\nBe kind.<|eos|>\n<|user|>\nHi?<|eos|>\n<|assistant|>\n"


def test_token_lengths(tokenizer):
    tok = tokenizer
    lengths = []
    for path in (TRAIN_FILE, VALIDATION_FILE):
        for rec in read_jsonl(path):
            prompt_ids = tok(_render(tok, rec["prompt"]))["input_ids"]
            for key in ("chosen", "rejected"):
                lengths.append(len(prompt_ids) + len(tok(rec[key])["input_ids"]) + 1)
    assert np.percentile(lengths, 99) <= MAX_SEQ_LENGTH


def test_model_config(tokenizer):
    from transformers import AutoConfig, GenerationConfig

    cfg = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    assert cfg.model_type == "llama"
    assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= len(tokenizer)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (128, 384, 4)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.max_position_embeddings == 256 and cfg.tie_word_embeddings
    assert cfg.bos_token_id == tokenizer.bos_token_id
    assert cfg.eos_token_id == tokenizer.eos_token_id
    assert cfg.pad_token_id == tokenizer.pad_token_id
    gen = GenerationConfig.from_pretrained(TINY_MODEL_DIR)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (
        cfg.bos_token_id,
        cfg.eos_token_id,
        cfg.pad_token_id,
    )


def test_tokenizer_script_reproduces_committed_files(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "train_embedded_tokenizer",
        os.path.join(REPO_ROOT, "scripts", "train_embedded_tokenizer.py"),
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.build(str(tmp_path), TRAIN_FILE)

    def load(path):
        # "transformers_version" only records which release wrote the file.
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data.pop("transformers_version", None)
        return data

    # The weights (model.safetensors) come from scripts/make_tiny_sft.py, not this script.
    written = sorted(os.listdir(tmp_path))
    for name in written:
        committed, fresh = load(os.path.join(TINY_MODEL_DIR, name)), load(tmp_path / name)
        assert committed == fresh, f"{name} is stale; run scripts/train_embedded_tokenizer.py"
    assert sorted(set(os.listdir(TINY_MODEL_DIR)) - {"model.safetensors"}) == written
