"""Real W&B in offline mode: our WandbWriter logs steps 1-5, then its resumption (from a
checkpoint at step 3) logs 4-6 into the same run id; prints the metric definitions and the
history rows (our step, W&B's _step, loss) that each offline run file holds.

    pip install wandb && python scripts/wandb_offline_check.py

W&B is not a test dependency (its install is large), so CI runs the fake-W&B test in
tests/test_report.py; this is the check against the real package. The run files are read
with a small reader of their record format (wandb 0.31 has no Python reader of its own)."""

import glob
import json
import os
import struct
import tempfile

os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"

from wandb.proto import wandb_internal_pb2  # noqa: E402

from dpo_jax import metrics_log  # noqa: E402

BLOCK = 32768  # LevelDB-log blocks; record kinds FULL=1, FIRST=2, MIDDLE=3, LAST=4


def records(path: str):
    """The protobuf records of a .wandb file: a 7-byte header, then (crc, length, kind)."""
    with open(path, "rb") as f:
        raw = f.read()
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pending += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield pending
            pending = b""


def main() -> None:
    workdir = tempfile.mkdtemp()
    for steps in ((1, 2, 3, 4, 5), (4, 5, 6)):  # a run, then its resumption
        writer = metrics_log.WandbWriter(workdir, project="check", config={"a": 1})
        for step in steps:
            writer.write(step, {"loss": 1.0 / step})
        writer.close()
    for path in sorted(glob.glob(f"{workdir}/wandb/offline-run-*/run-*.wandb")):
        shown = []
        for data in records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            kind = record.WhichOneof("record_type")
            if kind == "metric":
                metric = record.metric
                shown.append(("define_metric", metric.name or metric.glob_name, metric.step_metric))
            elif kind == "history":
                items = record.history.item
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                shown.append((items.get("step"), items.get("_step"), items.get("loss")))
        print(os.path.basename(os.path.dirname(path)), shown)


if __name__ == "__main__":
    main()
