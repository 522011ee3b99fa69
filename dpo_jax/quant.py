"""Quantized storage of a frozen base's projection kernels (QLoRA): int8 or 4-bit NF4.

A kernel's values are split into blocks of BLOCK consecutive elements along its LAST axis
(head_dim, model width or MLP width: multiples of 64 in real models; a tiny model's
shorter axis takes gcd(64, n)), and each block stores its absmax scale in float32 and one
code per element:
- int8: round(x / s) with s = absmax / 127, |x - dequantized| <= s / 2;
- nf4: the index of the nearest of NormalFloat4's 16 levels (Dettmers et al. 2023, the
  quantiles of a normal distribution, as bitsandbytes tabulates them) to x / absmax, two
  codes per byte (element 2i in the low nibble, 2i + 1 in the high one).

Everything about the shape is in the leaves: the model scans over stacked layers, and
nn.scan slices every leaf of a `Quantized` along axis 0, so no static field may hold a
shape. dequantize runs inside every layer's matmul (dpo_jax.layers.Einsum), one layer at a
time: a few elementwise ops and reshapes.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

QUANTIZATIONS = ("none", "int8", "nf4")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = 64

NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
# The largest distance of a value in [-1, 1] to its nearest level, in units of absmax.
NF4_MAX_ERROR = float(np.max(np.diff(NF4_TABLE)) / 2)


def block_size(n: int) -> int:
    """Elements per scale along a last axis of length n."""
    return BLOCK if n % BLOCK == 0 else math.gcd(BLOCK, n)


@flax.struct.dataclass
class Quantized:
    """A quantized kernel: codes (int8, or uint8 holding two nf4 codes) and float32 block
    scales [..., n / block]."""

    codes: jax.Array
    scales: jax.Array
    kind: str = flax.struct.field(pytree_node=False, default="int8")

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized kernel's shape."""
        lead, last = tuple(self.codes.shape[:-1]), self.codes.shape[-1]
        return (*lead, 2 * last if self.kind == "nf4" else last)

    @property
    def nbytes(self) -> int:
        size = lambda x: math.prod(x.shape) * np.dtype(x.dtype).itemsize  # noqa: E731
        return size(self.codes) + size(self.scales)


def _blocks(x: jax.Array) -> jax.Array:
    """[..., n] -> [..., n / block, block]."""
    n = x.shape[-1]
    return x.reshape(*x.shape[:-1], n // block_size(n), block_size(n))


def quantize(x: jax.Array, kind: str) -> Quantized:
    """`x` (any leading axes) quantized as `kind` ("int8" or "nf4"); computed in float32."""
    if kind not in ("int8", "nf4"):
        raise ValueError(f"quantization {kind!r}: use int8 or nf4")
    if kind == "nf4" and x.shape[-1] % 2:
        raise ValueError(f"nf4 packs two codes per byte along the last axis; shape {x.shape}")
    blocks = _blocks(x.astype(jnp.float32))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    if kind == "int8":
        scales = jnp.where(absmax > 0, absmax / 127.0, 1.0)  # a zero block stays exactly 0
        codes = jnp.clip(jnp.round(blocks / scales[..., None]), -127, 127).astype(jnp.int8)
        return Quantized(codes.reshape(x.shape), scales, kind)
    scales = jnp.where(absmax > 0, absmax, 1.0)
    normalized = blocks / scales[..., None]
    table = jnp.asarray(NF4_TABLE)
    distance = jnp.abs(normalized[..., None] - table.reshape((1,) * normalized.ndim + (16,)))
    codes = jnp.argmin(distance, axis=-1).astype(jnp.uint8).reshape(x.shape)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return Quantized(packed, scales, kind)


def dequantize(q: Quantized, dtype) -> jax.Array:
    """The kernel `q` stands for, in `dtype`."""
    if q.kind == "int8":
        values = q.codes.astype(jnp.float32)
    else:
        low, high = q.codes & jnp.uint8(0x0F), q.codes >> 4
        codes = jnp.stack([low, high], axis=-1).reshape(q.shape)
        values = jnp.asarray(NF4_TABLE)[codes.astype(jnp.int32)]
    blocks = _blocks(values) * q.scales[..., None]
    return blocks.reshape(q.shape).astype(dtype)


def bytes_per_param(kind: str) -> float:
    """Stored bytes per kernel element (codes and float32 scales of 64-element blocks)."""
    code = {"int8": 1.0, "nf4": 0.5}[kind]
    return code + 4.0 / BLOCK


# ------------------------------------------------------------------------ params trees


def is_projection_kernel(path) -> bool:
    """Whether a params key path is a projection's kernel (embeddings, the head, norms and
    biases stay in float)."""
    keys = [entry.key for entry in path if isinstance(entry, jax.tree_util.DictKey)]
    return len(keys) >= 2 and keys[-1] == "kernel" and keys[-2] in PROJECTIONS


def quantize_params(params, kind: str):
    """`params` with every projection kernel quantized ("none": unchanged)."""
    if kind == "none":
        return params
    return jax.tree_util.tree_map_with_path(
        lambda path, x: quantize(x, kind) if is_projection_kernel(path) else x, params
    )


def _fitted(sharding: NamedSharding, shape: tuple[int, ...]) -> NamedSharding:
    """`sharding`'s spec with every dimension the mesh axes do not divide left unsharded."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        if shape[dim] % math.prod(sharding.mesh.shape[a] for a in names):
            spec[dim] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def quantized_shardings(shardings, abstract_params, kind: str):
    """The shardings of quantize_params(params, kind): each projection kernel's becomes a
    Quantized of two NamedShardings with the kernel's spec (fitted to the codes' and the
    scales' shapes, which divide the last axis by 2 and by the block)."""
    shapes = jax.eval_shape(lambda p: quantize_params(p, kind), abstract_params)

    def one(path, sharding, shape):
        if not is_projection_kernel(path):
            return sharding
        return Quantized(
            _fitted(sharding, shape.codes.shape), _fitted(sharding, shape.scales.shape), kind
        )

    flat_shapes = {
        jax.tree_util.keystr(path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            shapes, is_leaf=lambda x: isinstance(x, Quantized)
        )
    }
    return jax.tree_util.tree_map_with_path(
        lambda path, s: one(path, s, flat_shapes[jax.tree_util.keystr(path)]), shardings
    )


def abstract_quantized(abstract_params, kind: str, shardings=None):
    """ShapeDtypeStructs of quantize_params(params, kind), carrying `shardings` (from
    quantized_shardings) when given."""
    shapes = jax.eval_shape(lambda p: quantize_params(p, kind), abstract_params)
    if shardings is None:
        return shapes
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
