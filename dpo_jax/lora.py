"""LoRA and QLoRA: settings, merging adapters into the base, and PEFT-format adapter export.

The adapters are the model's own "lora" collection (dpo_jax.layers.Einsum creates A [*in, r]
and B [r, *out] beside each targeted projection), so they carry logical axis names and
shard by the same rules as the params; "lora_rank" maps to no mesh axis (replicated). The
policy is `model.Adapted(base, adapters)`; the reference is the base alone, the same
model with the adapters off, so no second copy of the weights exists. The base is frozen:
it is never in the optimizer, never donated, and may be stored quantized (dpo_jax.quant).

Why our own module rather than a library (qwix, which Tunix uses): our layers are a few
einsum modules under nn.scan, and the adapter is two more einsums in the same module; a
library that intercepts or rewrites modules would have to understand our scanned layout,
logical partitioning and quantized kernels, for ~60 lines of our own code.

PEFT layout (what `peft.PeftModel.from_pretrained` reads): adapter_config.json and
adapter_model.safetensors with base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.
lora_A.weight [r, in] and lora_B.weight [out, r], in HF's fused in/out orders (q_proj: out
index n*H + h, as hf_tensors fuses the weight), scaled by lora_alpha / r.
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import hf, model, quant
from dpo_jax.model import Adapted, ModelConfig

TARGETS = quant.PROJECTIONS  # the names users know from HF / PEFT
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
HF_MODULES = {name: "mlp" if name in MLP_PROJECTIONS else "self_attn" for name in TARGETS}
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int = 0  # 0 = full fine-tuning
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input, training steps only
    targets: tuple[str, ...] = TARGETS
    quantization: str = "none"  # the frozen base's storage: none | int8 | nf4 (QLoRA)

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def model_fields(self) -> dict:
        """The ModelConfig fields that make the modules create and apply the adapters."""
        if not self.enabled:
            return {}
        return dict(
            lora_rank=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            lora_targets=self.targets,
        )


def adapter_count(config: ModelConfig) -> int:
    """Trainable parameters of the adapters (no allocation)."""
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init_adapters(config, jax.random.key(0))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _delta(a: jax.Array, b: jax.Array, kernel_shape: tuple[int, ...], scale: float) -> jax.Array:
    """scale · A @ B as a kernel of `kernel_shape`; A [*lead, *in, r], B [*lead, r, *out]."""
    rank = a.shape[-1]
    lead = a.ndim + b.ndim - len(kernel_shape) - 2  # the stacked-layers axis, when scanned
    lead_shape = a.shape[:lead]
    a2 = a.reshape(*lead_shape, -1, rank).astype(jnp.float32)
    b2 = b.reshape(*lead_shape, rank, -1).astype(jnp.float32)
    return (scale * jnp.matmul(a2, b2)).reshape(kernel_shape)


def _walk_adapters(adapters):
    """(path to the projection as a tuple of keys, {"a", "b"}) of every adapted projection."""
    found = []

    def visit(tree, path):
        if isinstance(tree, dict) and set(tree) == {"a", "b"}:
            found.append((path, tree))
        elif isinstance(tree, dict):
            for key, sub in tree.items():
                visit(sub, (*path, key))

    visit(nn.meta.unbox(adapters), ())
    return found


def _is_kernel_leaf(x) -> bool:
    return isinstance(x, quant.Quantized)


def merged_params(config: ModelConfig, policy: Adapted, shardings, dtype=None):
    """Plain params equal to the adapted policy, placed in `shardings` (the float params'):
    each targeted kernel becomes dequantize(base) + (alpha / r) · A @ B, every other
    quantized kernel its dequantized value, the rest the base's own arrays; in `dtype`
    (default config.param_dtype). Leaf by leaf: one kernel's float32 temporaries at a time."""
    dtype = jnp.dtype(dtype or config.param_dtype)
    scale = config.lora_alpha / config.lora_rank
    adapters = {path: ab for path, ab in _walk_adapters(policy.adapters)}

    def merge(kernel, a, b):
        dense = quant.dequantize(kernel, jnp.float32) if _is_kernel_leaf(kernel) else kernel
        if a is not None:
            dense = dense.astype(jnp.float32) + _delta(a, b, dense.shape, scale)
        return dense.astype(dtype)

    def leaf(path, value, sharding):
        keys = tuple(entry.key for entry in path)
        ab = adapters.get(keys[:-1]) if keys[-1] == "kernel" else None
        if ab is None and not _is_kernel_leaf(value):
            return value if value.dtype == dtype else value.astype(dtype)
        a, b = (None, None) if ab is None else (ab["a"], ab["b"])
        return jax.jit(merge, out_shardings=sharding)(value, a, b)

    base = nn.meta.unbox(policy.base)
    return jax.tree_util.tree_map_with_path(leaf, base, shardings, is_leaf=_is_kernel_leaf)


def adapter_tensors(config: ModelConfig, adapters) -> dict[str, np.ndarray]:
    """{PEFT tensor name: float32 array} of the (host-gathered) adapters."""
    out = {}
    for path, ab in _walk_adapters(adapters):
        projection = path[-1]
        a, b = hf._to_host(ab["a"]).astype(np.float32), hf._to_host(ab["b"]).astype(np.float32)
        rank = a.shape[-1]
        if path[0] == "layers":  # scanned: a leading [L] axis
            layers = [(i, a[i], b[i]) for i in range(config.num_layers)]
        else:  # layers_{i}
            layers = [(int(path[0].split("_")[1]), a, b)]
        for i, a_i, b_i in layers:
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[projection]}.{projection}"
            out[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_i.reshape(-1, rank).T)
            out[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_i.reshape(rank, -1).T)
    return out


def peft_config(config: ModelConfig, base_model: str) -> dict:
    """adapter_config.json for PEFT's LoraConfig (plain LoRA: no rsLoRA, DoRA or biases)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": sorted(config.lora_targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_peft(out: str, config: ModelConfig, adapters, base_model: str) -> None:
    """A PEFT adapter folder. Every process calls it (the gathers are collective); process 0
    writes, into out/.incomplete first, so a failed write leaves no half adapter."""
    from safetensors.numpy import save_file

    tensors = adapter_tensors(config, adapters)
    if jax.process_index() != 0:
        return
    staging = os.path.join(out, ".incomplete")
    os.makedirs(staging, exist_ok=True)
    save_file(tensors, os.path.join(staging, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(staging, "adapter_config.json"), "w") as f:
        json.dump(peft_config(config, base_model), f, indent=2, sort_keys=True)
        f.write("\n")
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out, name))
    os.rmdir(staging)


def adapter_folder(hf_folder: str) -> str:
    """Where the PEFT adapter goes beside a merged export: DIR/hf -> DIR/hf-adapter."""
    return os.path.normpath(hf_folder) + "-adapter"
