#!/usr/bin/env python
"""Train the embedded tiny byte-level BPE tokenizer and write the tiny model config.

Reads ``dpo_jax/embedded/data/train.jsonl`` (see ``scripts/make_embedded_data.py``) and writes to
``dpo_jax/embedded/tiny/``:

* ``tokenizer.json``, ``tokenizer_config.json`` (with the chat template under ``"chat_template"``),
  ``special_tokens_map.json`` -- loadable offline with ``AutoTokenizer.from_pretrained``;
* ``config.json`` -- a tiny ``LlamaConfig`` (no weights: the model is initialised from scratch);
* ``generation_config.json`` -- bos/eos/pad ids.

Tokenizer conventions:

* special tokens (ids 0-5): ``<|pad|>``, ``<|bos|>``, ``<|eos|>``, ``<|user|>``, ``<|assistant|>``,
  ``<|system|>``;
* ``tokenizer(text)`` adds NO special tokens (no BOS, no EOS) -- the byte-level BPE ids of ``text``
  only. The BOS comes exclusively from the chat template, so it is never doubled;
* the chat template renders ``<|bos|>`` once, then each turn as ``<|role|>\\n{content}<|eos|>``,
  followed by ``\\n`` for system/user turns; ``add_generation_prompt`` appends
  ``<|assistant|>\\n``. Hence render(prompt + response) == render(prompt, generation prompt) +
  response + ``<|eos|>``, and the token ids of the latter are a prefix of the former's.

Deterministic: rerunning gives byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

from dpo_jax.embedded import TINY_MODEL_DIR, TRAIN_FILE

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, USER, ASSISTANT, SYSTEM]

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('Unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token -}}"
    "{%- if message['role'] != 'assistant' -%}{{- '\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
)

VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 256
ROPE_THETA = 10000.0


def _update_json(path: str, updates: dict, drop: tuple[str, ...] = ()) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for key in drop:
        data.pop(key, None)
    data.update(updates)
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _corpus(train_file: str) -> list[str]:
    texts: dict[str, None] = {}
    with open(train_file, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                for key in ("prompt", "chosen", "rejected"):
                    texts[rec[key]] = None
    return sorted(texts)


def train_tokenizer(train_file: str, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(train_file), trainer=trainer)
    # tokenizer(text) adds nothing: no BOS/EOS (the chat template supplies them).
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return tok


def build(out_dir: str, train_file: str, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    backend = train_tokenizer(train_file, vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        add_bos_token=False,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    os.makedirs(out_dir, exist_ok=True)
    for name in ("chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            os.remove(path)
    # save_jinja_files=False keeps the template inside tokenizer_config.json ("chat_template")
    # instead of transformers 5's separate chat_template.jinja.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    # Portability: name the generic fast-tokenizer class (loadable by transformers 4.x and 5.x)
    # rather than transformers 5's "TokenizersBackend" alias.
    _update_json(
        os.path.join(out_dir, "tokenizer_config.json"),
        {"tokenizer_class": "PreTrainedTokenizerFast"},
        drop=("backend",),
    )
    special_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "additional_special_tokens": [USER, ASSISTANT, SYSTEM],
    }
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(special_map, indent=2, sort_keys=True) + "\n")

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS)}
    model_vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=model_vocab,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=MODEL_MAX_LENGTH,
        rms_norm_eps=1e-5,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=True,
        hidden_act="silu",
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
    )
    config.save_pretrained(out_dir)
    # transformers 5 writes rope_theta inside "rope_parameters"; keep the classic top-level key
    # too so plain-JSON readers and transformers 4.x see it (5.x accepts both).
    _update_json(os.path.join(out_dir, "config.json"), {"rope_theta": ROPE_THETA})
    GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD]
    ).save_pretrained(out_dir)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-file", default=TRAIN_FILE)
    parser.add_argument("--out", default=TINY_MODEL_DIR)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    tokenizer = build(args.out, args.train_file, args.vocab_size)
    print(f"wrote {args.out}: {len(tokenizer)} tokens (incl. {len(SPECIAL_TOKENS)} special)")


if __name__ == "__main__":
    main()
