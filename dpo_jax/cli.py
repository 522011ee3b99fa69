"""What the command-line entry points share: one-line errors with an exit status that says
what went wrong, and absl flag parsing that reports a bad config override in one line.

Exit statuses: 2 = the command cannot run as given (config, files, a busy workdir);
1 = it ran and failed; 128 + signal = stopped by a signal (after saving, where it could).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from typing import NoReturn

from absl import flags


def fail(message: str, status: int) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


def os_error_line(error: OSError) -> str:
    """A failed write or read (a full disk, a permission) as what happened, where, and what
    to do; a run resumes from its last checkpoint, which such a failure never touches."""
    where = f" ({error.filename})" if error.filename else ""
    return (
        f"{error.strerror or error}{where}; free space (or fix the path) and re-run the same "
        "command: it resumes from the last checkpoint"
    )


class _OneLineBackgroundErrors(logging.Filter):
    """Orbax logs a failed background save with its traceback from every thread involved
    (~500 lines for one full disk), and asyncio logs each of Orbax's sibling write tasks whose
    error nobody retrieved ("Task exception was never retrieved", with a traceback) whenever
    the collector frees it. The run reports that failure itself in one line, so these records
    keep their first line only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and _from_orbax(record):
            record.msg = " ".join(record.getMessage().split())[:300]
            record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
        return True


def _from_orbax(record: logging.LogRecord) -> bool:
    """Whether Orbax logged the record, or its exception was raised in Orbax's code."""
    if "orbax" in record.pathname:
        return True
    trace = record.exc_info[2] if record.exc_info else None
    return any("orbax" in frame.filename for frame in traceback.extract_tb(trace))


def one_line_background_errors() -> None:
    for name in ("absl", "asyncio"):  # a logger's filters see only the records it creates
        logging.getLogger(name).addFilter(_OneLineBackgroundErrors())
    # After a failed save, TensorStore's callbacks for the writes still pending reach an event
    # loop Orbax has closed, and each prints a traceback as an "unraisable" exception.
    default_hook = sys.unraisablehook

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            default_hook(unraisable)

    sys.unraisablehook = hook


def stop_now(what_next: str) -> NoReturn:
    """A second Ctrl-C: exit at once (130), abandoning the threads of a save in flight. A
    half-written checkpoint stays in Orbax's temporary folder, which a resume ignores."""
    print(f"\nstopped: not saved; {what_next}", file=sys.stderr, flush=True)
    os._exit(130)


def config_file_failed(path: str, error: Exception) -> NoReturn:
    """A --config file that is missing, or whose get_config() raised: one line, exit 2."""
    cause = error.__cause__ or error.__context__ or error
    if isinstance(cause, FileNotFoundError) or "No such file" in str(error):
        fail(f"--config {path}: no such file (the shipped configs are in configs/)", 2)
    reason = " ".join(str(cause).split())[:300]
    fail(f"--config {path}: get_config() failed ({type(cause).__name__}: {reason})", 2)


def _config_argument(argv: list[str]) -> str:
    """The --config file named on the command line ("?" if none)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "?"


def flags_parser(flag_values: flags.FlagValues):
    """An app.run flags_parser: absl's parsing, with an unknown flag, a config override that
    names no key (a typo) or a bad value as one line (exit 2) instead of a traceback."""

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flag_values(argv)
            if "config" in flag_values and flag_values["config"].present:
                # ml_collections defers a failed load (a missing file) to first use: load now,
                # so that it is one line before anything starts.
                flag_values.config.keys()
            return rest
        except SyntaxError as error:
            fail(f"--config {error.filename}:{error.lineno}: {error.msg}", 2)
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
        except Exception as error:  # noqa: BLE001  (the config file failed to load or run)
            config_file_failed(_config_argument(argv), error)

    return parse
