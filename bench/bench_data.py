"""Time the data pipeline on IMDb train against the tokenizer alone and against the course's pipeline.

    python bench/bench_data.py --dataset path/to/imdb --tokenizer path/to/distilbert-base-uncased

Everything runs in one process, in this order: a short warm-up, our tokenize+chunk, the bare encode_batch,
the reference-style pipeline, then each timed run once more; figures use the faster of the two runs. Peak
memory is the process's resident-set high-water mark (resource.getrusage ru_maxrss, which sees the
tokenizer's Rust allocations, unlike tracemalloc), read right after our first run, before the bare and
reference runs push it higher.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlm.corpus import load_chunks
from mlm.data import tokenize_and_chunk
from mlm.errors import run_cli
from mlm.files.data_files import load_texts
from mlm.tokenizer import load_tokenizer

CHUNK_SIZE = 128
REFERENCE_BATCH = 1_000  # datasets.map(batched=True)'s default batch_size


def group_texts(examples: dict[str, list[list]], chunk_size: int = CHUNK_SIZE) -> dict[str, list[list]]:
    """The HF course's group_texts, as written there: Python lists, sum(lists, []) and slicing."""
    concatenated = {k: sum(examples[k], []) for k in examples}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // chunk_size) * chunk_size
    result = {
        k: [t[i : i + chunk_size] for i in range(0, total_length, chunk_size)] for k, t in concatenated.items()
    }
    result["labels"] = result["input_ids"].copy()
    return result


def reference_pipeline(texts: list[str], backend) -> tuple[dict[str, list[list]], float, float]:
    """Course-style: per 1,000-review batch, tokenize (input_ids, attention_mask, word_ids) then group_texts.

    Returns the chunks and the seconds spent tokenizing and grouping.
    """
    chunks: dict[str, list[list]] = {"input_ids": [], "attention_mask": [], "word_ids": [], "labels": []}
    tokenize_s = group_s = 0.0
    for start in range(0, len(texts), REFERENCE_BATCH):
        t0 = time.perf_counter()
        encodings = backend.encode_batch(texts[start : start + REFERENCE_BATCH])
        examples = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "word_ids": [e.word_ids for e in encodings],
        }
        t1 = time.perf_counter()
        for key, values in group_texts(examples).items():
            chunks[key] += values
        t2 = time.perf_counter()
        tokenize_s += t1 - t0
        group_s += t2 - t1
    return chunks, tokenize_s, group_s


def _timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 / 1024 / 1024 if sys.platform == "darwin" else 1 / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def bench_data(dataset_dir: str | Path, tokenizer_dir: str | Path, *, verbose: bool = True) -> dict:
    """Measure the pipeline on the train split of `dataset_dir`; return every figure in a flat dict."""
    say = print if verbose else (lambda *a, **k: None)
    tokenizer = load_tokenizer(tokenizer_dir)
    backend = tokenizer.backend
    texts, read_s = _timed(load_texts, dataset_dir, "train")
    backend.encode_batch(texts[:500])  # warm-up: thread pool start, first allocations
    rss_before = _peak_rss_mb()

    ours, ours_s = _timed(tokenize_and_chunk, texts, tokenizer, chunk_size=CHUNK_SIZE)
    rss_ours = _peak_rss_mb()
    del ours
    encodings, bare_s = _timed(backend.encode_batch, texts)
    n_tokens = sum(map(len, encodings))
    del encodings
    reference, ref_tokenize_s, ref_group_s = reference_pipeline(texts, backend)
    ref_s = ref_tokenize_s + ref_group_s

    ours, ours_s2 = _timed(tokenize_and_chunk, texts, tokenizer, chunk_size=CHUNK_SIZE)
    _, bare_s2 = _timed(backend.encode_batch, texts)
    grouped, grouped_s = _timed(
        tokenize_and_chunk, texts, tokenizer, chunk_size=CHUNK_SIZE, group_size=REFERENCE_BATCH
    )
    identical = bool(
        np.array_equal(grouped.input_ids, np.array(reference["input_ids"], dtype=np.int32))
        and np.array_equal(
            grouped.word_ids,
            np.array([[-1 if w is None else w for w in row] for row in reference["word_ids"]], dtype=np.int32),
        )
    )

    with tempfile.TemporaryDirectory() as cache_dir:
        _, cold_s = _timed(load_chunks, dataset_dir, "train", tokenizer, chunk_size=CHUNK_SIZE, cache_dir=cache_dir)
        cached, warm_s = _timed(load_chunks, dataset_dir, "train", tokenizer, chunk_size=CHUNK_SIZE,
                                cache_dir=cache_dir)
        cache_mb = sum(f.stat().st_size for f in cached.cache_path.iterdir()) / 2**20

    best_ours, best_bare = min(ours_s, ours_s2), min(bare_s, bare_s2)
    figures = {
        "reviews": len(texts),
        "tokens": n_tokens,
        "read_texts_s": read_s,
        "bare_encode_batch_s": best_bare,
        "bare_encode_batch_runs_s": [bare_s, bare_s2],
        "ours_tokenize_chunk_s": best_ours,
        "ours_tokenize_chunk_runs_s": [ours_s, ours_s2],
        "ours_group1000_s": grouped_s,
        "reference_s": ref_s,
        "reference_tokenize_s": ref_tokenize_s,
        "reference_group_texts_s": ref_group_s,
        "ours_vs_bare": best_ours / best_bare,
        "reference_vs_ours": ref_s / best_ours,
        "chunks_ours": len(ours),
        "chunks_ours_group1000": len(grouped),
        "chunks_reference": len(reference["input_ids"]),
        "group1000_identical_to_reference": identical,
        "load_chunks_cold_s": cold_s,
        "load_chunks_cached_s": warm_s,
        "cache_file_mb": cache_mb,
        "peak_rss_before_mb": rss_before,
        "peak_rss_after_ours_mb": rss_ours,
        "peak_rss_end_mb": _peak_rss_mb(),
    }
    say(f"IMDb train: {len(texts):,} reviews, {n_tokens:,} tokens (read in {read_s:.2f} s)")
    say(f"bare encode_batch            {best_bare:6.2f} s   runs {bare_s:.2f}, {bare_s2:.2f}")
    say(f"ours tokenize+chunk          {best_ours:6.2f} s   runs {ours_s:.2f}, {ours_s2:.2f}"
        f"   = {figures['ours_vs_bare']:.3f}x bare (target <= 1.15)")
    say(f"reference-style pipeline     {ref_s:6.2f} s   (tokenize {ref_tokenize_s:.2f} + group_texts "
        f"{ref_group_s:.2f})   = {figures['reference_vs_ours']:.2f}x ours (target >= 2.5)")
    say(f"ours with group_size=1000    {grouped_s:6.2f} s")
    say(f"chunks: ours {len(ours):,}; ours group_size=1000 {len(grouped):,}; reference {len(reference['input_ids']):,}"
        f"; group_size=1000 identical to reference: {identical}")
    say(f"load_chunks: cold {cold_s:.2f} s, cached {warm_s:.3f} s ({cache_mb:.1f} MB store)")
    say(f"peak RSS (ru_maxrss): {rss_before:.0f} MB after reading texts, {rss_ours:.0f} MB after ours, "
        f"{figures['peak_rss_end_mb']:.0f} MB at the end (bare encode_batch of all reviews at once)")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="stanfordnlp/imdb",
                        help="stanfordnlp/imdb: the Hub id or a folder with its layout (default: %(default)s)")
    parser.add_argument("--tokenizer", default="distilbert-base-uncased",
                        help="Hub id or folder with tokenizer.json (default: %(default)s)")
    args = parser.parse_args(argv)
    bench_data(args.dataset, args.tokenizer)


if __name__ == "__main__":
    run_cli(main)
