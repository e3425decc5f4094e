"""The run folder belongs to the run, and resume takes its identity from the run's record (issue 28): a run writes
only into an empty folder or one holding a run, removes and replaces only what it wrote, moves a run aside in one
rename that any kill leaves recoverable, and resumes from its own record whatever moved or was killed.

Every run uses the tiny model and corpus of mlm/smoke through test_train's tiny_run (96 chunks, 6 steps an epoch).
"""

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from test_run_safety import cli, on_call, snapshot
from test_train import SMOKE, interrupt_after, tiny_run

import mlm.corpus_store
import mlm.run.folder
import mlm.train
from mlm.cli.evaluate import run_records
from mlm.cli.train import SMOKE as SMOKE_SETTINGS
from mlm.cli.train import replaces_smoke_run
from mlm.errors import Interrupted, MLMError
from mlm.evaluate import summarize
from mlm.run.folder import REPLACED, RESTORING, RunFolder
from mlm.run.processes import Processes
from mlm.run.record import read_record
from mlm.run.session import compare_data, compare_settings, resume_command
from mlm.train import train


def fail_at_step(monkeypatch, n: int) -> None:
    """The n-th optimizer step raises, as a crash of the step would (after it ran)."""
    def crash():
        raise RuntimeError("a crash in the step")

    on_call(monkeypatch, mlm.train, "train_step", n, crash)


def finished(tmp_path: Path, **overrides) -> Path:
    run = tmp_path / "run"
    train(tiny_run(run, epochs=1, **overrides))
    return run


# ---------------------------------------------------------------- what a run may write and remove


def test_a_folder_holding_files_of_no_run_is_refused_untouched(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("README.md", "vocab.txt", "api_key.txt"):
        (run / name).write_text("the user's")
    before = snapshot(run)
    for overwrite in (False, True):
        with pytest.raises(MLMError, match="is not empty and holds no run \\(README.md, api_key.txt, vocab.txt\\)"):
            train(tiny_run(run, overwrite=overwrite))
        assert snapshot(run) == before and not (run / ".lock").exists()


def test_a_stop_before_the_first_checkpoint_removes_only_what_the_run_wrote(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()

    def add_a_users_file():
        (run / "notes.txt").write_text("written while the run trained")

    on_call(monkeypatch, mlm.train, "train_step", 1, add_a_users_file)
    fail_at_step(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="a crash in the step"):
        train(tiny_run(run, save_every=None))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # the run's record and log gone, the note kept


def test_a_model_card_the_user_edited_is_kept(tmp_path, capsys):
    run = finished(tmp_path)
    card = run / "README.md"
    assert read_record(run).written["README.md"]  # the card's sha256, as written
    card.write_text(card.read_text() + "\nMy notes on this model.\n")
    edited = card.read_text()
    train(tiny_run(run, epochs=2, resume="latest", extend=True))
    assert card.read_text() == edited and "kept" in capsys.readouterr().out
    card.unlink()  # gone: the next card is written again
    train(tiny_run(run, epochs=3, resume="latest", extend=True))
    assert "My notes" not in card.read_text() and "| trained for | 3 epochs |" in card.read_text()


@pytest.mark.parametrize("edited_card", [False, True])
def test_a_resume_before_the_final_model_removes_it_and_its_card(tmp_path, monkeypatch, capsys, edited_card):
    """A resume from a checkpoint before the step of the final model redoes that course: the final model and the card
    the run wrote go like the later checkpoints (a card the user edited stays), so nothing scores or pushes the
    abandoned weights. An --extend from where the run finished keeps them: nothing finished is lost there."""
    run = finished(tmp_path, keep_checkpoints=10)  # 6 steps: checkpoints 4 and 6, the final model of step 6
    final = ["config.json", "model.safetensors", "tokenizer.json"]
    if edited_card:
        (run / "README.md").write_text("My own card.\n")
    interrupt_after(monkeypatch, 1)
    assert train(tiny_run(run, epochs=2, resume="latest", extend=True, keep_checkpoints=10)).status == "interrupted"
    assert all((run / name).exists() for name in [*final, "README.md"])
    interrupt_after(monkeypatch, 1)
    capsys.readouterr()
    stopped = train(tiny_run(run, epochs=2, resume=str(run / "checkpoints" / "step-000004"), keep_checkpoints=10))
    assert stopped.status == "interrupted" and stopped.steps == 5
    assert not any((run / name).exists() for name in final) and (run / "README.md").exists() == edited_card
    assert "note: removed the final model" in capsys.readouterr().out
    with pytest.raises(MLMError, match="holds a run that has no final model yet"):  # mlm-evaluate --model run
        run_records([str(run)])
    # The removed model's step stayed in the record, and `resume latest` from step 5 was refused as going back.
    assert train(tiny_run(run, epochs=2, resume="latest", keep_checkpoints=10)).status == "finished"


def test_the_record_lists_only_the_files_the_run_wrote(tmp_path, monkeypatch):
    # The record listed every tokenizer file a Hub repo may hold as the final model's, special_tokens_map.json too,
    # which the run never writes: a resume from an earlier checkpoint then deleted the user's copy of it.
    run = finished(tmp_path, keep_checkpoints=10)
    assert all((run / name).exists() for name in read_record(run).written)
    (run / "special_tokens_map.json").write_text('{"mask_token": "[MASK]"}\n')
    interrupt_after(monkeypatch, 1)
    train(tiny_run(run, epochs=1, resume=str(run / "checkpoints" / "step-000004"), keep_checkpoints=10))
    assert not (run / "model.safetensors").exists() and (run / "special_tokens_map.json").exists()


def test_resume_latest_never_drops_a_finished_runs_model_when_its_last_checkpoint_is_gone(tmp_path, capsys):
    # With the checkpoint of the final step deleted (or damaged), `resume latest` took the one before, removed the
    # final model and trained again: a finished run resumed without `extend` must be left as it is.
    run = finished(tmp_path, keep_checkpoints=10)  # checkpoints 4 and 6, the final model of step 6
    shutil.rmtree(run / "checkpoints" / "step-000006")
    before = snapshot(run)
    assert train(tiny_run(run, epochs=1, resume="latest")).status == "finished"
    assert snapshot(run) == before and "nothing to do (to train it for longer, resume it with --extend and a larger " \
        "--epochs)" in capsys.readouterr().out  # flags, not the library's `extend` and `epochs`
    with pytest.raises(MLMError, match="step-000004, comes before the final model of step 6"):
        train(tiny_run(run, epochs=3, resume="latest", extend=True))
    assert snapshot(run) == before
    # `extend` with the run's own length: there is nothing to extend (it set the run up and wrote the model again).
    assert train(tiny_run(run, epochs=1, resume="latest", extend=True)).status == "finished"
    assert snapshot(run) == before and "nothing to do" in capsys.readouterr().out
    # Other data given to a finished run was ignored without a word (missing data too).
    assert train(tiny_run(run, epochs=1, resume="latest", dataset=str(tmp_path / "gone.csv"))).status == "finished"
    assert (f"note: --dataset {tmp_path / 'gone.csv'} is not read: the run is finished (to train its model on other "
            f"data, start a new run from it: --model {run}).") in capsys.readouterr().out


def test_a_resume_from_a_copy_of_an_older_checkpoint_drops_the_later_ones_too(tmp_path, monkeypatch):
    # Only a checkpoint inside the folder pruned the later ones: from a copy kept elsewhere, step 6 of the abandoned
    # course stayed, and a later `resume latest` would have continued it.
    run = finished(tmp_path, keep_checkpoints=10)  # checkpoints 4 and 6, the final model of step 6
    kept = shutil.copytree(run / "checkpoints" / "step-000004", tmp_path / "kept" / "step-000004")
    interrupt_after(monkeypatch, 1)
    assert train(tiny_run(run, epochs=1, resume=str(kept), keep_checkpoints=10)).steps == 5
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000005"]


def test_a_card_that_cannot_be_written_leaves_the_run_finished(tmp_path, capsys):
    # The card reads the folder's tokenizer files, a user's special_tokens_map.json too: a broken one failed the run
    # after its final model was saved, its record "failed" while its segment said "finished", and its old card stayed.
    run = finished(tmp_path)
    (run / "special_tokens_map.json").write_text("{broken")
    assert train(tiny_run(run, epochs=2, resume="latest", extend=True)).status == "finished"
    assert read_record(run).status == "finished" and "note: the model card was not written" in capsys.readouterr().out
    assert not (run / "README.md").exists()  # the first segment's card, with its figures, would pass as this one's


def test_extend_of_a_max_steps_run_needs_more_steps_and_a_changed_length_needs_extend(tmp_path, monkeypatch, capsys):
    # --max-steps sets the length: `extend` with more epochs changes nothing, and ran the final phase again.
    run = finished(tmp_path, max_steps=4)
    before = snapshot(run)
    assert train(tiny_run(run, epochs=3, max_steps=4, resume="latest", extend=True)).status == "finished"
    assert snapshot(run) == before and "nothing to do" in capsys.readouterr().out
    # A run whose settings give another length than it was set to (mlm capped --max-steps at the epochs' steps
    # once): resumed as it is, it trained to the new length on a stretched schedule, with no word.
    import mlm.optim

    real = mlm.optim.Schedule.of.__func__
    capped = classmethod(lambda cls, n, **kw: real(cls, n, **{**kw, "max_steps": min(kw["max_steps"], 6)}))
    with monkeypatch.context() as patch:
        patch.setattr(mlm.optim.Schedule, "of", capped)
        interrupt_after(patch, 3)
        assert train(tiny_run(tmp_path / "old", epochs=1, max_steps=8)).steps == 3
    with pytest.raises(MLMError, match="The run was set to 6 steps, and its settings now give 8: resume with `extend`"):
        train(tiny_run(tmp_path / "old", epochs=1, max_steps=8, resume="latest"))
    assert train(tiny_run(tmp_path / "old", epochs=1, max_steps=8, resume="latest", extend=True)).steps == 8


def test_a_final_model_saved_by_a_segment_stopped_while_finishing_goes_too(tmp_path, monkeypatch):
    # A signal after the final model was saved but before the segment ended "finished": the removal looked for
    # finished segments only, so a resume from an older checkpoint kept the abandoned course's model.
    import mlm.run.session

    def stopped(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(mlm.run.session, "share_final_weights", stopped)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_run(tmp_path / "run", keep_checkpoints=10))
    run = tmp_path / "run"
    assert (run / "model.safetensors").exists() and read_record(run).status == "interrupted"
    interrupt_after(monkeypatch, 1)
    assert train(tiny_run(run, resume=str(run / "checkpoints" / "step-000004"), keep_checkpoints=10)).steps == 5
    assert not (run / "model.safetensors").exists()


@pytest.mark.parametrize("users", ["private_reviews.jsonl", "README.md", "checkpoints/notes.txt",
                                   "checkpoints/step-000004-backup/model.safetensors"])
def test_overwrite_refuses_a_folder_with_files_its_run_did_not_write(tmp_path, users):
    # The model card once edited is the user's, and so is what in checkpoints/ is no checkpoint: --overwrite deleted
    # both with the old run.
    run = finished(tmp_path)
    (run / users).parent.mkdir(exist_ok=True)
    with open(run / users, "a") as file:
        file.write("the user's")
    before = snapshot(run)
    with pytest.raises(MLMError, match=f"holds files its run did not write \\({users.split('/model')[0]}\\)"):
        train(tiny_run(run, overwrite=True))
    assert snapshot(run) == before


def test_overwrite_refuses_a_users_file_added_while_the_run_set_up(tmp_path, monkeypatch):
    # The folder was checked before the set-up (minutes of tokenizing on a real corpus), and moved aside after it:
    # a file added in between went aside with the old run, and was deleted at the new run's first checkpoint.
    run = finished(tmp_path)
    on_call(monkeypatch, mlm.train, "load_data", 1, lambda: (run / "notes.txt").write_text("the user's"))
    with pytest.raises(MLMError, match="holds files its run did not write \\(notes.txt\\)"):
        train(tiny_run(run, overwrite=True))
    assert (run / "notes.txt").read_text() == "the user's" and read_record(run).finished


def test_user_files_that_look_temporary_are_the_users(tmp_path):
    # Any ".*.tmp" at the folder's top counted as a temporary file of mlm's writes: accepted as nothing, then deleted.
    run = tmp_path / "run"
    run.mkdir()
    (run / ".draft.tmp").write_text("the user's")
    with pytest.raises(MLMError, match="is not empty and holds no run \\(.draft.tmp\\)"):
        train(tiny_run(run))
    run = finished(tmp_path / "b")
    (run / ".draft.tmp").write_text("the user's")
    train(tiny_run(run, epochs=2, resume="latest", extend=True))
    assert (run / ".draft.tmp").read_text() == "the user's"


def test_overwrite_through_a_link_replaces_the_run_where_the_link_points(tmp_path):
    # The rename moved the link aside, not the folder: the new run landed in a new folder where the link was, and the
    # old run was never deleted (on another file system, a put-back failed with a traceback).
    run = finished(tmp_path)
    old_id = read_record(run).run_id
    (link := tmp_path / "link").symlink_to(run)
    train(tiny_run(link, overwrite=True, epochs=1))
    assert link.is_symlink() and read_record(run).run_id != old_id
    assert sorted(p.name for p in tmp_path.iterdir() if "replaced" in p.name) == []


# ---------------------------------------------------------------- --overwrite: one rename, recovered after any kill


def moved_aside(run: Path) -> Path:
    """The state a kill right after --overwrite's rename leaves: the old run beside the folder, none in its place."""
    record = read_record(run)
    (run / REPLACED).write_text(json.dumps({"run_id": record.run_id}))
    aside = run.parent / f".{run.name}.replaced-run"
    os.replace(run, aside)
    return aside


def test_the_put_back_keeps_a_file_the_user_added_during_the_failed_overwrite(tmp_path, monkeypatch, capsys):
    # The old run's files replaced whatever had their names: a card the user wrote while the new run trained was lost.
    run = finished(tmp_path)
    old_card = (run / "README.md").read_text()
    on_call(monkeypatch, mlm.train, "train_step", 1, lambda: (run / "README.md").write_text("my notes"))
    fail_at_step(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="a crash in the step"):
        train(tiny_run(run, overwrite=True, save_every=None))
    assert (run / "README.md").read_text() == old_card and read_record(run).finished
    assert (run / "README.md.added-during-overwrite").read_text() == "my notes"
    assert "note: kept your README.md as README.md.added-during-overwrite" in capsys.readouterr().out


def test_a_kill_right_after_the_rename_gives_the_old_run_back(tmp_path):
    run = finished(tmp_path)
    before = snapshot(run)
    aside = moved_aside(run)
    with pytest.raises(MLMError, match="already holds a run"):  # put back, and still protected
        train(tiny_run(run, epochs=1))
    assert snapshot(run) == before and not aside.exists()


def test_a_kill_during_the_put_back_is_finished_by_the_next_run(tmp_path):
    run = finished(tmp_path)
    before = snapshot(run)
    aside = moved_aside(run)
    run.mkdir()
    (run / "run.json").write_text('{"a new run": "that never saved a checkpoint"}')
    # The put-back had removed the new run's files and begun moving the old one's back when it was killed.
    (run / "run.json").unlink()
    os.replace(aside / REPLACED, aside / RESTORING)
    os.replace(aside / "checkpoints", run / "checkpoints")
    os.replace(aside / "run.json", run / "run.json")
    with pytest.raises(MLMError, match="already holds a run"):
        train(tiny_run(run, epochs=1))
    assert snapshot(run) == before and not aside.exists()


def test_a_run_that_takes_the_folder_during_the_move_aside_is_left_alone(tmp_path, monkeypatch):
    run = finished(tmp_path)
    before = snapshot(run)
    aside = run.parent / f".{run.name}.replaced-run"
    replace = os.replace

    def another_run_comes_in(src, dst):  # between the rename and the new folder: another run makes it its own
        replace(src, dst)
        if Path(dst) == aside:
            run.mkdir()
            (run / "run.json").write_text('{"another run": "its record"}')

    monkeypatch.setattr(mlm.run.folder.os, "replace", another_run_comes_in)
    with pytest.raises(MLMError, match="move it back once that run has ended"):
        train(tiny_run(run, epochs=1, overwrite=True))
    assert (run / "run.json").read_text() == '{"another run": "its record"}'  # the other run's files, untouched
    [kept] = tmp_path.glob(".run.replaced-run-*")  # the old run, whole, where no later run's recovery touches it
    assert snapshot(kept) == before and not aside.exists()


def test_a_kill_after_the_new_runs_first_checkpoint_keeps_the_new_run(tmp_path):
    run = finished(tmp_path)
    old = {str(p.relative_to(run)): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    new = train(tiny_run(run, epochs=1, overwrite=True, seed=7))
    # As if the kill came before the old run's deletion: it is still beside the folder.
    aside = run.parent / f".{run.name}.replaced-run"
    for name, data in old.items():
        (aside / name).parent.mkdir(parents=True, exist_ok=True)
        (aside / name).write_bytes(data)
    (aside / REPLACED).write_text(json.dumps({"run_id": json.loads(old["run.json"])["run_id"]}))
    summary = train(tiny_run(run, epochs=1, seed=7, resume="latest"))  # a finished run: nothing to do
    assert summary.status == "finished" and not aside.exists()
    assert read_record(run).settings["seed"] == 7 and summary.after == new.after


def test_smoke_replaces_only_an_earlier_smoke_run(tmp_path):
    folder = tmp_path / "smoke"
    assert not replaces_smoke_run(folder)  # nothing there
    train(tiny_run(folder, epochs=1, model=SMOKE_SETTINGS["model"], dataset=SMOKE_SETTINGS["dataset"]))
    assert replaces_smoke_run(folder)
    data = tmp_path / "reviews.jsonl"
    shutil.copy(SMOKE / "reviews.jsonl", data)
    other = tmp_path / "other"
    train(tiny_run(other, epochs=1, dataset=str(data)))
    with pytest.raises(MLMError, match="holds a run that --smoke did not make"):
        replaces_smoke_run(other)


# ---------------------------------------------------------------- resume: identity from the record


def test_a_checkpoint_of_another_run_copied_into_the_folder_is_refused(tmp_path, monkeypatch):
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    with monkeypatch.context() as patch:
        on_call(patch, mlm.train, "train_step", 3, lambda: os.kill(os.getpid(), 2))
        train(tiny_run(a))
    train(tiny_run(b, seed=7))
    shutil.copytree(b / "checkpoints" / "step-000012", a / "checkpoints" / "step-000012")
    before = snapshot(a)
    with pytest.raises(MLMError, match=f"is a checkpoint of run {read_record(b).run_id}, but .* holds run "
                                       f"{read_record(a).run_id}"):
        train(tiny_run(a, resume="latest"))
    assert snapshot(a) == before


def test_without_run_json_the_newest_checkpoints_record_resumes_the_run(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        on_call(patch, mlm.train, "train_step", 5, lambda: os.kill(os.getpid(), 2))
        train(tiny_run(run, lr=1e-3))
    (run / "run.json").unlink()
    status, err = cli(monkeypatch, capsys, "--resume", "latest", "--output-dir", str(run), "--no-progress")
    assert status == 0, err
    assert read_record(run).status == "finished" and read_record(run).settings["lr"] == 1e-3  # its settings


def test_a_killed_extend_resumes_with_the_length_it_asked_for(tmp_path, monkeypatch, capsys):
    run = finished(tmp_path)
    with monkeypatch.context() as patch:
        fail_at_step(patch, 1)
        with pytest.raises(RuntimeError):
            train(tiny_run(run, epochs=2, resume="latest", extend=True))
    assert read_record(run).settings["epochs"] == 2  # the extended length, recorded before its first step
    status, err = cli(monkeypatch, capsys, "--resume", "latest", "--output-dir", str(run), "--no-progress")
    assert status == 0, err
    record = read_record(run)
    assert record.progress["step"] == 12 and record.status == "finished"
    assert record.segments[1]["changed"]["epochs"] == [1, 2]  # the extend says what it changed


def test_a_moved_data_folder_resumes_and_the_record_keeps_the_new_place(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data" / "reviews.jsonl"
    data.parent.mkdir()
    shutil.copy(SMOKE / "reviews.jsonl", data)
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        on_call(patch, mlm.train, "train_step", 5, lambda: os.kill(os.getpid(), 2))
        train(tiny_run(run, dataset=str(data)))
    moved = tmp_path / "moved" / "reviews.jsonl"
    data.parent.rename(moved.parent)
    # Without its new place the resume says to give it (it said only "No such file or folder").
    status, err = cli(monkeypatch, capsys, "--resume", "latest", "--output-dir", str(run), "--no-progress")
    assert status != 0 and err == (f"error: The run's --dataset, {data}, is not there any more: if it moved, resume "
                                   "with --dataset set to where it is now (the run checks that it is the same).\n")
    summary = train(tiny_run(run, dataset=str(moved), resume="latest"))
    assert summary.status == "finished"
    assert read_record(run).segments[-1]["changed"]["dataset"] == [str(data), str(moved)]
    # Edited data is still refused, and before a single text is tokenized again.
    moved.write_text(moved.read_text().replace("movie", "film", 1))
    monkeypatch.setattr(mlm.corpus_store, "prepare_store", lambda *a, **k: pytest.fail("tokenized"))
    with pytest.raises(MLMError, match="reviews.jsonl changed since the run started"):
        train(tiny_run(run, dataset=str(moved), epochs=3, resume="latest", extend=True))


def stopped_run_on_two_files(tmp_path, monkeypatch, second: str, **settings) -> tuple[Path, Path, list[str]]:
    """A tiny run on data/train.jsonl and data/`second` (other halves of the smoke reviews), stopped at step 5:
    (the data folder, the run folder, the reviews' lines)."""
    data = tmp_path / "data"
    data.mkdir()
    lines = (SMOKE / "reviews.jsonl").read_text().splitlines(keepends=True)
    (data / "train.jsonl").write_text("".join(lines[:400]))
    (data / second).write_text("".join(lines[400:]))
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        on_call(patch, mlm.train, "train_step", 5, lambda: os.kill(os.getpid(), 2))
        train(tiny_run(run, **settings))
    return data, run, lines


def test_a_validation_file_moved_on_its_own_resumes(tmp_path, monkeypatch):
    # The files were named relative to the folder the dataset and the validation file shared: moved on its own, the
    # validation file got another name, and the resume said "The data file val.jsonl is missing".
    folder = tmp_path / "data"
    data, run, lines = stopped_run_on_two_files(tmp_path, monkeypatch, "val.jsonl", dataset=str(folder / "train.jsonl"),
                                                validation_file=str(folder / "val.jsonl"))
    (moved := tmp_path / "elsewhere").mkdir()
    (data / "val.jsonl").rename(moved / "val.jsonl")
    files = dict(dataset=str(data / "train.jsonl"), validation_file=str(moved / "val.jsonl"))
    assert train(tiny_run(run, **files, resume="latest")).status == "finished"
    # The files' roles still count: the same two files, exchanged, would train on the eval text.
    longer = dict(epochs=3, resume="latest", extend=True)
    with pytest.raises(MLMError, match="The data files are the run's, but in other roles or order"):
        train(tiny_run(run, dataset=files["validation_file"], validation_file=files["dataset"], **longer))
    (moved / "val.jsonl").write_text("".join(lines[399:]))  # other text under the same name is still refused
    with pytest.raises(MLMError, match="val.jsonl changed since the run started"):
        train(tiny_run(run, **files, **longer))


def test_split_files_that_exchanged_their_texts_are_refused(tmp_path, monkeypatch):
    # Compared as a set of sha256 digests, a train and a test split that swapped their texts passed: the run went on
    # training on the old test split and scoring on the old train split.
    data, run, _ = stopped_run_on_two_files(tmp_path, monkeypatch, "test.jsonl", dataset=str(tmp_path / "data"),
                                            eval_split="test")
    (data / "train.jsonl").rename(data / "was-train")
    (data / "test.jsonl").rename(data / "train.jsonl")
    (data / "was-train").rename(data / "test.jsonl")
    with pytest.raises(MLMError, match="The data files are the run's, but in other roles or order"):
        train(tiny_run(run, dataset=str(data), eval_split="test", resume="latest"))


def test_other_data_given_to_a_resume_is_named_as_not_the_runs():
    # It said "The data file reviews.jsonl is missing" while the file was there: the resume was given other data.
    stored = {"reviews.jsonl": "a1"}
    with pytest.raises(MLMError, match=r"^The data is not the run's: none of its files holds the bytes of one the run "
                                       r"started with \(reviews.jsonl\)\. Give the run's data: run.json names"):
        compare_data(stored, {"top.txt": "b2", "a/one.txt": "c3"})
    with pytest.raises(MLMError, match="^The data is not the run's"):
        compare_data(stored, {"other.jsonl": "b2"})
    with pytest.raises(MLMError, match="^The data file reviews.jsonl changed since the run started"):
        compare_data(stored, {"reviews.jsonl": "b2"})  # the same name, other bytes: edited
    with pytest.raises(MLMError, match="^The data file b.jsonl is missing"):
        compare_data({"a.jsonl": "a1", "b.jsonl": "b2"}, {"a.jsonl": "a1"})


def test_a_resume_that_would_draw_other_train_chunks_is_refused(tmp_path, monkeypatch):
    # A run started before train percentages were rounded down drew one chunk more: resumed, its epochs would have
    # shuffled other chunks, without a word unless the step count changed too.
    run = tmp_path / "run"
    interrupt_after(monkeypatch, 3)
    assert train(tiny_run(run)).status == "interrupted"
    record = json.loads((run / "run.json").read_text())
    record["derived"]["train_chunks"] += 1
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(MLMError, match="^The run drew 97 train chunks, and the same settings and data now draw 96: "):
        train(tiny_run(run, resume="latest"))


def test_a_resume_with_fewer_processes_says_how_to_keep_the_global_batch():
    stored = {"global_batch": 8, "batch_size": 4, "grad_accum": 1}
    with pytest.raises(MLMError, match="global batch .* 8 -> 4 \\(4 x 1 x 1\\); keep 8 with `batch_size` 8 or "
                                       "`grad_accum` 2"):
        compare_settings(stored, {"global_batch": 4, "batch_size": 4, "grad_accum": 1}, extend=False,
                         where=Path("run"), world_size=1)


def test_a_checkpoint_given_alone_resumes_in_its_own_runs_folder(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        on_call(patch, mlm.train, "train_step", 7, lambda: os.kill(os.getpid(), 2))
        train(tiny_run(run))
    monkeypatch.chdir(tmp_path)
    status, err = cli(monkeypatch, capsys, "--resume", "run/checkpoints/step-000006", "--no-progress")
    assert status == 0, err
    assert read_record(run).status == "finished" and not (tmp_path / "distilbert-base-uncased-finetuned-imdb").exists()
    # The log names the checkpoint by its absolute path, as the record does: a push shortens those (a relative one
    # went to the Hub as it was given).
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"resume"' in line]
    assert resumed[-1]["checkpoint"] == str(run / "checkpoints" / "step-000006")


def test_messages_fit_the_situation(tmp_path, monkeypatch):
    run = finished(tmp_path)
    shutil.rmtree(run / "checkpoints")
    with pytest.raises(MLMError, match="holds a finished run whose checkpoints were deleted"):
        train(tiny_run(run, resume="latest"))
    two_nodes = Processes(rank=0, world_size=4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "4821")
    assert resume_command(run, two_nodes).startswith(  # c10d's rendezvous: the static default makes every node 0
        "on each of the 2 nodes, torchrun --nnodes 2 --nproc_per_node 2 --rdzv_backend c10d --rdzv_endpoint "
        "HOST:PORT --rdzv_id 4821 -m mlm.cli.train --resume latest")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command(run, two_nodes).startswith("torchrun --nproc_per_node 4 -m mlm.cli.train --resume latest")
    # A node that does not share the output folder: the process there finds no folder, and must not be told to
    # start a new run (the main process resumes one).
    with pytest.raises(MLMError, match="with several nodes the output folder must be one every node shares"):
        RunFolder(tmp_path / "not-on-this-node", is_main=False).resume_point("latest", overwrite=False)


def test_a_resume_stopped_before_its_own_checkpoint_continues_the_checkpoint_it_was_given(tmp_path, monkeypatch):
    """Stopped during set-up, a resume of an older checkpoint says to resume that checkpoint again: `--resume latest`
    would take the newer one, which the user did not ask for. With the newest, `--resume latest` as ever."""
    run = finished(tmp_path, keep_checkpoints=10)
    for given, resumes in (("step-000004", str(run / "checkpoints" / "step-000004")), ("step-000006", "latest")):
        with monkeypatch.context() as patch:
            on_call(patch, mlm.train, "load_data", 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
            with pytest.raises(Interrupted) as stopped:  # step 6 ends the run: --extend, or there is nothing to do
                train(tiny_run(run, epochs=2, extend=True, resume=str(run / "checkpoints" / given)))
        assert f"Continue with: mlm-train --resume {resumes} --output-dir {run}" in stopped.value.hint
    older = run / "checkpoints" / "step-000004"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resume_command(run, Processes(rank=0, world_size=2), older) == (
        f"torchrun --nproc_per_node 2 -m mlm.cli.train --resume {older} --output-dir {run}")
    assert resume_command(run, Processes(rank=0, world_size=4), older).startswith(
        "on each of the 2 nodes, torchrun --nnodes 2 --nproc_per_node 2 --rdzv_backend c10d")
    assert resume_command(run, Processes(rank=0, world_size=4), older).endswith(f"--resume {older} --output-dir {run}")


# ---------------------------------------------------------------- an eval set with nothing to score


def test_an_eval_set_without_a_masked_token_is_refused(tmp_path):
    with pytest.raises(MLMError, match="no masked token to score"):
        train(tiny_run(tmp_path / "run", test_size=1, chunk_size=8, mlm_probability=1e-9))
    assert not (tmp_path / "run").exists()  # refused before the run wrote anything
    import torch

    with pytest.raises(MLMError, match="no masked token"):
        summarize(torch.tensor([[0.0, 0.0, 4.0, 0.0]], dtype=torch.float64))


def test_a_run_that_stopped_before_its_final_model_points_to_its_checkpoints(tmp_path, monkeypatch):
    from mlm.cli import evaluate as evaluate_cli

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        on_call(patch, mlm.train, "train_step", 7, lambda: os.kill(os.getpid(), 2))
        train(tiny_run(run))
    with pytest.raises(MLMError, match="has no final model yet: give its checkpoint .*step-000007, or finish"):
        evaluate_cli.main(["--model", str(run), "--no-progress"])
