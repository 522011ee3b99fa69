"""Hugging Face interchange: `config.json` ↔ ModelConfig, HF weights → params, params → HF folder.

    config, params = load_pretrained("meta-llama/Llama-3.2-1B", dtype="bfloat16")
    save_pretrained("out/", config, params, tokenizer="meta-llama/Llama-3.2-1B")

Weights are read from safetensors (one file, or shards listed in model.safetensors.index.json)
or from the HF Flax `flax_model.msgpack` (transformers 4.x Flax*ForCausalLM.save_pretrained);
PyTorch pickles are never unpickled. With `shardings`, every tensor is built straight into its
NamedSharding: each device's block is read with safetensors' `get_slice`, so a process only
reads (and holds) the slices its devices own.

One table, `tensor_maps`, says how each HF tensor becomes one of our params: split the fused
head dims of the HF tensor (q_proj.weight [N*H, D] -> [N, H, D]), then transpose into our
order ([D, N, H]); per-layer tensors stack on a leading [L] axis. Loading and exporting both
walk that table, so they are exact inverses (fp32 round trips bit-exactly).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.model import ModelConfig, RopeScaling

# HF class in config.json "architectures" → its model_type. Llama covers Llama 2/3/3.1/3.2,
# SmolLM and TinyLlama; Qwen2 covers Qwen2.5.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
}
MODEL_TYPES = {model_type: arch for arch, model_type in SUPPORTED_ARCHITECTURES.items()}
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


class HFError(ValueError):
    """A Hugging Face folder or config this project cannot use, and why."""


# ------------------------------------------------------------------ config.json ↔ ModelConfig


def rope_scaling_from_hf(hf: dict) -> RopeScaling | None:
    scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or None)
    if not scaling:
        return None
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise HFError(f"config.json rope_scaling type {rope_type!r} is not supported (llama3 is)")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def _windows_from_hf(hf: dict, model_type: str, num_layers: int):
    """(sliding_window, layer_types) with transformers' defaults for each family."""
    if model_type == "llama":
        return None, None
    if model_type == "mistral":  # every layer when set (Mistral 7B v0.1: 4096; v0.2+: null)
        return hf.get("sliding_window"), None
    if model_type == "gemma2":
        window = hf.get("sliding_window", 4096)
        default = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
        ]
    else:  # qwen2 / qwen3: only with use_sliding_window, from layer max_window_layers on
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        first = int(hf.get("max_window_layers", 28))
        default = [
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
        ]
    if window is None:
        return None, None
    return int(window), tuple(hf.get("layer_types") or default)


def model_config_from_hf(hf: dict, *, where: str = "config.json", **runtime) -> ModelConfig:
    """An HF config dict → ModelConfig; `runtime` sets dtype, attention_impl, remat, ..."""
    architectures = hf.get("architectures") or []
    if not architectures and hf.get("model_type") in MODEL_TYPES:  # a bare PretrainedConfig
        architectures = [MODEL_TYPES[hf["model_type"]]]
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise HFError(
            f"{where}: architectures={architectures} is not supported; supported: "
            f"{sorted(SUPPORTED_ARCHITECTURES)}"
        )
    model_type = SUPPORTED_ARCHITECTURES[arch]
    gemma = model_type == "gemma2"
    if hf.get("attention_bias", False) and model_type in ("llama", "qwen3", "gemma2"):
        # Their attention_bias=True also biases o_proj, which this model lacks.
        raise HFError(f"{where}: attention_bias=True ({arch}) is not supported")
    if hf.get("mlp_bias", False):
        raise HFError(f"{where}: mlp_bias=True is not supported")
    act_name = (hf.get("hidden_activation") if gemma else None) or hf.get("hidden_act")
    act_name = act_name or ("gelu_pytorch_tanh" if gemma else "silu")
    if act_name not in _ACTIVATIONS:
        raise HFError(
            f"{where}: hidden activation {act_name!r} not supported: {list(_ACTIVATIONS)}"
        )
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:  # transformers 5 keeps it under rope_parameters
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    num_layers = int(hf["num_hidden_layers"])
    sliding_window, layer_types = _windows_from_hf(hf, model_type, num_layers)
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim") or {"gemma2": 256, "qwen3": 128}.get(model_type)
    if head_dim == int(hf["hidden_size"]) // num_heads:
        head_dim = None  # the default; keeps exported-and-reloaded configs equal
    gemma_only = lambda key, default: hf.get(key, default) if gemma else None  # noqa: E731
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim) if head_dim else None,
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling_from_hf(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        sliding_window=sliding_window,
        layer_types=layer_types,
        mlp_activation=_ACTIVATIONS[act_name],
        rms_norm_unit_offset=gemma,
        scale_embeddings=gemma,
        post_norms=gemma,
        query_pre_attn_scalar=gemma_only("query_pre_attn_scalar", 256),
        attn_logit_softcap=gemma_only("attn_logit_softcapping", 50.0),
        final_logit_softcap=gemma_only("final_logit_softcapping", 30.0),
        architecture=arch,
        **runtime,
    )


def hf_config_from_model_config(config: ModelConfig, dtype: str, base: dict | None = None) -> dict:
    """config.json for `config` (weights stored in `dtype`), keeping `base`'s other keys
    (token ids, ...). Written in the legacy rope_theta / rope_scaling form that transformers
    4.x, 5.x and vLLM all read."""
    model_type = SUPPORTED_ARCHITECTURES[config.architecture]
    stale = ("rope_parameters", "rope_scaling", "torch_dtype", "dtype", "layer_types", "auto_map")
    out = {k: v for k, v in (base or {}).items() if k not in stale}
    rope_scaling = None
    if config.rope_scaling is not None:
        rope_scaling = {"rope_type": "llama3"} | dataclasses.asdict(config.rope_scaling)
    out.update(
        architectures=[config.architecture],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.resolved_head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        torch_dtype=dtype,  # transformers 4.x, vLLM
        dtype=dtype,  # transformers 5
    )
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[config.mlp_activation]
    out["hidden_act"] = act
    if model_type in ("llama", "qwen3", "gemma2"):
        out["attention_bias"] = False
    if model_type == "mistral":
        out["sliding_window"] = config.sliding_window
    if model_type in ("qwen2", "qwen3"):
        types = config.layer_types
        out["use_sliding_window"] = config.sliding_window is not None
        if types is not None:
            out["sliding_window"] = config.sliding_window
            out["max_window_layers"] = next(
                (i for i, t in enumerate(types) if t == "sliding_attention"), config.num_layers
            )
            out["layer_types"] = list(types)
    if model_type == "gemma2":
        out.update(
            hidden_activation=act,
            query_pre_attn_scalar=config.query_pre_attn_scalar,
            attn_logit_softcapping=config.attn_logit_softcap,
            final_logit_softcapping=config.final_logit_softcap,
            sliding_window=config.sliding_window,
        )
        if config.layer_types is not None:
            out["layer_types"] = list(config.layer_types)
    return out


def resolve_model_path(name: str) -> str:
    """A local HF folder as is; otherwise a hub id, fetched (or found in the HF cache) with
    huggingface_hub."""
    if os.path.isdir(name):
        return name
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise HFError(f"model {name!r}: no such folder (and not a hub id like 'org/model')")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, allow_patterns=_HUB_PATTERNS)
        if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
            folder = snapshot_download(name, allow_patterns=_HUB_PATTERNS + ["flax_model*"])
        return folder
    except Exception as error:  # offline, unknown repo, gated repo without a token, ...
        raise HFError(
            f"model {name!r} is not a local folder and could not be fetched from the Hugging "
            f"Face Hub ({type(error).__name__}: {error}). Offline (HF_HUB_OFFLINE=1) only "
            f"models already in the HF cache resolve: run `huggingface-cli download {name}` "
            "where there is network, or point model.name at a local folder"
        ) from error


def read_hf_config(path: str) -> dict:
    """The raw config.json of a local HF folder or hub id."""
    config_file = os.path.join(resolve_model_path(path), "config.json")
    if not os.path.isfile(config_file):
        raise HFError(
            f"config model.name={path!r}: no config.json there; point model.name at a local "
            "Hugging Face model folder"
        )
    with open(config_file) as f:
        return json.load(f)


def read_model_config(path: str, **runtime) -> ModelConfig:
    """ModelConfig from `path/config.json` (a local HF model folder or a hub id)."""
    where = os.path.join(path, "config.json")
    return model_config_from_hf(read_hf_config(path), where=where, **runtime)


# ------------------------------------------------------------------------- the tensor table


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """How HF tensor `hf_name` ("{i}" = layer index) becomes our param at `path`.

    `split` is the HF shape with fused dims split, `groups` how many split dims make each HF
    dim, `perm` the axes of `split` in our order (np.transpose)."""

    path: tuple[str, ...]
    hf_name: str
    split: tuple[int, ...]
    groups: tuple[int, ...]
    perm: tuple[int, ...]
    per_layer: bool

    @property
    def hf_shape(self) -> tuple[int, ...]:
        dims, start = [], 0
        for g in self.groups:
            dims.append(math.prod(self.split[start : start + g]))
            start += g
        return tuple(dims)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.split[p] for p in self.perm)

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(x, np.argsort(self.perm)).reshape(self.hf_shape))


def tensor_maps(config: ModelConfig) -> list[TensorMap]:
    """Every HF tensor of `config`'s family, in the order they are exported."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.resolved_head_dim
    maps = [
        TensorMap(
            ("embed", "embedding"), "model.embed_tokens.weight", (v, d), (1, 1), (0, 1), False
        )
    ]

    def layer(path, hf, split, groups, perm):
        maps.append(TensorMap(path, f"model.layers.{{i}}.{hf}", split, groups, perm, True))

    # Llama's post_attention_layernorm is the pre-MLP norm; Gemma 2's normalises attention's
    # output and pre_feedforward_layernorm is the pre-MLP one.
    norms = [("attn_norm", "input_layernorm")]
    if config.post_norms:
        norms += [
            ("post_attn_norm", "post_attention_layernorm"),
            ("mlp_norm", "pre_feedforward_layernorm"),
            ("post_mlp_norm", "post_feedforward_layernorm"),
        ]
    else:
        norms += [("mlp_norm", "post_attention_layernorm")]
    for ours, hf in norms:
        layer((ours, "scale"), f"{hf}.weight", (d,), (1,), (0,))
    for name, heads in [("q_proj", n), ("k_proj", k), ("v_proj", k)]:
        # [heads*H, D] -> [heads, H, D] -> [D, heads, H]
        layer(
            ("attn", name, "kernel"), f"self_attn.{name}.weight", (heads, h, d), (2, 1), (2, 0, 1)
        )
        if config.attention_bias:
            layer(("attn", name, "bias"), f"self_attn.{name}.bias", (heads, h), (2,), (0, 1))
    # [D, N*H] -> [D, N, H] -> [N, H, D]
    layer(("attn", "o_proj", "kernel"), "self_attn.o_proj.weight", (d, n, h), (1, 2), (1, 2, 0))
    if config.qk_norm:
        for name in ("q_norm", "k_norm"):
            layer(("attn", name, "scale"), f"self_attn.{name}.weight", (h,), (1,), (0,))
    for name in ("gate_proj", "up_proj"):
        layer(("mlp", name, "kernel"), f"mlp.{name}.weight", (f, d), (1, 1), (1, 0))
    layer(("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", (d, f), (1, 1), (1, 0))
    maps.append(TensorMap(("final_norm", "scale"), "model.norm.weight", (d,), (1,), (0,), False))
    if not config.tie_word_embeddings:
        maps.append(
            TensorMap(("lm_head", "kernel"), "lm_head.weight", (v, d), (1, 1), (1, 0), False)
        )
    return maps


def _leaves(config: ModelConfig, m: TensorMap):
    """(our path, [(HF name, layer index into our leaf or None)]) for the leaves of map m."""
    if not m.per_layer:
        return [(m.path, [(m.hf_name, None)])]
    names = [m.hf_name.format(i=i) for i in range(config.num_layers)]
    if config.scan_layers:
        return [(("layers", *m.path), [(name, i) for i, name in enumerate(names)])]
    return [((f"layers_{i}", *m.path), [(name, None)]) for i, name in enumerate(names)]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ------------------------------------------------------------------------ reading weights


class _Safetensors:
    """Tensors of model.safetensors or of the shards that model.safetensors.index.json lists."""

    def __init__(self, folder: str, files: dict[str, str]):
        from safetensors import safe_open

        self.files = files  # HF name → file
        self.handles = {
            file: safe_open(os.path.join(folder, file), framework="numpy")
            for file in sorted(set(files.values()))
        }

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.files[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.handles[self.files[name]].get_slice(name)[index]


class _FlaxMsgpack:
    """flax_model.msgpack (HF Flax layout: model/layers/<i>/self_attn/q_proj/kernel [in, out],
    norms' `weight`, embed_tokens/embedding) seen through HF PyTorch names and layouts."""

    def __init__(self, folder: str, files: list[str]):
        from flax import serialization, traverse_util

        flat = {}
        for file in files:
            with open(os.path.join(folder, file), "rb") as f:
                tree = serialization.msgpack_restore(f.read())
            flat.update(traverse_util.flatten_dict(tree, sep="/"))
        self.arrays = {}  # HF name → (array, transposed)
        for key, array in flat.items():
            parts = key.split("/")
            if parts[0] != "model" and parts[0] != "lm_head":  # a base model saved alone
                parts = ["model", *parts]
            *module, leaf = parts
            suffix = "bias" if leaf == "bias" else "weight"
            self.arrays[".".join([*module, suffix])] = (array, leaf == "kernel")

    def names(self) -> set[str]:
        return set(self.arrays)

    def shape(self, name: str) -> tuple[int, ...]:
        array, transposed = self.arrays[name]
        return array.shape[::-1] if transposed else array.shape

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        array, transposed = self.arrays[name]
        return np.asarray((array.T if transposed else array)[index])


def _open_weights(folder: str):
    files = set(os.listdir(folder))
    if "model.safetensors.index.json" in files:
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            return _Safetensors(folder, json.load(f)["weight_map"])
    if "model.safetensors" in files:
        from safetensors import safe_open

        with safe_open(os.path.join(folder, "model.safetensors"), framework="numpy") as f:
            names = list(f.keys())
        return _Safetensors(folder, dict.fromkeys(names, "model.safetensors"))
    if "flax_model.msgpack.index.json" in files:
        with open(os.path.join(folder, "flax_model.msgpack.index.json")) as f:
            return _FlaxMsgpack(folder, sorted(set(json.load(f)["weight_map"].values())))
    if "flax_model.msgpack" in files:
        return _FlaxMsgpack(folder, ["flax_model.msgpack"])
    if any(
        f.startswith("pytorch_model") and f.endswith((".bin", ".bin.index.json")) for f in files
    ):
        raise HFError(
            f"{folder} holds only PyTorch pickles (pytorch_model*.bin), which are never "
            "unpickled here (a pickle can run code). Convert them once, where you trust the "
            'file: python -c "from transformers import AutoModelForCausalLM as M, '
            f"AutoTokenizer as T; p='{folder}'; M.from_pretrained(p).save_pretrained("
            "'converted', safe_serialization=True); T.from_pretrained(p).save_pretrained("
            "'converted')\" and point model.name at ./converted"
        )
    raise HFError(
        f"{folder}: no weights found (looked for model.safetensors, "
        "model.safetensors.index.json, flax_model.msgpack)"
    )


def _read_block(source, name: str, m: TensorMap, index: tuple[slice, ...]) -> np.ndarray:
    """Our-layout block `index` of one HF tensor, reading only the HF rows/cols it needs."""
    split_index = [slice(None)] * len(m.split)
    for ours_axis, split_axis in enumerate(m.perm):
        split_index[split_axis] = index[ours_axis]
    hf_index, block_shape, start = [], [], 0
    for g in m.groups:
        # A fused HF dim is read over the range of its outermost split dim; inner split dims
        # (head_dim, never sharded) are read whole and sliced after the reshape.
        lo, hi, _ = split_index[start].indices(m.split[start])
        inner = m.split[start + 1 : start + g]
        hf_index.append(slice(lo * math.prod(inner), hi * math.prod(inner)))
        block_shape += [hi - lo, *inner]
        split_index[start] = slice(None)
        start += g
    block = source.read(name, tuple(hf_index)).reshape(block_shape)
    return np.transpose(block[tuple(split_index)], m.perm)


def _load_leaf(source, m: TensorMap, targets, dtype, sharding):
    stacked = targets[0][1] is not None
    shape = ((len(targets),) if stacked else ()) + m.shape

    def block(index):
        if not stacked:
            return _read_block(source, targets[0][0], m, index).astype(dtype)
        layers = range(*index[0].indices(len(targets)))
        out = None
        for j, i in enumerate(layers):  # one host buffer for the whole stacked block
            layer_block = _read_block(source, targets[i][0], m, index[1:])
            if out is None:
                out = np.empty((len(layers), *layer_block.shape), dtype)
            out[j] = layer_block
        return out

    full = tuple(slice(None) for _ in shape)
    if sharding is None:
        return jnp.asarray(block(full))
    cache = {}  # replicas of one block are read once

    def callback(index):
        key = tuple(s.indices(n) for s, n in zip(index, shape, strict=True))
        if key not in cache:
            cache[key] = block(index)
        return cache[key]

    return jax.make_array_from_callback(shape, sharding, callback)


class _Arrays:
    """An in-memory {HF name: array} (e.g. a transformers model's state_dict as numpy)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.tensors[name][index])


def _params_from_source(source, config: ModelConfig, shardings, dtype, where: str):
    dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
    available, used, params = source.names(), set(), {}
    for m in tensor_maps(config):
        for leaf_path, targets in _leaves(config, m):
            for name, _ in targets:
                if name not in available:
                    raise HFError(f"{where}: tensor {name} is missing from the weights")
                if source.shape(name) != m.hf_shape:
                    raise HFError(
                        f"{where}: {name} has shape {list(source.shape(name))}; config.json "
                        f"implies {list(m.hf_shape)}"
                    )
                used.add(name)
            sharding = None if shardings is None else _get(shardings, leaf_path)
            _set(params, leaf_path, _load_leaf(source, m, targets, dtype, sharding))
    unused = {n for n in available - used if not n.endswith("rotary_emb.inv_freq")}
    if config.tie_word_embeddings:
        unused.discard("lm_head.weight")  # some tied checkpoints store the copy too
    if unused:
        raise HFError(
            f"{where}: weights this {config.architecture} config does not use: "
            f"{sorted(unused)[:6]}{' ...' if len(unused) > 6 else ''}"
        )
    return params


def params_from_hf_tensors(config: ModelConfig, tensors, shardings=None, dtype=None):
    """Our params tree from HF-named tensors in PyTorch layout ({name: array}, e.g.
    `{k: v.numpy() for k, v in torch_model.state_dict().items()}`)."""
    return _params_from_source(_Arrays(tensors), config, shardings, dtype, "tensors")


def hf_tensors_from_params(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """{HF name: numpy array in PyTorch layout} of (host-gathered) params; the inverse of
    params_from_hf_tensors."""
    params, out = nn.meta.unbox(params), {}
    for m in tensor_maps(config):
        for leaf_path, targets in _leaves(config, m):
            host = _to_host(_get(params, leaf_path))
            for name, layer in targets:
                out[name] = m.to_hf(host if layer is None else host[layer])
    return out


def load_params(path: str, config: ModelConfig, shardings=None, dtype=None):
    """The weights of HF folder (or hub id) `path` as our plain params tree of `config`, in
    `dtype` (default config.param_dtype). With `shardings` (a matching pytree of
    NamedShardings) each array is assembled on its devices from the slices they hold."""
    folder = resolve_model_path(path)
    return _params_from_source(_open_weights(folder), config, shardings, dtype, folder)


def load_pretrained(path: str, dtype="float32", shardings=None, *, compute_dtype=None, **runtime):
    """(ModelConfig, params) of an HF folder or hub id; params in `dtype`, computation in
    `compute_dtype` (default: `dtype`); `runtime` sets other ModelConfig options
    (attention_impl, remat_policy, scan_layers)."""
    dtype = jnp.dtype(dtype).name
    compute_dtype = jnp.dtype(compute_dtype or dtype).name
    folder = resolve_model_path(path)
    config = read_model_config(folder, dtype=compute_dtype, param_dtype=dtype, **runtime)
    return config, load_params(folder, config, shardings, dtype)


# ------------------------------------------------------------------------ writing weights


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", str(size), re.IGNORECASE)
    if not match:
        raise HFError(f"max_shard_size={size!r}: use bytes or e.g. '5GB', '500MB'")
    unit = match.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * base ** ("KMG".index(unit[0]) + 1))


def _to_host(x) -> np.ndarray:
    """The whole array on this host, from any sharding (collective across processes)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(
    path: str,
    model_config: ModelConfig,
    params,
    tokenizer=None,
    *,
    dtype=None,
    max_shard_size: int | str = "5GB",
    base_config: dict | None = None,
    generation_config: dict | None = None,
) -> None:
    """Writes an HF folder: safetensors (sharded with an index past max_shard_size),
    config.json, generation_config.json and, when given, the tokenizer (an object with
    save_pretrained, or a folder / hub id whose tokenizer files are copied).

    `params` may be sharded over any mesh and processes: every process must call this (the
    gathers are collective); only process 0 writes. `dtype` defaults to the params' dtype;
    `base_config` (the source config.json) keeps keys such as token ids."""
    params = nn.meta.unbox(params)
    leaves = [(m, p, t) for m in tensor_maps(model_config) for p, t in _leaves(model_config, m)]
    first = np.dtype(_get(params, leaves[0][1]).dtype)
    out_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else first
    # Plan the shards from shapes alone, so names are known before anything is gathered.
    limit = _parse_size(max_shard_size)
    plan, size = [[]], 0
    for m, _, targets in leaves:
        nbytes = math.prod(m.hf_shape) * out_dtype.itemsize
        for name, _ in targets:
            if plan[-1] and size + nbytes > limit:
                plan.append([])
                size = 0
            plan[-1].append(name)
            size += nbytes
    files = (
        ["model.safetensors"]
        if len(plan) == 1
        else [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    )
    shard_of = {name: k for k, names in enumerate(plan) for name in names}
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        for old in os.listdir(path):  # an earlier export's shards would shadow or confuse
            if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", old):
                os.remove(os.path.join(path, old))

    from safetensors.numpy import save_file

    buffers = [{} for _ in plan]
    for m, leaf_path, targets in leaves:
        host = _to_host(_get(params, leaf_path))  # every process: the gather is collective
        for name, layer in targets:
            k = shard_of[name]
            buffers[k][name] = m.to_hf(host if layer is None else host[layer]).astype(out_dtype)
            if len(buffers[k]) == len(plan[k]):
                if writer:
                    save_file(buffers[k], os.path.join(path, files[k]), metadata={"format": "pt"})
                buffers[k] = {}
        del host

    if writer:
        if len(plan) > 1:
            total = sum(math.prod(m.hf_shape) * len(t) for m, _, t in leaves) * out_dtype.itemsize
            index = {
                "metadata": {"total_size": total},
                "weight_map": {name: files[k] for name, k in sorted(shard_of.items())},
            }
            _write_json(os.path.join(path, "model.safetensors.index.json"), index)
        hf_config = hf_config_from_model_config(model_config, out_dtype.name, base_config)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if hf_config.get(key) is None and getattr(tokenizer, key, None) is not None:
                hf_config[key] = getattr(tokenizer, key)
        _write_json(os.path.join(path, "config.json"), hf_config)
        if generation_config is None:
            generation_config = {
                key: hf_config[key]
                for key in ("bos_token_id", "eos_token_id", "pad_token_id")
                if hf_config.get(key) is not None
            }
        _write_json(os.path.join(path, "generation_config.json"), generation_config)
        if isinstance(tokenizer, str):
            source = resolve_model_path(tokenizer)
            for file in _TOKENIZER_FILES:
                if os.path.isfile(os.path.join(source, file)):
                    shutil.copyfile(os.path.join(source, file), os.path.join(path, file))
        elif tokenizer is not None:
            tokenizer.save_pretrained(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_pretrained {path}")


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
