"""Hugging Face interchange: HF weights → params (placed straight into their shardings), and
params → an HF folder.

    config, params = load_pretrained("meta-llama/Llama-3.2-1B", dtype="bfloat16")
    save_pretrained("out/", config, params, tokenizer="meta-llama/Llama-3.2-1B")

Weights are read from safetensors (one file, or shards listed in model.safetensors.index.json)
or from the HF Flax `flax_model.msgpack` (transformers 4.x Flax*ForCausalLM.save_pretrained);
PyTorch pickles are never unpickled. With `shardings`, every tensor is built straight into its
NamedSharding: each device's block is read with safetensors' `get_slice`, so a process only
reads (and holds) the slices its devices own.

The pieces live in dpo_jax.hf_config (config.json ↔ ModelConfig, hub ids, tokenizers) and
dpo_jax.hf_tensors (the HF tensor ↔ param table, weight sources); this module re-exports
their public names, so `hf.<name>` is the one place to import from.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import faults, progress
from dpo_jax.hf_config import (  # noqa: F401  (re-exported)
    MODEL_TYPES,
    SUPPORTED_ARCHITECTURES,
    HFError,
    hf_config_from_model_config,
    load_tokenizer,
    model_config_from_hf,
    read_hf_config,
    read_model_config,
    resolve_model_path,
    rope_scaling_from_hf,
)
from dpo_jax.hf_tensors import (
    ArraySource,
    TensorMap,
    get_path,
    open_weights,
    param_leaves,
    set_path,
    tensor_maps,
)
from dpo_jax.model import ModelConfig

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


# ------------------------------------------------------------------------ reading weights


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


def _params_from_source(source, config: ModelConfig, shardings, dtype, where: str):
    dtype = np.dtype(jnp.dtype(dtype or config.param_dtype))
    available, used, params = source.names(), set(), {}
    for m in tensor_maps(config):
        for leaf_path, targets in param_leaves(config, m):
            for name, _ in targets:
                if name not in available:
                    raise HFError(f"{where}: tensor {name} is missing from the weights")
                if source.shape(name) != m.hf_shape:
                    raise HFError(
                        f"{where}: {name} has shape {list(source.shape(name))}; config.json "
                        f"implies {list(m.hf_shape)}"
                    )
                used.add(name)
            sharding = None if shardings is None else get_path(shardings, leaf_path)
            set_path(params, leaf_path, _load_leaf(source, m, targets, dtype, sharding))
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
    return _params_from_source(ArraySource(tensors), config, shardings, dtype, "tensors")


def hf_tensors_from_params(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """{HF name: numpy array in PyTorch layout} of (host-gathered) params; the inverse of
    params_from_hf_tensors."""
    params, out = nn.meta.unbox(params), {}
    for m in tensor_maps(config):
        for leaf_path, targets in param_leaves(config, m):
            host = _to_host(get_path(params, leaf_path))
            for name, layer in targets:
                out[name] = m.to_hf(host if layer is None else host[layer])
    return out


def load_params(path: str, config: ModelConfig, shardings=None, dtype=None):
    """The weights of HF folder (or hub id) `path` as our plain params tree of `config`, in
    `dtype` (default config.param_dtype). With `shardings` (a matching pytree of
    NamedShardings) each array is assembled on its devices from the slices they hold."""
    folder = resolve_model_path(path)
    return _params_from_source(open_weights(folder), config, shardings, dtype, folder)


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
    `base_config` (the source config.json) keeps keys such as token ids.

    Everything is written into path/.incomplete/ and moved into `path` once complete: a
    failed export (a full disk) leaves the folder as it was, never half of a model."""
    writer = jax.process_index() == 0
    staging = os.path.join(path, ".incomplete")
    if writer:
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
    try:
        _write_files(
            staging,
            model_config,
            params,
            tokenizer,
            dtype=dtype,
            max_shard_size=max_shard_size,
            base_config=base_config,
            generation_config=generation_config,
        )
    except BaseException:
        if writer:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if writer:
        for old in os.listdir(path):  # an earlier export's shards would shadow or confuse
            if re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors(\.index\.json)?", old):
                os.remove(os.path.join(path, old))
        for name in os.listdir(staging):  # renames: no space needed, nothing half-done
            os.replace(os.path.join(staging, name), os.path.join(path, name))
        os.rmdir(staging)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"save_pretrained {path}")


def _write_files(
    path: str,
    model_config: ModelConfig,
    params,
    tokenizer,
    *,
    dtype,
    max_shard_size,
    base_config,
    generation_config,
) -> None:
    """save_pretrained's files, into `path` (its staging folder; process 0 writes)."""
    params = nn.meta.unbox(params)
    leaves = [
        (m, p, t) for m in tensor_maps(model_config) for p, t in param_leaves(model_config, m)
    ]
    first = np.dtype(get_path(params, leaves[0][1]).dtype)
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

    from safetensors.numpy import save_file

    buffers = [{} for _ in plan]
    for m, leaf_path, targets in progress.bar(
        leaves, what=f"export {os.path.dirname(path)}", unit="tensor", total=len(leaves)
    ):
        host = _to_host(get_path(params, leaf_path))  # every process: the gather is collective
        for name, layer in targets:
            k = shard_of[name]
            buffers[k][name] = m.to_hf(host if layer is None else host[layer]).astype(out_dtype)
            if len(buffers[k]) == len(plan[k]):
                if writer:
                    save_file(buffers[k], os.path.join(path, files[k]), metadata={"format": "pt"})
                    faults.disk_full("export", os.path.join(path, files[k]))
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


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
