"""scripts/train.py --push-to-hub end to end, against tests/hub_server.py on 127.0.0.1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hub_server import TOKEN, HubServer
from test_train import interrupt_after

import mlm.cli.train

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train.py"


def run_train(hub: HubServer, tmp_path: Path, *flags: str, token: str | None = TOKEN):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env |= {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "PYTHONPATH": str(ROOT),
            "HF_HOME": str(tmp_path / "hf-home")}  # no saved login either
    if token:
        env["HF_TOKEN"] = token
    # --smoke with 64 train / 32 eval chunks: 4 steps, every stage, a few seconds.
    return subprocess.run([sys.executable, str(TRAIN), "--smoke", "--epochs", "1", "--no-progress",
                           "--train-size", "64", "--test-size", "32",
                           "--output-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), *flags],
                          env=env, capture_output=True, text=True, timeout=600)


def test_smoke_run_pushes_model_and_card(tmp_path):
    with HubServer() as hub:
        out = run_train(hub, tmp_path, "--push-to-hub", "--hub-model-id", "smoke-imdb", "--hub-private")
        assert out.returncode == 0, out.stderr
        run = tmp_path / "run"
        repo = hub.repos["me/smoke-imdb"]
        assert repo.private
        local = {p.relative_to(run).as_posix(): p.read_bytes() for p in run.rglob("*")
                 if p.is_file() and "checkpoints" not in p.parts}
        # The record's copy names no local path (the local one keeps them for a resume); the rest byte for byte.
        pushed_record = json.loads(repo.files.pop("run.json"))
        assert str(tmp_path) in local.pop("run.json").decode() and str(tmp_path) not in json.dumps(pushed_record)
        assert pushed_record["settings"]["output_dir"] == "run" and pushed_record["settings"]["cache_dir"] == "cache"
        assert repo.files == local and "model.safetensors" in local and "README.md" in local
        meta = yaml.safe_load(local["README.md"].decode().split("---\n")[1])
        assert "fill-mask" in meta["tags"]
        # The smoke corpus is a local file: no Hub dataset to name, so no model-index; the prose has the figures.
        assert "model-index" not in meta and "datasets" not in meta
        after = pushed_record["results"]["after"]["perplexity"]
        assert f"{after:.2f}" in local["README.md"].decode()
        assert 'model="me/smoke-imdb"' in local["README.md"].decode()


def test_no_token_fails_before_training(tmp_path):
    with HubServer() as hub:
        out = run_train(hub, tmp_path, "--push-to-hub", token=None)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "No Hugging Face token" in out.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing trained for nothing


def test_a_run_without_push_still_writes_its_card(tmp_path):
    with HubServer() as hub:
        out = run_train(hub, tmp_path)
        assert out.returncode == 0, out.stderr
        assert hub.requests == []
    card = (tmp_path / "run" / "README.md").read_text()
    assert yaml.safe_load(card.split("---\n")[1])["pipeline_tag"] == "fill-mask"


def test_an_interrupted_push_run_says_to_push_again_when_it_continues(tmp_path, monkeypatch, capsys):
    # --push-to-hub is the command's, not a setting the run records: the printed command dropped it, and the run it
    # continued finished without pushing.
    monkeypatch.setattr(mlm.cli.train, "full_repo_id", lambda name, private: f"me/{name}")  # no Hub asked
    interrupt_after(monkeypatch, 1)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        mlm.cli.train.main(["--smoke", "--epochs", "1", "--no-progress", "--train-size", "64", "--test-size", "32",
                            "--output-dir", str(run), "--cache-dir", str(tmp_path / "cache"), "--push-to-hub",
                            "--hub-private"])
    assert stop.value.code == 130
    assert capsys.readouterr().out.endswith(f"Continue with: mlm-train --resume latest --output-dir {run} "
                                            "--push-to-hub --hub-private\n")
