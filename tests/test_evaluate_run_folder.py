"""mlm-evaluate --model RUN_DIR: a run folder brings its eval set, rebuilt from its run.json, and its prompts."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from mlm.cli import evaluate as evaluate_cli
from mlm.cli.args import run_command
from mlm.compare import build_eval_set
from mlm.evaluate import evaluate
from mlm.files.pretrained import load_pretrained, save_pretrained
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.run.record import RunRecord, read_record, write_record
from mlm.run.session import data_file_digests
from mlm.settings import TrainConfig
from mlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"
REVIEWS = str(SMOKE / "reviews.jsonl")


def run_settings(tmp_path: Path, **changes) -> dict:
    values = dict(model=str(SMOKE), init="random", dataset=REVIEWS, chunk_size=32, train_size=48, test_size=16,
                  data_seed=3, eval_batch_size=8, cache_dir=str(tmp_path / "cache"))
    config = TrainConfig(**{**values, **changes})
    return {**asdict(config), "global_batch": config.batch_size}


def hand_made_run(folder: Path, settings: dict, seed: int = 0) -> float:
    """A finished run's folder as train() leaves it: the model, and run.json whose "after" is that model's
    perplexity on the run's eval set (built as compare.build_eval_set rebuilds it). Returns that perplexity."""
    tokenizer = load_tokenizer(SMOKE)
    torch.manual_seed(seed)
    save_pretrained(DistilBertForMaskedLM(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1,
                                                           n_heads=2, hidden_dim=32, max_position_embeddings=64)),
                    folder, tokenizer=tokenizer)
    eval_set = build_eval_set(tokenizer, dataset=settings["dataset"], chunk_size=settings["chunk_size"],
                              test_size=settings["test_size"],
                              seed=settings["data_seed"], cache_dir=settings["cache_dir"],
                              mlm_probability=settings["mlm_probability"])
    after = evaluate(load_pretrained(folder), eval_set.input_ids, eval_set.labels,
                     batch_size=settings["eval_batch_size"])
    results = {"before": None, "evals": [], "after": asdict(after), "fill_mask": {"before": [], "after": []}}
    data = {"files": data_file_digests(TrainConfig(dataset=settings["dataset"]))}
    write_record(folder, RunRecord(settings=settings, data=data, status="finished", results=results))
    return after.perplexity


def evaluate_json(capsys, *argv: str) -> dict:
    evaluate_cli.main([*argv, "--json", "--device", "cpu", "--no-progress"])
    return json.loads(capsys.readouterr().out)


def one_line_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        run_command(lambda: evaluate_cli.main([*argv, "--device", "cpu", "--no-progress"]))
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture()
def offline(monkeypatch):
    # Without the run's data settings, the default dataset is the Hub's IMDb: the test must not reach for it.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_run_folder_is_scored_on_its_own_eval_set_exactly(tmp_path, capsys, offline):
    run = tmp_path / "a"
    recorded = hand_made_run(run, run_settings(tmp_path))
    report = evaluate_json(capsys, "--model", str(run))
    [scored] = report["models"]
    assert scored["perplexity"] == recorded  # the same targets, the same batches: bit for bit
    assert report["eval_set"]["from_run"] == str(run) and report["eval_set"]["seed"] == 3
    assert report["eval_set"]["chunks"] == 16 and report["eval_set"]["chunk_size"] == 32


def test_a_plain_model_beside_a_run_folder_gets_the_runs_eval_set(tmp_path, capsys, offline):
    run, plain = tmp_path / "a", tmp_path / "plain"
    recorded = hand_made_run(run, run_settings(tmp_path))
    hand_made_run(plain, run_settings(tmp_path), seed=1)
    (plain / "run.json").unlink()  # a model folder that is not a run
    report = evaluate_json(capsys, "--model", str(plain), "--model", str(run))
    assert [m["model"] for m in report["models"]] == [str(plain), str(run)]
    assert report["models"][1]["perplexity"] == recorded and report["eval_set"]["from_run"] == str(run)


def test_two_runs_with_different_eval_sets_are_refused_naming_every_setting_at_once(tmp_path, capsys, offline):
    hand_made_run(tmp_path / "a", run_settings(tmp_path))
    hand_made_run(tmp_path / "b", run_settings(tmp_path, data_seed=4, test_size=8, chunk_size=16))
    err = one_line_error(capsys, "--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"))
    for setting, a, b in (("--chunk-size", 32, 16), ("--test-size", 16, 8), ("--data-seed", 3, 4)):
        assert f"{setting} {a} in {tmp_path / 'a'} vs {b} in {tmp_path / 'b'}" in err


def test_runs_that_differ_only_in_train_size_share_their_eval_set(tmp_path, capsys, offline):
    # The eval chunks are drawn first (the course's train_test_split), so the train draw's size moves none of them.
    a = hand_made_run(tmp_path / "a", run_settings(tmp_path))
    b = hand_made_run(tmp_path / "b", run_settings(tmp_path, train_size=32), seed=1)
    report = evaluate_json(capsys, "--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"))
    assert [m["perplexity"] for m in report["models"]] == [a, b]  # each run's own recorded figure, bit for bit


def test_other_data_is_scored_without_a_training_draw(tmp_path, capsys, offline):
    # Scored on a small corpus, a run's `train_size` (48 here), or the default 10,000 without a run, was refused:
    # "Cannot draw 48 train + 8 test chunks from 51 chunks". The eval chunks are drawn first: it moves none of them.
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"review {i} " + "a fine film " * 15}) + "\n" for i in range(20)))
    run = tmp_path / "a"
    hand_made_run(run, run_settings(tmp_path))
    plain = shutil.copytree(run, tmp_path / "plain", ignore=shutil.ignore_patterns("run.json"))  # a model, no run
    for models in (["--model", str(run)], ["--model", str(plain)]):
        for test_size in ("8", "51"):  # all 51 chunks too: "`train_size` all leaves no chunk to train on"
            report = evaluate_json(capsys, *models, "--dataset", str(small), "--test-size", test_size,
                                   "--chunk-size", "32")
            assert report["eval_set"]["chunks"] == int(test_size) and "from_run" not in report["eval_set"]
    err = one_line_error(capsys, "--model", str(plain), "--dataset", str(small), "--test-size", "52", "--chunk-size",
                         "32")
    assert err == "error: Cannot draw 52 eval chunks from 51: give --test-size 51 or less, or use more text or a " \
                  "smaller --chunk-size.\n"


def test_a_run_whose_data_changed_since_is_refused(tmp_path, capsys, offline):
    """Its eval set would be other chunks than those its recorded perplexity was measured on."""
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(Path(REVIEWS).read_bytes())
    run = tmp_path / "a"
    hand_made_run(run, run_settings(tmp_path, dataset=str(data)))
    assert evaluate_json(capsys, "--model", str(run))["eval_set"]["from_run"] == str(run)
    data.write_text(data.read_text().replace("movie", "film", 1))
    err = one_line_error(capsys, "--model", str(run))
    assert "eval set of the run" in err and "reviews.jsonl changed since the run started" in err


def test_a_runs_moved_data_given_by_its_new_place_is_still_the_runs_eval_set(tmp_path, capsys, offline):
    # Given its new place, the moved data was taken for other data: scored without the run's label or any check.
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(Path(REVIEWS).read_bytes())
    run = tmp_path / "a"
    hand_made_run(run, run_settings(tmp_path, dataset=str(data)))
    (tmp_path / "moved").mkdir()
    moved = data.rename(tmp_path / "moved" / "reviews.jsonl")
    assert evaluate_json(capsys, "--model", str(run), "--dataset", str(moved))["eval_set"]["from_run"] == str(run)
    moved.write_text(moved.read_text().replace("movie", "film", 1))  # other data at the new place: another eval set
    assert "from_run" not in evaluate_json(capsys, "--model", str(run), "--dataset", str(moved))["eval_set"]


def test_an_eval_set_larger_than_the_runs_held_out_chunks_notes_the_chunks_it_trained_on(tmp_path, capsys, offline):
    # The test chunks are drawn first and the train chunks next: 40 test chunks of the run's draw are its 16 held out
    # and the first 24 it trained on, and were scored without a word.
    run = tmp_path / "a"
    hand_made_run(run, run_settings(tmp_path))
    record = read_record(run)
    record.derived = {"eval_chunks": 16, "train_chunks": 48}
    write_record(run, record)
    evaluate_cli.main(["--model", str(run), "--test-size", "16", "--json", "--device", "cpu", "--no-progress"])
    assert "note:" not in capsys.readouterr().err
    evaluate_cli.main(["--model", str(run), "--test-size", "40", "--json", "--device", "cpu", "--no-progress"])
    assert capsys.readouterr().err == (f"note: 24 of the 40 eval chunks are chunks the run in {run} trained on: its "
                                       "figures flatter it. Keep --test-size at most 16, the chunks it held out, to "
                                       "score it on unseen text.\n")
    evaluate_cli.main(["--model", str(run), "--test-size", "40", "--data-seed", "7", "--json", "--device", "cpu",
                       "--no-progress"])
    assert "note:" not in capsys.readouterr().err  # another draw: not the run's chunks
    # The run's data at a new place is the run's draw; other data under the run's path is not.
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(Path(REVIEWS).read_bytes())
    record.settings["dataset"] = str(data)
    record.data = {"files": data_file_digests(TrainConfig(dataset=str(data)))}
    write_record(run, record)
    (tmp_path / "moved").mkdir()
    moved = data.rename(tmp_path / "moved" / "reviews.jsonl")
    evaluate_cli.main(["--model", str(run), "--dataset", str(moved), "--test-size", "40", "--json", "--device", "cpu",
                       "--no-progress"])
    assert "note: 24 of the 40 eval chunks" in capsys.readouterr().err
    moved.rename(data)
    data.write_text(data.read_text().replace("movie", "film", 1))
    evaluate_cli.main(["--model", str(run), "--test-size", "40", "--json", "--device", "cpu", "--no-progress"])
    assert "note:" not in capsys.readouterr().err


def test_data_flags_given_override_the_runs(tmp_path, capsys, offline):
    hand_made_run(tmp_path / "a", run_settings(tmp_path))
    hand_made_run(tmp_path / "b", run_settings(tmp_path, data_seed=4))
    # Given on the command line, even with the default's value, a flag decides for every model.
    report = evaluate_json(capsys, "--model", str(tmp_path / "a"), "--model", str(tmp_path / "b"), "--data-seed", "42")
    assert report["eval_set"]["seed"] == 42 and report["eval_set"]["chunks"] == 16
    report = evaluate_json(capsys, "--model", str(tmp_path / "a"), "--test-size", "8")
    assert report["eval_set"]["chunks"] == 8 and report["eval_set"]["seed"] == 3
    # A run's eval set is token-masked: whole-word masking of the same chunks is another eval set, not the run's.
    report = evaluate_json(capsys, "--model", str(tmp_path / "a"), "--eval-masking", "wwm")
    assert report["eval_set"]["masking"] == "wwm" and "from_run" not in report["eval_set"]


def test_the_readme_example_with_run_folders_works_as_written(tmp_path, capsys, monkeypatch, offline):
    monkeypatch.chdir(tmp_path)
    settings = run_settings(tmp_path)
    recorded = [hand_made_run(tmp_path / "runs" / name, settings, seed=i) for i, name in enumerate("ab")]
    evaluate_cli.main(["--model", "runs/a", "--model", "runs/b", "--device", "cpu", "--no-progress"])
    table = capsys.readouterr().out
    assert "(the eval set of the run in runs/a)" in table
    [row] = [line.split() for line in table.splitlines() if line.split()[:1] == ["perplexity"] and "(" not in line]
    assert row == ["perplexity", f"{recorded[0]:.3f}", f"{recorded[1]:.3f}"]


@pytest.mark.parametrize("lean", ["auto", "off"])
def test_evaluate_reproduces_a_trained_runs_recorded_perplexity(tmp_path, capsys, offline, lean):
    from mlm.train import train

    run = tmp_path / "run"
    settings = {k: v for k, v in run_settings(tmp_path).items() if k != "global_batch"}
    # The CPU's default lean variant, and the plain model (--smoke's): in eval mode the lean modules compute what
    # the plain ones do, so the figures agree to the last bit.
    train(TrainConfig(**{**settings, "seed": 3, "batch_size": 16, "lr": 2e-3, "epochs": 1, "lean": lean,
                         "output_dir": str(run), "progress_bar": False}))
    capsys.readouterr()
    record = read_record(run)
    [scored] = evaluate_json(capsys, "--model", str(run))["models"]
    assert scored["perplexity"] == record.results["after"]["perplexity"]


def test_a_run_scored_on_another_eval_set_is_not_said_to_be_on_its_own(tmp_path, capsys, offline):
    run = tmp_path / "a"
    hand_made_run(run, run_settings(tmp_path, train_size="all", test_size="5%"))
    assert evaluate_json(capsys, "--model", str(run), "--test-size", "5%")["eval_set"]["from_run"] == str(run)
    assert "from_run" not in evaluate_json(capsys, "--model", str(run), "--test-size", "10%")["eval_set"]
