"""SHA-256 digests: of a file, computed once per process (the chunk store's key, mlm/corpus_store.py, and the
run record, mlm/run/session.py, both identify the data files by content, and a run start needs both; checkpoint
manifests use it too), of a tokenizer, and of a JSON-able value."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

# (resolved path, device, inode, size, mtime_ns, ctime_ns) -> hex digest. Any later write to the file, a rename
# over it or `cp -p` (which keeps the mtime but not the ctime) changes the identity, so a remembered digest is not
# stale; except that file systems stamp times at a coarse tick (milliseconds), so a same-size rewrite right after
# a write could keep them. As git does with racily clean files, a file changed within RACY_NS of being hashed is
# therefore not remembered.
_DIGESTS: dict[tuple, str] = {}
RACY_NS = 2_000_000_000


def _identity(path: Path) -> tuple:
    stat = os.stat(path)
    return str(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def file_sha256(file: str | Path) -> str:
    """The hex SHA-256 of the bytes of `file`, remembered for this process while the file stays as it was."""
    path = Path(file).resolve()
    before = _identity(path)
    if (digest := _DIGESTS.get(before)) is not None:
        return digest
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            hasher.update(block)
    digest = hasher.hexdigest()
    settled = time.time_ns() - max(before[4], before[5]) > RACY_NS
    if settled and _identity(path) == before:  # not written to while it was read: the digest is of these bytes
        _DIGESTS[before] = digest
    return digest


def tokenizer_sha256(tokenizer) -> str:
    """The hex SHA-256 of an `mlm.tokenizer.Tokenizer`'s serialized JSON: vocabulary, normalizer and template."""
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


def json_sha256(value) -> str:
    """The hex SHA-256 of `value` as canonical JSON (sorted keys): the same for equal dicts in any order."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
