"""The one exception type for mistakes a user can fix.

Every message says what was wrong and what to do about it, naming a setting in backquotes (`train_size`). The
scripts print such errors as a single line, the setting named by its flag (--train-size), and exit with status 2
instead of showing a traceback; anything else that escapes is a bug in mlm.
"""

import atexit
import errno
import os
import re
import signal
import sys
import warnings
from functools import partial
from pathlib import Path
from typing import NoReturn


class MLMError(ValueError):
    """Bad input, a missing or corrupt file, an unreachable Hub: something the user can act on."""


def listed(names: list[str], most: int, separator: str = ", ") -> str:
    """The first `most` of `names`, then how many more: a message names a few, not thousands."""
    return separator.join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def clipped(text: str, most: int) -> str:
    """`text` on one line, cut to at most `most` characters at a space (with "…"), so that a reason quoted in a
    message ends on a whole word; a text without a space in its second half is cut where it reaches `most`."""
    text = " ".join(text.split())
    if len(text) <= most:
        return text
    cut = text[: most - 1]
    if text[most - 1] != " " and " " in cut[most // 2 :]:  # the cut falls inside a word: end before it
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip() + "…"


def is_int(value) -> bool:
    """An int but not a bool, which Python counts as one: `true` in a JSON file is no size or seed."""
    return isinstance(value, int) and not isinstance(value, bool)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP stopped a run; `hint` says how to continue. Scripts exit with 128 + the signal's
    number, as shells report a process a signal ended: 130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""

    def __init__(self, signal_name: str = "SIGINT", hint: str = ""):
        super().__init__(signal_name)
        self.signal_name, self.hint = signal_name, hint
        self.exit_code = 128 + signal.Signals[signal_name].value


# What the machine says when it cannot write or read what a run needs: the user's to fix, not a bug.
USER_ERRNOS = {"ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "EMFILE", "ENFILE", "EIO", "ENAMETOOLONG"}


def run_cli(main, flag_of=lambda setting: None) -> None:
    """Run a script's main(); print an MLMError, a full disk or a permission problem as one 'error: …' line and
    exit 2 instead of a traceback, each `setting` the message names as flag_of(setting) when that is not None.
    Ctrl-C is one line too (exit 130). One of torchrun's processes then ends without the interpreter's teardown."""
    flags = partial(name_flags, flag_of=flag_of)
    # Under torchrun every process meets the same bad input: the others' lines say which process they come from. A
    # stop is process 0's to report, with how to continue; the others' view of the folder may be a step behind.
    rank = os.environ.get("RANK", "") if os.environ.get("WORLD_SIZE", "1") not in ("", "1") else ""
    who = f"[rank {rank}] " if rank.isdigit() and int(rank) else ""  # empty for process 0 and a single process
    streams = sys.stdout, sys.stderr  # None where closed (`>&-`): print() then writes nowhere, as it should
    sys.stdout, sys.stderr = (None if stream is None else _ReaderMayLeave(stream) for stream in streams)
    code = 0
    try:
        with warnings.catch_warnings():  # restores showwarning after main()
            warnings.showwarning = _one_line_warnings(warnings.showwarning, flags)
            main()
    except SystemExit as stop:  # the command's own status: an interrupted run's 130 or 143
        if not rank or not isinstance(stop.code, int):
            raise
        code = stop.code
    except MLMError as err:
        _error(f"error: {who}{flags(str(err))}")
        code = 2
    except OSError as err:
        if errno.errorcode.get(err.errno) not in USER_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        _error(f"error: {who}{err.strerror or err}{where}. Free some space or fix the permissions; a run that saved a "
               "checkpoint continues with --resume latest.")
        code = 2
    except KeyboardInterrupt as err:
        stop = err if isinstance(err, Interrupted) else Interrupted()  # a run's Interrupted says how to continue
        name = "Ctrl-C" if stop.signal_name == "SIGINT" else stop.signal_name
        if not who:
            _error(" ".join(filter(None, [f"error: interrupted ({name}).", stop.hint])))
        code = stop.exit_code
    finally:
        for wrapper in (sys.stdout, sys.stderr):  # what is still buffered, now: at exit no wrapper would catch it
            if isinstance(wrapper, _ReaderMayLeave):
                wrapper.flush()
        sys.stdout, sys.stderr = streams
    if rank:
        _end_torchrun_process(code)
    if code:
        sys.exit(code)


def _error(line: str) -> None:
    if sys.stderr is not None:  # one write, not print's two: torchrun's processes share one stream
        sys.stderr.write(line + "\n")


def _end_torchrun_process(code: int) -> NoReturn:
    """End one of torchrun's processes, its work done and its output written, without the interpreter's teardown.
    torch keeps the gloo process group's worker threads to the very end (torch.distributed.nn holds the group as a
    default argument, so destroy_process_group cannot free it), and a worker still releasing the last collective's
    Python tensors while the interpreter tears down aborts the process ("terminate called without an active
    exception", exit -6) after the run has finished and saved: torchrun then reports the run as failed."""
    atexit._run_exitfuncs()  # what a normal exit runs before its teardown
    for stream in filter(None, (sys.stdout, sys.stderr)):
        stream.flush()
    os._exit(code)


class _ReaderMayLeave:
    """stdout or stderr, whose reader may go away (`mlm-train | head`): from then on the output goes to /dev/null and
    the command goes on. A BrokenPipeError would stop a run between its checkpoints, for a line nobody reads."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self._guarded(self.stream.write, text)

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())  # the stream's buffered text is flushed there too, at exit
            os.close(null)
            return call(*args)

    def __getattr__(self, name: str):  # isatty, fileno, encoding, …
        return getattr(self.stream, name)


def name_flags(message: str, flag_of) -> str:
    """`message` with each `setting` named as flag_of(setting), where that is not None (a command's flag)."""
    return re.sub(r"`(\w+)`", lambda match: flag_of(match.group(1)) or match.group(0), message)


def _one_line_warnings(show, flags):
    """mlm's own warnings (a corrupt chunk store rebuilt, an unwritable cache) as one 'warning: …' line, like its
    errors: the default format adds the warning's source file and a line of mlm's code."""
    package, said = Path(__file__).resolve().parent, set()

    def one_line(message, category, filename, lineno, file=None, line=None):
        if not Path(filename).resolve().is_relative_to(package):
            return show(message, category, filename, lineno, file, line)
        # Once: a folder is walked for the data and again for its digests, from two places Python tells apart.
        if (stream := sys.stderr if file is None else file) is not None and (text := flags(str(message))) not in said:
            said.add(text)
            stream.write(f"warning: {text}\n")  # one write, as _error's

    return one_line
