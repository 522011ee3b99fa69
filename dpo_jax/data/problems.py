"""Bad input: one error type for users, and a per-source tally of bad records by reason.

With `on_error="raise"` (the default) every bad record of a source is collected first and
then raised together, so one run shows all of them (the first few with `file:line`, field and
what is wrong, the rest as counts). With `on_error="skip"` they are skipped, counted per
reason, and reported in the data report and a warning; nothing disappears unreported.
"""

from __future__ import annotations

import logging
import re
from collections import Counter

ON_ERROR = ("raise", "skip")
log = logging.getLogger("dpo_jax.data")

# Reasons a record is rejected (the keys of data_report.json's "skipped" counts).
REASONS = {
    "malformed_json": "the line is not valid JSON",
    "invalid_utf8": "the bytes are not UTF-8",
    "not_object": "a record is not a JSON object",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type",
    "empty_field": "a required text is empty",
    "unknown_role": "a message role is not system / user / assistant",
    "non_alternating": "conversation turns do not alternate user / assistant",
    "identical": "chosen and rejected are the same",
    "tie": "ranked completions with equal ranks",
    "needs_chat_template": "a conversation needs data.apply_chat_template=True",
    "template_error": "the chat template failed or is not prefix-consistent",
    "empty_prompt": "an empty prompt and a tokenizer without BOS: nothing to condition on",
    "too_long": "longer than data.max_seq_length / max_prompt_length (truncation='error')",
}


def location_order(message: str) -> list:
    """Natural order of "file:line: ..." messages (line 9 before line 10)."""
    where = message.split(": ", 1)[0]
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", where)]


class DataError(ValueError):
    """Bad input data or data settings, with the file, record and field that caused it."""


class RecordError(Exception):
    """One bad record: a reason from REASONS and a message naming the field."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class Problems:
    """Bad records of one source, counted by reason, with the first few messages kept."""

    max_messages = 10

    def __init__(self, source: str, on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise DataError(f"config data.on_error={on_error!r}: use one of {ON_ERROR}")
        self.source = source
        self.on_error = on_error
        self.counts: Counter = Counter()  # bad records (raised under on_error="raise")
        self.policy: Counter = Counter()  # skipped by a setting (data.ranked_ties="skip")
        self.messages: list[str] = []

    def add(self, reason: str, where: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.messages) < self.max_messages:
            self.messages.append(f"{where}: {message}")

    def skip(self, reason: str, count: int = 1) -> None:
        """A record left out by a setting, not an error: counted, never raised."""
        self.policy[reason] += count

    def __bool__(self) -> bool:
        return bool(self.counts)

    def finish(self) -> None:
        """Raises every collected problem (on_error="raise") or warns about the skips."""
        if not self.counts:
            return
        # Reading finds malformed lines ahead of the records being validated: file order.
        self.messages.sort(key=location_order)
        total = sum(self.counts.values())
        counts = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
        shown = "\n  ".join(self.messages)
        more = (
            "" if total <= len(self.messages) else f"\n  ... and {total - len(self.messages)} more"
        )
        if self.on_error == "raise":
            raise DataError(
                f"{self.messages[0]}\n{total} bad record(s) in {self.source} ({counts}):\n  "
                f"{shown}{more}\nfix the data, map field names with data.fields, or set "
                "data.on_error='skip' to skip and count them"
            )
        log.warning(
            "skipped %d bad record(s) in %s (%s):\n  %s%s", total, self.source, counts, shown, more
        )

    def report(self) -> dict:
        skipped = self.counts + self.policy
        return {"skipped": dict(sorted(skipped.items())), "skipped_examples": self.messages}
