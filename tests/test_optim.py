"""The optimizer: our Adam equals optax's in float32; bfloat16 moments stay unbiased."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import optim


def run(optimizer, params, gradient_fn, steps):
    state = optimizer.init(params)

    def step(carry, i):
        params, state = carry
        updates, state = optimizer.update(gradient_fn(params, i), state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, state), _ = jax.lax.scan(step, (params, state), jnp.arange(steps))
    return params, state


def adam_state(state) -> optim.AdamState:
    """The Adam moments, wherever the chain nests them."""
    is_adam = lambda x: isinstance(x, optim.AdamState)  # noqa: E731
    (found,) = [x for x in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(x)]
    return found


def test_float32_equals_optax_adamw():
    cfg = optim.OptimConfig(learning_rate=1e-2, total_steps=50, warmup_steps=5, weight_decay=0.1)
    reference = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(
            optim.make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=0.1,
            mask=optim.decay_mask,
        ),
    )  # fmt: skip
    params = {"layer": {"kernel": jnp.ones((4, 3)), "scale": jnp.ones((3,))}}

    def gradient(p, i):
        return jax.tree.map(lambda x: jnp.sin(3.0 * x + i.astype(jnp.float32)), p)

    ours, _ = run(optim.make_optimizer(cfg), params, gradient, 20)
    theirs, _ = run(reference, params, gradient, 20)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # Checkpoints written with optax.adamw restore: the state's leaves sit at the same paths.
    def paths(optimizer):
        state = optimizer.init(params)
        return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]

    assert paths(optim.make_optimizer(cfg)) == paths(reference)

    # Zero gradients: weight decay shrinks the kernel and leaves the norm scale alone.
    still, _ = run(
        optim.make_optimizer(cfg), params, lambda p, i: jax.tree.map(jnp.zeros_like, p), 20
    )
    assert np.all(np.asarray(still["layer"]["kernel"]) < 1.0)
    np.testing.assert_array_equal(still["layer"]["scale"], params["layer"]["scale"])


def test_bfloat16_second_moment_is_unbiased_where_nearest_rounding_stalls():
    """b2 = 0.999 and a constant gradient 0.5: nu → 0.25·(1 − 0.999^t). Stored in bfloat16
    with round-to-nearest it stalls at 0.0625 (the step is below half a bfloat16 ulp);
    stochastic rounding follows the float32 value."""
    steps, size = 3000, 4096
    params = {"w": jnp.zeros((size,))}
    cfg = dict(learning_rate=0.0, total_steps=steps, max_grad_norm=0.0, b2=0.999)
    bf16 = optim.make_optimizer(optim.OptimConfig(state_dtype="bfloat16", **cfg))
    f32 = optim.make_optimizer(optim.OptimConfig(**cfg))

    def gradient(p, i):
        return {"w": jnp.full((size,), 0.5)}

    state16 = adam_state(run(bf16, params, gradient, steps)[1])
    state32 = adam_state(run(f32, params, gradient, steps)[1])
    assert state16.mu["w"].dtype == jnp.bfloat16 and state16.nu["w"].dtype == jnp.bfloat16
    exact = 0.25 * (1 - 0.999**steps)
    np.testing.assert_allclose(float(state32.nu["w"].mean()), exact, rtol=1e-3)
    nu16 = np.asarray(state16.nu["w"], np.float32)
    assert abs(nu16.mean() / exact - 1) < 0.01

    nearest = jnp.zeros((), jnp.bfloat16)
    for _ in range(steps):
        nearest = (0.999 * nearest.astype(jnp.float32) + 0.001 * 0.25).astype(jnp.bfloat16)
    assert abs(float(nearest) / exact - 1) > 0.5  # what stochastic rounding avoids


@pytest.mark.parametrize("value", [1.0, 3.14159, -2.5e-3, 7e20])
def test_stochastic_round_brackets_the_value_and_is_deterministic(value):
    x = jnp.full((20000,), value, jnp.float32)
    rounded = optim.stochastic_round(x, jnp.bfloat16, jnp.uint32(7))
    again = optim.stochastic_round(x, jnp.bfloat16, jnp.uint32(7))
    np.testing.assert_array_equal(np.asarray(rounded), np.asarray(again))
    values = np.unique(np.asarray(rounded, np.float32))
    assert len(values) <= 2  # the two bfloat16 neighbours of the value
    assert values.min() <= np.float32(value) <= values.max()
    np.testing.assert_allclose(np.asarray(rounded, np.float64).mean(), value, rtol=2e-4)
    special = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 0.0])
    out = np.asarray(optim.stochastic_round(special, jnp.bfloat16, jnp.uint32(1)), np.float32)
    assert out[0] == np.inf and out[1] == -np.inf and np.isnan(out[2]) and out[3] == 0.0


def test_last_step_at_reference_follows_the_schedule():
    """Warmup's first rate is 0, so step 1 still sees the initial weights; without warmup
    only step 0 does; a zero learning rate never moves them."""
    schedule = lambda **kw: optim.make_schedule(optim.OptimConfig(total_steps=10, **kw))  # noqa: E731
    assert optim.last_step_at_reference(schedule(learning_rate=1e-3, warmup_steps=3), 10) == 1
    assert optim.last_step_at_reference(schedule(learning_rate=1e-3, warmup_steps=0), 10) == 0
    assert optim.last_step_at_reference(schedule(learning_rate=0.0, warmup_steps=3), 10) == 10
