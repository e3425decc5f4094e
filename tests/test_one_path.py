"""One path per concept: a learner's runs (--smoke, the walkthrough) execute the chapter's code they read, and no
line of the speed layer's substitutes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"

# Runs `argv` as the named program in this process, with every Python function call into mlm recorded (a profile
# hook sees each call, whatever imported name it went through); then prints the calls and the modules imported.
TRACER = """
import json, runpy, sys, threading
program, record, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
calls = set()
def hook(frame, event, arg):
    if event == "call" and "/mlm/" in frame.f_code.co_filename:
        calls.add((frame.f_code.co_filename.split("/mlm/", 1)[1], frame.f_code.co_qualname))
sys.setprofile(hook)
threading.setprofile(hook)
sys.argv = [program, *argv]
try:
    runpy.run_path(program, run_name="__main__")
except SystemExit as stop:
    assert not stop.code, stop.code
finally:
    sys.setprofile(None)
    with open(record, "w") as out:
        json.dump({"calls": sorted(calls), "modules": sorted(m for m in sys.modules if m.startswith("mlm"))}, out)
"""

CHAPTER = {("data.py", "tokenize"), ("data.py", "chunk"), ("masking.py", "mask_tokens"),
           ("model.py", "DistilBertForMaskedLM.forward"), ("model.py", "MultiHeadSelfAttention.attend"),
           ("model.py", "FeedForward.forward"), ("train.py", "train_step"), ("optim.py", "set_learning_rate"),
           ("evaluate.py", "score_batches")}
SPEED_SUBSTITUTES = {"mlm.speed.fast_encode", "mlm.speed.lean", "mlm.speed.lean_ops", "mlm.speed.compiled",
                     "mlm.speed.amp"}


def traced(tmp_path: Path, program: Path, *argv: str) -> dict:
    record = tmp_path / "calls.json"
    done = subprocess.run([sys.executable, "-c", TRACER, str(program), str(record), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(record.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("program", ["smoke", "walkthrough"])
def test_a_learners_run_executes_the_chapter_and_no_speed_substitute(tmp_path, program):
    if program == "smoke":
        seen = traced(tmp_path, ROOT / "scripts" / "train.py", "--smoke", "--epochs", "1", "--no-progress",
                      "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run"))
    else:
        seen = traced(tmp_path, ROOT / "examples" / "walkthrough.py", "--model", str(SMOKE), "--init", "random",
                      "--dataset", str(SMOKE / "reviews.jsonl"), "--train-size", "64", "--test-size", "32",
                      "--max-steps", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache"))
    calls = {tuple(call) for call in seen["calls"]}
    assert CHAPTER <= calls, CHAPTER - calls
    # The store (a corpus of any size) runs the chapter's tokenize and chunk on each piece: those calls above came
    # through it, since neither program tokenizes in memory only.
    assert ("corpus_store.py", "prepare_store") in calls
    assert not SPEED_SUBSTITUTES & set(seen["modules"])  # never imported: not one line of them ran
