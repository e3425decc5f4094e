"""The one exception type for mistakes a user can fix.

Every message says what was wrong and what to do about it. The scripts print such errors as a single line
and exit with status 2 instead of showing a traceback; anything else that escapes is a bug in mlm.
"""


class MLMError(ValueError):
    """Bad input, a missing or corrupt file, an unreachable Hub: something the user can act on."""


def run_cli(main) -> None:
    """Run a script's main(); print an MLMError as one 'error: …' line and exit 2 instead of a traceback."""
    import sys

    try:
        main()
    except MLMError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
