"""Orbax checkpoints of the train state, the data position and the config; auto-resume."""

from __future__ import annotations

import os
import signal

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils


class Checkpointer:
    """Saves {state, data position, config} under DIR/checkpoints/<step>.

    Orbax writes each step to a temporary directory and renames it when complete, so a run
    killed mid-save leaves the previous checkpoint as the latest one.
    """

    def __init__(self, workdir: str, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
        )
        self.preempted = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_config(self, step: int) -> dict:
        """The resolved config the run saved with checkpoint `step`."""
        return self.manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore())
        ).config

    def save(self, step: int, state, data_position: dict, config: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_position),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """Restores onto the shardings held by `abstract_state` (ShapeDtypeStructs)."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.data

    def restore_params(self, step: int, abstract_params):
        """The policy parameters alone (the optimizer state is never read), onto the
        shardings held by `abstract_params`."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item={"params": abstract_params},
                    restore_args={
                        "params": ocp.checkpoint_utils.construct_restore_args(abstract_params)
                    },
                    partial_restore=True,
                )
            ),
        )
        return restored.state["params"]

    def watch_preemption(self) -> None:
        """On SIGTERM (what SLURM and Kubernetes send before a kill) finish the current step,
        save, and exit; the same command then resumes."""

        def handler(signum, frame):
            self.preempted = True

        signal.signal(signal.SIGTERM, handler)

    def should_stop(self, step: int) -> bool:
        """Whether to save and exit now. With several processes every one must reach the
        same answer at the same step, so JAX's preemption sync point decides (the
        distributed runtime installs its own SIGTERM notice)."""
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.preempted

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs carrying the shardings of `tree`, for restoring in place."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
