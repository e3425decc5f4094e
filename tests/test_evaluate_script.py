"""scripts/evaluate.py and mlm.cli.compare: several models scored on one frozen eval set, side by side."""

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mlm.compare import build_eval_set
from mlm.corpus import load_chunks
from mlm.data import split_train_test
from mlm.evaluate import evaluate
from mlm.files.pretrained import load_pretrained, save_pretrained
from mlm.fill_mask import fill_mask
from mlm.masking import freeze_eval_masks
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "evaluate.py"
SMOKE = ROOT / "mlm" / "smoke"
PROMPTS = ["this movie is a great [MASK] .", "i [MASK] this [MASK] ."]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_tokenizer_dir) -> dict:
    """Two tiny random models sharing the tiny tokenizer, one with another tokenizer, and a data cache."""
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    paths = {"cache": root / "cache"}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
        paths[name] = root / name
        save_pretrained(DistilBertForMaskedLM(config), paths[name], tokenizer=tokenizer)
    other = load_tokenizer(SMOKE)  # 347 tokens
    torch.manual_seed(2)
    paths["other"] = root / "other"
    config = DistilBertConfig(vocab_size=other.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    save_pretrained(DistilBertForMaskedLM(config), paths["other"], tokenizer=other)
    return paths


def data_flags(workspace) -> list[str]:
    return ["--dataset", str(SMOKE / "reviews.jsonl"), "--chunk-size", "32", "--test-size", "24", "--data-seed", "7",
            "--cache-dir", str(workspace["cache"]), "--eval-batch-size", "5", "--top-k", "3", "--device", "cpu",
            "--no-progress", *[x for p in PROMPTS for x in ("--prompt", p)]]


def run_script(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run scripts/evaluate.py in this process (as `python scripts/evaluate.py ARGS` would): (status, out, err)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    status = 0
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def test_json_figures_are_those_of_evaluate_on_the_runs_eval_set(workspace, monkeypatch, capsys):
    status, out, _ = run_script(monkeypatch, capsys, "--model", str(workspace["a"]), "--model", str(workspace["b"]),
                                "--json", *data_flags(workspace))
    assert status == 0
    report = json.loads(out)

    # The eval set a training run with the same flags builds, scored directly with the library.
    tokenizer = load_tokenizer(workspace["a"])
    chunks = load_chunks(SMOKE / "reviews.jsonl", "train", tokenizer, chunk_size=32, cache_dir=workspace["cache"])
    _, test = split_train_test(chunks, train_size=50, test_size=24, seed=7)
    frozen = freeze_eval_masks(test.input_ids, mask_token_id=tokenizer.mask_token_id,
                               vocab_size=tokenizer.vocab_size, special_token_ids=tokenizer.special_token_ids, seed=7)
    assert report["eval_set"] == {"dataset": str(SMOKE / "reviews.jsonl"), "split": "train", "chunks": 24,
                                  "chunk_size": 32, "masking": "token", "seed": 7,
                                  "masked_tokens": int((frozen["labels"] != -100).sum())}
    assert [m["model"] for m in report["models"]] == [str(workspace["a"]), str(workspace["b"])]
    for entry, name in zip(report["models"], ("a", "b")):
        model = load_pretrained(workspace[name])
        expected = evaluate(model, frozen["input_ids"], frozen["labels"], batch_size=5)
        for key in ("loss", "perplexity", "reference_loss", "reference_perplexity", "accuracy", "tokens", "sequences"):
            assert entry[key] == getattr(expected, key), key
        predictions = fill_mask(model, tokenizer, PROMPTS, top_k=3)
        assert [[[p["token"] for p in mask] for mask in prompt["masks"]] for prompt in entry["fill_mask"]] == [
            [[p.token for p in mask] for mask in prompt] for prompt in predictions]
        assert [len(prompt["masks"]) for prompt in entry["fill_mask"]] == [1, 2]
    # Two different random models: different figures on the same targets.
    assert report["models"][0]["perplexity"] != report["models"][1]["perplexity"]
    assert report["models"][0]["tokens"] == report["models"][1]["tokens"]


def test_table_shows_both_models_side_by_side(workspace, monkeypatch, capsys):
    args = ["--model", str(workspace["a"]), "--model", str(workspace["a"]), *data_flags(workspace)]
    status, out, _ = run_script(monkeypatch, capsys, *args)
    assert status == 0
    status, raw, _ = run_script(monkeypatch, capsys, *args, "--json")
    first, second = json.loads(raw)["models"]
    assert {k: v for k, v in first.items() if k != "model"} == {k: v for k, v in second.items() if k != "model"}

    lines = out.splitlines()
    assert lines[0].startswith("24 eval chunks of 32 tokens from ") and "token-level masks" in lines[0]
    row = next(line for line in lines if line.startswith("perplexity  "))
    assert row.split()[1:] == [f"{first['perplexity']:.3f}"] * 2
    row = next(line for line in lines if line.startswith("masked-token accuracy"))
    assert row.split()[2:] == [f"{first['accuracy']:.2%}"] * 2
    assert PROMPTS[1] in lines
    top = first["fill_mask"][1]["masks"][1][0]
    assert any(line.split()[:3] == ["[MASK]", "#2", "1"] and f"{top['token']} {top['score']:.3f}" in line
               for line in lines)


def test_whole_word_eval_set_masks_whole_words(workspace):
    tokenizer = load_tokenizer(workspace["a"])
    flags = dict(dataset=str(SMOKE / "reviews.jsonl"), chunk_size=32, test_size=24, seed=7,
                 cache_dir=str(workspace["cache"]))
    wwm = build_eval_set(tokenizer, masking="wwm", wwm_probability=0.3, **flags)
    token = build_eval_set(tokenizer, masking="token", **flags)
    chunks = load_chunks(SMOKE / "reviews.jsonl", "train", tokenizer, chunk_size=32, cache_dir=workspace["cache"])
    _, test = split_train_test(chunks, train_size=50, test_size=24, seed=7)
    word_ids = torch.from_numpy(test.word_ids.astype("int64"))
    labelled = wwm.labels != -100
    assert wwm.masked_tokens == int(labelled.sum()) > 0
    assert torch.equal(wwm.input_ids[labelled], torch.full_like(wwm.input_ids[labelled], tokenizer.mask_token_id))
    for row in range(len(word_ids)):  # a word (a run of tokens with one word id) is masked whole or not at all
        words: list[list[bool]] = []
        previous = None
        for position, word in enumerate(word_ids[row].tolist()):
            if word < 0:
                continue  # [CLS]/[SEP]: never masked, and not part of any word
            if word != previous:
                words.append([])
            words[-1].append(bool(labelled[row, position]))
            previous = word
        assert all(all(flags) or not any(flags) for flags in words)
    assert any(len(flags) > 1 and all(flags) for flags in words)  # multi-token words do get masked whole
    assert not torch.equal(wwm.labels, token.labels)
    assert torch.equal(build_eval_set(tokenizer, masking="wwm", wwm_probability=0.3, **flags).labels, wwm.labels)


def test_mismatched_tokenizers_are_one_line(workspace, monkeypatch, capsys):
    status, out, err = run_script(monkeypatch, capsys, "--model", str(workspace["a"]), "--model",
                                  str(workspace["other"]), *data_flags(workspace))
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ")
    sizes = f"{load_tokenizer(workspace['a']).vocab_size} and {load_tokenizer(SMOKE).vocab_size} tokens"
    assert f"{workspace['a']} and {workspace['other']} have different tokenizers ({sizes}" in err


def test_unknown_models_are_one_line(workspace, monkeypatch, capsys, tmp_path):
    status, _, err = run_script(monkeypatch, capsys, "--model", str(tmp_path / "no-such-run"), *data_flags(workspace))
    assert status == 2 and err.count("\n") == 1 and "No such folder" in err

    # A Hub id that is not there, with the Hub off: the real command line, in a fresh process.
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", "nobody-here/no-such-model", *data_flags(workspace)],
                         capture_output=True, text=True, timeout=300,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                              "HF_HOME": str(tmp_path / "hf-home")})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "nobody-here/no-such-model" in out.stderr, out.stderr


def test_bad_flags_are_one_line(workspace, monkeypatch, capsys):
    status, _, err = run_script(monkeypatch, capsys, "--model", str(workspace["a"]), *data_flags(workspace),
                                "--top-k", "0")
    assert status == 2 and err == "error: --top-k must be an integer >= 1, got 0.\n"
    status, _, err = run_script(monkeypatch, capsys, "--model", str(workspace["a"]), *data_flags(workspace),
                                "--test-size", "100000")
    assert status == 2 and err.count("\n") == 1 and "Cannot draw 100000 eval chunks from " in err
    status, _, err = run_script(monkeypatch, capsys, "--model", str(workspace["a"]), *data_flags(workspace),
                                "--chunk-size", "513", "--test-size", "2")
    assert status == 2 and err.count("\n") == 1 and "takes at most 512 tokens" in err and "--chunk-size" in err


def test_scores_a_training_run_exactly_as_the_run_did(tmp_path, monkeypatch, capsys):
    from mlm.train import TrainConfig, train

    run = tmp_path / "run"
    flags = dict(dataset=str(SMOKE / "reviews.jsonl"), chunk_size=32, train_size=48, test_size=16, data_seed=3,
                 cache_dir=str(tmp_path / "cache"))
    # lean="off": the CPU's default lean variant rounds its fused ops differently in the last bits, and the
    # comparison below is bit for bit against the plain model evaluate.py loads.
    summary = train(TrainConfig(model=str(SMOKE), init="random", seed=3, batch_size=16, eval_batch_size=8, lr=2e-3,
                                epochs=1, output_dir=str(run), progress_bar=False, lean="off", **flags))
    capsys.readouterr()  # the run's own log lines
    status, out, _ = run_script(monkeypatch, capsys, "--model", str(run), "--json", "--eval-batch-size", "8",
                                "--device", "cpu", "--no-progress",
                                *[x for k, v in flags.items() if k != "train_size"
                                  for x in (f"--{k.replace('_', '-')}", str(v))])  # the eval draw needs no train size
    assert status == 0
    [scored] = json.loads(out)["models"]
    assert scored["tokens"] == summary.after.tokens
    assert scored["perplexity"] == summary.after.perplexity  # same targets, same batches: bit for bit
    assert scored["reference_perplexity"] == summary.after.reference_perplexity
    assert scored["accuracy"] == summary.after.accuracy


def test_the_table_lists_only_the_predictions_there_are(tmp_path):
    # --top-k past the vocabulary printed a blank row for every rank fill_mask could not fill (100,000 lines).
    from types import SimpleNamespace

    from mlm.cli.evaluate import as_table
    from mlm.evaluate import EvalResult
    from mlm.fill_mask import Prediction

    args = SimpleNamespace(chunk_size=32, validation_file=None, dataset="d", eval_split=None, train_splits=("train",),
                           data_seed=7, from_run=None, prompts=["a [MASK] ."], top_k=100_000)
    eval_set = SimpleNamespace(input_ids=torch.zeros(4, 32), masking="token", masked_tokens=20)
    predictions = [[Prediction(i, f"t{i}", 0.5 / (i + 1), "a t .") for i in range(3)]]  # a vocabulary of 3
    score = SimpleNamespace(model="m", fill_mask=[predictions], result=EvalResult(
        loss=1.0, perplexity=2.7, reference_loss=1.0, reference_perplexity=2.7, accuracy=0.5, tokens=20, sequences=4))
    lines = as_table(args, eval_set, [score]).splitlines()
    assert lines[-4] == "a [MASK] ." and [line.split() for line in lines[-3:]] == [
        ["1", "t0", "0.500"], ["2", "t1", "0.250"], ["3", "t2", "0.167"]]
    assert lines[0].startswith("4 eval chunks of 32 tokens from d (train split, seed 7), token-level masks")
    # A validation file is read whole: it was labelled "(train split, …)".
    args.validation_file = "dev.jsonl"
    assert as_table(args, eval_set, [score]).startswith("4 eval chunks of 32 tokens from dev.jsonl (seed 7), token")
