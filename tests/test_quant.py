"""dpo_jax.quant against a float64 NumPy statement of the same scheme: int8 and NF4 codes,
their error bounds, NF4's nibble layout, slicing by layer (what nn.scan does), which
leaves of a model are quantized, their shardings on an 8-device mesh, and their bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_DIMS, load_config
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax import model, quant, sharding

# float32 unit roundoff: quantize divides by the scale and dequantize multiplies by it,
# each rounding once, so a few of these (times the block's absmax) cover all rounding.
EPS32 = 2.0**-24
ROUNDING = 4 * EPS32


def blocks_of(x: np.ndarray) -> np.ndarray:
    n = x.shape[-1]
    b = quant.block_size(n)
    return x.reshape(*x.shape[:-1], n // b, b)


def reference_int8(x: np.ndarray):
    """(codes, scales, exact quotients) in float64: s = absmax / 127, code = round(x / s)."""
    blocks = blocks_of(x.astype(np.float64))
    absmax = np.abs(blocks).max(axis=-1)
    scales = np.where(absmax > 0, absmax / 127.0, 1.0)
    quotient = blocks / scales[..., None]
    return np.round(quotient).reshape(x.shape), scales, quotient.reshape(x.shape)


def reference_nf4(x: np.ndarray):
    """(codes, absmax, distance gap to the second-nearest level) in float64."""
    blocks = blocks_of(x.astype(np.float64))
    absmax = np.abs(blocks).max(axis=-1)
    scales = np.where(absmax > 0, absmax, 1.0)
    distance = np.abs((blocks / scales[..., None])[..., None] - quant.NF4_TABLE.astype(np.float64))
    ordered = np.sort(distance, axis=-1)
    codes = np.argmin(distance, axis=-1)
    return codes.reshape(x.shape), scales, (ordered[..., 1] - ordered[..., 0]).reshape(x.shape)


def unpacked(packed: np.ndarray) -> np.ndarray:
    """NF4 codes from their bytes: element 2i in the low nibble, 2i + 1 in the high one."""
    low, high = packed & 0x0F, packed >> 4
    return np.stack([low, high], axis=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])


def per_element(scales: np.ndarray, shape) -> np.ndarray:
    """Each element's block scale, broadcast back to the kernel's shape."""
    block = quant.block_size(shape[-1])
    return np.repeat(scales, block, axis=-1).reshape(shape)


# Last axes of 128 (two 64-blocks), 96 (gcd 32) and 40 (gcd 8): real and tiny widths.
SHAPES = [(3, 16, 128), (24, 96), (2, 5, 40)]


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_codes_and_error_match_the_float64_statement(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.05
    q = quant.quantize(jnp.asarray(x), "int8")
    codes, scales, quotient = reference_int8(x)
    assert q.codes.dtype == jnp.int8 and q.codes.shape == shape and q.shape == shape
    np.testing.assert_allclose(np.asarray(q.scales), scales, rtol=2 * EPS32)
    # Where x / s is not within float32 rounding of a .5 tie, the code is exactly round(x/s).
    decided = np.abs(np.abs(quotient - np.trunc(quotient)) - 0.5) > 1e-4
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(np.asarray(q.codes)[decided], codes[decided])
    assert np.abs(np.asarray(q.codes)).max() == 127  # each block's absmax maps to ±127
    # |x - dequantized| <= s / 2, plus rounding of the order of absmax = 127 s.
    s = per_element(scales, shape)
    error = np.abs(np.asarray(quant.dequantize(q, jnp.float32), np.float64) - x)
    assert np.all(error <= s / 2 + ROUNDING * 127 * s), (error / s).max()


@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_codes_and_error_match_the_float64_statement(shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.05
    q = quant.quantize(jnp.asarray(x), "nf4")
    codes, scales, gap = reference_nf4(x)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape == (*shape[:-1], shape[-1] // 2)
    assert q.shape == shape
    got = unpacked(np.asarray(q.codes))
    decided = gap > 1e-5  # not a near-tie between two levels
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(got[decided], codes[decided])
    # Dequantized values are the chosen level times the block's absmax, and within
    # NF4_MAX_ERROR · absmax of x.
    s = per_element(scales, shape)
    values = np.asarray(quant.dequantize(q, jnp.float32), np.float64)
    np.testing.assert_allclose(values, quant.NF4_TABLE[got] * s, rtol=ROUNDING, atol=0)
    error = np.abs(values - x)
    assert np.all(error <= (quant.NF4_MAX_ERROR + ROUNDING) * s), (error / s).max()
    # The bound: half of NF4's widest gap, between its two lowest levels (-1 and -0.6962).
    assert quant.NF4_MAX_ERROR == pytest.approx((1.0 - 0.6961928009986877) / 2)


def test_nf4_levels_round_trip_exactly_with_their_nibble_layout():
    """Values on NF4's levels (absmax 1 in every block) quantize to known codes, pack low
    nibble first, and dequantize to themselves."""
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, size=(4, 128))
    codes[:, 0] = 0  # level -1.0: every block's absmax is exactly 1
    codes[:, 64] = 15
    x = quant.NF4_TABLE[codes]
    q = quant.quantize(jnp.asarray(x), "nf4")
    np.testing.assert_array_equal(np.asarray(q.scales), np.ones((4, 2), np.float32))
    expected_bytes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(q.codes), expected_bytes)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q, jnp.float32)), x)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_zero_block_stays_exactly_zero(kind):
    x = np.zeros((2, 128), np.float32)
    x[1, 64:] = np.linspace(-1, 1, 64)  # one nonzero block beside three zero ones
    values = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(x), kind), jnp.float32))
    assert np.all(values[0] == 0) and np.all(values[1, :64] == 0)
    assert np.all(np.isfinite(values))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_slicing_a_stacked_kernel_by_layer_dequantizes_that_layer(kind):
    """nn.scan hands each layer the leaves of a Quantized sliced along axis 0."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((3, 8, 64)), jnp.float32)
    q = quant.quantize(x, kind)
    whole = quant.dequantize(q, jnp.float32)

    def body(carry, layer):
        return carry, quant.dequantize(layer, jnp.float32)

    _, scanned = jax.lax.scan(body, None, q)
    np.testing.assert_array_equal(np.asarray(scanned), np.asarray(whole))
    for i in range(3):
        layer = jax.tree.map(lambda leaf, i=i: leaf[i], q)
        np.testing.assert_array_equal(
            np.asarray(quant.dequantize(layer, jnp.float32)), np.asarray(whole[i])
        )


def test_bad_kinds_and_odd_nf4_axes_are_refused():
    with pytest.raises(ValueError, match="use int8 or nf4"):
        quant.quantize(jnp.ones((4, 64)), "int4")
    with pytest.raises(ValueError, match="two codes per byte"):
        quant.quantize(jnp.ones((4, 63)), "nf4")


def test_bytes_per_kernel():
    """nf4 64x128: 64 · 64 code bytes + 64 · 2 float32 scales; int8: 64 · 128 + the same."""
    x = jnp.ones((64, 128), jnp.float32)
    assert quant.quantize(x, "nf4").nbytes == 64 * 64 + 64 * 2 * 4
    assert quant.quantize(x, "int8").nbytes == 64 * 128 + 64 * 2 * 4
    assert quant.bytes_per_param("nf4") * 64 * 128 == 64 * 64 + 64 * 2 * 4
    assert quant.bytes_per_param("int8") * 64 * 128 == 64 * 128 + 64 * 2 * 4


TINY = model.ModelConfig(**TINY_DIMS)


def test_only_the_models_projection_kernels_are_quantized_and_the_forward_dequantizes():
    params = model.init_params(TINY, jax.random.key(0))
    stored = quant.quantize_params(params, "nf4")
    kinds = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        stored, is_leaf=lambda x: isinstance(x, quant.Quantized)
    ):
        names = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        kinds[tuple(names)] = isinstance(leaf, quant.Quantized)
    quantized = {names[-2] for names, q in kinds.items() if q}
    assert quantized == set(quant.PROJECTIONS)
    assert all(names[-1] == "kernel" for names, q in kinds.items() if q)
    assert not any(q for names, q in kinds.items() if names[-2] not in quant.PROJECTIONS)
    assert quant.quantize_params(params, "none") is params

    # The model computes with the dequantized kernels: the same logits as a float tree
    # holding exactly those values.
    dequantized = jax.tree.map(
        lambda leaf: (
            quant.dequantize(leaf, jnp.float32) if isinstance(leaf, quant.Quantized) else leaf
        ),
        stored,
        is_leaf=lambda x: isinstance(x, quant.Quantized),
    )
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, 97, (2, 12)), jnp.int32)
    forward = jax.jit(model.forward, static_argnums=0)
    np.testing.assert_allclose(
        np.asarray(forward(TINY, stored, tokens)),
        np.asarray(forward(TINY, dequantized, tokens)),
        rtol=0,
        atol=1e-6,
    )


def test_quantized_shardings_keep_what_divides_and_place_the_leaves():
    """On 8 devices: nf4 codes [64, 64] keep an fsdp split of either axis; the scales
    [64, 2] cannot take 8 along their last axis, which is then left whole."""
    mesh = sharding.make_mesh(1, -1, 1, jax.devices()[:8])
    assert mesh.shape["fsdp"] == 8
    kernel = jnp.asarray(np.random.default_rng(5).standard_normal((64, 128)), jnp.float32)
    params = {"mlp": {"up_proj": {"kernel": kernel}}, "norm": {"scale": jnp.ones(64)}}
    by_columns = {
        "mlp": {"up_proj": {"kernel": NamedSharding(mesh, PartitionSpec(None, "fsdp"))}},
        "norm": {"scale": NamedSharding(mesh, PartitionSpec("fsdp"))},
    }
    abstract = jax.eval_shape(lambda p: p, params)
    placed = quant.quantized_shardings(by_columns, abstract, "nf4")
    up = placed["mlp"]["up_proj"]["kernel"]
    assert isinstance(up, quant.Quantized) and up.kind == "nf4"
    assert up.codes.spec == PartitionSpec(None, "fsdp")
    assert up.scales.spec == PartitionSpec(None, None)
    assert placed["norm"]["scale"] is by_columns["norm"]["scale"]

    by_rows = {
        "mlp": {"up_proj": {"kernel": NamedSharding(mesh, PartitionSpec("fsdp", None))}},
        "norm": by_columns["norm"],
    }
    rows = quant.quantized_shardings(by_rows, abstract, "int8")["mlp"]["up_proj"]["kernel"]
    assert rows.codes.spec == PartitionSpec("fsdp", None)
    assert rows.scales.spec == PartitionSpec("fsdp", None)

    # The quantized tree goes onto those shardings, and abstract_quantized describes it.
    stored = jax.device_put(quant.quantize_params(params, "nf4"), placed)
    assert stored["mlp"]["up_proj"]["kernel"].codes.sharding == up.codes
    abstract_stored = quant.abstract_quantized(abstract, "nf4", placed)
    codes = abstract_stored["mlp"]["up_proj"]["kernel"].codes
    assert codes.shape == (64, 64) and codes.dtype == jnp.uint8 and codes.sharding == up.codes
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize(stored["mlp"]["up_proj"]["kernel"], jnp.float32)),
        np.asarray(quant.dequantize(quant.quantize(kernel, "nf4"), jnp.float32)),
    )


def live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays() if not x.is_deleted())


def test_loading_a_quantized_base_drops_each_float_kernel_once_quantized(monkeypatch):
    """QLoRA's load holds the float base and grows the quantized one kernel by kernel: at no
    point may both whole bases be alive (what a forgotten reference to the float leaves
    does), so the live bytes never exceed float base + one quantized kernel."""
    from dpo_jax import settings, state

    s = settings.from_config(load_config("tiny", "qlora"))
    config = state.model_config(s.model)
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    shardings = state.param_shardings(config, mesh, s.mesh.rules)
    float_base = sum(  # held in the compute dtype
        int(np.prod(x.shape)) * jnp.dtype(config.dtype).itemsize
        for x in jax.tree.leaves(state.abstract_params(config, shardings))
    )
    before = live_bytes()
    seen = []
    set_path = state.hf.set_path

    def recording_set_path(tree, keys, value):
        set_path(tree, keys, value)
        seen.append(live_bytes() - before)

    monkeypatch.setattr(state.hf, "set_path", recording_set_path)
    base, _ = state.load_base(s.model, config, s.loop.seed, mesh, s.mesh.rules)
    leaves = jax.tree.leaves(base, is_leaf=lambda x: isinstance(x, quant.Quantized))
    largest = max(q.nbytes for q in leaves if isinstance(q, quant.Quantized))
    seen = seen[-len(leaves) :]  # the quantizing loop's calls (loading the weights makes more)
    # The live bytes are the float leaves not yet taken plus the quantized ones so far.
    assert max(seen) <= float_base + largest, (max(seen), float_base, largest)
    assert seen[-1] == sum(leaf.nbytes for leaf in leaves) < float_base
