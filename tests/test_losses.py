"""dpo_jax.losses against float64 NumPy re-implementations written from the papers / TRL."""

import functools
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.losses import (
    LOSSES,
    PairLogps,
    chunked_token_logps,
    chunked_token_stats,
    desensitized_logps,
    masked_mean,
    preference_loss,
    sequence_logps,
    token_logps,
    wpo_weights,
)

LN2 = math.log(2.0)
BETA = 0.1
SMOOTHED = {"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo"}


def test_the_losses_package_imports_nothing_but_jax():
    """Researchers import dpo_jax.losses into their own code: it must not pull in our model,
    settings or I/O, nor Flax, Orbax or transformers (a fresh interpreter shows what it loads)."""
    code = "import sys, dpo_jax.losses; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    ours = {m for m in loaded.stdout.split() if m.split(".")[0] == "dpo_jax"}
    assert ours == {
        "dpo_jax",
        "dpo_jax.losses",
        "dpo_jax.losses.combined",
        "dpo_jax.losses.logps",
        "dpo_jax.losses.pairs",
    }
    heavy = {"flax", "optax", "orbax", "transformers", "ml_collections", "torch", "datasets"}
    assert not heavy & {m.split(".")[0] for m in loaded.stdout.split()}


# float64 NumPy references ------------------------------------------------------------------


def _logsig(x):
    return -np.logaddexp(0.0, -x)


def _sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def _sorted_rank_gap(a, b, valid):
    """sort(a) - sort(b) over valid entries, k-th gap at the k-th valid slot."""
    out = np.zeros_like(a)
    out[valid] = np.sort(a[valid]) - np.sort(b[valid])
    return out


def np_loss(
    name,
    inp,
    *,
    beta=BETA,
    eps=0.0,
    avg=False,
    ref_free=False,
    sft_avg=True,
    tau=0.05,
    gamma=0.5,
    delta=None,
    valid=None,
):
    """Per-pair loss of `name` from the formulas, in float64."""
    pw, pl, rw, rl, lw, ll = (np.asarray(x, np.float64) for x in inp)
    valid = np.ones(pw.shape, bool) if valid is None else np.asarray(valid, bool)
    if name == "sft":
        return -pw / np.maximum(lw, 1) if sft_avg else -pw
    if avg or name in ("ipo", "simpo", "orpo", "sigmoid_norm"):
        nw, nl = np.maximum(lw, 1), np.maximum(ll, 1)
        pw, pl, rw, rl = pw / nw, pl / nl, rw / nw, rl / nl
    if ref_free or name in ("simpo", "orpo"):
        rw, rl = 0 * rw, 0 * rl
    a, b = pw - rw, pl - rl  # chosen / rejected log-ratios
    z = a - b
    x = beta * z
    if name == "sigmoid":
        return -(1 - eps) * _logsig(x) - eps * _logsig(-x)
    if name == "robust":
        return (-(1 - eps) * _logsig(x) + eps * _logsig(-x)) / (1 - 2 * eps)
    if name == "hinge":
        return np.maximum(0.0, 1 - x)
    if name == "ipo":
        return (z - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        e = eps or 1e-3
        return _sig(x) * (_logsig(x) - np.log(1 - e)) + _sig(-x) * (_logsig(-x) - np.log(e))
    if name == "nca_pair":
        return -_logsig(beta * a) - 0.5 * _logsig(-beta * a) - 0.5 * _logsig(-beta * b)
    if name == "bco_pair":  # TRL 1.16: no running mean, delta = 0 unless given
        delta = 0.0 if delta is None else delta
        return -_logsig(beta * a - delta) - _logsig(-(beta * b - delta))
    if name == "sppo_hard":
        return (a - 0.5 / beta) ** 2 + (b + 0.5 / beta) ** 2
    if name in ("aot", "aot_unpaired"):
        d = (
            _sorted_rank_gap(pw - pl, rw - rl, valid)
            if name == "aot"
            else _sorted_rank_gap(a, b, valid)
        )
        return np.where(valid, -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d), 0.0)
    if name == "apo_zero":
        return 1 - _sig(beta * a) + _sig(beta * b)
    if name == "apo_down":
        return _sig(beta * a) + 1 - _sig(beta * (a - b))
    if name == "discopop":
        m = _sig(x / tau)
        return -(1 - m) * _logsig(x) + m * np.exp(-x)
    if name == "sigmoid_norm":
        return -_logsig(x)
    if name == "simpo":
        s = beta * (pw - pl) - gamma
        return -(1 - eps) * _logsig(s) - eps * _logsig(-s)
    if name == "orpo":
        log_odds = (pw - pl) - (np.log(1 - np.exp(pw)) - np.log(1 - np.exp(pl)))
        return -beta * _logsig(log_odds) - pw
    raise KeyError(name)


def make_inputs(seed, batch=8):
    """float32-representable pair log-probs (so both sides see identical inputs)."""
    rng = np.random.default_rng(seed)
    lw = rng.integers(3, 40, batch).astype(np.float64)
    ll = rng.integers(3, 40, batch).astype(np.float64)
    pw = -rng.uniform(0.2, 2.5, batch) * lw
    pl = -rng.uniform(0.2, 2.5, batch) * ll
    rw = pw + rng.normal(0, 2.0, batch)
    rl = pl + rng.normal(0, 2.0, batch)
    return tuple(x.astype(np.float32) for x in (pw, pl, rw, rl, lw, ll))


def as_pairs(inp):
    return PairLogps(*(jnp.asarray(x) for x in inp))


def hparams_for(name):
    return {"label_smoothing": 0.1} if name in SMOOTHED else {}


# Every loss: value and gradient ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_numpy(name):
    inp = make_inputs(0)
    kw = hparams_for(name)
    loss_B, _ = preference_loss(name, as_pairs(inp), beta=BETA, **kw)
    want = np_loss(name, inp, eps=kw.get("label_smoothing", 0.0))
    assert loss_B.shape == (8,) and loss_B.dtype == jnp.float32
    np.testing.assert_allclose(loss_B, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_numpy_averaged_reference_free(name):
    inp = make_inputs(1)
    loss_B, _ = preference_loss(
        name, as_pairs(inp), beta=0.5, preference_average_log_probs=True, reference_free=True
    )
    np.testing.assert_allclose(
        loss_B, np_loss(name, inp, beta=0.5, avg=True, ref_free=True), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_matches_finite_difference(name):
    """jax.grad of sum(loss) wrt policy log-probs vs a float64 central difference of NumPy."""
    inp = make_inputs(2)
    kw = hparams_for(name)
    eps = kw.get("label_smoothing", 0.0)

    def total(pw_B, pl_B):
        lp = as_pairs(inp)._replace(policy_chosen=pw_B, policy_rejected=pl_B)
        return preference_loss(name, lp, beta=BETA, **kw)[0].sum()

    grad_w, grad_l = jax.grad(total, argnums=(0, 1))(jnp.asarray(inp[0]), jnp.asarray(inp[1]))

    def np_total(which, i, h):
        x = [a.astype(np.float64) for a in inp]
        x[which] = x[which].copy()
        x[which][i] += h
        return np_loss(name, x, eps=eps).sum()

    h = 1e-4
    for which, grad in ((0, grad_w), (1, grad_l)):
        fd = [(np_total(which, i, h) - np_total(which, i, -h)) / (2 * h) for i in range(8)]
        np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-5, err_msg=f"{name} arg{which}")


def test_loss_functions_take_prepared_logps_directly():
    inp = make_inputs(3)
    lp = as_pairs(inp)
    np.testing.assert_allclose(
        LOSSES["ipo"](lp.averaged(), beta=BETA, unused_hparam=1.0),
        np_loss("ipo", inp),
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        LOSSES["sigmoid"](lp.without_reference(), beta=BETA),
        np_loss("sigmoid", inp, ref_free=True),
        rtol=1e-5,
        atol=1e-6,
    )


# Limits and identities -------------------------------------------------------------------


def test_sigmoid_beta_to_zero_gives_ln2():
    loss_B, _ = preference_loss("sigmoid", as_pairs(make_inputs(4)), beta=1e-9)
    np.testing.assert_allclose(loss_B, LN2, rtol=1e-6)


def test_label_smoothing_zero_is_plain_dpo_and_half_is_even_in_margin():
    inp = make_inputs(5)
    plain, _ = preference_loss("sigmoid", as_pairs(inp), beta=BETA)
    smoothed0, _ = preference_loss("sigmoid", as_pairs(inp), beta=BETA, label_smoothing=0.0)
    robust0, _ = preference_loss("robust", as_pairs(inp), beta=BETA, label_smoothing=0.0)
    z = (inp[0] - inp[1]) - (inp[2] - inp[3])
    np.testing.assert_allclose(plain, -_logsig(BETA * z.astype(np.float64)), rtol=1e-6)
    np.testing.assert_array_equal(plain, smoothed0)
    np.testing.assert_allclose(robust0, plain, rtol=1e-6)
    # e = 1/2: labels are coin flips, so the loss cannot tell chosen from rejected (even in z),
    # is smallest (ln 2) at z = 0 and has zero gradient there.
    pw, pl, rw, rl, lw, ll = inp
    half, _ = preference_loss("sigmoid", as_pairs(inp), beta=BETA, label_smoothing=0.5)
    swapped, _ = preference_loss(
        "sigmoid", as_pairs((pl, pw, rl, rw, ll, lw)), beta=BETA, label_smoothing=0.5
    )
    np.testing.assert_allclose(half, swapped, rtol=1e-6)
    assert np.all(np.asarray(half) >= LN2 - 1e-6)
    grad_fn = jax.grad(
        lambda p: preference_loss(
            "sigmoid", as_pairs(inp)._replace(policy_chosen=p), beta=BETA, label_smoothing=0.5
        )[0].sum()
    )
    balanced = jnp.asarray(pl + rw - rl)  # z = 0
    np.testing.assert_allclose(grad_fn(balanced), 0.0, atol=1e-7)


def test_exo_zero_smoothing_means_1e_3():
    lp = as_pairs(make_inputs(6))
    a, _ = preference_loss("exo_pair", lp, beta=BETA)
    b, _ = preference_loss("exo_pair", lp, beta=BETA, label_smoothing=1e-3)
    np.testing.assert_array_equal(a, b)


def test_single_pair_aot_is_dpo_and_ipo_vanishes_at_its_target():
    inp = make_inputs(7, batch=1)
    dpo, _ = preference_loss("sigmoid", as_pairs(inp), beta=BETA)
    for name in ("aot", "aot_unpaired"):
        np.testing.assert_allclose(preference_loss(name, as_pairs(inp), beta=BETA)[0], dpo, 1e-6)
    # averaged margin = 1 / (2 beta) exactly
    lp = as_pairs(([0.5 / BETA], [0.0], [0.0], [0.0], [1.0], [1.0]))
    np.testing.assert_allclose(preference_loss("ipo", lp, beta=BETA)[0], 0.0, atol=1e-10)


def test_named_variants_agree():
    lp = as_pairs(make_inputs(8))
    norm, _ = preference_loss("sigmoid_norm", lp, beta=BETA)
    avg, _ = preference_loss("sigmoid", lp, beta=BETA, preference_average_log_probs=True)
    np.testing.assert_allclose(norm, avg, rtol=1e-6)
    simpo, _ = preference_loss("simpo", lp, beta=BETA, simpo_gamma=0.0)
    ref_free, _ = preference_loss("sigmoid_norm", lp, beta=BETA, reference_free=True)
    np.testing.assert_allclose(simpo, ref_free, rtol=1e-6)
    zero_ref = lp._replace(
        reference_chosen=0 * lp.reference_chosen, reference_rejected=0 * lp.reference_rejected
    )
    for name in ("sigmoid", "nca_pair", "apo_down"):
        a, _ = preference_loss(name, lp, beta=BETA, reference_free=True)
        b, _ = preference_loss(name, zero_ref, beta=BETA)
        np.testing.assert_array_equal(a, b)


def test_orpo_and_discopop_stay_finite_at_extremes():
    avg_B = np.array([-1e-9, -1e-4, -0.6, -0.75, -50.0], np.float32)
    ones = np.ones(5, np.float32)
    lp = as_pairs((avg_B, avg_B[::-1].copy(), 0 * ones, 0 * ones, ones, ones))
    loss, grad = jax.value_and_grad(
        lambda p: preference_loss("orpo", lp._replace(policy_chosen=p), beta=BETA)[0].sum()
    )(lp.policy_chosen)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    want = np_loss("orpo", [np.asarray(x, np.float64) for x in lp], beta=BETA).sum()
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    certain = lp._replace(policy_chosen=0 * lp.policy_chosen)  # average logp exactly 0
    loss, grad = jax.value_and_grad(
        lambda p: preference_loss("orpo", certain._replace(policy_chosen=p), beta=BETA)[0].sum()
    )(certain.policy_chosen)
    assert np.isfinite(loss) and np.all(np.isfinite(grad))
    far = as_pairs(([-900.0, 0.0], [0.0, -900.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]))
    loss_B, _ = preference_loss("discopop", far, beta=1.0)
    assert np.all(np.isfinite(loss_B))
    np.testing.assert_allclose(loss_B[1], 0.0, atol=1e-6)


# Combination, metrics, masks ---------------------------------------------------------------


def test_combined_sigmoid_and_sft_and_metrics():
    inp = make_inputs(9)
    pw, pl, rw, rl, lw, ll = (x.astype(np.float64) for x in inp)
    loss_B, m = preference_loss(
        ["sigmoid", "sft"], as_pairs(inp), beta=BETA, loss_weights=[1.0, 0.2]
    )
    dpo = np_loss("sigmoid", inp)
    sft = -pw / lw
    np.testing.assert_allclose(loss_B, dpo + 0.2 * sft, rtol=1e-5)
    np.testing.assert_allclose(m["preference_loss"], dpo, rtol=1e-5)
    np.testing.assert_allclose(m["sft_loss"], sft, rtol=1e-5)
    np.testing.assert_allclose(m["rewards/chosen"], BETA * (pw - rw), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/rejected"], BETA * (pl - rl), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        m["rewards/margins"], BETA * ((pw - rw) - (pl - rl)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(m["rewards/accuracies"], ((pw - rw) > (pl - rl)).astype(float))
    np.testing.assert_array_equal(m["logps/chosen"], inp[0])
    np.testing.assert_array_equal(m["logps/rejected"], inp[1])
    assert all(v.shape == (8,) and v.dtype == jnp.float32 for v in m.values())


def test_nemo_style_weights_and_averaged_rewards():
    inp = make_inputs(10)
    pw, pl, rw, rl, lw, ll = (x.astype(np.float64) for x in inp)
    loss_B, m = preference_loss(
        "ipo",
        as_pairs(inp),
        beta=BETA,
        preference_loss_weight=0.5,
        sft_loss_weight=0.3,
        sft_average_log_probs=False,
    )
    np.testing.assert_allclose(loss_B, 0.5 * np_loss("ipo", inp) - 0.3 * pw, rtol=1e-5)
    np.testing.assert_allclose(m["sft_loss"], -pw, rtol=1e-6)
    # ipo sees averaged log-probs, its rewards are TRL's (summed log-ratios), logps/* summed.
    np.testing.assert_allclose(m["rewards/chosen"], BETA * (pw - rw), rtol=1e-5, atol=1e-7)
    _, m_avg = preference_loss("ipo", as_pairs(inp), beta=BETA, preference_average_log_probs=True)
    np.testing.assert_allclose(m_avg["rewards/chosen"], BETA * (pw - rw) / lw, rtol=1e-5)
    np.testing.assert_array_equal(m["logps/chosen"], inp[0])
    for name in ("simpo", "orpo"):  # reference-free: rewards are beta * average policy logp
        _, m = preference_loss(name, as_pairs(inp), beta=BETA)
        np.testing.assert_allclose(m["rewards/rejected"], BETA * pl / ll, rtol=1e-5)


def test_pair_mask_zeroes_invalid_pairs_and_metrics():
    inp = make_inputs(11)
    mask = np.array([1, 1, 0, 1, 0, 1, 1, 1], bool)
    loss_B, m = preference_loss("sigmoid", as_pairs(inp), beta=BETA, pair_mask=jnp.asarray(mask))
    np.testing.assert_allclose(loss_B, np.where(mask, np_loss("sigmoid", inp), 0), rtol=1e-5)
    for v in m.values():
        assert np.all(np.asarray(v)[~mask] == 0)
    np.testing.assert_allclose(
        masked_mean(loss_B, jnp.asarray(mask)), np_loss("sigmoid", inp)[mask].mean(), rtol=1e-5
    )
    assert masked_mean(jnp.ones(3), jnp.zeros(3)) == 0.0


@pytest.mark.parametrize("name", ["aot", "aot_unpaired", "bco_pair"])
def test_batch_losses_ignore_invalid_pairs(name):
    """Garbage in masked pairs changes neither the sort/delta nor the valid pairs' gradients."""
    inp = make_inputs(12)
    mask = np.array([0, 1, 1, 0, 1, 1, 0, 1], bool)
    garbage = [x.copy() for x in inp]
    for x, v in zip(garbage[:4], (1e30, -1e30, -1e30, 1e30), strict=True):
        x[~mask] = v
    valid_only = [x[mask] for x in inp]

    def total(p, pairs, pmask):
        lp = as_pairs(pairs)._replace(policy_chosen=p)
        return preference_loss(name, lp, beta=BETA, pair_mask=pmask)[0].sum()

    full, grad = jax.value_and_grad(total)(jnp.asarray(garbage[0]), garbage, jnp.asarray(mask))
    sub, sub_grad = jax.value_and_grad(total)(jnp.asarray(valid_only[0]), valid_only, None)
    np.testing.assert_allclose(full, sub, rtol=1e-6)
    np.testing.assert_allclose(full, np_loss(name, inp, valid=mask)[mask].sum(), rtol=1e-5)
    np.testing.assert_allclose(grad[mask], sub_grad, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(grad[~mask], 0.0)


def test_bco_pair_is_trls_and_per_pair():
    """TRL 1.16's bco_pair (no delta), a fixed delta when given, and no batch statistic:
    a pair's loss is the same alone as in any batch (accumulation changes nothing)."""
    inp = make_inputs(13)
    loss_B, _ = preference_loss("bco_pair", as_pairs(inp), beta=BETA)
    pw, pl, rw, rl = (x.astype(np.float64) for x in inp[:4])
    trl = -_logsig(BETA * (pw - rw)) - _logsig(-BETA * (pl - rl))
    np.testing.assert_allclose(loss_B, trl, rtol=1e-5)
    loss_B, _ = preference_loss("bco_pair", as_pairs(inp), beta=BETA, bco_delta=0.3)
    np.testing.assert_allclose(loss_B, np_loss("bco_pair", inp, delta=0.3), rtol=1e-5)
    halves = [preference_loss("bco_pair", as_pairs([x[k::2] for x in inp]), beta=BETA)[0]
              for k in (0, 1)]  # fmt: skip
    np.testing.assert_allclose(np.stack(halves, 1).reshape(-1), trl, rtol=1e-5)


def test_discopop_tau():
    inp = make_inputs(14)
    loss_B, _ = preference_loss("discopop", as_pairs(inp), beta=0.5, discopop_tau=0.5)
    np.testing.assert_allclose(loss_B, np_loss("discopop", inp, beta=0.5, tau=0.5), rtol=1e-5)


def test_errors():
    lp = as_pairs(make_inputs(15))
    with pytest.raises(ValueError, match="sigmoid"):
        preference_loss("dpo", lp, beta=BETA)
    with pytest.raises(ValueError, match="loss_weights"):
        preference_loss(["sigmoid", "sft"], lp, beta=BETA, loss_weights=[1.0])
    with pytest.raises(ValueError, match="discopop_tua"):
        preference_loss("discopop", lp, beta=BETA, discopop_tua=0.1)
    with pytest.raises(ValueError, match="robust"):
        preference_loss("robust", lp, beta=BETA, label_smoothing=0.5)


def test_jit_with_static_loss_config():
    inp = make_inputs(16)
    fn = functools.partial(preference_loss, ["sigmoid", "sft"], beta=BETA, loss_weights=[1.0, 0.2])
    eager, m_eager = fn(as_pairs(inp), pair_mask=jnp.ones(8, bool))
    jitted, m_jit = jax.jit(fn)(as_pairs(inp), pair_mask=jnp.ones(8, bool))
    np.testing.assert_allclose(jitted, eager, rtol=1e-6)
    np.testing.assert_allclose(m_jit["rewards/margins"], m_eager["rewards/margins"], rtol=1e-6)


# Token and sequence log-probs ----------------------------------------------------------


def np_token_logps(logits, labels):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    lse = np.log(np.exp(shifted).sum(-1))
    return np.take_along_axis(shifted, labels[..., None], -1)[..., 0] - lse


def test_token_logps_matches_numpy_and_upcasts_bf16():
    rng = np.random.default_rng(20)
    logits = (rng.normal(size=(3, 5, 11)) * 4).astype(np.float32)
    labels = rng.integers(0, 11, (3, 5))
    got = token_logps(jnp.asarray(logits), jnp.asarray(labels))
    assert got.dtype == jnp.float32 and got.shape == (3, 5)
    np.testing.assert_allclose(got, np_token_logps(logits, labels), rtol=1e-5, atol=1e-5)
    as_bf16 = jnp.asarray(logits, jnp.bfloat16)
    got16 = token_logps(as_bf16, jnp.asarray(labels))
    assert got16.dtype == jnp.float32
    np.testing.assert_allclose(
        got16, np_token_logps(np.asarray(as_bf16, np.float32), labels), rtol=1e-5, atol=1e-5
    )


def _full_logps(hidden, unembed, labels, softcap):
    logits = jnp.dot(
        hidden.astype(jnp.float32), unembed.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return token_logps(logits, labels), logits.mean(-1)


def _chunk_problem(seed, n=13, d=8, v=37):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    unembed = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, v, n))
    weights = (
        jnp.asarray(rng.normal(size=n), jnp.float32),
        jnp.asarray(rng.normal(size=n), jnp.float32),
    )
    return hidden, unembed, labels, weights


@pytest.mark.parametrize(
    "chunk_size,softcap", [(8, None), (8, 3.0), (5, 2.0), (37, None), (64, 3.0), (1, None)]
)
def test_chunked_matches_full_values_and_grads(chunk_size, softcap):
    hidden, unembed, labels, (wa, wb) = _chunk_problem(21)
    chunked = functools.partial(chunked_token_logps, chunk_size=chunk_size, logit_softcap=softcap)
    full = functools.partial(_full_logps, softcap=softcap)

    def objective(fn, h, u):
        logps, mean = fn(h, u, labels)
        return jnp.sum(wa * logps + wb * mean)

    got, want = chunked(hidden, unembed, labels), full(hidden, unembed, labels)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    grads = jax.grad(functools.partial(objective, chunked), argnums=(0, 1))(hidden, unembed)
    ref = jax.grad(functools.partial(objective, full), argnums=(0, 1))(hidden, unembed)
    for g, w in zip(grads, ref, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    jit_grads = jax.jit(jax.grad(functools.partial(objective, chunked), argnums=(0, 1)))(
        hidden, unembed
    )
    for g, w in zip(jit_grads, ref, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_chunked_matches_numpy_float64():
    hidden, unembed, labels, _ = _chunk_problem(22, v=29)
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
    logps, mean = jax.jit(functools.partial(chunked_token_logps, chunk_size=8))(
        hidden, unembed, labels
    )
    np.testing.assert_allclose(
        logps, np_token_logps(logits, np.asarray(labels)), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(mean, logits.mean(-1), rtol=1e-5, atol=1e-5)


def test_chunked_bf16_returns_input_dtype_grads():
    hidden, unembed, labels, (wa, wb) = _chunk_problem(23)
    hidden16, unembed16 = hidden.astype(jnp.bfloat16), unembed.astype(jnp.bfloat16)

    def objective(fn, h, u):
        logps, mean = fn(h, u, labels)
        return jnp.sum(wa * logps + wb * mean)

    chunked = functools.partial(chunked_token_logps, chunk_size=8)
    logps, mean = chunked(hidden16, unembed16, labels)
    assert logps.dtype == mean.dtype == jnp.float32
    want = _full_logps(hidden16, unembed16, labels, None)
    np.testing.assert_allclose(logps, want[0], rtol=1e-4, atol=1e-4)
    dh, du = jax.grad(functools.partial(objective, chunked), argnums=(0, 1))(hidden16, unembed16)
    assert dh.dtype == du.dtype == jnp.bfloat16
    rh, ru = jax.grad(functools.partial(objective, _full_logps_nocap), argnums=(0, 1))(
        hidden, unembed
    )
    np.testing.assert_allclose(np.asarray(dh, np.float32), rh, rtol=0.05, atol=0.05)
    np.testing.assert_allclose(np.asarray(du, np.float32), ru, rtol=0.05, atol=0.05)


def _full_logps_nocap(hidden, unembed, labels):
    return _full_logps(hidden, unembed, labels, None)


def test_sequence_logps_padded_equals_packed():
    rng = np.random.default_rng(30)
    lengths = [5, 3, 7, 2, 4, 6]  # tokens per sequence (prompt + completion)
    prompts = [2, 1, 3, 0, 1, 2]  # leading tokens outside the loss
    seqs = [rng.normal(size=n).astype(np.float32) - 2 for n in lengths]

    def layout(rows_of_seq_ids, width):
        logps = np.full((len(rows_of_seq_ids), width), -np.inf, np.float32)  # padding garbage
        mask = np.zeros_like(logps, bool)
        ids = np.zeros_like(logps, np.int32)
        for r, seq_ids in enumerate(rows_of_seq_ids):
            t = 0
            for s in seq_ids:
                n = lengths[s]
                logps[r, t : t + n] = seqs[s]
                logps[r, t : t + prompts[s]] = -np.inf  # masked prompt tokens may be -inf too
                mask[r, t + prompts[s] : t + n] = True
                ids[r, t : t + n] = s
                t += n
        return jnp.asarray(logps), jnp.asarray(mask), jnp.asarray(ids)

    padded = sequence_logps(*layout([[s] for s in range(6)], 8), 6)
    packed = sequence_logps(*layout([[0, 2, 1], [3, 5, 4]], 16), 6)
    want_logps = [seqs[s][prompts[s] :].sum() for s in range(6)]
    want_lengths = [lengths[s] - prompts[s] for s in range(6)]
    for got_logps, got_lengths in (padded, packed):
        np.testing.assert_allclose(got_logps, want_logps, rtol=1e-6)
        np.testing.assert_array_equal(got_lengths, want_lengths)
    np.testing.assert_allclose(padded[0], packed[0], rtol=1e-6)
    # -inf on masked tokens: the gradient is exactly the mask, no NaN.
    logps, mask, ids = layout([[0, 2, 1], [3, 5, 4]], 16)
    grad = jax.grad(lambda x: sequence_logps(x, mask, ids, 6)[0].sum())(logps)
    np.testing.assert_array_equal(grad, np.asarray(mask, np.float32))

    pairs = PairLogps.from_sequences(padded[0], None, padded[1])
    np.testing.assert_array_equal(pairs.policy_chosen, padded[0][0::2])
    np.testing.assert_array_equal(pairs.rejected_lengths, padded[1][1::2])
    np.testing.assert_array_equal(pairs.reference_rejected, 0.0)


# f-divergences (f-DPO, TRL's f_divergence_type) ---------------------------------------------

F_SCORES = {
    "forward_kl": lambda a, alpha: 1 - np.exp(-a),
    "js_divergence": lambda a, alpha: np.log(2) + _logsig(a),
    "alpha_divergence": lambda a, alpha: (np.exp((alpha - 1) * a) - 1) / (alpha - 1),
}


@pytest.mark.parametrize("kind", sorted(F_SCORES))
@pytest.mark.parametrize("name", ["sigmoid", "ipo", "hinge"])
def test_f_divergence_losses_match_numpy(kind, name):
    """Each log-ratio through f' (TRL's formulas), then the loss: ipo averages the scores
    per token; the rewards stay beta times the log-ratios."""
    inp = make_inputs(20)
    pw, pl, rw, rl, lw, ll = (x.astype(np.float64) for x in inp)
    s_w, s_l = (F_SCORES[kind](a, 0.5) for a in (pw - rw, pl - rl))
    loss_B, m = preference_loss(
        name, as_pairs(inp), beta=BETA, f_divergence=kind, f_alpha_divergence_coef=0.5
    )
    if name == "sigmoid":
        want = -_logsig(BETA * (s_w - s_l))
    elif name == "hinge":
        want = np.maximum(0.0, 1 - BETA * (s_w - s_l))
    else:
        want = ((s_w / lw - s_l / ll) - 1 / (2 * BETA)) ** 2
    np.testing.assert_allclose(loss_B, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], BETA * (pw - rw), rtol=1e-5, atol=1e-6)


def test_f_divergence_limits_gradient_and_errors():
    inp = make_inputs(21)
    dpo = preference_loss("sigmoid", as_pairs(inp), beta=BETA)[0]
    for kind, alpha in (("reverse_kl", 0.5), ("alpha_divergence", 1.0)):  # both are DPO
        loss_B = preference_loss(
            "sigmoid", as_pairs(inp), beta=BETA, f_divergence=kind, f_alpha_divergence_coef=alpha
        )[0]
        # alpha = 1 subtracts the log-ratios in another order: an ulp of float32 apart.
        np.testing.assert_allclose(loss_B, dpo, rtol=2e-7 if kind != "reverse_kl" else 0)

    def total(p):
        lp = as_pairs(inp)._replace(policy_chosen=p)
        return preference_loss("sigmoid", lp, beta=BETA, f_divergence="js_divergence")[0].sum()

    pw, pl, rw, rl = (x.astype(np.float64) for x in inp[:4])
    s_l = np.log(2) + _logsig(pl - rl)
    # d/dpw of -log sig(b (log 2 + log sig(a_w) - s_l)) = -b sig(-x) sig(-a_w)
    x = BETA * (np.log(2) + _logsig(pw - rw) - s_l)
    want = -BETA * _sig(-x) * _sig(-(pw - rw))
    np.testing.assert_allclose(jax.grad(total)(jnp.asarray(inp[0])), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="not \\['nca_pair'\\]"):
        preference_loss("nca_pair", as_pairs(inp), beta=BETA, f_divergence="forward_kl")
    with pytest.raises(ValueError, match="unknown f_divergence"):
        preference_loss("sigmoid", as_pairs(inp), beta=BETA, f_divergence="kl")


# Token statistics (TRL's entropy and mean_token_accuracy, WPO) ------------------------------


@pytest.mark.parametrize("chunk_size,softcap", [(8, None), (5, 2.0), (29, None), (1, None)])
def test_chunked_token_stats_match_numpy_float64(chunk_size, softcap):
    """Entropy, top-1 and log sum p^2 of softmax(logits) from the chunked pass, whatever the
    chunking (the last chunk slides back and overlaps), against float64 NumPy."""
    hidden, unembed, labels, _ = _chunk_problem(24, v=29)
    logits = np.asarray(hidden, np.float64) @ np.asarray(unembed, np.float64)
    if softcap is not None:
        logits = softcap * np.tanh(logits / softcap)
    labels = np.asarray(labels).copy()
    labels[:3] = logits[:3].argmax(-1)  # some tokens the model gets right
    stats = jax.jit(
        functools.partial(chunked_token_stats, chunk_size=chunk_size, logit_softcap=softcap)
    )(hidden, unembed, jnp.asarray(labels))[2]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(stats.entropy, -(p * np.log(p)).sum(-1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.log_sum_sq_probs, np.log((p * p).sum(-1)), rtol=1e-5)
    np.testing.assert_array_equal(stats.top1, (logits.argmax(-1) == labels).astype(np.float32))
    assert stats.top1[:3].tolist() == [1.0, 1.0, 1.0]


def test_wpo_weights_scale_every_term_without_gradient():
    inp = make_inputs(25)
    pw, pl, rw, rl, lw, ll = (x.astype(np.float64) for x in inp)
    rng = np.random.default_rng(25)
    aligned_w, aligned_l = -rng.uniform(0.1, 2.0, 8) * lw, -rng.uniform(0.1, 2.0, 8) * ll
    weights = wpo_weights(*(jnp.asarray(x, jnp.float32) for x in (aligned_w, aligned_l, lw, ll)))
    np.testing.assert_allclose(weights, np.exp(aligned_w / lw + aligned_l / ll), rtol=1e-5)
    kw = dict(beta=BETA, sft_loss_weight=0.5)
    loss_B, m = preference_loss("sigmoid", as_pairs(inp), pair_weights=weights, **kw)
    want = (np_loss("sigmoid", inp) + 0.5 * np_loss("sft", inp)) * np.asarray(weights)
    np.testing.assert_allclose(loss_B, want, rtol=1e-5)
    np.testing.assert_allclose(m["preference_loss"], np_loss("sigmoid", inp) * weights, rtol=1e-5)

    def total(p, w):
        lp = as_pairs(inp)._replace(policy_chosen=p)
        return preference_loss("sigmoid", lp, beta=BETA, pair_weights=w)[0].sum()

    assert np.all(jax.grad(total, argnums=1)(jnp.asarray(inp[0]), weights) == 0)


# LD-DPO (TRL's ld_alpha) --------------------------------------------------------------------


def _np_desensitized(token_logps, loss_mask, sequence_ids, lengths, alpha, offsets=None):
    """Per sequence: tokens in completion order, the first min(len_w, len_l) at weight 1."""
    num = len(lengths)
    out = np.zeros(num)
    seen = np.zeros(num, int) if offsets is None else np.asarray(offsets, int).copy()
    flat = (token_logps.ravel(), loss_mask.ravel(), sequence_ids.ravel())
    for value, mask, s in zip(*flat, strict=True):
        if not mask:
            continue
        seen[s] += 1
        shared = min(lengths[s - s % 2], lengths[s - s % 2 + 1])
        out[s] += value * (1.0 if seen[s] <= shared else alpha)
    return out


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_offsets"])
def test_desensitized_logps_match_numpy(layout):
    """Padded rows (one sequence each) and packed rows (several, positions restart), and an
    offset for a first completion token held apart (prefix sharing's rejected reply)."""
    rng = np.random.default_rng(26)
    lengths = np.array([5, 3, 2, 6])  # pair 0: chosen longer; pair 1: rejected longer
    if layout == "padded":
        rows = [(s, 2, n) for s, n in enumerate(lengths)]  # (sequence, prompt, completion)
        shape = (4, 10)
    else:
        rows = [(0, 2, 5), (1, 1, 3), (2, 3, 2), (3, 2, 6)]
        shape = (2, 20)
    mask = np.zeros(shape, bool)
    ids = np.zeros(shape, np.int32)
    fill = [0] * shape[0]
    for k, (s, prompt, n) in enumerate(rows):
        row = k if layout == "padded" else k // 2
        start = fill[row]
        ids[row, start : start + prompt + n] = s
        mask[row, start + prompt - 1 : start + prompt - 1 + n] = True
        fill[row] = start + prompt + n
    logps = -rng.uniform(0.1, 3.0, shape).astype(np.float32)
    offsets = np.array([0, 1, 0, 1]) if layout == "shared_offsets" else None
    full = lengths + (0 if offsets is None else offsets)
    got = desensitized_logps(
        jnp.asarray(logps),
        jnp.asarray(mask),
        jnp.asarray(ids),
        jnp.asarray(full, jnp.float32),
        0.3,
        None if offsets is None else jnp.asarray(offsets, jnp.float32),
    )
    want = _np_desensitized(logps.astype(np.float64), mask, ids, full, 0.3, offsets)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    plain = desensitized_logps(
        jnp.asarray(logps), jnp.asarray(mask), jnp.asarray(ids), jnp.asarray(full, jnp.float32), 1.0
    )
    np.testing.assert_allclose(plain, sequence_logps(logps, mask, ids, 4)[0], rtol=1e-6)
    assert not np.allclose(got, plain)  # the longer replies' tails were down-weighted
