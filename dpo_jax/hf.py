"""Hugging Face interchange: `config.json` ↔ ModelConfig (weights: see load/save below)."""

from __future__ import annotations

import json
import os

from dpo_jax.model import ModelConfig, RopeScaling

# architecture name in config.json → whether q/k/v carry biases, whether q/k are RMS-normed
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": dict(attention_bias=None, qk_norm=False),
    "MistralForCausalLM": dict(attention_bias=False, qk_norm=False),
    "Qwen2ForCausalLM": dict(attention_bias=True, qk_norm=False),
    "Qwen3ForCausalLM": dict(attention_bias=None, qk_norm=True),
}
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


class HFError(ValueError):
    """A Hugging Face folder or config this project cannot use, and why."""


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
    family = SUPPORTED_ARCHITECTURES[arch]
    if hf.get("sliding_window") and hf.get("use_sliding_window", arch == "MistralForCausalLM"):
        raise HFError(f"{where}: sliding-window attention is not supported yet")
    attention_bias = family["attention_bias"]
    if attention_bias is None:
        # Llama/Qwen3's attention_bias=True also biases o_proj, which this model lacks.
        if hf.get("attention_bias", False):
            raise HFError(f"{where}: attention_bias=True ({arch}) is not supported")
        attention_bias = False
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:  # transformers 5 keeps it under rope_parameters
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        num_kv_heads=int(hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope_theta),
        rope_scaling=rope_scaling_from_hf(hf),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=attention_bias,
        qk_norm=family["qk_norm"],
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        **runtime,
    )


def read_model_config(path: str, **runtime) -> ModelConfig:
    """ModelConfig from `path/config.json` (a local HF model folder)."""
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise HFError(
            f"config model.name={path!r}: no config.json there; point model.name at a local "
            "Hugging Face model folder"
        )
    with open(config_file) as f:
        return model_config_from_hf(json.load(f), where=config_file, **runtime)
