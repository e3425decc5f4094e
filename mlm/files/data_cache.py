"""The on-disk cache of tokenized chunks: one safetensors file per (data, tokenizer, chunking) combination.

`cache_key` names everything the chunks depend on; its hash names the file. Reading checks the key, the
dtypes, the shapes and a checksum of the arrays, so a stale or damaged file is rebuilt, never trusted. Writing is
atomic. mlm/data.py's `load_chunks` uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mlm.tokenizer import Tokenizer

# Bump when the meaning or layout of a cache file changes, so old files are rebuilt rather than misread.
CACHE_FORMAT_VERSION = 1


class CachedChunks(NamedTuple):
    input_ids: np.ndarray  # (N, chunk_size) int32
    word_ids: np.ndarray  # (N, chunk_size) int32
    n_reviews: int
    n_tokens: int


def default_cache_dir() -> Path:
    """$MLM_CACHE if set, else <HF_HOME>/mlm (HF_HOME defaults to ~/.cache/huggingface), else ~/.cache/mlm."""
    if os.environ.get("MLM_CACHE"):
        return Path(os.environ["MLM_CACHE"]).expanduser()
    try:
        from huggingface_hub import constants
    except ImportError:
        return Path("~/.cache/mlm").expanduser()
    return Path(constants.HF_HOME).expanduser() / "mlm"


def cache_key(
    files: list[Path], tokenizer: Tokenizer, *, chunk_size: int, group_size: int | None, text_column: str
) -> dict:
    """Everything the chunks depend on, as a JSON-able dict; its hash names the cache file.

    Data files are identified by the SHA-256 of their content, not by path + size + mtime: hashing IMDb's
    ~130 MB takes well under 0.1 s, which is nothing next to tokenizing (seconds) and buys exactness. A copied
    or re-downloaded but identical file still hits the cache, and a file edited in place always misses it,
    even when its size and mtime survive (e.g. `cp -p`, or an edit within the file system's mtime granularity).
    The tokenizer is identified by its serialized JSON, which covers vocabulary, normalizer and template.
    """
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "data_sha256": [_file_sha256(file) for file in files],
        "tokenizer_sha256": hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest(),
        "chunk_size": chunk_size,
        "group_size": group_size,
        "text_column": text_column,
    }


def _file_sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _arrays_sha256(input_ids: np.ndarray, word_ids: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(input_ids).data)
    digest.update(np.ascontiguousarray(word_ids).data)
    return digest.hexdigest()


def cache_path(directory: Path, split: str, chunk_size: int, key: dict) -> tuple[Path, str]:
    """(the cache file for `key`, the key's SHA-256)."""
    key_hash = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return directory / "chunks" / f"{split}-{chunk_size}-{key_hash[:20]}.safetensors", key_hash


def read_cache(path: Path, key_hash: str, chunk_size: int) -> CachedChunks | None:
    """The arrays stored at `path`, or None (with a warning) when the file cannot be trusted."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            input_ids = handle.get_tensor("input_ids")
            word_ids = handle.get_tensor("word_ids")
        problem = None
        if metadata.get("key_sha256") != key_hash:
            problem = "its key does not match its name"
        elif not (input_ids.dtype == word_ids.dtype == np.int32):
            problem = f"wrong dtypes {input_ids.dtype}/{word_ids.dtype}"
        elif input_ids.ndim != 2 or input_ids.shape[1] != chunk_size or input_ids.shape != word_ids.shape:
            problem = f"wrong shapes {input_ids.shape}/{word_ids.shape}"
        elif metadata.get("arrays_sha256") != _arrays_sha256(input_ids, word_ids):
            # safetensors checks the header and the file length, not the bytes: a flipped bit passes.
            problem = "checksum mismatch"
        n_reviews, n_tokens = int(metadata["n_reviews"]), int(metadata["n_tokens"])
    except Exception as err:  # any failure to read (SafetensorError, OSError, missing key) means: rebuild
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        warnings.warn(f"Ignoring corrupt cache file {path} ({problem}); rebuilding it.", stacklevel=3)
        return None
    return CachedChunks(input_ids, word_ids, n_reviews, n_tokens)


def write_cache(path: Path, chunks: CachedChunks, key: dict, key_hash: str) -> bool:
    """Write `chunks` to `path` atomically; warn and return False if that is impossible."""
    from safetensors import SafetensorError
    from safetensors.numpy import save_file

    metadata = {
        "key": json.dumps(key, sort_keys=True),
        "key_sha256": key_hash,
        "arrays_sha256": _arrays_sha256(chunks.input_ids, chunks.word_ids),
        "n_reviews": str(chunks.n_reviews),
        "n_tokens": str(chunks.n_tokens),
    }
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A temporary file in the same folder, then os.replace: readers (another process included) see either
        # no file or a complete one, never a half-written one, and two writers cannot mix their bytes.
        handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(handle)
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a shared cache folder should stay readable
        tensors = {"input_ids": np.ascontiguousarray(chunks.input_ids),
                   "word_ids": np.ascontiguousarray(chunks.word_ids)}
        save_file(tensors, tmp_name, metadata=metadata)
        os.replace(tmp_name, path)
        tmp_name = None
    except (OSError, SafetensorError) as err:  # e.g. read-only folder, disk full
        warnings.warn(f"Could not write the cache file {path} ({err}); continuing without cache. "
                      "Pass a writable --cache-dir or set MLM_CACHE.", stacklevel=3)
        return False
    finally:
        if tmp_name is not None and os.path.exists(tmp_name):
            os.remove(tmp_name)
    return True
