"""DistributedDataParallel: two CPU processes (gloo) train like one process with the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlm.run.processes import lost_a_process

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"


def args_of(tmp_path: Path, model: Path, name: str, *extra: str) -> list[str]:
    return ["--model", str(model), "--init", "random", "--dataset", str(SMOKE / "reviews.jsonl"),
            "--chunk-size", "32", "--train-size", "96", "--test-size", "32", "--lr", "2e-3", "--epochs", "2",
            "--save-every", "4", "--log-every", "1",
            "--no-progress", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(tmp_path / name), *extra]


def run(launcher: list[str], tmp_path: Path, model: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, str(ROOT / "scripts" / "train.py"), *args_of(tmp_path, model, name, *extra)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path, no_dropout_smoke_model):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    # 36 eval chunks in batches of 8, the last one short: process 0 scores three, process 1 two.
    evals = ("--test-size", "36", "--eval-batch-size", "8")
    two = run(torchrun, tmp_path, no_dropout_smoke_model, "two", "--batch-size", "8", *evals)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([sys.executable], tmp_path, no_dropout_smoke_model, "one", "--batch-size", "16", *evals)
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
    # mlm-evaluate on the 2-process run's folder, in one process, reproduces every recorded figure to the last bit:
    # the processes' per-batch figures are summed in batch order, as one process sums them.
    scored = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--model", str(tmp_path / "two"),
                             "--json", "--no-progress", "--device", "cpu"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    figures = json.loads(scored.stdout)["models"][0]
    recorded = json.loads((tmp_path / "two" / "run.json").read_text())["results"]["after"]
    assert {key: figures[key] for key in recorded if key in figures} == {
        key: value for key, value in recorded.items() if key in figures}
    assert {"perplexity", "reference_perplexity", "loss", "accuracy"} <= figures.keys()

    # Resume under DDP: continue from the step-8 checkpoint and finish at the same weights.
    resumed = run(torchrun, tmp_path, no_dropout_smoke_model, "two", "--batch-size", "8", *evals, "--resume",
                  str(tmp_path / "two" / "checkpoints" / "step-000008"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(tmp_path / "two" / "model.safetensors")
    assert all(torch.equal(again[k], distributed[k]) for k in distributed)


@pytest.mark.slow
def test_a_last_batch_that_leaves_a_process_without_rows_trains_like_one_process(tmp_path, no_dropout_smoke_model):
    """100 chunks in global batches of 16: the last step has 4 rows, all of them process 0's. Process 1 then
    takes a zero-weight step (so DDP's all-reduce still runs) instead of crashing at the end of every epoch."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    sizes = ("--train-size", "100", "--test-size", "16", "--epochs", "3", "--save-every", "100")
    two = run(torchrun, tmp_path, no_dropout_smoke_model, "two", "--batch-size", "8", *sizes)
    assert two.returncode == 0, two.stderr[-3000:]
    one = run([sys.executable], tmp_path, no_dropout_smoke_model, "one", "--batch-size", "16", *sizes)
    assert one.returncode == 0, one.stderr[-3000:]
    single = load_file(tmp_path / "one" / "model.safetensors")
    distributed = load_file(tmp_path / "two" / "model.safetensors")
    for name in single:  # the same gradients summed in another order: fp32 rounding only
        torch.testing.assert_close(distributed[name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == 21  # 3 epochs of 7 steps
    # Tokens count the rows of the global batch: the short steps' 4 rows, not 2 x process 0's share.
    assert json.loads((tmp_path / "two" / "run.json").read_text())["progress"]["train_tokens"] == 3 * 100 * 32


SIGNAL_RANK_1 = """
import os, signal
import mlm.train
from mlm.cli.train import run
real, calls = mlm.train.train_step, [0]
def train_step_then_signal(*args, **kwargs):
    result = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return result
mlm.train.train_step = train_step_then_signal
run()
"""


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_checkpoint(tmp_path, monkeypatch):
    """A cluster may signal one process only: it tells the others at the next step, every process stops after the
    same step's checkpoint, the record names the signal, and only process 0 prints."""
    driver = tmp_path / "signal_rank_1.py"
    driver.write_text(SIGNAL_RANK_1)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    stopped = subprocess.run([*torchrun, str(driver), *args_of(tmp_path, SMOKE, "run", "--batch-size", "8")],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert stopped.returncode != 0, stopped.stderr[-3000:]
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    step = record["progress"]["step"]
    assert record["segments"][-1]["end"] == "interrupted by SIGTERM" and step in (3, 4)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[-1] == f"step-{step:06d}"
    assert stopped.stdout.count("Continue with:") == 1 and "checkpoint None" not in stopped.stdout
    assert "SIGTERM received by another process of the run: saving a checkpoint" in stopped.stdout
    assert "error: interrupted" not in stopped.stderr  # process 1 says nothing; process 0 printed how to continue


@pytest.mark.slow
def test_a_process_killed_alone_leaves_the_other_saying_how_to_continue(tmp_path, monkeypatch):
    """kill -9 of process 1 only: process 0's next collective fails; it records the stop and prints one line with
    the command that continues, not a traceback and a "failed" run."""
    driver = tmp_path / "kill_at_step.py"
    driver.write_text(KILL_AT_STEP)
    monkeypatch.setenv("MLM_TEST_KILL_AT", "7")
    monkeypatch.setenv("MLM_TEST_KILL_RANKS", "1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    killed = subprocess.run([*torchrun, str(driver), *args_of(tmp_path, SMOKE, "run", "--batch-size", "8")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in killed.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith("error: Another process of the run ended, so this one stops too")
    assert lines[0].endswith(f"Continue with: torchrun --nproc_per_node 2 -m mlm.cli.train --resume latest "
                             f"--output-dir {tmp_path / 'run'}") and "[rank0]: Traceback" not in killed.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "interrupted" and record["segments"][-1]["end"] == "interrupted: another process ended"


@pytest.mark.slow
def test_a_process_whose_gloo_worker_still_holds_the_last_collective_ends_cleanly(tmp_path, monkeypatch):
    """A gloo worker thread releases a collective's tensors after the collective is done; on a loaded machine it may
    still do so once the interpreter tears down, which aborted a finished run ("terminate called without an active
    exception", exit -6). Here a callback on process 1's worker waits for the teardown, as a descheduled worker does:
    the processes end without one, and the run ends with exit 0."""
    driver = tmp_path / "held_collective.py"
    driver.write_text(HELD_COLLECTIVE)
    monkeypatch.setenv("MLM_TEST_ATTACHED", str(tmp_path / "attached"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    ended = subprocess.run([*torchrun, str(driver), *args_of(tmp_path, SMOKE, "run", "--batch-size", "8",
                                                             "--epochs", "1")],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert ended.returncode == 0, ended.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


HELD_COLLECTIVE = """
import os, threading, time, torch, torch.distributed as dist
from pathlib import Path
import mlm.run.session as session
from mlm.cli.train import run
tearing_down = threading.Event()
class SaysTheTeardownBegan:  # held by a global of __main__, so only the interpreter's teardown deletes it
    def __del__(self):
        tearing_down.set()
        time.sleep(1)
real_end = session.end_processes
attached, done = Path(os.environ["MLM_TEST_ATTACHED"]), Path(os.environ["MLM_TEST_ATTACHED"] + ".done")
def end_processes_while_a_worker_holds_a_collective(procs):
    if procs.rank == 1:
        work = dist.all_reduce(torch.ones(1), async_op=True)
        # Attached before process 0 joins the collective, so that the callback runs on the worker when it completes
        # (on a future already complete, it would run here), and the worker holds the work meanwhile.
        work.get_future().then(lambda future: tearing_down.wait())
        attached.touch()
        while not done.exists():  # work.wait() would wait for the callback too
            time.sleep(0.01)
    else:
        while not attached.exists():
            time.sleep(0.01)
        dist.all_reduce(torch.ones(1))
        done.touch()
    real_end(procs)
session.end_processes = end_processes_while_a_worker_holds_a_collective
marker = SaysTheTeardownBegan()
run()
"""


KILL_AT_STEP = """
import os, signal
import mlm.train
from mlm.cli.train import run
real, calls = mlm.train.train_step, [0]
def train_step_then_kill(*args, **kwargs):
    result = real(*args, **kwargs)
    calls[0] += 1
    if calls[0] == int(os.environ["MLM_TEST_KILL_AT"]) and os.environ["RANK"] in os.environ["MLM_TEST_KILL_RANKS"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
mlm.train.train_step = train_step_then_kill
run()
"""


@pytest.mark.slow
def test_two_processes_killed_after_a_checkpoint_resume_bit_identically_with_dropout(tmp_path, monkeypatch):
    """Dropout on (the smoke model's 0.1): each process draws its own masks, so the checkpoint holds every
    process's RNG state, and a 2-process run killed after a checkpoint ends, once resumed, with exactly the
    weights of an uninterrupted 2-process run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    straight = run(torchrun, tmp_path, SMOKE, "straight", "--batch-size", "8")
    assert straight.returncode == 0, straight.stderr[-3000:]

    driver = tmp_path / "kill_at_step.py"
    driver.write_text(KILL_AT_STEP)
    monkeypatch.setenv("MLM_TEST_KILL_AT", "7")  # step 7: after the checkpoint of step 6, before the next one
    monkeypatch.setenv("MLM_TEST_KILL_RANKS", "0,1")
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    killed = subprocess.run([*torchrun, str(driver), *args_of(tmp_path, SMOKE, "killed", "--batch-size", "8")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert killed.returncode != 0 and not (tmp_path / "killed" / "model.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())[-1] == "step-000006"
    monkeypatch.delenv("MLM_TEST_KILL_AT")

    resumed = subprocess.run([*torchrun, str(ROOT / "scripts" / "train.py"), "--resume", "latest", "--output-dir",
                              str(tmp_path / "killed")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    uninterrupted = load_file(tmp_path / "straight" / "model.safetensors")
    again = load_file(tmp_path / "killed" / "model.safetensors")
    assert max(float((again[k] - uninterrupted[k]).abs().max()) for k in uninterrupted) == 0.0
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["world_size"] == 2


@pytest.mark.parametrize("message, lost", [
    ("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:64725: Connection reset by peer. This is typically "
     "caused by a remote worker hanging", True),
    ("[../gloo/transport/tcp/pair.cc:598] Connection closed by peer [127.0.0.1]:50962", True),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error", True),
    # Every process may still be there: a hang, or a collective they disagree on, is no lost process.
    ("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete", False),
    ("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage (run with NCCL_DEBUG=WARN for details)", False),
])
def test_only_a_lost_connection_counts_as_another_process_ended(message, lost):
    assert lost_a_process(RuntimeError(message)) == lost and not lost_a_process(ValueError(message))
