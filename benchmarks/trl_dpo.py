"""TRL's DPOTrainer on the same model shape, pairs and batch as ``python -m dpo_jax.bench``.

    python benchmarks/trl_dpo.py --preset llama3_2_1b                       # 4 pairs of 512+512
    python benchmarks/trl_dpo.py --preset llama3_2_1b --lengths hh --pairs_per_step 8
    python benchmarks/trl_dpo.py --preset tiny --steps 2 --warmup_steps 1   # CPU smoke run

What is the same as dpo_jax.bench (benchmarks/README.md has the fairness rules):

* the model: a transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` built from the same
  config dict (``dpo_jax.bench_workload.PRESETS``, or the embedded tiny ``config.json``),
  random init;
* the pairs: ``dpo_jax.bench_workload.synthetic_steps`` itself, called with configs/bench.py's
  config set from these flags, so step k trains on exactly the pairs of our step k;
* the batch: ``--pairs_per_step`` pairs per optimizer step, in order (sequential sampler),
  split into ``--gradient_accumulation_steps`` micro-batches like ours;
* the reference forward runs inside every step (``precompute_ref_log_probs=False``; the
  ``--precompute_ref_log_probs`` option runs TRL's one pass before training instead);
* the figures: MFU with ``dpo_jax.throughput.sequence_flops`` over the real sequence lengths
  (6N per token + 2N for the reference forward + causal attention, padding never counted)
  and ``dpo_jax.throughput.peak_flops``, and the same JSON fields, one line at the end.

Everything else is TRL's default (``DPOConfig``): its collator pads each micro-batch to its
longest row, its fused LM head, AdamW (torch) with grad-norm clipping, the attention that
transformers picks (SDPA). Defaults of the flags come from ``configs/bench.py[:preset]``:
bf16 weights (so bf16 gradients and AdamW states: torch keeps them in the weights' dtype) and
bf16 autocast for the GPU presets, float32 for tiny; ``--param_dtype float32`` gives fp32
master weights and AdamW states with bf16 autocast. The JSON's ``precision`` names the policy
with the label dpo_jax.bench uses.

Only TRL's own tokenisation is skipped: the pairs arrive as token ids (``prompt_ids``,
``chosen_ids``, ``rejected_ids``, the columns TRL's collator reads), since random ids have no
text. Nothing in the training step changes.

Timings: ``step_s`` is the median, over the timed steps, of on_step_begin → on_step_end
(forward, backward, clipping and optimizer step of one optimizer step; the device synchronised
at both ends on GPU). ``compile_s`` is TRL's one-time cost before the steady state: trainer
construction, ``train()``'s preparation and the first step (lazy CUDA/cuBLAS initialisation,
allocator warm-up); torch compiles nothing ahead. ``setup_s`` and ``first_step_s`` give its two
parts; ``init_s``, the random initialisation of the two models, is left out like dpo_jax's
parameter init.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

# dpo_jax is used for its shapes, pair generator and FLOP/peak formulas only: JAX must not
# take the GPU (it preallocates most of its memory) from the torch run.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from dpo_jax import bench_workload, embedded, model, settings, throughput  # noqa: E402

DTYPES = ("bfloat16", "float32")


def bench_config(preset: str):
    """configs/bench.py's get_config(preset): the defaults dpo_jax.bench runs with."""
    spec = importlib.util.spec_from_file_location("configs_bench", REPO / "configs" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def parse_args(argv=None) -> argparse.Namespace:
    presets = ("tiny", *bench_workload.PRESETS)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default="tiny", choices=presets)
    c = bench_config(first.parse_known_args(argv)[0].preset)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=presets, help="model shape")
    p.add_argument("--lengths", default=c.bench.lengths, choices=("fixed", "hh"))
    p.add_argument("--prompt_length", type=int, default=c.bench.prompt_length)
    p.add_argument("--completion_length", type=int, default=c.bench.completion_length)
    p.add_argument(
        "--max_length",
        type=int,
        default=c.data.max_seq_length,
        help="longest pair side (prompt + completion); dpo_jax's data.max_seq_length",
    )
    p.add_argument("--pairs_per_step", type=int, default=c.training.batch_size)
    p.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=c.training.gradient_accumulation_steps,
        help="micro-batches per step (pairs_per_step / this pairs each)",
    )
    p.add_argument("--steps", type=int, default=c.bench.steps, help="timed steps (median)")
    p.add_argument(
        "--warmup_steps", type=int, default=c.bench.warmup_steps, help="untimed, after the first"
    )
    p.add_argument("--seed", type=int, default=c.bench.seed, help="pair generator seed")
    p.add_argument(
        "--gradient_checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="TRL's gradient checkpointing (its DPOConfig defaults to on; off here, like "
        "dpo_jax's remat_policy=none)",
    )
    p.add_argument(
        "--dtype",
        default=c.model.dtype,
        choices=DTYPES,
        help="compute dtype: bfloat16 turns on DPOConfig(bf16=True) autocast",
    )
    p.add_argument(
        "--param_dtype",
        default=c.model.param_dtype,
        choices=DTYPES,
        help="weights, gradients and AdamW states (torch keeps them in the weights' dtype)",
    )
    p.add_argument(
        "--attn_implementation",
        default=None,
        help="transformers attention (default: its own choice, sdpa)",
    )
    p.add_argument(
        "--precompute_ref_log_probs",
        action="store_true",
        help="TRL's one pass of the reference over the data before training (timed in "
        "setup_s); the step then has no reference forward and its FLOPs count 6N, not 8N",
    )
    p.add_argument("--beta", type=float, default=c.training.beta)
    p.add_argument("--loss_type", default=c.training.loss_type)
    p.add_argument("--learning_rate", type=float, default=c.training.learning_rate)
    p.add_argument("--output", default=None, help="also append the JSON line to this file")
    args = p.parse_args(argv)
    if args.pairs_per_step % args.gradient_accumulation_steps:
        p.error("--pairs_per_step must be a multiple of --gradient_accumulation_steps")
    if args.lengths == "fixed" and args.prompt_length + args.completion_length > args.max_length:
        p.error("--prompt_length + --completion_length must not exceed --max_length")
    args.bench_config = c
    return args


def workload_config(args):
    """configs/bench.py's config set from these flags: what dpo_jax.bench runs for the same
    workload (its pairs come from it)."""
    c = copy.deepcopy(args.bench_config)
    c.bench.lengths = args.lengths
    c.bench.prompt_length = args.prompt_length
    c.bench.completion_length = args.completion_length
    c.bench.seed = args.seed
    c.bench.steps, c.bench.warmup_steps = args.steps, args.warmup_steps
    c.data.max_seq_length = args.max_length
    c.training.batch_size = args.pairs_per_step
    c.training.gradient_accumulation_steps = args.gradient_accumulation_steps
    c.training.precompute_ref_log_probs = args.precompute_ref_log_probs
    c.model.dtype, c.model.param_dtype = args.dtype, args.param_dtype
    c.training.optimizer_state_dtype = args.param_dtype  # torch's AdamW: the weights' dtype
    c.model.remat_policy = "full" if args.gradient_checkpointing else "none"
    return c


def hf_config(preset: str):
    """The transformers config of the preset, from the same dict dpo_jax.bench reads."""
    import transformers

    if preset == "tiny":
        return transformers.AutoConfig.from_pretrained(embedded.TINY_MODEL_DIR)
    fields = dict(bench_workload.PRESETS[preset])
    (architecture,) = fields.pop("architectures")
    return getattr(transformers, architecture).config_class(architectures=[architecture], **fields)


def dataset_columns(steps) -> dict[str, list[list[int]]]:
    """The pairs of every step, in order, as the id columns TRL's collator reads."""
    fields = (("prompt_ids", "prompt"), ("chosen_ids", "chosen"), ("rejected_ids", "rejected"))
    return {
        name: [getattr(pair, field).tolist() for pairs in steps for pair in pairs]
        for name, field in fields
    }


def padded_tokens(pairs, micro: int) -> int:
    """Row slots of one step as TRL's collator lays them out: 2 rows per pair (chosen, rejected),
    each micro-batch padded to its longest row (DPOConfig.pad_to_multiple_of=None on GPU/CPU)."""
    total = 0
    for start in range(0, len(pairs), micro):
        part = pairs[start : start + micro]
        total += 2 * len(part) * max(max(pair.lengths) for pair in part)
    return total


def sequence_lengths(pairs) -> list[int]:
    """Real lengths of a step's sequences: prompt + chosen, prompt + rejected per pair."""
    return [n for pair in pairs for n in pair.lengths]


def real_tokens(pairs) -> int:
    return sum(sequence_lengths(pairs))


def versions() -> dict:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl

    return {
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "accelerate": accelerate.__version__,
        "datasets": datasets.__version__,
        "python": platform.python_version(),
    }


def device_peak_flops(device_name: str) -> tuple[float, str]:
    """dpo_jax.throughput.peak_flops for a torch device, by name. For the CPU's nominal
    figure, it divides the process's cores among JAX's (possibly emulated) CPU devices; torch
    runs one process on all of them, so take the whole."""
    peak, source = throughput.peak_flops(types.SimpleNamespace(device_kind=device_name))
    if source.endswith("nominal"):
        import jax

        peak *= jax.local_device_count()
    return peak, source


def run(args) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    micro = args.pairs_per_step // args.gradient_accumulation_steps
    num_steps = 1 + args.warmup_steps + args.steps
    workload = bench_workload.workload(workload_config(args))
    ours = bench_workload.model_config_for(workload)

    started = time.perf_counter()
    config = hf_config(args.preset)
    torch.manual_seed(args.seed)
    init = {"dtype": getattr(torch, args.param_dtype)}
    if args.attn_implementation:
        init["attn_implementation"] = args.attn_implementation
    with device:
        policy = transformers.AutoModelForCausalLM.from_config(config, **init)
    # Same weights, like dpo_jax's reference copy. With precomputed log-probs TRL's reference
    # pass runs on the policy at start (the same weights) and no reference model is held.
    reference = None if args.precompute_ref_log_probs else copy.deepcopy(policy)
    params = sum(p.numel() for p in policy.parameters())
    sync()
    init_s = time.perf_counter() - started  # like dpo_jax's init_state: not in compile_s
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded.TINY_MODEL_DIR)

    steps = bench_workload.synthetic_steps(workload, config.vocab_size, num_steps)
    train_dataset = datasets.Dataset.from_dict(dataset_columns(steps))

    class PretokenizedDPOTrainer(trl.DPOTrainer):
        """DPOTrainer whose dataset is already ids: TRL's text tokenisation is skipped."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begins, self.ends, self.losses = [], [], []

        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.begins.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="trl_dpo_bench_") as output_dir:
        started = time.perf_counter()
        dpo_config = trl.DPOConfig(
            output_dir=output_dir,
            max_steps=num_steps,
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            train_sampling_strategy="sequential",  # step k gets our step k's pairs
            learning_rate=args.learning_rate,
            beta=args.beta,
            loss_type=[args.loss_type],
            max_length=args.max_length,
            # False (the default here): the reference forward runs in every step.
            precompute_ref_log_probs=args.precompute_ref_log_probs,
            gradient_checkpointing=args.gradient_checkpointing,
            bf16=args.dtype == "bfloat16",
            use_cpu=not cuda,  # transformers refuses bf16 on CPU without it
            seed=args.seed,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            push_to_hub=False,
            disable_tqdm=True,
        )
        trainer = PretokenizedDPOTrainer(
            model=policy,
            ref_model=reference,
            args=dpo_config,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
        for quiet in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(quiet)
        trainer.train()
        sync()

    times = [end - begin for begin, end in zip(timer.begins, timer.ends, strict=True)]
    if len(times) != num_steps:
        raise RuntimeError(f"timed {len(times)} steps, expected {num_steps}")
    # Construction of the trainer and train()'s own preparation (accelerator, optimizer,
    # data loader) up to the first step, then the first step.
    setup_s, first_step_s = timer.begins[0] - started, times[0]
    in_step_reference = not args.precompute_ref_log_probs
    timed = steps[1 + args.warmup_steps :]
    step_s = statistics.median(times[1 + args.warmup_steps :])
    tokens = float(np.mean([real_tokens(pairs) for pairs in timed]))
    slots = float(np.mean([padded_tokens(pairs, micro) for pairs in timed]))
    flops = float(
        np.mean(
            [
                throughput.sequence_flops(ours, sequence_lengths(pairs), in_step_reference)
                for pairs in timed
            ]
        )
    )
    device_name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak, peak_source = device_peak_flops(device_name)
    gib = 2**30
    fixed = args.lengths == "fixed"
    result = {
        "trainer": "trl",
        "preset": args.preset,
        "device": device_name,
        "devices": 1,
        "params": params,
        "trainable_params": params,  # full fine-tuning: this script runs no PEFT adapters
        "lora_rank": 0,
        "quantization": "none",
        "pairs_per_step": args.pairs_per_step,
        "compile_s": round(setup_s + first_step_s, 2),
        "step_s": round(step_s, 4),
        "pairs_per_s": round(args.pairs_per_step / step_s, 3),
        "tokens_per_s": round(tokens / step_s, 1),
        "padding_fraction": round(1 - tokens / slots, 4),
        "mfu": round(flops / step_s / peak, 4),
        "peak_flops_source": peak_source,
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / gib, 2) if cuda else None,
        "loss": timer.losses[-1] if timer.losses else None,
        "estimated_memory_gb": None,  # dpo_jax's own estimate; TRL has none
        "compiled_temp_gb": None,  # XLA's plan of dpo_jax's step; torch plans nothing ahead
        # The workload (benchmarks/compare.py pairs runs by these) ...
        "lengths": args.lengths,
        "prompt_length": args.prompt_length if fixed else None,
        "completion_length": args.completion_length if fixed else None,
        "max_seq_length": args.max_length,
        "batch_size": args.pairs_per_step,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "seed": args.seed,
        "precision": bench_workload.precision(args.param_dtype, args.param_dtype, args.dtype),
        "precompute_ref_log_probs": args.precompute_ref_log_probs,
        # ... and how TRL ran it: rows padded to the longest of each micro-batch.
        "packing": False,
        "prefix_sharing": False,  # TRL has no prefix sharing for DPO
        "max_segments_per_row": None,
        "cudnn_packed_layout": False,
        "row_length": args.max_length,
        "rows_per_micro_batch": 2 * micro,
        "tokens_per_micro_batch": round(slots / args.gradient_accumulation_steps, 1),
        "tokens_per_step": tokens,
        "remat_policy": "full" if args.gradient_checkpointing else "none",
        "dtype": args.dtype,
        "param_dtype": args.param_dtype,
        "optimizer_state_dtype": args.param_dtype,  # torch's AdamW: the weights' dtype
        "attention_impl": policy.config._attn_implementation,
        "logits_chunk_size": None,  # TRL's fused LM head chunks by its own rule
        # TRL-only detail
        "init_s": round(init_s, 2),
        "setup_s": round(setup_s, 2),
        "first_step_s": round(first_step_s, 3),
        "max_length": args.max_length,
        "gradient_checkpointing": args.gradient_checkpointing,
        "optim": getattr(dpo_config.optim, "value", str(dpo_config.optim)),
        "peak_memory_reserved_gb": (
            round(torch.cuda.max_memory_reserved(device) / gib, 2) if cuda else None
        ),
        "dpo_jax_params": model.num_params(ours),
        **versions(),
    }
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        result = run(args)
    except settings.USER_ERRORS as error:  # the workload's sizes or preset
        raise SystemExit(f"error: {error}") from None
    for key, value in result.items():
        print(f"{key:>24}: {value}")
    line = json.dumps(result)
    if args.output:
        with open(args.output, "a") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
