"""The CUDA path: numerics against the CPU and fp32, mixed precision, no host syncs, fused attention, compile,
resume and DDP. Marked `cuda`; skipped where torch sees no GPU (CI has none: scripts/gpu_check.sh runs them).

Each bound below is stated with where it comes from. Measured errors are attached to the test report
(`record_property`, visible in the JUnit XML that gpu_check.sh keeps), so a bound that is loose shows it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

import mlm.train
from mlm.evaluate import evaluate
from mlm.masking import mask_tokens, special_tokens_mask
from mlm.model import IGNORE_INDEX, DistilBertConfig, DistilBertForMaskedLM
from mlm.optim import lr_schedule, make_optimizer, set_learning_rate
from mlm.run.checkpoints import Progress
from mlm.run.processes import Processes
from mlm.speed.path import choose_path
from mlm.train import TrainConfig, train, train_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh runs these)"),
]

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"
CUDA = torch.device("cuda")
SPECIAL_IDS = (0, 100, 101, 102, 103)  # [PAD] [UNK] [CLS] [SEP] [MASK] of distilbert-base-uncased


def no_dropout(**sizes) -> DistilBertConfig:
    return DistilBertConfig(dropout=0.0, attention_dropout=0.0, **sizes)


SMALL = dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128)  # for compile and DDP: fast to build


def masked_batch(rows: int, length: int, vocab_size: int, seed: int) -> dict[str, torch.Tensor]:
    """Host tensors as the training loop hands them over: input_ids, labels (B, L) int64."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(104, vocab_size, (rows, length), generator=generator)
    ids[:, 0] = 101
    ids[:, -1] = 102
    input_ids, labels = mask_tokens(ids, special_tokens_mask(ids, SPECIAL_IDS), mask_token_id=103,
                                    vocab_size=vocab_size, generator=generator)
    return {"input_ids": input_ids, "labels": labels}


def labelled(batches: list[dict[str, torch.Tensor]]) -> int:
    return sum(int((batch["labels"] != IGNORE_INDEX).sum()) for batch in batches)


def run_step(model: nn.Module, optimizer, **settings):
    """The step a run takes on this GPU with these settings: train_step wrapped by the execution path
    (mlm/speed/path.py: host-side label positions, compile or CUDA graphs)."""
    config = TrainConfig(device="cuda", lean="off", **settings)
    path = choose_path(config, Processes(device=CUDA)).for_steps(1000)
    step, _ = path.training(train_step, model, optimizer, max_grad_norm=1.0)
    return step, path


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {name: tensor.to(device) for name, tensor in batch.items()}


def loss_and_grads(model: nn.Module, batch: dict, dtype: torch.dtype | None = None, scale: float = 1.0):
    """fp32 loss and the flat gradient of the (unscaled) loss, under autocast `dtype` if given."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(CUDA.type, dtype=dtype, enabled=dtype is not None):
        loss = model(batch["input_ids"], labels=batch["labels"]).loss
    (loss * scale).backward()
    grads = torch.cat([p.grad.reshape(-1) / scale for p in model.parameters()])
    return loss.detach(), grads


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


# ---------------------------------------------------------------------------------------------------------------
# Numerics


def test_full_size_fp32_on_cuda_equals_the_cpu(record_property):
    # fp32 really is fp32 on the GPU: TF32 matmuls (10-bit mantissa) would be ~1e-3 off, far outside the bound.
    assert not torch.backends.cuda.matmul.allow_tf32
    torch.manual_seed(0)
    cpu_model = DistilBertForMaskedLM(no_dropout())
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    batch = masked_batch(8, 128, cpu_model.config.vocab_size, seed=0)

    cpu_loss, cpu_grads = loss_and_grads(cpu_model, batch)
    cuda_loss, cuda_grads = loss_and_grads(cuda_model, to_device(batch, CUDA))
    with torch.no_grad():
        cpu_logits = cpu_model(batch["input_ids"]).logits
        cuda_logits = cuda_model(batch["input_ids"].to(CUDA)).logits.cpu()

    # Both sides compute in fp32 (unit roundoff 6e-8) with different blocking and summation orders. A dot product
    # of length K <= 3072 then differs by ~sqrt(K) * 6e-8 ~ 3e-6 relative; six post-LN blocks keep activations at
    # unit scale, so errors add up rather than grow: ~1e-5 expected, 1e-4 allowed (backward twice the depth).
    loss_error = abs(float(cuda_loss.cpu()) - float(cpu_loss)) / float(cpu_loss)
    logits_error = relative_error(cuda_logits, cpu_logits)
    grad_error = relative_error(cuda_grads.cpu(), cpu_grads)
    record_property("fp32_loss_relative_error", loss_error)
    record_property("fp32_logits_relative_error", logits_error)
    record_property("fp32_grad_relative_error", grad_error)
    assert loss_error < 1e-5
    assert logits_error < 1e-4
    assert grad_error < 1e-4


# bf16 keeps 8 mantissa bits (unit roundoff 2^-9 = 2e-3), fp16 11 (2^-12 = 2.4e-4). Matmuls accumulate in fp32,
# so each output carries about one rounding of its inputs; the loss (a softmax over fp32-accumulated logits) moves
# by about that relative amount, the gradient (products of several rounded factors, 6 blocks deep) by a few times
# it. Bounds: loss 5x the unit roundoff, gradient 25x, i.e. still far from a wrong gradient (relative error ~1).
@pytest.mark.parametrize("dtype, loss_bound, grad_bound", [
    (torch.bfloat16, 1e-2, 5e-2),
    (torch.float16, 1.2e-3, 6e-3),
])
def test_autocast_loss_and_gradients_stay_close_to_fp32(dtype, loss_bound, grad_bound, record_property):
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(no_dropout()).to(CUDA)
    batch = to_device(masked_batch(16, 128, model.config.vocab_size, seed=1), CUDA)
    fp32_loss, fp32_grads = loss_and_grads(model, batch)
    # fp16 needs the loss scaled as GradScaler would: unscaled, the per-token gradients (~1/N_labelled x 1/V)
    # fall below fp16's smallest normal number (6e-5) and flush to zero.
    scale = 2.0**16 if dtype == torch.float16 else 1.0
    loss, grads = loss_and_grads(model, batch, dtype, scale)
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    loss_error = abs(float(loss - fp32_loss)) / float(fp32_loss)
    grad_error = relative_error(grads, fp32_grads)
    record_property(f"{name}_loss_relative_error", loss_error)
    record_property(f"{name}_grad_relative_error", grad_error)
    assert loss.dtype == torch.float32  # the loss itself is computed in fp32 under autocast
    assert loss_error < loss_bound
    assert grad_error < grad_bound
    assert torch.isfinite(grads).all()


def test_evaluation_on_cuda_equals_the_cpu(record_property):
    torch.manual_seed(0)
    cpu_model = DistilBertForMaskedLM(no_dropout())
    cuda_model = copy.deepcopy(cpu_model).to(CUDA)
    batch = masked_batch(48, 128, cpu_model.config.vocab_size, seed=2)
    on_cpu = evaluate(cpu_model, batch["input_ids"], batch["labels"], batch_size=16)
    on_cuda = evaluate(cuda_model, batch["input_ids"], batch["labels"], batch_size=16)
    in_bf16 = evaluate(cuda_model, batch["input_ids"], batch["labels"], batch_size=16, autocast_dtype=torch.bfloat16)
    record_property("eval_fp32_loss_relative_error", abs(on_cuda.loss - on_cpu.loss) / on_cpu.loss)
    record_property("eval_bf16_loss_relative_error", abs(in_bf16.loss - on_cpu.loss) / on_cpu.loss)
    assert on_cuda.tokens == on_cpu.tokens and on_cuda.sequences == on_cpu.sequences
    # Same fp32 argument as the forward test above.
    assert on_cuda.loss == pytest.approx(on_cpu.loss, rel=1e-5)
    assert on_cuda.reference_loss == pytest.approx(on_cpu.reference_loss, rel=1e-5)
    # A random model's top-1 choices can sit within rounding of each other: allow a handful of flipped argmaxes.
    assert abs(on_cuda.accuracy - on_cpu.accuracy) * on_cpu.tokens <= 3
    assert in_bf16.loss == pytest.approx(on_cpu.loss, rel=1e-2)  # bf16 bound of the autocast test


# ---------------------------------------------------------------------------------------------------------------
# Mixed-precision steps


def test_fp16_overflow_skips_the_step_on_cuda():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(no_dropout(**SMALL)).to(CUDA)
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.01)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # 2^60 times a gradient of ~1e-6 is far beyond fp16's 65504: the backward overflows, as a real overflow would.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**60)
    batch = to_device(masked_batch(4, 32, SMALL["vocab_size"], seed=3), CUDA)
    result = train_step(model, [batch], optimizer, labelled_in_step=labelled([batch]), scaler=scaler,
                        autocast_dtype=torch.float16)
    assert int(result.ran) == 0
    assert scaler.get_scale() == 2.0**59  # halved by the default backoff factor
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Fused AdamW creates its state, then undoes the step for found-inf: step count 0, moments still zero.
    for state in optimizer.state.values():
        assert float(state["step"]) == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_fp16_overflowing_steps_do_not_advance_the_schedule(tmp_path, monkeypatch):
    class OverflowingScaler(torch.amp.GradScaler):
        def __init__(self, device: str = "cuda", **_):
            super().__init__(device, init_scale=2.0**60)

    # The run's GradScaler starts at 2^60, so each of its 3 steps overflows and is skipped.
    monkeypatch.setattr(torch.amp, "GradScaler", OverflowingScaler)
    run = tmp_path / "run"
    train(smoke_run(run, precision="fp16", max_steps=3, warmup_steps=2, save_every=3))
    steps = records(run, "train")
    assert [r["skipped"] for r in steps] == [1, 1, 1]  # one log line a step
    # With warmup 2 the factor would go 0, 1/2, 1: stuck at step 0 it stays 0 (lr 0) for every step.
    assert [r["lr"] for r in steps] == [0.0, 0.0, 0.0]
    state = json.loads((run / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["progress"]["global_step"] == 3 and state["progress"]["schedule_step"] == 0


def test_bf16_step_makes_no_host_sync_and_attention_runs_a_fused_kernel(record_property):
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig()).to(CUDA).train()  # dropout on, as in training
    optimizer = make_optimizer(model, lr=2e-5, weight_decay=0.01)
    host_batches = [{k: v.pin_memory() for k, v in masked_batch(16, 128, 30522, seed=s).items()} for s in range(4)]
    run_path_step, _ = run_step(model, optimizer, precision="bf16", cuda_graphs="off")

    def step(batch: dict):  # what the training loop does per step
        return run_path_step([batch], labelled_in_step=labelled([batch]))

    step(host_batches[0])  # first call: cuBLAS handles, optimizer state, allocator growth
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call (.item(), nonzero, D2H copy) raises
    try:
        step(host_batches[1])
        step(host_batches[2])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        step(host_batches[3])
        torch.cuda.synchronize()
    names = {event.key for event in profile.key_averages()}
    # SDPA's fused kernels, by the aten op that launched them: flash, memory-efficient or cuDNN's fused attention
    # (a flash-attention implementation, which torch prefers on Hopper GPUs); never the unfused math path.
    fused = re.compile(r"_scaled_dot_product_(flash|efficient|cudnn)_attention", re.IGNORECASE)
    forward = sorted(n for n in names if fused.search(n) and "backward" not in n)
    backward = sorted(n for n in names if fused.search(n) and "backward" in n)
    kernels = sorted(n for n in names if re.search(r"flash|fmha|attention|sdpa", n, re.IGNORECASE)
                     and not n.startswith("aten::"))
    record_property("attention_ops", "; ".join(forward + backward))
    record_property("attention_kernels", "; ".join(k[:100] for k in kernels))
    assert forward and backward, sorted(n for n in names if "attention" in n.lower())
    assert not any("_scaled_dot_product_attention_math" in n for n in names)


def test_fp16_steps_make_no_host_sync_and_skip_on_the_device():
    """The course's fp16: GradScaler + fused AdamW + the schedule counted and looked up on the device
    (mlm/speed/amp.py), the loop's own lines, with no synchronising call in a step, a skipped one included."""
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig()).to(CUDA).train()
    optimizer = make_optimizer(model, lr=2e-5, weight_decay=0.01)
    step, path = run_step(model, optimizer, precision="fp16", cuda_graphs="off")
    learning_rate = path.learning_rate(lr_schedule(2e-5, warmup_steps=0, total_steps=10), 10)
    progress = Progress()
    host_batches = [{k: v.pin_memory() for k, v in masked_batch(16, 128, 30522, seed=s).items()} for s in range(4)]
    poison = {"on": False}
    model.distilbert.embeddings.word_embeddings.weight.register_hook(
        lambda grad: grad * float("inf") if poison["on"] else grad)

    lrs = []

    def loop_step(batch: dict):  # the lines of mlm/train.py fit for one fp16 step
        lrs.append(learning_rate(progress.schedule_step))
        set_learning_rate(optimizer, lrs[-1])
        result = step([batch], labelled_in_step=labelled([batch]))
        progress.advance(ran=result.ran, steps_in_epoch=10)
        return result

    loop_step(host_batches[0])  # first call: cuBLAS handles, optimizer state, the scaler's tensors
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call (.item(), get_scale(), D2H copy) raises
    try:
        poison["on"] = True
        skipped = loop_step(host_batches[1]).ran
        poison["on"] = False
        ran = loop_step(host_batches[2]).ran
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(skipped) == 0 and int(ran) == 1
    assert int(progress.schedule_step) == 2  # 3 steps, the poisoned one not counted
    assert float(lrs[-1]) == pytest.approx(2e-5 * (9 / 10), rel=1e-7)  # schedule step 1 of 10: the fp32 lr


def test_compile_recompiles_at_most_once_as_the_labelled_count_changes(record_property):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(**SMALL)).to(CUDA).train()
    optimizer = make_optimizer(model, lr=1e-3, weight_decay=0.01)
    step, _ = run_step(model, optimizer, precision="bf16", compile=True, cuda_graphs="off")
    counts = []
    for seed in range(5):  # 15% of 8x64 tokens masked at random: a different labelled count almost every step
        host = masked_batch(8, 64, SMALL["vocab_size"], seed=10 + seed)
        counts.append(labelled([host]))
        result = step([host], labelled_in_step=counts[-1])
        assert torch.isfinite(result.loss)
    assert len(set(counts)) >= 3
    assert not counters["graph_break"], dict(counters["graph_break"])
    # The first step compiles for its labelled count; at the second, dynamo's automatic dynamic shapes make that
    # dimension dynamic: one recompile, then one graph serves every count.
    record_property("compiled_graphs", counters["stats"]["unique_graphs"])
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------
# Runs: resume and DDP


def smoke_run(output_dir: Path, **overrides) -> TrainConfig:
    # 96 train chunks / batch 16 = 6 steps per epoch, 12 in all; dropout on, so resume must restore the CUDA RNG.
    values = dict(model=str(SMOKE), init="random", dataset=str(SMOKE / "reviews.jsonl"), chunk_size=32,
                  train_size=96, test_size=32, batch_size=16, eval_batch_size=16, lr=2e-3, epochs=2,
                  log_every=1, save_every=4, keep_checkpoints=2, output_dir=str(output_dir),
                  cache_dir=str(output_dir.parent / "cache"), progress_bar=False, prompts=("a great [MASK] .",),
                  device="cuda", precision="fp32")
    return TrainConfig(**{**values, **overrides})


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_checkpoint_written_on_cuda_resumes_the_same_loss_curve(tmp_path, monkeypatch):
    straight = train(smoke_run(tmp_path / "straight"))
    assert straight.status == "finished"

    calls = {"n": 0}
    real_step = mlm.train.train_step

    def step_then_sigint(*args, **kwargs):
        result = real_step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(mlm.train, "train_step", step_then_sigint)
    first = train(smoke_run(tmp_path / "resumed"))
    assert first.status == "interrupted" and first.steps == 5
    tensors = load_file(Path(first.checkpoint) / "optimizer.safetensors")
    assert "rng.rank0.cuda" in tensors  # the CUDA generator (dropout) travels with the checkpoint
    monkeypatch.undo()
    second = train(smoke_run(tmp_path / "resumed", resume="latest"))
    assert second.status == "finished" and second.steps == 12

    expected = {r["step"]: r["loss"] for r in records(tmp_path / "straight", "train")}
    resumed = {r["step"]: r["loss"] for r in records(tmp_path / "resumed", "train")}
    assert sorted(resumed) == sorted(expected)
    # Same data, masks, dropout draws and kernels; fp32 on both sides. Only the order of atomic adds in some
    # backward kernels may differ between runs (~1e-7 relative per step), hence a tolerance instead of equality.
    for step in range(6, 13):
        assert resumed[step] == pytest.approx(expected[step], rel=1e-4), step
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_over_nccl_trains_like_the_plain_model(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = DistilBertForMaskedLM(no_dropout(**SMALL)).to(CUDA)
        wrapped = nn.parallel.DistributedDataParallel(copy.deepcopy(plain), device_ids=[CUDA.index or 0])
        optimizers = [make_optimizer(m, lr=1e-3, weight_decay=0.01) for m in (plain, wrapped.module)]
        for step in range(3):
            # Two micro-batches: the first backward runs under no_sync, the second all-reduces.
            micro = [to_device(masked_batch(4, 32, SMALL["vocab_size"], seed=20 + 2 * step + i), CUDA)
                     for i in range(2)]
            for model, optimizer in zip((plain, wrapped), optimizers):
                train_step(model, micro, optimizer, labelled_in_step=labelled(micro))
        for (name, a), b in zip(plain.named_parameters(), wrapped.module.parameters()):
            # One process: the all-reduce averages a single copy, so only summation order can differ.
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name
    finally:
        dist.destroy_process_group()


def test_cuda_graphs_run_trains_like_the_eager_run(tmp_path, no_dropout_smoke_model):
    # Dropout off, so both runs draw nothing at random after the masks; fp32, so only summation order differs
    # (graph replay vs eager launches, padded label rows in the matmuls): ~1e-6 per step, 1e-3 allowed.
    common = dict(model=str(no_dropout_smoke_model), log_every=1)
    eager = train(smoke_run(tmp_path / "eager", **common))
    graphs = train(smoke_run(tmp_path / "graphs", cuda_graphs="on", **common))
    assert eager.status == graphs.status == "finished"
    expected = [r["loss"] for r in records(tmp_path / "eager", "train")]
    got = [r["loss"] for r in records(tmp_path / "graphs", "train")]
    assert got == pytest.approx(expected, rel=1e-3)
    assert graphs.after.loss == pytest.approx(eager.after.loss, rel=1e-3)
