"""The config schema, written once: every key with its default and a comment saying what it
means. The defaults are the real-model ones (Llama-3.2-1B on UltraFeedback, one 8-GPU host);
configs/*.py start from `default_config()` and set only what differs. dpo_jax.settings turns
a config into typed settings.
"""

from __future__ import annotations

import ml_collections

from dpo_jax.sharding import DEFAULT_RULES


def default_config() -> ml_collections.ConfigDict:
    """Every key with its default (Llama-3.2-1B on UltraFeedback, one 8-GPU host)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    c.model.name = "meta-llama/Llama-3.2-1B-Instruct"  # HF hub id or local folder
    c.model.init = "pretrained"  # weights of model.name ("random": fresh, from training.seed)
    c.model.max_length = 2048  # longest sequence the model is run on
    c.model.dtype = "bfloat16"  # compute dtype ("float32" on CPU)
    c.model.param_dtype = "float32"  # master weights
    c.model.attention_impl = "cudnn"  # cuDNN flash attention on GPU ("xla" elsewhere)
    c.model.remat_policy = "dots_saveable"  # none | dots_saveable | full
    c.model.logits_chunk_size = 8192  # vocabulary chunk of the log-prob (bounds logits memory)

    c.data = ml_collections.ConfigDict()
    c.data.train_file = "hf:HuggingFaceH4/ultrafeedback_binarized@train_prefs"  # 61k pairs
    c.data.validation_file = "hf:HuggingFaceH4/ultrafeedback_binarized@test_prefs"  # "" = none
    c.data.tokenizer = ""  # "" = the tokenizer in model.name
    c.data.max_seq_length = 2048  # prompt + completion tokens per sequence (row length)
    c.data.max_prompt_length = 1024  # prompts keep their last this-many tokens (0 = no limit)
    c.data.apply_chat_template = True  # render prompts as a user turn of the chat template
    c.data.validation_files = ""  # more named eval sets: "name=path,name2=path2" -> eval/<name>/...
    c.data.train_weights = ""  # mixture weights, one per train_file source ("" = concatenate)
    c.data.format = "auto"  # auto | explicit | conversational | implicit | ranked | hh
    c.data.fields = ""  # field-name mapping, e.g. "prompt=question,chosen=good,rejected=bad"
    c.data.roles = ""  # role-name mapping, e.g. "human=user,gpt=assistant"
    c.data.system_prompt = ""  # prepended as a system turn when the data has none
    c.data.ranked_pairs = "best_worst"  # ranked completions -> pairs
    c.data.ranked_ties = "error"  # error | skip: never a pair with equal ranks
    c.data.truncation = "truncate"  # truncate | error: what to do with over-long pairs
    c.data.on_error = "raise"  # raise: stop at the first bad record; skip: count and go on
    # Pack whole pairs into rows (segment ids) instead of padding every sequence to
    # max_seq_length; a step still holds training.batch_size pairs (a pair that does not fit
    # moves to the next step). On for real models: most of a padded row is padding.
    c.data.packing = True
    # Rows of max_seq_length per packed micro-batch (0 = the fewest that hold all the pairs
    # of 98% of the data's micro-batches, sized from its lengths after tokenization).
    c.data.packed_rows = 0
    # Packed pairs as [prompt | chosen | rejected] with the prompt computed once (rows of
    # 2 x max_seq_length; needs data.packing). Saves the prompt's second pass.
    c.data.prefix_sharing = False
    # With packing: sequences per row at most (0 = as many as fit). On cuDNN (Hopper,
    # cuDNN >= 9.6) a bound >= 2 sends packed rows to the flash kernel as segments
    # instead of a dense mask bias; its softmax statistics grow with the bound (8-16).
    # Elsewhere (XLA attention, older cuDNN, prefix sharing) the rows take the mask path.
    c.data.max_segments_per_row = 16
    c.data.bucket_lengths = ""  # padded row lengths: "" = max_seq_length, "auto", "128,256"
    c.data.shuffle = True  # shuffle pairs per epoch (seeded by training.seed)
    c.data.num_proc = 0  # tokenization workers (0 = automatic)
    c.data.cache_dir = ""  # tokenization cache ("" = default under ~/.cache, "none" = off)
    c.data.prefetch = 2  # batches built and placed on the device ahead of the step (0 = off)

    c.training = ml_collections.ConfigDict()
    c.training.batch_size = 64  # pairs per optimizer step (all devices, all micro-batches)
    c.training.gradient_accumulation_steps = 2  # micro-batches per step (8 GPUs x 8 rows)
    c.training.learning_rate = 1e-6  # peak
    c.training.num_epochs = 1
    c.training.max_steps = -1  # > 0 overrides num_epochs
    c.training.warmup_steps = 100  # linear from 0 to the peak (~10% of one epoch)
    c.training.lr_schedule = "cosine"  # cosine | linear | constant, after warmup
    c.training.min_lr_ratio = 0.0  # the decay ends at this fraction of the peak
    c.training.weight_decay = 0.0
    c.training.max_grad_norm = 1.0  # global-norm clipping (0 = off)
    c.training.adam_b1 = 0.9
    c.training.adam_b2 = 0.999
    c.training.adam_eps = 1e-8
    # bfloat16 moments halve the optimizer memory (stochastic rounding keeps them unbiased)
    c.training.optimizer_state_dtype = "float32"  # float32 | bfloat16
    c.training.seed = 0  # init and data order
    c.training.beta = 0.1  # DPO temperature: larger = stay closer to the reference
    c.training.loss_type = "sigmoid"  # a name or "a,b" / a list; see dpo_jax.losses.LOSSES
    c.training.loss_weights = ""  # one per loss_type ("" = all 1.0)
    # cDPO (sigmoid) / robust / exo_pair / aot; TRL 1.16's sigmoid ignores it
    c.training.label_smoothing = 0.0
    c.training.reference_free = False  # reference log-probs ≡ 0
    # Reference log-probs computed once before training (cached on disk) instead of a
    # reference forward in every step: 25% fewer FLOPs, no reference weights on device.
    c.training.precompute_ref_log_probs = False
    c.training.preference_average_log_probs = False  # length-normalise the preference logps
    c.training.sft_average_log_probs = True  # SFT NLL per token (False: per sequence)
    # pair: each pair's SFT NLL (as sft_average_log_probs says), averaged over the pairs
    # (NeMo RL's); batch_tokens: the NLL of every chosen token of the optimizer step over
    # their count (TRL's), so long replies weigh more. Both exact under accumulation.
    c.training.sft_normalization = "pair"
    # f-DPO: reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence (with the coef)
    c.training.f_divergence_type = "reverse_kl"
    c.training.f_alpha_divergence_coef = 1.0
    # WPO (TRL's use_weighting): each pair's loss times exp(mean aligned log-prob) of its
    # two completions, reweighting off-policy pairs towards what the policy would sample
    c.training.use_weighting = False
    # LD-DPO (TRL's ld_alpha): log-probs of the part of the longer reply beyond the shorter
    # one's length count this much (1.0 = plain DPO; the paper uses ~0.3-0.7)
    c.training.ld_alpha = 1.0
    c.training.preference_loss_weight = 1.0
    c.training.sft_loss_weight = 0.0  # + NLL of the chosen reply (RPO): keeps its likelihood up
    # simpo's margin, discopop's temperature, bco_pair's fixed delta (TRL 1.16: 0)
    c.training.loss_hparams = ml_collections.ConfigDict(
        {"simpo_gamma": 0.5, "discopop_tau": 0.05, "bco_delta": 0.0}
    )
    c.training.gradient_checkpointing = True  # remat the layers (model.remat_policy)
    # TR-DPO (TRL's names): every ref_model_sync_steps steps the reference becomes
    # ref_model_mixup_alpha · policy + (1 - alpha) · reference. Full fine-tuning only, and
    # not with precompute_ref_log_probs (a fixed reference).
    c.training.sync_ref_model = False
    c.training.ref_model_mixup_alpha = 0.6
    c.training.ref_model_sync_steps = 512
    # A step whose loss or gradients are not finite never updates the weights. stop: end the
    # run there (exit 1, the last checkpoint kept); skip: count it and go on.
    c.training.nonfinite = "stop"

    # LoRA (rank > 0): only rank-r adapters on lora.targets train; the reference is the
    # frozen base with the adapters off (no second copy of the weights), and checkpoints
    # hold the adapters and their optimizer state. quantization stores the frozen base as
    # int8 or nf4 (QLoRA: 4-bit NormalFloat, dequantized in each layer's matmul).
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full fine-tuning
    c.lora.alpha = 16.0  # the update is scaled by alpha / rank (PEFT's lora_alpha)
    c.lora.dropout = 0.0  # on the adapters' input, training steps only
    c.lora.targets = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    c.lora.quantization = "none"  # none | int8 | nf4 (the frozen base's storage)

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # pure data parallelism
    c.mesh.fsdp = -1  # parameter + data sharding (-1 = the remaining devices)
    c.mesh.tensor = 1  # Megatron-style heads / mlp split
    c.mesh.rules = DEFAULT_RULES  # logical parameter axis → mesh axis

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 200
    c.checkpoint.max_to_keep = 2  # the latest ones (resume uses the newest)
    # Also keep the best by an eval metric, e.g. "eval/rewards/accuracies" or "eval/loss"
    # ("eval/<set>/..." for a named validation set); "" = off. Each evaluation then saves a
    # checkpoint carrying its metrics; Orbax keeps the keep_best_count best of those beside
    # the max_to_keep latest. `python -m dpo_jax.export --step best` writes the best one.
    c.checkpoint.keep_best = ""
    c.checkpoint.keep_best_mode = "auto"  # "max", "min"; auto = min for a *loss, else max
    c.checkpoint.keep_best_count = 1
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = True  # write DIR/hf/ (Hugging Face format) at the end
    c.checkpoint.export_dtype = "bfloat16"  # dtype of the exported weights

    c.logging = ml_collections.ConfigDict()
    c.logging.every_steps = 10
    c.logging.tensorboard = True  # DIR/tensorboard event files
    c.logging.wandb = False  # also Weights & Biases, when wandb is installed
    c.logging.wandb_project = "dpo_jax"
    c.logging.report = True  # DIR/report.html + DIR/plots/*.png at the end

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 200  # 0 (or less) = only at the end
    c.eval.batch_size = 64  # pairs per eval batch
    # Generated samples: replies to held-out prompts, reference next to policy, in
    # DIR/samples.jsonl (a .jsonl of {"prompt"}), scored by a rule-based checker into
    # eval/samples/*_preferred_rate when one is named.
    c.eval.sample_prompts_file = ""  # "" = no samples
    c.eval.sample_every_steps = 0  # 0 = at the end only; -1 = never
    c.eval.num_sample_prompts = 64  # -1 = all prompts in the file
    c.eval.sample_max_new_tokens = 256
    c.eval.sample_temperature = 0.7  # 0 = greedy
    c.eval.sample_top_k = 0  # 0 = off
    c.eval.sample_top_p = 0.95  # nucleus sampling (1 = off)
    c.eval.sample_seed = 0
    c.eval.sample_checker = ""  # "" = none; see dpo_jax.samples.CHECKERS
    return c


def with_overrides(config: ml_collections.ConfigDict, overrides: dict):
    """`config` with dotted keys replaced ({"model.name": ..., ...}); a key the schema does
    not have fails (ml_collections alone would add a misspelt leaf)."""
    for key in overrides:
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        if leaf not in node:
            raise KeyError(f"{key}: not a config key (see dpo_jax/schema.py)")
    config.update_from_flattened_dict(overrides)
    return config
