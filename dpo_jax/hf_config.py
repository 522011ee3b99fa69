"""HF `config.json` ↔ ModelConfig, and HF names (local folders or hub ids) → local folders
and tokenizers.

    config = read_model_config("Qwen/Qwen2.5-0.5B-Instruct", dtype="bfloat16")
    tokenizer = load_tokenizer("Qwen/Qwen2.5-0.5B-Instruct")

Offline (HF_HUB_OFFLINE=1), only what is already in the HF cache resolves; everything that
cannot be used raises HFError with one line saying why and what fixes it. dpo_jax.hf
re-exports every public name here.
"""

from __future__ import annotations

import json
import math
import os

from dpo_jax.model_config import ROPE_TYPES, ModelConfig, RopeScaling

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
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
# One of these in a folder means it holds a tokenizer (tokenizer_config.json may name a class
# whose vocab file is vocab.json / tokenizer.model).
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# The JSON files transformers may read for a tokenizer; a torn one is named in the error.
_TOKENIZER_JSON = (
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "chat_template.json",
)
REFETCH = "re-download or re-export the model"


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
    if rope_type not in ROPE_TYPES:
        raise HFError(
            f"config.json rope_scaling type {rope_type!r} is not supported (supported: "
            f"{', '.join(ROPE_TYPES)})"
        )
    try:
        if rope_type == "linear":
            return RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
        if rope_type == "yarn":
            return _yarn_from_hf(hf, scaling)
        return RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as missing:
        raise HFError(
            f"config.json rope_scaling {scaling}: {rope_type} needs {missing} (a number); {REFETCH}"
        ) from None
    except (TypeError, ValueError):
        raise HFError(
            f"config.json rope_scaling {scaling}: {rope_type}'s values must be numbers; {REFETCH}"
        ) from None


def _yarn_from_hf(hf: dict, scaling: dict) -> RopeScaling:
    """transformers' reading of a yarn rope_scaling: the original context from the dict, the
    config's own original_max_position_embeddings or max_position_embeddings; a missing
    factor is their ratio (DeepSeek-V3's form); the attention factor 0.1 ln(factor) + 1, or
    the ratio of the two mscale terms when both are given."""
    original = int(
        scaling.get("original_max_position_embeddings")
        or hf.get("original_max_position_embeddings")
        or hf["max_position_embeddings"]
    )
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else hf["max_position_embeddings"] / original

    def temperature(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention = temperature(factor, mscale) / temperature(factor, mscale_all_dim)
        else:
            attention = temperature(factor)
    return RopeScaling(
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        attention_factor=float(attention),
        truncate=bool(scaling.get("truncate", True)),
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
    missing = [key for key in _REQUIRED_KEYS if not isinstance(hf.get(key), int)]
    if missing:
        raise HFError(
            f"{where}: {', '.join(missing)} missing or not an integer; the file is incomplete "
            f"or hand-edited: {REFETCH}"
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
        rope_scaling = config.rope_scaling.hf_fields()
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


# ------------------------------------------------------------ hub ids, folders and tokenizers


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
            f"models already in the HF cache resolve: run {_download_command(name)} where "
            "there is network, or point model.name at a local folder"
        ) from error


def _download_command(name: str) -> str:
    # huggingface_hub >= 0.34 installs `hf`; older ones only `huggingface-cli`.
    return f"`hf download {name}` (older huggingface_hub: `huggingface-cli download`)"


def load_tokenizer(name_or_path: str, *, setting: str = "data.tokenizer / model.name"):
    """transformers.AutoTokenizer of a local folder or hub id; HFError (one line: which name,
    why, what fixes it) instead of transformers' OSError when it is missing or unreachable.
    `setting` names the option the user would change (the config key or CLI flag)."""
    from transformers import AutoTokenizer  # heavy import, only where needed

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    # `tokenizers` raises a bare Exception on a tokenizer.json it cannot parse; in a local
    # folder every failure is the folder's, so each one becomes an HFError naming it.
    except Exception as error:
        if os.path.isdir(name_or_path):
            raise _tokenizer_folder_error(name_or_path, setting, error) from error
        if not isinstance(error, (OSError, ValueError)):
            raise
        cause = _one_line(error)
        if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            raise HFError(
                f"tokenizer {name_or_path!r}: no such folder (and not a hub id like "
                f"'org/model'); point {setting} at a local folder"
            ) from error
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            cause = "offline: HF_HUB_OFFLINE=1, and it is not in the HF cache"
        raise HFError(
            f"tokenizer {name_or_path!r} is neither a local folder nor reachable on the Hugging "
            f"Face Hub ({cause}): run {_download_command(name_or_path)} where there is "
            f"network, or point {setting} at a local folder"
        ) from error


def _one_line(error: Exception) -> str:
    cause = " ".join(str(error).split()) or type(error).__name__
    return cause if len(cause) <= 240 else cause[:240] + " ..."


def _tokenizer_folder_error(folder: str, setting: str, error: Exception) -> HFError:
    """Why a local folder's tokenizer does not load: no tokenizer files, a torn JSON file
    (named), or transformers' own reason."""
    files = set(os.listdir(folder))
    head = f"tokenizer {folder!r}: transformers cannot load a tokenizer from this folder"
    present = [f for f in files if f in _TOKENIZER_MARKERS or f.endswith(".tiktoken")]
    if not present:
        return HFError(
            f"{head}: it holds no tokenizer files ({', '.join(_TOKENIZER_MARKERS)}); copy them "
            f"from the base model's folder, or point {setting} at a folder holding them"
        )
    fix = (
        "re-download the tokenizer (or re-save it with save_pretrained), or point "
        f"{setting} at another folder"
    )
    for name in _TOKENIZER_JSON:
        if name in files:
            try:
                read_json(os.path.join(folder, name), fix=fix)
            except HFError as torn:
                return torn
    cause = f"{type(error).__name__}: {_one_line(error)}"
    return HFError(f"{head} ({cause}); its tokenizer files {sorted(present)} may be torn: {fix}")


def read_json(path: str, *, fix: str = REFETCH) -> dict:
    """The JSON object in file `path`; HFError naming the file when it is torn or not an
    object (an interrupted download or copy), `fix` saying what repairs it."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as error:
        raise HFError(
            f"{path}: not valid JSON ({error.msg}, line {error.lineno} column {error.colno}); "
            f"the file is truncated or corrupt: {fix}"
        ) from None
    except (UnicodeDecodeError, OSError) as error:
        raise HFError(f"{path}: unreadable ({error}); {fix}") from None
    if not isinstance(value, dict):
        raise HFError(f"{path}: holds a {type(value).__name__}, not a JSON object; {fix}")
    return value


def read_hf_config(path: str) -> dict:
    """The raw config.json of a local HF folder or hub id."""
    config_file = os.path.join(resolve_model_path(path), "config.json")
    if not os.path.isfile(config_file):
        raise HFError(
            f"config model.name={path!r}: no config.json there ({config_file}); point "
            "model.name at a local Hugging Face model folder"
        )
    return read_json(config_file)


def read_model_config(path: str, **runtime) -> ModelConfig:
    """ModelConfig from `path/config.json` (a local HF model folder or a hub id)."""
    where = os.path.join(path, "config.json")
    return model_config_from_hf(read_hf_config(path), where=where, **runtime)
