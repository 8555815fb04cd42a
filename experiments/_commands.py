"""What the `marginflow` subcommands share: their registry (`subcommand`), the usage error
that becomes one line and exit code 2, the help formatter that shows defaults, the summary
table, and the check that an output folder can be written before anything is computed.

`_cli` (simulate, resume) and `_reproduce` both import from here, not from each other."""

from __future__ import annotations

import argparse
import os

_SUBCOMMANDS: dict[str, tuple] = {}


def subcommand(name: str, help: str):
    """Register `add_arguments(parser)` / `run(args) -> int` pairs under a subcommand name."""

    def register(pair):
        _SUBCOMMANDS[name] = (help, *pair)
        return pair

    return register


class UsageError(ValueError):
    pass


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: "(default: 1e6)", "(default: none)" for an
    option that is off unless given, "(required)" for a required one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS:
            return text
        if action.required and action.option_strings:
            return f"{text} (required)"
        if action.default is None and action.option_strings:
            return f"{text} (default: none)"
        return super()._get_help_string(action)


def print_table(rows, title: str) -> None:
    width = max(len(k) for k, _ in rows)
    print(title)
    print("-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def writable_folder(path: str, flag: str) -> None:
    """Create `path` if needed and check that files can be written in it (a temporary
    file is created and removed); UsageError naming the flag, the path and the cause."""
    import tempfile

    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a file; {flag} takes a folder (created if "
                         "missing), e.g. a new name.")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".marginflow-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise UsageError(f"{flag} {path!r} cannot be written ({err.strerror or err}); "
                         f"pass a folder you can write to.") from err
