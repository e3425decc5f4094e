"""scripts/gpu_check.sh --cpu: every stage of the GPU check runs on the CPU with the tiny smoke model and writes
the same report.json, so the script is tested where no GPU is."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine, run the real check instead")
def test_gpu_check_cpu_mode_runs_every_stage_and_reports(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ), check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "cpu"
    stages = report["stages"]
    assert list(stages) == ["env", "tests", "bench", "course"]
    assert stages["env"]["torch"] == torch.__version__

    # No GPU: the CUDA tests are collected and all skip, none fails.
    assert stages["tests"]["ok"] and stages["tests"]["tests"] >= 10
    assert stages["tests"]["skipped"] == stages["tests"]["tests"]

    bench = stages["bench"]
    assert bench["ok"] and bench["setup"]["device"] and bench["figures"]["train"]["ours"]["tokens_per_second"] > 0

    # The smoke course: 3 epochs of 10 steps, interrupted after the first epoch's eval, resumed to the end with
    # the same weights bit for bit as the uninterrupted run (on the CPU every kernel is deterministic).
    course = stages["course"]
    assert course["ok"] and course["steps"] == 30 and course["perplexity_after"] < course["perplexity_before"]
    assert course["interrupt"]["status"] == "interrupted" and 10 <= course["interrupt"]["steps"] < 30
    assert course["resume"]["status"] == "finished" and course["resume"]["steps"] == 30
    assert course["resume"]["max_weight_difference"] == 0.0
    assert course["resume"]["final_loss"] == course["resume"]["uninterrupted_final_loss"]
    for log in ("tests.log", "bench.log", "course.log", "resume.log", "resumed.log"):
        assert (out / log).is_file(), log
