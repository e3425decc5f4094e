"""The console scripts, --smoke reruns, --no-progress, and --report-to tensorboard (with a stand-in SummaryWriter:
the tensorboard package is an optional extra the suite does not need)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mlm.errors import MLMError
from mlm.run.tensorboard_log import TensorBoardLog, require_tensorboard

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"
TINY_SMOKE = ["--smoke", "--epochs", "1", "--train-size", "32", "--test-size", "16", "--no-progress"]


class FakeSummaryWriter:
    """Records add_scalar calls as torch.utils.tensorboard.SummaryWriter would write them."""

    instances: list[FakeSummaryWriter] = []

    def __init__(self, log_dir: str):
        self.log_dir, self.scalars, self.flushes, self.closed = log_dir, [], 0, False
        FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, global_step: int) -> None:
        self.scalars.append((tag, value, global_step))

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture()
def fake_tensorboard(monkeypatch):
    FakeSummaryWriter.instances = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return FakeSummaryWriter


@pytest.fixture()
def no_tensorboard(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` then raises ImportError


# ---------------------------------------------------------------------------------------------------------------
# --report-to tensorboard


def test_records_become_scalars(fake_tensorboard, tmp_path):
    log = TensorBoardLog(tmp_path)
    log.write("train", step=10, epoch=0.5, loss=2.5, lr=1e-4, grad_norm=0.75, tokens_per_second=1234.0, skipped=False)
    log.write("eval", label="epoch 1", step=20, epoch=1, loss=2.0, perplexity=7.389, reference_loss=2.1,
              reference_perplexity=8.166, accuracy=0.4, tokens=100, sequences=4)
    log.write("fill_mask", label="after", step=20, prompt="a [MASK]", predictions=[[["b", 0.5]]])
    log.close()
    [writer] = fake_tensorboard.instances
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed and writer.flushes == 2
    assert writer.scalars == [("train/loss", 2.5, 10), ("train/lr", 1e-4, 10), ("train/grad_norm", 0.75, 10),
                              ("train/tokens_per_second", 1234.0, 10), ("eval/perplexity", 7.389, 20),
                              ("eval/reference_perplexity", 8.166, 20), ("eval/loss", 2.0, 20),
                              ("eval/accuracy", 0.4, 20)]


def test_a_run_reports_its_curves(fake_tensorboard, tmp_path):
    from mlm.train import TrainConfig, train

    run = tmp_path / "run"
    summary = train(TrainConfig(model=str(SMOKE), init="random", dataset=str(SMOKE / "reviews.jsonl"), chunk_size=32,
                                train_size=64, test_size=16, batch_size=16, epochs=2, log_every=2, output_dir=str(run),
                                cache_dir=str(tmp_path / "cache"), progress_bar=False, report_to="tensorboard"))
    [writer] = fake_tensorboard.instances
    assert writer.closed
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in metrics if m["kind"] == "train"]
    assert [(t, v, s) for t, v, s in writer.scalars if t == "train/loss"] == [
        ("train/loss", m["loss"], m["step"]) for m in train_lines]
    perplexities = [(v, s) for t, v, s in writer.scalars if t == "eval/perplexity"]
    assert perplexities[0] == (summary.before.perplexity, 0) and perplexities[-1] == (summary.after.perplexity, 8)
    assert len(perplexities) == 3  # before, epoch 1, epoch 2


def test_missing_tensorboard_stops_before_any_work(no_tensorboard, tmp_path, monkeypatch, capsys):
    with pytest.raises(MLMError, match=r"--report-to tensorboard needs the tensorboard package.*pip install"):
        require_tensorboard()
    from mlm.cli.train import run

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["mlm-train", *TINY_SMOKE, "--report-to", "tensorboard"])
    with pytest.raises(SystemExit) as exit_:
        run()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith("error: --report-to tensorboard needs")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------------------------
# Console scripts


def console_scripts() -> dict[str, str]:
    """pyproject's [project.scripts] table, read without tomllib, which Python 3.10 (still supported by
    pyproject) lacks: the table is plain `name = "module:function"` lines, so a line reader is enough and the test
    runs on every supported Python. Where tomllib exists, it must read the same table (this guards the reader)."""
    text = (ROOT / "pyproject.toml").read_text()
    scripts, inside = {}, False
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("["):
            inside = line == "[project.scripts]"
        elif inside and line:
            name, value = (part.strip() for part in line.split("=", 1))
            assert value[0] == value[-1] == '"', line  # a form this reader does not know would fail loudly
            scripts[name.strip('"')] = value[1:-1]
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:
        return scripts
    assert tomllib.loads(text)["project"]["scripts"] == scripts
    return scripts


def test_console_scripts_resolve_to_the_cli_modules():
    scripts = console_scripts()
    assert set(scripts) == {"mlm-train", "mlm-evaluate", "mlm-fill-mask", "mlm-prepare-data"}
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        wrapper = ROOT / "scripts" / f"{module.rsplit('.', 1)[1]}.py"
        assert f"from {module} import" in wrapper.read_text()  # scripts/*.py run the same program


@pytest.mark.parametrize("module, flag", [("train", "--push-to-hub"), ("evaluate", "--eval-split"),
                                          ("fill_mask", "--top-k"), ("prepare_data", "--splits")])
def test_modules_run_outside_a_checkout(tmp_path, module, flag):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", f"mlm.cli.{module}", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert flag in done.stdout and "usage:" in done.stdout


# ---------------------------------------------------------------------------------------------------------------
# --smoke reruns and --no-progress


def test_smoke_reruns_as_is_and_no_progress_silences_every_bar(tmp_path, monkeypatch, capsys):
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    from mlm.cli.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLM_CACHE", str(tmp_path / "cache"))
    try:
        main(TINY_SMOKE)
        first = (tmp_path / "runs" / "smoke" / "run.json").read_text()
        main(TINY_SMOKE)  # its own folder: replaced, not refused
        assert are_progress_bars_disabled()
    finally:
        enable_progress_bars()
    err = capsys.readouterr().err
    assert "%|" not in err and "it/s" not in err  # no tqdm bar: training, tokenizing
    assert (tmp_path / "runs" / "smoke" / "run.json").read_text() != first  # times differ: a second run
    metrics = (tmp_path / "runs" / "smoke" / "metrics.jsonl").read_text()
    assert metrics.count('"label": "before"') == 3  # one run's lines only (one eval, two prompts), not two runs'

    # Elsewhere the usual rule holds: a folder with another run needs --resume or --overwrite.
    other = ["--output-dir", str(tmp_path / "mine")]
    main([*TINY_SMOKE, *other])
    with pytest.raises(MLMError, match="already holds a run"):
        main([*TINY_SMOKE, *other])


def test_the_default_output_folder_is_named_after_the_model_and_the_data(tmp_path, monkeypatch):
    import mlm.cli.train
    from mlm.settings import TrainConfig

    assert TrainConfig().output_dir == "distilbert-base-uncased-finetuned-imdb"  # the course's
    given = []
    monkeypatch.setattr(mlm.cli.train, "train", lambda config: given.append(config) or exit(0))
    (tmp_path / "man-pages").mkdir()
    (tmp_path / "bert-base-cased").mkdir()
    monkeypatch.chdir(tmp_path)
    for flags, folder in ((["--dataset", "man-pages/**/*.txt"], "distilbert-base-uncased-finetuned-man-pages"),
                          (["--dataset", "notes.jsonl.gz", "--init", "random", "--model", "bert-base-cased"],
                           "bert-base-cased-scratch-notes"),
                          (["--dataset", "x", "--output-dir", "mine"], "mine")):
        with pytest.raises(SystemExit):
            mlm.cli.train.main(flags)
        assert given.pop().output_dir == folder


def test_an_older_checkpoint_of_an_extended_run_resumes_as_run_json_defines_the_run(tmp_path, monkeypatch, capsys):
    """--resume CHECKPOINT takes the run's settings from its run.json, not from the checkpoint's older copy: after
    an --extend, a checkpoint from before it continues the extended run instead of being refused."""
    from mlm.cli.train import main

    monkeypatch.chdir(tmp_path)
    flags = ["--model", str(SMOKE), "--init", "random", "--dataset", str(SMOKE / "reviews.jsonl"), "--chunk-size",
             "32", "--train-size", "96", "--test-size", "32", "--batch-size", "16", "--save-every", "2",
             "--keep-checkpoints", "10", "--no-progress", "--prompt", "a [MASK] .", "--output-dir", "run"]
    main([*flags, "--epochs", "1"])
    main(["--resume", "latest", "--extend", "--epochs", "2", "--output-dir", "run"])
    main(["--resume", "run/checkpoints/step-000004"])
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "finished" and record["progress"]["step"] == 12
    assert [segment["from_step"] for segment in record["segments"]] == [0, 6, 4]
