"""Golden numbers of the train step, called directly on the tiny default: two steps of 8
pairs (the first at policy = reference, the second after one AdamW update). A change that
moves any of them fails here loudly; the commit that changes them says why.

Tolerance: float32 sums over ~10^3 tokens and 10^6 parameters, in an order XLA may change
between versions and machines, agree to ~1e-6 relative; 2e-5 leaves room for that and no
more (a changed loss, mask, normalisation or optimizer moves these by > 1e-3). Rewards are
β times a difference of log-probs of ~8, so their error is absolute: β · 8 · 1e-5 < 1e-6."""

import math

import jax
import numpy as np
from conftest import FAST, load_config

from dpo_jax import data, hf, optim, settings, sharding, state
from dpo_jax.step import jit_train_step

GOLDEN = {
    0: {
        "grad_norm": 1.0688563585281372,
        "learning_rate": 0.0003000000142492354,
        "logits/chosen": -0.9968482255935669,
        "logits/rejected": -0.9623135328292847,
        "logps/chosen": -7.881458759307861,
        "logps/rejected": -8.691457748413086,
        "loss": 0.9542806148529053,
        "preference_loss": 0.6931471228599548,
        "sft_loss": 0.26113343238830566,
    },
    1: {
        "grad_norm": 0.9123547077178955,
        "learning_rate": 0.00028191343881189823,
        "logits/chosen": -1.0063605308532715,
        "logits/rejected": -0.996871829032898,
        "logps/chosen": -7.276330947875977,
        "logps/rejected": -8.64230728149414,
        "loss": 0.9314670562744141,
        "preference_loss": 0.6856505274772644,
        "rewards/chosen": 0.013053679838776588,
        "rewards/margins": 0.015109063126146793,
        "rewards/rejected": -0.0020553828217089176,
        "sft_loss": 0.24581652879714966,
    },
}
KEYS = (
    "loss",
    "preference_loss",
    "sft_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "grad_norm",
    "learning_rate",
)


def golden_run(devices: int = 1, **extra) -> dict[int, dict[str, float]]:
    """Two steps' metrics on a `devices`-device fsdp mesh; "chosen_tokens": each step's
    chosen completion tokens."""
    # No warmup: the first step updates at the peak rate (warmup's first rate is 0).
    overrides = FAST | {"training.sft_loss_weight": 1.0, "training.warmup_steps": 0}
    overrides |= {"data.cache_dir": "none"} | extra
    s = settings.from_config(load_config("tiny", **overrides))
    model_config = state.model_config(s.model)
    mesh = sharding.make_mesh(1, devices, 1, jax.devices()[:devices])
    built = data.build_data(
        s.data,
        hf.load_tokenizer(s.tokenizer),
        batch_size=s.batch.batch_size,
        accumulation_steps=s.batch.accumulation_steps,
        seed=s.loop.seed,
    )
    optim_config = s.optim.for_steps(s.loop.max_steps)
    optimizer, schedule = optim.make_optimizer(optim_config), optim.make_schedule(optim_config)
    shardings = state.state_shardings(model_config, optimizer, mesh, s.mesh.rules)
    train_state = state.init_state(s.model, model_config, s.loop.seed, optimizer, shardings)
    ref = state.copy_params(train_state.params, shardings.params)
    step = jit_train_step(
        model_config,
        s.loss,
        optimizer,
        schedule,
        shardings,
        mesh,
        frozen_shardings=shardings.params,
        padded_rows=True,
        last_step_at_reference=optim.last_step_at_reference(schedule, s.loop.max_steps),
    )
    out = {}
    for index in range(2):
        host = next(built.train)
        batch = sharding.put_batch(host, mesh, row_axis=1)
        train_state, metrics = step(train_state, ref, batch)
        out[index] = {k: float(v) for k, v in jax.device_get(metrics).items() if k in KEYS}
        chosen = host["loss_mask"] & (host["sequence_ids"] % 2 == 0)
        out[index]["chosen_tokens"] = int(chosen.sum())
    return out


def test_train_step_golden_metrics():
    got = golden_run()
    # Policy = reference at step 0: ln 2, and rewards exactly 0 (the reference log-probs are
    # the policy's own there, not a second forward's that rounds an ulp apart), as TRL's.
    assert abs(got[0]["preference_loss"] - math.log(2)) < 1e-6
    for side in ("chosen", "rejected", "margins"):
        assert got[0].pop(f"rewards/{side}") == 0.0
    for index, expected in GOLDEN.items():
        got[index].pop("chosen_tokens")
        assert got[index].keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(
                got[index][key], expected[key], rtol=2e-5, atol=1e-6, err_msg=f"step {index} {key}"
            )


def test_batch_token_sft_is_trls_and_exact_under_accumulation():
    """training.sft_normalization="batch_tokens": the SFT term is the NLL of all chosen tokens
    of the step over their count (TRL's), from the step's own log-probs at step 0; the same
    with two micro-batches of 4 as with one of 8 (the denominator is the step's, not the
    micro-batch's), and the same with the batch's rows sharded over 8 devices, after an
    update too. Tolerance as GOLDEN's (float32 sums in another order); pair normalisation's
    value differs by far more (~1e-2)."""
    token_sft = {"training.sft_normalization": "batch_tokens"}
    one = golden_run(**token_sft)
    two = golden_run(**token_sft, **{"training.gradient_accumulation_steps": 2})
    sharded = golden_run(devices=8, **token_sft)
    first = one[0]
    # Σ over the 8 pairs of the summed chosen NLL = -8 · logps/chosen (a mean over pairs).
    expected = -8 * first["logps/chosen"] / first["chosen_tokens"]
    np.testing.assert_allclose(first["sft_loss"], expected, rtol=2e-5)
    np.testing.assert_allclose(first["loss"], first["preference_loss"] + expected, rtol=2e-5)
    assert abs(first["sft_loss"] - GOLDEN[0]["sft_loss"]) > 1e-3  # not the per-pair mean
    # The gradient flows through both parts: near pair normalisation's, not the same.
    assert 0.5 < first["grad_norm"] < 2 and abs(first["grad_norm"] - GOLDEN[0]["grad_norm"]) > 1e-4
    assert one[1]["loss"] < first["loss"]  # the update lowered it
    for other in (two, sharded):
        for index in (0, 1):
            for key in ("loss", "sft_loss", "grad_norm", "logps/chosen", "rewards/margins"):
                got, want = other[index][key], one[index][key]
                np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6, err_msg=key)
