"""How HF tensors become our params: the tensor table, and the weight files it reads.

One table, `tensor_maps`, says how each HF tensor becomes one of our params: split the fused
head dims of the HF tensor (q_proj.weight [N*H, D] -> [N, H, D]), then transpose into our
order ([D, N, H]); per-layer tensors stack on a leading [L] axis. Loading and exporting
(dpo_jax.hf) both walk that table, so they are exact inverses (fp32 round trips bit-exactly).

A weight source (`open_weights`: safetensors, sharded or not, or HF Flax msgpack; or
`ArraySource`: in-memory arrays) answers names(), shape(name) and read(name, index) in HF
PyTorch names and layouts, so the loader never cares which file format it reads.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from dpo_jax.hf_config import REFETCH, HFError, read_json
from dpo_jax.model_config import ModelConfig

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


def param_leaves(config: ModelConfig, m: TensorMap):
    """(our path, [(HF name, layer index into our leaf or None)]) for the leaves of map m."""
    if not m.per_layer:
        return [(m.path, [(m.hf_name, None)])]
    names = [m.hf_name.format(i=i) for i in range(config.num_layers)]
    if config.scan_layers:
        return [(("layers", *m.path), [(name, i) for i, name in enumerate(names)])]
    return [((f"layers_{i}", *m.path), [(name, None)]) for i, name in enumerate(names)]


def get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ------------------------------------------------------------------------ reading weights


class Safetensors:
    """Tensors of model.safetensors or of the shards that model.safetensors.index.json lists."""

    def __init__(self, folder: str, files: dict[str, str]):
        self.files = files  # HF name → file
        self.handles = {}
        for file in sorted(set(files.values())):
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise HFError(
                    f"{path}: missing, but model.safetensors.index.json lists it; the download "
                    f"or copy is incomplete: {REFETCH}"
                )
            self.handles[file] = _open_safetensors(path)
        # An index that promises a tensor its shard lacks would fail later, mid-load.
        held = {file: set(handle.keys()) for file, handle in self.handles.items()}
        for name, file in files.items():
            if name not in held[file]:
                raise HFError(
                    f"{os.path.join(folder, file)}: has no tensor {name}, but "
                    f"model.safetensors.index.json says it does; the index and shards are from "
                    f"different downloads or exports: {REFETCH}"
                )

    def names(self) -> set[str]:
        return set(self.files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.handles[self.files[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return self.handles[self.files[name]].get_slice(name)[index]


def _open_safetensors(path: str):
    """A safe_open handle; HFError naming the file when it is torn (safetensors checks at
    open that the header parses and the data covers the whole file)."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError) as error:
        raise HFError(
            f"{path}: not a readable safetensors file ({os.path.getsize(path)} bytes; "
            f"{error}); it is truncated or corrupt, e.g. by an interrupted download or copy: "
            f"{REFETCH}"
        ) from None


def _read_msgpack(path: str) -> dict:
    """The weights tree of one flax_model*.msgpack; HFError naming the file when it is torn."""
    from flax import serialization

    if not os.path.isfile(path):
        raise HFError(f"{path}: missing, but flax_model.msgpack.index.json lists it; {REFETCH}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        tree = serialization.msgpack_restore(data)
        problem = None if isinstance(tree, dict) else f"holds a {type(tree).__name__}"
    except ValueError as error:  # every msgpack error is one; a torn file: "incomplete input"
        problem = str(error) or type(error).__name__
    if problem:
        raise HFError(
            f"{path}: not a Flax msgpack of weights ({len(data)} bytes; {problem}); it is "
            f"truncated or corrupt, e.g. by an interrupted download or copy: {REFETCH}"
        )
    return tree


class FlaxMsgpack:
    """flax_model.msgpack (HF Flax layout: model/layers/<i>/self_attn/q_proj/kernel [in, out],
    norms' `weight`, embed_tokens/embedding) seen through HF PyTorch names and layouts."""

    def __init__(self, folder: str, files: list[str]):
        from flax import traverse_util

        flat = {}
        for file in files:
            tree = _read_msgpack(os.path.join(folder, file))
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


def _weight_map(path: str) -> dict[str, str]:
    """{HF name: shard file} of a *.index.json; HFError naming the file when it is torn."""
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise HFError(f"{path}: no weight_map of tensor name → shard file; {REFETCH}")
    return weight_map


def open_weights(folder: str):
    files = set(os.listdir(folder))
    if "model.safetensors.index.json" in files:
        weight_map = _weight_map(os.path.join(folder, "model.safetensors.index.json"))
        return Safetensors(folder, weight_map)
    if "model.safetensors" in files:
        names = _open_safetensors(os.path.join(folder, "model.safetensors")).keys()
        return Safetensors(folder, dict.fromkeys(names, "model.safetensors"))
    if "flax_model.msgpack.index.json" in files:
        weight_map = _weight_map(os.path.join(folder, "flax_model.msgpack.index.json"))
        return FlaxMsgpack(folder, sorted(set(weight_map.values())))
    if "flax_model.msgpack" in files:
        return FlaxMsgpack(folder, ["flax_model.msgpack"])
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


class ArraySource:
    """An in-memory {HF name: array} (e.g. a transformers model's state_dict as numpy)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def names(self) -> set[str]:
        return set(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        return np.asarray(self.tensors[name][index])
