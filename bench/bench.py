"""Benchmark mlm against the reference (transformers), in the same run: model, train, eval, data, masking.

    python bench/bench.py [--sections model,train,eval,data,masking] [--device cpu|cuda] [--batch-size 16]
        [--seq-len 128] [--steps N] [--warmup N] [--precision fp32|bf16|fp16] [--compile] [--no-reference] [--json]

Sections (each figure is measured next to its reference in the same run; ratio = ours / reference):

- model    forward+backward of the full-size random model on one B x L batch: our sparse MLM head (vocabulary
           projection at the ~15% labelled positions only) vs our model projecting every position followed by
           F.cross_entropy(ignore_index=-100) over the (B, L, V) logits, as the reference does.
- train    one training step (forward, backward, clip to 1.0, AdamW step, zero_grad): mlm's model + make_optimizer +
           train_step (also with gradient checkpointing) vs transformers.DistilBertForMaskedLM (random init, sdpa)
           + torch.optim.AdamW with the Trainer's decay groups and its default fused kernel. Tokens/s, peak memory
           and model-FLOPs utilisation.
- eval     no-grad forward with labels over a few batches: mlm.evaluate.evaluate vs a plain loop over the reference.
- data     bench/bench_data.py (tokenize + chunk IMDb train vs the course's group_texts pipeline).
- masking  bench/bench_masking.py (our masking vs DataCollatorForLanguageModeling / the course's wwm collator).

Train figures come from a fresh process per configuration (see train_probe): ours keeps freed memory for
reuse as scripts/train.py does on the CPU (mlm/speed/host_memory.py), the reference runs with glibc's defaults as the
course does, and once more with ours' settings. Peak memory: on CPU the resident-set high-water mark (VmHWM)
growth over building the model and optimizer and training, also with M_MMAP_THRESHOLD pinned to 1 MiB, where
the RSS follows the live tensors; the model section resets VmHWM through /proc/self/clear_refs in-process. On
CUDA torch.cuda.max_memory_allocated growth.
transformers is only imported here (lazily); without it the reference columns stay empty and a note says why.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mlm.chunks import Chunks
from mlm.errors import MLMError
from mlm.evaluate import evaluate
from mlm.files.families import CONFIG_KEYS
from mlm.files.pretrained import config_from_dict, load_config
from mlm.masking import MaskingCollator, mask_tokens, special_tokens_mask
from mlm.model import IGNORE_INDEX, DistilBertConfig, DistilBertForMaskedLM
from mlm.optim import make_optimizer, set_learning_rate
from mlm.run.metrics import flops_per_token
from mlm.run.processes import Processes
from mlm.settings import TrainConfig
from mlm.speed.host_memory import keep_freed_memory
from mlm.speed.path import ExecutionPath, choose_path
from mlm.tokenizer import load_tokenizer
from mlm.train import StepBatches, epoch_order, train_step

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = "distilbert-base-uncased"  # Hub ids, or local folders with their layout
DEFAULT_DATASET_DIR = "stanfordnlp/imdb"
SECTIONS = ("model", "train", "eval", "data", "masking")
LR, WEIGHT_DECAY, MAX_GRAD_NORM = 2e-5, 0.01, 1.0  # the course's hyper-parameters
MIB = 2**20
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # None = no autocast


# ---------------------------------------------------------------------------------------------------------------
# Set-up shared by the sections.


@dataclass
class Bench:
    args: argparse.Namespace
    device: torch.device
    config: DistilBertConfig
    ours_dtype: torch.dtype | None  # autocast dtype, None = fp32
    reference_dtype: torch.dtype | None
    special_ids: tuple[int, ...]  # from the tokenizer: never masked
    mask_id: int
    cls_id: int
    sep_id: int
    first_word_id: int  # random ids are drawn from [first_word_id, vocab_size): past specials and [unusedN]
    input_ids: torch.Tensor | None = None  # (B, L) int64 on the device, masked as the collator would
    labels: torch.Tensor | None = None  # (B, L) int64 on the device, -100 at ~85% of positions
    notes: list[str] = field(default_factory=list)
    ceilings: dict = field(default_factory=dict)  # matmul FLOP/s per dtype, measured once
    figures: dict = field(default_factory=dict)  # per-configuration figures, for --json

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def labelled_fraction(self) -> float:
        return float((self.labels != IGNORE_INDEX).float().mean())


def random_chunks(bench: Bench, rows: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """(rows, length) int64 random word ids, [CLS] first and ~2% [SEP] (reviews ending mid-chunk)."""
    ids = torch.randint(bench.first_word_id, bench.config.vocab_size, (rows, length), generator=generator)
    ids[:, 0] = bench.cls_id
    ids[torch.rand(rows, length, generator=generator) < 0.02] = bench.sep_id
    return ids


def masked_batch(bench: Bench, rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with [CLS]/[SEP] sprinkled in, masked 15% / 80-10-10 exactly as the reference collator does.

    The content does not matter for speed; only the labelled count does (it sizes our sparse head's matmul).
    """
    generator = torch.Generator().manual_seed(seed)
    ids = random_chunks(bench, rows, length, generator)
    return mask_tokens(ids, special_tokens_mask(ids, bench.special_ids), mask_token_id=bench.mask_id,
                       vocab_size=bench.config.vocab_size, generator=generator)


def import_transformers():
    """The transformers module, or None (with --no-reference, or when it is not installed)."""
    try:
        return importlib.import_module("transformers")
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# Measuring: time, peak memory, matmul ceiling.


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(step, *, steps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `step()` over `steps` calls after `warmup` untimed ones (first-call allocations,
    oneDNN/cuBLAS heuristics, torch.compile). The device is synchronised around each timed call."""
    for _ in range(warmup):
        step()
    return statistics.median(seconds_of(step, device) for _ in range(steps))


def seconds_of(step, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    # glibc keeps freed heap pages mapped; without trimming, the next configuration's "RSS before" would include
    # the previous one's garbage and its delta would come out too small.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


class PeakMemory:
    """`with PeakMemory(device) as mem:` ... then mem.delta_mib / mem.peak_mib for the code inside."""

    def __init__(self, device: torch.device):
        self.device = device
        self.delta_mib = self.peak_mib = float("nan")
        self.exact = True  # False when the high-water mark could not be reset (then it is the process's peak)

    def __enter__(self) -> PeakMemory:
        free_memory(self.device)
        if self.device.type == "cuda":
            synchronize(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.before = (_proc_status_kib("VmRSS") or 0) * 1024
            try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.exact = False
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kib("VmHWM")
            if hwm is None:
                return
            peak = hwm * 1024
        self.peak_mib = peak / MIB
        self.delta_mib = (peak - self.before) / MIB


def matmul_ceiling(bench: Bench, dtype: torch.dtype | None) -> float:
    """Best FLOP/s of a large square matmul on this device and dtype: the denominator of MFU.

    2048^3 fp32 on CPU (fits the caches' blocking well, ~0.1-0.3 s on 2 cores), 8192^3 on CUDA in the autocast
    dtype (fp32 there runs in whatever precision torch's matmul settings allow, as the model's fp32 run does)."""
    dtype = dtype or torch.float32
    if dtype in bench.ceilings:
        return bench.ceilings[dtype]
    cuda = bench.device.type == "cuda"
    n, repeats = (8192, 20) if cuda else (2048, 6)
    a = torch.randn(n, n, device=bench.device).to(dtype)
    b = torch.randn(n, n, device=bench.device).to(dtype)
    best = math.inf
    for i in range(repeats + 2):
        synchronize(bench.device)
        start = time.perf_counter()
        a @ b
        synchronize(bench.device)
        if i >= 2:  # two warm-ups
            best = min(best, time.perf_counter() - start)
    del a, b
    bench.ceilings[dtype] = 2 * n**3 / best
    return bench.ceilings[dtype]


# ---------------------------------------------------------------------------------------------------------------
# Models and steps.


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def maybe_compile(model: nn.Module, bench: Bench) -> nn.Module:
    return torch.compile(model) if bench.args.compile else model


def ours_path(bench: Bench, *, graphs: bool | None = None) -> ExecutionPath:
    """The execution path train.py takes with these settings (mlm/speed/path.py): precision, lean modules (on the
    CPU unless --lean says otherwise), compile or CUDA graphs."""
    precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[bench.ours_dtype]
    graphs = bench.args.cuda_graphs if graphs is None else graphs
    config = TrainConfig(device=str(bench.device), precision=precision, lean=bench.args.lean,
                         compile=bench.args.compile, cuda_graphs="on" if graphs else "off", keep_freed_memory=False)
    return choose_path(config, Processes(device=bench.device)).for_steps(10**6)


def build_ours(bench: Bench, path: ExecutionPath | None = None) -> DistilBertForMaskedLM:
    """As train.py builds it: the model of mlm/model.py through the execution path (lean modules on the CPU)."""
    torch.manual_seed(0)
    return (path or ours_path(bench)).model(DistilBertForMaskedLM(bench.config)).train()


def build_reference(bench: Bench, transformers) -> nn.Module:
    """transformers' *ForMaskedLM of the config's family with the same config values, random init, default (sdpa)
    attention."""
    c = bench.config
    config = transformers.AutoConfig.for_model(
        c.family, **{key: getattr(c, name) for name, key in CONFIG_KEYS[c.family].items()})
    torch.manual_seed(0)
    return transformers.AutoModelForMaskedLM.from_config(config).to(bench.device).train()


def reference_optimizer(model: nn.Module, device: torch.device) -> torch.optim.AdamW:
    """What Trainer builds (docs/reference.md#optimizer-schedule): adamw_torch_fused, decay on everything but biases and
    LayerNorm parameters, with its own name rule (Trainer.get_decay_parameter_names)."""
    from transformers.trainer_pt_utils import get_parameter_names

    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [nn.LayerNorm], patterns))
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if n in decay], "weight_decay": WEIGHT_DECAY},
        {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
    ]
    # fused=True is the Trainer's default on every device since torch 2.8 (CPU included).
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, fused=True)


def scaler_for(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    return torch.amp.GradScaler(device.type) if dtype == torch.float16 else None


# ---------------------------------------------------------------------------------------------------------------
# Sections: each returns a list of rows {"section", "figure", "ours", "reference", "ratio"}.


def row(section: str, figure: str, ours, reference=None) -> dict:
    ratio = None
    if isinstance(ours, (int, float)) and isinstance(reference, (int, float)) and reference:
        ratio = ours / reference
    return {"section": section, "figure": figure, "ours": ours, "reference": reference, "ratio": ratio}


def section_model(bench: Bench, transformers) -> list[dict]:
    """Sparse head vs full projection, same model, same batch. Memory is the step's (activations + gradients):
    the model is built before the measurement window and the gradients are freed after every step."""
    device, dtype, args = bench.device, bench.ours_dtype, bench.args
    model = build_ours(bench)
    compiled = maybe_compile(model, bench)
    scaler = scaler_for(device, dtype)
    vocab = bench.config.vocab_size

    def backward(loss: torch.Tensor) -> None:
        (scaler.scale(loss) if scaler is not None else loss).backward()
        model.zero_grad(set_to_none=True)

    def sparse() -> None:
        with autocast(device, dtype):
            loss = compiled(bench.input_ids, labels=bench.labels).loss
        backward(loss)

    def full() -> None:
        with autocast(device, dtype):
            logits = compiled(bench.input_ids).logits  # (B, L, V)
            loss = F.cross_entropy(logits.view(-1, vocab).float(), bench.labels.view(-1), ignore_index=IGNORE_INDEX)
        backward(loss)

    # Memory: each configuration in its own window, which also serves as its warm-up. Time: the two alternate
    # step by step, so neither is favoured by going first or by load from other processes drifting over time.
    configs = {"sparse": sparse, "full": full}
    memory = {}
    for name, step in configs.items():
        with PeakMemory(device) as memory[name]:
            for _ in range(max(args.warmup, 1)):
                step()
    times = {name: [] for name in configs}
    for _ in range(args.steps):
        for name, step in configs.items():
            times[name].append(seconds_of(step, device))
    s_sec, f_sec = (statistics.median(times[name]) for name in configs)
    s_mem, f_mem = memory["sparse"], memory["full"]
    bench.notes.append(
        "model: ours = sparse head (projection at the labelled positions only), reference = the same model "
        f"projecting all {bench.tokens} positions + F.cross_entropy over (B, L, V) logits; labelled fraction "
        f"{bench.labelled_fraction:.3f}.")
    return [
        row("model", "fwd+bwd time, ms", s_sec * 1e3, f_sec * 1e3),
        row("model", "fwd+bwd delta peak mem, MiB", s_mem.delta_mib, f_mem.delta_mib),
        row("model", "fwd+bwd abs peak mem, MiB", s_mem.peak_mib, f_mem.peak_mib),
    ]


TRAIN_CONFIGS = ("ours", "ours-checkpointed", "reference")  # ours-checkpointed: with gradient checkpointing


def training_batches(bench: Bench, steps: int) -> StepBatches:
    """`steps` optimizer steps of B x L chunks, masked per step as scripts/train.py masks them (StepBatches).

    Each step draws its own masks, so the labelled count (which sizes the sparse head) changes every step as in
    a real run: a benchmark on one fixed batch would hide recompiles and shape-dependent kernel choices.
    """
    rows, length = bench.args.batch_size * steps, bench.args.seq_len
    ids = random_chunks(bench, rows, length, torch.Generator().manual_seed(0))
    # Word ids only matter for whole-word masking; every token its own word here.
    word_ids = torch.arange(length).expand(rows, length)
    chunks = Chunks(ids.int().numpy(), word_ids.int().numpy(), n_reviews=rows, n_tokens=rows * length)
    collator = MaskingCollator(mask_token_id=bench.mask_id, vocab_size=bench.config.vocab_size,
                               special_token_ids=bench.special_ids)
    return StepBatches(chunks, epoch_order(rows, 0, 0), collator, batch_size=bench.args.batch_size, grad_accum=1,
                       rank=0, world_size=1, seed=0, epoch=0)


def timed_windows(step, *, steps: int, warmup: int, windows: int, device: torch.device) -> float:
    """Seconds per step: the median over `windows` runs of `steps` consecutive calls, after `warmup` calls.

    The device is synchronised only at the edges of a window, as a training run only waits at its log steps:
    timing each step on its own would add a host sync per step and hide how well the CPU runs ahead.
    """
    for _ in range(warmup):
        step()
    per_window = []
    for _ in range(windows):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        per_window.append((time.perf_counter() - start) / steps)
    return statistics.median(per_window)


def _train_config(bench: Bench, which: str, transformers) -> tuple[float, PeakMemory, float]:
    """(seconds per step, peak memory of building model + optimizer and training, labelled fraction seen).

    Ours runs the training loop's own per-step path: StepBatches through a DataLoader (masking on the host,
    pinned memory), the learning-rate update and train_step as the execution path wraps it (mlm/speed/path.py: on a
    GPU host-side label positions and non-blocking copies, compile or CUDA graphs).
    The reference gets the same masked batches, already collated and pinned (its collator's cost not counted),
    and runs the Trainer's step: autocast forward with an all-ones attention mask, GradScaler for fp16, unscale,
    clip to 1.0, fused AdamW, zero_grad.
    """
    device, args = bench.device, bench.args
    cuda = device.type == "cuda"
    windows = 3 if cuda else 1
    total = args.warmup + windows * args.steps + args.profile
    batches = training_batches(bench, total)
    loader = iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=0, pin_memory=cuda))
    labelled = []

    with PeakMemory(device) as mem:
        if which in ("ours", "ours-checkpointed"):
            path = ours_path(bench)
            model = build_ours(bench, path)
            model.distilbert.gradient_checkpointing = which == "ours-checkpointed"
            optimizer = make_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)
            run_step, _ = path.training(train_step, model, optimizer, max_grad_norm=MAX_GRAD_NORM)

            def step() -> None:
                micro_cpu, labelled_in_step, _ = next(loader)
                labelled.append(labelled_in_step)
                set_learning_rate(optimizer, LR)
                run_step(micro_cpu, labelled_in_step=labelled_in_step)
        else:
            model = build_reference(bench, transformers)
            optimizer = reference_optimizer(model, device)
            compiled = maybe_compile(model, bench)
            scaler = scaler_for(device, bench.reference_dtype)
            host = []
            for micro_cpu, labelled_in_step, _ in loader:  # the course's rows carry an all-ones attention mask
                batch = {"input_ids": micro_cpu[0]["input_ids"], "labels": micro_cpu[0]["labels"],
                         "attention_mask": torch.ones_like(micro_cpu[0]["input_ids"])}
                host.append({k: v.pin_memory() if cuda else v for k, v in batch.items()})
                labelled.append(labelled_in_step)
            host_batches = iter(host)

            def step() -> None:  # Trainer's order (docs/reference.md#optimizer-schedule)
                batch = {k: v.to(device, non_blocking=True) for k, v in next(host_batches).items()}
                with autocast(device, bench.reference_dtype):
                    loss = compiled(**batch).loss
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                else:
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        seconds = timed_windows(step, steps=args.steps, warmup=args.warmup, windows=windows, device=device)
    if args.profile:
        bench.figures["profile"] = profile_steps(step, args.profile, seconds, device)
    fraction = sum(labelled) / (len(labelled) * args.batch_size * args.seq_len)
    return seconds, mem, fraction  # the model and optimizer die with this frame; the next PeakMemory collects them


def profile_steps(step, steps: int, seconds_per_step: float, device: torch.device) -> dict:
    """Where a step's time goes: GPU kernel time per step against the (unprofiled) wall time per step, kernel
    launches per step, and the kernels that take the most time. busy << wall means the GPU waits for the host
    (launch overhead, Python); busy ~ wall means the kernels themselves set the pace."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]

    def device_us(event) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)

    busy_ms = sum(device_us(e) for e in kernels) / 1e3 / steps
    top = sorted(kernels, key=device_us, reverse=True)[:15]
    cpu_ops = sorted((e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
    return {
        "wall_ms_per_step": seconds_per_step * 1e3,
        "gpu_busy_ms_per_step": busy_ms,
        "gpu_busy_fraction": busy_ms / (seconds_per_step * 1e3),
        "kernels_per_step": sum(e.count for e in kernels) / steps,
        "top_kernels": [{"name": e.key[:120], "ms_per_step": device_us(e) / 1e3 / steps,
                         "calls_per_step": e.count / steps} for e in top],
        "top_cpu_ops": [{"name": e.key[:80], "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
                        for e in cpu_ops],
    }


# The allocator settings a train run is measured under (CPU; on CUDA they change nothing that is measured):
# "kept": mlm.speed.host_memory.keep_freed_memory, as scripts/train.py runs on the CPU; "default": glibc untouched, as
# the reference is run; "pinned": M_MMAP_THRESHOLD pinned to 1 MiB, so every larger tensor is its own mapping,
# unmapped when freed, and the RSS follows the live tensors (the CPU analogue of max_memory_allocated).
MALLOC_MODES = ("kept", "default", "pinned")


def train_probe(bench: Bench, which: str, malloc: str, *, steps: int, warmup: int, precision: str | None = None,
                compile: bool | None = None, lean: str | None = None, profile: int = 0,
                cudagraphs: bool = False) -> dict | None:
    """Step seconds, peak memory growth (MiB) and labelled fraction of one train configuration, in a fresh process.

    A fresh process per figure: glibc's settings are process-wide and cannot be undone; in a shared process the
    heap pages one configuration leaves behind are reused by the next without growing the RSS, which would make
    whatever runs second look leaner; and each torch.compile starts from an empty cache. `precision` and
    `compile` default to the command line's.
    """
    args = bench.args
    precision = precision if precision is not None else args.precision
    compile = args.compile if compile is None else compile
    command = [sys.executable, str(Path(__file__).resolve()), "--train-probe", which, "--malloc", malloc,
               "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--model-dir", args.model_dir,
               "--family", args.family,
               "--steps", str(steps), "--warmup", str(warmup + (2 if compile and not args.compile else 0)),
               "--device", args.device]
    command += ["--precision", precision] if precision else []
    command += ["--compile"] if compile else []
    command += ["--lean", lean or args.lean, "--profile", str(profile)] + (["--cuda-graphs"] if cudagraphs else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MIB)) if malloc == "pinned" else None  # read at startup
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        bench.notes.append(f"train: {which} ({precision}, compile={compile}) timed out after {PROBE_TIMEOUT} s")
        return None
    if done.returncode != 0:
        bench.notes.append(f"train: {which} ({malloc} malloc, {precision}, compile={compile}) failed: "
                           f"{done.stderr.strip().splitlines()[-3:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def train_probe_main(args: argparse.Namespace) -> int:
    """The child side of train_probe: one configuration, its figures as JSON on the last line of stdout."""
    if args.malloc == "kept":
        keep_freed_memory()
    bench = make_bench(args)
    transformers = import_transformers() if args.train_probe == "reference" else None
    seconds, memory, fraction = _train_config(bench, args.train_probe, transformers)
    print(json.dumps({"seconds": seconds, "delta_mib": memory.delta_mib, "peak_mib": memory.peak_mib,
                      "labelled_fraction": fraction, **bench.figures}))
    return 0


def executed_flops_per_token(bench: Bench, which: str, labelled_fraction: float) -> float:
    """Model FLOPs per token that `which` executes: the reference runs the last block and the head at every
    position, ours at the labelled ones only. Counting the reference's FLOPs for both would credit our skipped work
    as utilisation."""
    if which == "reference":
        return flops_per_token(bench.config, bench.args.seq_len, 1.0)
    return flops_per_token(bench.config, bench.args.seq_len, labelled_fraction)


PROBE_TIMEOUT = 240  # seconds for one train configuration, compiling included

# CUDA: ours in both autocast dtypes, eager and compiled; the reference as the course's Trainer runs it (fp16 +
# GradScaler) and in bf16. (key, which, precision, compile)
PROFILED = ("ours-bf16", "ours-bf16-compiled", "reference-fp16")  # 10 more steps under torch.profiler
CUDA_TRAIN_RUNS = (
    ("ours-bf16", "ours", "bf16", False),
    ("ours-bf16-compiled", "ours", "bf16", True),
    ("ours-fp16", "ours", "fp16", False),
    ("ours-fp16-compiled", "ours", "fp16", True),
    ("ours-bf16-lean", "ours", "bf16", False),  # --lean on: mlm/speed/lean.py's techniques on the GPU too
    ("reference-fp16", "reference", "fp16", False),
    ("reference-bf16", "reference", "bf16", False),
    ("ours-bf16-cudagraphs", "ours", "bf16", True),  # train.py's default on one GPU for a course-length run
    ("ours-fp16-cudagraphs", "ours", "fp16", True),  # the same with the course's fp16 + GradScaler
)


def section_train_cuda(bench: Bench, transformers) -> list[dict]:
    args = bench.args
    figures = {}
    for key, which, precision, compiled in CUDA_TRAIN_RUNS:
        if (which == "reference" and transformers is None) or (args.train_configs and key not in args.train_configs):
            continue
        figures[key] = train_probe(bench, which, "default", steps=args.steps, warmup=args.warmup,
                                   precision=precision, compile=compiled, lean="on" if key.endswith("lean") else None,
                                   profile=10 if key in PROFILED else 0, cudagraphs=key.endswith("cudagraphs"))
        # Also under --json: on stderr, so that a run cut short still leaves each finished figure in its log.
        print(f"[train: {key} done] {json.dumps(figures[key])}", file=sys.stderr, flush=True)
    tokens_per_step = args.batch_size * args.seq_len
    tps = {k: tokens_per_step / f["seconds"] for k, f in figures.items() if f}
    if not any(key.startswith("ours") for key in tps):
        raise SystemExit("train: our training runs failed: " + "; ".join(bench.notes))
    ceiling = matmul_ceiling(bench, torch.bfloat16)  # MFU is against the bf16 ceiling, whatever the dtype

    def mfu(key: str) -> float | None:
        if key not in tps:
            return None
        which = "reference" if key.startswith("reference") else "ours"
        flops = executed_flops_per_token(bench, which, figures[key]["labelled_fraction"])
        return 100 * flops * tps[key] / ceiling

    def memory(key: str) -> float | None:
        return figures[key]["delta_mib"] if figures.get(key) else None

    rows = []
    for ours in ("ours-bf16", "ours-bf16-compiled", "ours-fp16", "ours-fp16-compiled"):
        for reference in ("reference-fp16", "reference-bf16"):
            rows.append(row("train", f"tokens/s, {ours} vs {reference}", tps.get(ours), tps.get(reference)))
    for key in ("ours-bf16", "ours-bf16-compiled", "ours-fp16", "ours-fp16-compiled"):
        rows.append(row("train", f"MFU % (bf16 ceiling), {key} vs reference-fp16", mfu(key), mfu("reference-fp16")))
    rows.append(row("train", "MFU % (bf16 ceiling), reference-bf16", None, mfu("reference-bf16")))
    rows.append(row("train", "tokens/s, ours-bf16-lean vs reference-bf16", tps.get("ours-bf16-lean"),
                    tps.get("reference-bf16")))
    for ours in ("ours-bf16-cudagraphs", "ours-fp16-cudagraphs"):
        for reference in ("reference-fp16", "reference-bf16"):
            rows.append(row("train", f"tokens/s, {ours} vs {reference}", tps.get(ours), tps.get(reference)))
        rows.append(row("train", f"MFU % (bf16 ceiling), {ours} vs reference-fp16", mfu(ours), mfu("reference-fp16")))
    for ours, reference in (("ours-bf16", "reference-fp16"), ("ours-bf16", "reference-bf16"),
                            ("ours-bf16-compiled", "reference-bf16"), ("ours-fp16", "reference-fp16"),
                            ("ours-bf16-lean", "reference-bf16")):
        rows.append(row("train", f"peak memory growth MiB, {ours} vs {reference}", memory(ours), memory(reference)))
    for key in PROFILED:
        found = (figures.get(key) or {}).get("profile")
        if found:
            rows += [row("profile", f"{key}: wall ms/step (timed)", found["wall_ms_per_step"]),
                     row("profile", f"{key}: GPU busy ms/step", found["gpu_busy_ms_per_step"]),
                     row("profile", f"{key}: kernels/step", found["kernels_per_step"])]
    fraction = next(f["labelled_fraction"] for k, f in figures.items() if f and k.startswith("ours"))
    bench.notes.append(
        "profile: 10 more steps under torch.profiler after the timed ones; GPU busy = summed kernel time per step, "
        "wall = the unprofiled timed step. Busy well below wall: the GPU waits for the host (Python, launches).")
    bench.notes.append(
        f"train: {args.batch_size}x{args.seq_len}, each configuration in a fresh process; seconds per step = median "
        f"of 3 windows of {args.steps} steps after {args.warmup} warm-up steps (+2 when compiled), the GPU "
        "synchronised only at window edges. Ours runs scripts/train.py's per-step path (StepBatches masking through "
        "a DataLoader, pinned memory, non-blocking copies, train_step); masks change every step. MFU = executed "
        "model FLOPs x "
        f"tokens/s / bf16 ceiling {ceiling / 1e12:.1f} TFLOP/s (best 8192^3 bf16 matmul of this run); FLOPs per "
        f"token: ours {executed_flops_per_token(bench, 'ours', fraction) / 1e9:.3f} G (labelled fraction "
        f"{fraction:.3f}), reference {executed_flops_per_token(bench, 'reference', 1.0) / 1e9:.3f} G. Memory = "
        "torch.cuda.max_memory_allocated growth over building model + optimizer and all steps.")
    bench.figures["train"] = {k: {**f, "tokens_per_second": tps.get(k), "mfu_percent": mfu(k)}
                              for k, f in figures.items() if f}
    bench.figures["bf16_matmul_tflops"] = ceiling / 1e12
    return rows


def section_train(bench: Bench, transformers) -> list[dict]:
    if bench.device.type == "cuda":
        return section_train_cuda(bench, transformers)
    args = bench.args
    timed, memory_only = dict(steps=args.steps, warmup=args.warmup), dict(steps=2, warmup=1)
    # Ours as scripts/train.py runs on the CPU (keeping freed memory), the reference as the course runs, and
    # once more with our malloc settings; then both with the RSS following live tensors only.
    runs = {"ours": ("ours", "kept", timed), "ours-checkpointed": ("ours-checkpointed", "kept", timed)}
    if transformers is not None:
        runs["reference"] = ("reference", "default", timed)
        runs["reference-kept"] = ("reference", "kept", timed)
    for which in [w for w in TRAIN_CONFIGS if w != "reference" or transformers is not None]:
        runs[f"{which}-live"] = (which, "pinned", memory_only)
    figures = {}
    for key, (which, malloc, counts) in runs.items():
        figures[key] = train_probe(bench, which, malloc, **counts)
        if not args.json:
            print(f"[train: {key} done]", file=sys.stderr, flush=True)

    def get(key: str, name: str) -> float | None:
        return figures[key][name] if figures.get(key) else None

    ours_s, ref_s = get("ours", "seconds"), get("reference", "seconds")
    if ours_s is None:
        raise SystemExit("train: our training run failed: " + "; ".join(bench.notes))
    fraction = get("ours", "labelled_fraction")
    ref_flops = executed_flops_per_token(bench, "reference", 1.0)
    ours_flops = executed_flops_per_token(bench, "ours", fraction)
    tps = {key: bench.tokens / get(key, "seconds") if get(key, "seconds") else None for key in figures}
    ours_tps, ref_tps = tps["ours"], tps.get("reference")
    ceiling = matmul_ceiling(bench, bench.ours_dtype)
    ours_mfu = ours_flops * ours_tps / ceiling
    ref_mfu = ref_flops * ref_tps / matmul_ceiling(bench, bench.reference_dtype) if ref_tps else None
    bench.notes.append(
        f"train: MFU = executed model FLOPs per token x tokens/s / matmul ceiling: {ours_flops / 1e9:.3f} GFLOP/token "
        f"for ours (labelled fraction {fraction:.3f}: head and last block at labelled positions only), "
        f"{ref_flops / 1e9:.3f} for the reference (every position); ceiling {ceiling / 1e12:.3f} TFLOP/s (best "
        "2048^3 matmul of this run). Seconds per step: one window of --steps steps through the training loop's "
        "per-step path, masks changing every step.")
    bench.notes.append(
        "train: every configuration runs in a fresh process (see train_probe). Ours keeps freed memory for reuse "
        "(mlm/speed/host_memory.py, as scripts/train.py does on the CPU); the reference runs with glibc's defaults, as "
        "the course does, and once more with ours' settings. Memory = peak RSS growth over building the model "
        "and optimizer plus the steps (params + grads + AdamW state + activations + allocator slack); 'live' pins "
        "M_MMAP_THRESHOLD to 1 MiB in both, so the RSS follows the live tensors: the CPU counterpart of CUDA's "
        "max_memory_allocated.")
    bench.figures["train"] = {k: {**f, "tokens_per_second": tps.get(k)} for k, f in figures.items() if f}
    return [
        row("train", "step time, ms", ours_s * 1e3, ref_s * 1e3 if ref_s else None),
        row("train", "tokens/s (higher is better)", ours_tps, ref_tps),
        row("train", "MFU % (model FLOPs each executes)", 100 * ours_mfu, 100 * ref_mfu if ref_mfu else None),
        row("train", "tokens/s, gradient checkpointing", tps["ours-checkpointed"], ref_tps),
        row("train", "tokens/s, reference with ours' malloc settings", ours_tps, tps.get("reference-kept")),
        row("train", "peak RSS growth, MiB", get("ours", "delta_mib"), get("reference", "delta_mib")),
        row("train", "peak RSS growth, MiB, gradient checkpointing", get("ours-checkpointed", "delta_mib"),
            get("reference", "delta_mib")),
        row("train", "peak RSS growth, MiB, reference with ours' malloc settings", get("ours", "delta_mib"),
            get("reference-kept", "delta_mib")),
        row("train", "peak RSS growth, MiB, live tensors", get("ours-live", "delta_mib"),
            get("reference-live", "delta_mib")),
        row("train", "peak RSS growth, MiB, live tensors, gradient checkpointing",
            get("ours-checkpointed-live", "delta_mib"), get("reference-live", "delta_mib")),
    ]


def section_eval(bench: Bench, transformers) -> list[dict]:
    """Eval throughput: `eval_batches` batches of B x L, inputs on the host and moved per batch, as both loops do."""
    device, args = bench.device, bench.args
    n_rows = args.batch_size * args.eval_batches
    input_ids, labels = masked_batch(bench, n_rows, args.seq_len, seed=1)
    warm_ids, warm_labels = input_ids[: args.batch_size], labels[: args.batch_size]

    def run(which: str) -> tuple[float, PeakMemory]:
        with PeakMemory(device) as mem:
            if which == "ours-graphs":  # as train.py evaluates on its default GPU path (mlm/speed/path.py)
                path = ours_path(bench, graphs=True)
                model = build_ours(bench, path)
                _, eval_model = path.training(train_step, model, make_optimizer(model, lr=LR, weight_decay=0.0),
                                              max_grad_norm=MAX_GRAD_NORM)

                def score(ids, lab) -> None:
                    evaluate(eval_model, ids, lab, batch_size=args.batch_size, autocast_dtype=bench.ours_dtype)
            elif which == "ours":
                model = build_ours(bench)
                compiled = maybe_compile(model, bench)

                def score(ids, lab) -> None:
                    evaluate(compiled, ids, lab, batch_size=args.batch_size, autocast_dtype=bench.ours_dtype)
            else:
                model = build_reference(bench, transformers)
                compiled = maybe_compile(model, bench)

                @torch.no_grad()
                def score(ids, lab) -> None:  # Trainer's prediction loop with prediction_loss_only, stripped
                    compiled.eval()
                    total = torch.zeros((), device=device)
                    for start in range(0, len(ids), args.batch_size):
                        batch_ids = ids[start : start + args.batch_size].to(device)
                        with autocast(device, bench.reference_dtype):
                            out = compiled(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids),
                                           labels=lab[start : start + args.batch_size].to(device))
                        total += out.loss.detach().float()
                    total.item()

            for _ in range(max(args.warmup, 1)):  # one batch is enough to warm the kernels up
                score(warm_ids, warm_labels)
            if which == "ours-graphs":  # one graph per padded label count: record each before timing
                score(input_ids, labels)
            seconds = median_seconds(lambda: score(input_ids, labels), steps=1, warmup=0, device=device)
        return seconds, mem

    ours_s, ours_mem = run("ours")
    ref_s = ref_mem = graphs_s = None
    if transformers is not None:
        ref_s, ref_mem = run("reference")
    if device.type == "cuda":
        graphs_s, _ = run("ours-graphs")
    tokens = n_rows * args.seq_len
    bench.notes.append(f"eval: one timed pass over {args.eval_batches} batches of {args.batch_size}x{args.seq_len} "
                       f"after {max(args.warmup, 1)} one-batch warm-up(s); ours = mlm.evaluate.evaluate "
                       "(also computes top-1 accuracy), reference = no_grad loop summing the loss.")
    return [
        row("eval", "tokens/s (higher is better)", tokens / ours_s, tokens / ref_s if ref_s else None),
        row("eval", "tokens/s, ours with CUDA graphs (train.py's default GPU path)",
            tokens / graphs_s if graphs_s else None, tokens / ref_s if ref_s else None),
        row("eval", "delta peak mem, MiB", ours_mem.delta_mib, ref_mem.delta_mib if ref_mem else None),
    ]


def section_data(bench: Bench, transformers) -> list[dict]:
    """bench/bench_data.py: its 'reference' is the course's tokenize + group_texts pipeline (no transformers)."""
    try:
        bench_data = importlib.import_module("bench_data").bench_data
    except Exception as err:  # missing, or broken while someone edits it: skip, do not lose the other sections
        bench.notes.append(f"data: skipped, bench/bench_data.py could not be imported ({type(err).__name__}: {err})")
        return []
    kwargs = {"verbose": False} if "verbose" in inspect.signature(bench_data).parameters else {}
    with PeakMemory(bench.device):  # only to reset the high-water mark that its ru_maxrss figures read
        try:
            d = bench_data(bench.args.dataset_dir, bench.args.model_dir, **kwargs)
        except Exception as err:
            bench.notes.append(f"data: skipped, bench_data failed ({type(err).__name__}: {err})")
            return []
    rows = []
    for figure, ours, ref in (
        ("IMDb train tokenize+chunk, s", "ours_tokenize_chunk_s", "reference_s"),
        ("same, ours group_size=1000, s", "ours_group1000_s", "reference_s"),
        ("ours vs tokenizer alone (ref col = bare encode_batch), s", "ours_tokenize_chunk_s", "bare_encode_batch_s"),
        ("load_chunks cold, s", "load_chunks_cold_s", None),
        ("load_chunks cached, s", "load_chunks_cached_s", None),
    ):
        if ours in d:
            rows.append(row("data", figure, d[ours], d.get(ref) if ref else None))
    if "peak_rss_after_ours_mb" in d and "peak_rss_before_mb" in d:
        rows.append(row("data", "ours delta peak RSS, MiB", d["peak_rss_after_ours_mb"] - d["peak_rss_before_mb"]))
    if "group1000_identical_to_reference" in d:
        bench.notes.append(f"data: {d.get('reviews')} reviews, {d.get('tokens')} tokens; group_size=1000 chunks "
                           f"identical to the reference's: {d['group1000_identical_to_reference']}.")
    if not rows:  # an unexpected layout: show the numbers as they come
        rows = [row("data", key, value) for key, value in d.items() if isinstance(value, (int, float))]
    return rows


def section_masking(bench: Bench, transformers) -> list[dict]:
    """bench/bench_masking.py on one 64x128 batch (one torch thread, median over --masking-repeats calls)."""
    try:
        bench_masking = importlib.import_module("bench_masking").bench_masking
    except Exception as err:
        bench.notes.append(f"masking: skipped, bench/bench_masking.py could not be imported ({err})")
        return []
    d = bench_masking(bench.args.model_dir, bench.args.masking_repeats)
    ref = d.get("reference_collator_ms")
    course = d.get("course_wwm_collator_net_ms")
    if isinstance(d.get("reference"), str):
        bench.notes.append(f"masking: reference {d['reference']}")
    bench.notes.append(f"masking: {d.get('batch')} batch from {d.get('data')}; reference = "
                       "DataCollatorForLanguageModeling on dict rows / the course's whole-word collator "
                       "(its per-call list copy subtracted).")
    return [
        row("masking", "mask_tokens, ms/batch", d["mask_tokens_ms"], ref),
        row("masking", "MaskingCollator tokens, ms/batch", d["collator_tokens_ms"], ref),
        row("masking", "mask_whole_words, ms/batch", d["mask_whole_words_ms"], course),
        row("masking", "MaskingCollator whole words, ms/batch", d["collator_whole_words_ms"], course),
    ]


SECTION_FUNCTIONS = {"model": section_model, "train": section_train, "eval": section_eval, "data": section_data,
                     "masking": section_masking}


# ---------------------------------------------------------------------------------------------------------------
# Output.


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def print_table(rows: list[dict]) -> None:
    header = ("section", "figure", "ours", "reference", "ratio")
    cells = [header] + [(r["section"], r["figure"], fmt(r["ours"]), fmt(r["reference"]),
                         f"{r['ratio']:.3f}" if r["ratio"] is not None else "-") for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for index, line in enumerate(cells):
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if index == 0:
            print("  ".join("-" * w for w in widths))


# ---------------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark mlm against the reference implementation, in the same run.",
        epilog="ratio = ours / reference (below 1 is better for times and memory, above 1 for tokens/s and MFU).")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="device for model/train/eval")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch, B (default 16)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, L (default 128)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per configuration, median reported (default: 5 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed warm-up steps per configuration (default: 2 on CPU, 5 on CUDA; 2 more with "
                             "--compile)")
    parser.add_argument("--eval-batches", type=int, default=8, help="batches in the timed eval pass (default 8)")
    parser.add_argument("--masking-repeats", type=int, default=200, help="calls per masking figure (default 200)")
    parser.add_argument("--family", choices=("distilbert", *BASE_CONFIGS), default="distilbert",
                        help="distilbert: --model-dir's config; bert, roberta: the sizes of bert-base-uncased or "
                             "roberta-base, random init")
    parser.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR),
                        help="folder with config.json (model size) and the tokenizer; if missing, the built-in "
                             "distilbert-base-uncased config is used (default: %(default)s)")
    parser.add_argument("--dataset-dir", default=str(DEFAULT_DATASET_DIR),
                        help="stanfordnlp/imdb in the Hub layout, for the data section (default: %(default)s)")
    parser.add_argument("--precision", choices=tuple(DTYPES), default=None,
                        help="autocast precision for ours AND the reference (fp16 adds a GradScaler). Default: fp32 "
                             "on CPU; on CUDA bf16 for ours (fp16 if bf16 is unsupported) and fp16 + GradScaler "
                             "for the reference, as the course trains")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (warm-up covers compiling)")
    parser.add_argument("--lean", choices=("auto", "on", "off"), default="auto",
                        help="mlm/speed/lean.py's techniques for ours: auto = as train.py (CPU only) (default: auto)")
    parser.add_argument("--profile", type=int, default=0, help=argparse.SUPPRESS)  # profiled steps (train probes)
    parser.add_argument("--train-configs", type=lambda text: [k for k in text.split(",") if k], default=None,
                        help="CUDA: only these train configurations (default: all of "
                             + ",".join(key for key, *_ in CUDA_TRAIN_RUNS) + ")")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="CUDA only: ours compiled with CUDA graphs, as train.py --cuda-graphs")
    parser.add_argument("--no-reference", action="store_true",
                        help="do not import transformers: reference columns empty (data keeps its course pipeline)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    # Internal: the child side of train_probe.
    parser.add_argument("--train-probe", choices=TRAIN_CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--malloc", choices=MALLOC_MODES, default="default", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.steps is None:
        args.steps = 20 if cuda else 5
    if args.warmup is None:
        args.warmup = (5 if cuda else 2) + (2 if args.compile else 0)
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.seq_len < 1 or args.eval_batches < 1:
        parser.error("--steps, --batch-size, --seq-len and --eval-batches must be >= 1, --warmup >= 0")
    return args


# --family: the base sizes of bert-base-uncased and roberta-base (their config.json), random init. The token ids
# come from --model-dir's tokenizer, which both vocabularies cover.
BASE_CONFIGS = {
    "bert": {"model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512},
    "roberta": {"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12,
                "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
                "type_vocab_size": 1, "pad_token_id": 1, "layer_norm_eps": 1e-5},
}


def make_bench(args: argparse.Namespace) -> Bench:
    try:
        config = load_config(args.model_dir) if args.family == "distilbert" else config_from_dict(
            BASE_CONFIGS[args.family])
        tokenizer = load_tokenizer(args.model_dir)
    except MLMError as err:
        raise SystemExit(f"error: --model-dir {args.model_dir}: {err}") from None
    if args.seq_len > config.max_length:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the longest sequence the model takes, {config.max_length}")
    device = torch.device(args.device)
    if args.precision is not None:
        ours_dtype = reference_dtype = DTYPES[args.precision]
    elif device.type == "cuda":
        ours_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        reference_dtype = torch.float16
    else:
        ours_dtype = reference_dtype = None
    special_ids = tuple(tokenizer.special_token_ids)
    # Random "words" start past the specials and, in BERT vocabularies, past the [unusedN] placeholders.
    unused = [i for i in range(tokenizer.vocab_size) if (tokenizer.backend.id_to_token(i) or "").startswith("[unused")]
    first_word_id = max([*special_ids, *unused]) + 1
    bench = Bench(args=args, device=device, config=config, ours_dtype=ours_dtype, reference_dtype=reference_dtype,
                  special_ids=special_ids, mask_id=tokenizer.mask_token_id, cls_id=tokenizer.cls_token_id,
                  sep_id=tokenizer.sep_token_id, first_word_id=first_word_id)
    input_ids, labels = masked_batch(bench, args.batch_size, args.seq_len, seed=0)
    bench.input_ids, bench.labels = input_ids.to(device), labels.to(device)
    # The first optimizer ever built imports torch's optimizer machinery (~70 MiB of RSS, once per process):
    # pay that here, outside every memory window, so the windows hold training memory only.
    torch.optim.AdamW([nn.Parameter(torch.zeros(1, device=device))], fused=device.type in ("cpu", "cuda"))
    return bench


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.train_probe:
        return train_probe_main(args)
    if args.no_reference:
        # A None entry makes every later `import transformers` raise ImportError, so bench_masking (and anything
        # else importing it lazily) skips its reference part too.
        sys.modules["transformers"] = None
    started = time.perf_counter()
    bench = make_bench(args)
    transformers = import_transformers()
    if transformers is None:
        why = "--no-reference" if args.no_reference else "transformers is not installed (pip install -e '.[reference]')"
        bench.notes.append(f"reference: skipped ({why}); model and data keep their own in-project baselines.")

    rows: list[dict] = []
    timings = {}
    for section in args.sections:
        t0 = time.perf_counter()
        rows += SECTION_FUNCTIONS[section](bench, transformers)
        timings[section] = time.perf_counter() - t0
        if not args.json:
            print(f"[{section} done in {timings[section]:.0f} s]", file=sys.stderr, flush=True)

    name = {None: "fp32"} | {v: k for k, v in DTYPES.items() if v is not None}
    setup = {
        "device": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else platform.processor()
        or platform.machine(),
        "torch": torch.__version__, "transformers": getattr(transformers, "__version__", None),
        "threads": torch.get_num_threads(), "batch": [args.batch_size, args.seq_len],
        "steps": args.steps, "warmup": args.warmup, "precision_ours": name[bench.ours_dtype],
        "precision_reference": name[bench.reference_dtype], "compile": args.compile,
        "config": {k: getattr(bench.config, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim")},
        "labelled_fraction": round(bench.labelled_fraction, 4),
        "section_seconds": {k: round(v, 1) for k, v in timings.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps({"setup": setup, "rows": rows, "figures": bench.figures, "notes": bench.notes}, indent=2))
        return 0
    print(", ".join(f"{k}={v}" for k, v in setup.items()))
    print("ratio = ours / reference\n")
    print_table(rows)
    if bench.notes:
        print()
        for note in bench.notes:
            print("- " + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
