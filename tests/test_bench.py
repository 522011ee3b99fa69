"""The benchmark's code path runs on CPU (tiny preset) and reports sane figures."""

import math

import numpy as np
from conftest import load_config

from dpo_jax import bench, model


def test_tiny_benchmark_reports_positive_finite_figures():
    config = load_config(
        "bench", **{"bench.steps": 2, "bench.warmup_steps": 1, "mesh.fsdp": 1, "mesh.data": -1}
    )
    result = bench.run(config)
    for key in ("pairs_per_s", "tokens_per_s", "mfu", "step_s", "compile_s"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    assert result["padding_fraction"] == 0.0  # fixed lengths fill the rows exactly
    assert result["devices"] == 8


def test_hh_lengths_follow_the_public_mix_and_flops_skip_padding():
    config = load_config("bench", **{"bench.lengths": "hh", "data.max_seq_length": 1024})
    lengths = bench.synthetic_lengths(config, np.random.default_rng(0), 4000)
    totals = lengths[:, 0] + np.maximum(lengths[:, 1], lengths[:, 2])
    assert 100 < np.median(lengths[:, 0] + lengths[:, 1]) < 200
    assert totals.max() <= 1024 and (lengths > 0).all()
    tiny = bench.model_config_for(load_config("bench"))
    one = bench.step_flops(tiny, np.array([[10, 5, 5]]), with_reference=False)
    expected = 2 * 15 * model.flops_per_token(tiny, 15, backward=True)
    assert math.isclose(one, expected)
    with_ref = bench.step_flops(tiny, np.array([[10, 5, 5]]), with_reference=True)
    assert math.isclose(with_ref, one * 4 / 3, rel_tol=0.05)  # +2N on top of 6N
