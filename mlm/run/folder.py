"""A run's output folder: one run at a time, written only where the run may write, and nothing lost.

    lock       `.lock` names the run that holds the folder (pid, host, start time), from before setup to the end;
               a second run is refused at once. A lock left by a dead process on this host is taken over.
    the rule   a new run starts only in a missing or empty folder. A folder holding a run (run.json) is continued
               with --resume or replaced with --overwrite; any other is refused: its files are not a run's to touch.
    written    every name the run writes in the folder is noted (and kept in its record) before it is written: a
               run that fails before its first checkpoint removes exactly those, nothing else.
    overwrite  once setup has succeeded, the old run is moved aside in one rename of the whole folder, to
               `.NAME.replaced-run` beside it. It is deleted once the new run has a checkpoint, and put back if the
               new run fails before; a kill at any point is recovered by the next run in the folder.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from mlm.errors import MLMError, listed
from mlm.files.hashing import file_sha256
from mlm.files.pretrained import WEIGHTS_FILE
from mlm.files.writes import TMP_SUFFIX
from mlm.run.checkpoints import CHECKPOINT_NAME, TMP_PREFIX, list_checkpoints, verify_checkpoint
from mlm.run.metrics import METRICS_FILE
from mlm.run.record import RECORD_FILE, read_record
from mlm.run.tensorboard_log import LOG_DIR

LOCK_FILE = ".lock"
REPLACED = ".replaced-run.json"  # in the folder moved aside: whose run it holds, until the put-back begins
RESTORING = ".restoring-run.json"  # the same, once the new run's files are gone and the old ones move back
# What a run writes before its first checkpoint: all a failed --overwrite run can have left in the folder.
EARLY_OUTPUTS = (RECORD_FILE, METRICS_FILE, LOG_DIR, "checkpoints")


class RunFolder:
    """The output folder of this run; rank 0 holds its lock and writes, other processes only read it."""

    def __init__(self, path: Path, *, is_main: bool):
        self.path, self.is_main = path, is_main
        self.created = self.locked = False  # this run created the folder; holds its lock
        self.aside = _aside(path)  # where --overwrite moves the old run
        self.deleting = self.aside.with_name(self.aside.name + ".deleting")  # the old run while it is deleted
        self.moved_aside = False  # this run moved the old run aside, and has not yet dropped it
        self.committed = False  # the run wrote a checkpoint or finished, or resumed one: nothing left to undo
        self.written: dict[str, str | None] = {}  # names this run wrote here (README.md: the card's sha256)

    @classmethod
    def lock(cls, output_dir: str, *, is_main: bool) -> RunFolder:
        path = Path(output_dir).expanduser()
        folder = cls(path.resolve() if path.is_symlink() else path, is_main=is_main)  # --overwrite moves the folder
        if is_main:
            folder.created = not folder.path.exists()
            try:
                folder.path.mkdir(parents=True, exist_ok=True)
                folder.locked = _take_lock(folder.path)
            except OSError as err:
                folder.release()
                if file := next((path for path in (folder.path, *folder.path.parents) if path.is_file()), None):
                    raise MLMError(f"The output folder {folder.path} cannot be made: {file} is a file. Choose another "
                                   "`output_dir`.") from None
                raise MLMError(f"Cannot write to the output folder {folder.path}: {err.strerror or err}. Choose a "
                               "writable output folder (and check the free space).") from None
        return folder

    def release(self) -> None:
        if self.locked:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.locked = False
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def holds_run(self) -> bool:
        return (self.path / RECORD_FILE).is_file() or bool(list_checkpoints(self.path))

    # -- before the run writes -----------------------------------------------------------------------------------

    def resume_point(self, resume: str | None, overwrite: bool) -> Path | None:
        """The checkpoint to resume from (None: a new run), or MLMError if the folder is not this run's to write in.
        Reads only."""
        if resume == "latest":
            if checkpoints := list_checkpoints(self.path):
                return checkpoints[-1]
            if not self.path.is_dir() and not self.is_main:  # the run may be on the main process's node only
                raise MLMError(f"`resume` latest: there is no folder {self.path} on this node: with several nodes the "
                               "output folder must be one every node shares. Otherwise check the output folder.")
            if not self.path.is_dir() or self.created:
                raise MLMError(f"`resume` latest: there is no run in {self.path} (no such folder). Check the output "
                               "folder, or start a new run without `resume`.")
            if (record := folder_record(self.path)) is not None and record.finished:
                raise MLMError(f"`resume` latest: {self.path} holds a finished run whose checkpoints were deleted, so "
                               f"it cannot be trained further. Start a new run from its model: --model {self.path} in "
                               "another output folder.")
            raise MLMError(f"`resume` latest: no checkpoint in {self.path / 'checkpoints'}: the run there never saved "
                           "one (or this process cannot see it: with several nodes the output folder must be shared). "
                           "Start a new run with `overwrite`.")
        if resume:
            if not (path := Path(resume).expanduser()).is_dir():
                raise MLMError(f"`resume` {resume}: no such checkpoint folder.")
            return path
        if not self.holds_run():
            if others := self.files_not_of_the_run() if self.is_main else []:
                raise MLMError(f"{self.path} is not empty and holds no run ({listed(others, 4)}): a run writes only "
                               "into an empty or new folder, or one holding a run. Choose another output folder.")
            return None
        if not overwrite:
            record = folder_record(self.path)
            what = ("It never saved a checkpoint, so it cannot be resumed." if not list_checkpoints(self.path) else
                    "It is finished: resume it with `resume` latest and `extend` to train it for longer."
                    if record is not None and record.finished else "Continue it with `resume` latest.")
            raise MLMError(f"{self.path} already holds a run. {what} Pass `overwrite` to replace it, or choose "
                           "another output folder.")
        self._only_the_runs_files()
        return None

    def files_not_of_the_run(self) -> list[str]:
        """What in the folder its run did not write (with no run, everything): the names its record does not list, a
        model card edited since the run wrote it, and what in checkpoints/ is no checkpoint. mlm's own lock, markers
        and temporary files are not the user's."""
        if not self.path.is_dir():
            return []
        record = folder_record(self.path)
        written = {RECORD_FILE: None, **record.written} if record is not None else {}
        ours = {name for name, sha256 in written.items()
                if sha256 is None or (self.path / name).is_file() and file_sha256(self.path / name) == sha256}
        others = [name for name in os.listdir(self.path)
                  if name not in {LOCK_FILE, REPLACED, RESTORING, *ours} and not name.endswith(TMP_SUFFIX)]
        if "checkpoints" in ours and (self.path / "checkpoints").is_dir():  # a checkpoint is the run's as a whole
            others += [f"checkpoints/{name}" for name in os.listdir(self.path / "checkpoints")
                       if not CHECKPOINT_NAME.match(name) and not name.startswith(TMP_PREFIX)]
        return sorted(others)

    def _only_the_runs_files(self) -> None:
        """`overwrite` replaces the whole folder: refused while it holds a file of the user's."""
        if self.is_main and (others := self.files_not_of_the_run()):
            raise MLMError(f"{self.path} holds files its run did not write ({listed(others, 4)}): `overwrite` "
                           "replaces the whole folder, so move them out first, or choose another output folder.")

    # -- the run writes ------------------------------------------------------------------------------------------

    def start(self, *, overwrite: bool, resuming: bool) -> list[str]:
        """Make the folder ready for writing, now that the run is known to start; return notes for the user."""
        self.committed = resuming  # a resumed run has its checkpoints already
        if not self.is_main:
            return []
        notes = []
        if stale := sorted((self.path / "checkpoints").glob(f"{TMP_PREFIX}*")):  # saves a crash interrupted
            for path in stale:
                shutil.rmtree(path, ignore_errors=True)
            notes.append(f"removed {len(stale)} unfinished checkpoint folder(s) of an interrupted save.")
        for leftover in self.path.glob(f".*{TMP_SUFFIX}"):  # atomic writes a crash interrupted
            if not leftover.name.startswith(f"{LOCK_FILE}."):  # another run trying the lock right now
                leftover.unlink(missing_ok=True)
        if overwrite and not resuming and self.holds_run():
            self._only_the_runs_files()  # again: the user may have added one while the run set up
            self._move_aside()
            notes.append(f"moved the previous run aside to {self.aside}; it is deleted once this run has saved its "
                         "first checkpoint, and put back if this run fails before.")
        return notes

    def writes(self, name: str, card_sha256: str | None = None) -> None:
        self.written[name] = card_sha256  # a file or folder at the folder's top, noted before the run writes it

    def may_replace(self, name: str) -> bool:
        """Nothing is at `name`, or the run wrote it (README.md: the card it wrote, unedited since)."""
        target = self.path / name
        return not target.exists() or name in self.written and self.written[name] in (None, file_sha256(target))

    def commit(self) -> None:
        self.committed = True  # the run has a checkpoint or its final model: the replaced run is no longer needed
        if self.moved_aside:
            self._drop_aside()
            self.moved_aside = False

    def abandon(self) -> None:
        if self.is_main and not self.committed:
            for name in self.written:
                _remove(self.path / name)
            if self.moved_aside:
                self._put_back()
                self.moved_aside = False

    # -- --overwrite ---------------------------------------------------------------------------------------------

    def _move_aside(self) -> None:
        run_id = getattr(folder_record(self.path), "run_id", None)
        (self.path / REPLACED).write_text(json.dumps({"run_id": run_id}), encoding="utf-8")
        os.replace(self.path, self.aside)  # the whole old run in one rename, our lock with it
        self.moved_aside, self.locked = True, False
        try:
            self.path.mkdir()
            self.locked = _take_lock(self.path)
        except (OSError, MLMError):
            # The folder is another run's now: a put-back, or a later run's recovery of the aside, would replace its
            # files. The old run goes under a name no run looks for.
            self.moved_aside = False
            for name in (LOCK_FILE, REPLACED):
                (self.aside / name).unlink(missing_ok=True)
            kept = self.aside.with_name(f"{self.aside.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.aside, kept)
            raise MLMError(f"Another run took {self.path} while its old run was being moved aside; the old run is in "
                           f"{kept}: move it back once that run has ended.") from None
        (self.aside / LOCK_FILE).unlink(missing_ok=True)

    def recover_interrupted_overwrite(self) -> None:
        """An --overwrite run was killed: drop the run it replaced if it had saved a checkpoint, else put it back."""
        shutil.rmtree(self.deleting, ignore_errors=True)
        if not self.aside.is_dir():
            (self.path / REPLACED).unlink(missing_ok=True)  # written just before a move aside that a kill prevented
            return
        holder = _read_holder(self.aside / LOCK_FILE)
        if holder and not _is_stale(holder):
            raise MLMError(f"{self.aside} holds a run that a running process ({_describe(holder)}) moved aside; wait "
                           "for it to end.")
        marker = next((self.aside / name for name in (REPLACED, RESTORING) if (self.aside / name).is_file()), None)
        old_run = json.loads(marker.read_text(encoding="utf-8")).get("run_id") if marker else None
        if (new := _checkpoint_record(self.path)) is not None and new.run_id != old_run:
            return self._drop_aside()
        self._put_back()
        print(f"note: {self.path}: an --overwrite run ended before its first checkpoint; the run it replaced is back "
              "in place.", flush=True)

    def _put_back(self) -> None:
        """Remove what the new run wrote, then move the old run's files back; each phase is safe to redo after a kill:
        the marker's rename between them says the first is done."""
        if (self.aside / REPLACED).is_file():
            for name in EARLY_OUTPUTS:
                _remove(self.path / name)
            os.replace(self.aside / REPLACED, self.aside / RESTORING)
        for entry in self.aside.iterdir():
            if entry.name not in (LOCK_FILE, RESTORING):
                if (target := self.path / entry.name).exists() or target.is_symlink():  # the user's, added meanwhile
                    kept = target.with_name(f"{entry.name}.added-during-overwrite")
                    if kept.exists() or kept.is_symlink():  # kept by an earlier failed overwrite: that one stays too
                        kept = kept.with_name(f"{kept.name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
                    os.replace(target, kept)
                    print(f"note: kept your {entry.name} as {kept.name}: the replaced run's {entry.name} is back.",
                          flush=True)
                os.replace(entry, target)
        shutil.rmtree(self.aside, ignore_errors=True)

    def _drop_aside(self) -> None:
        os.replace(self.aside, self.deleting)  # first: a kill mid-deletion leaves a name that says it is being deleted
        shutil.rmtree(self.deleting, ignore_errors=True)


def folder_record(path: Path):
    """The record of the run in `path`: its run.json, else the copy in its newest intact checkpoint, else None."""
    return read_record(path) if (path / RECORD_FILE).is_file() else _checkpoint_record(path)


def record_to_resume(path: Path):
    """folder_record(path) as it will be once mlm-train has undone an --overwrite killed before its first checkpoint:
    the replaced run's record (recover_interrupted_overwrite puts it back), else the folder's."""
    aside = _aside(path.resolve() if path.is_symlink() else path)  # named as RunFolder.lock names it
    old = folder_record(aside) if aside.is_dir() else None
    if old is not None and ((new := _checkpoint_record(path)) is None or new.run_id == old.run_id):
        return old
    return folder_record(path)


def unfinished_run(folder: Path) -> str | None:
    """Why the run folder `folder`, given as a model, has none to load yet and what to load instead; None when it
    has its final model or holds no run. The run gets its model when it finishes, each checkpoint meanwhile."""
    if not (folder / RECORD_FILE).is_file() or (folder / WEIGHTS_FILE).is_file():
        return None
    holder = _read_holder(folder / LOCK_FILE) if (folder / LOCK_FILE).exists() else None
    running = holder is not None and not _is_stale(holder)  # a resume would be refused: the run holds the folder
    if not (saved := list_checkpoints(folder)):
        fix = "it has saved no checkpoint yet"
    else:
        processes = 1
        with suppress(MLMError):
            processes = read_record(folder).world_size  # a resume with fewer would change the global batch
        launch = ("mlm-train" if processes == 1 else
                  f"its {processes} processes, launched as it was: torchrun … -m mlm.cli.train")
        fix = f"give its checkpoint {saved[-1]}" + ("" if running else f", or finish the run with {launch} --resume "
                                                    f"latest --output-dir {shlex.quote(str(folder))}")
    state = f"is still training ({_describe(holder)})" if running else "has no final model yet"
    return f"{folder} holds a run that {state}: {fix}."


def _aside(path: Path) -> Path:
    return path.parent / f".{path.name}.replaced-run"


def _checkpoint_record(path: Path):
    for checkpoint in reversed(list_checkpoints(path)):
        try:
            verify_checkpoint(checkpoint)
            return read_record(checkpoint)
        except MLMError:
            continue
    return None


def _remove(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
    elif target.exists() or target.is_symlink():
        target.unlink()


# -- the lock ------------------------------------------------------------------------------------------------------


def _take_lock(path: Path) -> bool:
    lock = path / LOCK_FILE
    fd, tmp = tempfile.mkstemp(dir=path, prefix=f"{LOCK_FILE}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}, handle)
        for _ in range(3):
            with suppress(FileExistsError):
                os.link(tmp, lock)  # atomic: fails if the lock exists, and never leaves a half-written one
                return True
            holder = _read_holder(lock)
            if not _is_stale(holder) or not _take_over(lock, holder):
                raise MLMError(f"{path} is in use by another run ({_describe(holder)}). Wait for it to end or choose "
                               f"another output folder; if that process no longer runs, delete {lock}.")
            print(f"note: took over the lock of {path} left by a process that no longer runs ({_describe(holder)}).",
                  flush=True)
        raise MLMError(f"Could not lock {path}: other runs keep taking it. Choose another output folder.")
    finally:
        Path(tmp).unlink(missing_ok=True)


def _read_holder(lock: Path) -> dict:
    with suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
        holder = json.loads(lock.read_text(encoding="utf-8"))
        return holder if isinstance(holder, dict) else {}
    return {}


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}" if holder
            else "unreadable lock file")


def _is_stale(holder: dict) -> bool:
    """True only when the holder certainly no longer runs: same host, and no process has its pid."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
        return False
    except OSError as err:  # EPERM: it runs under another user
        return isinstance(err, ProcessLookupError)


def _take_over(lock: Path, holder: dict) -> bool:
    """Move the stale lock out of the way, unless another run replaced it meanwhile; True if it was moved."""
    moved = lock.with_name(f"{LOCK_FILE}.stale-{os.getpid()}")
    try:
        os.replace(lock, moved)
    except FileNotFoundError:  # another run took it over first; the next attempt sees its lock
        return True
    try:
        stale = _read_holder(moved) == holder
        if not stale:
            with suppress(FileExistsError):  # not the lock we judged stale: give it back
                os.link(moved, lock)
        return stale
    finally:
        moved.unlink(missing_ok=True)
