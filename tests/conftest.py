"""Test set-up: 8 emulated CPU devices (set before JAX is imported) and tiny configs."""

import importlib.util
import json
import math
import os
import sys

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Implicit rank promotion (adding [B] to [B, T]) is how shape bugs hide; the package must not
# rely on it. The environment variable reaches the CLIs the tests start, too.
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The decoder shape the model-level tests share: small enough for float64 oracles, with GQA
# (4 query heads over 2 KV heads) and a vocabulary that is no power of two.
TINY_DIMS = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2
)


def load_config(name: str = "tiny", *args, **overrides):
    """configs/<name>.py's get_config(*args) with dotted-key overrides ("training.max_steps": 4)."""
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from dpo_jax.schema import with_overrides

    return with_overrides(module.get_config(*args), overrides)


def model_config_of(config):
    """The ModelConfig a run of `config` trains, by the trainer's own settings path."""
    from dpo_jax import settings, state

    return state.model_config(settings.from_config(config).model)


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


# Small and fast: 8 pairs per step, 6 steps, a 16-pair validation file.
FAST = {
    "training.batch_size": 8,
    "training.max_steps": 6,
    "training.warmup_steps": 1,
    "data.max_seq_length": 80,
    "checkpoint.every_steps": 2,
    "checkpoint.async_save": False,
    "logging.every_steps": 1,
    "eval.every_steps": 3,
    "eval.batch_size": 8,
    "training.sft_loss_weight": 0.0,  # plain DPO (sigmoid): step-0 loss is exactly ln 2
    "eval.sample_prompts_file": "",  # generation has its own tests
    "logging.report": False,
}


# The environment variables by which the CLIs the tests start share one XLA compilation cache.
CLI_CACHE_VARIABLES = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")


def without_compilation_cache(env) -> dict:
    """`env` less the shared compilation cache, for multi-process launches: their processes
    would write one entry at once, and JAX's cache writes in place, unlocked."""
    return {k: v for k, v in env.items() if k not in CLI_CACHE_VARIABLES}


@pytest.fixture(scope="session", autouse=True)
def cli_compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the single-process CLIs the tests start: they run
    the same tiny programs, which then compile once per session instead of in each of some 30
    runs (a fault-test run took 34 s without it and 23 s with it, measured idle). Set in the
    environment the CLIs inherit, after JAX has read its own: the pytest process keeps none
    (its programs seldom repeat, and writing each costs more than the rare hit saves). A run
    killed while writing an entry leaves it torn, which JAX reads as a miss with a warning
    and compiles again. Multi-process launches drop it (tests/test_multiprocess.py)."""
    import jax

    assert jax.config.jax_compilation_cache_dir is None, "the pytest process must keep none"
    cache = tmp_path_factory.mktemp("cli_xla_cache")
    values = (str(cache), "0")  # tiny programs compile in well under JAX's 1 s threshold
    saved = {name: os.environ.get(name) for name in CLI_CACHE_VARIABLES}
    os.environ.update(zip(CLI_CACHE_VARIABLES, values, strict=True))
    yield cache
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def small_validation(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "validation.jsonl"
    from dpo_jax import embedded

    with open(embedded.VALIDATION_FILE) as src:
        path.write_text("".join(src.readlines()[:16]))
    return str(path)


@pytest.fixture(scope="session")
def small_train(tmp_path_factory):
    """The first 64 training pairs: enough for 6 steps of 8, and a reference precompute that
    takes seconds rather than minutes (multi-process tests run it in every process)."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    from dpo_jax import embedded

    with open(embedded.TRAIN_FILE) as src:
        path.write_text("".join(src.readlines()[:SMALL_TRAIN_PAIRS]))
    return str(path)


SMALL_TRAIN_PAIRS = 64


def free_port() -> int:
    """A localhost port nobody listens on now (the coordinator's; a random one can clash)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def adam_step_bound(b1: float, b2: float, t: int) -> float:
    """The largest |m̂_t / √v̂_t| any gradient sequence can give Adam at step t (Cauchy–Schwarz
    over the moments' sums): no element moves more than lr_t times this in one step."""
    ratio = (1 - b1) / (1 - b1**t) * math.sqrt((1 - b2**t) / (1 - b2))
    return ratio * math.sqrt(sum((b1 * b1 / b2) ** k for k in range(t)))


def fast_config(small_validation, **overrides):
    return load_config("tiny", **(FAST | {"data.validation_file": small_validation} | overrides))


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_rows(rows):
    return {r["step"]: r for r in rows if "loss" in r}


# timings differ from run to run; "time" is when the row was written
THROUGHPUT = ("tokens_per_sec", "pairs_per_sec", "mfu", "memory/peak_gb", "time")


def assert_rows_close(a, b, rtol=1e-5, atol=1e-5, skip=THROUGHPUT):
    assert a.keys() == b.keys()
    for key in a:
        if key in skip:
            continue
        # Accuracy counts reward ties (policy == reference at step 0) by the sign of
        # rounding noise; it is only comparable once the margins are clear of zero.
        if (
            key.endswith("rewards/accuracies")
            and abs(a[key.replace("accuracies", "margins")]) < 1e-4
        ):
            continue
        assert math.isclose(a[key], b[key], rel_tol=rtol, abs_tol=atol), (key, a[key], b[key])


# Packed rows whose every step takes exactly the next 8 pairs of the epoch order (16 rows
# always fit them), with or without prefix sharing: the same pairs per step.
PACKED = {
    "data.packing": True,
    "data.packed_rows": 16,
    "training.max_steps": 4,
    "eval.every_steps": 2,
}


@pytest.fixture(scope="session")
def packed_baseline(tmp_path_factory, small_train, small_validation):
    """An uninterrupted packed run on one device, in-step reference, prefetch off, on the
    64-pair training file (the runs compared with it must train on it too)."""
    import jax

    from dpo_jax import train

    workdir = str(tmp_path_factory.mktemp("packed_baseline"))
    cache = str(tmp_path_factory.mktemp("packed_cache") / "data")
    config = fast_config(
        small_validation,
        **PACKED,
        **{"data.prefetch": 0, "data.cache_dir": cache, "data.train_file": small_train},
    )
    result = train.train(config, workdir, devices=jax.devices()[:1])
    return workdir, result
