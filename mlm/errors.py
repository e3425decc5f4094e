"""The one exception type for mistakes a user can fix.

Every message says what was wrong and what to do about it. The scripts print such errors as a single line
and exit with status 2 instead of showing a traceback; anything else that escapes is a bug in mlm.
"""


class MLMError(ValueError):
    """Bad input, a missing or corrupt file, an unreachable Hub: something the user can act on."""


# What the machine says when it cannot write or read what a run needs: the user's to fix, not a bug.
USER_ERRNOS = {"ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EMFILE", "ENFILE", "EIO", "ENAMETOOLONG"}


def run_cli(main) -> None:
    """Run a script's main(); print an MLMError, a full disk or a permission problem as one 'error: …' line and
    exit 2 instead of a traceback. Ctrl-C is one line too (exit 130)."""
    import errno
    import sys

    try:
        main()
    except MLMError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if errno.errorcode.get(err.errno) not in USER_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"error: {err.strerror or err}{where}. Free some space or fix the permissions; a run that saved a "
              "checkpoint continues with --resume latest.", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted (Ctrl-C). A run continues from its last checkpoint with --resume latest; one "
              "that had saved none left its folder as it found it.", file=sys.stderr)
        sys.exit(130)
