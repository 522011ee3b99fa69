"""Examples → prompt / completion token ids: chat template, BOS/EOS, truncation.

With the chat template, the prompt is rendered with add_generation_prompt=True and each
completion is render(prompt + response) minus render(prompt), after checking that the
rendered prompt is a true prefix (a template that renders earlier turns differently once a
reply follows would otherwise train on text the model never sees). The two parts are
tokenized separately, exactly as the model meets them at generation time.

BOS: the template text usually holds it; it is added only when the tokenizer adds one of its
own and the text lacks it, and a doubled one is removed. EOS ends every completion (template
text after the final EOS, such as ChatML's newline, is cut; one is appended if missing).

Truncation (data.truncation="truncate"): the prompt keeps its end (and its BOS) up to
data.max_prompt_length, each completion keeps its start up to data.max_seq_length; a pair
whose prompt leaves no room for a completion token is dropped. "error": an over-long pair is
a bad record instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence

import numpy as np

from .formats import Example
from .problems import DataError, Problems, RecordError

TRUNCATION = ("truncate", "error")
_AUTO_PROC_MIN_EXAMPLES = 20_000  # below this, worker start-up costs more than it saves


@dataclasses.dataclass(frozen=True)
class TokenizedPair:
    prompt: np.ndarray  # int32 prompt ids (template and BOS included)
    chosen: np.ndarray  # int32 completion ids, EOS-terminated unless truncated
    rejected: np.ndarray
    source: str  # "file:line" of the record, for messages

    @property
    def lengths(self) -> tuple[int, int]:
        return len(self.prompt) + len(self.chosen), len(self.prompt) + len(self.rejected)


@dataclasses.dataclass(frozen=True)
class Lengths:
    max_seq_length: int  # prompt + completion tokens of one sequence
    max_prompt_length: int | None = None  # prompts keep their last this-many tokens
    truncation: str = "truncate"  # truncate | error

    def __post_init__(self):
        if self.truncation not in TRUNCATION:
            raise DataError(f"config data.truncation={self.truncation!r}: use one of {TRUNCATION}")
        if self.max_seq_length < 2:
            raise DataError(f"config data.max_seq_length={self.max_seq_length} is too small")


class Renderer:
    """Example → token ids for one tokenizer; picklable, so datasets.map workers get a copy."""

    def __init__(self, tokenizer, chat: bool):
        if chat and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "config data.apply_chat_template=True but the tokenizer has no chat template; "
                "set data.apply_chat_template=False or use a tokenizer with one"
            )
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no eos_token; completions must end with one")
        self.tokenizer, self.chat = tokenizer, chat
        self.eos, self.eos_id = tokenizer.eos_token, tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id  # kept at the front of truncated prompts
        self.add_bos = False  # whether the tokenizer adds one of its own: then prompts need it
        if self.bos_id is not None:
            probe = tokenizer("a", add_special_tokens=True)["input_ids"]
            self.add_bos = probe[:1] == [self.bos_id]

    def texts(self, example: Example) -> tuple[str, str, str]:
        """(prompt, chosen, rejected) text of one example; RecordError when it cannot be
        rendered."""
        if not self.chat:
            return example.prompt, example.chosen, example.rejected
        return self._cut(*self._render([example])[0])

    def texts_batch(self, examples: Sequence[Example]) -> list[tuple[str, str, str] | RecordError]:
        """texts() of many examples, the chat template rendered in three batched calls (one
        per part: far less overhead per example); each entry its texts or its error."""
        if not self.chat or not examples:
            return [(e.prompt, e.chosen, e.rejected) for e in examples]
        try:
            rendered = self._render(examples)
        except RecordError:  # one bad record fails the batch: find it, render the rest
            return [self._texts_or_error(e) for e in examples]
        out = []
        for parts in rendered:
            try:
                out.append(self._cut(*parts))
            except RecordError as e:
                out.append(e)
        return out

    def _texts_or_error(self, example: Example) -> tuple[str, str, str] | RecordError:
        try:
            return self.texts(example)
        except RecordError as e:
            return e

    def _render(self, examples: Sequence[Example]) -> list[tuple[str, str, str]]:
        """(prompt with the generation prompt, prompt + chosen, prompt + rejected) rendered."""
        render = functools.partial(self.tokenizer.apply_chat_template, tokenize=False)
        try:
            prompts = render([e.prompt for e in examples], add_generation_prompt=True)
            chosen = render([e.prompt + e.chosen for e in examples])
            rejected = render([e.prompt + e.rejected for e in examples])
        except Exception as e:  # jinja raise_exception, unsupported roles, ...
            raise RecordError("template_error", f"chat template failed: {e}") from None
        return list(zip(prompts, chosen, rejected, strict=True))

    def _cut(self, prompt: str, *fulls: str) -> tuple[str, str, str]:
        """The completions: each full rendering minus the prompt's, which must be its prefix."""
        completions = []
        for name, full in zip(("chosen", "rejected"), fulls, strict=True):
            if not full.startswith(prompt):
                raise RecordError(
                    "template_error",
                    f"field {name!r}: the chat template's rendering of prompt + {name} does not "
                    "start with its rendering of the prompt (with add_generation_prompt), so "
                    "the completion cannot be cut out; use a prefix-consistent template",
                )
            completion = full[len(prompt) :]
            if self.eos and completion.rstrip().endswith(self.eos):
                completion = completion.rstrip()  # e.g. ChatML's "\n" after <|im_end|>
            completions.append(completion)
        return prompt, *completions

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # what tokenizer(...) runs, minus its overhead and warnings
            encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encode(self, prompts: list[str], completions: list[str]) -> tuple[list, list]:
        prompt_ids, completion_ids = self.tokenize(prompts), self.tokenize(completions)
        bos, eos = self.bos_id, self.eos_id
        for i, ids in enumerate(prompt_ids):
            if self.add_bos:
                ids = ids if ids[:1] == [bos] else [bos, *ids]
                while ids[:2] == [bos, bos]:
                    ids = ids[1:]
            prompt_ids[i] = ids
        for ids in completion_ids:
            if ids[-1:] != [eos]:
                ids.append(eos)
        return prompt_ids, completion_ids


def truncate(p: list, c: list, r: list, lengths: Lengths, bos_id: int | None):
    """(prompt, chosen, rejected, counts) or None when the prompt alone does not fit."""
    counts, limit, total = [], lengths.max_prompt_length, lengths.max_seq_length
    error = lengths.truncation == "error"
    if limit and len(p) > limit:
        if error:
            raise RecordError(
                "too_long",
                f"field 'prompt' has {len(p)} tokens, more than data.max_prompt_length={limit}",
            )
        keep_bos = bos_id is not None and p[0] == bos_id and limit > 1
        p = [bos_id, *p[len(p) - limit + 1 :]] if keep_bos else p[len(p) - limit :]
        counts.append("truncated:prompt")
    room = total - len(p)
    for name, side in (("chosen", c), ("rejected", r)):
        if error and len(side) > room:
            raise RecordError(
                "too_long",
                f"prompt + {name} have {len(p) + len(side)} tokens, "
                f"more than data.max_seq_length={total}",
            )
    if room < 1:
        return None
    if len(c) > room or len(r) > room:
        counts.append("truncated:completion")
    return p, c[:room], r[:room], counts


def tokenize_batch(batch: dict, *, renderer: Renderer, lengths: Lengths) -> dict:
    """datasets.map function: JSON-encoded examples → ids and a status per row."""
    # Everything allocated here is acyclic; a cyclic collection would only walk the large
    # heap of examples (each full collection costs its size: quadratic time overall).
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _tokenize_batch(batch, renderer, lengths)
    finally:
        if enabled:
            gc.enable()


def _tokenize_batch(batch: dict, renderer: Renderer, lengths: Lengths) -> dict:
    n = len(batch["where"])
    status, prompts, completions, ok = [""] * n, [], [], []
    examples = [
        Example(
            batch["where"][i], *(json.loads(batch[k][i]) for k in ("prompt", "chosen", "rejected"))
        )
        for i in range(n)
    ]
    for i, texts in enumerate(renderer.texts_batch(examples)):
        if isinstance(texts, RecordError):
            status[i] = f"error:{texts.reason}:{texts.message}"
            continue
        prompt, chosen, rejected = texts
        ok.append(i)
        prompts.append(prompt)
        completions += [chosen, rejected]
    prompt_ids, completion_ids = renderer.encode(prompts, completions)
    out = {"prompt_ids": [[]] * n, "chosen_ids": [[]] * n, "rejected_ids": [[]] * n}
    for j, i in enumerate(ok):
        p, c, r = prompt_ids[j], completion_ids[2 * j], completion_ids[2 * j + 1]
        try:
            if not p:
                raise RecordError(
                    "empty_prompt",
                    "empty prompt and the tokenizer adds no BOS: "
                    "the first completion token has nothing to be predicted from",
                )
            kept = truncate(p, c, r, lengths, renderer.bos_id)
        except RecordError as e:
            status[i] = f"error:{e.reason}:{e.message}"
            continue
        if kept is None:
            status[i] = "dropped:prompt_too_long"
            continue
        out["prompt_ids"][i], out["chosen_ids"][i], out["rejected_ids"][i], counts = kept
        status[i] = ",".join(counts)
    return out | {"where": batch["where"], "status": status}


@contextlib.contextmanager
def quiet_datasets(num_proc: int):
    """datasets' progress bar (rate, ETA) only where dpo_jax.progress shows bars (a terminal,
    process 0); worker processes started by spawn, not fork, once JAX is loaded (forking a
    process whose JAX runtime runs threads can deadlock the child)."""
    import datasets
    import multiprocess

    from dpo_jax import progress  # here: spawned workers import this module without JAX

    enabled = datasets.is_progress_bar_enabled()
    method = multiprocess.get_start_method(allow_none=True)
    if not progress.on_terminal():
        datasets.disable_progress_bars()
    if num_proc > 1 and "jax" in sys.modules:
        multiprocess.set_start_method("spawn", force=True)
    gc.freeze()  # forked workers then never walk (and copy) the parent's objects
    try:
        yield
    finally:
        gc.unfreeze()
        if enabled:
            datasets.enable_progress_bars()
        if multiprocess.get_start_method(allow_none=True) != method:
            multiprocess.set_start_method(method, force=True)


def worker_count(num_examples: int, num_proc: int = 0) -> int:
    """Tokenization processes for this many examples: data.num_proc, or (0) one per CPU
    (at most 8) from _AUTO_PROC_MIN_EXAMPLES up; never fewer than 1000 examples each."""
    if num_proc <= 0:
        num_proc = min(os.cpu_count() or 1, 8) if num_examples >= _AUTO_PROC_MIN_EXAMPLES else 1
    return max(1, min(num_proc, num_examples // 1000 or 1))


def tokenize_examples(
    examples: Sequence[Example],
    renderer: Renderer,
    lengths: Lengths,
    problems: Problems,
    num_proc: int = 0,
    fingerprint: str | None = None,
):
    """Tokenizes through datasets.map (num_proc workers; 0 = automatic). Returns an Arrow
    table of the kept pairs (where, prompt_ids, chosen_ids, rejected_ids) and counts of
    truncated and dropped pairs; bad records go to `problems`."""
    import datasets
    import pyarrow as pa

    ids = datasets.List(datasets.Value("int32"))
    features = datasets.Features(
        {
            "where": datasets.Value("string"),
            "status": datasets.Value("string"),
            "prompt_ids": ids,
            "chosen_ids": ids,
            "rejected_ids": ids,
        }
    )
    columns = {"where": [e.where for e in examples]} | {
        k: [json.dumps(getattr(e, k), ensure_ascii=False) for e in examples]
        for k in ("prompt", "chosen", "rejected")
    }
    if not examples:
        empty = {name: [] for name in features if name != "status"}
        return pa.Table.from_pydict(empty, schema=features.arrow_schema.remove(1)), Counter()
    num_proc = worker_count(len(examples), num_proc)
    function = functools.partial(tokenize_batch, renderer=renderer, lengths=lengths)
    with quiet_datasets(num_proc):
        mapped = datasets.Dataset.from_dict(columns).map(
            function,
            batched=True,
            batch_size=500,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["prompt", "chosen", "rejected"],
            features=features,
            new_fingerprint=fingerprint or hashlib.sha256(os.urandom(8)).hexdigest()[:16],
            desc=f"tokenizing {len(examples)} pairs",
        )
    table = mapped.data.table
    counts, keep = Counter(), np.zeros(len(table), bool)
    for i, (where, status) in enumerate(
        zip(table["where"].to_pylist(), table["status"].to_pylist(), strict=True)
    ):
        if status.startswith("error:"):
            _, reason, message = status.split(":", 2)
            problems.add(reason, where, message)
        elif status.startswith("dropped:"):
            counts[status] += 1
        else:
            keep[i] = True
            counts.update(s for s in status.split(",") if s)
    table = table.filter(pa.array(keep)).drop_columns(["status"])
    return table.combine_chunks(), counts


def pairs_from_table(table) -> list[TokenizedPair]:
    """Arrow (where, prompt_ids, chosen_ids, rejected_ids) → TokenizedPairs (views, no copies)."""
    columns = []
    for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
        column = table[name].combine_chunks()
        offsets = column.offsets.to_numpy()
        values = column.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        columns.append([values[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)])
    wheres = table["where"].to_pylist()
    return [TokenizedPair(p, c, r, w) for p, c, r, w in zip(*columns, wheres, strict=True)]


def tokenizer_fingerprint(tokenizer) -> str:
    """Everything about a tokenizer that changes token ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps(
            [
                type(tokenizer).__name__,
                tokenizer.chat_template,
                tokenizer.bos_token,
                tokenizer.eos_token,
                tokenizer("a b", add_special_tokens=True)["input_ids"],
            ],
            default=str,
        ).encode()
    )
    return h.hexdigest()
