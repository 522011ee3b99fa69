"""dpo_jax.model against transformers' PyTorch models, plus packing/padding/remat invariances."""

import dataclasses
import importlib.util
import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import TINY_DIMS

from dpo_jax import attention, hf
from dpo_jax import model as M

P = jax.sharding.PartitionSpec

TINY = M.ModelConfig(**TINY_DIMS)
V, D, F, L, N, K = (
    TINY.vocab_size,
    TINY.hidden_size,
    TINY.intermediate_size,
    TINY.num_layers,
    TINY.num_heads,
    TINY.num_kv_heads,
)
LLAMA3_ROPE = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
# head_dim 16, theta 1e4: wavelengths 6.3 ... 2e4, so an original context of 64 puts frequencies
# in all three llama3 bands (kept, smoothed, divided by factor).
LLAMA3_OLD_LEN = 64
# The other rope_scaling kinds, as transformers' rope_parameters. YaRN over an original
# context of 64 ramps dimensions 0..3 of 8 (kept, blended, divided) and scales cos and sin by
# 0.1 ln 4 + 1; its mscale pair changes that temperature.
SCALED_ROPES = {
    "linear_rope": dict(rope_type="linear", factor=4.0),
    "yarn_rope": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    "yarn_mscale_rope": dict(
        rope_type="yarn",
        factor=4.0,
        original_max_position_embeddings=64,
        mscale=1.0,
        mscale_all_dim=0.5,
        beta_fast=16,
    ),
}

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
    elif variant in SCALED_ROPES:
        rope = dict(rope_theta=10000.0, **SCALED_ROPES[variant])
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


def _config_for(variant: str, hf_config=None) -> M.ModelConfig:
    if variant in SCALED_ROPES:  # read from transformers' own config dict
        return dataclasses.replace(TINY, rope_scaling=hf.rope_scaling_from_hf(hf_config.to_dict()))
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


@pytest.mark.parametrize(
    "variant", ["llama", "llama3_rope", *SCALED_ROPES, "tied", "qwen2", "qwen3"]
)
def test_matches_transformers(variant):
    model = _hf_model(variant)
    config = _config_for(variant, model.config)
    params = _params_from_hf(model, config)
    # Same tree and shapes as our own init, and the exact parameter count.
    ours = jax.eval_shape(lambda: nn.meta.unbox(M.init_params(config, jax.random.key(0))))
    assert jax.tree.map(lambda x: x.shape, params) == jax.tree.map(lambda x: x.shape, ours)
    assert M.num_params(config) == sum(p.numel() for p in model.parameters())
    if variant == "llama3_rope" or variant in SCALED_ROPES:
        rotary = model.model.rotary_emb
        np.testing.assert_allclose(M.rope_inv_freq(config), rotary.inv_freq.numpy(), rtol=1e-6)
        assert not np.allclose(M.rope_inv_freq(config), M.rope_inv_freq(TINY))
        assert M.rope_attention_factor(config) == pytest.approx(rotary.attention_scaling, 1e-12)
        # What export writes, transformers reads back as the same rotation.
        written = hf.hf_config_from_model_config(config, "float32")
        again = transformers.LlamaForCausalLM(transformers.LlamaConfig(**written)).model
        np.testing.assert_allclose(rotary.inv_freq.numpy(), again.rotary_emb.inv_freq.numpy())
        assert again.rotary_emb.attention_scaling == pytest.approx(rotary.attention_scaling)

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


# cuDNN's packed ("THD") layout for packed rows. No cuDNN here: the offsets and lengths, the
# path selection, and a stand-in for JAX's private entry point that emulates its contract.

_xla_attention = jax.nn.dot_product_attention  # before any test monkeypatches it


def test_packed_segments():
    segments = np.array(
        [
            [0, 0, 0, 0, 0, 0],  # an empty row
            [1, 1, 1, 1, 1, 1],  # one sequence filling the row
            [1, 1, 0, 0, 0, 0],  # one sequence, then padding
            [1, 1, 1, 2, 3, 3],  # several, filling the row
            [1, 2, 2, 3, 0, 0],  # several, then padding
            [1, 2, 3, 4, 5, 0],  # more than M = 4: the fifth is left out
        ]
    )
    offsets, lengths = jax.jit(attention.packed_segments, static_argnums=1)(segments, 4)
    assert offsets.dtype == lengths.dtype == jnp.int32
    assert offsets.shape == (6, 5) and lengths.shape == (6, 4)
    _ = -1  # no such segment
    np.testing.assert_array_equal(
        offsets,
        [
            [_, _, _, _, _],
            [0, _, _, _, _],
            [0, _, _, _, _],
            [0, 3, 4, _, _],
            [0, 1, 3, _, _],
            [0, 1, 2, 3, _],
        ],
    )
    np.testing.assert_array_equal(
        lengths,
        [
            [_, _, _, _],
            [6, _, _, _],
            [2, _, _, _],
            [3, 1, 2, _],
            [1, 2, 1, _],
            [1, 1, 1, 1],
        ],
    )


def _cudnn_fa():
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        fa._fix_seqlen_offsets  # noqa: B018
    except (ImportError, AttributeError):
        pytest.skip("this JAX moved its private cuDNN attention helpers")
    return fa


def test_packed_segments_survive_jax_flattening():
    # JAX turns [B, M] / [B, M+1] into cuDNN's flat segment list: entries >= 0 moved left, row
    # offsets made global. Every segment must come out as (row * T + start, length), in order.
    fa = _cudnn_fa()
    segments = np.array([[1, 1, 2, 2, 2, 0], [0] * 6, [1, 2, 3, 3, 3, 3], [1, 1, 1, 0, 0, 0]])
    b, t = segments.shape
    offsets, lengths = attention.packed_segments(jnp.asarray(segments), 3)
    q = jnp.zeros((b, t, 1, 1), jnp.bfloat16)  # one head of width 1: element offset = token
    flat_lengths, _, flat_offsets, _ = fa._fix_seqlen_offsets(
        lengths, lengths, offsets, offsets, q, q
    )
    flat_lengths, flat_offsets = np.ravel(flat_lengths), np.ravel(flat_offsets)
    expected = [
        (row * t + int(np.argmax(segments[row] == s)), int(np.sum(segments[row] == s)))
        for row in range(b)
        for s in range(1, segments[row].max() + 1)
    ]
    count = len(expected)
    assert list(zip(flat_offsets[:count], flat_lengths[:count], strict=True)) == expected
    assert (flat_lengths[count:] == 0).all() and flat_offsets[count] == b * t  # cuDNN's end


@jax.custom_vjp
def _nan_grad_outside(x, covered):
    return x


_nan_grad_outside.defvjp(
    lambda x, covered: (x, covered),
    lambda covered, g: (jnp.where(covered[:, None, None], g, jnp.nan), None),
)


def _fake_cudnn_module(calls):
    """Stands in for jax._src.cudnn.fused_attention_stablehlo on CPU, emulating its packed
    layout: offsets and lengths flattened by JAX's own helper (as the real entry point does
    before cuDNN), segments read from the element offsets at the tensors' real strides (N·H per
    query token, K·H per key token), causal attention within each segment, and NaN wherever
    cuDNN writes nothing (outputs, and dq/dk/dv, of tokens outside every segment)."""
    fa = _cudnn_fa()

    @jax.numpy_rank_promotion("allow")  # a test's stand-in, not package code
    def dot_product_attention(q, k, v, *, q_seqlen, kv_seqlen, q_offsets, kv_offsets, **kw):
        calls.append(
            dict(kw, kv_heads=k.shape[2], same=(q_seqlen is kv_seqlen, q_offsets is kv_offsets))
        )
        b, t, n, h = q.shape
        lengths, _, q_off, kv_off = fa._fix_seqlen_offsets(
            q_seqlen, kv_seqlen, q_offsets, kv_offsets, q, k
        )
        lengths_J = jnp.ravel(lengths)
        token = jnp.arange(b * t)[:, None]

        def segment_of(element_offsets, stride):
            start_J = jnp.ravel(element_offsets)[: lengths_J.size] // stride
            inside = (token >= start_J) & (token < start_J + lengths_J) & (lengths_J > 0)
            segment = jnp.argmax(inside, axis=1)
            return inside.any(axis=1), segment, token[:, 0] - start_J[segment]

        q_in, q_seg, q_rel = segment_of(q_off, n * h)
        k_in, k_seg, k_rel = segment_of(kv_off, k.shape[2] * h)
        mask = (q_seg[:, None] == k_seg) & q_in[:, None] & k_in & (k_rel <= q_rel[:, None])
        flat = lambda x, inside: _nan_grad_outside(x.reshape(b * t, *x.shape[2:]), inside)[None]
        out = _xla_attention(
            flat(q, q_in), flat(k, k_in), flat(v, k_in), mask=mask, scale=kw["scale"]
        )[0]
        return jnp.where(q_in[:, None, None], out, jnp.nan).reshape(q.shape)

    return types.SimpleNamespace(dot_product_attention=dot_product_attention, MaskType=fa.MaskType)


CUDNN_PACKED = dataclasses.replace(PACK_CONFIG, attention_impl="cudnn", max_segments_per_row=4)


def _packed_batch(rng, lengths_per_row, row_length):
    """tokens, positions, segment ids [B, T] of rows packed with sequences of these lengths,
    garbage tokens under the padding."""
    tokens = rng.integers(0, V, size=(len(lengths_per_row), row_length))
    positions = np.zeros_like(tokens)
    segments = np.zeros_like(tokens)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for s, length in enumerate(lengths, 1):
            positions[row, start : start + length] = np.arange(length)
            segments[row, start : start + length] = s
            start += length
    return tokens, positions, segments


@pytest.mark.parametrize("native_gqa", [False, True], ids=["kv_repeated", "kv_native"])
def test_cudnn_packed_rows_equal_the_mask_path(native_gqa, monkeypatch):
    params = _random_params(PACK_CONFIG)  # the same tree; its init runs no cuDNN
    calls = []
    fake = _fake_cudnn_module(calls)
    monkeypatch.setattr(attention, "cudnn_packed_api", lambda: (fake, native_gqa))
    rng = np.random.default_rng(5)
    # Full row of 3, two then padding, one then padding, an empty row.
    tokens, positions, segments = _packed_batch(rng, [[5, 4, 3], [7, 2], [4], []], 12)
    real = segments > 0
    proj = jnp.asarray(rng.normal(size=(D,)).astype(np.float32))

    def run(config):
        def loss(p):
            h = M.hidden_states(config, p, tokens, positions, segments)
            return jnp.sum((h @ proj) * real), h

        (_, hidden), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return np.asarray(hidden), grads

    hidden, grads = run(dataclasses.replace(CUDNN_PACKED, attention_impl="xla"))  # the mask
    assert not calls
    packed_hidden, packed_grads = run(CUDNN_PACKED)
    scale = (D // N) ** -0.5
    expected_call = dict(scale=scale, mask_type=fake.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    assert calls and all(call == calls[0] for call in calls)
    assert calls[0] == expected_call | dict(kv_heads=K if native_gqa else N, same=(True, True))
    if native_gqa and not attention.native_gqa_offsets(_cudnn_fa()):
        # This JAX steps kv offsets by N·H: passing K < N kv heads as they are reads the wrong
        # keys. The emulation shows it; the real path repeats the heads instead (probe: False).
        assert not np.allclose(packed_hidden[real], hidden[real], atol=1e-3)
        return
    # Padded positions stay finite: nothing the kernel leaves there gets out, NaN included.
    assert np.isfinite(packed_hidden).all()
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(packed_grads))
    np.testing.assert_allclose(packed_hidden[real], hidden[real], atol=1e-5, rtol=0)
    # fp32 sums over other key sets (the emulation attends over all B·T tokens): ~2e-5 apart
    # on gradients whose largest entry is ~15.
    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    jax.tree.map(close, packed_grads, grads)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0.1  # non-trivial


def test_native_gqa_offsets_probe():
    fa = _cudnn_fa()

    def fixed(q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, key):
        q_len, kv_len, q_off, _ = fa._fix_seqlen_offsets(
            q_seqlen, kv_seqlen, q_offsets, kv_offsets, query, query
        )
        _, _, _, kv_off = fa._fix_seqlen_offsets(
            q_seqlen, kv_seqlen, q_offsets, kv_offsets, key, key
        )
        return q_len, kv_len, q_off, kv_off  # kv offsets at the key's own stride

    assert attention.native_gqa_offsets(types.SimpleNamespace(_fix_seqlen_offsets=fixed))
    assert not attention.native_gqa_offsets(types.SimpleNamespace())  # helper gone: repeat
    if jax.__version_info__ <= (0, 10, 2):  # the query-stride bug (jax-ml/jax#39521)
        assert not attention.native_gqa_offsets(fa)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("packed", {"packed"}),
        ("padded_rows", {"lengths"}),
        ("prefix_shared", {"mask"}),
        ("sliding_window", {"mask"}),
        ("softcap", set()),  # Gemma 2's capped attention is our own einsum
        ("xla", {"mask"}),
        ("no_bound", {"mask"}),
        ("no_cudnn", {"mask"}),
        ("decode", {"mask"}),
    ],
)
def test_cudnn_packed_path_selection(case, expected, monkeypatch):
    config = {
        "sliding_window": dataclasses.replace(CUDNN_PACKED, sliding_window=3),
        "softcap": dataclasses.replace(CUDNN_PACKED, attn_logit_softcap=5.0),
        "xla": dataclasses.replace(CUDNN_PACKED, attention_impl="xla"),
        "no_bound": dataclasses.replace(CUDNN_PACKED, max_segments_per_row=None),
    }.get(case, CUDNN_PACKED)
    params = _random_params(PACK_CONFIG)  # the same tree; its init runs no cuDNN
    calls = []

    def packed(q_BxTxNxH, *args, **kwargs):
        calls.append("packed")
        return q_BxTxNxH

    fake = types.SimpleNamespace(dot_product_attention=packed, MaskType=_cudnn_fa().MaskType)
    api = None if case == "no_cudnn" else (fake, True)
    monkeypatch.setattr(attention, "cudnn_packed_api", lambda: api)

    def xla_standing_in(*args, mask=None, implementation=None, **kw):
        calls.append("lengths" if mask is None else "mask")
        return _xla_attention(*args, mask=mask, **kw)  # trace only: XLA stands in for cuDNN

    monkeypatch.setattr(jax.nn, "dot_product_attention", xla_standing_in)
    tokens, positions, segments = _packed_batch(np.random.default_rng(6), [[3, 5], [8]], 8)
    if case == "decode":
        cache = M.init_cache(config, 2, 8)
        jax.eval_shape(lambda: M.decode_step(config, params, cache, tokens, positions))
    else:
        kw = dict(padded_rows=case == "padded_rows")
        if case == "prefix_shared":
            kw["branch_ids_BxT"] = np.repeat([[0, 0, 0, 1, 1, 2, 2, 2]], 2, axis=0)
        jax.eval_shape(lambda: M.hidden_states(config, params, tokens, positions, segments, **kw))
    assert set(calls) == expected


def test_cudnn_packed_api_off_gpu_and_bound_check():
    if jax.default_backend() == "cpu":
        assert attention.cudnn_packed_api() is None  # no cuDNN: the mask path
    with pytest.raises(ValueError, match="max_segments_per_row"):
        dataclasses.replace(TINY, max_segments_per_row=1)


def _gpu_attention_check():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks",
                        "gpu_attention_check.py")  # fmt: skip
    spec = importlib.util.spec_from_file_location("gpu_attention_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_attention_check_smoke(capsys):
    script = _gpu_attention_check()
    assert script.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "cuDNN unavailable: checking the XLA path only" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["checks"]["xla_packing"]["status"] == "PASS"
    assert result["checks"]["xla_packing"]["hidden_max_abs_diff"] < 1e-3  # same bf16 math
    assert {result["checks"][k]["status"] for k in ("cudnn_packed", "cudnn_padded")} == {"SKIP"}
    assert result["ok"] and set(result["timings_ms"]) == {"xla"}


def test_gpu_attention_check_cudnn_cases(capsys, monkeypatch):
    # The script's GPU cases on CPU: the packed one through the emulated kernel (its numbers
    # agree, but no cuDNN call is in its lowering: FAIL), the others raise (no cuDNN): FAIL,
    # each recorded, and the JSON line still comes out.
    script = _gpu_attention_check()
    monkeypatch.setattr(script, "cudnn_info", lambda: (90600, "9.0"))
    monkeypatch.setattr(attention, "cudnn_packed_api", lambda: (_fake_cudnn_module([]), False))
    assert script.main(["--smoke", "--iters", "1"]) == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    packed = result["checks"]["cudnn_packed"]
    assert packed["hidden_max_abs_diff"] <= packed["hidden_tol"]
    assert packed["grad_max_rel_diff"] <= packed["grad_rel_tol"]
    assert packed["status"] == "FAIL" and result["custom_calls"]["cudnn_packed"] == []
    for case in ("cudnn_padded", "cudnn_bias"):
        assert "cuDNN is not detected" in result["checks"][case]["error"]
    assert not result["ok"] and result["native_gqa_offsets"] is False
