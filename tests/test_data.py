"""Reading, validating, tokenizing and batching preference records."""

import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from dpo_jax import data, embedded


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded.TINY_MODEL_DIR)


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


GOOD = {"prompt": "How do I water a cactus?", "chosen": "Sure! Rarely.", "rejected": "Ugh. Rarely."}


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"prompt": "a", "chosen": "b"', "malformed JSON"),
        (json.dumps({"prompt": "a", "chosen": "b"}), "missing field 'rejected'"),
        (json.dumps({"prompt": "a", "chosen": 3, "rejected": "c"}), "'chosen' must be a string"),
        (json.dumps({"prompt": "a", "chosen": " ", "rejected": "c"}), "'chosen' is empty"),
        (json.dumps({"prompt": "a", "chosen": "x", "rejected": "x"}), "identical"),
        (json.dumps(["a", "b"]), "expected a JSON object"),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, tokenizer, bad_line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad_line])
    with pytest.raises(data.DataError) as error:
        data.load_pairs(path, tokenizer, data.DataConfig(max_seq_length=64))
    assert f"{path}:2" in str(error.value) and message in str(error.value)


def test_invalid_utf8_is_located(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: invalid UTF-8"):
        data.read_records(str(path))


def test_json_list_and_jsonl_agree(tmp_path, tokenizer):
    rows = [GOOD, GOOD | {"prompt": "Another question?"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    cfg = data.DataConfig(max_seq_length=64)
    a, _ = data.load_pairs(jsonl, tokenizer, cfg)
    b, _ = data.load_pairs(str(tmp_path / "d.json"), tokenizer, cfg)
    assert [p.prompt.tolist() for p in a] == [p.prompt.tolist() for p in b]
    assert b[1].source.endswith("d.json:record 1")


def test_chat_template_prompt_and_eos_terminated_completion(tokenizer):
    cfg = data.DataConfig(max_seq_length=96)
    (pair,), _ = data.tokenize_records([("x:1", GOOD)], tokenizer, cfg)
    rendered = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": GOOD["prompt"]},
            {"role": "assistant", "content": GOOD["chosen"]},
        ],
        tokenize=False,
    )
    full = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    ours = pair.prompt.tolist() + pair.chosen.tolist()
    # Our prompt + completion is what the template renders for the whole conversation
    # (up to whatever the template appends after the assistant's EOS).
    assert full[: len(ours)] == ours
    assert pair.chosen[-1] == tokenizer.eos_token_id
    assert ours.count(tokenizer.bos_token_id) == 1


def test_truncation_keeps_prompt_end_and_completion_start(tokenizer):
    long_prompt = GOOD | {"prompt": "word " * 80 + "final question?"}
    cfg = data.DataConfig(max_seq_length=40, max_prompt_length=20)
    (pair,), counts = data.tokenize_records([("x:1", long_prompt)], tokenizer, cfg)
    full_prompt = data.render_prompts(tokenizer, [long_prompt["prompt"]], True)[0]
    assert pair.prompt.tolist() == full_prompt[-20:]
    assert counts["truncated:prompt"] == 1
    tight = data.DataConfig(max_seq_length=22, max_prompt_length=20)
    (pair,), counts = data.tokenize_records([("x:1", long_prompt)], tokenizer, tight)
    full_chosen = data.render_completions(tokenizer, [GOOD["chosen"]])[0]
    assert pair.chosen.tolist() == full_chosen[:2]
    too_small = data.DataConfig(max_seq_length=20, max_prompt_length=None)
    pairs, counts = data.tokenize_records([("x:1", long_prompt)], tokenizer, too_small)
    assert pairs == [] and counts["dropped:prompt_too_long"] == 1


def make_pair(prompt_len, chosen_len, rejected_len, seed):
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, 50, size=n).astype(np.int32)
    return data.TokenizedPair(ids(prompt_len), ids(chosen_len), ids(rejected_len), f"x:{seed}")


def test_padded_layout_labels_and_masks():
    pair = make_pair(3, 2, 4, 0)
    batch = data.padded_batch([pair], num_pairs=2, row_length=8, pad_id=0)
    tokens = np.concatenate([pair.prompt, pair.chosen])
    np.testing.assert_array_equal(batch["tokens"][0, :5], tokens)
    np.testing.assert_array_equal(batch["labels"][0, :4], tokens[1:])
    # Positions 2 and 3 predict the two completion tokens.
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    assert batch["loss_mask"][1].sum() == 4 and batch["sequence_ids"][1, 0] == 1
    np.testing.assert_array_equal(batch["pair_mask"], [True, False])
    assert batch["segment_ids"][2:].sum() == 0 and batch["loss_mask"][2:].sum() == 0


def test_packed_batch_holds_the_same_sequences():
    pairs = [make_pair(3, 2, 4, s) for s in range(3)]
    padded = data.padded_batch(pairs, 3, 12, 0)
    packed = data.packed_batch(pairs, 3, num_rows=3, row_length=24, pad_id=0)
    for batch in (padded, packed):
        assert batch["loss_mask"].sum() == sum(len(p.chosen) + len(p.rejected) for p in pairs)
    for s in range(6):
        in_padded = padded["labels"][(padded["sequence_ids"] == s) & padded["loss_mask"]]
        in_packed = packed["labels"][(packed["sequence_ids"] == s) & packed["loss_mask"]]
        np.testing.assert_array_equal(in_padded, in_packed)
    assert packed["segment_ids"].max() >= 2  # several sequences share a row
    with pytest.raises(data.DataError, match="do not fit"):
        data.packed_batch(pairs, 3, num_rows=1, row_length=24, pad_id=0)


def test_iterator_is_deterministic_and_resumable():
    pairs = [make_pair(2, 2, 2, s) for s in range(10)]
    kwargs = dict(batch_size=4, accumulation_steps=2, row_length=8, pad_id=0, seed=3)
    stream = data.PairIterator(pairs, **kwargs)
    batches = [next(stream) for _ in range(5)]  # crosses an epoch boundary (2 steps/epoch)
    assert batches[0]["tokens"].shape == (2, 4, 8)
    resumed = data.PairIterator(pairs, **kwargs)
    fresh = data.PairIterator(pairs, **kwargs)
    for _ in range(3):
        next(fresh)
    resumed.restore(fresh.state())
    for expected in batches[3:]:
        np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"])
    other_seed = data.PairIterator(pairs, **(kwargs | {"seed": 4}))
    assert not np.array_equal(next(other_seed)["tokens"], batches[0]["tokens"])


def test_eval_batches_cover_every_pair_once():
    pairs = [make_pair(2, 2, 2, s) for s in range(5)]
    batches = list(data.eval_batches(pairs, batch_size=2, row_length=8, pad_id=0))
    assert len(batches) == 3 and sum(b["pair_mask"].sum() for b in batches) == 5
