"""Record layouts → one normalised Example(prompt, chosen, rejected), validated.

Layouts (data.format, "auto" detects one per source from its first records):
  explicit  {"prompt", "chosen", "rejected"}: strings, or conversational (prompt a list of
            {"role", "content"} messages ending with a user turn; chosen / rejected an
            assistant message, a list of messages starting with one, or a string)
  implicit  {"chosen", "rejected"} whole conversations or whole strings: the shared prefix is
            the prompt (turn-level for conversations; for strings, cut before the word where
            they first differ)
  ranked    {"context", "completions": [{"rank", "completion"}, ...]} (NeMo RL): lower rank is
            preferred; data.ranked_pairs = "best_worst" (one pair) or "all" (every ordered
            pair); equal ranks are an error (data.ranked_ties="error") or skipped ("skip")
  hh        Anthropic HH {"chosen", "rejected"} transcripts "\\n\\nHuman: …\\n\\nAssistant: …"
Field names map through data.fields ({"prompt": "question", ...}; also system, context,
completions, rank, completion, role, content) and role names through data.roles
({"human": "user", "gpt": "assistant"}). A system prompt comes from the record's "system"
field, else data.system_prompt.

With the chat template on (Layout.chat) every Example holds message lists; without it,
strings (and conversational records are an error).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re

from .problems import DataError, RecordError

FORMATS = ("auto", "explicit", "implicit", "ranked", "hh")
ROLES = ("system", "user", "assistant")
Text = str | list[dict]
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


@dataclasses.dataclass(frozen=True)
class Layout:
    format: str = "auto"
    fields: tuple[tuple[str, str], ...] = ()  # canonical name → name in the records
    roles: tuple[tuple[str, str], ...] = ()  # role in the records → system / user / assistant
    system_prompt: str = ""
    ranked_pairs: str = "best_worst"  # best_worst | all
    ranked_ties: str = "error"  # error | skip
    chat: bool = True  # render through the chat template (Examples hold messages)

    def __post_init__(self):
        for name, value, allowed in (
            ("format", self.format, FORMATS),
            ("ranked_pairs", self.ranked_pairs, ("best_worst", "all")),
            ("ranked_ties", self.ranked_ties, ("error", "skip")),
        ):
            if value not in allowed:
                raise DataError(f"config data.{name}={value!r}: use one of {allowed}")

    def key(self, name: str) -> str:
        return dict(self.fields).get(name, name)


@dataclasses.dataclass(frozen=True)
class Example:
    where: str  # "file:line" of the record
    prompt: Text
    chosen: Text
    rejected: Text


# ---------------------------------------------------------------------- fields


def check_different(chosen, rejected) -> None:
    if chosen == rejected:
        raise RecordError(
            "identical", "'chosen' and 'rejected' are identical; a pair needs two sides"
        )


def field(record: dict, layout: Layout, name: str, required: bool = True):
    key = layout.key(name)
    value = record.get(key)
    if value is None and required:
        raise RecordError("missing_field", f"missing field {key!r} (record has {sorted(record)})")
    return value


def text(value, label: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RecordError(
            "wrong_type", f"field {label!r} must be a string, got {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise RecordError("empty_field", f"field {label!r} is empty")
    return value


def messages(value, label: str, layout: Layout, default_role: str) -> list[dict]:
    """A string (one message of `default_role`), a message, or a list of messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": text(value, label)}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RecordError(
            "wrong_type",
            f"field {label!r} must be a string or a list of messages, got {type(value).__name__}",
        )
    if not value:
        raise RecordError("empty_field", f"field {label!r} is an empty list")
    role_key, content_key, roles = layout.key("role"), layout.key("content"), dict(layout.roles)
    out = []
    for i, message in enumerate(value):
        at = f"{label}[{i}]"
        if not isinstance(message, dict):
            raise RecordError(
                "wrong_type",
                f"field {at!r} must be a {{role, content}} message, got {type(message).__name__}",
            )
        role = message.get(role_key)
        if role is None:
            raise RecordError("missing_field", f"field {at!r} has no {role_key!r}")
        role = roles.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise RecordError(
                "unknown_role",
                f"field '{at}.{role_key}': unknown role {role!r} (expected "
                "system, user or assistant; map other names with data.roles)",
            )
        content = message.get(content_key)
        if content is None:
            raise RecordError("missing_field", f"field {at!r} has no {content_key!r}")
        out.append({"role": role, "content": text(content, f"{at}.{content_key}")})
    return out


def check_turns(msgs: list[dict], label: str, first: str, last: str) -> None:
    """Optional leading system message (conversations only), then alternating turns."""
    start = 1 if first == "user" and msgs[0]["role"] == "system" else 0
    expected = first
    for i in range(start, len(msgs)):
        role = msgs[i]["role"]
        if role != expected:
            why = (
                "a system message may only come first"
                if role == "system"
                else ("turns must alternate user / assistant")
            )
            raise RecordError(
                "non_alternating",
                f"field '{label}[{i}]' is a {role!r} turn where {expected!r} is expected ({why})",
            )
        expected = "assistant" if expected == "user" else "user"
    if msgs[-1]["role"] != last or len(msgs) == start:
        raise RecordError("non_alternating", f"field {label!r} must end with a {last!r} turn")


def with_system(prompt: list[dict], system: str) -> list[dict]:
    if not system or prompt[0]["role"] == "system":
        return prompt
    return [{"role": "system", "content": system}, *prompt]


def finish(where, prompt, chosen, rejected, layout: Layout, record: dict) -> Example:
    check_different(chosen, rejected)
    system = field(record, layout, "system", required=False)
    system = text(system, layout.key("system"), allow_empty=True) if system is not None else ""
    system = system or layout.system_prompt
    if isinstance(prompt, list):
        if not layout.chat:
            raise RecordError(
                "needs_chat_template",
                "a conversational record needs data.apply_chat_template=True to be rendered",
            )
        prompt = with_system(prompt, system)
    elif layout.chat:
        prompt = with_system([{"role": "user", "content": prompt}], system)
        chosen = [{"role": "assistant", "content": chosen}]
        rejected = [{"role": "assistant", "content": rejected}]
    elif system:
        prompt = f"{system}\n\n{prompt}"
    return Example(where, prompt, chosen, rejected)


# --------------------------------------------------------------------- layouts


def explicit(where, record, layout) -> list[Example]:
    keys = [layout.key(n) for n in ("prompt", "chosen", "rejected")]
    values = [field(record, layout, n) for n in ("prompt", "chosen", "rejected")]
    if not any(isinstance(v, list | dict) for v in values):
        prompt = text(values[0], keys[0], allow_empty=True)
        return [
            finish(
                where, prompt, text(values[1], keys[1]), text(values[2], keys[2]), layout, record
            )
        ]
    prompt = messages(values[0], keys[0], layout, "user")
    check_turns(prompt, keys[0], "user", "user")
    sides = []
    for key, value in zip(keys[1:], values[1:], strict=True):
        sides.append(messages(value, key, layout, "assistant"))
        check_turns(sides[-1], key, "assistant", "assistant")
    return [finish(where, prompt, *sides, layout, record)]


def split_conversations(chosen: list[dict], rejected: list[dict], keys) -> tuple:
    check_different(chosen, rejected)
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    for key, side in zip(keys, (chosen, rejected), strict=True):
        if k == len(side):
            raise RecordError("empty_field", f"field {key!r} has no turns after the shared prompt")
    if chosen[k]["role"] != "assistant" or rejected[k]["role"] != "assistant":
        raise RecordError(
            "non_alternating",
            f"'chosen' and 'rejected' first differ at turn {k}, which is not "
            "an assistant turn; the shared prompt must end with a user turn",
        )
    return chosen[:k], chosen[k:], rejected[k:]


def split_strings(chosen: str, rejected: str, keys) -> tuple[str, str, str]:
    """The shared prefix, cut back to before the word (and whitespace) where they differ."""
    check_different(chosen, rejected)
    cut = len(os.path.commonprefix([chosen, rejected]))
    while cut > 0 and not chosen[cut - 1].isspace():
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    for key, side in zip(keys, (chosen, rejected), strict=True):
        if not side[cut:].strip():
            raise RecordError("empty_field", f"field {key!r} has nothing after the shared prompt")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def implicit(where, record, layout) -> list[Example]:
    keys = (layout.key("chosen"), layout.key("rejected"))
    chosen, rejected = field(record, layout, "chosen"), field(record, layout, "rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        return [
            finish(
                where,
                *split_strings(text(chosen, keys[0]), text(rejected, keys[1]), keys),
                layout,
                record,
            )
        ]
    sides = []
    for key, value in zip(keys, (chosen, rejected), strict=True):
        sides.append(messages(value, key, layout, "assistant"))
        check_turns(sides[-1], key, "user", "assistant")
    return [finish(where, *split_conversations(*sides, keys), layout, record)]


def parse_hh(transcript, key: str) -> list[dict]:
    transcript = text(transcript, key)
    if transcript.startswith("Human:"):  # a variant without the leading blank line
        transcript = "\n\n" + transcript
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3:
        raise RecordError(
            "wrong_type", f"field {key!r} is not a '\\n\\nHuman: …\\n\\nAssistant: …' transcript"
        )
    turns = [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    for i, turn in enumerate(turns):
        if not turn["content"]:
            raise RecordError("empty_field", f"field {key!r}: turn {i} ({turn['role']}) is empty")
    check_turns(turns, key, "user", "assistant")
    return turns


def hh_text(turns: list[dict]) -> str:
    return "".join(
        f"\n\n{'Human' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in turns
    )


def hh(where, record, layout) -> list[Example]:
    keys = (layout.key("chosen"), layout.key("rejected"))
    chosen = parse_hh(field(record, layout, "chosen"), keys[0])
    rejected = parse_hh(field(record, layout, "rejected"), keys[1])
    prompt, chosen, rejected = split_conversations(chosen, rejected, keys)
    if layout.chat:
        return [finish(where, prompt, chosen, rejected, layout, record)]
    # Plain text keeps the HH form: the prompt ends with "Assistant:", completions with " …".
    prompt_text = hh_text(prompt) + "\n\nAssistant:"
    sides = [hh_text(side)[len("\n\nAssistant:") :] for side in (chosen, rejected)]
    return [finish(where, prompt_text, *sides, layout, record)]


def ranked(where, record, layout) -> list[Example]:
    context_key, completions_key = layout.key("context"), layout.key("completions")
    rank_key, completion_key = layout.key("rank"), layout.key("completion")
    context = field(record, layout, "context")
    items = field(record, layout, "completions")
    if not isinstance(items, list):
        raise RecordError(
            "wrong_type", f"field {completions_key!r} must be a list, got {type(items).__name__}"
        )
    if len(items) < 2:
        raise RecordError("empty_field", f"field {completions_key!r} needs at least 2 completions")
    ranks, completions = [], []
    for i, item in enumerate(items):
        at = f"{completions_key}[{i}]"
        if not isinstance(item, dict):
            raise RecordError("wrong_type", f"field {at!r} must be an object")
        rank = item.get(rank_key)
        if rank is None:
            raise RecordError("missing_field", f"field {at!r} has no {rank_key!r}")
        if isinstance(rank, bool) or not isinstance(rank, int | float):
            raise RecordError("wrong_type", f"field '{at}.{rank_key}' must be a number")
        completion = item.get(completion_key)
        if completion is None:
            raise RecordError("missing_field", f"field {at!r} has no {completion_key!r}")
        ranks.append(rank)
        completions.append((completion, f"{at}.{completion_key}"))
    conversational = isinstance(context, list) or any(
        isinstance(c, list | dict) for c, _ in completions
    )
    if conversational:
        prompt = messages(context, context_key, layout, "user")
        check_turns(prompt, context_key, "user", "user")
        sides = []
        for value, label in completions:
            sides.append(messages(value, label, layout, "assistant"))
            check_turns(sides[-1], label, "assistant", "assistant")
    else:
        prompt = text(context, context_key, allow_empty=True)
        sides = [text(value, label) for value, label in completions]
    order = sorted(range(len(ranks)), key=lambda i: ranks[i])  # lower rank is preferred
    if layout.ranked_pairs == "best_worst":
        tied = ranks.count(ranks[order[0]]) > 1 or ranks.count(ranks[order[-1]]) > 1
        candidates = [(order[0], order[-1])]
    else:
        candidates = list(itertools.combinations(order, 2))
        tied = any(ranks[a] == ranks[b] for a, b in candidates)
    if tied and (layout.ranked_ties == "error" or layout.ranked_pairs == "best_worst"):
        raise RecordError(
            "tie",
            f"field {completions_key!r}: equal ranks {ranks} (set "
            "data.ranked_ties='skip' to leave tied completions out)",
        )
    examples = []
    for a, b in candidates:
        if ranks[a] == ranks[b]:
            examples.append(SKIPPED_TIE)
            continue
        label = where if len(candidates) == 1 else f"{where} (completions {a}>{b})"
        examples.append(finish(label, prompt, sides[a], sides[b], layout, record))
    return examples


SKIPPED_TIE = None  # a tied pair left out under data.ranked_ties="skip" (counted)
LAYOUTS = {"explicit": explicit, "implicit": implicit, "ranked": ranked, "hh": hh}


def detect(record, layout: Layout) -> str | None:
    if not isinstance(record, dict):
        return None
    has = lambda name: record.get(layout.key(name)) is not None
    if has("context") and has("completions"):
        return "ranked"
    if has("chosen") and has("rejected"):
        if has("prompt"):
            return "explicit"
        chosen = record[layout.key("chosen")]
        hh = isinstance(chosen, str) and chosen.startswith(("\n\nHuman:", "Human:"))
        return "hh" if hh else "implicit"
    return None
