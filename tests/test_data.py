"""Sources and bad input: every file kind and hf: datasets; every bad-record case names its
file:line and field; on_error="skip" counts per reason; truncation."""

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dpo_jax import data, embedded
from dpo_jax.settings import data_settings


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
CHAT = lambda role, content: {"role": role, "content": content}
CONFIG = data.DataSettings(max_seq_length=64)

BAD_RECORDS = [
    ('{"prompt": "a", "chosen": "b"', "malformed_json", "malformed JSON"),
    ({"prompt": "a", "chosen": "b"}, "missing_field", "missing field 'rejected'"),
    (
        {"prompt": "a", "chosen": 3, "rejected": "c"},
        "wrong_type",
        "field 'chosen' must be a string, got int",
    ),
    ({"prompt": "a", "chosen": " ", "rejected": "c"}, "empty_field", "field 'chosen' is empty"),
    ({"prompt": "a", "chosen": "x", "rejected": "x"}, "identical", "identical"),
    (["a", "b"], "not_object", "expected a JSON object, got list"),
    (
        {"prompt": [CHAT("bot", "hi")], "chosen": "b", "rejected": "c"},
        "unknown_role",
        "field 'prompt[0].role': unknown role 'bot'",
    ),
    (
        {"prompt": [CHAT("user", "a"), CHAT("user", "b")], "chosen": "b", "rejected": "c"},
        "non_alternating",
        "field 'prompt[1]' is a 'user' turn where 'assistant' is expected",
    ),
    (
        {"prompt": [CHAT("user", "a")], "chosen": [CHAT("user", "b")], "rejected": "c"},
        "non_alternating",
        "field 'chosen[0]' is a 'user' turn where 'assistant' is expected",
    ),
    (
        {"prompt": [CHAT("user", "")], "chosen": "b", "rejected": "c"},
        "empty_field",
        "field 'prompt[0].content' is empty",
    ),
    (GOOD | {"chosen": "word " * 80}, "too_long", "more than data.max_seq_length=64"),
]


@pytest.mark.parametrize("bad, reason, message", BAD_RECORDS, ids=[r for _, r, _ in BAD_RECORDS])
def test_bad_records_name_file_line_and_field(tmp_path, tokenizer, bad, reason, message):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, bad, GOOD | {"prompt": "Other?"}])
    cfg = data.DataSettings(max_seq_length=64, truncation="error")
    with pytest.raises(data.DataError) as error:
        data.load_pairs(path, tokenizer, cfg)
    first_line = str(error.value).splitlines()[0]
    assert first_line.startswith(f"{path}:2: ") and message in first_line, str(error.value)
    assert f"{reason}: 1" in str(error.value) and "data.on_error='skip'" in str(error.value)


def test_invalid_utf8_is_located(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff"}\n')
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: invalid UTF-8"):
        data.read_records(str(path))
    (tmp_path / "d.json").write_bytes(b'[\n{"prompt": "ok"},\n{"prompt": "\xff"}]')
    with pytest.raises(data.DataError, match=r"d\.json:3: invalid UTF-8"):
        data.read_records(str(tmp_path / "d.json"))


def test_skip_counts_every_reason_and_warns(tmp_path, tokenizer, caplog):
    rows = [GOOD] + [bad for bad, _, _ in BAD_RECORDS] + [GOOD | {"prompt": "Last?"}]
    path = tmp_path / "d.jsonl"
    write_jsonl(path, rows)
    with open(path, "ab") as f:
        f.write(b'{"prompt": "\xff"}\n')
    cfg = data.DataSettings(max_seq_length=64, truncation="error", on_error="skip")
    with caplog.at_level(logging.WARNING, logger="dpo_jax.data"):
        pairs, report = data.load_source(str(path), tokenizer, cfg)
    expected = {}
    for _, reason, _ in BAD_RECORDS:
        expected[reason] = expected.get(reason, 0) + 1
    assert report["skipped"] == dict(sorted((expected | {"invalid_utf8": 1}).items()))
    assert report["records"] == len(rows) + 1 and report["pairs"] == len(pairs) == 2
    assert [p.source for p in pairs] == [f"{path}:1", f"{path}:{len(rows)}"]
    assert (
        f"skipped {len(BAD_RECORDS) + 1} bad record(s)" in caplog.text
        and f"{path}:2: malformed JSON" in caplog.text
    )


def test_json_list_parquet_glob_and_jsonl_agree(tmp_path, tokenizer):
    rows = [GOOD, GOOD | {"prompt": "Another question?"}, GOOD | {"prompt": "Third?"}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    write_jsonl(tmp_path / "part-0.jsonl", rows[:2])
    write_jsonl(tmp_path / "part-1.jsonl", rows[2:])
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # to_json style
    expected, _ = data.load_pairs(jsonl, tokenizer, CONFIG)
    for spec in ("d.json", "d.parquet", "part-*.jsonl", "lines.json"):
        pairs, _ = data.load_pairs(str(tmp_path / spec), tokenizer, CONFIG)
        assert [p.prompt.tolist() for p in pairs] == [p.prompt.tolist() for p in expected], spec
    pairs, _ = data.load_pairs(str(tmp_path / "d.json"), tokenizer, CONFIG)
    assert [p.source.rsplit(":", 1)[1] for p in pairs] == ["2", "7", "12"]  # line of each record
    pairs, _ = data.load_pairs(str(tmp_path / "d.parquet"), tokenizer, CONFIG)
    assert pairs[2].source.endswith("d.parquet:row 3")
    pairs, _ = data.load_pairs(str(tmp_path / "part-*.jsonl"), tokenizer, CONFIG)
    assert pairs[2].source.endswith("part-1.jsonl:1")


def test_malformed_json_list_names_its_line(tmp_path, tokenizer):
    (tmp_path / "d.json").write_text('[\n {"prompt": "a"},\n {"prompt": "b",}\n]')
    with pytest.raises(data.DataError, match=r"d\.json:3: malformed JSON"):
        data.read_records(str(tmp_path / "d.json"))


def test_hub_sources_through_datasets(tmp_path, tokenizer):
    import datasets

    rows = [GOOD, GOOD | {"prompt": "Another question?"}]
    folder = tmp_path / "hub"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:1])
    expected, _ = data.load_pairs(str(folder / "train.jsonl"), tokenizer, CONFIG)
    pairs, _ = data.load_pairs(f"hf:{folder}", tokenizer, CONFIG)  # split defaults to train
    assert [p.chosen.tolist() for p in pairs] == [p.chosen.tolist() for p in expected]
    assert pairs[1].source == f"hf:{folder}:row 2"
    pairs, _ = data.load_pairs(f"hf:{folder}@test", tokenizer, CONFIG)
    assert len(pairs) == 1
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    pairs, _ = data.load_pairs(f"hf:{tmp_path / 'saved'}", tokenizer, CONFIG)
    assert len(pairs) == 2
    with pytest.raises(data.DataError, match="hf:"):
        data.load_pairs(str(folder), tokenizer, CONFIG)  # a folder needs the hf: prefix


def test_missing_sources_are_named(tmp_path, tokenizer):
    with pytest.raises(data.DataError, match="nope.jsonl: file not found"):
        data.load_pairs(str(tmp_path / "nope.jsonl"), tokenizer, CONFIG)
    with pytest.raises(data.DataError, match="no files match"):
        data.load_pairs(str(tmp_path / "*.parquet"), tokenizer, CONFIG)
    (tmp_path / "d.csv").write_text("a,b")
    with pytest.raises(data.DataError, match="unsupported file type"):
        data.load_pairs(str(tmp_path / "d.csv"), tokenizer, CONFIG)


def test_truncation_keeps_prompt_end_with_bos_and_completion_start(tokenizer):
    long_prompt = GOOD | {"prompt": "word " * 80 + "final question?"}
    full, _ = data.tokenize_records([("x:1", long_prompt)], tokenizer, data.DataSettings(512))
    full = full[0]
    cfg = data.DataSettings(max_seq_length=40, max_prompt_length=20)
    (pair,), counts = data.tokenize_records([("x:1", long_prompt)], tokenizer, cfg)
    bos = tokenizer.bos_token_id
    assert pair.prompt.tolist() == [bos] + full.prompt.tolist()[-19:]
    assert counts["truncated:prompt"] == 1 and counts["truncated:completion"] == 0
    tight = data.DataSettings(max_seq_length=22, max_prompt_length=20)
    (pair,), counts = data.tokenize_records([("x:1", long_prompt)], tokenizer, tight)
    assert pair.chosen.tolist() == full.chosen.tolist()[:2]
    assert counts["truncated:completion"] == 1
    too_small = data.DataSettings(max_seq_length=20, max_prompt_length=None)
    pairs, counts = data.tokenize_records([("x:1", long_prompt)], tokenizer, too_small)
    assert pairs == [] and counts["dropped:prompt_too_long"] == 1
    strict = data.DataSettings(max_seq_length=40, max_prompt_length=20, truncation="error")
    with pytest.raises(data.DataError, match="x:1: field 'prompt' has .* tokens, more than"):
        data.tokenize_records([("x:1", long_prompt)], tokenizer, strict)


def test_data_settings_read_old_and_new_keys():
    from conftest import load_config

    config = load_config("tiny")
    settings = data_settings(config.data, config.model.max_length)
    assert settings.train_sources == (embedded.TRAIN_FILE,)
    assert settings.validation_sources == (("", embedded.VALIDATION_FILE),)
    assert settings.max_prompt_length == 48 and settings.on_error == "raise"
    new = {
        "train_file": "a.jsonl, b.parquet",
        "train_weights": "3,1",
        "fields": "prompt=q",
        "validation_files": "hh=hf:x/y@test",
        "validation_file": "",
        "max_seq_length": 64,
        "cache_dir": "none",
        "bucket_lengths": "auto",
    }
    settings = data_settings(new)
    assert settings.train_sources == ("a.jsonl", "b.parquet") and settings.train_weights == (3, 1)
    assert settings.validation_sources == (("hh", "hf:x/y@test"),)
    assert settings.fields == (("prompt", "q"),) and settings.cache_dir is None
    with pytest.raises(data.DataError, match="exceeds model.max_length"):
        data_settings(config.data, model_max_length=40)


def test_first_version_api_still_works(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)
    pairs, counts = data.load_pairs(path, tokenizer, data.DataSettings(max_seq_length=64))
    batches = list(data.eval_batches(pairs, batch_size=2, row_length=64, pad_id=0))
    assert [b["pair_mask"].sum() for b in batches] == [2, 1] and not counts
    stream = data.PairIterator(
        pairs, batch_size=2, accumulation_steps=1, row_length=64, pad_id=0, seed=0
    )
    assert next(stream)["tokens"].shape == (1, 4, 64)
    assert data.length_stats(pairs)["max"] == max(max(p.lengths) for p in pairs)
    np.testing.assert_array_equal(pairs[0].chosen, pairs[1].chosen)


def test_tokenization_shows_a_bar_only_on_a_terminal(tokenizer, monkeypatch, capsys):
    from dpo_jax import progress

    records = [(f"x:{i}", GOOD) for i in range(3)]
    data.tokenize_records(records, tokenizer, CONFIG)
    assert "tokenizing" not in capsys.readouterr().err  # a log file: no bar
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    data.tokenize_records(records, tokenizer, CONFIG)
    assert "tokenizing 3 pairs" in capsys.readouterr().err
