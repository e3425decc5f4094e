"""The argument parser every mlm command uses: a usage error is one `error:` line, like every other mistake."""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

from mlm.chunks import parse_size
from mlm.errors import MLMError


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line plus a pointer to --help, exit status 2.

    argparse prints the whole usage block before its message; with dozens of flags that buries the one line
    that says what was wrong. `--help` still prints everything.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message.rstrip('.')}. Run `{self.prog} --help` for every flag.\n")


def flags_given(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The `dest` names of the options given on the command line `argv`, whatever their values.

    Parsing once more with every default suppressed leaves only what the user typed, so a flag given with its
    default value still counts as given.
    """
    argv = sys.argv[1:] if argv is None else argv
    quiet = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:  # the public API offers no copy of a parser's options
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            quiet._add_action(_without_default(action))
    known, _ = quiet.parse_known_args(argv)
    return set(vars(known))


def _without_default(action: argparse.Action) -> argparse.Action:
    action = copy.copy(action)
    action.default = argparse.SUPPRESS
    action.required = False
    return action


def size_flag(flag: str):
    """An argparse `type` for --train-size/--test-size: `parse_size` with its message as the usage error."""
    def size(text: str) -> int | str:
        try:
            return parse_size(text, flag)
        except MLMError as err:
            raise argparse.ArgumentTypeError(str(err).removeprefix(f"{flag} ")) from None  # argparse names it

    return size


def absolute_if_local(value: str | None, *, always: bool = False) -> str | None:
    """`value` as an absolute path when it names a local file or folder, or a glob, or `always` (a folder to be
    made); else (a Hub id, None) as it is.

    A run record is read again from other directories (--resume, mlm-evaluate, the model card), where a relative
    path would name nothing, or a Hub repo of that name.
    """
    if value is None:
        return None
    if always or Path(value).expanduser().exists() or any(char in str(value) for char in "*?["):
        return os.path.abspath(Path(value).expanduser())
    return value
