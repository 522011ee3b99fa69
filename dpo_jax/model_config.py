"""ModelConfig: the architecture and runtime options of the decoder, and what follows from
them alone (parameter count, model FLOPs, RoPE frequencies).

Kept apart from the Flax modules (dpo_jax.layers, dpo_jax.model), which import it, as does
dpo_jax.hf_config. dpo_jax.model re-exports every public name here; import them from there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import jax
import numpy as np

ROPE_TYPES = ("llama3", "linear", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """transformers' rope_scaling, of three kinds (rope_type):
    - llama3 (Llama 3.1+): long wavelengths divided by `factor`, short ones kept, a smooth
      blend between the low_freq_factor and high_freq_factor bands;
    - linear: every frequency divided by `factor` (positions interpolated);
    - yarn (NTK-by-parts, arXiv 2309.00071; Qwen's long-context setting): dimensions turning
      more than beta_fast times over the original context keep their frequency, fewer than
      beta_slow times are divided by `factor`, a linear ramp between; cos and sin are then
      scaled by `attention_factor` (hf_config derives it from factor as transformers does)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int = 8192  # llama3, yarn
    rope_type: str = "llama3"
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float = 1.0  # yarn
    truncate: bool = True  # yarn: the ramp's ends rounded outwards to whole dimensions

    def hf_fields(self) -> dict:
        """config.json's rope_scaling, which transformers reads back as this."""
        keys = _HF_ROPE_KEYS[self.rope_type]
        return {"rope_type": self.rope_type} | {k: getattr(self, k) for k in keys}


# The RopeScaling fields each rope_type writes to config.json (the others are unused by it).
_HF_ROPE_KEYS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "linear": ("factor",),
    "yarn": (
        "factor",
        "original_max_position_embeddings",
        "beta_fast",
        "beta_slow",
        "attention_factor",
        "truncate",
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus runtime options; hashable so it can be a static jit argument."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # None -> hidden_size // num_heads
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    max_position_embeddings: int = 2048
    # A query sees itself and the sliding_window - 1 keys before it (transformers' rule) in
    # the layers that layer_types marks "sliding_attention"; layer_types=None with a window
    # means every layer (Mistral).
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # "sliding_attention" | "full_attention" per layer
    mlp_activation: Literal["silu", "gelu_tanh"] = "silu"  # gate activation (gelu_tanh: Gemma)
    rms_norm_unit_offset: bool = False  # norms apply (1 + scale); scales init to 0 (Gemma)
    scale_embeddings: bool = False  # embeddings * sqrt(hidden_size) in the compute dtype (Gemma)
    post_norms: bool = False  # RMSNorm on attention / mlp outputs before the residual (Gemma 2)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (None: H)
    attn_logit_softcap: float | None = None  # cap * tanh(scores / cap) before the mask (Gemma 2)
    # Applied to the output logits by `forward`; the vocab-chunked log-prob of the trainer must
    # apply it too (losses.chunked_token_logps(..., logit_softcap=final_logit_softcap)).
    final_logit_softcap: float | None = None
    architecture: str = "LlamaForCausalLM"  # the HF class this config came from / exports as
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: Literal["xla", "cudnn"] | None = None
    # Packed rows on cuDNN (Hopper or later, cuDNN >= 9.6): the most sequences any row holds,
    # M; rows then reach the flash kernel as M segment offsets and lengths instead of a
    # [B, 1, T, S] mask (a dense bias there). The caller promises the bound: segment ids above
    # M would be dropped (outputs 0). cuDNN keeps [B*M, N, T] fp32 softmax statistics per layer
    # for the backward pass, M times the padded path's. None: the mask. Ignored on XLA, and
    # by padded rows, prefix sharing, sliding windows and score caps.
    max_segments_per_row: int | None = None
    remat_policy: Literal["none", "dots_saveable", "full"] = "none"
    scan_layers: bool = True
    # LoRA (dpo_jax.lora): the projections named in lora_targets get a rank-r update
    # (alpha / r) · B(A(dropout(x))), whose A and B live in the "lora" collection; 0 = none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()

    def lora_for(self, projection: str) -> tuple[int, float, float] | None:
        """(rank, alpha / rank, dropout) of `projection` (e.g. "q_proj"), or None: no adapter."""
        if self.lora_rank <= 0 or projection not in self.lora_targets:
            return None
        return self.lora_rank, self.lora_alpha / self.lora_rank, self.lora_dropout

    def __post_init__(self):
        if isinstance(self.layer_types, list):  # keep the config hashable
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} not a multiple of {self.num_kv_heads=}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} not in {list(REMAT_POLICIES)}")
        if self.mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation={self.mlp_activation!r} not in {list(ACTIVATIONS)}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(f"{self.layer_types=} has not {self.num_layers} entries")
            unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
            if unknown:
                raise ValueError(f"layer_types {sorted(unknown)}: sliding_attention|full_attention")
        if self.max_segments_per_row is not None and self.max_segments_per_row < 2:
            # JAX reads [B, 1] offsets as no packing at all; one sequence per row is
            # padded_rows (dpo_jax.model.hidden_states).
            raise ValueError(f"max_segments_per_row={self.max_segments_per_row} must be >= 2")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 (or None)")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Per-layer attention window (0 = the whole causal prefix)."""
        if self.sliding_window is None:
            return (0,) * self.num_layers
        types = self.layer_types or ("sliding_attention",) * self.num_layers
        return tuple(self.sliding_window if t == "sliding_attention" else 0 for t in types)


# The functions behind ModelConfig's string choices (validated in __post_init__).
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}
REMAT_POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def num_params(config: ModelConfig) -> int:
    """Exact number of parameters."""
    d, h = config.hidden_size, config.resolved_head_dim
    n, k = config.num_heads, config.num_kv_heads
    layer = sum(i * o for i, o in projection_shapes(config).values()) + 2 * d
    layer += (n + 2 * k) * h if config.attention_bias else 0
    layer += 2 * h if config.qk_norm else 0
    layer += 2 * d if config.post_norms else 0
    head = 0 if config.tie_word_embeddings else d * config.vocab_size
    return config.vocab_size * d + config.num_layers * layer + d + head


def projection_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of each of a layer's projections, by the names LoRA targets."""
    d, f, h = config.hidden_size, config.intermediate_size, config.resolved_head_dim
    n, k = config.num_heads, config.num_kv_heads
    return {
        "q_proj": (d, n * h),
        "k_proj": (d, k * h),
        "v_proj": (d, k * h),
        "o_proj": (n * h, d),
        "gate_proj": (d, f),
        "up_proj": (d, f),
        "down_proj": (f, d),
    }


def flops_per_token(config: ModelConfig, seq_len: int, *, backward: bool = True) -> float:
    """Model FLOPs per token: 2 per matmul weight plus causal attention; with backward, x3
    (forward, input gradients, weight gradients). With LoRA (config.lora_rank > 0) the base
    is frozen: its matmuls have no weight gradients (x2), and the adapters' 2·r·(in + out)
    per projection count x3. backward=False is the forward of the base alone (the LoRA
    reference: adapters off)."""
    d = config.hidden_size
    shapes = projection_shapes(config)
    matmul = config.num_layers * sum(i * o for i, o in shapes.values())
    matmul += d * config.vocab_size  # unembedding (the embedding lookup is free)
    # QK^T and PV: 4*N*H FLOPs per visible key; causal rows see seq_len/2 keys on average, and
    # a window W < seq_len leaves W - W^2 / (2 seq_len) of them.
    n, h = config.num_heads, config.resolved_head_dim
    attention = 0.0
    for window in config.layer_windows:
        visible = seq_len / 2 if not 0 < window < seq_len else window - window**2 / (2 * seq_len)
        attention += 4 * n * h * visible
    if not backward:
        return 2 * matmul + attention
    if config.lora_rank <= 0:
        return 3.0 * (2 * matmul + attention)
    adapters = config.num_layers * sum(
        config.lora_rank * (i + o) for name, (i, o) in shapes.items() if name in config.lora_targets
    )
    return 2.0 * 2 * matmul + 3.0 * attention + 3.0 * 2 * adapters


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """[H/2] float32 inverse frequencies, as transformers computes them (with its scaling)."""
    dim = config.resolved_head_dim
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = (np.float32(config.rope_theta) ** exponent).astype(np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return (inv_freq / np.float32(s.factor)).astype(np.float32)
    if s.rope_type == "yarn":
        return _yarn_inv_freq(inv_freq, pos_freqs, dim, config.rope_theta, s)
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_attention_factor(config: ModelConfig) -> float:
    """What cos and sin are multiplied by: YaRN's attention temperature, else 1."""
    s = config.rope_scaling
    return s.attention_factor if s is not None and s.rope_type == "yarn" else 1.0


def _yarn_inv_freq(
    inv_freq: np.ndarray, pos_freqs: np.ndarray, dim: int, theta: float, s: RopeScaling
) -> np.ndarray:
    """YaRN's blend of the kept frequencies (`inv_freq` = 1 / pos_freqs) and the divided
    ones (1 / (factor · pos_freqs), pos_freqs = theta ** (2i / dim)), in transformers'
    float32 order of operations."""

    def dimension_turning(rotations: float) -> float:
        """The (fractional) dimension whose wavelength fits `rotations` times in the
        original context."""
        turns = s.original_max_position_embeddings / (rotations * 2 * math.pi)
        return dim * math.log(turns) / (2 * math.log(theta))

    low, high = dimension_turning(s.beta_fast), dimension_turning(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    kept = (1 - ramp).astype(np.float32)  # 1: the frequency is kept as it is
    interpolated = (np.float32(1.0) / (np.float32(s.factor) * pos_freqs)).astype(np.float32)
    return (interpolated * (1 - kept) + inv_freq * kept).astype(np.float32)
