"""Batches: the layout, buckets, packing (efficiency, same loss as padding), deterministic
order, restored positions, mixtures, and per-process rows that concatenate to the global batch."""

import functools

import flax.linen as nn
import jax
import numpy as np
import pytest

from dpo_jax import data
from dpo_jax.data.bench import realistic_lengths
from dpo_jax.data.iterator import LOOK_AHEAD


def make_pair(prompt_len, chosen_len, rejected_len, seed):
    rng = np.random.default_rng(seed)
    ids = lambda n: rng.integers(3, 50, size=n).astype(np.int32)
    return data.TokenizedPair(ids(prompt_len), ids(chosen_len), ids(rejected_len), f"x:{seed}")


def random_pairs(n, max_len, seed=0):
    rng = np.random.default_rng(seed)
    return [
        make_pair(
            int(rng.integers(1, max_len // 2)),
            int(rng.integers(1, max_len // 2)),
            int(rng.integers(1, max_len // 2)),
            seed * 100_000 + i,
        )
        for i in range(n)
    ]


def test_padded_layout_labels_and_masks():
    pair = make_pair(3, 2, 4, 0)
    batch = data.padded_batch([pair], num_pairs=2, row_length=8, pad_id=0)
    tokens = np.concatenate([pair.prompt, pair.chosen])
    np.testing.assert_array_equal(batch["tokens"][0, :5], tokens)
    np.testing.assert_array_equal(batch["labels"][0, :4], tokens[1:])
    # Positions 2 and 3 predict the two completion tokens.
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 1, 1, 0, 0, 0, 0])
    assert batch["loss_mask"][1].sum() == 4 and batch["sequence_ids"][1, 0] == 1
    np.testing.assert_array_equal(batch["pair_mask"], [True, False])
    assert batch["segment_ids"][2:].sum() == 0 and batch["loss_mask"][2:].sum() == 0


def test_packed_batch_holds_the_same_sequences():
    pairs = [make_pair(3, 2, 4, s) for s in range(3)]
    padded = data.padded_batch(pairs, 3, 12, 0)
    packed = data.packed_batch(pairs, 3, num_rows=3, row_length=24, pad_id=0)
    for batch in (padded, packed):
        assert batch["loss_mask"].sum() == sum(len(p.chosen) + len(p.rejected) for p in pairs)
    for s in range(6):
        in_padded = padded["labels"][(padded["sequence_ids"] == s) & padded["loss_mask"]]
        in_packed = packed["labels"][(packed["sequence_ids"] == s) & packed["loss_mask"]]
        np.testing.assert_array_equal(in_padded, in_packed)
    assert packed["segment_ids"].max() >= 2  # several sequences share a row
    for row in range(3):  # positions restart at every new segment
        starts = np.flatnonzero(np.diff(packed["segment_ids"][row], prepend=0) > 0)
        assert all(packed["positions"][row, s] == 0 for s in starts)
    with pytest.raises(data.DataError, match="do not fit"):
        data.packed_batch(pairs, 3, num_rows=1, row_length=24, pad_id=0)


@pytest.mark.parametrize("sliding_window", [None, 5], ids=["full", "window5"])
def test_packed_and_padded_give_the_same_loss(sliding_window):
    """The same pairs through the real eval step: padded rows, packed rows and prefix-shared
    rows (within 1e-5); also with a sliding window shorter than the pairs, measured by
    position (a shared rejected reply sits a chosen reply after its prompt in the row)."""
    import dataclasses

    from conftest import load_config, model_config_of

    from dpo_jax import batch_loss, model, step

    config = load_config("tiny")
    model_config = model_config_of(config)
    model_config = dataclasses.replace(model_config, sliding_window=sliding_window)
    # Any weights do: random ones of the right shapes (no init compile), policy != reference.
    shapes = jax.eval_shape(functools.partial(model.init_params, model_config), jax.random.key(0))
    leaves, tree = jax.tree.flatten(nn.meta.unbox(shapes))

    def random_params(seed):
        rng = np.random.default_rng(seed)
        return tree.unflatten([0.3 * rng.standard_normal(x.shape, np.float32) for x in leaves])

    policy, reference = random_params(0), random_params(1)
    pairs = [make_pair(3 + s % 3, 2 + s % 4, 6 - s % 3, s) for s in range(6)]
    # The same [12, 24] shape both ways (one compilation): packed, two sequences share a row.
    padded = data.padded_batch(pairs, 6, 24, 0)
    packed = data.packed_batch(pairs, 6, num_rows=12, row_length=24, pad_id=0)
    assert packed["segment_ids"].max() >= 2 and not packed["segment_ids"][6:].any()
    shared = data.packed_batch(
        pairs, 6, num_rows=6, row_length=48, pad_id=0, prefix_sharing=True
    )  # prompts computed once
    loss_config = batch_loss.LossConfig(sft_loss_weight=0.5)
    eval_sums = jax.jit(
        functools.partial(step.eval_sums, model_config=model_config, loss_config=loss_config),
        static_argnames="padded_rows",
    )
    metrics = [
        batch_loss.finalize(eval_sums(policy, reference, batch, padded_rows=padded_rows))
        for batch, padded_rows in ((padded, True), (packed, False), (shared, False))
    ]
    assert abs(float(metrics[0]["loss"]) - np.log(2)) > 1e-3  # a real, non-trivial loss
    for other in metrics[1:]:
        for key in (
            "loss", "logps/chosen", "logps/rejected", "rewards/margins", "sft_loss",
            "logits/chosen", "logits/rejected",
        ):  # fmt: skip
            np.testing.assert_allclose(other[key], metrics[0][key], rtol=1e-5, atol=1e-5)


def test_prefix_shared_layout():
    pairs = [make_pair(4, 3, 5, 0), make_pair(2, 6, 1, 1), make_pair(5, 2, 2, 2)]
    batch = data.packed_batch(pairs, 4, num_rows=2, row_length=24, pad_id=0, prefix_sharing=True)
    assert batch["pair_mask"].tolist() == [True, True, True, False]
    flat = {k: v.reshape(-1) for k, v in batch.items() if v.ndim == 2}
    for p, pair in enumerate(pairs):
        lp, lc, lr = (len(x) for x in (pair.prompt, pair.chosen, pair.rejected))
        group = np.flatnonzero(
            (flat["sequence_ids"] // 2 == p) & (flat["segment_ids"] > 0)
        )  # one contiguous block: [prompt | chosen | rejected]
        assert len(group) == lp + lc + lr and np.all(np.diff(group) == 1)
        np.testing.assert_array_equal(
            flat["tokens"][group], np.concatenate([pair.prompt, pair.chosen, pair.rejected])
        )
        np.testing.assert_array_equal(
            flat["positions"][group], np.r_[np.arange(lp + lc), lp + np.arange(lr)]
        )
        np.testing.assert_array_equal(flat["branch_ids"][group], np.repeat([0, 1, 2], [lp, lc, lr]))
        for side, completion in enumerate((pair.chosen, pair.rejected)):
            trained = (flat["sequence_ids"] == 2 * p + side) & flat["loss_mask"]
            # The rejected reply's first token is the extra prediction, from the prompt's end.
            expected = completion if side == 0 else completion[1:]
            np.testing.assert_array_equal(flat["labels"][trained], expected)
        assert flat["tokens"][batch["extra_index"][p]] == pair.prompt[-1]
        assert batch["extra_label"][p] == pair.rejected[0]


def test_buckets_give_a_few_static_shapes():
    assert data.resolve_buckets("", 100) == (100,)
    assert data.resolve_buckets("auto", 100) == (32, 56, 80, 100)
    assert data.resolve_buckets("16,64,512", 100) == (16, 64, 100)
    pairs = [make_pair(2, 2, 2, s) for s in range(8)] + [make_pair(20, 20, 20, s) for s in range(8)]
    stream = data.PairIterator(
        pairs,
        batch_size=4,
        accumulation_steps=2,
        row_length=64,
        pad_id=0,
        seed=0,
        buckets=(8, 32, 64),
        shuffle=False,
    )
    shapes = [next(stream)["tokens"].shape for _ in range(4)]
    assert shapes == [(2, 4, 8)] * 2 + [(2, 4, 64)] * 2
    report = stream.efficiency(0)
    assert report["steps_by_row_length"] == {"8": 2, "64": 2}
    assert 0 < report["padding_efficiency"] < 1
    batches = list(
        data.eval_batches(pairs, batch_size=4, row_length=64, pad_id=0, buckets=(8, 32, 64))
    )
    assert [b["tokens"].shape[1] for b in batches] == [8, 8, 64, 64]


def assert_same_batches(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


LAYOUTS = {
    "padded": dict(packing=False),
    "packed": dict(packing=True),
    "shared": dict(packing=True, prefix_sharing=True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_restored_iterator_yields_exactly_the_remaining_sequence(layout):
    pairs = random_pairs(40, 32)
    kwargs = dict(batch_size=8, accumulation_steps=2, row_length=32, pad_id=0, seed=3)
    kwargs |= LAYOUTS[layout]
    stream = data.PairIterator(pairs, **kwargs)
    steps = stream.steps_per_epoch
    batches = [next(stream) for _ in range(2 * steps + 1)]  # crosses two epoch boundaries
    assert len({b["tokens"].shape for b in batches}) == 1
    for stop in (1, steps, steps + 1):
        fresh = data.PairIterator(pairs, **kwargs)
        for _ in range(stop):
            next(fresh)
        resumed = data.PairIterator(pairs, **kwargs)
        resumed.restore(fresh.state())
        for expected in batches[stop:]:
            assert_same_batches(next(resumed), expected)
    other_seed = data.PairIterator(pairs, **(kwargs | {"seed": 4}))
    assert not np.array_equal(next(other_seed)["tokens"], batches[0]["tokens"])
    changed = data.PairIterator(pairs[:-1], **kwargs)
    with pytest.raises(data.DataError, match="other training data"):
        changed.restore(stream.state())


def test_packed_steps_keep_pairs_whole_and_cover_the_epoch():
    pairs = random_pairs(200, 64, seed=1)
    stream = data.PairIterator(
        pairs, batch_size=8, accumulation_steps=2, row_length=64, pad_id=0, seed=0, packing=True
    )
    assert stream.rows < 8  # fewer rows than padding's 2 × 4
    seen = []
    for index in range(stream.steps_per_epoch):
        batch = stream.build_step(0, index)
        assert batch["tokens"].shape == (2, stream.rows, 64) and batch["pair_mask"].shape == (2, 4)
        for a, micro in enumerate(stream.step_pairs(0, index)):
            seen += micro
            for p, i in enumerate(micro):  # both sides of pair p are in this micro-batch
                for side, completion in enumerate((pairs[i].chosen, pairs[i].rejected)):
                    where = batch["sequence_ids"][a] == 2 * p + side
                    np.testing.assert_array_equal(
                        batch["labels"][a][where & batch["loss_mask"][a]], completion
                    )
            assert batch["pair_mask"][a].sum() == len(micro)
    assert sorted(seen) == list(range(200))  # every pair exactly once per epoch


def truncated_realistic_pairs(n, seed=0, max_seq_length=1024, max_prompt_length=512):
    """Public-set lengths, truncated as the data pipeline would (data.bench's mix)."""
    pairs = []
    for i, (p, c, r) in enumerate(realistic_lengths(n, seed=seed)):
        p = min(p, max_prompt_length)
        room = max_seq_length - p
        pairs.append(
            data.TokenizedPair(
                np.zeros(p, np.int32),
                np.zeros(min(c, room), np.int32),
                np.zeros(min(r, room), np.int32),
                str(i),
            )
        )
    return pairs


@pytest.mark.parametrize("accumulation", [1, 2])
def test_packed_steps_hold_batch_size_pairs_like_padded_ones(accumulation):
    """Packed and padded streams of the same data and batch size: the same steps per epoch
    (packed adds at most the steps that drain the pairs passed on at the end), the same pairs
    per step (max equal, mean within 2%), every pair of the epoch's full batches once, and
    each in about the step padding gives it (the steps' deficits add up to a step's lag by
    the end of this epoch; the look-ahead takes pairs at most LOOK_AHEAD batches early)."""
    pairs = truncated_realistic_pairs(3000)
    sequence_lengths = [n for pair in pairs for n in pair.lengths]
    assert 300 < np.median(sequence_lengths) < 600 and max(sequence_lengths) == 1024
    kwargs = dict(batch_size=32, accumulation_steps=accumulation, row_length=1024, pad_id=0)
    padded = data.PairIterator(pairs, seed=0, **kwargs)
    packed = data.PairIterator(pairs, seed=0, packing=True, **kwargs)
    a, b = padded.efficiency(0), packed.efficiency(0)
    assert a["steps_per_epoch"] == 3000 // 32
    assert a["steps_per_epoch"] <= b["steps_per_epoch"] <= a["steps_per_epoch"] + 3
    assert b["pairs_per_step"]["max"] == a["pairs_per_step"]["max"] == 32
    assert b["pairs_per_step"]["mean"] >= 0.98 * 32
    assert b["packing_efficiency"] >= 0.85 and b["packing_efficiency"] > a["padding_efficiency"]
    assert b["rows_per_micro_batch"] < a["rows_per_micro_batch"]
    assert b["tokens_per_step"]["real"] == pytest.approx(a["tokens_per_step"]["real"], rel=0.02)
    steps = [packed.step_pairs(0, k) for k in range(b["steps_per_epoch"])]
    placed = [i for step in steps for micro in step for i in micro]
    order = padded.epoch_order(0)[: 3000 // 32 * 32]
    assert sorted(placed) == sorted(order.tolist())  # each pair once; the rest waits
    packed_step = {i: k for k, step in enumerate(steps) for micro in step for i in micro}
    lag = np.array([packed_step[i] - k // 32 for k, i in enumerate(order)])
    assert lag.min() >= -LOOK_AHEAD and lag.max() <= 2 and np.mean(lag == 0) > 0.6


def test_a_pair_that_does_not_fit_waits_for_the_next_step():
    """Rows too few for some steps: no step holds more than batch_size pairs and every pair
    of the epoch is trained once; with ample rows each step is the padded step's pairs."""
    pairs = random_pairs(96, 64, seed=4)
    kwargs = dict(batch_size=8, accumulation_steps=1, row_length=64, pad_id=0, seed=0)
    tight = data.PairIterator(pairs, packing=True, packed_rows=9, **kwargs)
    ample = data.PairIterator(pairs, packing=True, packed_rows=16, **kwargs)
    padded = data.PairIterator(pairs, **kwargs)
    assert ample.steps_per_epoch == padded.steps_per_epoch == 12
    for k in range(12):
        assert sorted(ample.step_pairs(0, k)[0]) == sorted(padded.step_pairs(0, k)[0])
    steps = [tight.step_pairs(0, k)[0] for k in range(tight.steps_per_epoch)]
    assert max(len(s) for s in steps) == 8 and min(len(s) for s in steps[:-1]) < 8
    assert sorted(i for s in steps for i in s) == list(range(96))


def test_pairs_passed_on_are_packed_before_the_rest():
    """The waiting group goes first even when longer fresh pairs would take its room."""
    chosen = rejected = np.array([10, 30, 30, 30])  # pair 0 waits; pairs 1-3 are fresh
    kwargs = dict(micro_batches=1, rows=2, row_length=64, pair_slots=8)
    (plan,), left = data.batching.pack_step([0, 1, 2, 3], chosen, rejected, **kwargs)
    assert 0 in left  # longest first: two long pairs fill both rows
    (plan,), left = data.batching.pack_step([0, 1, 2, 3], chosen, rejected, **kwargs, splits=(1,))
    assert [entry[0] for entry in plan][0] == 0 and 0 not in left


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_rows_concatenate_to_the_global_batch(layout, process_count):
    pairs = random_pairs(40, 32, seed=2)
    kwargs = dict(batch_size=8, accumulation_steps=2, row_length=32, pad_id=0, seed=0)
    kwargs |= LAYOUTS[layout]
    whole = data.PairIterator(pairs, **kwargs, row_multiple=process_count)  # the same rows
    parts = [
        data.PairIterator(pairs, **kwargs, process_index=k, process_count=process_count)
        for k in range(process_count)
    ]
    for _ in range(3):
        expected = next(whole)
        local = [next(p) for p in parts]
        for key in expected:
            if expected[key].ndim == 2:  # pair-level [A, P] arrays are whole on every process
                for batch in local:
                    np.testing.assert_array_equal(batch[key], expected[key])
            else:
                assert local[0][key].shape[1] == expected[key].shape[1] // process_count
                np.testing.assert_array_equal(
                    np.concatenate([b[key] for b in local], 1), expected[key], err_msg=key
                )
    evals = [
        list(
            data.eval_batches(
                pairs[:5], batch_size=4, row_length=32, pad_id=0, process_index=k, process_count=2
            )
        )
        for k in range(2)
    ]
    for full, first, second in zip(
        data.eval_batches(pairs[:5], batch_size=4, row_length=32, pad_id=0), *evals, strict=True
    ):
        np.testing.assert_array_equal(
            np.concatenate([first["tokens"], second["tokens"]]), full["tokens"]
        )


def test_weighted_mixture_is_deterministic_and_upsamples():
    big = [make_pair(2, 2, 2, s) for s in range(30)]
    small = [make_pair(3, 3, 3, 1000 + s) for s in range(6)]
    kwargs = dict(
        batch_size=4,
        accumulation_steps=1,
        row_length=16,
        pad_id=0,
        seed=0,
        sources=[(30, 1.0), (6, 1.0)],
    )
    stream = data.PairIterator(big + small, **kwargs)
    assert stream.quotas == [18, 18] and stream.steps_per_epoch == 9
    for epoch in range(2):
        order = stream.epoch_order(epoch)
        assert len(order) == 36 and (order >= 30).sum() == 18  # each small pair 3 times
        assert np.bincount(order[order >= 30] - 30).tolist() == [3] * 6
        assert len(set(order[order < 30].tolist())) == 18  # big source sampled, no repeats
        np.testing.assert_array_equal(
            order, data.PairIterator(big + small, **kwargs).epoch_order(epoch)
        )
    assert not np.array_equal(stream.epoch_order(0), stream.epoch_order(1))
    with pytest.raises(data.DataError, match="train_weights"):
        data.PairIterator(big + small, **(kwargs | {"sources": [(30, 0.0), (6, 0.0)]}))


def test_packing_respects_max_segments_per_row():
    """cuDNN's packed layout relies on the bound: no row ever holds more sequences."""
    pairs = random_pairs(120, 64, seed=5)
    kwargs = dict(batch_size=12, accumulation_steps=1, row_length=64, pad_id=0, seed=0)
    free = data.PairIterator(pairs, packing=True, **kwargs)
    bounded = data.PairIterator(pairs, packing=True, max_segments_per_row=2, **kwargs)
    assert max(next(free)["segment_ids"].max() for _ in range(3)) > 2  # short pairs pile up
    seen = []
    for index in range(bounded.steps_per_epoch):
        assert bounded.build_step(0, index)["segment_ids"].max() <= 2
        seen += [i for micro in bounded.step_pairs(0, index) for i in micro]
    assert sorted(seen) == list(range(120))  # still every pair once
    assert bounded.fingerprint() != free.fingerprint()
