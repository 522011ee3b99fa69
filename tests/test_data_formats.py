"""Layouts (explicit, conversational, implicit, ranked, HH), field and role mapping, system
prompts, and the chat template: prefix check, BOS once, EOS ending every completion."""

import copy
import json

import pytest
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer

from dpo_jax import data, embedded

CHAT = lambda role, content: {"role": role, "content": content}
# ChatML (Qwen 2.5 style) with the tiny tokenizer's EOS as <|im_end|>: a real multi-turn
# template whose turns end with EOS + "\n".
CHATML = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + "
    "eos_token + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% endif %}"
)
# Renders the last assistant turn differently from the generation prompt: not prefix-consistent.
BROKEN = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}{% else %}"
    "{{ m['role'] + ': ' }}{% endif %}{{ m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(embedded.TINY_MODEL_DIR)


def tokenize(tokenizer, records, **settings):
    cfg = data.DataSettings(max_seq_length=settings.pop("max_seq_length", 256), **settings)
    pairs, _ = data.tokenize_records(
        [(f"d.jsonl:{i + 1}", r) for i, r in enumerate(records)], tokenizer, cfg
    )
    return pairs


def decode(tokenizer, ids):
    return tokenizer.decode(list(ids), skip_special_tokens=False)


def test_explicit_strings_and_conversation_render_the_same(tokenizer):
    strings = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}
    conversation = {
        "prompt": [CHAT("user", "Hi?")],
        "chosen": [CHAT("assistant", "Hello.")],
        "rejected": CHAT("assistant", "Go away."),
    }
    a, b = tokenize(tokenizer, [strings, conversation])
    assert a.prompt.tolist() == b.prompt.tolist() and a.chosen.tolist() == b.chosen.tolist()
    assert decode(tokenizer, a.prompt) == "<|bos|><|user|>\nHi?<|eos|>\n<|assistant|>\n"
    assert decode(tokenizer, a.chosen) == "Hello.<|eos|>"


def test_multi_turn_chat_template_prefix_bos_and_eos(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML
    prompt = [
        CHAT("system", "Be kind."),
        CHAT("user", "Hi"),
        CHAT("assistant", "Hello!"),
        CHAT("user", "Name a fruit."),
    ]
    record = {
        "prompt": prompt,
        "chosen": [CHAT("assistant", "A pear.")],
        "rejected": [CHAT("assistant", "No.")],
    }
    (pair,) = tokenize(tok, [record])
    full = tok.apply_chat_template(prompt + record["chosen"], tokenize=False)
    full_ids = tok(full, add_special_tokens=False)["input_ids"]
    ours = pair.prompt.tolist() + pair.chosen.tolist()
    # Prompt + completion is the whole rendering, less the newline after the final EOS.
    assert full.endswith("<|eos|>\n") and ours == full_ids[:-1]
    assert decode(tok, pair.chosen) == "A pear.<|eos|>" and pair.chosen[-1] == tok.eos_token_id
    assert ours.count(tok.bos_token_id) == 1
    assert decode(tok, pair.prompt).endswith("<|user|>\nName a fruit.<|eos|>\n<|assistant|>\n")


def test_prefix_mismatch_is_reported_with_the_record(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = BROKEN
    good = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Bye."}
    with pytest.raises(data.DataError) as error:
        tokenize(tok, [good, good])
    assert "d.jsonl:1: field 'chosen': the chat template's rendering" in str(error.value)
    assert "template_error: 2" in str(error.value)


def test_a_record_the_template_rejects_is_found_in_its_batch(tokenizer):
    """Templates render in batches; one raising record fails only itself, by its line."""
    tok = copy.deepcopy(tokenizer)
    raising = "{% if 'BOOM' in m['content'] %}{{ raise_exception('no BOOM') }}{% endif %}"
    tok.chat_template = "{% for m in messages %}" + raising + "{% endfor %}" + CHATML
    good = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Bye."}
    bad = {"prompt": "BOOM?", "chosen": "Hello.", "rejected": "Bye."}
    pairs = tokenize(tok, [good, bad, good], on_error="skip")
    assert [p.source for p in pairs] == ["d.jsonl:1", "d.jsonl:3"]
    alone = tokenize(tok, [good])[0]
    assert all(p.prompt.tolist() == alone.prompt.tolist() for p in pairs)
    with pytest.raises(data.DataError) as error:
        tokenize(tok, [good, bad, good])
    assert "d.jsonl:2: chat template failed: no BOOM" in str(error.value)


def test_bos_added_once_per_tokenizer(tokenizer):
    tok = copy.deepcopy(tokenizer)
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", special_tokens=[("<|bos|>", bos)]
    )
    assert tok("a")["input_ids"][0] == bos  # this tokenizer adds BOS itself
    record = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Bye."}
    (with_template,) = tokenize(tok, [record])  # the template already holds BOS: not doubled
    (plain,) = tokenize(tok, [record], apply_chat_template=False)  # added once
    for pair in (with_template, plain):
        assert pair.prompt[0] == bos and pair.prompt.tolist().count(bos) == 1
    assert decode(tok, plain.prompt) == "<|bos|>Hi?" and plain.chosen[-1] == tok.eos_token_id
    (plain,) = tokenize(tokenizer, [record], apply_chat_template=False)  # adds no BOS: none
    assert bos not in plain.prompt.tolist()
    with pytest.raises(data.DataError, match="d.jsonl:1: empty prompt"):
        tokenize(tokenizer, [record | {"prompt": ""}], apply_chat_template=False)


def test_implicit_prompt_conversations_split_at_the_first_differing_turn(tokenizer):
    shared = [CHAT("user", "Hi"), CHAT("assistant", "Hello!"), CHAT("user", "Fruit?")]
    implicit = {
        "chosen": shared + [CHAT("assistant", "A pear.")],
        "rejected": shared + [CHAT("assistant", "No.")],
    }
    explicit = {"prompt": shared, "chosen": "A pear.", "rejected": "No."}
    a, b = tokenize(tokenizer, [implicit]), tokenize(tokenizer, [explicit])
    assert a[0].prompt.tolist() == b[0].prompt.tolist()
    assert a[0].rejected.tolist() == b[0].rejected.tolist()
    diverging_user = {
        "chosen": shared + [CHAT("assistant", "x")],
        "rejected": shared[:2] + [CHAT("user", "Other?"), CHAT("assistant", "x")],
    }
    with pytest.raises(
        data.DataError,
        match="d.jsonl:1: 'chosen' and 'rejected' first differ "
        "at turn 2, which is not an assistant turn",
    ):
        tokenize(tokenizer, [diverging_user])


def test_implicit_prompt_strings_cut_before_the_differing_word(tokenizer):
    record = {"chosen": "Q: name a fruit. A: a pear", "rejected": "Q: name a fruit. A: an apple"}
    (pair,) = tokenize(tokenizer, [record], apply_chat_template=False)
    assert decode(tokenizer, pair.prompt) == "Q: name a fruit. A:"
    assert decode(tokenizer, pair.chosen) == " a pear<|eos|>"
    assert decode(tokenizer, pair.rejected) == " an apple<|eos|>"


def test_hh_transcripts_with_and_without_chat_template(tokenizer):
    record = {
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Fruit?\n\nAssistant: A pear.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Fruit?\n\nAssistant: No.",
    }
    (chat,) = tokenize(tokenizer, [record])
    shared = [CHAT("user", "Hi"), CHAT("assistant", "Hello!"), CHAT("user", "Fruit?")]
    (expected,) = tokenize(tokenizer, [{"prompt": shared, "chosen": "A pear.", "rejected": "No."}])
    assert chat.prompt.tolist() == expected.prompt.tolist()
    (plain,) = tokenize(tokenizer, [record], apply_chat_template=False)
    assert decode(tokenizer, plain.prompt).endswith("\n\nHuman: Fruit?\n\nAssistant:")
    assert decode(tokenizer, plain.chosen) == " A pear.<|eos|>"
    (no_blank_line,) = tokenize(tokenizer, [{k: v[2:] for k, v in record.items()}])
    assert no_blank_line.prompt.tolist() == chat.prompt.tolist()
    bad = record | {"rejected": "\n\nHuman: Hi\n\nHuman: again\n\nAssistant: No."}
    with pytest.raises(data.DataError, match="field 'rejected\\[1\\]' is a 'user' turn"):
        tokenize(tokenizer, [record, bad])


def ranked(ranks):
    return {
        "context": [CHAT("user", "Fruit?")],
        "completions": [
            {"rank": rank, "completion": [CHAT("assistant", f"answer {i}")]}
            for i, rank in enumerate(ranks)
        ],
    }


def test_ranked_completions_best_worst_all_and_ties(tokenizer):
    (pair,) = tokenize(tokenizer, [ranked([2, 0, 1])])
    assert decode(tokenizer, pair.chosen) == "answer 1<|eos|>"  # lower rank is preferred
    assert decode(tokenizer, pair.rejected) == "answer 0<|eos|>"
    pairs = tokenize(tokenizer, [ranked([2, 0, 1])], ranked_pairs="all")
    assert [(decode(tokenizer, p.chosen)[7], decode(tokenizer, p.rejected)[7]) for p in pairs] == [
        ("1", "2"),
        ("1", "0"),
        ("2", "0"),
    ]
    assert pairs[0].source == "d.jsonl:1 (completions 1>2)"
    with pytest.raises(data.DataError, match=r"d.jsonl:1: field 'completions': equal ranks"):
        tokenize(tokenizer, [ranked([0, 0])])
    records = [
        (f"r:{i}", r) for i, r in enumerate([ranked([0, 1, 1]), ranked([0, 0]), ranked([1, 0])])
    ]
    cfg = data.DataSettings(max_seq_length=256, ranked_ties="skip", ranked_pairs="all")
    pairs, _ = data.tokenize_records(records, tokenizer, cfg)
    assert len(pairs) == 3  # [0,1,1] → 2 pairs (one tie left out); [0,0] → none; [1,0] → 1


def test_field_and_role_mapping_with_system_prompt(tokenizer):
    record = {
        "question": [{"from": "human", "value": "Fruit?"}],
        "good": {"from": "gpt", "value": "A pear."},
        "bad": "No.",
    }
    cfg = dict(
        fields=(
            ("prompt", "question"),
            ("chosen", "good"),
            ("rejected", "bad"),
            ("role", "from"),
            ("content", "value"),
        ),
        roles=(("human", "user"), ("gpt", "assistant")),
        system_prompt="Be brief.",
    )
    (pair,) = tokenize(tokenizer, [record], **cfg)
    assert decode(tokenizer, pair.prompt).startswith("<|bos|><|system|>\nBe brief.<|eos|>")
    assert decode(tokenizer, pair.chosen) == "A pear.<|eos|>"
    (own,) = tokenize(tokenizer, [record | {"system": "Own."}], **cfg)  # the record's wins
    assert "<|system|>\nOwn.<|eos|>" in decode(tokenizer, own.prompt)
    with pytest.raises(data.DataError, match="missing field 'question'"):
        tokenize(
            tokenizer,
            [{"prompt": "a", "chosen": "b", "rejected": "c"}],
            format="explicit",
            fields=cfg["fields"],
        )


def test_conversation_without_chat_template_is_an_error(tokenizer):
    record = {"prompt": [CHAT("user", "Fruit?")], "chosen": "A pear.", "rejected": "No."}
    with pytest.raises(data.DataError, match="needs data.apply_chat_template=True"):
        tokenize(tokenizer, [record], apply_chat_template=False)


@pytest.mark.parametrize(
    "record, layout",
    [
        ({"prompt": "a", "chosen": "b", "rejected": "c"}, "explicit"),
        ({"chosen": "a b", "rejected": "a c"}, "implicit"),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"},
            "hh",
        ),
        (ranked([0, 1]), "ranked"),
    ],
)
def test_layout_detection(tmp_path, tokenizer, record, layout):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    _, report = data.load_source(str(path), tokenizer, data.DataSettings(max_seq_length=64))
    assert report["format"] == layout and report["pairs"] == 1
