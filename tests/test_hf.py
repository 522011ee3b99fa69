"""dpo_jax.hf: every supported family loads from a transformers checkpoint and matches its
logits (padded and packed), exports back to a folder transformers loads, round-trips
bit-exactly, and loads / exports the same on an 8-device fsdp mesh as on one device."""

import dataclasses
import filecmp
import json
import os
import shutil
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from conftest import without_compilation_cache
from flax import serialization, traverse_util

from dpo_jax import checkpoint, embedded, hf, hf_tensors, model, sharding
from dpo_jax.step import TrainState

V, D, F, L, N, K = 97, 64, 128, 2, 4, 2
FAMILIES = ["llama", "llama3_2", "mistral", "qwen2", "qwen3", "gemma2"]
# Small windows and caps so that each one changes the numbers at these lengths.
WINDOW, ATTN_CAP, FINAL_CAP = 4, 2.0, 3.0

forward = jax.jit(model.forward, static_argnums=0)


def hf_model(family: str):
    """A tiny random transformers model of `family` whose every parameter matters."""
    torch.manual_seed(0)
    common = dict(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=F,
        num_hidden_layers=L,
        num_attention_heads=N,
        num_key_value_heads=K,
        rms_norm_eps=1e-6,
        max_position_embeddings=128,
        initializer_range=0.2,  # large enough that attention is far from uniform
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    T = transformers
    if family == "llama":
        config = T.LlamaConfig(**common)
    elif family == "llama3_2":  # tied embeddings + llama3 rope scaling, as Llama 3.2 1B
        rope = dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0)
        rope |= dict(high_freq_factor=4.0, original_max_position_embeddings=64)
        config = T.LlamaConfig(**common, tie_word_embeddings=True, rope_parameters=rope)
    elif family == "mistral":
        config = T.MistralConfig(**common, sliding_window=WINDOW)
    elif family == "qwen2":  # q/k/v biases; the sliding window on layers >= max_window_layers
        config = T.Qwen2Config(
            **common,
            rope_parameters=dict(rope_theta=1e6),
            use_sliding_window=True,
            sliding_window=3,
            max_window_layers=1,
        )
    elif family == "qwen3":
        config = T.Qwen3Config(**common, head_dim=24)  # != D // N on purpose
    elif family == "gemma2":  # 3 layers: sliding, full, sliding
        config = T.Gemma2Config(
            **common | dict(num_hidden_layers=3),
            head_dim=16,
            query_pre_attn_scalar=20,
            sliding_window=WINDOW,
            attn_logit_softcapping=ATTN_CAP,
            final_logit_softcapping=FINAL_CAP,
        )
    else:
        raise ValueError(family)
    hf_model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # HF initialises norms to 1 (Gemma: 0) and biases to 0
        for name, p in hf_model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return hf_model


def torch_logits(hf_model, tokens, mask=None) -> np.ndarray:
    with torch.no_grad():
        mask = None if mask is None else torch.tensor(np.asarray(mask, np.int64))
        return hf_model(input_ids=torch.tensor(tokens), attention_mask=mask).logits.numpy()


def ours(config, params, tokens, positions, segments) -> np.ndarray:
    return np.asarray(forward(config, params, tokens, positions, segments))


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family → (transformers model, folder it was saved to with save_pretrained)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family in FAMILIES:
        m = hf_model(family)
        m.save_pretrained(root / family)
        out[family] = (m, str(root / family))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_transformers_and_round_trips(family, saved, tmp_path):
    torch_model, folder = saved[family]
    config, params = hf.load_pretrained(folder)
    assert config.architecture == type(torch_model).__name__
    assert model.num_params(config) == sum(p.numel() for p in torch_model.parameters())
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init_params(config, jax.random.key(0))))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), shapes
    )

    # Right-padded batch with an attention mask.
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, size=(2, 12))
    mask = np.arange(12)[None, :] < np.array([[12], [7]])
    positions = np.broadcast_to(np.arange(12), (2, 12))
    expected = torch_logits(torch_model, tokens, mask)
    got = ours(config, params, tokens, positions, mask.astype(np.int32))
    assert np.abs(expected).max() > 0.5  # a non-trivial comparison
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=0)

    # Packed rows: several sequences per row against each run alone by transformers.
    lengths = [[5, 4, 3], [7, 3]]  # row 2 ends with 2 padding tokens
    packed_tokens = np.zeros((2, 12), np.int64)
    packed_positions = np.zeros((2, 12), np.int64)
    segments = np.zeros((2, 12), np.int32)
    sequences = []
    for r, row in enumerate(lengths):
        start = 0
        for s, n in enumerate(row):
            seq = rng.integers(3, V, size=n)
            packed_tokens[r, start : start + n] = seq
            packed_positions[r, start : start + n] = np.arange(n)
            segments[r, start : start + n] = s + 1
            sequences.append((r, start, seq))
            start += n
    got = ours(config, params, packed_tokens, packed_positions, segments)
    for r, start, seq in sequences:
        alone = torch_logits(torch_model, seq[None])[0]
        np.testing.assert_allclose(got[r, start : start + len(seq)], alone, atol=1e-4, rtol=0)

    # Export (sharded into several files) → transformers loads it and gives the same logits.
    out = tmp_path / "out"
    base = hf.read_hf_config(folder)  # keeps the token ids
    hf.save_pretrained(str(out), config, params, max_shard_size="20KB", base_config=base)
    assert (out / "model.safetensors.index.json").exists()
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), attn_implementation="eager"
    ).eval()
    assert type(exported) is type(torch_model)
    np.testing.assert_allclose(
        torch_logits(exported, tokens, mask)[mask], expected[mask], atol=1e-6, rtol=0
    )
    # load → export → load is bit-exact.
    config2, params2 = hf.load_pretrained(str(out))
    assert config2 == config
    assert_same_params(params2, params)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_flax_msgpack_and_hf_sharded_safetensors_load_the_same_params(saved, tmp_path):
    torch_model, folder = saved["llama"]
    config, params = hf.load_pretrained(folder)
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    exported = hf.hf_tensors_from_params(config, params)
    assert exported.keys() == sd.keys()
    for name, value in sd.items():
        np.testing.assert_array_equal(exported[name], value)

    # The layout transformers 4.x FlaxLlamaForCausalLM.save_pretrained writes: Dense kernels
    # [in, out], norms' "weight", embed_tokens/embedding, layers keyed by index.
    def flax_leaf(name, value):
        if name.endswith("embed_tokens.weight"):
            return name.replace(".weight", ".embedding"), value
        if "norm" in name:
            return name, value
        return name.replace(".weight", ".kernel"), value.T

    flat = dict(flax_leaf(name, value) for name, value in sd.items())
    tree = traverse_util.unflatten_dict({tuple(k.split(".")): v for k, v in flat.items()})
    assert tree["model"]["layers"]["1"]["self_attn"]["q_proj"]["kernel"].shape == (D, N * D // N)
    flax_dir = tmp_path / "flax"
    flax_dir.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), flax_dir)
    (flax_dir / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))
    config_flax, params_flax = hf.load_pretrained(str(flax_dir))
    assert config_flax == config
    assert_same_params(params_flax, params)

    # transformers' own sharded safetensors (model.safetensors.index.json), in bfloat16.
    sharded_dir = tmp_path / "sharded"
    torch_model.save_pretrained(sharded_dir, max_shard_size="30KB")
    assert len(list(sharded_dir.glob("*.safetensors"))) > 2
    config_sharded, params_sharded = hf.load_pretrained(str(sharded_dir))
    assert_same_params(params_sharded, params)
    config_bf16, params_bf16 = hf.load_pretrained(str(sharded_dir), dtype=jnp.bfloat16)
    assert config_bf16.param_dtype == config_bf16.dtype == "bfloat16"
    expected = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert_same_params(params_bf16, expected)


def test_8_device_fsdp_mesh_loads_and_exports_like_one_device(saved, tmp_path, monkeypatch):
    _, folder = saved["gemma2"]
    config, params = hf.load_pretrained(folder)
    mesh = sharding.make_mesh(1, 8, 1)
    assert mesh.devices.size == 8
    shardings = nn.logical_to_mesh_sharding(
        model.logical_axes(config), mesh, sharding.DEFAULT_RULES
    )
    read = hf_tensors.Safetensors.read
    sizes = []
    monkeypatch.setattr(
        hf_tensors.Safetensors, "read", lambda *a: sizes.append((out := read(*a)).size) or out
    )
    _, sharded = hf.load_pretrained(folder, shardings=shardings)
    # Each device's slice is read once, replicas (the norms) once: every weight read once.
    assert sum(sizes) == model.num_params(config) and len(sizes) > 8 * config.num_layers
    monkeypatch.undo()
    assert_same_params(sharded, params)
    jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim) or pytest.fail(str(s)),
                 sharded, shardings)  # fmt: skip
    q_kernel = sharded["layers"]["attn"]["q_proj"]["kernel"]
    assert q_kernel.addressable_shards[0].data.shape == (3, D // 8, N, 16)  # [L, D/8, N, H]

    one, eight = tmp_path / "one", tmp_path / "eight"
    hf.save_pretrained(str(one), config, params, max_shard_size="40KB")
    hf.save_pretrained(str(eight), config, sharded, max_shard_size="40KB")
    files = sorted(os.listdir(one))
    assert files == sorted(os.listdir(eight)) and len(files) > 3
    _, mismatch, errors = filecmp.cmpfiles(one, eight, files, shallow=False)
    assert not mismatch and not errors


def test_errors_name_the_problem(saved, tmp_path):
    _, folder = saved["llama"]
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((open(os.path.join(folder, "config.json"))).read())
    (bad / "config.json").write_text(json.dumps(config | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(hf.HFError, match="GPT2LMHeadModel.*supported.*Gemma2ForCausalLM"):
        hf.load_pretrained(str(bad))

    (bad / "config.json").write_text(json.dumps(config))
    (bad / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(hf.HFError, match="never unpickled.*safe_serialization=True"):
        hf.load_pretrained(str(bad))

    (bad / "config.json").write_text(json.dumps(config | {"intermediate_size": F + 1}))
    shutil.copy(os.path.join(folder, "model.safetensors"), bad)
    with pytest.raises(
        hf.HFError, match=r"gate_proj.weight has shape \[128, 64\]; config.json implies \[129, 64\]"
    ):
        hf.load_pretrained(str(bad))

    (bad / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 3}))
    with pytest.raises(hf.HFError, match="model.layers.2.* missing"):
        hf.load_pretrained(str(bad))

    (bad / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1}))
    with pytest.raises(hf.HFError, match="does not use.*model.layers.1"):
        hf.load_pretrained(str(bad))

    with pytest.raises(hf.HFError, match="HF_HUB_OFFLINE.*hf download dpo-jax-tests/no-such"):
        hf.load_pretrained("dpo-jax-tests/no-such-model")


def test_tokenizer_errors_are_one_line_and_say_what_fixes_them(tmp_path):
    assert hf.load_tokenizer(embedded.TINY_MODEL_DIR).vocab_size > 0
    name = "dpo-jax-tests/no-such-tokenizer"  # offline in tests (conftest): never fetched
    with pytest.raises(hf.HFError) as caught:
        hf.load_tokenizer(name)
    message = str(caught.value)
    assert "\n" not in message and "neither a local folder nor reachable" in message
    assert f"hf download {name}" in message and "data.tokenizer" in message
    with pytest.raises(hf.HFError, match="no such folder"):
        hf.load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(hf.HFError, match="cannot load a tokenizer from this folder.*--model"):
        hf.load_tokenizer(str(tmp_path), setting="--model")


def test_data_cli_offline_hub_tokenizer_is_a_one_line_error(tmp_path):
    """A hub model (configs/mistral_7b.py) with no network and an empty HF cache: the data CLI
    names the model and the fix, and exits non-zero without a traceback."""
    from conftest import REPO

    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "dpo_jax.data", "--config", "configs/mistral_7b.py"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert "error: tokenizer 'mistralai/Mistral-7B-Instruct-v0.3'" in output
    assert "hf download mistralai/Mistral-7B-Instruct-v0.3" in output


def test_model_config_from_real_configs():
    """config.json fields of the real checkpoints (as published) map as transformers reads them."""
    gemma = hf.model_config_from_hf(
        {
            "architectures": ["Gemma2ForCausalLM"],
            "hidden_size": 2304,
            "intermediate_size": 9216,
            "num_hidden_layers": 26,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "vocab_size": 256000,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 256,
            "sliding_window": 4096,
            "final_logit_softcapping": 30.0,
            "attn_logit_softcapping": 50.0,
        }
    )
    assert gemma.tie_word_embeddings and gemma.rms_norm_unit_offset and gemma.post_norms
    assert gemma.layer_windows[:3] == (4096, 0, 4096) and gemma.final_logit_softcap == 30.0
    assert model.num_params(gemma) == 2_614_341_888  # google/gemma-2-2b
    qwen25 = hf.model_config_from_hf(
        {
            "architectures": ["Qwen2ForCausalLM"],
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "use_sliding_window": False,
            "max_window_layers": 21,
            "tie_word_embeddings": True,
        }
    )
    assert qwen25.sliding_window is None and qwen25.attention_bias
    assert model.num_params(qwen25) == 494_032_768  # Qwen/Qwen2.5-0.5B
    mistral = hf.model_config_from_hf(
        {
            "architectures": ["MistralForCausalLM"],
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "vocab_size": 32000,
            "sliding_window": 4096,
        }
    )
    assert mistral.layer_windows == (4096,) * 32
    flops = model.flops_per_token(mistral, 8192, backward=False)
    assert flops < model.flops_per_token(dataclasses.replace(mistral, sliding_window=None), 8192)


def test_export_folder_has_tokenizer_and_config_keys(tmp_path):
    """save_pretrained with a tokenizer folder: its files are copied, token ids kept."""
    config = hf.read_model_config(embedded.TINY_MODEL_DIR)
    params = nn.meta.unbox(jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0)))
    base = hf.read_hf_config(embedded.TINY_MODEL_DIR)
    out = tmp_path / "out"
    hf.save_pretrained(
        str(out), config, params, embedded.TINY_MODEL_DIR, base_config=base, dtype="bfloat16"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.pad_token_id == base["pad_token_id"]
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == "bfloat16" and written["eos_token_id"] == base["eos_token_id"]
    _, loaded = hf.load_pretrained(str(out), dtype="bfloat16")
    assert_same_params(loaded, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))


def test_export_cli_writes_a_checkpoint_as_an_hf_folder(tmp_path):
    """A checkpoint written by train.py's Checkpointer → `python -m dpo_jax.export` (8 CPU
    devices, fsdp) → an HF folder transformers loads, holding exactly the trained params."""
    from conftest import load_config

    run = load_config("tiny")
    config = hf.read_model_config(run.model.name)
    params = nn.meta.unbox(jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(1)))
    state = TrainState(step=jnp.asarray(3), params=params, opt_state=optax.adamw(1e-3).init(params))
    workdir = tmp_path / "run"
    ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
    ckpt.save(3, state, {"epoch": 0, "index": 3}, json.loads(run.to_json_best_effort()))
    ckpt.close()

    out = tmp_path / "hf"
    env = os.environ | {"JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "dpo_jax.export", f"--workdir={workdir}", f"--out={out}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "exported step 3" in result.stdout

    _, loaded = hf.load_pretrained(str(out))
    assert_same_params(loaded, params)
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens = np.random.default_rng(0).integers(3, config.vocab_size, size=(1, 10))
    np.testing.assert_allclose(
        ours(config, params, tokens, np.arange(10)[None], np.ones((1, 10), np.int32)),
        torch_logits(torch_model, tokens),
        atol=1e-4,
        rtol=0,
    )

    result = subprocess.run(command + ["--step=7"], env=env, capture_output=True, text=True)
    assert result.returncode == 1 and "--step 7: not among the checkpoints" in result.stderr


REAL_CONFIGS = ["llama3_2_1b", "qwen2_5_0_5b", "qwen3_1_7b", "llama3_1_8b", "mistral_7b"]
REAL_CONFIGS += ["gemma2_2b"]


@pytest.mark.parametrize("name", REAL_CONFIGS)
def test_real_model_configs_have_the_keys_of_tiny(name):
    from conftest import REPO, load_config

    def keys(config, prefix=""):
        out = set()
        for key, value in config.items():
            out |= keys(value, f"{prefix}{key}.") if hasattr(value, "items") else {prefix + key}
        return out

    config = load_config(name)
    assert keys(config) == keys(load_config("tiny"))
    assert config.model.init == "pretrained" and config.model.dtype == "bfloat16"
    assert config.data.max_seq_length <= config.model.max_length
    assert 5e-7 <= config.training.learning_rate <= 1e-6 and config.training.beta == 0.1
    rows = 2 * config.training.batch_size // config.training.gradient_accumulation_steps
    assert rows % 8 == 0 and (2 * config.eval.batch_size) % 8 == 0  # an 8-GPU host
    with open(os.path.join(REPO, "configs", f"{name}.py")) as f:
        assert f"--config configs/{name}.py" in f.read()


TWO_PROCESS_SCRIPT = """
import sys
import flax.linen as nn
from dpo_jax import hf, model, sharding

port, index, folder, out = sys.argv[1:]
sharding.initialize_distributed(f"localhost:{port}", 2, int(index))
config = hf.read_model_config(folder)
mesh = sharding.make_mesh(1, 8, 1)  # 2 processes x 4 devices
specs = model.logical_axes(config)
shardings = nn.logical_to_mesh_sharding(specs, mesh, sharding.DEFAULT_RULES)
config, params = hf.load_pretrained(folder, shardings=shardings)
assert not params["layers"]["mlp"]["up_proj"]["kernel"].is_fully_addressable
hf.save_pretrained(out, config, params, max_shard_size="40KB")
"""


def test_two_processes_load_and_export_like_one(saved, tmp_path):
    _, folder = saved["qwen3"]
    config, params = hf.load_pretrained(folder)
    one = tmp_path / "one"
    hf.save_pretrained(str(one), config, params, max_shard_size="40KB")

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    env = without_compilation_cache(os.environ)
    env |= {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env |= {"JAX_PLATFORMS": "cpu"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_PROCESS_SCRIPT, str(port), str(i), folder, str(two)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs[0][-3000:] + outputs[1][-3000:]
    files = sorted(os.listdir(one))
    assert files == sorted(os.listdir(two)) and len(files) > 3
    _, mismatch, errors = filecmp.cmpfiles(one, two, files, shallow=False)
    assert not mismatch and not errors


def test_trainer_log_probs_apply_gemma2_final_softcap(saved):
    """batch_loss.sequence_stats (vocab-chunked) gives the log-probs of forward's capped logits."""
    from dpo_jax import batch_loss, losses

    _, folder = saved["gemma2"]
    config, params = hf.load_pretrained(folder)
    tokens = np.random.default_rng(0).integers(3, V, size=(2, 9))
    batch = {
        "tokens": tokens[:, :-1],
        "labels": tokens[:, 1:],
        "positions": np.broadcast_to(np.arange(8), (2, 8)),
        "segment_ids": np.ones((2, 8), np.int32),
        "loss_mask": np.ones((2, 8), bool),
        "sequence_ids": np.array([[0] * 8, [1] * 8]),
        "pair_mask": np.ones(1, bool),
    }
    logps = batch_loss.sequence_stats(config, params, batch, chunk_size=32)[0]
    logits = forward(config, params, batch["tokens"], batch["positions"], batch["segment_ids"])
    assert np.abs(logits).max() < FINAL_CAP
    expected = losses.token_logps(logits, jnp.asarray(batch["labels"])).sum(-1)
    np.testing.assert_allclose(logps, expected, atol=1e-4, rtol=0)
