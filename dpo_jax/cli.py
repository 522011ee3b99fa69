"""What the command-line entry points share: one-line errors with an exit status that says
what went wrong, and absl flag parsing that reports a bad config override in one line.

Exit statuses: 2 = the command cannot run as given (config, files, a busy workdir);
1 = it ran and failed; 128 + signal = stopped by a signal (after saving, where it could).
"""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from absl import flags


def fail(message: str, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def stop_now(what_next: str) -> NoReturn:
    """A second Ctrl-C: exit at once (130), abandoning the threads of a save in flight. A
    half-written checkpoint stays in Orbax's temporary folder, which a resume ignores."""
    print(f"\nstopped: not saved; {what_next}", file=sys.stderr, flush=True)
    os._exit(130)


def flags_parser(flag_values: flags.FlagValues):
    """An app.run flags_parser: absl's parsing, with an unknown flag, a config override that
    names no key (a typo) or a bad value as one line (exit 2) instead of a traceback."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flag_values(argv)
        except flags.Error as error:
            fail(f"{error} (see --help)", 2)
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            # ml_collections: KeyError("'betaa'\nDid you mean "beta" instead of "betaa"?")
            text = str(error).replace("\\n", "\n").replace("\\'", "'")
            names = re.findall(r"'(\w+)'", text)
            given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
            flag = next(
                (f for f in given if names and names[0] in f.split(".")[1:]),
                "a --config. override",
            )
            hint = re.search(r"Did you mean .*\?", text)
            fail(f"{flag}: no such config key{'; ' + hint.group(0) if hint else ''}", 2)

    return parse
