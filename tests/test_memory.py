"""The start-up memory estimate: exact for sharded state, and a clear stop when it can't fit."""

import jax
import pytest
from conftest import load_config, model_config_of

from dpo_jax import memory, model, optim, settings, sharding, state


def abstract_state(config, mesh):
    s = settings.from_config(config)
    model_config = state.model_config(s.model)
    optimizer = optim.make_optimizer(s.optim.for_steps(10))
    shardings = state.state_shardings(model_config, optimizer, mesh, sharding.DEFAULT_RULES)
    train_state = state.init_state(s.model, model_config, s.loop.seed, optimizer, shardings)
    return model_config, train_state


def test_sharded_state_bytes_are_exact():
    config = load_config("tiny")
    one = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    eight = sharding.make_mesh(1, 8, 1)
    model_config, state1 = abstract_state(config, one)
    _, state8 = abstract_state(config, eight)
    n = model.num_params(model_config)
    assert memory.shard_bytes(state1.params) == 4 * n
    # Adam keeps two fp32 moments per parameter (+ a few scalars).
    assert 8 * n <= memory.shard_bytes(state1.opt_state) < 8 * n + 1024
    # fsdp=8 splits every matrix along `embed`; only norms stay whole on each device.
    assert memory.shard_bytes(state8.params) < memory.shard_bytes(state1.params) / 4


def test_remat_lowers_the_activation_estimate():
    config = load_config("tiny")
    model_config = model_config_of(config)
    sizes = {
        policy: memory.activation_bytes(
            model.ModelConfig(**(vars(model_config) | {"remat_policy": policy})),
            tokens_per_device=4096,
            row_length=128,
            logits_chunk_size=4096,
        )
        for policy in ("none", "dots_saveable", "full")
    }
    assert sizes["none"] > sizes["dots_saveable"] > sizes["full"] > 0


def test_check_fits_names_the_knobs():
    parts = {"params": 10, "total": 3 * memory.GiB}
    memory.check_fits(parts, None)  # CPU: no limit
    memory.check_fits(parts, 4 * memory.GiB)
    with pytest.raises(MemoryError) as error:
        memory.check_fits(parts, 2 * memory.GiB)
    message = str(error.value)
    assert "3.0 GiB" in message and "gradient_checkpointing" in message and "mesh.fsdp" in message
