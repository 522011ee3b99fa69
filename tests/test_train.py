"""End-to-end training on the tiny default: step-0 loss, meshes, accumulation, prefix sharing.
Kills, signals and resumes of the CLI are tests/test_faults.py's."""

import json
import math
import os

import jax
import numpy as np
import pytest
from conftest import (
    PACKED,
    assert_rows_close,
    fast_config,
    load_config,
    model_config_of,
    read_metrics,
    train_rows,
)

from dpo_jax import optim, settings, sharding, state, train


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, small_validation):
    """One uninterrupted run on a single device; the reference for the other tests."""
    workdir = str(tmp_path_factory.mktemp("baseline"))
    result = train.train(fast_config(small_validation), workdir, devices=jax.devices()[:1])
    return workdir, result


def test_step0_loss_is_ln2_and_training_learns(baseline):
    workdir, result = baseline
    rows = read_metrics(workdir)
    steps = train_rows(rows)
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-5
    assert abs(steps[0]["rewards/margins"]) < 1e-5
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "preference_loss",
        "sft_loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_sec",
    ):
        assert key in steps[0], key
    assert steps[5]["loss"] < steps[0]["loss"]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[-1]["eval/rewards/accuracies"] == result.eval_metrics["eval/rewards/accuracies"]
    assert result.completed
    for name in ("config.json", "data_report.json"):
        assert os.path.exists(os.path.join(workdir, name))


def test_reference_params_bit_identical_after_training(baseline, small_validation):
    _, result = baseline
    # A fresh initial state built exactly as the trainer builds it (same jitted init).
    s = settings.from_config(fast_config(small_validation))
    model_config = state.model_config(s.model)
    optimizer = optim.make_optimizer(s.optim.for_steps(6))
    mesh = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    shardings = state.state_shardings(model_config, optimizer, mesh, sharding.DEFAULT_RULES)
    fresh = state.init_state(s.model, model_config, s.loop.seed, optimizer, shardings).params
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), result.state.params, fresh)
    assert any(jax.tree.leaves(moved)), "the policy did not train"
    jax.tree.map(np.testing.assert_array_equal, result.ref_params, fresh)


@pytest.mark.parametrize(
    "mesh", [{"data": 8, "fsdp": 1}, {"data": 1, "fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}]
)
def test_eight_device_mesh_matches_one_device(baseline, small_validation, tmp_path, mesh):
    overrides = {f"mesh.{axis}": size for axis, size in ({"tensor": 1} | mesh).items()}
    train.train(fast_config(small_validation, **overrides), str(tmp_path))
    expected, got = read_metrics(baseline[0]), read_metrics(str(tmp_path))
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        assert_rows_close(a, b)


def test_gradient_accumulation_matches_one_big_batch(baseline, small_validation, tmp_path):
    train.train(
        fast_config(small_validation, **{"training.gradient_accumulation_steps": 2}),
        str(tmp_path),
        devices=jax.devices()[:1],
    )
    for a, b in zip(read_metrics(baseline[0]), read_metrics(str(tmp_path)), strict=True):
        assert_rows_close(a, b)


def test_packed_run_trains_like_padded_when_every_pair_fits(
    packed_baseline, small_train, small_validation, tmp_path
):
    """data.packing with rows that hold every step's pairs: the same steps, the same
    batch_size pairs in each (logged as "pairs") and every metric within float tolerance
    of the padded run. Tolerance: the packed rows sum the same terms in another order."""
    overrides = {"data.packing": False, "data.prefetch": 0, "data.train_file": small_train}
    padded = fast_config(small_validation, **PACKED | overrides)
    train.train(padded, str(tmp_path), devices=jax.devices()[:1])
    expected, got = read_metrics(str(tmp_path)), read_metrics(packed_baseline[0])
    assert len(expected) == len(got) == 6  # 4 steps + 2 evals
    for a, b in zip(expected, got, strict=True):
        assert_rows_close(a, b)
    assert [r["pairs"] for r in train_rows(got).values()] == [8] * 4
    with open(os.path.join(packed_baseline[0], "data_report.json")) as f:
        batching = json.load(f)["batching"]
    assert batching["mode"] == "packed" and batching["rows_per_micro_batch"] == 16
    assert batching["pairs_per_step"] == {"min": 8, "mean": 8.0, "max": 8}


def test_prefix_sharing_trains_like_separate_sequences(
    packed_baseline, small_train, small_validation, tmp_path
):
    """[prompt | chosen | rejected] groups (the prompt computed once) on an 8-device fsdp
    mesh, where a pair's rows and its extra prediction live on different devices: every
    metric within 1e-5 of separate packed sequences on one device; fewer row tokens."""
    shared = {"data.prefix_sharing": True, "data.train_file": small_train}
    config = fast_config(small_validation, **PACKED, **shared)
    train.train(config, str(tmp_path))
    expected, got = read_metrics(packed_baseline[0]), read_metrics(str(tmp_path))
    assert len(expected) == len(got) == 6
    for a, b in zip(expected, got, strict=True):
        assert_rows_close(a, b)
    first = train_rows(got)[0]
    assert first["tokens_per_sec"] > 0 and first["mfu"] > 0
    with open(os.path.join(tmp_path, "data_report.json")) as f:
        batching = json.load(f)["batching"]
    assert batching["mode"] == "packed, prefix-shared" and batching["row_length"] == 160


def test_segment_bound_reaches_the_model_only_for_plain_packing():
    def bound(**overrides):
        config = load_config("tiny", **{"model.attention_impl": "cudnn"} | overrides)
        return model_config_of(config).max_segments_per_row

    packed = {"data.packing": True, "data.max_segments_per_row": 8}
    assert bound(**packed) == 8
    assert bound(**packed | {"data.prefix_sharing": True}) is None  # the mask path
    assert bound(**packed | {"data.packing": False}) is None
    assert bound() is None
    with pytest.raises(settings.ConfigError, match="data.max_segments_per_row=1"):
        bound(**packed | {"data.max_segments_per_row": 1})


def test_prefix_shared_rows_must_be_process_major(monkeypatch):
    """extra_index points into the rows of all processes: process p's devices must hold the
    p-th block of rows. With the 8 devices taken as 2 processes of 4, the default device
    order passes and the reversed order fails."""

    class OfTwoProcesses:  # a device of process id // 4
        def __init__(self, device):
            self.id, self.process_index = device.id, device.id // 4

    real_map = jax.sharding.NamedSharding.devices_indices_map

    def two_process_map(self, shape):
        return {OfTwoProcesses(d): index for d, index in real_map(self, shape).items()}

    monkeypatch.setattr(jax.sharding.NamedSharding, "devices_indices_map", two_process_map)
    forward = sharding.make_mesh(1, 8, 1)
    sharding.check_rows_process_major(forward, 16, process_count=2)
    devices = np.array(jax.devices()[::-1]).reshape(1, 8, 1)
    backward = jax.sharding.Mesh(devices, forward.axis_names)
    with pytest.raises(sharding.MeshError, match="prefix_sharing: process 1"):
        sharding.check_rows_process_major(backward, 16, process_count=2)
