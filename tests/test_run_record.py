"""The run record (run.json): one record per run that resume, evaluate and the model card read, and the failures
it was built against (issue "A run is one record"): another run's checkpoint, a finished run resumed, data edited
between segments, a full disk in safetensors, signals before and after the loop, flags that need no retyping.

Every run uses the tiny model and corpus of mlm/smoke through test_train's tiny_run (96 chunks, 6 steps an epoch,
dropout 0.1).
"""

import json
import os
import shutil
import signal

import pytest
from safetensors import SafetensorError
from test_run_safety import cli, on_call, same_weights, snapshot
from test_train import SMOKE, final_weights, interrupt_after, tiny_run

import mlm.run.checkpoints
import mlm.run.folder
import mlm.run.session
import mlm.train
from mlm.errors import Interrupted, MLMError, run_cli
from mlm.files.pretrained import load_pretrained
from mlm.fill_mask import fill_mask
from mlm.run.checkpoints import verify_checkpoint
from mlm.run.record import read_record
from mlm.tokenizer import load_tokenizer
from mlm.train import train


def record_of(run) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted tiny run: (its folder, its final weights)."""
    folder = tmp_path_factory.mktemp("straight") / "run"
    train(tiny_run(folder))
    return folder, final_weights(folder)


def test_the_record_holds_the_whole_run(straight):
    run, _ = straight
    record = read_record(run)
    assert record.status == "finished" and len(record.run_id) == 32
    assert record.settings["seed"] == 42 and record.settings["global_batch"] == 16 and record.world_size == 1
    assert record.derived["total_steps"] == 12 and record.progress["step"] == 12
    assert list(record.data["files"]) == ["reviews.jsonl"] and len(record.data["tokenizer_sha256"]) == 64
    assert record.results["before"]["perplexity"] > record.results["after"]["perplexity"]
    assert [e["label"] for e in record.results["evals"]] == ["before", "epoch 1", "epoch 2"]
    assert [p["prompt"] for p in record.results["fill_mask"]["after"]] == ["a great [MASK] ."]
    [segment] = record.segments
    assert segment["end"] == "finished" and (segment["from_step"], segment["to_step"]) == (0, 12)
    # Each checkpoint holds the record as of its step, with the same run id.
    copy = read_record(run / "checkpoints" / "step-000008")
    assert copy.run_id == record.run_id and copy.status == "running" and copy.progress["step"] == 8
    assert not (run / "args.json").exists() and not (run / "summary.json").exists()  # run.json replaces them


def test_the_recorded_fill_mask_scores_are_the_models_to_six_places(straight):
    # Kept to 4 places and printed to 3, a score was rounded twice: the run printed 0.005 where mlm-evaluate, from
    # the model's 0.005508, printed 0.006.
    run, _ = straight
    [recorded] = read_record(run).results["fill_mask"]["after"]
    [per_mask] = fill_mask(load_pretrained(run), load_tokenizer(run), [recorded["prompt"]])
    scores = [[score for _, score in top_k] for top_k in recorded["predictions"]]
    assert scores == [[round(p.score, 6) for p in top_k] for top_k in per_mask]


def test_the_last_checkpoint_shares_the_final_weights(straight):
    """A finished folder stores the final weights once: the last checkpoint's file is a hard link to them."""
    run, _ = straight
    final, saved = run / "model.safetensors", run / "checkpoints" / "step-000012" / "model.safetensors"
    assert os.path.samefile(final, saved) and final.stat().st_nlink == 2
    verify_checkpoint(saved.parent)  # the manifest still holds: same bytes


# ---------------------------------------------------------------- F1: another run's checkpoint


def test_a_checkpoint_of_another_run_is_refused_into_a_folder_with_a_run(tmp_path, straight):
    other, _ = straight
    run = tmp_path / "run"
    train(tiny_run(run, epochs=1, seed=3))
    before = snapshot(run)
    with pytest.raises(MLMError, match=r"is a checkpoint of run [0-9a-f]{32}, but .* holds run [0-9a-f]{32}; "
                                       r"nothing was changed"):
        train(tiny_run(run, resume=str(other / "checkpoints" / "step-000008")))
    assert snapshot(run) == before


def test_a_checkpoint_of_another_run_continues_that_run_in_an_empty_folder(tmp_path, straight, capsys):
    other, weights = straight
    run = tmp_path / "copy"
    summary = train(tiny_run(run, resume=str(other / "checkpoints" / "step-000008")))
    assert "note: continuing run" in capsys.readouterr().out
    assert summary.status == "finished" and same_weights(final_weights(run), weights)
    assert read_record(run).run_id == read_record(other).run_id
    assert read_record(run).results["before"] == read_record(other).results["before"]


# ---------------------------------------------------------------- F2: a finished run resumed


def test_resuming_a_finished_run_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_run(run, epochs=1))
    before = snapshot(run)
    summary = train(tiny_run(run, epochs=1, resume="latest"))
    assert "holds a finished run: nothing to do" in capsys.readouterr().out
    assert summary.status == "finished" and summary.after is not None and snapshot(run) == before
    with pytest.raises(MLMError, match="`lr` 0.002 -> 0.001"):  # a changing flag is still refused
        train(tiny_run(run, epochs=1, lr=1e-3, resume="latest"))
    # A plain run in the folder: the way on is said.
    with pytest.raises(MLMError, match="It is finished: resume it with `resume` latest and `extend`"):
        train(tiny_run(run, epochs=1))
    # After --extend, resuming again is again nothing to do, and keeps the results.
    train(tiny_run(run, epochs=2, resume="latest", extend=True))
    extended = snapshot(run)
    summary = train(tiny_run(run, epochs=2, resume="latest"))
    assert snapshot(run) == extended and summary.after.perplexity == record_of(run)["results"]["after"]["perplexity"]


def test_sigterm_in_the_final_phase_leaves_a_run_that_resumes_to_the_same_results(tmp_path, monkeypatch, straight):
    """SIGTERM while the final fill-mask runs: one line, exit 143, and the resume finishes the final phase."""
    reference, weights = straight
    run = tmp_path / "run"
    calls = {"n": 0}
    real = mlm.train.predict

    def predict_then_sigterm(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # the "after" predictions: the loop is over, its last checkpoint saved
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(mlm.train, "predict", predict_then_sigterm)
    with pytest.raises(Interrupted) as stop:
        train(tiny_run(run))
    assert stop.value.signal_name == "SIGTERM" and stop.value.exit_code == 143
    assert "Continue with: mlm-train --resume latest --output-dir" in stop.value.hint
    assert record_of(run)["status"] == "interrupted" and record_of(run)["results"]["after"] is None
    monkeypatch.setattr(mlm.train, "predict", real)

    summary = train(tiny_run(run, resume="latest"))
    record, expected = record_of(run), record_of(reference)
    assert summary.status == "finished" and same_weights(final_weights(run), weights)
    assert record["results"]["after"] == expected["results"]["after"]
    assert record["results"]["before"] == expected["results"]["before"]
    assert [s["end"] for s in record["segments"]] == ["interrupted by SIGTERM", "finished"]


def test_a_resume_from_an_epochs_end_says_so(tmp_path, monkeypatch, capsys):
    # It said "epoch 2, step 6/12" for the checkpoint at the end of epoch 1 ("epoch 3" at the end of a 2-epoch run).
    interrupt_after(monkeypatch, 6)
    assert train(tiny_run(tmp_path / "run")).status == "interrupted"
    monkeypatch.undo()
    capsys.readouterr()
    train(tiny_run(tmp_path / "run", resume="latest"))
    assert "checkpoints/step-000006 (end of epoch 1, step 6/12)." in capsys.readouterr().out


def test_a_stop_once_the_run_has_finished_leaves_it_finished(tmp_path, monkeypatch):
    # SIGTERM while the card is written, after the record said "finished": the status became "interrupted" while
    # the segment still said "finished".
    real = mlm.run.session.write_run_model_card

    def sigterm_then_write(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(mlm.run.session, "write_run_model_card", sigterm_then_write)
    with pytest.raises(Interrupted) as stop:
        train(tiny_run(tmp_path / "run"))
    assert stop.value.hint == f"The run had finished, its model saved in {tmp_path / 'run'}; only its model card was " \
                              "not written."
    record = record_of(tmp_path / "run")
    assert record["status"] == "finished" and [s["end"] for s in record["segments"]] == ["finished"]


# ---------------------------------------------------------------- F3: data edited between segments


def test_data_edited_in_place_between_segments_is_refused_naming_the_file(tmp_path, monkeypatch):
    data = tmp_path / "reviews.jsonl"
    shutil.copy(SMOKE / "reviews.jsonl", data)
    run = tmp_path / "run"
    interrupt_after(monkeypatch, 3)
    assert train(tiny_run(run, dataset=str(data))).status == "interrupted"
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[1:] + lines[:1]))  # the same size, other text
    with pytest.raises(MLMError, match="data file reviews.jsonl changed since the run started"):
        train(tiny_run(run, dataset=str(data), resume="latest"))


# ---------------------------------------------------------------- F5: a full disk inside safetensors


def test_safetensors_error_during_a_checkpoint_is_the_disk_line(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(mlm.run.checkpoints, "save_file", full)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train(tiny_run(run)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: Could not write the checkpoint of step 4") and "Free some space" in err


# ---------------------------------------------------------------- F9: signals before the loop


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signal_during_setup_is_one_line_and_leaves_no_trace(tmp_path, monkeypatch, capsys, signum, code):
    run = tmp_path / "run"
    on_call(monkeypatch, mlm.train, "load_data", 1, lambda: os.kill(os.getpid(), signum))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train(tiny_run(run)))
    err = capsys.readouterr().err
    assert exit_info.value.code == code and err.count("\n") == 1 and err.startswith("error: interrupted (")
    assert "Nothing was saved" in err and "data prepared so far is kept" in err  # the store resumes too
    assert not run.exists()  # no args, no record, no lock: the next plain run starts
    monkeypatch.undo()
    assert train(tiny_run(run, epochs=1)).status == "finished"


def test_a_signal_during_the_before_evaluation_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_run(run, epochs=1))
    before = snapshot(run)
    on_call(monkeypatch, mlm.train, "evaluate_on", 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Interrupted, match="SIGTERM") as stopped:
        train(tiny_run(run, epochs=1, overwrite=True, seed=5))
    assert snapshot(run) == before and not (run / ".lock").exists()
    # Its data was prepared: the hint says the run stopped before its first checkpoint, not mid-preparation.
    assert "stopped before its first checkpoint" in stopped.value.hint and "preparation" not in stopped.value.hint


def test_a_second_signal_while_the_run_undoes_its_writes_is_ignored(tmp_path, monkeypatch):
    """torchrun sends SIGTERM to the others once a process dies, and a scheduler repeats its own: one that came while
    a stopped --overwrite run put the replaced run back left it half moved aside, and the stop's hint unsaid."""
    run = tmp_path / "run"
    train(tiny_run(run, epochs=1))
    before = snapshot(run)
    on_call(monkeypatch, mlm.train, "evaluate_on", 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    on_call(monkeypatch, mlm.run.folder, "_remove", 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Interrupted, match="SIGTERM") as stopped:
        train(tiny_run(run, epochs=1, overwrite=True, seed=5))
    assert snapshot(run) == before and "stopped before its first checkpoint" in stopped.value.hint


# ---------------------------------------------------------------- resume with no flags


def test_resume_latest_needs_no_other_flag(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    flags = ["--model", str(SMOKE), "--init", "random", "--dataset", str(SMOKE / "reviews.jsonl"), "--chunk-size",
             "32", "--train-size", "96", "--test-size", "32", "--batch-size", "16", "--lr", "2e-3", "--seed", "5",
             "--epochs", "2", "--save-every", "4", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    code, _ = cli(monkeypatch, capsys, *flags, "--output-dir", str(tmp_path / "straight"))
    assert code == 0
    interrupt_after(monkeypatch, 5)
    printed = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    code, _ = cli(monkeypatch, capsys, *flags, "--output-dir", str(run))
    assert code == 130 and f"Continue with: mlm-train --resume latest --output-dir {run}" in printed
    monkeypatch.undo()
    # Exactly the printed command: the data, model, seed and sizes come from the record.
    code, err = cli(monkeypatch, capsys, "--resume", "latest", "--output-dir", str(run))
    assert code == 0, err
    assert same_weights(final_weights(run), final_weights(tmp_path / "straight"))
    # A flag that changes the run is still refused, listing it; a harmless one is taken.
    code, err = cli(monkeypatch, capsys, "--resume", "latest", "--output-dir", str(run), "--seed", "6")
    assert code == 2 and "--seed 5 -> 6" in err


def test_smoke_runs_resume_from_their_record(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    interrupt_after(monkeypatch, 3)
    code, _ = cli(monkeypatch, capsys, "--smoke", "--no-progress", "--epochs", "1")
    assert code == 130
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    code, err = cli(monkeypatch, capsys, "--resume", "latest", "--output-dir", "runs/smoke", "--no-progress")
    assert code == 0, err
    record = record_of(tmp_path / "runs" / "smoke")
    assert record["status"] == "finished" and record["settings"]["epochs"] == 1 and record["settings"]["lean"] == "off"


@pytest.mark.parametrize("edit, named", [
    (lambda r: r["settings"].update(lr="0.002"), "lr"),
    (lambda r: r["settings"].update(train_splits="train"), "train_splits"),
    (lambda r: r["settings"].update(dataset=None), "dataset"),
    (lambda r: r["settings"].update(prompts=[1, 2]), "prompts"),
    (lambda r: r["settings"].update(config_overrides=5), "config_overrides"),
    (lambda r: r["settings"].update(global_batch="8"), "global_batch"),
    (lambda r: r["data"].update(files=["reviews.jsonl"]), "another shape"),
])
def test_a_record_edited_to_the_wrong_types_is_refused_naming_the_field(tmp_path, edit, named):
    """A hand-edited run.json failed deep in resume or mlm-evaluate (TypeError, AttributeError) instead."""
    from dataclasses import asdict

    from mlm.run.record import RunRecord, write_record
    from mlm.settings import TrainConfig

    settings = {**asdict(TrainConfig(output_dir=str(tmp_path))), "global_batch": 64}
    write_record(tmp_path, RunRecord(settings=settings, data={"files": {"reviews.jsonl": "0" * 64}}))
    assert read_record(tmp_path).settings["lr"] == 2e-5  # as written, it reads
    record = record_of(tmp_path)
    edit(record)
    (tmp_path / "run.json").write_text(json.dumps(record))
    with pytest.raises(MLMError, match=rf"run.json\b.*\b{named}\b"):
        read_record(tmp_path)
