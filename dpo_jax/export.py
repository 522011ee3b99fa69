"""Export a training checkpoint as a Hugging Face folder.

    python -m dpo_jax.export --workdir runs/x [--step N|best] --out runs/x/hf-N [--dtype bfloat16]

Restores only the policy params of DIR/checkpoints/<step> (the latest by default; with
`--step best` the best by the run's checkpoint.keep_best; the optimizer state is never read)
onto an fsdp mesh of all devices, then writes safetensors,
config.json, generation_config.json and the tokenizer of the run's model (data.tokenizer when
set, else model.name) with `dpo_jax.hf.save_pretrained`. The folder loads in
`transformers.AutoModelForCausalLM.from_pretrained`, vLLM, and `dpo_jax.hf.load_pretrained`.

A LoRA run's checkpoint holds adapters: they are restored onto the run's base (model.name,
checked against the fingerprint the checkpoint recorded), and the export is the merged
model in --out plus the PEFT adapter folder <out>-adapter (adapter_config.json and
adapter_model.safetensors, for `peft.PeftModel.from_pretrained(base, folder)`).
"""

from __future__ import annotations

import json
import os

import jax
from absl import app, flags

from dpo_jax import checkpoint, hf, lora, model, settings, sharding, state
from dpo_jax.model import ModelConfig


class ExportError(ValueError):
    """A workdir or step that cannot be exported, and why."""


def write_hf(
    out: str,
    model_config: ModelConfig,
    params,
    model_name: str,
    *,
    tokenizer=None,
    dtype=None,
    max_shard_size: int | str = "5GB",
    mesh_rules=None,
) -> None:
    """An HF folder of `params` whose config.json keeps the source model's other keys (token
    ids, ...), with its generation_config.json and tokenizer (`tokenizer`: an object with
    save_pretrained or a folder / hub id; default `model_name`'s). Every process calls it.

    A LoRA policy (model.Adapted) is written merged, and its adapters as a PEFT folder at
    lora.adapter_folder(out); `mesh_rules` = (mesh, rules) places the merged weights."""
    if isinstance(params, model.Adapted):
        mesh, rules = mesh_rules
        lora.write_peft(lora.adapter_folder(out), model_config, params.adapters, model_name)
        params = lora.merged_params(
            model_config, params, state.param_shardings(model_config, mesh, rules)
        )
    source = hf.resolve_model_path(model_name)
    generation_config = None
    generation_file = os.path.join(source, "generation_config.json")
    if os.path.isfile(generation_file):
        with open(generation_file) as f:
            generation_config = json.load(f)
    hf.save_pretrained(
        out,
        model_config,
        params,
        tokenizer if tokenizer is not None else source,
        dtype=dtype,
        max_shard_size=max_shard_size,
        base_config=hf.read_hf_config(source),
        generation_config=generation_config,
    )


def restore_params(workdir: str, step: int | str | None = None, devices=None):
    """(the run's Settings, ModelConfig, params fsdp-sharded over `devices`, step) of
    checkpoint `step` of `workdir` (a number, "latest" = None, or "best"); the optimizer
    state is never read. A LoRA run's params are its policy, model.Adapted(base, adapters),
    the base loaded from the run's model.name and checked against the checkpoint's."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    if not os.path.isdir(directory):
        raise ExportError(f"--workdir {workdir}: no checkpoints/ folder (has it trained?)")
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    try:
        keep_best = None  # only "best" needs the run's ranking (its newest config's)
        if step == "best" and (latest := ckpt.latest_config()) is not None:
            keep_best = settings.from_config(settings.from_json(latest)).checkpoint.keep_best
        step = ckpt.resolve_step(step, keep_best)
        s = settings.from_config(settings.from_json(ckpt.read_config(step)))
        # Architecture, weight dtype and adapters only: what the exported files hold.
        model_config = hf.read_model_config(
            s.model.name, param_dtype=s.model.param_dtype, **s.model.lora.model_fields()
        )
        mesh = sharding.make_mesh(1, -1, 1, devices)
        params = state.restore_policy(ckpt, step, s, model_config, mesh)
    finally:
        ckpt.close()
    return s, model_config, params, step


def export(workdir: str, out: str, step=None, *, dtype=None, devices=None) -> int:
    """Writes checkpoint `step` (a number, None = latest, or "best") of `workdir` as an HF
    folder; returns the step written."""
    s, model_config, params, step = restore_params(workdir, step, devices)
    mesh_rules = None
    if isinstance(params, model.Adapted):
        mesh_rules = (sharding.make_mesh(1, -1, 1, devices), s.mesh.rules)
    write_hf(
        out,
        model_config,
        params,
        s.model.name,
        tokenizer=s.tokenizer,
        dtype=dtype,
        mesh_rules=mesh_rules,
    )
    return step


FLAGS = flags.FLAGS


def define_flags() -> None:
    """CLI flags, defined only when run as a program (train.py imports this module and has
    a --workdir of its own)."""
    flags.DEFINE_string("workdir", None, "Training directory (holds checkpoints/).")
    flags.DEFINE_string(
        "step", None, "Checkpoint step to export: a number, latest (default) or best."
    )
    flags.DEFINE_string("out", None, "Output folder for the Hugging Face model.")
    flags.DEFINE_string("dtype", "", "Weights dtype, e.g. bfloat16 (default: as trained).")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv) -> None:
    del argv
    sharding.initialize_distributed()
    try:
        step = export(FLAGS.workdir, FLAGS.out, FLAGS.step, dtype=FLAGS.dtype or None)
    except (
        ExportError,
        checkpoint.CheckpointError,
        checkpoint.BaseMismatch,
        *settings.USER_ERRORS,
    ) as error:
        raise SystemExit(f"error: {error}") from None
    if jax.process_index() == 0:
        print(f"exported step {step} of {FLAGS.workdir} to {FLAGS.out}", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)
