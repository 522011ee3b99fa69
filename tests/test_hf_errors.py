"""A missing, truncated or corrupt file of an HF model folder is one HFError line that names
the file, says what is wrong and what fixes it; never a safetensors / json / tokenizers
traceback."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import serialization

from dpo_jax import embedded, hf
from dpo_jax.hf import HFError

REFETCH = "re-download or re-export the model"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """{"single": folder with model.safetensors, "sharded": one with an index and shards}
    of a tiny random Llama (hidden size 16)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    model = transformers.LlamaForCausalLM(config)
    root = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="4KB")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 2
    return {"single": str(root / "single"), "sharded": str(root / "sharded")}


@pytest.fixture
def folder(pristine, tmp_path):
    """A fresh copy of a pristine folder, to corrupt."""
    return lambda kind: shutil.copytree(pristine[kind], tmp_path / kind)


def raises_one_line(call, *args, match: str) -> str:
    """The HFError `call(*args)` raises; its message matches `match` and is one line."""
    with pytest.raises(HFError, match=match) as caught:
        call(*args)
    message = str(caught.value)
    assert "\n" not in message
    return message


def load_params(path):
    return hf.load_params(str(path), hf.read_model_config(str(path)))


def test_pristine_folders_load(pristine):
    config, params = hf.load_pretrained(pristine["single"])
    _, sharded = hf.load_pretrained(pristine["sharded"])
    assert config.hidden_size == 16
    np.testing.assert_array_equal(params["embed"]["embedding"], sharded["embed"]["embedding"])


@pytest.mark.parametrize("keep", [0.5, 0.0, 4, -1], ids=["half", "empty", "4_bytes", "last_byte"])
def test_truncated_safetensors_names_the_file(folder, keep):
    path = folder("single") / "model.safetensors"
    data = path.read_bytes()
    cut = {0.5: len(data) // 2, 0.0: 0, 4: 4, -1: len(data) - 1}[keep]
    path.write_bytes(data[:cut])
    for load in (hf.load_pretrained, load_params):
        message = raises_one_line(load, str(path.parent), match=re.escape(str(path)))
        assert "not a readable safetensors file" in message and f"{cut} bytes" in message
        assert "truncated or corrupt" in message and REFETCH in message


def test_index_pointing_to_a_missing_shard_names_the_shard(folder):
    sharded = folder("sharded")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    for load in (hf.load_pretrained, load_params):
        message = raises_one_line(load, str(sharded), match=re.escape(str(shard)))
        assert "missing, but model.safetensors.index.json lists it" in message
        assert REFETCH in message


def test_truncated_shard_names_the_shard(folder):
    sharded = folder("sharded")
    shard = sorted(sharded.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    message = raises_one_line(hf.load_pretrained, str(sharded), match=re.escape(str(shard)))
    assert "truncated or corrupt" in message and REFETCH in message


def test_index_and_shards_that_disagree_name_the_shard(folder):
    sharded = folder("sharded")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]  # an index from another export
    index_path.write_text(json.dumps(index))
    message = raises_one_line(hf.load_pretrained, str(sharded), match=re.escape(shards[1]))
    assert f"has no tensor {name}" in message and REFETCH in message


@pytest.mark.parametrize("text", ['{"metadata": {"total', "[]", '{"metadata": {}}'])
def test_corrupt_safetensors_index_names_the_index(folder, text):
    sharded = folder("sharded")
    (sharded / "model.safetensors.index.json").write_text(text)
    message = raises_one_line(
        hf.load_pretrained, str(sharded), match=re.escape(f"{sharded}/model.safetensors.index.json")
    )
    assert REFETCH in message


def test_truncated_flax_msgpack_names_the_file(folder, tmp_path):
    flax_dir = tmp_path / "flax"
    flax_dir.mkdir()
    shutil.copy(folder("single") / "config.json", flax_dir)
    tree = {"model": {"norm": {"weight": np.ones(16, np.float32)}}}
    data = serialization.msgpack_serialize(tree)
    (flax_dir / "flax_model.msgpack").write_bytes(data[: len(data) // 2])
    message = raises_one_line(
        hf.load_pretrained, str(flax_dir), match=re.escape(f"{flax_dir}/flax_model.msgpack")
    )
    assert "truncated or corrupt" in message and REFETCH in message


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"architectures": ["LlamaForCausalLM"], "hidden', "not valid JSON"),
        ("\xff\xfe garbage", "not valid JSON|unreadable"),
        ('["LlamaForCausalLM"]', "holds a list, not a JSON object"),
        ('{"architectures": ["LlamaForCausalLM"]}', "hidden_size.* missing"),
    ],
    ids=["truncated", "binary", "a_list", "no_sizes"],
)
def test_corrupt_config_json_names_the_file(folder, text, problem):
    single = folder("single")
    (single / "config.json").write_text(text, encoding="latin-1")
    config_file = re.escape(f"{single}/config.json")
    for load in (hf.read_model_config, hf.load_pretrained):
        message = raises_one_line(load, str(single), match=f"{config_file}: .*({problem})")
        assert REFETCH in message


def test_folder_without_config_json_names_it(folder):
    single = folder("single")
    (single / "config.json").unlink()
    raises_one_line(hf.read_model_config, str(single), match=re.escape(f"{single}/config.json"))


def test_folder_without_tokenizer_files_says_so(pristine):
    message = raises_one_line(
        hf.load_tokenizer, pristine["single"], match="no tokenizer files.*tokenizer.json"
    )
    assert pristine["single"] in message and "copy them from the base model" in message


@pytest.fixture
def tokenizer_dir(tmp_path):
    ignore = shutil.ignore_patterns("*.safetensors")  # the tokenizer files alone
    shutil.copytree(embedded.TINY_MODEL_DIR, tmp_path / "tok", ignore=ignore)
    assert hf.load_tokenizer(str(tmp_path / "tok")).vocab_size > 0
    return tmp_path / "tok"


@pytest.mark.parametrize("file", ["tokenizer.json", "tokenizer_config.json"])
def test_torn_tokenizer_file_names_it(tokenizer_dir, file):
    path = tokenizer_dir / file
    path.write_text(path.read_text()[:100])
    message = raises_one_line(
        hf.load_tokenizer, str(tokenizer_dir), match=re.escape(f"{path}: not valid JSON")
    )
    assert "re-download the tokenizer" in message


@pytest.mark.parametrize("bad", [{}, {"model": {"type": "NoSuchModel"}}], ids=["empty", "model"])
def test_tokenizer_json_that_tokenizers_rejects_is_an_hf_error(tokenizer_dir, bad):
    """Valid JSON that `tokenizers` cannot use: it raises a bare Exception (or KeyError)."""
    path = tokenizer_dir / "tokenizer.json"
    tokenizer = json.loads(path.read_text()) | bad if bad else {}
    path.write_text(json.dumps(tokenizer))
    message = raises_one_line(
        hf.load_tokenizer, str(tokenizer_dir), match="cannot load a tokenizer from this folder"
    )
    assert str(tokenizer_dir) in message and "tokenizer.json" in message
    assert "re-download the tokenizer" in message


@pytest.mark.parametrize(
    "scaling, fragment",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "'dynamic' is not supported (supported: llama3"),
        ({"rope_type": "linear"}, "linear needs 'factor' (a number)"),
        ({"rope_type": "linear", "factor": "x"}, "linear's values must be numbers"),
        ({"type": "llama3", "factor": 8.0}, "llama3 needs 'low_freq_factor'"),
    ],
    ids=["unknown", "missing", "not_a_number", "legacy_key_incomplete"],
)
def test_a_rope_scaling_we_cannot_apply_is_an_hf_error_naming_it(scaling, fragment):
    with pytest.raises(hf.HFError, match="config.json rope_scaling") as raised:
        hf.rope_scaling_from_hf({"rope_scaling": scaling, "max_position_embeddings": 128})
    assert fragment in str(raised.value), str(raised.value)
