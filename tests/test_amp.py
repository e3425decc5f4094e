"""fp16 without host reads (mlm/speed/amp.py), the execution path a run takes (mlm/speed/path.py), and evaluation
through the compiled module. All on the CPU: a GradScaler("cpu") drives the same fused AdamW found_inf path as on a
GPU, and overflows are forced by injecting inf gradients."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import mlm.train
from mlm.cli.train import build_parser
from mlm.errors import MLMError
from mlm.evaluate import evaluate
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.optim import lr_schedule, make_optimizer, schedule_factor, set_learning_rate
from mlm.run.checkpoints import Progress
from mlm.run.processes import Processes
from mlm.settings import TrainConfig
from mlm.speed.amp import lr_on_device
from mlm.speed.compiled import AtPositions, PositionsFromLabels
from mlm.speed.path import GRAPHS_MIN_STEPS, choose_path
from mlm.train import train, train_step

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"
TINY = dict(vocab_size=40, dim=16, n_layers=1, n_heads=2, hidden_dim=32, dropout=0.0, attention_dropout=0.0)


def batch(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (4, 12), generator=generator)
    labels = torch.where(torch.rand(4, 12, generator=generator) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]  # at least one labelled token
    return {"input_ids": ids, "labels": labels}


class Poison:
    """Makes the gradients of the chosen steps inf during backward, as an fp16 overflow would: the scaler sees
    them when it unscales."""

    def __init__(self, model: torch.nn.Module, steps: set[int]):
        self.step, self.steps = 0, steps
        next(model.parameters()).register_hook(lambda grad: grad * float("inf") if self.step in self.steps else grad)


def reference_fp16_steps(model, batches, skip: set[int], *, warmup: int, total: int):
    """What the reference Trainer does with fp16 (reference-behaviour.md: step order, LR schedule): scaled
    backward, unscale, clip at 1.0, scaler.step (skipped on inf), scaler.update, LambdaLR stepped only when the
    optimizer step was not skipped (accelerate tells by the scale having shrunk), zero_grad."""
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: k / max(1, warmup) if k < warmup else max(0.0, (total - k) / max(1, total - warmup)))
    scaler = torch.amp.GradScaler("cpu")
    poison = Poison(model, skip)
    lrs = []
    for step, b in enumerate(batches):
        poison.step = step
        lrs.append(optimizer.param_groups[0]["lr"])
        scaler.scale(model(b["input_ids"], labels=b["labels"]).loss).backward()
        scaler.unscale_(optimizer)
        # The reference clips model.parameters(); train_step sums the same squares in the optimizer's group order,
        # which rounds the norm differently in the last bit. Same order here, so that any difference is the skip's.
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], 1.0)
        before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        if not scaler.get_scale() < before:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer, scheduler, scaler, lrs


def mlm_fp16_steps(model, batches, skip: set[int], *, warmup: int, total: int):
    """The same steps through mlm: the loop's lines, with the schedule counted and looked up on the device."""
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.01)
    learning_rate = lr_on_device(lr_schedule(1e-3, warmup_steps=warmup, total_steps=total), total, torch.device("cpu"))
    progress = Progress()
    scaler = torch.amp.GradScaler("cpu")
    poison = Poison(model, skip)
    lrs, ran = [], []
    for step, b in enumerate(batches):
        poison.step = step
        lr = learning_rate(progress.schedule_step)
        set_learning_rate(optimizer, lr)
        labelled = int((b["labels"] != -100).sum())
        result = train_step(model, [b], optimizer, labelled_in_step=labelled, scaler=scaler)
        assert isinstance(result.ran, torch.Tensor) and isinstance(lr, torch.Tensor)  # no host read
        progress.advance(ran=result.ran, steps_in_epoch=len(batches))
        lrs.append(float(lr))
        ran.append(int(result.ran))
    return optimizer, progress, scaler, lrs, ran


def test_overflowing_fp16_steps_leave_weights_adamw_state_and_schedule_as_the_reference_does():
    batches = [batch(seed) for seed in range(6)]
    skip = {0, 3}  # the first step overflows (as with the initial scale of 65536 it often does), and one later
    torch.manual_seed(0)
    reference_model = DistilBertForMaskedLM(DistilBertConfig(**TINY))
    mlm_model = DistilBertForMaskedLM(DistilBertConfig(**TINY))
    mlm_model.load_state_dict(reference_model.state_dict())

    ref_opt, scheduler, ref_scaler, ref_lrs = reference_fp16_steps(reference_model, batches, skip, warmup=2, total=6)
    opt, progress, scaler, lrs, skipped = mlm_fp16_steps(mlm_model, batches, skip, warmup=2, total=6)

    assert skipped == [0, 1, 1, 0, 1, 1]  # whether each step ran
    assert int(progress.schedule_step) == scheduler.last_epoch == 4  # the two skipped steps did not count
    assert lrs == ref_lrs == [0.0, 0.0, 5e-4, 1e-3, 1e-3, 1e-3 * 3 / 4]  # bit for bit, the lr of each step
    assert scaler.state_dict() == ref_scaler.state_dict()
    for (name, ours), theirs in zip(mlm_model.state_dict().items(), reference_model.state_dict().values()):
        assert torch.equal(ours, theirs), name
    for ours, theirs in zip(opt.state_dict()["state"].values(), ref_opt.state_dict()["state"].values()):
        assert float(ours["step"]) == float(theirs["step"]) == 4  # AdamW's count: only the steps that ran
        assert torch.equal(ours["exp_avg"], theirs["exp_avg"]) and torch.equal(ours["exp_avg_sq"], theirs["exp_avg_sq"])


def test_a_skipped_fp16_step_changes_nothing():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(**TINY))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    opt, progress, scaler, lrs, skipped = mlm_fp16_steps(model, [batch(0)], {0}, warmup=0, total=5)
    assert skipped == [0] and int(progress.schedule_step) == 0 and lrs == [1e-3]
    assert scaler.get_scale() == 2.0**15  # halved from 2^16
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    for state in opt.state.values():  # fused AdamW made its state, then undid the step: count 0, moments zero
        assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 10), (4, 471), (0, 471), (7, 9)])
def test_the_device_schedule_gives_the_host_floats_bit_for_bit(warmup, total):
    host = lr_schedule(2e-5, warmup_steps=warmup, total_steps=total)
    device = lr_on_device(host, total, torch.device("cpu"))
    for k in range(total + 1):
        expected = 2e-5 * schedule_factor(k, warmup_steps=warmup, total_steps=total)
        assert host(k) == float(device(k)) == float(device(torch.tensor(k))) == expected


class PoisonedScaler(torch.amp.GradScaler):
    """The run's GradScaler, with inf gradients injected at the chosen steps (1-based), before it checks them."""

    skip = {1, 3}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def unscale_(self, optimizer):
        self.calls += 1
        if self.calls in self.skip:
            optimizer.param_groups[0]["params"][0].grad.fill_(float("inf"))
        super().unscale_(optimizer)


@pytest.mark.slow
def test_fp16_run_logs_and_checkpoints_the_schedule_of_the_steps_that_ran(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", PoisonedScaler)
    run = tmp_path / "run"
    config = TrainConfig(model=str(SMOKE), init="random", dataset=str(SMOKE / "reviews.jsonl"), chunk_size=32,
                         train_size=80, test_size=16, batch_size=16, eval_batch_size=16, lr=1e-3, epochs=1,
                         warmup_steps=2, log_every=2, save_every=3, precision="fp16", device="cpu", lean="off",
                         output_dir=str(run), cache_dir=str(tmp_path / "cache"), progress_bar=False, prompts=())
    train(config)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in lines if r["kind"] == "train"]
    # 5 steps, the 1st and 3rd skipped: the schedule steps used are 0, 0, 1, 1, 2 (warmup 2, total 5), so the lr
    # is 0, 0, lr/2, lr/2, lr; logs at steps 2 and 4 (every 2) and 5 (the end), each with its interval's skips.
    assert [(r["step"], r["lr"], r["skipped"]) for r in logs] == [(2, 0.0, 1), (4, 5e-4, 1), (5, 1e-3, 0)]
    states = {p.name: json.loads((p / "trainer_state.json").read_text())["progress"]
              for p in (run / "checkpoints").iterdir() if p.name.startswith("step-")}
    assert states["step-000005"]["global_step"] == 5 and states["step-000005"]["schedule_step"] == 3


# ---------------------------------------------------------------------------------------------------------------
# Which path the steps take


def gpu_path(**overrides):
    """The execution path a one-GPU run would take (built on the CPU: only the decision is tested)."""
    path = choose_path(TrainConfig(device="cpu", lean="off"), Processes())
    return replace(path, **{"device": torch.device("cuda"), **overrides})


def test_cuda_graphs_auto_runs_graphs_on_one_gpu_for_long_runs_only():
    long, short = GRAPHS_MIN_STEPS, GRAPHS_MIN_STEPS - 1
    path = gpu_path().for_steps(long)
    assert path.graphs and not path.compile and "CUDA graphs" in path.says
    path = gpu_path().for_steps(short)
    assert not path.graphs and f"{short} steps are too few" in path.says
    assert gpu_path(graphs_asked="on").for_steps(short).graphs  # on forces them
    assert not gpu_path(graphs_asked="off").for_steps(long).graphs


@pytest.mark.parametrize("where, says", [
    (dict(device=torch.device("cpu")), "need a CUDA GPU"),
    (dict(world_size=2), "under torchrun"),
    (dict(grad_accum=2), "`grad_accum`"),
])
def test_cuda_graphs_auto_falls_back_in_one_stated_line_and_on_refuses(where, says):
    path = gpu_path(**where).for_steps(10 * GRAPHS_MIN_STEPS)
    assert not path.graphs and not path.compile and says in path.says and "\n" not in path.says
    assert gpu_path(compile=True, **where).for_steps(10 * GRAPHS_MIN_STEPS).compile  # --compile still applies
    with pytest.raises(MLMError, match=says):
        gpu_path(graphs_asked="on", **where).for_steps(10)


def test_the_cuda_graphs_flag(tmp_path):
    parse = build_parser().parse_args
    assert parse([]).cuda_graphs == "auto" == TrainConfig().cuda_graphs
    assert parse(["--cuda-graphs"]).cuda_graphs == "on"  # the flag alone means on
    assert parse(["--cuda-graphs", "off"]).cuda_graphs == "off"
    with pytest.raises(MLMError, match="`cuda_graphs` must be"):
        TrainConfig(cuda_graphs="sometimes").validate()


def test_the_run_says_which_path_its_steps_take(tmp_path):
    config = TrainConfig(model=str(SMOKE), init="random", dataset=str(SMOKE / "reviews.jsonl"), chunk_size=32,
                         train_size=32, test_size=16, batch_size=16, epochs=1, device="cpu", progress_bar=False,
                         output_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), prompts=())
    setup = mlm.train.set_up(config, Processes())
    assert setup.path.says.endswith("steps run eager: CUDA graphs need a CUDA GPU (--cuda-graphs auto)")
    assert setup.eval_model is setup.model and not setup.path.graphs


# ---------------------------------------------------------------------------------------------------------------
# Evaluation on the training step's path


def eval_set(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (10, 16), generator=generator)
    labels = torch.where(torch.rand(10, 16, generator=generator) < 0.2, ids, torch.full_like(ids, -100))
    return ids, labels


def test_padded_label_positions_score_the_same_tokens():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(**TINY))
    ids, labels = eval_set()
    plain = evaluate(model, ids, labels, batch_size=4)
    # What evaluation through CUDA graphs calls: the positions padded to a multiple of 256 (here uncompiled).
    padded = evaluate(PositionsFromLabels(model, AtPositions(model), graphs=True), ids, labels, batch_size=4)
    assert (padded.tokens, padded.sequences, padded.accuracy) == (plain.tokens, plain.sequences, plain.accuracy)
    assert padded.loss == pytest.approx(plain.loss, rel=1e-6)  # the same terms, summed in another order
    assert padded.reference_loss == pytest.approx(plain.reference_loss, rel=1e-6)


@pytest.mark.slow
def test_eval_through_the_compiled_module_equals_eager():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(**TINY))
    ids, labels = eval_set()
    eager = evaluate(model, ids, labels, batch_size=5)
    compiled = evaluate(torch.compile(model), ids, labels, batch_size=5)
    assert (compiled.tokens, compiled.sequences, compiled.accuracy) == (eager.tokens, eager.sequences, eager.accuracy)
    assert compiled.loss == pytest.approx(eager.loss, rel=1e-5)  # fused kernels round differently
    assert compiled.reference_loss == pytest.approx(eager.reference_loss, rel=1e-5)


@pytest.mark.parametrize("graphs", [False, True])
def test_the_gpu_step_with_host_positions_trains_like_the_plain_step(graphs):
    """On a GPU the step calls AtPositions with positions found on the host (padded under CUDA graphs): run here on
    the CPU, the same weights as the plain step, up to the rounding of matmuls over more rows."""
    from functools import partial

    from mlm.speed.compiled import with_host_positions

    torch.manual_seed(0)
    plain = DistilBertForMaskedLM(DistilBertConfig(**TINY))
    wrapped = DistilBertForMaskedLM(DistilBertConfig(**TINY))
    wrapped.load_state_dict(plain.state_dict())
    optimizers = [make_optimizer(model, lr=1e-3, weight_decay=0.01) for model in (plain, wrapped)]
    gpu_step = with_host_positions(partial(train_step, AtPositions(wrapped), optimizer=optimizers[1]), graphs=graphs)
    for seed in range(3):
        micro = [batch(seed)]
        count = int((micro[0]["labels"] != -100).sum())
        ours = train_step(plain, micro, optimizers[0], labelled_in_step=count)
        theirs = gpu_step(micro, labelled_in_step=count)
        assert float(theirs.loss) == pytest.approx(float(ours.loss), rel=1e-6)
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
