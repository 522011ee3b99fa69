"""LoRA / QLoRA and TR-DPO on the tiny default: the policy starts as the base, only the
adapters train, PEFT loads the exported adapter, resumes, evaluation and generation read
adapter checkpoints, and TR-DPO's reference follows its mixup formula across a resume."""

import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_rows_close, fast_config, model_config_of, read_metrics, train_rows

from dpo_jax import (
    checkpoint,
    embedded,
    evaluate,
    export,
    generate,
    hf,
    lora,
    model,
    settings,
    sharding,
    state,
    train,
)

RANK = 4
LORA = {
    "lora.rank": RANK,
    "lora.alpha": 8.0,
    "lora.dropout": 0.05,  # the dropout path runs; B = 0 keeps step 0 exact anyway
    # a learning rate that moves the adapters clearly in 6 steps, so the logits checks below
    # compare a policy far from its base
    "training.learning_rate": 3e-3,
    "checkpoint.export_hf": True,
}


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    """A copy of the embedded tiny model, so one test can change its weights."""
    folder = tmp_path_factory.mktemp("base") / "tiny"
    shutil.copytree(embedded.TINY_MODEL_DIR, folder)
    return str(folder)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, small_validation, base_folder):
    workdir = str(tmp_path_factory.mktemp("lora"))
    config = fast_config(small_validation, **LORA, **{"model.name": base_folder})
    result = train.train(config, workdir, devices=jax.devices()[:1])
    return config, workdir, result


def one_device_mesh():
    return sharding.make_mesh(1, 1, 1, jax.devices()[:1])


def test_step0_is_the_base_and_only_the_adapters_train(lora_run, base_folder):
    config, workdir, result = lora_run
    rows = train_rows(read_metrics(workdir))
    # B = 0: the policy is the base, so plain DPO's loss is exactly ln 2 at step 0.
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6
    assert rows[5]["loss"] < rows[0]["loss"]
    model_config = model_config_of(config)
    adapters = result.state.params
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
    assert len(names) == 2 * 7 and all(n.endswith(("['a']", "['b']")) for n in names)
    # The optimizer holds the adapters' moments only: 2 per adapter weight (+ step counts).
    moments = sum(x.size for x in jax.tree.leaves(result.state.opt_state) if x.ndim > 0)
    assert moments == 2 * lora.adapter_count(model_config)
    assert lora.adapter_count(model_config) < model.num_params(model_config) // 10
    b_moved = [
        float(jnp.max(jnp.abs(x)))
        for p, x in jax.tree_util.tree_leaves_with_path(adapters)
        if jax.tree_util.keystr(p).endswith("['b']")
    ]
    assert min(b_moved) > 0.0

    # The base (the reference) is bit-identical to the weights on disk after training.
    base = result.ref_params
    on_disk = hf.load_params(base_folder, model_config, dtype=model_config.dtype)
    jax.tree.map(np.testing.assert_array_equal, base, on_disk)

    # The reference with adapters off is the plain base model (a config without LoRA).
    plain_config = model.ModelConfig(
        **{f: getattr(model_config, f) for f in model_config.__dataclass_fields__}
        | {"lora_rank": 0, "lora_targets": ()}
    )
    tokens = jnp.asarray(np.arange(40)[None] % model_config.vocab_size)
    np.testing.assert_array_equal(
        model.forward(model_config, base, tokens), model.forward(plain_config, on_disk, tokens)
    )
    # Freshly initialised adapters (B = 0) give exactly the base's logits too.
    fresh = nn.meta.unbox(model.init_adapters(model_config, jax.random.key(0)))
    np.testing.assert_array_equal(
        model.forward(model_config, model.Adapted(base, fresh), tokens),
        model.forward(plain_config, on_disk, tokens),
    )


def policy_logits(lora_run, tokens):
    config, _, result = lora_run
    model_config = model_config_of(config)
    policy = model.Adapted(result.ref_params, result.state.params)
    return np.asarray(model.forward(model_config, policy, tokens)), model_config, result


def test_peft_loads_the_exported_adapter_and_the_merged_export_agrees(lora_run, base_folder):
    import peft
    import torch
    import transformers

    _, workdir, _ = lora_run
    tokens = np.arange(3, 51)[None] % 1024
    ours, model_config, result = policy_logits(lora_run, jnp.asarray(tokens))
    base_logits = np.asarray(model.forward(model_config, result.ref_params, jnp.asarray(tokens)))
    # Tolerance 1e-4 (the issue's): float32 logits of a few units differ between PyTorch's and
    # XLA's summation orders by ~1e-6. The policy must be far from its base for this to mean
    # anything: its logits moved by far more than the tolerance.
    assert np.max(np.abs(ours - base_logits)) > 1e-2

    adapter_dir = os.path.join(workdir, "hf-adapter")
    assert sorted(os.listdir(adapter_dir)) == ["adapter_config.json", lora.ADAPTER_WEIGHTS]
    base_model = transformers.AutoModelForCausalLM.from_pretrained(
        base_folder, torch_dtype=torch.float32
    )
    peft_model = peft.PeftModel.from_pretrained(base_model, adapter_dir).eval()
    with torch.no_grad():
        theirs = peft_model(torch.tensor(tokens)).logits.float().numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)

    merged = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.join(workdir, "hf"), torch_dtype=torch.float32
    ).eval()
    with torch.no_grad():
        merged_logits = merged(torch.tensor(tokens)).logits.float().numpy()
    np.testing.assert_allclose(merged_logits, ours, atol=1e-4, rtol=0)


def test_resume_evaluate_and_generate_read_adapter_checkpoints(lora_run, tmp_path):
    config, workdir, result = lora_run
    # A run killed after checkpoint 4: its later checkpoints never existed.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    for step in (5, 6):
        shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)), ignore_errors=True)
    again = train.train(config, resumed, devices=jax.devices()[:1])
    for a, b in zip(read_metrics(workdir), read_metrics(resumed), strict=True):
        assert_rows_close(a, b)
    jax.tree.map(np.testing.assert_array_equal, again.state.params, result.state.params)

    evaluated = evaluate.evaluate(workdir, devices=jax.devices()[:1])
    metrics = evaluated["sets"]["validation"]["metrics"]
    for key in ("loss", "rewards/accuracies", "rewards/margins"):
        assert abs(metrics[key] - result.eval_metrics[f"eval/{key}"]) < 1e-5, key

    _, params, tokenizer, eos, _ = generate.load_model(workdir, step=6)
    assert isinstance(params, model.Adapted)
    replies = generate.generate_text(
        model_config_of(config),
        params,
        tokenizer,
        ["Could you help me?"],
        generate.SamplingConfig(max_new_tokens=8, temperature=0.0),
    )
    assert len(replies) == 1 and isinstance(replies[0], str)


def test_adapters_on_other_base_weights_are_refused(lora_run, base_folder):
    _, workdir, _ = lora_run
    weights = os.path.join(base_folder, "model.safetensors")
    original = weights + ".original"
    shutil.copyfile(weights, original)
    try:
        from safetensors.numpy import load_file, save_file

        tensors = load_file(weights)
        tensors["model.norm.weight"] = tensors["model.norm.weight"] * np.float32(1.5)
        save_file(tensors, weights, metadata={"format": "pt"})
        with pytest.raises(checkpoint.BaseMismatch, match="fingerprint"):
            export.restore_params(workdir, devices=jax.devices()[:1])
    finally:
        os.replace(original, weights)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_qlora_base_is_quantized_and_trains(small_validation, tmp_path, quantization):
    config = fast_config(
        small_validation,
        **LORA,
        **{"lora.quantization": quantization, "training.max_steps": 3, "eval.every_steps": 3},
    )
    result = train.train(config, str(tmp_path), devices=jax.devices()[:1])
    kinds = {
        type(x).__name__
        for x in jax.tree.leaves(result.ref_params, is_leaf=lambda x: hasattr(x, "codes"))
    }
    assert "Quantized" in kinds
    rows = train_rows(read_metrics(str(tmp_path)))
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-6  # the policy is its (quantized) base
    assert rows[2]["loss"] < rows[0]["loss"]


# ---------------------------------------------------------------------------- TR-DPO

SYNC = {
    "training.sync_ref_model": True,
    "training.ref_model_sync_steps": 2,
    "training.ref_model_mixup_alpha": 0.6,
    "training.max_steps": 4,
    "training.learning_rate": 3e-3,
    "checkpoint.every_steps": 1,
    "checkpoint.max_to_keep": 10,
    "eval.every_steps": 4,
}


def test_tr_dpo_reference_follows_the_mixup_formula_across_a_resume(small_validation, tmp_path):
    config = fast_config(small_validation, **SYNC)
    workdir = str(tmp_path / "run")
    result = train.train(config, workdir, devices=jax.devices()[:1])

    s = settings.from_config(config)
    model_config = state.model_config(s.model)
    shardings = state.param_shardings(model_config, one_device_mesh(), s.mesh.rules)
    initial = state.initial_params(s.model, model_config, s.loop.seed, shardings)
    abstract = checkpoint.abstract_like(initial)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    try:
        params = {k: ckpt.restore_params(k, abstract) for k in (1, 2, 3, 4)}
        refs = {k: ckpt.restore_params(k, abstract, field="reference") for k in (1, 2, 3, 4)}
    finally:
        ckpt.close()

    def mixed(policy, ref):  # what TRL's sync does: ref ← α·policy + (1 − α)·ref
        return jax.tree.map(
            lambda p, r: 0.6 * np.asarray(p, np.float64) + 0.4 * np.asarray(r, np.float64),
            policy,
            ref,
        )

    def assert_close(expected, got):
        # float32 arithmetic on weights of |w| < 1: two roundings of at most 2^-24 |w| each.
        jax.tree.map(
            lambda e, g: np.testing.assert_allclose(g, e, rtol=0, atol=2.5e-7), expected, got
        )

    jax.tree.map(np.testing.assert_array_equal, refs[1], initial)  # not yet synced
    assert_close(mixed(params[2], initial), refs[2])
    jax.tree.map(np.testing.assert_array_equal, refs[3], refs[2])
    assert_close(mixed(params[4], refs[2]), refs[4])
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(refs[2]), jax.tree.leaves(initial), strict=True)
    )

    # Killed after checkpoint 2 and resumed: the same steps, reference and policy.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    for step in (3, 4):
        shutil.rmtree(os.path.join(resumed, "checkpoints", str(step)))
    again = train.train(config, resumed, devices=jax.devices()[:1])
    for a, b in zip(read_metrics(workdir), read_metrics(resumed), strict=True):
        assert_rows_close(a, b)
    jax.tree.map(np.testing.assert_array_equal, again.state.reference, result.state.reference)
    jax.tree.map(np.testing.assert_array_equal, again.state.params, result.state.params)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (
            {"lora.rank": 8, "training.sync_ref_model": True},
            "LoRA the reference is the frozen base",
        ),
        (
            {"training.sync_ref_model": True, "training.precompute_ref_log_probs": True},
            "precompute_ref_log_probs=False",
        ),
        ({"lora.quantization": "nf4"}, "set lora.rank > 0"),
        ({"lora.rank": 8, "lora.targets": "q_proj,qkv"}, "lora.targets"),
        ({"lora.rank": -1}, "lora.rank"),
        ({"lora.rank": 8, "lora.quantization": "int3"}, "lora.quantization"),
        ({"training.sync_ref_model": True, "training.ref_model_sync_steps": 0}, "sync_steps"),
    ],
)
def test_bad_lora_and_sync_settings_name_their_key(small_validation, overrides, fragment):
    with pytest.raises(settings.ConfigError, match=fragment):
        settings.from_config(fast_config(small_validation, **overrides))
