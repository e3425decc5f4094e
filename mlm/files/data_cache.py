"""Where the prepared chunks live: one store (mlm/corpus_store.py) per (data, tokenizer, chunking) combination,
named by the hash of `cache_key`, everything the chunks depend on."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import constants

from mlm.files.hashing import file_sha256, json_sha256, tokenizer_sha256
from mlm.tokenizer import Tokenizer

# Bump when the meaning or layout of a store changes, so old stores are rebuilt rather than misread.
CACHE_FORMAT_VERSION = 2


def default_cache_dir() -> Path:
    """$MLM_CACHE if set, else <HF_HOME>/mlm (HF_HOME defaults to ~/.cache/huggingface)."""
    return Path(os.environ.get("MLM_CACHE") or Path(constants.HF_HOME) / "mlm").expanduser()


def cache_key(files: list[Path], tokenizer: Tokenizer, *, chunk_size: int, group_size: int | None, text_column: str,
              one_document_per_file: bool = False) -> dict:
    """Everything the chunks depend on, as a JSON-able dict; its hash names the store.

    Data files are identified by the SHA-256 of their content, not by path + size + mtime: hashing IMDb's corpus
    takes a small fraction of tokenizing it, and buys exactness. A copied or re-downloaded but identical file still
    hits the cache, and a file edited in place always misses it, even when its size and mtime survive (`cp -p`).
    """
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "data_sha256": [file_sha256(file) for file in files],
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "chunk_size": chunk_size,
        "group_size": group_size,
        "text_column": text_column,
        "one_document_per_file": one_document_per_file,
    }


def store_path(directory: Path, split: str, chunk_size: int, key: dict) -> Path:
    return directory / "chunks" / f"{split}-{chunk_size}-{json_sha256(key)[:20]}"
