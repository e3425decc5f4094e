"""examples/walkthrough.py end to end on the shipped smoke assets: it runs, what it prints is what mlm's functions
compute on the same data, and the loop it writes out is mlm-train's: the same weights, bit for bit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mlm.data import split_train_test, tokenize_and_chunk
from mlm.files.data_files import load_texts
from mlm.files.pretrained import load_config
from mlm.masking import MaskingCollator, freeze_eval_masks
from mlm.model import DistilBertForMaskedLM
from mlm.tokenizer import load_tokenizer
from mlm.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"
REVIEWS = SMOKE / "reviews.jsonl"
WALKTHROUGH = ROOT / "examples" / "walkthrough.py"
# A --seed other than the --data-seed: the draw and the eval masks must follow --data-seed, as in train().
TRAIN_SIZE, TEST_SIZE, SEED, DATA_SEED = 64, 32, 7, 42


def run_walkthrough(*flags: str, cwd: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH: this checkout's mlm, not whichever one is installed. Offline: nothing may reach for the Hub.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(WALKTHROUGH), *flags], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("walkthrough")
    result = run_walkthrough(
        "--model", str(SMOKE), "--init", "random", "--dataset", str(REVIEWS), "--train-size", str(TRAIN_SIZE),
        "--test-size", str(TEST_SIZE), "--batch-size", "32", "--max-steps", "2", "--device", "cpu",
        "--seed", str(SEED), "--data-seed", str(DATA_SEED),
        "--cache-dir", str(tmp / "cache"), "--output-dir", str(tmp / "out"), "--no-progress", cwd=tmp)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout, tmp


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(SMOKE)


@pytest.fixture(scope="module")
def texts():
    return load_texts(REVIEWS)


def test_it_prints_the_parameter_count(smoke_run):
    stdout, _ = smoke_run
    n = DistilBertForMaskedLM(load_config(SMOKE)).num_parameters()
    assert n < 1e6 and f"'>>> DistilBERT number of parameters: {n / 1e6:.2f}M'" in stdout.splitlines()  # not "0M"
    assert f"({n:,} parameters, random weights, on cpu)" in stdout


def test_random_reviews_come_with_their_labels_and_the_missing_split_is_a_note(smoke_run, texts):
    stdout, _ = smoke_run
    rows = [json.loads(line) for line in REVIEWS.read_text().splitlines()]
    first_three = np.random.default_rng(SEED).permutation(len(rows))[:3]
    shown = re.findall(r"^'>>> Review: (.*)'\n'>>> Label: (.*)'$", stdout, flags=re.M)
    assert shown == [(rows[i]["text"], str(rows[i]["label"])) for i in first_three]
    assert "no unsupervised split in this dataset; skipping its sample." in stdout


def test_lengths_and_chunk_counts_are_the_data_functions(smoke_run, tokenizer, texts):
    stdout, _ = smoke_run
    lengths = [len(tokenizer.backend.encode(texts[i]).ids) for i in range(45, 50)]
    for index, length in zip(range(45, 50), lengths):
        assert f"'>>> Review {index} length: {length}'" in stdout
    total = sum(lengths)
    assert f"'>>> Concatenated reviews length: {total}'" in stdout
    chunk_lines = re.findall(r"^'>>> Chunk length: (\d+)'$", stdout, flags=re.M)
    assert [int(n) for n in chunk_lines] == [128] * (total // 128) + ([total % 128] if total % 128 else [])

    whole = tokenize_and_chunk(texts, tokenizer, chunk_size=128)
    grouped = tokenize_and_chunk(texts, tokenizer, chunk_size=128, group_size=1000)
    assert f"'>>> train: {len(texts):,} reviews, {whole.n_tokens:,} tokens'" in stdout
    assert f"'>>> chunks of 128, whole split joined: {len(whole):,}'" in stdout
    assert f"'>>> chunks of 128, 1,000-review groups: {len(grouped):,}'" in stdout
    assert len(whole) == whole.n_tokens // 128


def test_the_boundary_chunk_and_the_masked_chunks(smoke_run, tokenizer, texts):
    stdout, _ = smoke_run
    chunks = tokenize_and_chunk(texts, tokenizer, chunk_size=128)
    decoded = tokenizer.backend.decode(chunks.input_ids[0].tolist(), skip_special_tokens=False)
    assert "[SEP] [CLS]" in decoded
    assert stdout.count(f"\n'{decoded}'\n") == 2  # the chunk, then its labels
    assert "word ids around the boundary:" in stdout and "[SEP]:-1 [CLS]:-1 " in stdout

    rows = [{"input_ids": chunks.input_ids[i], "word_ids": chunks.word_ids[i]} for i in range(2)]
    expected = []
    for whole_word in (False, True):
        batch = MaskingCollator.from_tokenizer(tokenizer, whole_word=whole_word, seed=SEED)(rows)
        expected += [int((labels != -100).sum()) for labels in batch["labels"]]
    assert [int(n) for n in re.findall(r"^\((\d+) of 128 tokens to predict\)$", stdout, flags=re.M)] == expected


def test_the_draw_frozen_masks_perplexities_and_fill_mask(smoke_run, tokenizer, texts):
    stdout, tmp = smoke_run
    chunks = tokenize_and_chunk(texts, tokenizer, chunk_size=128)
    assert f"'>>> train: {TRAIN_SIZE} chunks, test: {TEST_SIZE} chunks (of {len(chunks)})'" in stdout
    _, test = split_train_test(chunks, train_size=TRAIN_SIZE, test_size=TEST_SIZE, seed=DATA_SEED)
    frozen = freeze_eval_masks(test.input_ids, mask_token_id=tokenizer.mask_token_id,
                               vocab_size=tokenizer.vocab_size, special_token_ids=tokenizer.special_token_ids,
                               seed=DATA_SEED)
    assert f"frozen eval masks: {int((frozen['labels'] != -100).sum()):,} of {TEST_SIZE * 128:,} tokens" in stdout

    before, after = (float(p) for p in re.findall(r"^'>>> Perplexity: ([\d.]+)'$", stdout, flags=re.M))
    epochs = [float(p) for p in re.findall(r"^'>>> Epoch \d+: Perplexity: ([\d.]+)'$", stdout, flags=re.M)]
    assert epochs[-1] == after  # the saved model, read back, scores what the trained one did
    assert 1 < after < before  # two steps at lr 2e-5 still lower the loss of a random model a little

    assert (tmp / "out" / "model.safetensors").is_file()
    fills = stdout.split(f"'>>> Perplexity: {after:.2f}'")[1]
    assert len(re.findall(r"^'>>> this is a great.*\.'$", fills, flags=re.M)) == 5


def test_its_loop_is_mlm_trains_loop(smoke_run):
    """The walkthrough writes the loop of mlm/train.py out with the chapter's functions; mlm-train on the same
    settings (the plain model and tokenizer call, fp32) takes the same steps: the same weights, bit for bit."""
    _, tmp = smoke_run
    train(TrainConfig(model=str(SMOKE), init="random", dataset=str(REVIEWS), train_size=TRAIN_SIZE, test_size=TEST_SIZE,
                      batch_size=32, max_steps=2, seed=SEED, data_seed=DATA_SEED, device="cpu", lean="off",
                      fast_tokenize="off", cache_dir=str(tmp / "cache"), output_dir=str(tmp / "trained"),
                      progress_bar=False, prompts=()))
    walked, trained = load_file(tmp / "out" / "model.safetensors"), load_file(tmp / "trained" / "model.safetensors")
    assert walked.keys() == trained.keys() and all(torch.equal(walked[k], trained[k]) for k in walked)


def test_bad_input_is_one_line(tmp_path):
    result = run_walkthrough("--model", str(SMOKE), "--init", "pretrained", "--dataset", str(REVIEWS),
                             "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode != 0
    assert result.stderr.startswith("error: No model.safetensors in ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    # mlm-train's checks, before any cell: a batch size of 0 was a ZeroDivisionError once every data cell had run.
    result = run_walkthrough("--model", str(SMOKE), "--init", "random", "--dataset", str(REVIEWS), "--batch-size", "0",
                             "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    assert result.stderr == "error: --batch-size must be an integer >= 1, got 0.\n"


@pytest.mark.parametrize("corpus", ["folder", "glob"])
def test_a_folder_or_glob_of_documents_is_a_train_split_as_one_file_is(tmp_path, corpus):
    """A folder without split names (or a glob) ran the model cells, then stopped: "split 'test' was asked for"."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "reviews.jsonl").write_bytes(REVIEWS.read_bytes())
    dataset = str(folder) if corpus == "folder" else str(folder / "*.jsonl")
    result = run_walkthrough("--model", str(SMOKE), "--init", "random", "--dataset", dataset, "--train-size", "32",
                             "--test-size", "16", "--batch-size", "16", "--max-steps", "1", "--device", "cpu",
                             "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out"),
                             "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"note: {dataset} is a single corpus, which holds only a train split" in result.stdout


# ---------------------------------------------------------------- the output folder


def test_it_marks_its_folder_and_replaces_only_its_own_earlier_output(smoke_run):
    _, tmp = smoke_run
    assert (tmp / "out" / ".mlm-walkthrough").is_file()
    again = run_walkthrough(
        "--model", str(SMOKE), "--init", "random", "--dataset", str(REVIEWS), "--train-size", str(TRAIN_SIZE),
        "--test-size", str(TEST_SIZE), "--batch-size", "32", "--max-steps", "1", "--device", "cpu",
        "--cache-dir", str(tmp / "cache"), "--output-dir", str(tmp / "out"), "--no-progress", cwd=tmp)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp / "out" / ".mlm-walkthrough").is_file() and (tmp / "out" / "model.safetensors").is_file()


def test_a_folder_it_did_not_make_is_refused_and_left_alone(tmp_path):
    run = tmp_path / "distilbert-base-uncased-finetuned-imdb"  # mlm-train's default folder, holding a run
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"hours of training")
    (run / "run.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = run_walkthrough("--model", str(SMOKE), "--init", "random", "--dataset", str(REVIEWS),
                             "--output-dir", str(run), "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: --output-dir {run} holds files the walkthrough did not write")
    assert result.stderr.count("\n") == 1 and result.stdout == ""  # refused before any work
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_its_default_folder_is_its_own(tmp_path):
    result = run_walkthrough("--help", cwd=tmp_path)
    help_text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "(default: runs/walkthrough)" in help_text
    assert "an earlier walkthrough's, which it replaces" in help_text and "run.json" not in help_text
