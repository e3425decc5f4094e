"""Nothing lost, nothing silently misread: the output folder's lock, --overwrite, resume's settings check,
checkpoint verification, crashes at any point, strict inputs and one-line errors.

Every run uses the tiny model and corpus of mlm/smoke through test_train's tiny_run (96 chunks, 6 steps an epoch).
"""

import errno
import hashlib
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file, save_file
from test_train import ROOT, SMOKE, final_weights, records, tiny_run

import mlm.run.checkpoints
import mlm.train
from mlm.cli import train as train_cli
from mlm.errors import MLMError, run_cli
from mlm.files.hub import resolve_repo
from mlm.files.pretrained import config_from_dict, read_config
from mlm.optim import schedule_factor
from mlm.run.checkpoints import MANIFEST_FILE, _write_manifest
from mlm.run.folder import RunFolder
from mlm.run.record import read_record
from mlm.run.session import compare_settings, settings_as_json
from mlm.tokenizer import load_tokenizer
from mlm.train import train

SCRIPT = ROOT / "scripts" / "train.py"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256): what 'nothing lost' compares."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def on_call(monkeypatch, module, name: str, n: int, action) -> None:
    """Run `action()` at the n-th call of module.name (after the real call returns)."""
    real, calls = getattr(module, name), {"n": 0}

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return result

    monkeypatch.setattr(module, name, wrapped)


def press_ctrl_c_twice():
    raise KeyboardInterrupt  # what StopRequest raises at the second Ctrl-C (and Python at any during setup)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """scripts/train.py in this process, as the shell runs it: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
        sys.exit(0)
    return exit_info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final weights of an uninterrupted tiny run: what every crashed-and-resumed run must end with."""
    folder = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_run(folder))
    return final_weights(folder)


# ---------------------------------------------------------------- --overwrite and validation before writing

def test_a_finished_run_survives_every_overwrite_typo(tmp_path):
    run = tmp_path / "run"
    train(tiny_run(run, epochs=1))
    before = snapshot(run)
    typos = [dict(dataset=str(tmp_path / "typo.jsonl")), dict(text_column="body"), dict(model=str(tmp_path / "typo")),
             dict(seed=-1), dict(seed=2**64), dict(data_seed=-1), dict(train_size=10_000_000), dict(top_k=0),
             dict(prompts=("no mask here",)), dict(warmup_steps=50), dict(device="foo"), dict(chunk_size=4096)]
    for typo in typos:
        with pytest.raises(MLMError):
            train(tiny_run(run, epochs=1, overwrite=True, **typo))
        assert snapshot(run) == before, typo
    # Ctrl-C during setup, and (pressed twice) during the new run before its first checkpoint: the old run stays.
    for target in ("load_data", "train_step"):
        with pytest.MonkeyPatch.context() as patch:
            on_call(patch, mlm.train, target, 2 if target == "train_step" else 1, press_ctrl_c_twice)
            with pytest.raises(KeyboardInterrupt):
                train(tiny_run(run, epochs=1, overwrite=True, seed=7))
        assert snapshot(run) == before, target
    # A real overwrite replaces it, and leaves nothing of the old run aside.
    summary = train(tiny_run(run, epochs=1, overwrite=True, seed=7))
    assert summary.status == "finished" and json.loads((run / "run.json").read_text())["settings"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run"] and not (run / ".lock").exists()


def test_an_overwrite_killed_before_its_first_checkpoint_gives_the_old_run_back(tmp_path):
    run = tmp_path / "run"
    train(tiny_run(run, epochs=1))
    before = snapshot(run)
    killed = subprocess.run([sys.executable, "-c", KILL_DRIVER, json.dumps(config_json(run, overwrite=True, seed=3)),
                             "train_step", "2"], cwd=tmp_path, env=child_env(), timeout=300)
    assert killed.returncode == -signal.SIGKILL and (tmp_path / ".run.replaced-run").is_dir()
    with pytest.raises(MLMError, match="already holds a run"):  # the old run is back, and still protected
        train(tiny_run(run, epochs=1))
    assert snapshot(run) == before


@pytest.mark.parametrize("through_a_link", [False, True])
def test_a_resume_after_a_killed_overwrite_takes_the_settings_of_the_run_put_back(tmp_path, monkeypatch, capsys,
                                                                                  through_a_link):
    # The killed run's record (seed 3) was read before the old run (seed 42) was back: "would change `seed`".
    run = tmp_path / "run"
    train(tiny_run(run, epochs=1))
    given = tmp_path / "link" if through_a_link else run  # the run moves aside beside the folder the link names
    if through_a_link:
        given.symlink_to(run)
    killed = subprocess.run([sys.executable, "-c", KILL_DRIVER, json.dumps(config_json(given, overwrite=True, seed=3)),
                             "train_step", "2"], cwd=tmp_path, env=child_env(), timeout=300)
    assert killed.returncode == -signal.SIGKILL and (tmp_path / ".run.replaced-run").is_dir()
    status, err = cli(monkeypatch, capsys, "--resume", "latest", "--output-dir", str(given), "--no-progress")
    assert status == 0, err
    assert read_record(run).settings["seed"] == 42 and not (tmp_path / ".run.replaced-run").exists()


def test_setup_failures_leave_no_folder_behind(tmp_path):
    with pytest.raises(MLMError, match="warmup"):
        train(tiny_run(tmp_path / "run", warmup_steps=12))  # 12 steps in all: lr would never reach `lr`
    with pytest.raises(MLMError, match=r"No \[MASK\]"):
        train(tiny_run(tmp_path / "run", prompts=("no mask",)))
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(MLMError, match="cannot be made: .*file is a file"):
        train(tiny_run(tmp_path / "file" / "run"))


# ---------------------------------------------------------------- the lock

def test_a_second_run_is_refused_at_once_naming_the_holder(tmp_path, monkeypatch, capsys):
    holder = RunFolder.lock(str(tmp_path / "run"), is_main=True)
    try:
        status, err = cli(monkeypatch, capsys, "--smoke", "--output-dir", str(tmp_path / "run"))
    finally:
        holder.release()
    assert status == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path / 'run'} is in use by another run (pid {os.getpid()} on ")
    assert not (tmp_path / "run").exists()  # released: the folder it created, empty, is gone too


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                        "started": "then"}))
    summary = train(tiny_run(tmp_path / "run", epochs=1, prompts=()))
    assert summary.status == "finished" and "took over the lock" in capsys.readouterr().out


@pytest.mark.slow
def test_two_runs_started_together_on_one_folder(tmp_path):
    flags = ["--smoke", "--no-progress", "--epochs", "1", "--output-dir", str(tmp_path / "run"),
             "--cache-dir", str(tmp_path / "cache")]
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), *flags, "--seed", str(seed)], cwd=tmp_path,
                             env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in (1, 2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    for run in runs:
        run.stdout.close()
        run.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    winner = [seed for seed, (code, _) in zip((1, 2), results) if code == 0][0]
    loser_err = [err for code, err in results if code == 2][0]
    assert loser_err.startswith("error: ") and loser_err.count("\n") == 1
    assert "is in use by another run (pid" in loser_err or "already holds a run" in loser_err
    # The folder holds the winner's run only: its settings, and checkpoints that say so.
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["seed"] == winner
    for checkpoint in (tmp_path / "run" / "checkpoints").iterdir():
        assert json.loads((checkpoint / "run.json").read_text())["settings"]["seed"] == winner


# ---------------------------------------------------------------- resume: settings, length, records

def interrupt(monkeypatch, steps: int) -> None:
    on_call(monkeypatch, mlm.train, "train_step", steps, lambda: os.kill(os.getpid(), signal.SIGINT))


def test_resume_refuses_every_change_to_the_run_and_allows_harmless_ones(tmp_path, monkeypatch, straight):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt(patch, 5)
        assert train(tiny_run(run)).status == "interrupted"
    changes = [dict(seed=7), dict(data_seed=7), dict(mlm_probability=0.3), dict(batch_size=8), dict(chunk_size=16),
               dict(lr=1e-3), dict(weight_decay=0.1), dict(warmup_steps=2), dict(masking="wwm"),
               dict(train_size=64), dict(test_size=16), dict(max_grad_norm=0.5), dict(epochs=3), dict(max_steps=10)]
    for change in changes:
        setting = "global batch" if "batch_size" in change else f"`{next(iter(change))}`"
        with pytest.raises(MLMError, match=f"`resume` would change the run.*{setting}"):
            train(tiny_run(run, resume="latest", **change))
    with pytest.raises(MLMError, match="(?s)`lr` 0.002 -> 0.001.*`seed` 42 -> 7"):  # every difference listed
        train(tiny_run(run, resume="latest", seed=7, lr=1e-3))
    # Same global batch in another split: the same run (the masks are drawn per global batch).
    split = tiny_run(run, resume="latest", batch_size=8, grad_accum=2)
    stored = json.loads((run / "checkpoints" / "step-000005" / "run.json").read_text())["settings"]
    changed = compare_settings(stored, {**settings_as_json(split), "global_batch": 16}, extend=False, where=run,
                               world_size=1)
    assert changed == {"batch_size": [16, 8], "grad_accum": [1, 2]}
    # Harmless settings change freely, and the run ends as if never interrupted.
    harmless = dict(log_every=3, num_workers=1, eval_batch_size=8, top_k=3, prompts=("the [MASK] .",), save_every=5,
                    keep_checkpoints=3, progress_bar=True)
    summary = train(tiny_run(run, resume="latest", **harmless))
    assert summary.status == "finished" and summary.steps == 12
    assert same_weights(final_weights(run), straight)
    resumes = records(run, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == 5 and resumes[0]["segment"] == 1
    assert resumes[0]["changed"]["log_every"] == [1, 3] and resumes[0]["changed"]["top_k"] == [5, 3]


def test_extend_recomputes_the_schedule_and_records_stay_complete(tmp_path):
    run = tmp_path / "run"
    first = train(tiny_run(run, epochs=1, warmup_steps=2))
    with pytest.raises(MLMError, match="`epochs` 1 -> 2.*add `extend`"):
        train(tiny_run(run, epochs=2, warmup_steps=2, resume="latest"))
    second = train(tiny_run(run, epochs=2, warmup_steps=2, resume="latest", extend=True))
    assert second.status == "finished" and second.steps == 12
    lrs = [r["lr"] for r in records(run, "train")]
    assert lrs[6:] == [2e-3 * schedule_factor(k, warmup_steps=2, total_steps=12) for k in range(6, 12)]
    assert [r["segment"] for r in records(run, "train")] == [0] * 6 + [1] * 6
    # The record covers the whole run: the first segment's `before`, both segments' time.
    record = json.loads((run / "run.json").read_text())
    assert record["results"]["before"] == json.loads(json.dumps(first.before.__dict__))
    assert record["progress"]["train_seconds"] > first.train_seconds
    assert [s["end"] for s in record["segments"]] == ["finished", "finished"] and record["status"] == "finished"
    assert json.loads((run / "run.json").read_text())["settings"]["epochs"] == 2


# ---------------------------------------------------------------- checkpoints: checksums and finite values

def test_damaged_checkpoints_are_refused_naming_the_newest_good_one(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt(patch, 7)
        train(tiny_run(run))
    newest, good = run / "checkpoints" / "step-000007", run / "checkpoints" / "step-000006"  # the epoch end
    weights = load_file(newest / "model.safetensors")
    name = next(iter(weights))

    # Garbled but still valid safetensors: only the checksum tells.
    garbled = {**weights, name: weights[name] + 1e-3}
    save_file(garbled, newest / "model.safetensors", metadata={"format": "pt"})
    message = f"(?s)damaged checkpoint.*step-000007.*model.safetensors does not match.*newest good.*{good}"
    with pytest.raises(MLMError, match=message):
        train(tiny_run(run, resume="latest"))
    status, err = cli(monkeypatch, capsys, "--model", str(SMOKE), "--init", "random", "--dataset",
                      str(SMOKE / "reviews.jsonl"), "--chunk-size", "32", "--train-size", "96", "--test-size", "32",
                      "--batch-size", "16", "--lr", "2e-3", "--epochs", "2", "--save-every", "4", "--log-every", "1",
                      "--output-dir", str(run), "--cache-dir", str(tmp_path / "cache"), "--resume")
    assert status == 2 and err.startswith("error: Not resuming from a damaged checkpoint") and err.count("\n") == 1

    # NaN weights with a matching manifest (as a hand-made copy could have them): refused too.
    save_file({**weights, name: weights[name] * float("nan")}, newest / "model.safetensors",
              metadata={"format": "pt"})
    (newest / MANIFEST_FILE).unlink()
    _write_manifest(newest)
    with pytest.raises(MLMError, match=f"(?s)non-finite weights.*newest good.*{good}"):
        train(tiny_run(run, resume="latest"))

    # A position past its epoch's end (resuming looped forever, never reaching a step), AdamW groups that do not fit
    # the model (a ValueError in torch) or whose betas are not the run's: refused as damaged, each one line.
    save_file(weights, newest / "model.safetensors", metadata={"format": "pt"})
    state = json.loads((newest / "trainer_state.json").read_text())
    for broken in ({**state, "progress": {**state["progress"], "step_in_epoch": 10**6}},
                   {**state, "param_groups": state["param_groups"][:1]},
                   {**state, "param_groups": [{**group, "betas": [0.9]} for group in state["param_groups"]]}):
        (newest / "trainer_state.json").write_text(json.dumps(broken))
        (newest / MANIFEST_FILE).unlink()
        _write_manifest(newest)
        with pytest.raises(MLMError, match="(?s)damaged checkpoint.*trainer_state.json.*newest good"):
            train(tiny_run(run, resume="latest"))

    # A trainer_state.json of the wrong shape: one line, no KeyError.
    (newest / "trainer_state.json").write_text("[1, 2]")
    (newest / MANIFEST_FILE).unlink()
    _write_manifest(newest)
    with pytest.raises(MLMError, match="(?s)layout of an mlm trainer state.*newest good"):
        train(tiny_run(run, resume="latest"))
    # Without its manifest nothing vouches for a checkpoint's files: refused, not resumed unverified.
    (newest / MANIFEST_FILE).unlink()
    with pytest.raises(MLMError, match="(?s)has no manifest.json.*newest good"):
        train(tiny_run(run, resume="latest"))

    # The good one resumes; the damaged later one is discarded, not passed off as the new course's.
    summary = train(tiny_run(run, resume=str(good)))
    assert summary.status == "finished" and summary.steps == 12
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000008", "step-000012"]


def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch):
    # Logs every 5 steps, saves every 4: the NaN of step 3 must be caught at the save of step 4.
    def poison():
        with torch.no_grad():
            next(iter(mlm_model[0].parameters())).fill_(float("nan"))

    mlm_model = []
    real_load = mlm.train.load_model

    def load_and_keep(*args, **kwargs):
        mlm_model.append(real_load(*args, **kwargs))
        return mlm_model[-1]

    monkeypatch.setattr(mlm.train, "load_model", load_and_keep)
    on_call(monkeypatch, mlm.train, "train_step", 3, poison)
    with pytest.raises(MLMError, match="became non-finite by step 4.*no checkpoint was written yet"):
        train(tiny_run(tmp_path / "run", log_every=5, save_every=4, prompts=()))
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing saved, and the unfinished run cleaned up


# ---------------------------------------------------------------- crashes: kill -9 at any point, disk full

KILL_DRIVER = """
import json, os, signal, sys
import mlm.train, mlm.run.checkpoints
from mlm.train import TrainConfig, train
config, target, n = TrainConfig(**json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
module = mlm.run.checkpoints if target == "save_file" else mlm.train
real, calls = getattr(module, target), [0]
def killing(*args, **kwargs):
    result = real(*args, **kwargs)  # for save_file: the checkpoint's optimizer file is written, the rest not yet
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(module, target, killing)
train(config)
"""


def config_json(run: Path, **overrides) -> dict:
    values = tiny_run(run, **overrides).__dict__
    return {**values, "prompts": list(values["prompts"])}


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("target, n", [
    ("train_step", 9),  # mid-epoch, one step after a checkpoint
    ("save_file", 2),  # inside the write of the second checkpoint (step 6): a half-written temporary folder
    ("evaluate_on", 1),  # before the first checkpoint: the folder restarts with --overwrite
])
def test_kill_9_then_resume_gives_the_same_weights(tmp_path, straight, target, n):
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_DRIVER, json.dumps(config_json(run)), target, str(n)],
                            cwd=tmp_path, env=child_env(), timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert (run / ".lock").is_file()  # left behind by the dead process
    if target == "save_file":
        assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    if target == "evaluate_on":
        with pytest.raises(MLMError, match="never saved a checkpoint.*`overwrite`"):
            train(tiny_run(run, resume=None))
        summary = train(tiny_run(run, overwrite=True))
    else:
        summary = train(tiny_run(run, resume="latest"))
    assert summary.status == "finished" and summary.steps == 12
    assert same_weights(final_weights(run), straight)
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]  # stale .tmp removed


def test_disk_full_during_a_checkpoint_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, straight):
    run = tmp_path / "run"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))

    real_save = mlm.run.checkpoints.save_file
    calls = {"n": 0}

    def save_or_fail(*args, **kwargs):
        calls["n"] += 1
        return disk_full(*args) if calls["n"] == 2 else real_save(*args, **kwargs)

    monkeypatch.setattr(mlm.run.checkpoints, "save_file", save_or_fail)
    with pytest.raises(MLMError, match=r"(?s)checkpoint of step 6.*No space left on device.*step-000004, is intact"):
        train(tiny_run(run))
    monkeypatch.undo()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004"]  # no half-written folder
    assert train(tiny_run(run, resume="latest")).steps == 12
    assert same_weights(final_weights(run), straight)


def test_os_errors_and_ctrl_c_are_one_line(capsys):
    def full():
        raise OSError(errno.ENOSPC, "No space left on device", "run/model.safetensors")

    def read_only():
        raise OSError(errno.EROFS, "Read-only file system", "run/metrics.jsonl")

    def ctrl_c():
        raise KeyboardInterrupt

    for main, status, text in [(full, 2, "error: No space left on device: run/model.safetensors."),
                               (read_only, 2, "error: Read-only file system: run/metrics.jsonl."),
                               (ctrl_c, 130, "error: interrupted (Ctrl-C).\n")]:  # no run's hint in others
        with pytest.raises(SystemExit) as exit_info:
            run_cli(main)
        err = capsys.readouterr().err
        assert exit_info.value.code == status and err.startswith(text) and err.count("\n") == 1


@pytest.mark.parametrize("flag, value, message", [
    ("--seed", "-1", "error: --seed must be an integer from 0 to 2**63 - 1, got -1."),
    ("--seed", str(2**64), "error: --seed must be an integer from 0 to 2**63 - 1"),
    ("--data-seed", "-5", "error: --data-seed must be an integer from 0 to 2**63 - 1"),
    ("--device", "foo", "error: --device 'foo' is not a device mlm runs on"),
    ("--top-k", "0", "error: --top-k must be an integer >= 1"),
    ("--extend", None, "error: --extend only applies with --resume."),
    ("--adam-epsilon", "inf", "error: --adam-epsilon must be > 0 and finite, got inf."),
    ("--warmup-steps", "inf", "error: --warmup-steps must be a whole number of steps or a fraction below 1, got inf."),
    ("--warmup-steps", "2.5", "error: --warmup-steps must be a whole number of steps or a fraction below 1, got 2.5."),
])
def test_bad_flags_are_one_line(tmp_path, monkeypatch, capsys, flag, value, message):
    args = [flag] + ([value] if value is not None else [])
    status, err = cli(monkeypatch, capsys, "--smoke", "--output-dir", str(tmp_path / "run"), *args)
    assert status == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_warmup_steps_takes_a_fraction_on_the_command_line():
    parse = train_cli.build_parser().parse_args
    assert parse(["--warmup-steps", "0.06"]).warmup_steps == 0.06  # the help's "a fraction of all steps if below 1"
    assert type(parse(["--warmup-steps", "50"]).warmup_steps) is int  # a count stays a count in run.json


# ---------------------------------------------------------------- strict inputs

def test_another_architectures_config_is_refused(tmp_path):
    with pytest.raises(MLMError, match="AlbertForMaskedLM \\(model_type 'albert'\\) is not an encoder mlm builds"):
        config_from_dict({"model_type": "albert", "architectures": ["AlbertForMaskedLM"], "hidden_size": 64})
    with pytest.raises(MLMError, match="hidden_size, num_hidden_layers belong to another architecture"):
        config_from_dict({"hidden_size": 64, "num_hidden_layers": 2})
    assert config_from_dict({"dim": 64, "n_heads": 2}).dim == 64  # DistilBERT keys, no model_type
    gpt2 = tmp_path / "config.json"
    gpt2.write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12}))
    with pytest.raises(MLMError, match="GPT2LMHeadModel \\(model_type 'gpt2'\\) is not an encoder mlm builds"):
        read_config(gpt2, overrides="n_layer=3")  # the architecture is refused before its overrides are read


def test_tokenizer_config_of_the_wrong_shape_is_one_line(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((SMOKE / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text("[]")
    with pytest.raises(MLMError, match="holds a JSON list, not an object"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text('{"mask_token": 5}')
    with pytest.raises(MLMError, match="mask_token is 5, not a token string"):
        load_tokenizer(folder)


def test_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        train(tiny_run(tmp_path / "run", epochs=1, prompts=()))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step-000006"
    for path in (run / "model.safetensors", run / "config.json", checkpoint / "model.safetensors",
                 checkpoint / "optimizer.safetensors", checkpoint / "run.json", run / "run.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert checkpoint.stat().st_mode & 0o777 == 0o755



# ---------------------------------------------------------------- Hub failures keep their cause

class _Answer(BaseHTTPRequestHandler):
    status, body, headers_to_send = 500, b'{"error": "boom"}', {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        for name, value in self.headers_to_send.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(self.body)

    do_HEAD = do_GET


@pytest.fixture()
def fake_endpoint(tmp_path, monkeypatch):
    """A server on 127.0.0.1 answering every request with _Answer's status and body; yields a setter."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)

    def answer(status: int, body: bytes) -> str:
        monkeypatch.setattr(_Answer, "status", status)
        monkeypatch.setattr(_Answer, "body", body)
        url = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(hub_constants, "ENDPOINT", url)
        return url

    yield answer
    server.shutdown()
    server.server_close()


def test_hub_failures_keep_their_cause_and_name_the_endpoint(fake_endpoint, monkeypatch):
    url = fake_endpoint(500, b'{"error": "boom"}')
    with pytest.raises(MLMError, match=f"The Hub at {url} failed \\(HTTP 500\\).*Try again later"):
        resolve_repo("someone/model")
    url = fake_endpoint(429, b'{"error": "rate limited"}')  # busy, not wrong
    with pytest.raises(MLMError, match=f"The Hub at {url} refused the request \\(HTTP 429\\).*\\. Try again later"):
        resolve_repo("someone/model")
    # A refusal is no outage: it said "Try again later" there too.
    url = fake_endpoint(400, b'{"error": "bad request"}')
    with pytest.raises(MLMError, match=f"The Hub at {url} refused the request \\(HTTP 400\\).*\\. Check the repo id"):
        resolve_repo("someone/model")
    url = fake_endpoint(200, b'{"hello": "world"}')
    with pytest.raises(MLMError, match=f"The server at {url} answered, but not as a Hugging Face Hub does"):
        resolve_repo("someone/model")
    # The Hub answers a stale token with 401 even for a public repo: it said "Try again later".
    url = fake_endpoint(401, b'{"error": "Invalid credentials in Authorization header"}')
    monkeypatch.setenv("HF_TOKEN", "hf_revoked")
    with pytest.raises(MLMError, match=f"The Hub at {url} rejected the token in HF_TOKEN \\(HTTP 401\\) .*fix "):
        resolve_repo("someone/model")
    # A gated repo that refuses a valid token: it said "set HF_TOKEN", which was set.
    monkeypatch.setattr(_Answer, "headers_to_send", {"X-Error-Code": "GatedRepo", "X-Error-Message": "you are not in "
                                                     "the authorized list"})
    fake_endpoint(403, b'{"error": "you are not in the authorized list"}')
    with pytest.raises(MLMError, match="is gated, and the token in use has no access to it yet \\(you are not in the "
                                       "authorized list\\): accept its terms"):
        resolve_repo("someone/model")
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(MLMError, match="Could not reach the Hub at http://127.0.0.1:9 .*Connection refused"):
        resolve_repo("someone/model")
    monkeypatch.setattr(hub_constants, "ENDPOINT", "huggingface.co")
    with pytest.raises(MLMError, match="HF_ENDPOINT='huggingface.co' is not a valid Hub address"):
        resolve_repo("someone/model")



def test_a_setting_left_unset_is_named_so_in_a_resumes_refusal(tmp_path):
    # It read "`max_steps` None -> 100": Python's word, not one the user typed.
    with pytest.raises(MLMError, match="`max_steps` unset -> 100. Resume without"):
        compare_settings({"max_steps": None}, {"max_steps": 100}, extend=False, where=tmp_path, world_size=1)


def test_sigterm_to_the_process_group_with_dataloader_workers_checkpoints(tmp_path):
    # torchrun, SLURM and `kill -TERM -PGID` signal the whole group: the workers died of it first, and the run failed
    # with "DataLoader worker (pid …) is killed by signal: Terminated", its steps since the last checkpoint lost.
    run = tmp_path / "run"
    env = {**os.environ, "MLM_CACHE": str(tmp_path / "cache")}
    process = subprocess.Popen(
        [sys.executable, "-m", "mlm.cli.train", "--smoke", "--num-workers", "2", "--log-every", "1", "--save-every",
         "1000", "--output-dir", str(run), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env, cwd=tmp_path, start_new_session=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if line.startswith("step 3/"):
            os.killpg(process.pid, signal.SIGTERM)
            break
    output += process.stdout.readlines()
    assert process.wait(timeout=120) == 143, "".join(output)
    assert json.loads((run / "run.json").read_text())["status"] == "interrupted" and "Traceback" not in "".join(output)
