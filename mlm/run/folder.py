"""A run's output folder: one run at a time, and nothing lost or mixed.

    lock         `.lock` names the run that holds the folder (pid, host, start time), from before setup to the
                 end; a second run is refused at once. A lock left by a dead process on this host is taken over.
    resume point --resume latest / a checkpoint folder, or a refusal to mix a new run into an old one; read-only.
    start        only once setup has succeeded: --overwrite moves the old run aside into `.replaced-run/` (kept
                 until the new run has written a checkpoint or finished, put back if it fails before), temporary
                 folders of interrupted saves are removed.
    abandon      a run that fails before its first checkpoint removes what it wrote and puts back what it
                 replaced, so the folder is as it was before the run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from mlm.errors import MLMError
from mlm.run.checkpoints import list_checkpoints, remove_stale_temporaries
from mlm.run.record import read_record

LOCK_FILE = ".lock"
ASIDE_DIR = ".replaced-run"
# What marks a folder as holding a run, and what a run writes (moved aside by --overwrite, removed by abandon).
RUN_FILES = ("run.json", "metrics.jsonl", "checkpoints", "config.json", "model.safetensors",
             "args.json", "summary.json")  # the last two: folders of mlm before run records
OUTPUT_FILES = RUN_FILES + ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "README.md", "tensorboard")


class RunFolder:
    """The output folder of this run; rank 0 holds its lock, other processes only read it."""

    def __init__(self, path: Path, *, is_main: bool):
        self.path, self.is_main = path, is_main
        self.created = False  # this run created the folder
        self.locked = False
        self.started = False  # start() ran: this run may have written files
        self.aside: Path | None = None  # the old run, moved aside by --overwrite and not yet dropped
        self.committed = False  # the run wrote a checkpoint or finished: nothing left to undo

    @classmethod
    def lock(cls, output_dir: str, *, is_main: bool) -> RunFolder:
        """Take the folder's lock (creating the folder if needed) or refuse at once, naming the holder."""
        folder = cls(Path(output_dir).expanduser(), is_main=is_main)
        if is_main:
            folder._acquire()
        return folder

    def _acquire(self) -> None:
        lock = self.path / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f"{LOCK_FILE}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump(me, handle)
                for _ in range(3):
                    try:
                        os.link(tmp, lock)  # atomic: fails if the lock exists, and never leaves a half-written one
                        self.locked = True
                        return
                    except FileExistsError:
                        holder = _read_holder(lock)
                        if not _is_stale(holder) or not _take_over(lock, holder):
                            raise MLMError(
                                f"{self.path} is in use by another run ({_describe(holder)}). Wait for it to end "
                                f"or choose another --output-dir; if that process no longer runs, delete {lock}."
                            ) from None
                        print(f"note: took over the lock of {self.path} left by a process that no longer runs "
                              f"({_describe(holder)}).", flush=True)
                raise MLMError(f"Could not lock {self.path}: other runs keep taking it. Choose another --output-dir.")
            finally:
                Path(tmp).unlink(missing_ok=True)
        except OSError as err:
            self._remove_if_created()
            raise MLMError(f"Cannot write to the output folder {self.path}: {err.strerror or err}. Choose a "
                           "writable --output-dir (and check the free space).") from None

    def release(self) -> None:
        if self.locked:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.locked = False
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    # ----------------------------------------------------------------------------------------------------------

    def resume_point(self, resume: str | None, overwrite: bool) -> Path | None:
        """The checkpoint to resume from (None: a new run), or an MLMError if the folder holds another run that
        neither --resume nor --overwrite accounts for. Reads only."""
        if self.is_main and (self.path / ASIDE_DIR).is_dir():
            self._recover_interrupted_overwrite()
        if resume == "latest":
            checkpoints = list_checkpoints(self.path)
            if not checkpoints:
                raise MLMError(f"--resume latest: no checkpoint in {self.path / 'checkpoints'}. Start a new run "
                               "without --resume (with --overwrite if the folder holds files of a run).")
            return checkpoints[-1]
        if resume:
            path = Path(resume).expanduser()
            if not path.is_dir():
                raise MLMError(f"--resume {resume}: no such checkpoint folder.")
            return path
        existing = [name for name in RUN_FILES if (self.path / name).exists()]
        if existing and not overwrite:
            hint = ("It never saved a checkpoint, so it cannot be resumed: pass " if not list_checkpoints(self.path)
                    else "It is finished: pass --resume latest --extend with more --epochs to train it further, "
                    if _is_finished(self.path) else "Pass --resume latest to continue it, ")
            raise MLMError(f"{self.path} already holds a run ({', '.join(existing)}). {hint}--overwrite to replace "
                           "it, or choose another --output-dir.")
        return None

    def start(self, *, overwrite: bool, resume_from: Path | None) -> list[str]:
        """Make the folder ready for writing, now that the run is known to start; return notes for the user."""
        self.started = True
        notes = []
        if not self.is_main:
            return notes
        stale = remove_stale_temporaries(self.path)
        if stale:
            notes.append(f"removed {len(stale)} unfinished checkpoint folder(s) of an interrupted save.")
        for leftover in self.path.glob(".*.tmp"):  # atomic writes a crash interrupted
            if not leftover.name.startswith(f"{LOCK_FILE}."):  # another run trying the lock right now
                leftover.unlink(missing_ok=True)
        existing = [name for name in OUTPUT_FILES if (self.path / name).exists()]
        if overwrite and resume_from is None and existing:
            self.aside = self.path / ASIDE_DIR
            self.aside.mkdir()
            for name in existing:
                os.replace(self.path / name, self.aside / name)
            notes.append(f"moved the previous run aside to {self.aside}; it is deleted once this run has saved its "
                         "first checkpoint, and put back if this run fails before.")
        self.committed = resume_from is not None  # a resumed run has its checkpoints already
        return notes

    def commit(self) -> None:
        """The run has a checkpoint or its final model: the replaced run is no longer needed."""
        self.committed = True
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def abandon(self) -> None:
        """The run failed. Before its first checkpoint: remove what it wrote and put back what it replaced."""
        if not self.is_main or not self.started or self.committed:
            return
        for name in OUTPUT_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target, ignore_errors=True)
            elif target.exists():
                target.unlink()
        if self.aside is not None:
            for entry in self.aside.iterdir():
                os.replace(entry, self.path / entry.name)
            self.aside.rmdir()
            self.aside = None

    def _recover_interrupted_overwrite(self) -> None:
        """An --overwrite run was killed before its first checkpoint: its files go, the run it replaced returns."""
        aside = self.path / ASIDE_DIR
        if list_checkpoints(self.path):  # the new run did save one (killed while deleting the old run)
            shutil.rmtree(aside, ignore_errors=True)
            return
        self.started, self.aside = True, aside
        self.abandon()
        self.started = False
        print(f"note: {self.path}: an --overwrite run ended before its first checkpoint; the run it replaced is "
              "back in place.", flush=True)


def _is_finished(folder: Path) -> bool:
    try:
        record = read_record(folder)
    except MLMError:
        return False
    return record is not None and record.finished


def _read_holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def _describe(holder: dict) -> str:
    if not holder:
        return "unreadable lock file"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


def _is_stale(holder: dict) -> bool:
    """True only when the holder certainly no longer runs: same host, and no process has its pid."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it runs under another user
        return False
    return False


def _take_over(lock: Path, holder: dict) -> bool:
    """Move the stale lock out of the way, unless another run replaced it meanwhile; True if it was moved."""
    moved = lock.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
    try:
        os.replace(lock, moved)
    except FileNotFoundError:  # another run took it over first; the next attempt sees its lock
        return True
    try:
        if _read_holder(moved) != holder:  # not the lock we judged stale: give it back
            try:
                os.link(moved, lock)
            except FileExistsError:
                pass
            return False
        return True
    finally:
        moved.unlink(missing_ok=True)
