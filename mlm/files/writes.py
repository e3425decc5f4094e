"""Writing files so that a crash leaves the old file or the new one, never half of one, with normal permissions."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# The end of every temporary file mlm writes: a clean-up after a crash removes these and never a file of the user's.
TMP_SUFFIX = ".mlm.tmp"


def atomic_write(path: Path, write) -> None:
    """Call write(temporary_path) for a file next to `path`, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        normal_permissions(Path(tmp))  # mkstemp makes the file private (0600); the final file should not be
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def normal_permissions(path: Path, *, directory: bool = False) -> None:
    """Give `path` the permissions a plain open()/mkdir() would: 0666 (0777 for a folder) less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
