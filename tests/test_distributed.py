"""DistributedDataParallel: two CPU processes (gloo) train like one process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"


def run(launcher: list[str], tmp_path: Path, model: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    args = ["--model", str(model), "--init", "random", "--dataset", str(SMOKE / "reviews.jsonl"),
            "--chunk-size", "32", "--train-size", "96", "--test-size", "32", "--lr", "2e-3", "--epochs", "2",
            "--save-every", "4", "--log-every", "1",
            "--no-progress", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / name), *extra]
    return subprocess.run([*launcher, str(ROOT / "scripts" / "train.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, no_dropout_smoke_model):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = run(torchrun, tmp_path, no_dropout_smoke_model, "two", "--batch-size", "8")
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([sys.executable], tmp_path, no_dropout_smoke_model, "one", "--batch-size", "16")
    assert one.returncode == 0, one.stderr[-3000:]

    single = load_file(tmp_path / "one" / "model.safetensors")
    distributed = load_file(tmp_path / "two" / "model.safetensors")
    for name in single:
        # The same gradients summed in another order (all-reduce of two halves): fp32 rounding only.
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    # Only rank 0 writes: one line per step, checkpoints once.
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == list(range(1, 13))
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    # Eval is reduced over both processes' shards: the same token-weighted loss as one process.
    last_eval = {name: [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                        if r["kind"] == "eval"][-1] for name in ("one", "two")}
    assert last_eval["one"]["tokens"] == last_eval["two"]["tokens"]
    assert abs(last_eval["one"]["loss"] - last_eval["two"]["loss"]) < 1e-4

    # Resume under DDP: continue from the step-8 checkpoint and finish at the same weights.
    resumed = run(torchrun, tmp_path, no_dropout_smoke_model, "two", "--batch-size", "8", "--resume",
                  str(tmp_path / "two" / "checkpoints" / "step-000008"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(again[k], distributed[k]) for k in distributed)
