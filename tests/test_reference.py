"""Precomputed reference log-probs: same training as the in-step reference forward,
cached on disk under an exact key, and no reference weights kept on the device."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
from conftest import PACKED, SMALL_TRAIN_PAIRS, assert_rows_close, fast_config, read_metrics

from dpo_jax import embedded, reference, sharding, train
from dpo_jax.data.batching import reference_columns


def test_params_fingerprint_is_exact_and_mesh_independent():
    params = {
        "embed": jnp.arange(64 * 16, dtype=jnp.float32).reshape(64, 16) / 7.0,
        "layers": {"kernel": jnp.linspace(-1, 1, 8 * 32, dtype=jnp.bfloat16).reshape(8, 32)},
    }
    one = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
    eight = sharding.make_mesh(1, 8, 1)
    spread = jax.device_put(
        params, jax.sharding.NamedSharding(eight, jax.sharding.PartitionSpec("fsdp"))
    )
    assert reference.params_fingerprint(params, one) == reference.params_fingerprint(spread, eight)

    nudged = dict(params, embed=params["embed"].at[63, 15].add(1e-3))
    assert reference.params_fingerprint(nudged, one) != reference.params_fingerprint(params, one)
    # The same values in swapped places are different weights.
    swapped = dict(params, embed=params["embed"][::-1])
    assert reference.params_fingerprint(swapped, one) != reference.params_fingerprint(params, one)


def test_ld_dpo_tables_have_their_own_cache_key():
    """LD-DPO's reference log-probs differ from plain ones: a table of one is never loaded
    for the other; plain tables keep their earlier keys."""
    from conftest import load_config, model_config_of

    from dpo_jax.data import TokenizedPair

    pair = TokenizedPair(*(np.arange(n, dtype=np.int32) for n in (3, 2, 4)), "x:1")
    model_config = model_config_of(load_config("tiny"))
    plain = reference.table_key("w", model_config, [pair])
    assert reference.table_key("w", model_config, [pair], ld_alpha=1.0) == plain
    assert reference.table_key("w", model_config, [pair], ld_alpha=0.5) != plain


def test_reference_columns_follow_the_pair_slots():
    table = np.arange(20, dtype=np.float32).reshape(10, 2)
    columns = reference_columns(table, [[3, 0], [9]], num_pairs=3)
    np.testing.assert_array_equal(columns, [[6, 7, 0, 1, 0, 0], [18, 19, 0, 0, 0, 0]])


def test_precomputed_reference_trains_like_the_reference_forward(
    packed_baseline, small_train, small_validation, tmp_path
):
    """Packed batches (pair slots in packing order) with the in-step reference and prefetch
    off, against precomputed log-probs with prefetch on: every metric within 1e-5. A second
    run, on 8 devices, loads the tables from the cache and still samples the reference."""
    common = PACKED | {"data.cache_dir": str(tmp_path / "cache" / "data")}
    common["data.train_file"] = small_train
    assert packed_baseline[1].ref_params is not None
    precomputed_config = fast_config(
        small_validation, **common, **{"training.precompute_ref_log_probs": True}
    )
    precomputed = train.train(precomputed_config, str(tmp_path / "precomputed"), jax.devices()[:1])
    assert precomputed.ref_params is None
    expected = read_metrics(packed_baseline[0])
    got = read_metrics(str(tmp_path / "precomputed"))
    assert len(expected) == len(got) == 6  # 4 steps + 2 evals
    for a, b in zip(expected, got, strict=True):
        assert_rows_close(a, b)

    # Inside the tokenization cache: data.cache_dir/reference_logps.
    tables = sorted(glob.glob(str(tmp_path / "cache" / "data" / "reference_logps" / "*.npy")))
    assert len(tables) == 2  # training data and validation data
    sizes = sorted(np.load(path).shape[0] for path in tables)
    assert sizes == [16, SMALL_TRAIN_PAIRS]
    stamps = [os.stat(path).st_mtime_ns for path in tables]

    again = fast_config(
        small_validation,
        **common
        | {
            "training.precompute_ref_log_probs": True,
            "training.max_steps": 1,
            "eval.sample_prompts_file": embedded.VALIDATION_PROMPTS_FILE,
            "eval.num_sample_prompts": 2,
            "eval.sample_max_new_tokens": 4,
        },
    )
    result = train.train(again, str(tmp_path / "again"))
    assert [os.stat(path).st_mtime_ns for path in tables] == stamps  # loaded, not rewritten
    assert "eval/samples/reference_preferred_rate" in result.eval_metrics
    assert_rows_close(read_metrics(str(tmp_path / "again"))[0], expected[0])
