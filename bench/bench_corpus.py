"""Streaming preparation into the chunk store, against bare encode_batch and run_mlm's datasets path; and the
peak RSS of a huge document and of training on every chunk.

    PYTHONPATH=. python bench/bench_corpus.py [--scales 1,8] [--datasets-scales 1] [--repeat 3] [--no-datasets]
                                              [--no-rss]

IMDb's train texts repeated `scale` times are written to a temporary .jsonl. Each case runs in a fresh
subprocess, so its peak RSS (VmHWM) is its own. What each case's wall time includes:

    store      mlm's load_chunks end to end: hash the file for the cache key, read it, tokenize, chunk, write the
               memory-mapped store (mlm/corpus_store.py) and checksum it; a cold cache every time; the
               tokenizer wrapped in fast_encode's shortcuts, as mlm-train and mlm-prepare-data wrap it
    bare       tokenizer.encode_batch over the same texts, already read into memory (not timed), 2,000 per call,
               one call at a time, only the token count kept: the tokenizing floor the goal compares with
    fast       the same with encode_batch_fast (the same ids, no offsets, no word ids)
    encoder    the store's own tokenizing (mlm/speed/fast_encode.py's shortcuts where they are exact: word ids
               derived from the ids, the normalizer skipped on plain ASCII documents) over the same texts in
               memory, ids and word ids as arrays, one call at a time: the floor of what the store does
    read       reading the texts alone, as the store does (mlm/files/corpus_files.py), nothing else
    hash       the file's SHA-256 alone, as the cache key does
    datasets   load_dataset("json") + map(tokenize, batched=True, num_proc=cores) + map(group_texts), the
               course's and run_mlm's path (only when `datasets` is installed), a cold cache
    train      `mlm-train --train-size all --test-size 1000` for a few steps of a tiny random model (the real
               tokenizer) on the store the store case built: its peak RSS is the data path's (not timed)
    long       load_chunks of a one-document .txt corpus, one line of 50 MB: preparation's peak RSS

--repeat runs store, bare, fast, encoder and datasets alternately that many times per scale; the ratios use each
case's fastest run, as other processes on the machine only ever slow a run down.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMDB_TRAIN: Path  # IMDb's train split (parquet) and the distilbert-base-uncased folder: set from the flags in main()
TOKENIZER: Path

CASES = {
    "store": """
from mlm.corpus import load_chunks
from mlm.speed.fast_encode import fast_tokenizer
from mlm.tokenizer import load_tokenizer
tokenizer = fast_tokenizer(load_tokenizer(TOKENIZER))  # as mlm-train and mlm-prepare-data tokenize
start = time.perf_counter()
chunks = load_chunks(CORPUS, "train", tokenizer, chunk_size=128, cache_dir=WORK)
seconds = time.perf_counter() - start
result = dict(seconds=seconds, tokens=chunks.n_tokens, chunks=len(chunks), disk=disk(chunks.cache_path))
""",
    # bare and fast: the same loop over encode_batch and encode_batch_fast (see BARE below)
    "encoder": """
import pyarrow.json
from mlm.speed.fast_encode import fast_tokenizer
from mlm.tokenizer import load_tokenizer
tokenizer = fast_tokenizer(load_tokenizer(TOKENIZER))
texts = pyarrow.json.read_json(CORPUS).column("text").to_pylist()
start, tokens = time.perf_counter(), 0
for first in range(0, len(texts), 2000):
    tokens += len(tokenizer.encode(texts[first : first + 2000])[0])
result = dict(seconds=time.perf_counter() - start, tokens=tokens, chunks=None, disk=None)
""",
    "read": """
from mlm.files.corpus_files import iter_texts
start, chars = time.perf_counter(), 0
for texts, _ in iter_texts([Path(CORPUS)]):
    chars += sum(map(len, texts))
result = dict(seconds=time.perf_counter() - start, tokens=None, chunks=None, disk=None)
""",
    "hash": """
from mlm.files.hashing import file_sha256
start = time.perf_counter()
file_sha256(CORPUS)
result = dict(seconds=time.perf_counter() - start, tokens=None, chunks=None, disk=None)
""",
    "datasets": """
import datasets, transformers
datasets.disable_progress_bars()
tokenizer = transformers.AutoTokenizer.from_pretrained(str(TOKENIZER))
start = time.perf_counter()
raw = datasets.load_dataset("json", data_files=CORPUS, split="train", cache_dir=WORK)
def tokenize(examples):
    result = tokenizer(examples["text"])
    result["word_ids"] = [result.word_ids(i) for i in range(len(result["input_ids"]))]
    return result
def group_texts(examples):
    joined = {k: sum(examples[k], []) for k in examples.keys()}
    total = len(joined["input_ids"]) // 128 * 128
    result = {k: [t[i : i + 128] for i in range(0, total, 128)] for k, t in joined.items()}
    result["labels"] = result["input_ids"].copy()
    return result
cores = os.cpu_count()
tokenized = raw.map(tokenize, batched=True, num_proc=cores, remove_columns=["text"])
chunked = tokenized.map(group_texts, batched=True, num_proc=cores)
seconds = time.perf_counter() - start
tokens = sum(len(ids) for ids in tokenized["input_ids"])  # for the rate column, not timed
result = dict(seconds=seconds, tokens=tokens, chunks=len(chunked), disk=disk(Path(WORK)))
""",
    # WORK holds the store built by the store case and the tiny model's folder (see `tiny_model`).
    "train": """
from mlm.cli.train import main
start = time.perf_counter()
main(["--model", str(Path(WORK) / "model"), "--init", "random", "--dataset", CORPUS, "--cache-dir", WORK,
      "--train-size", "all", "--test-size", "1000", "--max-steps", "4", "--batch-size", "8", "--lean", "off",
      "--device", "cpu", "--output-dir", str(Path(WORK) / "run"), "--eval-batch-size", "64"])
result = dict(seconds=time.perf_counter() - start, tokens=None, chunks=None, disk=None)
""",
}
BARE = """
import pyarrow.json
from mlm.tokenizer import load_tokenizer
backend = load_tokenizer(TOKENIZER).backend
texts = pyarrow.json.read_json(CORPUS).column("text").to_pylist()
start, tokens = time.perf_counter(), 0
for first in range(0, len(texts), 2000):
    tokens += sum(len(e.ids) for e in backend.METHOD(texts[first : first + 2000]))
result = dict(seconds=time.perf_counter() - start, tokens=tokens, chunks=None, disk=None)
"""
CASES["bare"], CASES["fast"] = BARE.replace("METHOD", "encode_batch"), BARE.replace("METHOD", "encode_batch_fast")
CASES["long"] = CASES["store"]

PRELUDE = """
import json, os, sys, time
from pathlib import Path
CORPUS, WORK, TOKENIZER = sys.argv[1], sys.argv[2], Path(sys.argv[3])
def disk(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
"""
EPILOGUE = """
# VmHWM, not ru_maxrss: ru_maxrss keeps the high-water mark of the forked parent across exec, the bench's own.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
result["rss"] = int(hwm.split()[1]) * 1024
print(json.dumps(result))
"""


def write_corpus(path: Path, scale: int) -> None:
    import pyarrow.parquet as pq

    texts = pq.read_table(IMDB_TRAIN, columns=["text"]).column("text").to_pylist()
    lines = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    with open(path, "wb") as out:
        for _ in range(scale):
            out.write(lines)


def write_long_document(path: Path, size: int = 50 << 20) -> None:
    """One line of `size` bytes: IMDb's train reviews joined by spaces, repeated; .txt holds a document per line."""
    import pyarrow.parquet as pq

    texts = pq.read_table(IMDB_TRAIN, columns=["text"]).column("text").to_pylist()
    line = " ".join(" ".join(text.split()) for text in texts).encode()
    with open(path, "wb") as out:
        for _ in range(size // len(line)):
            out.write(line + b" ")
        out.write(line[: size % len(line)].rsplit(b" ", 1)[0] + b"\n")


def tiny_model(folder: Path) -> None:
    """distilbert-base-uncased's config shrunk (its full vocabulary kept) beside its tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((TOKENIZER / "config.json").read_text())
    config.update(dim=32, hidden_dim=64, n_layers=1, n_heads=2)
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        if (TOKENIZER / name).is_file():
            shutil.copy(TOKENIZER / name, folder / name)


def run_case(name: str, corpus: Path, work: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PRELUDE + CASES[name] + EPILOGUE, str(corpus), str(work),
                           str(TOKENIZER)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "true"})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(scale, name: str, result: dict) -> None:
    per_token = f"{result['disk'] / result['tokens']:.2f}" if result["disk"] else "-"
    rate = f"{result['tokens'] / result['seconds']:,.0f}" if result["tokens"] else "-"
    print(f"{scale:>5} {name:<9} {result['seconds']:>8.1f} {rate:>10} {result['rss'] / 2**30:>7.2f}Gi "
          f"{per_token:>8} {result['chunks'] or '-':>9}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="1,8", help="corpus sizes, in copies of IMDb's train split")
    parser.add_argument("--no-datasets", action="store_true", help="skip the datasets path")
    parser.add_argument("--datasets-scales", default=None, help="scales for the datasets path (default: --scales)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of the timed cases per scale (the fastest counts)")
    parser.add_argument("--no-rss", action="store_true", help="skip the train and long cases")
    parser.add_argument("--dataset", default="stanfordnlp/imdb", help="IMDb: Hub id or a local folder in its layout "
                        "(default: %(default)s)")
    parser.add_argument("--model", default="distilbert-base-uncased", help="the tokenizer's (and config's) Hub id "
                        "or local folder (default: %(default)s)")
    args = parser.parse_args()
    global IMDB_TRAIN, TOKENIZER
    from mlm.files.data_files import find_data_files
    from mlm.files.hub import resolve_repo

    [IMDB_TRAIN] = find_data_files(args.dataset, "train")
    TOKENIZER = resolve_repo(args.model, allow_patterns=["config.json", "tokenizer*.json", "vocab.txt"])
    try:
        import datasets  # noqa: F401
        have_datasets = not args.no_datasets
    except ImportError:
        have_datasets = False
    scales = [int(s) for s in args.scales.split(",")]
    datasets_scales = [int(s) for s in (args.datasets_scales or args.scales).split(",")]
    print(f"cores: {os.cpu_count()}")
    print(f"{'scale':>5} {'case':<9} {'wall s':>8} {'tokens/s':>10} {'peak RSS':>9} {'B/token':>8} {'chunks':>9}")
    results = {}

    def measure(scale, name, corpus, work):
        work.mkdir(parents=True, exist_ok=True)
        result = run_case(name, corpus, work)
        show(scale, name, result)
        best = results.get((scale, name))
        if best is None or result["seconds"] < best["seconds"]:
            results[scale, name] = result
        return result

    for scale in scales:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            write_corpus(corpus, scale)
            for run in range(args.repeat):
                measure(scale, "store", corpus, Path(tmp) / f"store{run}")
                measure(scale, "bare", corpus, Path(tmp) / f"bare{run}")
                measure(scale, "fast", corpus, Path(tmp) / f"fast{run}")
                measure(scale, "encoder", corpus, Path(tmp) / f"encoder{run}")
                if have_datasets and scale in datasets_scales:
                    measure(scale, "datasets", corpus, Path(tmp) / f"datasets{run}")
                    shutil.rmtree(Path(tmp) / f"datasets{run}")  # its cache is large at 8x
            for name in ("read", "hash"):
                measure(scale, name, corpus, Path(tmp) / name)
            if not args.no_rss:
                tiny_model(Path(tmp) / "store0" / "model")
                measure(scale, "train", corpus, Path(tmp) / "store0")
    if not args.no_rss:
        with tempfile.TemporaryDirectory() as tmp:
            document = Path(tmp) / "long.txt"
            write_long_document(document)
            measure("50MB", "long", document, Path(tmp) / "long")
    for scale in scales:
        store, bare = results[scale, "store"], results[scale, "bare"]
        line = (f"{scale}x: store/bare time {store['seconds'] / bare['seconds']:.2f}, "
                f"store/encoder time {store['seconds'] / results[scale, 'encoder']['seconds']:.2f}")
        if (scale, "datasets") in results:
            other = results[scale, "datasets"]
            line += (f", datasets/store time {other['seconds'] / store['seconds']:.1f}, "
                     f"store/datasets disk {store['disk'] / other['disk']:.3f}")
        print(line)
    for name in ("store", "train"):
        if (1, name) in results and (8, name) in results:
            print(f"{name} peak RSS 8x/1x: {results[8, name]['rss'] / results[1, name]['rss']:.2f}")


if __name__ == "__main__":
    main()
