"""dpo_jax.model against transformers' PyTorch models, plus packing/padding/remat invariances."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from dpo_jax import hf
from dpo_jax import model as M

P = jax.sharding.PartitionSpec

V, D, F, L, N, K = 97, 64, 128, 2, 4, 2
TINY = M.ModelConfig(
    vocab_size=V, hidden_size=D, intermediate_size=F, num_layers=L, num_heads=N, num_kv_heads=K
)
LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
# head_dim 16, theta 1e4: wavelengths 6.3 ... 2e4, so an original context of 64 puts frequencies
# in all three llama3 bands (kept, smoothed, divided by factor).
LLAMA3_OLD_LEN = 64

forward = jax.jit(M.forward, static_argnums=0)


def _hf_model(variant: str):
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
    )
    if variant == "llama":
        cfg = transformers.LlamaConfig(**common)
    elif variant == "llama3_rope":
        rope = dict(rope_type="llama3", rope_theta=10000.0, **LLAMA3_ROPE)
        rope["original_max_position_embeddings"] = LLAMA3_OLD_LEN
        cfg = transformers.LlamaConfig(**common, rope_parameters=rope)
    elif variant == "tied":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
    elif variant == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_parameters=dict(rope_theta=1e6))
    elif variant == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=24)  # != D // N on purpose
    else:
        raise ValueError(variant)
    cfg._attn_implementation = "eager"
    cls = dict(qwen2=transformers.Qwen2ForCausalLM, qwen3=transformers.Qwen3ForCausalLM)
    model = cls.get(variant, transformers.LlamaForCausalLM)(cfg).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0; make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return model


def _config_for(variant: str) -> M.ModelConfig:
    if variant == "llama3_rope":
        scaling = M.RopeScaling(**LLAMA3_ROPE, original_max_position_embeddings=LLAMA3_OLD_LEN)
        return dataclasses.replace(TINY, rope_scaling=scaling)
    return dataclasses.replace(
        TINY,
        tie_word_embeddings=variant == "tied",
        attention_bias=variant == "qwen2",
        rope_theta=1e6 if variant == "qwen2" else 1e4,
        qk_norm=variant == "qwen3",
        head_dim=24 if variant == "qwen3" else None,
    )


def _params_from_hf(model, config: M.ModelConfig):
    """The HF -> ours mapping of dpo_jax.hf, applied to the in-memory state dict."""
    state_dict = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    return hf.params_from_hf_tensors(config, state_dict)


@pytest.mark.parametrize("variant", ["llama", "llama3_rope", "tied", "qwen2", "qwen3"])
def test_matches_transformers(variant):
    model, config = _hf_model(variant), _config_for(variant)
    params = _params_from_hf(model, config)
    # Same tree and shapes as our own init, and the exact parameter count.
    ours = jax.eval_shape(lambda: nn.meta.unbox(M.init_params(config, jax.random.key(0))))
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, ours)
    assert M.num_params(config) == sum(p.numel() for p in model.parameters())
    if variant == "llama3_rope":
        hf_inv_freq = model.model.rotary_emb.inv_freq.numpy()
        np.testing.assert_allclose(M.rope_inv_freq(config), hf_inv_freq, rtol=1e-6)
        assert not np.allclose(M.rope_inv_freq(config), M.rope_inv_freq(TINY))

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, size=(2, 12))
    lengths = np.array([12, 7])  # right-padded second row
    mask = np.arange(12)[None, :] < lengths[:, None]
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(int)))
    expected = out.logits.numpy()
    got = np.asarray(forward(config, params, tokens, None, jnp.asarray(mask, jnp.int32)))
    assert got.dtype == np.float32 and got.shape == (2, 12, V)
    assert np.abs(expected).max() > 0.5  # a non-trivial comparison
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=0)


def _random_params(config, seed=0):
    """Params of the init's tree, filled with NumPy noise large enough for sharp attention.

    (Faster than compiling the init's threefry; the init itself is tested in test_init_params.)
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(M.init_params(config, jax.random.key(0))))

    def fill(path, x):
        is_scale = path[-1].key == "scale"  # norm scales around 1, everything else around 0
        return jnp.asarray(rng.normal(float(is_scale), 0.2, x.shape).astype(np.float32))

    return jax.tree_util.tree_map_with_path(fill, shapes)


PACK_CONFIG = dataclasses.replace(TINY, attention_bias=True, qk_norm=True)


def test_packed_rows_equal_separate_runs():
    params = _random_params(PACK_CONFIG)
    a, b = np.array([[5, 17, 42]]), np.array([[88, 3]])
    tokens = np.array([[5, 17, 42, 88, 3, 0]])
    segments = np.array([[1, 1, 1, 2, 2, 0]])
    positions = np.array([[0, 1, 2, 0, 1, 0]])
    packed = forward(PACK_CONFIG, params, tokens, positions, segments)
    np.testing.assert_allclose(packed[0, :3], forward(PACK_CONFIG, params, a)[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 3:5], forward(PACK_CONFIG, params, b)[0], atol=1e-5)
    assert np.isfinite(np.asarray(packed)).all()


def test_padding_invariance_and_no_nan():
    params = _random_params(PACK_CONFIG)
    rng = np.random.default_rng(1)
    valid = rng.integers(0, V, size=(1, 5))
    padded = np.concatenate([valid, rng.integers(0, V, size=(1, 3))], axis=1)  # garbage pad
    segments = np.array([[1] * 5 + [0] * 3])
    alone = forward(PACK_CONFIG, params, valid)
    logits = forward(PACK_CONFIG, params, padded, None, segments)
    np.testing.assert_allclose(logits[:, :5], alone, atol=1e-5)
    assert np.isfinite(np.asarray(logits)).all()

    def loss(p):
        out = M.forward(PACK_CONFIG, p, padded, None, segments)
        return jnp.sum(out * segments[..., None])

    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def _loss_and_grads(config, params, tokens):
    def loss(p):
        logits = M.forward(config, p, tokens[:, :-1])
        logps = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logps, tokens[:, 1:, None], axis=-1))

    return jax.jit(jax.value_and_grad(loss))(params)


def test_remat_policies_and_unscanned_layers_agree():
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, V, size=(2, 9)))
    params = _random_params(TINY)
    ref_loss, ref_grads = _loss_and_grads(TINY, params, tokens)
    for policy in ["dots_saveable", "full"]:
        loss, grads = _loss_and_grads(
            dataclasses.replace(TINY, remat_policy=policy), params, tokens
        )
        np.testing.assert_allclose(loss, ref_loss, atol=1e-6)
        # Logits and loss are bit-identical; recomputation lets XLA reassociate a few fp32 sums
        # in the backward pass (seen: 2e-6 on gradients whose largest entry is ~1).
        close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        jax.tree.map(close, grads, ref_grads)

    # A Python loop of the same block, params unstacked into layers_0 ... layers_{L-1}.
    loop = dataclasses.replace(TINY, scan_layers=False, remat_policy="full")
    unstacked = {k: v for k, v in params.items() if k != "layers"}
    for i in range(L):
        unstacked[f"layers_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])  # noqa: B023
    assert jax.tree.structure(unstacked) == jax.tree.structure(_random_params(loop))
    loss, _ = _loss_and_grads(loop, unstacked, tokens)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-6)


def test_logical_axes():
    config = dataclasses.replace(TINY, attention_bias=True, qk_norm=True)
    axes = M.logical_axes(config)
    assert axes["embed"]["embedding"] == P("vocab", "embed")
    attn = axes["layers"]["attn"]
    assert attn["q_proj"]["kernel"] == P("layers", "embed", "heads", "head_dim")
    assert attn["k_proj"]["kernel"] == P("layers", "embed", "kv_heads", "head_dim")
    assert attn["v_proj"]["bias"] == P("layers", "kv_heads", "head_dim")
    assert attn["o_proj"]["kernel"] == P("layers", "heads", "head_dim", "embed")
    assert attn["q_norm"]["scale"] == P("layers", "norm")
    assert axes["layers"]["mlp"]["down_proj"]["kernel"] == P("layers", "mlp", "embed")
    assert axes["layers"]["mlp_norm"]["scale"] == P("layers", "norm")
    assert axes["final_norm"]["scale"] == P(
        "norm",
    )
    assert axes["lm_head"]["kernel"] == P("embed", "vocab")
    # Every parameter is named, with one name per dimension.
    shapes = jax.eval_shape(lambda: nn.meta.unbox(M.init_params(config, jax.random.key(0))))
    is_spec = lambda x: isinstance(x, P)
    assert jax.tree.structure(axes, is_leaf=is_spec) == jax.tree.structure(shapes)
    jax.tree.map(lambda s, x: len(s) == x.ndim or pytest.fail(f"{s} {x}"), axes, shapes,
                 is_leaf=is_spec)  # fmt: skip
    assert sum(x.size for x in jax.tree.leaves(shapes)) == M.num_params(config)
    tied = M.logical_axes(dataclasses.replace(config, tie_word_embeddings=True))
    assert "lm_head" not in tied


def test_bfloat16_compute_and_param_dtype():
    config = dataclasses.replace(TINY, dtype="bfloat16")
    params = _random_params(TINY)
    tokens = np.random.default_rng(3).integers(0, V, size=(2, 8))
    hidden = jax.jit(M.hidden_states, static_argnums=0)(config, params, tokens)
    assert hidden.dtype == jnp.bfloat16 and hidden.shape == (2, 8, D)
    logits = forward(config, params, tokens)
    assert logits.dtype == jnp.float32
    err = np.abs(np.asarray(logits) - np.asarray(forward(TINY, params, tokens)))
    assert err.mean() < 0.05 and err.max() < 0.5  # bf16 rounding on O(1) logits
    bf16_params = dataclasses.replace(TINY, param_dtype="bfloat16")
    shapes = jax.eval_shape(lambda: M.init_params(bf16_params, jax.random.key(0)))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    assert M.unembedding(TINY, params).shape == (D, V)


def test_init_params():
    config = dataclasses.replace(TINY, tie_word_embeddings=True, num_layers=3)
    boxed = jax.jit(M.init_params, static_argnums=0)(config, jax.random.key(0))
    specs = nn.get_partition_spec(boxed)
    assert specs["layers"]["mlp"]["up_proj"]["kernel"] == P("layers", "embed", "mlp")
    params = nn.meta.unbox(boxed)
    assert "lm_head" not in params and params["layers"]["mlp_norm"]["scale"].shape == (3, D)
    np.testing.assert_array_equal(params["final_norm"]["scale"], 1.0)
    assert abs(float(jnp.std(params["embed"]["embedding"])) - 0.02) < 0.002  # HF's init
    kernels = params["layers"]["attn"]["q_proj"]["kernel"]
    assert not np.allclose(kernels[0], kernels[1])  # layers get their own rngs under scan
    # Boxed and unboxed params give the same logits.
    tokens = np.arange(8).reshape(2, 4)
    np.testing.assert_array_equal(forward(config, boxed, tokens), forward(config, params, tokens))
    np.testing.assert_array_equal(M.unembedding(config, params), params["embed"]["embedding"].T)


@pytest.mark.parametrize(
    "config, lengths_only",
    [
        (PACK_CONFIG, True),
        # Fall back to the mask: a sliding window (Mistral), Gemma 2's score cap.
        (dataclasses.replace(TINY, sliding_window=3, architecture="MistralForCausalLM"), False),
        (dataclasses.replace(TINY, attn_logit_softcap=5.0), False),
    ],
    ids=["lengths", "mistral_window", "softcap"],
)
def test_padded_rows_equal_the_mask_path(config, lengths_only, monkeypatch):
    params = _random_params(config)
    rng = np.random.default_rng(4)
    lengths = np.array([8, 5, 1, 0])  # right-padded rows of different lengths, one empty
    tokens = rng.integers(0, V, size=(4, 8))  # garbage under the padding too
    segments = (np.arange(8)[None, :] < lengths[:, None]).astype(np.int32)
    real = segments.astype(bool)
    proj = jnp.asarray(rng.normal(size=(D,)).astype(np.float32))

    calls = []
    attention = jax.nn.dot_product_attention
    monkeypatch.setattr(
        jax.nn,
        "dot_product_attention",
        lambda *a, **kw: calls.append(kw.get("mask") is None) or attention(*a, **kw),
    )

    def run(padded_rows):
        def loss(p):
            h = M.hidden_states(config, p, tokens, None, segments, padded_rows=padded_rows)
            return jnp.sum((h @ proj) * segments), h

        (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(hidden), grads

    hidden, grads = run(False)
    assert not any(calls)  # without padded_rows, always a mask
    calls.clear()
    padded_hidden, padded_grads = run(True)
    # Lengths instead of a mask, or the mask path (Gemma 2's capped attention is our own).
    expected = {True} if lengths_only else {False} if config.attn_logit_softcap is None else set()
    assert set(calls) == expected
    assert np.isfinite(padded_hidden).all()  # padded query positions too
    np.testing.assert_allclose(padded_hidden[real], hidden[real], atol=1e-5, rtol=0)
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    jax.tree.map(close, padded_grads, grads)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0.1  # non-trivial
