"""Malformed model files are one line naming the file and the key (issue 19 F6), in the loader and every CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlm.cli import evaluate as evaluate_cli
from mlm.cli import fill_mask as fill_mask_cli
from mlm.errors import MLMError, run_cli
from mlm.files.pretrained import load_config, load_pretrained, model_from_state_dict, read_config, save_pretrained
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.run.record import RunRecord

ROOT = Path(__file__).resolve().parents[1]
TINY_DIR = ROOT / "tests" / "fixtures" / "tiny-distilbert"
SMOKE_DIR = ROOT / "mlm" / "smoke"


def folder_with_config(tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(TINY_DIR, folder)
    config = json.loads((folder / "config.json").read_text()) | changes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def one_line_error(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("key, value, wanted", [
    ("n_heads", 0, "positive integer"),
    ("n_layers", -1, "positive integer"),
    ("vocab_size", 0, "positive integer"),
    ("max_position_embeddings", 0, "positive integer"),
    ("dim", 32.0, "positive integer"),  # a float size
    ("hidden_dim", "64", "positive integer"),  # a string size
    ("n_heads", True, "positive integer"),  # JSON true is not 1
    ("dim", 30, "not divisible"),
    ("pad_token_id", 5000, "token id"),
    ("pad_token_id", -1, "token id"),
    ("dropout", 1.5, r"probability in \[0, 1\)"),
    ("dropout", 1.0, r"probability in \[0, 1\)"),
    ("attention_dropout", -0.1, r"probability in \[0, 1\)"),
    ("dropout", "0.1", r"probability in \[0, 1\)"),
    ("initializer_range", -1, "> 0"),
    ("initializer_range", 0, "> 0"),
    ("tie_word_embeddings", "no", "true or false"),
    ("tie_word_embeddings", 0, "true or false"),
    ("activation", "swish", "not supported"),
])
def test_bad_config_values_are_refused_naming_file_and_key(tmp_path, key, value, wanted):
    folder = folder_with_config(tmp_path, **{key: value})
    for load in (load_pretrained, load_config):  # --init pretrained and --init random
        with pytest.raises(MLMError, match=wanted) as refused:
            load(folder)
        message = str(refused.value)
        assert str(folder / "config.json") in message and key in message and "\n" not in message


def test_the_reference_and_smoke_configs_pass_the_checks():
    for folder in (TINY_DIR, SMOKE_DIR):
        config = read_config(folder / "config.json")
        assert isinstance(config, DistilBertConfig) and config.tie_word_embeddings is True


def test_a_bad_config_is_one_line_in_fill_mask(tmp_path, capsys):
    folder = folder_with_config(tmp_path, n_heads=0)
    err = one_line_error(fill_mask_cli.main, ["--model", str(folder), "a [MASK] ."], capsys)
    assert "n_heads" in err


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_weights_are_refused_by_every_loader(tmp_path, dtype):
    folder = tmp_path / "model"
    shutil.copytree(TINY_DIR, folder)
    state = load_file(folder / "model.safetensors")
    name = "distilbert.embeddings.position_embeddings.weight"
    state[name] = state[name].to(dtype)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(MLMError, match=f"non-float weights: {name}") as refused:
        load_pretrained(folder)
    assert "\n" not in str(refused.value)
    # The training-checkpoint loader (mlm/run/checkpoints.py) goes through model_from_state_dict.
    with pytest.raises(MLMError, match="non-float weights"):
        model_from_state_dict(read_config(folder / "config.json"), state, source=folder)


def smoke_model_with_vocab(tmp_path: Path, vocab_size: int) -> Path:
    folder = tmp_path / "small-vocab"
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                                   max_position_embeddings=128))
    save_pretrained(model, folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(SMOKE_DIR / name, folder / name)
    return folder


def test_non_float_weights_are_one_line_in_the_clis(tmp_path, capsys):
    folder = smoke_model_with_vocab(tmp_path, 347)
    state = load_file(folder / "model.safetensors")
    state["vocab_projector.bias"] = state["vocab_projector.bias"].to(torch.int64)
    save_file(state, folder / "model.safetensors")
    assert "non-float" in one_line_error(fill_mask_cli.main, ["--model", str(folder), "a [MASK] ."], capsys)
    argv = ["--model", str(folder), "--dataset", str(SMOKE_DIR / "reviews.jsonl"), "--chunk-size", "32",
            "--test-size", "4", "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert "non-float" in one_line_error(evaluate_cli.main, argv, capsys)


def test_fill_mask_with_a_vocab_smaller_than_the_tokenizer_is_one_line(tmp_path, capsys):
    folder = smoke_model_with_vocab(tmp_path, 100)  # the smoke tokenizer has 347 tokens
    err = one_line_error(fill_mask_cli.main, ["--model", str(folder), "this is a [MASK] ."], capsys)
    assert f"The tokenizer has 347 tokens but the model {folder} only 100" in err


@pytest.mark.parametrize("device", ["gpu", "cuda:x"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_fill_mask_refuses_a_device_it_cannot_run_on_in_one_line(capsys, device):
    # It was passed to torch unchecked: a traceback ("Torch not compiled with CUDA enabled", "Expected one of cpu…").
    err = one_line_error(fill_mask_cli.main, ["--model", str(TINY_DIR), "--device", device, "a [MASK] ."], capsys)
    assert "not a device mlm runs on" in err or "torch sees no CUDA GPU" in err


def test_a_run_folder_without_its_final_model_points_at_its_checkpoints(tmp_path, capsys):
    # It said only "No config.json in runs/d: a model folder needs config.json." (mlm-evaluate explained it).
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "run.json").write_text("{}")
    err = one_line_error(fill_mask_cli.main, ["--model", str(folder), "a [MASK] ."], capsys)
    assert "holds a run that has no final model yet: it has saved no checkpoint yet" in err
    for step in ("step-000004", "step-000008"):
        (folder / "checkpoints" / step).mkdir()
        (folder / "checkpoints" / step / "trainer_state.json").write_text("{}")
    err = one_line_error(fill_mask_cli.main, ["--model", str(folder), "a [MASK] ."], capsys)
    assert f"give its checkpoint {folder / 'checkpoints' / 'step-000008'}," in err and "--resume latest" in err
    # A run of two processes continues with two: one would change its global batch, and be refused.
    (folder / "run.json").write_text(RunRecord(settings={}, world_size=2).to_json())
    err = one_line_error(fill_mask_cli.main, ["--model", str(folder), "a [MASK] ."], capsys)
    assert "finish the run with its 2 processes, launched as it was: torchrun … -m mlm.cli.train --resume latest " \
           "--output-dir" in err
    # While the run trains, a resume would be refused by its lock: it said to finish the run with one all the same.
    (folder / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    err = one_line_error(fill_mask_cli.main, ["--model", str(folder), "a [MASK] ."], capsys)
    assert f"holds a run that is still training (pid {os.getpid()} on " in err and "--resume" not in err
    assert err.endswith(f"give its checkpoint {folder / 'checkpoints' / 'step-000008'}.\n")
