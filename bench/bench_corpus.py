"""Streaming preparation into the chunk store, against bare encode_batch and run_mlm's datasets path.

    PYTHONPATH=. python bench/bench_corpus.py [--scales 1,8] [--no-datasets]

IMDb's train texts repeated `scale` times are written to a temporary .jsonl. Each case runs in a fresh
subprocess, so its peak RSS (ru_maxrss) is its own:

    store      mlm's load_chunks: read, tokenize, chunk and write the memory-mapped store (mlm/corpus_store.py)
    bare       tokenizer.encode_batch over the same texts, 2,000 at a time, nothing kept: the tokenizing floor
    datasets   load_dataset("json") + map(tokenize, batched=True, num_proc=cores) + map(group_texts), the
               course's and run_mlm's path (only when `datasets` is installed)

Prints wall time, tokens/s, peak RSS and the bytes per token on disk, then the ratios the goals are about.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "hub"
IMDB_TRAIN = SHARED / "datasets" / "stanfordnlp" / "imdb" / "plain_text" / "train-00000-of-00001.parquet"
TOKENIZER = SHARED / "models" / "distilbert-base-uncased"

CASES = {
    "store": """
from mlm.data import load_chunks
from mlm.tokenizer import load_tokenizer
tokenizer = load_tokenizer(TOKENIZER)
start = time.perf_counter()
chunks = load_chunks(CORPUS, "train", tokenizer, chunk_size=128, cache_dir=WORK)
seconds = time.perf_counter() - start
result = dict(seconds=seconds, tokens=chunks.n_tokens, chunks=len(chunks), disk=disk(chunks.cache_path))
""",
    "bare": """
import pyarrow.json
from mlm.tokenizer import load_tokenizer
backend = load_tokenizer(TOKENIZER).backend
texts = pyarrow.json.read_json(CORPUS).column("text").to_pylist()
start, tokens = time.perf_counter(), 0
for first in range(0, len(texts), 2000):
    tokens += sum(len(e.ids) for e in backend.encode_batch(texts[first : first + 2000]))
result = dict(seconds=time.perf_counter() - start, tokens=tokens, chunks=None, disk=None)
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
tokens = sum(len(ids) for ids in tokenized["input_ids"])
chunked = tokenized.map(group_texts, batched=True, num_proc=cores)
result = dict(seconds=time.perf_counter() - start, tokens=tokens, chunks=len(chunked), disk=disk(Path(WORK)))
""",
}

PRELUDE = """
import json, os, resource, sys, time
from pathlib import Path
CORPUS, WORK, TOKENIZER = sys.argv[1], sys.argv[2], Path(sys.argv[3])
def disk(path):
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
"""
EPILOGUE = """
result["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(result))
"""


def write_corpus(path: Path, scale: int) -> None:
    import pyarrow.parquet as pq

    texts = pq.read_table(IMDB_TRAIN, columns=["text"]).column("text").to_pylist()
    lines = "".join(json.dumps({"text": text}) + "\n" for text in texts).encode()
    with open(path, "wb") as out:
        for _ in range(scale):
            out.write(lines)


def run_case(name: str, corpus: Path, work: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", PRELUDE + CASES[name] + EPILOGUE, str(corpus), str(work),
                           str(TOKENIZER)], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "true"})
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="1,8", help="corpus sizes, in copies of IMDb's train split")
    parser.add_argument("--no-datasets", action="store_true", help="skip the datasets path")
    parser.add_argument("--datasets-scales", default=None, help="scales for the datasets path (default: --scales)")
    args = parser.parse_args()
    if not (IMDB_TRAIN.is_file() and TOKENIZER.is_dir()):
        raise SystemExit(f"needs {IMDB_TRAIN} and {TOKENIZER}")
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
    for scale in scales:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = Path(tmp) / "corpus.jsonl"
            write_corpus(corpus, scale)
            names = ["store", "bare"] + (["datasets"] if have_datasets and scale in datasets_scales else [])
            for name in names:
                work = Path(tmp) / name
                work.mkdir()
                result = results[scale, name] = run_case(name, corpus, work)
                per_token = f"{result['disk'] / result['tokens']:.2f}" if result["disk"] else "-"
                print(f"{scale:>5} {name:<9} {result['seconds']:>8.1f} {result['tokens'] / result['seconds']:>10,.0f} "
                      f"{result['rss'] / 2**30:>7.2f}Gi {per_token:>8} {result['chunks'] or '-':>9}", flush=True)
    for scale in scales:
        store, bare = results[scale, "store"], results[scale, "bare"]
        line = f"{scale}x: store/bare time {store['seconds'] / bare['seconds']:.2f}"
        if (scale, "datasets") in results:
            other = results[scale, "datasets"]
            line += (f", datasets/store time {other['seconds'] / store['seconds']:.1f}, "
                     f"store/datasets disk {store['disk'] / other['disk']:.3f}")
        print(line)
    if (1, "store") in results and (8, "store") in results:
        print(f"store peak RSS 8x/1x: {results[8, 'store']['rss'] / results[1, 'store']['rss']:.2f}")


if __name__ == "__main__":
    main()
