"""bench/bench.py runs end to end on a tiny model (no transformers, no Hub, no local IMDb) and reports every figure.

Only that it runs and what it reports: speed itself is measured by running the script, never in a test.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_model_train_eval_sections_report_finite_figures_for_ours():
    command = [sys.executable, str(ROOT / "bench" / "bench.py"), "--sections", "model,train,eval",
               "--model-dir", str(ROOT / "mlm" / "smoke"), "--no-reference", "--steps", "1", "--warmup", "0",
               "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["setup"]["batch"] == [2, 16] and report["setup"]["transformers"] is None
    assert not [note for note in report["notes"] if "failed" in note]
    figures = {(row["section"], row["figure"]): row for row in report["rows"]}
    for key in [("train", "tokens/s (higher is better)"), ("train", "MFU % (model FLOPs each executes)"),
                ("train", "tokens/s, gradient checkpointing"), ("train", "peak RSS growth, MiB"),
                ("train", "peak RSS growth, MiB, live tensors"), ("eval", "tokens/s (higher is better)")]:
        ours = figures[key]["ours"]
        assert isinstance(ours, float) and math.isfinite(ours) and ours > 0, (key, ours)
        assert figures[key]["reference"] is None  # --no-reference: the column stays empty, no made-up baseline
