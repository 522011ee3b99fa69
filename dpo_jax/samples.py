"""Generated samples during training: reference next to policy, scored by a checker.

Rows appended to DIR/samples.jsonl:
  {"step", "prompt", "reference", "policy", "reference_preferred", "policy_preferred"}
and metrics eval/samples/{reference,policy}_preferred_rate when a checker is configured.
The reference's replies are sampled once (it never changes) with the same seed.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable

import jax

from dpo_jax import generate

# Rule-based checkers by name: "module:function" taking a reply and returning a bool.
CHECKERS = {"courtesy": "dpo_jax.embedded.courtesy:is_preferred"}


def load_checker(name: str) -> Callable[[str], bool] | None:
    if not name:
        return None
    if name not in CHECKERS:
        raise ValueError(
            f"config eval.sample_checker={name!r}: choose '' or one of {sorted(CHECKERS)}"
        )
    module, function = CHECKERS[name].split(":")
    return getattr(importlib.import_module(module), function)


def read_prompts(path: str) -> list[str]:
    """Prompts from .jsonl ({"prompt": ...} per line) or a text file (one per line)."""
    try:
        return generate.read_prompts(path)
    except generate.GenerateError as error:
        raise ValueError(f"config eval.sample_prompts_file: {error}") from None


def make_sampler(
    workdir: str,
    s,
    model_config,
    tokenizer,
    apply_chat_template: bool,
) -> SampleWriter | None:
    """The generated-samples hook of a run's settings.SampleSettings `s` (None when it names
    no prompts file)."""
    if not s.prompts_file:
        return None
    prompts = read_prompts(s.prompts_file)
    if s.num_prompts > 0:
        prompts = prompts[: s.num_prompts]
    return SampleWriter(
        workdir,
        model_config,
        tokenizer,
        prompts,
        generate.SamplingConfig(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_k=s.top_k,
            top_p=s.top_p,
            seed=s.seed,
        ),
        load_checker(s.checker),
        apply_chat_template,
    )


class SampleWriter:
    """Samples replies to fixed prompts from the policy (and once from the reference)."""

    def __init__(
        self,
        workdir: str,
        model_config,
        tokenizer,
        prompts: list[str],
        sampling: generate.SamplingConfig,
        checker: Callable[[str], bool] | None,
        apply_chat_template: bool = True,
    ):
        self.path = os.path.join(workdir, "samples.jsonl")
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.sampling = sampling
        self.checker = checker
        self.apply_chat_template = apply_chat_template
        self.reference_replies = None

    def replies(self, params) -> list[str]:
        return generate.generate_text(
            self.model_config,
            params,
            self.tokenizer,
            self.prompts,
            self.sampling,
            apply_chat_template=self.apply_chat_template,
        )

    def sample_reference(self, ref_params) -> None:
        """Samples the reference's replies now (when its weights will not be kept)."""
        self.reference_replies = self.replies(ref_params)

    def __call__(self, step: int, params, ref_params) -> dict[str, float]:
        policy = self.replies(params)
        if self.reference_replies is None and ref_params is not None:
            self.reference_replies = self.replies(ref_params)
        reference = self.reference_replies or [None] * len(policy)
        metrics = {}
        rows = []
        for prompt, ref_reply, policy_reply in zip(self.prompts, reference, policy, strict=True):
            row = {"step": step, "prompt": prompt, "reference": ref_reply, "policy": policy_reply}
            if self.checker is not None:
                row["policy_preferred"] = bool(self.checker(policy_reply))
                if ref_reply is not None:
                    row["reference_preferred"] = bool(self.checker(ref_reply))
            rows.append(row)
        if self.checker is not None:
            metrics["eval/samples/policy_preferred_rate"] = _rate(rows, "policy_preferred")
            if self.reference_replies is not None:
                metrics["eval/samples/reference_preferred_rate"] = _rate(
                    rows, "reference_preferred"
                )
        if jax.process_index() == 0:
            with open(self.path, "a", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return metrics


def _rate(rows: list[dict], key: str) -> float:
    return sum(row[key] for row in rows) / max(len(rows), 1)
