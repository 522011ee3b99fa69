"""report.html / plots from a run's files, and the TensorBoard / W&B metric writers."""

import base64
import json
import math
import os
import re
import sys
import types

import pytest

from dpo_jax import metrics_log, plots, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def train_row(step):
    loss = math.log(2) * math.exp(-step / 10)
    return {
        "step": step,
        "loss": loss,
        "preference_loss": loss,
        "sft_loss": 0.0,  # no SFT term: no sft_loss plot
        "rewards/accuracies": min(1.0, 0.5 + step / 40),
        "rewards/margins": step / 20,
        "rewards/chosen": step / 40,
        "rewards/rejected": -step / 40,
        "logps/chosen": -50 + step / 4,
        "logps/rejected": -55 - step / 4,
        "learning_rate": 1e-3 * min(1.0, (step + 1) / 5),
        "grad_norm": 1.0,
        "tokens_per_sec": 1000.0 + step,
        "mfu": 0.3 + step / 1000,
        "memory/peak_gb": 12.5,
        "pairs_per_sec": 10.0 + step,
        "time": 1_000_000.0 + 2.0 * step,  # a step every 2 s
    }


def eval_row(step, prefix="eval/"):
    row = train_row(step)
    return {"step": step} | {
        f"{prefix}{k}": v for k, v in row.items() if k not in ("step", "learning_rate", "time")
    }


@pytest.fixture
def workdir(tmp_path):
    rows = [train_row(s) for s in range(21)] + [eval_row(10), eval_row(20)]
    rows.append(eval_row(20, prefix="eval/heldout/"))
    rows.append(
        {
            "step": 20,
            "eval/samples/reference_preferred_rate": 0.5,
            "eval/samples/policy_preferred_rate": 0.95,
        }
    )
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write('{"step": 21, "loss": 0.')  # torn by a kill mid-write
    samples = [
        {
            "step": step,
            "prompt": f"Prompt {i} <b>&",
            "reference": f"Ugh, fine. Answer {i}.",
            "policy": f"Sure! Answer {i}. Hope this helps!",
            "reference_preferred": False,
            "policy_preferred": i != 0,
        }
        for step in (10, 20)
        for i in range(3)
    ]
    with open(tmp_path / "samples.jsonl", "w") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    (tmp_path / "config.json").write_text('{"training": {"beta": 0.1}}')
    return tmp_path


def test_report_is_self_contained_with_every_plot(workdir):
    path = report.write_report(str(workdir))
    assert path == os.path.join(str(workdir), "report.html")
    text = open(path, encoding="utf-8").read()
    expected = {
        "loss",
        "preference_loss",
        "accuracy",
        "margins",
        "rewards",
        "logps",
        "learning_rate",
        "grad_norm",
        "tokens_per_sec",
        "mfu",
        "memory",
        "samples_preferred_rate",
    }
    assert {f[: -len(".png")] for f in os.listdir(workdir / "plots")} == expected
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(embedded) == len(expected)
    for name in expected:
        png = (workdir / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 5000
        assert base64.b64encode(png).decode() in embedded
    assert 'src="http' not in text and "<script" not in text  # nothing fetched
    # samples of the last step, escaped; per-step preferred rates; eval/samples rates
    assert "Prompt 2 &lt;b&gt;&amp;" in text and "<b>&" not in text
    assert "Step 20: 3 of 3 prompts" in text
    assert "policy_preferred_rate" in text and "0.95" in text
    assert "config.json" in text


def test_run_summary_gives_wall_time_pace_and_memory(workdir):
    text = open(report.write_report(str(workdir)), encoding="utf-8").read()
    run = text.split("<h2>Run</h2>", 1)[1].split("</table>", 1)[0]
    cells = re.findall(r"<td>(.*?)</td>", run)
    summary = dict(zip(cells[0::2], cells[1::2], strict=True))
    assert summary["steps trained"] == "21"
    assert summary["wall time, step 0 to 20"] == "0:00:40"  # 20 steps of 2 s
    # means over steps 1..20 (step 0 includes compilation): 1000 + 10.5, 10 + 10.5
    assert summary["mean tokens/s"] == "1010" and summary["mean pairs/s"] == "20.5"
    assert summary["peak device memory (GiB)"] == "12.5"


def test_splits_of_different_scales_get_their_own_panels():
    train = ([0, 1, 2], [-7.9, -7.5, -7.2])
    evals = ([1, 2], [-156.1, -156.0])
    lines = {"train chosen": train, "eval chosen": evals, "eval rejected": evals}
    assert plots.panels(lines, "linear") == [["train chosen"], ["eval chosen", "eval rejected"]]
    # Overlapping scales (rewards of both splits near 0) share one axis, as does a log plot.
    near = {"train": ([0, 1], [0.0, 0.05]), "eval": ([1], [0.03])}
    assert plots.panels(near, "linear") == [["train", "eval"]]
    assert plots.panels(lines, "log") == [["train chosen", "eval chosen", "eval rejected"]]
    png = plots.plot("log-probs", lines)
    assert png.startswith(PNG_MAGIC)


def test_series_labels_train_eval_and_named_eval_sets(workdir):
    rows = report.read_jsonl(str(workdir / "metrics.jsonl"))
    assert rows[-1]["step"] == 20  # the torn line is skipped
    found = plots.series(rows, "rewards/chosen")
    assert sorted(found) == ["eval", "eval/heldout", "train"]
    assert found["eval"] == ([10, 20], [0.25, 0.5])
    assert len(found["train"][0]) == 21
    assert "eval/samples" not in plots.series(rows, "policy_preferred_rate")


def test_report_of_an_empty_run_and_cli(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    report.main([str(tmp_path)])
    assert "wrote" in capsys.readouterr().out
    assert "No metrics" in (tmp_path / "report.html").read_text()
    with pytest.raises(SystemExit, match="metrics.jsonl not found"):
        report.main([str(tmp_path / "missing")])


def test_tensorboard_train_and_eval_runs_share_tags(tmp_path):
    writer = metrics_log.open_writers(str(tmp_path))
    writer.write(0, {"loss": 0.69, "rewards/margins": 0.0})
    writer.write(1, {"loss": 0.5})
    writer.write(1, {"eval/loss": 0.6, "eval/samples/policy_preferred_rate": 0.9})
    writer.close()
    scalars = metrics_log.read_scalars(str(tmp_path / "tensorboard"))
    got = {(run, step, tag): round(v, 4) for run, step, tag, v in scalars}
    assert got == {
        ("train", 0, "loss"): 0.69,
        ("train", 0, "rewards/margins"): 0.0,
        ("train", 1, "loss"): 0.5,
        ("eval", 1, "loss"): 0.6,
        ("eval", 1, "samples/policy_preferred_rate"): 0.9,
    }


def test_tensorboard_resume_hides_what_is_recomputed(tmp_path):
    """Resumed from checkpoint 4: train steps >= 4 are recomputed, the eval at 4 is kept."""
    metrics_log.open_writers(str(tmp_path), purge_step=4).close()
    starts = {
        run: event.step
        for run, event in metrics_log.read_events(str(tmp_path / "tensorboard"))
        if event.HasField("session_log")
    }
    assert starts == {"train": 4, "eval": 5}


def test_tensorboard_export_from_metrics_jsonl(workdir):
    metrics_log.main([str(workdir)])
    scalars = metrics_log.read_scalars(str(workdir / "tensorboard"))
    train_loss = [s for s in scalars if s[0] == "train" and s[2] == "loss"]
    eval_loss = [s for s in scalars if s[0] == "eval" and s[2] == "loss"]
    assert len(train_loss) == 21 and [s[1] for s in eval_loss] == [10, 20]


@pytest.mark.parametrize("missing", ["wandb", "tensorboardX"])
def test_a_missing_writer_package_is_a_warning(tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import → ImportError
    with pytest.warns(UserWarning, match=f"{missing} is not installed"):
        writer = metrics_log.open_writers(
            str(tmp_path), tensorboard=missing == "tensorboardX", wandb=missing == "wandb"
        )
    assert writer.writers == []
    writer.write(0, {"loss": 1.0})
    writer.close()


def test_wandb_when_installed_logs_and_resumes_the_same_run(tmp_path, monkeypatch):
    """A fake W&B with W&B's rule: a row logged at a step it has already seen is dropped.
    The run logs steps 1-5 and stops; its resume (from a checkpoint at step 3) logs 4-6,
    and every one of those rows must arrive."""
    calls, kept = [], []

    class Run:
        seen = -1  # W&B's own step, across the resumption (the same run id)

        def define_metric(self, name, step_metric=None):
            calls.append(("define_metric", name, step_metric))

        def log(self, metrics, step=None):
            step = Run.seen + 1 if step is None else step
            if step > Run.seen:
                Run.seen = step
                kept.append(metrics)

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake = types.SimpleNamespace(init=init)  # no wandb.util.generate_id: gone in W&B 0.31
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for steps in ((1, 2, 3, 4, 5), (4, 5, 6)):  # a run, then its resumption
        writer = metrics_log.open_writers(
            str(tmp_path), tensorboard=False, wandb=True, config={"a": 1}
        )
        for step in steps:
            writer.write(step, {"loss": 1.0 / step, "eval/loss": 0.6})
        writer.close()
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow"
    assert re.fullmatch(r"[a-z0-9]{8}", inits[0]["id"])  # W&B's own id form
    assert inits[0]["config"] == {"a": 1} and inits[0]["dir"] == str(tmp_path)
    assert ("define_metric", "*", "step") in calls  # charts use our step as the x-axis
    assert [row["step"] for row in kept] == [1, 2, 3, 4, 5, 4, 5, 6]
    assert kept[-1] == {"step": 6, "loss": 1.0 / 6, "eval/loss": 0.6}


def test_step_lines_show_elapsed_and_an_eta_from_the_pace_since_the_first_row(tmp_path, capsys):
    """Resumed at step 10 of 20, 30 s of setup, then 4 s a step: the ETA excludes the setup."""
    times = iter([0.0, 30.0, 34.0, 38.0, 66.0])
    writer = metrics_log.MetricsWriter(str(tmp_path), 20, enabled=True, clock=lambda: next(times))
    row = {"loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.0}
    for step in (10, 11, 12, 19):
        writer.write(step, row | {"learning_rate": 1e-5})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("| elapsed 0:00:30, eta ?")
    assert lines[1].endswith("| elapsed 0:00:34, eta 0:00:32")  # 4 s x 8 steps left
    assert lines[2].endswith("| elapsed 0:00:38, eta 0:00:28")
    assert lines[3].endswith("| elapsed 0:01:06, eta 0:00:00")  # the last step


def test_progress_bars_only_on_a_terminal(monkeypatch, capsys):
    from dpo_jax import progress

    assert list(progress.bar(range(3), what="export", unit="tensor", total=3)) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # not a terminal: no bar in the log
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    assert list(progress.bar(range(3), what="export", unit="tensor", total=3)) == [0, 1, 2]
    assert "export" in capsys.readouterr().err


def test_report_shows_the_data_and_no_absolute_path(workdir):
    lengths = {"p5": 10, "p50": 20, "p90": 30, "p99": 39, "max": 40, "mean": 21.0}
    source = {"source": f"{workdir}/train.jsonl", "format": "explicit", "records": 70}
    source |= {"pairs": 64, "truncated": {"prompt_left": 3}, "dropped": {"empty_chosen": 6}}
    data_report = {
        "train": {"pairs": 64, "sources": [source], "lengths": {"sequence": lengths}},
        "validation": {"": {"pairs": 8, "sources": [], "lengths": {"prompt": lengths}}},
        "batching": {"mode": "padded", "padding_efficiency": 0.6739, "steps_per_epoch": 8},
        "total_steps": 8,
    }
    (workdir / "data_report.json").write_text(json.dumps(data_report))
    page = open(report.write_report(str(workdir)), encoding="utf-8").read()
    data = page[page.index("<h2>Data</h2>") :]
    for text in ("train.jsonl", "<td>70</td>", "<td>64</td>", "truncated prompt_left: 3"):
        assert text in data, text
    assert "dropped empty_chosen: 6" in data and "eval validation" in data
    assert "<td>padding_efficiency</td><td>0.6739</td>" in data
    assert "<td>total_steps</td><td>8</td>" in data
    assert str(workdir) not in page
