"""checkpoint.keep_best: Orbax keeps the best checkpoints by an eval metric beside the latest,
the ranking survives a restart, and `--step best` names the best one."""

import jax
import numpy as np
import pytest
from conftest import fast_config, read_metrics

from dpo_jax import checkpoint, export, settings, train
from dpo_jax.settings import ConfigError

# Every step is evaluated (a candidate); the periodic saves are off, so only evaluations, the
# latest (max_to_keep 1) and the ranking decide what stays. Ranking eval/loss by "max" makes
# the best the *worst* loss, an early step: the best and the latest then differ, which is the
# case worth testing.
BEST = {
    "eval.every_steps": 1,
    "checkpoint.every_steps": 100,
    "checkpoint.max_to_keep": 1,
    "checkpoint.keep_best": "eval/loss",
    "checkpoint.keep_best_mode": "max",
    "checkpoint.keep_best_count": 2,
}


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory, small_validation):
    workdir = str(tmp_path_factory.mktemp("keep_best"))
    config = fast_config(small_validation, **BEST)
    train.train(config, workdir, devices=jax.devices()[:1])
    evals = {r["step"]: r["eval/loss"] for r in read_metrics(workdir) if "eval/loss" in r}
    return workdir, settings.from_config(config).checkpoint.keep_best, evals


def test_the_best_two_by_the_metric_and_the_latest_are_kept(ranked_run):
    workdir, keep_best, evals = ranked_run
    assert sorted(evals) == [1, 2, 3, 4, 5, 6]
    best_two = sorted(evals, key=evals.get)[-2:]  # the two highest eval/loss
    assert 6 not in best_two, f"eval/loss by step {evals}: the test needs a best before the end"
    ckpt = checkpoint.Checkpointer(workdir, keep_best=keep_best)
    assert ckpt.steps() == sorted({*best_two, 6})
    assert ckpt.best_step() == max(evals, key=evals.get)
    assert ckpt.manager.metrics(ckpt.best_step())["eval/loss"] == pytest.approx(max(evals.values()))
    ckpt.close()


def test_a_restarted_manager_keeps_the_ranking(ranked_run, tmp_path):
    """What a resumed run sees: metrics read back from disk, so a new save (no metrics)
    rotates the latest out and leaves the best ones."""
    workdir, keep_best, evals = ranked_run
    copy = tmp_path / "run"
    import shutil

    shutil.copytree(workdir, copy)
    ckpt = checkpoint.Checkpointer(str(copy), max_to_keep=1, async_save=False, keep_best=keep_best)
    kept_best = [s for s in ckpt.steps() if s != 6]
    ckpt.save(7, {"w": np.zeros(3, np.float32)}, {"epoch": 0}, {"note": "later"})
    ckpt.wait()
    assert ckpt.steps() == sorted({*kept_best, 7})
    assert ckpt.best_step() == max(evals, key=evals.get)
    ckpt.close()


def test_step_best_resolves_for_export(ranked_run, tmp_path):
    workdir, _, evals = ranked_run
    step = export.export(workdir, str(tmp_path / "hf-best"), "best")
    assert step == max(evals, key=evals.get)
    assert (tmp_path / "hf-best" / "config.json").exists()
    ckpt = checkpoint.Checkpointer(workdir)
    with pytest.raises(checkpoint.CheckpointError, match="not among the checkpoints"):
        ckpt.resolve_step("12")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint .* was ranked"):
        ckpt.resolve_step("best")  # no keep_best given: nothing to rank by
    ckpt.close()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"checkpoint.keep_best": "eval/los"}, "one of eval/entropy, eval/logits/chosen"),
        ({"checkpoint.keep_best": "loss"}, "one of eval/"),  # a train row: not evaluated
        ({"checkpoint.keep_best_mode": "lowest"}, "auto, min or max"),
        ({"checkpoint.keep_best_count": 0}, "at least 1"),
        ({"data.validation_file": ""}, "needs held-out data"),
    ],
)
def test_bad_keep_best_settings_name_the_key(small_validation, overrides, message):
    config = fast_config(small_validation, **(BEST | overrides))
    with pytest.raises(ConfigError, match=message):
        settings.from_config(config)


def test_auto_mode_minimises_losses_and_maximises_the_rest(small_validation):
    def mode(metric):
        config = fast_config(
            small_validation, **{"checkpoint.keep_best": metric, "eval.every_steps": 1}
        )
        return settings.from_config(config).checkpoint.keep_best.mode

    assert mode("eval/loss") == "min"
    assert mode("eval/rewards/accuracies") == "max"
