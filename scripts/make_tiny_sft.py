"""Makes the starting model of the embedded default with this project's own trainer.

    python scripts/make_tiny_sft.py [--workdir /tmp/tiny_sft]

1. writes SFT data: each embedded pair's polite or rude response at random (50/50);
2. trains configs/tiny.py:sft (loss "sft") from random weights;
3. saves the result in Hugging Face format into dpo_jax/embedded/tiny/ (model.safetensors
   next to the tokenizer and config.json), where configs/tiny.py loads it from;
4. samples replies to the held-out prompts and reports how often they are courteous
   (should be about half: the room DPO has to improve).
Deterministic for a given machine and library versions.
"""

import argparse
import importlib.util
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, *args):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/tiny_sft")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from dpo_jax import embedded, generate, hf, settings, state, train
    from dpo_jax.embedded import courtesy

    os.makedirs(args.workdir, exist_ok=True)
    train_file = os.path.join(args.workdir, "sft_train.jsonl")
    validation_file = os.path.join(args.workdir, "sft_validation.jsonl")
    courtesy.write_jsonl(
        train_file, courtesy.sft_records(courtesy.read_jsonl(embedded.TRAIN_FILE), seed=0)
    )
    courtesy.write_jsonl(
        validation_file, courtesy.sft_records(courtesy.read_jsonl(embedded.VALIDATION_FILE), seed=1)
    )

    config = load_config("tiny", "sft")
    config.data.train_file = train_file
    config.data.validation_file = validation_file
    run_dir = os.path.join(args.workdir, "run")
    result = train.train(config, run_dir)
    model_config = state.model_config(settings.from_config(config).model)
    tokenizer = AutoTokenizer.from_pretrained(embedded.TINY_MODEL_DIR)
    # Only the weights go next to the committed tokenizer and config.json (which the
    # tokenizer script writes); a full export would rewrite those files.
    exported = os.path.join(args.workdir, "hf")
    hf.save_pretrained(exported, model_config, result.state.params)
    weights = os.path.join(embedded.TINY_MODEL_DIR, "model.safetensors")
    shutil.copyfile(os.path.join(exported, "model.safetensors"), weights)
    print(f"saved {weights}")

    prompts = courtesy.heldout_prompts(courtesy.read_jsonl(embedded.VALIDATION_FILE))
    sampling = generate.SamplingConfig(max_new_tokens=48, temperature=1.0, seed=0)
    replies = generate.generate_text(
        model_config, result.state.params, tokenizer, prompts, sampling
    )
    rate = courtesy.score(replies)
    print(f"held-out prompts: {len(prompts)}; courteous replies: {rate:.3f}")
    for prompt, reply in list(zip(prompts, replies, strict=True))[:5]:
        print(f"  {prompt!r} -> {reply!r}")


if __name__ == "__main__":
    sys.exit(main())
