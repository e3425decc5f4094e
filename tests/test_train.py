"""The training loop: learning, exact resume, interruption, schedule, decay groups, outputs and CLI errors.

Every run here uses the tiny random model, tokenizer and synthetic corpus of mlm/smoke (no Hub, no downloaded files).
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mlm.train
from mlm.chunks import Chunks
from mlm.errors import MLMError
from mlm.evaluate import evaluate, score_batches
from mlm.files.pretrained import load_config, load_pretrained
from mlm.masking import MaskingCollator
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.optim import schedule_factor, weight_decay_groups
from mlm.run.processes import Processes
from mlm.speed.lean import LeanAttention
from mlm.speed.path import choose_path
from mlm.tokenizer import load_tokenizer
from mlm.train import StepBatches, StepResult, TrainConfig, train, train_step

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"


def tiny_run(output_dir: Path, **overrides) -> TrainConfig:
    # 96 train chunks / batch 16 = 6 steps per epoch; dropout stays on (0.1), so resume must restore the RNG.
    values = dict(model=str(SMOKE), init="random", dataset=str(SMOKE / "reviews.jsonl"), chunk_size=32,
                  train_size=96, test_size=32, batch_size=16, eval_batch_size=16, lr=2e-3, epochs=2,
                  log_every=1, save_every=4, keep_checkpoints=2, output_dir=str(output_dir),
                  cache_dir=str(output_dir.parent / "cache"), progress_bar=False, prompts=("a great [MASK] .",))
    return TrainConfig(**{**values, **overrides})


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def interrupt_after(monkeypatch, steps: int, signum=signal.SIGINT) -> None:
    """Send ourselves `signum` right after the `steps`-th optimizer step, as a user pressing Ctrl-C would."""
    calls = {"n": 0}

    def step_then_signal(*args, **kwargs) -> StepResult:
        result = train_step(*args, **kwargs)  # the real one, imported before any patching
        calls["n"] += 1
        if calls["n"] == steps:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(mlm.train, "train_step", step_then_signal)


def test_tiny_model_learns_and_writes_a_complete_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    scored = []  # the frozen eval set each evaluation of the run scores, recorded as the run passes it

    def recording_score_batches(model, input_ids, labels, **kwargs):
        scored.append((input_ids.clone(), labels.clone(), kwargs["batch_size"]))
        return score_batches(model, input_ids, labels, **kwargs)

    monkeypatch.setattr(mlm.train, "score_batches", recording_score_batches)
    summary = train(tiny_run(run, epochs=3))

    assert summary.status == "finished" and summary.steps == 18
    assert summary.after.perplexity < 0.5 * summary.before.perplexity
    for name in ("run.json", "metrics.jsonl", "config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000016", "step-000018"]  # keep 2

    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["progress"]["step"] == 18
    assert record["settings"]["lr"] == 2e-3 and record["derived"]["total_steps"] == 18
    assert record["derived"]["train_chunks"] == 96
    assert record["results"]["after"]["perplexity"] == summary.after.perplexity
    assert [e["label"] for e in record["results"]["evals"]] == ["before", "epoch 1", "epoch 2", "epoch 3"]
    train_lines = records(run, "train")
    assert [r["step"] for r in train_lines] == list(range(1, 19))
    assert all(r["loss"] > 0 and r["tokens_per_second"] > 0 and r["grad_norm"] > 0 for r in train_lines)
    evals = records(run, "eval")
    assert [e["label"] for e in evals] == ["before", "epoch 1", "epoch 2", "epoch 3"]
    assert evals[0]["tokens"] == evals[-1]["tokens"] > 0  # the same frozen targets every time
    assert [r["label"] for r in records(run, "fill_mask")] == ["before", "after"]

    # The final folder is a complete model: loaded from disk on its own (the plain model, where the run trained
    # the lean one on the CPU) and scored on the run's frozen eval set, it reproduces the last eval to the last bit:
    # in eval mode the lean modules compute exactly what the plain ones do.
    input_ids, labels, batch_size = scored[-1]
    assert len(scored) == 4 and all(torch.equal(labels, other) for _, other, _ in scored)
    reloaded = evaluate(load_pretrained(run), input_ids, labels, batch_size=batch_size)
    recorded = json.loads((run / "run.json").read_text())["results"]
    for last in (evals[-1], recorded["after"], asdict(summary.after)):
        assert asdict(reloaded) == {name: last[name] for name in asdict(reloaded)}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_learning_rate_follows_the_schedule_in_a_run(tmp_path, kind):
    run = tmp_path / "run"
    train(tiny_run(run, epochs=1, warmup_steps=2, lr_scheduler=kind, adam_beta2=0.98, adam_epsilon=1e-6))
    lrs = [r["lr"] for r in records(run, "train")]
    assert lrs == [2e-3 * schedule_factor(k, warmup_steps=2, total_steps=6, kind=kind) for k in range(6)]
    groups = json.loads((run / "checkpoints" / "step-000006" / "trainer_state.json").read_text())["param_groups"]
    assert {(tuple(g["betas"]), g["eps"]) for g in groups} == {((0.9, 0.98), 1e-6)}


KNOBS = {"lr_scheduler": "cosine", "warmup_steps": 2, "adam_beta1": 0.8, "adam_epsilon": 1e-7,
         "config_overrides": "n_layers=1,hidden_dim=48"}


@pytest.mark.parametrize("knobs", [{}, KNOBS], ids=["defaults", "knobs"])
def test_resume_after_sigint_is_bit_exact(tmp_path, monkeypatch, knobs):
    train(tiny_run(tmp_path / "straight", **knobs))

    interrupt_after(monkeypatch, steps=7)
    first = train(tiny_run(tmp_path / "resumed", **knobs))
    assert first.status == "interrupted" and first.steps == 7
    assert first.checkpoint.endswith("step-000007")
    assert not (tmp_path / "resumed" / "model.safetensors").exists()  # no final model from an unfinished run
    monkeypatch.undo()

    second = train(tiny_run(tmp_path / "resumed", resume="latest", **knobs))
    assert second.status == "finished" and second.steps == 12
    config = json.loads((tmp_path / "resumed" / "config.json").read_text())
    assert (config["n_layers"], config["hidden_dim"]) == ((1, 48) if knobs else (2, 256))
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # Resumption continues the step count instead of replaying batches.
    assert [r["step"] for r in records(tmp_path / "resumed", "train")] == list(range(1, 13))


def test_a_stop_on_an_epochs_last_step_saves_before_its_eval_and_the_resume_scores_it(tmp_path, monkeypatch):
    # The epoch's evaluation ran between the stopped step and its checkpoint: a scheduler's SIGTERM waited a whole
    # evaluation for the save, longer than its grace period on a large eval set.
    train(tiny_run(tmp_path / "straight"))
    interrupt_after(monkeypatch, steps=6, signum=signal.SIGTERM)  # the last step of epoch 1
    assert train(tiny_run(tmp_path / "resumed")).checkpoint.endswith("step-000006")
    assert [r["step"] for r in records(tmp_path / "resumed", "eval")] == [0]
    monkeypatch.undo()
    train(tiny_run(tmp_path / "resumed", resume="latest"))
    evals = [[(r["label"], r["step"], r["perplexity"]) for r in records(tmp_path / run, "eval")]
             for run in ("straight", "resumed")]
    assert evals[0] == evals[1] and [label for label, _, _ in evals[0]] == ["before", "epoch 1", "epoch 2"]
    assert all(torch.equal(a, b) for a, b in zip(*(final_weights(tmp_path / run).values()
                                                    for run in ("straight", "resumed"))))


def test_a_resumed_run_logs_at_the_steps_an_uninterrupted_one_does(tmp_path, monkeypatch):
    # The log interval counted from the resume, so lines fell at 11 after a resume at 7 where the run logs at 8.
    train(tiny_run(tmp_path / "straight", log_every=4))
    interrupt_after(monkeypatch, steps=7)
    train(tiny_run(tmp_path / "resumed", log_every=4))
    monkeypatch.undo()
    train(tiny_run(tmp_path / "resumed", resume="latest", log_every=4))
    straight = [r["step"] for r in records(tmp_path / "straight", "train")]
    resumed = [r["step"] for r in records(tmp_path / "resumed", "train") if r["segment"] == 1]
    assert straight == [4, 6, 8, 12] and resumed == [8, 12]  # every 4th step, each epoch's end (6) and the last


def test_sigterm_also_checkpoints(tmp_path, monkeypatch):
    interrupt_after(monkeypatch, steps=3, signum=signal.SIGTERM)
    summary = train(tiny_run(tmp_path / "run"))
    assert summary.status == "interrupted"
    assert (tmp_path / "run" / "checkpoints" / "step-000003" / "trainer_state.json").is_file()


def test_masks_do_not_depend_on_dataloader_workers(tmp_path):
    train(tiny_run(tmp_path / "inline", epochs=1, prompts=()))
    train(tiny_run(tmp_path / "workers", epochs=1, prompts=(), num_workers=2))
    inline, workers = final_weights(tmp_path / "inline"), final_weights(tmp_path / "workers")
    assert all(torch.equal(inline[k], workers[k]) for k in inline)


def test_step_batches_share_the_global_batch_and_its_counts_between_processes():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 300, (10, 8), generator=generator).numpy()
    chunks = Chunks(input_ids=ids, word_ids=torch.arange(8).repeat(10, 1).numpy(), n_reviews=10, n_tokens=80)
    collator = MaskingCollator(mask_token_id=4, vocab_size=347, special_token_ids=(0, 1, 2, 3, 4), mlm_probability=0.3)
    steps = [[StepBatches(chunks, torch.arange(10), collator, batch_size=2, grad_accum=2, rank=rank, world_size=2,
                          seed=0, epoch=0)[step] for rank in (0, 1)] for step in (0, 1)]
    for items in steps:  # every process knows the same global counts, without a collective
        assert items[0].labelled == items[1].labelled and items[0].rows == items[1].rows
        everything = [batch for item in items for batch in item.micro_batches]
        assert items[0].labelled == sum(int((b["labels"] != -100).sum()) for b in everything) > 0
    # Step 0 holds 8 rows, 2 per micro-batch; the last step the 2 rows left, both process 0's: process 1 takes
    # one unlabelled row, so it still joins the step's gradient all-reduce, adding nothing.
    assert [len(b["input_ids"]) for b in steps[0][0].micro_batches + steps[0][1].micro_batches] == [2, 2, 2, 2]
    last = steps[1]
    assert last[0].rows == 2 and [len(b["input_ids"]) for b in last[0].micro_batches] == [2]
    assert [len(b["input_ids"]) for b in last[1].micro_batches] == [1]
    assert (last[1].micro_batches[0]["labels"] == -100).all()


def test_gradient_checkpointing_trains_the_same_model(tmp_path):
    # Dropout on: the recomputation in backward must redraw the forward's masks, or the weights would drift.
    train(tiny_run(tmp_path / "plain", epochs=1, prompts=()))
    train(tiny_run(tmp_path / "checkpointed", epochs=1, prompts=(), gradient_checkpointing=True))
    plain, checkpointed = final_weights(tmp_path / "plain"), final_weights(tmp_path / "checkpointed")
    for name in plain:
        # Same ops on the same values; backward may sum in another order (fp32 rounding, over 6 Adam steps).
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)


def test_gradient_accumulation_matches_the_large_batch(tmp_path, no_dropout_smoke_model):
    # Token-weighted micro-batch losses: two micro-batches of 8 give the gradient of one batch of 16. Dropout
    # off, since the two runs draw dropout masks in different shapes.
    common = dict(model=str(no_dropout_smoke_model), epochs=1, prompts=())
    train(tiny_run(tmp_path / "large", **common))
    train(tiny_run(tmp_path / "accumulated", batch_size=8, grad_accum=2, **common))
    large, accumulated = final_weights(tmp_path / "large"), final_weights(tmp_path / "accumulated")
    for name in large:
        # Same math in another summation order: fp32 rounding, amplified a little by 6 Adam steps at lr 2e-3.
        torch.testing.assert_close(accumulated[name], large[name], rtol=1e-4, atol=1e-5, msg=name)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}

    def poisoned_step(*args, **kwargs) -> StepResult:
        result = train_step(*args, **kwargs)
        calls["n"] += 1
        return replace(result, loss=result.loss * float("nan")) if calls["n"] >= 6 else result

    monkeypatch.setattr(mlm.train, "train_step", poisoned_step)
    with pytest.raises(MLMError, match=r"(?s)became nan by step 6.*last good checkpoint is .*step-000004"):
        train(tiny_run(tmp_path / "run"))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if not p.name.startswith(".")] == [
        "step-000004"]


def test_fp16_overflow_skips_the_step():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(5, 40, (2, 8))
    # A loss scale beyond fp32's range makes every scaled gradient inf, as an fp16 overflow would.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    result = train_step(model, [{"input_ids": ids, "labels": ids}], optimizer, labelled_in_step=16, scaler=scaler)
    assert int(result.ran) == 0 and scaler.get_scale() == 2.0**126
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_max_grad_norm_0_does_not_clip_as_the_courses_accelerate_loop():
    # The course's Accelerate loop never clips; `max_grad_norm` 0 was refused ("must be > 0").
    tiny_run(Path("run"), max_grad_norm=0.0).validate()
    with pytest.raises(MLMError, match="`max_grad_norm` must be >= 0"):
        tiny_run(Path("run"), max_grad_norm=-1.0).validate()
    ids = torch.randint(5, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    weights = []
    for limit in (0.0, 1e30, 1e-3):  # no limit, one never reached (the gradients scaled by exactly 1), a low one
        torch.manual_seed(0)
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient itself
        result = train_step(model, [{"input_ids": ids, "labels": ids}], optimizer, labelled_in_step=16,
                            max_grad_norm=limit)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert float(result.grad_norm) > 1e-3  # the norm before clipping, logged in every case
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


# ---------------------------------------------------------------- schedule and decay groups

def test_each_schedule_is_transformers_formula_at_every_step():
    """The formulas of transformers' get_linear/cosine/constant(_with_warmup)_schedule(_with_warmup), written out
    independently: warmup w, total n, step s."""
    w, n = 4, 23
    formulas = {
        "linear": lambda s: s / w if s < w else max(0.0, (n - s) / (n - w)),
        # num_cycles 0.5: cos(pi * 0.5 * 2.0 * progress)
        "cosine": lambda s: s / w if s < w else max(
            0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * ((s - w) / (n - w))))),
        "constant-with-warmup": lambda s: s / w if s < w else 1.0,
    }
    for kind, formula in formulas.items():
        assert [schedule_factor(s, warmup_steps=w, total_steps=n, kind=kind) for s in range(n + 2)] == [
            formula(s) for s in range(n + 2)], kind
    assert {schedule_factor(s, warmup_steps=0, total_steps=n, kind="constant") for s in range(n)} == {1.0}
    # Landmarks: cosine is half-way at the middle of the decay and 0 at its end
    assert schedule_factor(4 + 19 / 2, warmup_steps=4, total_steps=23, kind="cosine") == pytest.approx(0.5, abs=1e-15)
    assert schedule_factor(23, warmup_steps=4, total_steps=23, kind="cosine") == 0.0


def test_schedule_factor_matches_the_reference_values():
    assert 2e-5 * schedule_factor(2, warmup_steps=0, total_steps=10) == 1.6000000000000003e-05
    assert schedule_factor(0, warmup_steps=0, total_steps=10) == 1.0
    assert schedule_factor(9, warmup_steps=0, total_steps=10) == 0.1
    assert [schedule_factor(k, warmup_steps=4, total_steps=10) for k in (0, 2, 4, 7, 10, 12)] == [
        0.0, 0.5, 1.0, 0.5, 0.0, 0.0]


def test_weight_decay_groups_are_the_references():
    with torch.device("meta"):
        model = DistilBertForMaskedLM(DistilBertConfig())
    decay, no_decay = weight_decay_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {n for n, _ in model.named_parameters()
                       if n.endswith("weight") and "LayerNorm" not in n and "layer_norm" not in n}
    assert "distilbert.embeddings.word_embeddings.weight" in decayed  # the tied matrix, once
    assert "distilbert.embeddings.position_embeddings.weight" in decayed
    assert len(decay["params"]) == 2 + 6 * 6 + 1 and decay["weight_decay"] == 0.01
    assert all(n.endswith("bias") or "norm" in n.lower() for n in map(names.get, map(id, no_decay["params"])))
    assert no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == 66_985_530


# ---------------------------------------------------------------- configuration and command-line errors

@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 0, "`batch_size` must be an integer >= 1"),
    ("lr", -1.0, "`lr` must be in"),
    ("lr", float("nan"), "`lr` must be in"),
    ("epochs", 0, "`epochs` must be"),
    ("mlm_probability", 1.5, "`mlm_probability`"),
    ("masking", "span", "`masking`"),
    ("precision", "fp8", "`precision`"),
    ("lean", "yes", "`lean`"),
    ("lr_scheduler", "polynomial", "`lr_scheduler` must be linear or cosine or constant or constant-with-warmup"),
    ({"lr_scheduler": "constant", "warmup_steps": 10}, None, "use constant-with-warmup"),
    ("adam_beta2", 1.0, r"`adam_beta2` must be in \[0, 1\)"),
    ("adam_epsilon", 0.0, "`adam_epsilon` must be > 0"),
    ({"init": "pretrained", "config_overrides": "n_layers=1"}, None, "Add `init` random"),
])
def test_invalid_settings_are_refused(tmp_path, field, value, message):
    with pytest.raises(MLMError, match=message):
        tiny_run(tmp_path / "run", **(field if isinstance(field, dict) else {field: value})).validate()


@pytest.mark.parametrize("overrides, message", [
    ("n_layers", "'n_layers' is not KEY=VALUE"),
    ("num_hidden_layers=2", "'num_hidden_layers=2' is not KEY=VALUE with KEY a config.json key mlm reads: activation"),
    ("dim=30", "config.json with `config_overrides` dim=30: \"dim\" 30 is not divisible by \"n_heads\" 4: each head "
               "takes dim / n_heads features. Fix them in `config_overrides`."),  # it said "in config.json"
    ("dropout=abc", "\"dropout\" must be a probability in \\[0, 1\\), got 'abc'. Fix it in `config_overrides`."),
])
def test_bad_config_overrides_are_one_line(tmp_path, overrides, message):
    with pytest.raises(MLMError, match=message):
        train(tiny_run(tmp_path / "run", config_overrides=overrides))


@pytest.mark.parametrize("lean, expected", [("auto", True), ("on", True), ("off", False)])
def test_lean_setting_picks_the_model_variant_on_the_cpu(tmp_path, lean, expected):
    path = choose_path(tiny_run(tmp_path / "run", lean=lean), Processes())
    model = path.model(DistilBertForMaskedLM(DistilBertConfig(vocab_size=40, dim=16, n_layers=1, n_heads=2,
                                                              hidden_dim=32)))
    assert ("lean.py" in path.says) == expected  # the run's first lines say which model runs
    assert (type(model.distilbert.transformer.layer[0].attention) is LeanAttention) == expected
    assert list(model.state_dict()) == list(DistilBertForMaskedLM(model.config).state_dict())


def test_output_dir_with_another_run_needs_resume_or_overwrite(tmp_path):
    train(tiny_run(tmp_path / "run", epochs=1, prompts=()))
    with pytest.raises(MLMError, match="already holds a run.*finished.*`resume` latest.*`extend`.*`overwrite`"):
        train(tiny_run(tmp_path / "run", epochs=1))
    summary = train(tiny_run(tmp_path / "run", epochs=1, prompts=(), overwrite=True))
    assert summary.status == "finished" and len(records(tmp_path / "run", "eval")) == 2


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(MLMError, match="there is no run in .*run \\(no such folder\\)"):
        train(tiny_run(tmp_path / "run", resume="latest"))
    assert not (tmp_path / "run").exists()  # a folder the run made to lock is removed again
    (tmp_path / "run").mkdir()
    with pytest.raises(MLMError, match="no checkpoint in .*run/checkpoints"):
        train(tiny_run(tmp_path / "run", resume="latest"))


def run_script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    result = run_script("--smoke", "--lr", "5", "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: --lr must be in (0, 1)")
    assert "Traceback" not in result.stderr
    result = run_script("--model", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2 and "No such folder" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    result = run_script("--smoke", "--no-progress", "--output-dir", str(tmp_path / "smoke"),
                        "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "perplexity after" in result.stdout and "status                 finished" in result.stdout
    assert (tmp_path / "smoke" / "model.safetensors").is_file()
    fill = subprocess.run([sys.executable, str(ROOT / "scripts" / "fill_mask.py"), "--model", str(tmp_path / "smoke"),
                           "--json", "a great [MASK] ."], capture_output=True, text=True, timeout=120)
    assert fill.returncode == 0, fill.stderr
    assert len(json.loads(fill.stdout)["masks"][0]) == 5


def test_periodic_evals_and_the_last_step_is_evaluated_once(tmp_path, capsys):
    """--eval-every lands on the run's last step (--max-steps mid-epoch): one "final" eval there, not two."""
    run = tmp_path / "run"
    train(tiny_run(run, eval_every=4, max_steps=8))  # 6 steps an epoch
    evals = [(r["label"], r["step"]) for r in records(run, "eval")]
    assert evals == [("before", 0), ("step 4", 4), ("epoch 1", 6), ("final", 8)]
    # An eval every N steps is labelled by its step: its line said "[step 4] step 4:".
    said = [line.split(" perplexity")[0] for line in capsys.readouterr().out.splitlines() if " perplexity " in line]
    assert said[:4] == ["[before] step 0:", "[step 4]", "[epoch 1] step 6:", "[final] step 8:"]


def test_max_steps_overrides_the_epochs_as_the_reference_does(tmp_path):
    # As TrainingArguments.max_steps: that many steps, over as many epochs as they take. They were capped, silently,
    # at the steps of `epochs`.
    run = tmp_path / "run"
    assert train(tiny_run(run, epochs=1, max_steps=8)).steps == 8  # 6 steps an epoch
    assert [(r["label"], r["step"]) for r in records(run, "eval")] == [("before", 0), ("epoch 1", 6), ("final", 8)]
    assert "| trained for | 8 steps (max_steps; 1.33 epochs) |" in (run / "README.md").read_text()


def test_the_first_lines_count_the_chunks_a_step_takes(tmp_path, capsys):
    train(tiny_run(tmp_path / "run", train_size=8, epochs=1, prompts=()))  # batch 16
    assert "; 1 step of 8 chunks. Record:" in capsys.readouterr().out  # "of 16 chunks", with 8 chunks to train on


def test_a_draw_of_under_half_the_corpus_and_fp16_on_a_cpu_are_said_before_the_run(tmp_path, capsys):
    train(tiny_run(tmp_path / "few", train_size=16, epochs=1, max_steps=1, precision="fp16", prompts=()))
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    available = len(mlm.train.load_data(tiny_run(tmp_path / "x", train_size="all"), load_tokenizer(SMOKE),
                                        DistilBertForMaskedLM(load_config(SMOKE)))[0])
    assert notes == ["note: fp16 on a CPU has no fast kernels: its steps run several times slower than fp32's "
                     "(--precision fp32 is the fast one there, and bf16 too only on CPUs with native bf16; fp16 is "
                     "for GPUs without bf16).",
                     f"note: training on 16 of the {available:,} chunks the eval set leaves "
                     f"({16 / available:.0%}, --train-size 16); --train-size all trains on all of them."]
    train(tiny_run(tmp_path / "most", train_size=(available + 1) // 2, epochs=1, max_steps=1, prompts=()))
    assert "note: " not in capsys.readouterr().out
    # Eval chunks from a validation file leave the training data whole: it said "chunks the eval set leaves".
    lines = (SMOKE / "reviews.jsonl").read_text().splitlines(keepends=True)
    (validation := tmp_path / "validation.jsonl").write_text("".join(lines[:100]))
    train(tiny_run(tmp_path / "file", train_size=16, test_size=8, validation_file=str(validation), epochs=1,
                   max_steps=1, prompts=()))
    assert re.search(r"note: training on 16 of the [\d,]+ chunks of the training data \(", capsys.readouterr().out)
    train(tiny_run(tmp_path / "short", chunk_size=8, train_size=16, epochs=1, max_steps=1, prompts=()))
    assert "chunks the eval set leaves (under 1%, --train-size 16)" in capsys.readouterr().out  # it said "(0%"


def test_a_validation_split_left_unused_is_said(tmp_path, capsys):
    # train.jsonl beside validation.jsonl: the run held its eval chunks out of train, without a word of the other.
    data = tmp_path / "data"
    data.mkdir()
    lines = (SMOKE / "reviews.jsonl").read_text().splitlines(keepends=True)
    (data / "train.jsonl").write_text("".join(lines[:400]))
    (data / "validation.jsonl").write_text("".join(lines[400:]))
    train(tiny_run(tmp_path / "held-out", dataset=str(data), epochs=1, max_steps=1, prompts=()))
    note = ("note: data has a validation split, which this run leaves unused: its eval chunks are held out of the "
            "training chunks, as the course does. --eval-split validation scores on it instead.")
    assert note in capsys.readouterr().out
    for uses_it in (dict(eval_split="validation"), dict(train_splits=("train", "validation"))):
        train(tiny_run(tmp_path / "on-it", dataset=str(data), epochs=1, max_steps=1, prompts=(), overwrite=True,
                       **uses_it))
        assert "validation split" not in capsys.readouterr().out


def test_a_warmup_fraction_rounds_up_as_transformers_does():
    # TrainingArguments.get_warmup_steps takes math.ceil(total * fraction); round() gave 0 warmup steps for 0.05 of
    # 10 steps (the lr at its peak from the first step), and 47 instead of 48 for 0.1 of the course's 471.
    from mlm.optim import Schedule

    for total, fraction, wanted in ((10, 0.05, 1), (14, 0.1, 2), (64, 0.1, 7), (471, 0.1, 48), (100, 0.05, 5)):
        schedule = Schedule.of(total * 8, global_batch=8, epochs=1, max_steps=None, warmup_steps=fraction)
        assert (schedule.total_steps, schedule.warmup_steps) == (total, wanted)
