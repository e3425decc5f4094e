"""One command that proves the CUDA path on a GPU machine and measures it: `bash scripts/gpu_check.sh`.

Stages, each with its own time limit, each recorded in <out>/report.json as soon as it ends (so a run cut short
still reports what it finished), each one's output kept in <out>/<stage>.log:

    env     torch, transformers, the GPU, bf16 support, and which SDPA kernels run a training-shaped call
    tests   tests/test_cuda.py (pytest -m cuda), with the measured errors from its JUnit XML
    bench   bench/bench.py --device cuda at 64x128: ours bf16/fp16, eager/compiled, vs the reference
    course  scripts/train.py as the course runs it with the default flags (10,000 train chunks x 3 epochs = 471
            steps of 64x128, full-size random model, real IMDb; on one GPU: --precision auto and --cuda-graphs
            auto, i.e. bf16 and CUDA graphs), then the same run interrupted with SIGINT and resumed, then (GPU only)
            once more with --cuda-graphs off: the graphs' break-even in steps (compile seconds over per-step saving)

--cpu runs every stage on the CPU with the tiny model, tokenizer and corpus of mlm/smoke (CUDA tests skip), so CI
can check the script and its report without a GPU. Model and data come from --assets (a folder holding model/
with config.json + tokenizer files and imdb/ laid out like the Hub dataset), because a GPU machine may have
neither the Hub nor the HF cache.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "mlm" / "smoke"


class Report:
    """report.json, rewritten after every stage."""

    def __init__(self, path: Path, mode: str):
        self.path = path
        self.data = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": {}}

    def stage(self, name: str, **values) -> None:
        self.data["stages"][name] = values
        self.path.write_text(json.dumps(self.data, indent=2) + "\n")


def run_logged(command: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int, float]:
    """Run `command` with its output in `log`; (exit status, seconds). A timeout kills it and returns 124."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                   start_new_session=True)
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = 124
            handle.write(f"\n[killed after {timeout:.0f} s]\n")
    return status, time.perf_counter() - start


def python_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# ---------------------------------------------------------------------------------------------------------------
# env


def stage_env(cpu: bool) -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available()}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if cpu or not torch.cuda.is_available():
        info["device"] = platform.processor() or platform.machine()
        return info
    properties = torch.cuda.get_device_properties(0)
    info |= {
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "multiprocessors": properties.multi_processor_count,
        "cuda": torch.version.cuda,
        "bf16_native": torch.cuda.is_bf16_supported(including_emulation=False),
        "tf32_matmul_allowed": torch.backends.cuda.matmul.allow_tf32,
        "sdpa_kernels": sdpa_kernels(),
    }
    return info


def sdpa_kernels() -> dict:
    """For each SDPA backend: does it run forward + backward on a training-shaped bf16 call (64x12x128x64, dropout
    0.1, no mask)? `True`, or the reason it refused."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(64, 12, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    results = {}
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, dropout_p=0.1).sum().backward()
            torch.cuda.synchronize()
            results[backend.name.lower()] = True
        except Exception as err:  # RuntimeError when a backend refuses, others on some builds
            results[backend.name.lower()] = str(err).strip().splitlines()[0][:200]
    return results


# ---------------------------------------------------------------------------------------------------------------
# tests


def stage_tests(out: Path, timeout: float) -> dict:
    xml = out / "cuda-tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-m", "cuda", "tests/test_cuda.py", f"--junitxml={xml}",
               "-p", "no:cacheprovider"]
    status, seconds = run_logged(command, out / "tests.log", timeout, python_env())
    result = {"ok": status == 0, "exit_status": status, "seconds": round(seconds, 1)}
    if xml.is_file():
        result |= junit_summary(xml)
    return result


def junit_summary(xml: Path) -> dict:
    """Counts, failures and the record_property values of a pytest JUnit XML file."""
    suite = ElementTree.parse(xml).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    properties, failed = {}, {}
    for case in suite.iter("testcase"):
        for prop in case.iter("property"):
            value = prop.get("value")
            try:
                properties[prop.get("name")] = float(value)
            except ValueError:
                properties[prop.get("name")] = value
        for problem in list(case.iter("failure")) + list(case.iter("error")):
            failed[case.get("name")] = (problem.get("message") or "")[:500]
    return counts | {"measured": properties, "failed": failed}


# ---------------------------------------------------------------------------------------------------------------
# bench


def stage_bench(out: Path, assets: Path, cpu: bool, timeout: float) -> dict:
    if cpu:
        # The stages' smoke test: ours only (the reference's CPU figures are bench/bench.py's own business).
        command = ["--device", "cpu", "--model-dir", str(SMOKE), "--batch-size", "4", "--seq-len", "32",
                   "--steps", "2", "--warmup", "1", "--eval-batches", "2", "--no-reference"]
    else:
        command = ["--device", "cuda", "--model-dir", str(assets / "model"), "--batch-size", "64", "--seq-len", "128",
                   "--steps", "20", "--warmup", "3"]
    command = [sys.executable, "bench/bench.py", "--sections", "model,train,eval", "--json", *command]
    log = out / "bench.log"
    status, seconds = run_logged(command, log, timeout, python_env())
    result = {"ok": status == 0, "exit_status": status, "seconds": round(seconds, 1)}
    text = log.read_text()
    start = text.find("\n{")  # the JSON object printed last; progress lines go before it
    if status == 0 and start >= 0:
        report = json.loads(text[start:])
        (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
        result |= {"setup": report["setup"], "figures": report["figures"], "notes": report["notes"],
                   "rows": report["rows"]}
    return result


def bench_targets(bench: dict) -> dict:
    """The issue's targets, from the bench figures: ratios and utilisation of the best of ours."""
    train = bench.get("figures", {}).get("train", {})
    if "reference-fp16" not in train or not any(key.startswith("ours") for key in train):
        return {}
    tps = {key: figures["tokens_per_second"] for key, figures in train.items()}
    best = max((key for key in tps if key.startswith("ours")), key=lambda key: tps[key])

    def ratio(ours: str, reference: str) -> float | None:
        return tps[ours] / tps[reference] if ours in tps and reference in tps else None

    # What a user gets with the default flags on one GPU for a course-length run: CUDA graphs (graphs_choice).
    default = {"bf16_vs_reference_bf16": ratio("ours-bf16-cudagraphs", "reference-bf16"),
               "fp16_vs_reference_fp16": ratio("ours-fp16-cudagraphs", "reference-fp16"),
               "mfu_percent_bf16": train.get("ours-bf16-cudagraphs", {}).get("mfu_percent"),
               "peak_memory_bf16_vs_reference_bf16": train["ours-bf16-cudagraphs"]["delta_mib"]
               / train["reference-bf16"]["delta_mib"] if {"ours-bf16-cudagraphs", "reference-bf16"} <= set(train)
               else None}
    targets = {
        "default_flags": default,
        "best_ours": best,
        "tokens_per_second_vs_reference_fp16": tps[best] / tps["reference-fp16"],
        "tokens_per_second_vs_reference_bf16": tps[best] / tps["reference-bf16"] if "reference-bf16" in tps else None,
        "mfu_percent": train[best].get("mfu_percent"),
        "peak_memory_vs_reference_fp16": train.get("ours-bf16", train[best])["delta_mib"]
        / train["reference-fp16"]["delta_mib"],
    }
    targets["met"] = {
        "tokens_per_second_2x_reference_fp16": targets["tokens_per_second_vs_reference_fp16"] >= 2,
        "tokens_per_second_1.5x_reference_bf16": (targets["tokens_per_second_vs_reference_bf16"] or 0) >= 1.5,
        "mfu_35_percent": (targets["mfu_percent"] or 0) >= 35,
        "peak_memory_0.6x_reference": targets["peak_memory_vs_reference_fp16"] <= 0.6,
        "default_bf16_2x_reference_bf16": (default["bf16_vs_reference_bf16"] or 0) >= 2,
        "default_fp16_1.5x_reference_fp16": (default["fp16_vs_reference_fp16"] or 0) >= 1.5,
        "default_mfu_40_percent": (default["mfu_percent_bf16"] or 0) >= 40,
    }
    return targets


# ---------------------------------------------------------------------------------------------------------------
# course run


def course_arguments(assets: Path, cpu: bool, output_dir: Path) -> list[str]:
    if cpu:  # the smoke corpus: 160 train chunks of 64 / batch 16 = 10 steps per epoch, 30 in all
        data = ["--model", str(SMOKE), "--dataset", str(SMOKE / "reviews.jsonl"), "--chunk-size", "64",
                "--train-size", "160", "--test-size", "64", "--batch-size", "16", "--lr", "2e-3",
                "--precision", "fp32", "--device", "cpu", "--log-every", "5"]
    else:  # the course's defaults: 10,000 / 1,000 chunks of 128, batch 64, lr 2e-5, 3 epochs
        data = ["--model", str(assets / "model"), "--dataset", str(assets / "imdb"), "--log-every", "10"]
    return [sys.executable, "scripts/train.py", *data, "--init", "random", "--epochs", "3", "--no-progress",
            "--cache-dir", str(output_dir.parent / "cache"), "--output-dir", str(output_dir)]


def read_summary(run: Path) -> dict | None:
    """The run record's figures, in the shape of the summary train() returns."""
    path = run / "run.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    progress, results = record["progress"], record["results"]
    return {"status": record["status"], "steps": progress["step"], "before": results["before"],
            "after": results["after"], "train_seconds": progress["train_seconds"],
            "train_tokens_per_second": progress["train_tokens"] / max(progress["train_seconds"], 1e-9)}


def train_records(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def stage_course(out: Path, work: Path, assets: Path, cpu: bool, timeout: float) -> dict:
    deadline = time.perf_counter() + timeout
    env = python_env()
    straight = work / "course"
    status, seconds = run_logged(course_arguments(assets, cpu, straight), out / "course.log", timeout, env)
    result = {"ok": status == 0, "exit_status": status, "wall_seconds": round(seconds, 1)}
    summary = read_summary(straight)
    if summary:
        steps = train_records(straight, "train")
        result |= {"steps": summary["steps"], "train_seconds": round(summary["train_seconds"], 2),
                   "train_tokens_per_second": round(summary["train_tokens_per_second"]),
                   "perplexity_before": summary["before"]["perplexity"] if summary["before"] else None,
                   "perplexity_after": summary["after"]["perplexity"] if summary["after"] else None,
                   "last_logged_loss": steps[-1]["loss"] if steps else None,
                   "checkpoints": sorted(p.name for p in (straight / "checkpoints").glob("step-*"))}
    if status != 0:
        return result

    # The same run, interrupted once its first epoch has been evaluated (its checkpoint is being written or the
    # second epoch has begun), then resumed: it must finish with the uninterrupted run's figures.
    resumed = work / "resumed"
    command = course_arguments(assets, cpu, resumed)
    log = open(out / "resume.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    interrupted_at = None
    while process.poll() is None and time.perf_counter() < deadline:
        if any(r["label"] == "epoch 1" for r in train_records(resumed, "eval")):
            process.send_signal(signal.SIGINT)
            interrupted_at = train_records(resumed, "train")[-1]["step"]
            break
        time.sleep(0.05)
    try:
        process.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    log.close()
    first = read_summary(resumed)
    result["interrupt"] = {"signal_after_logged_step": interrupted_at, "exit_status": process.returncode,
                           "status": first["status"] if first else None, "steps": first["steps"] if first else None}
    status, seconds = run_logged([*command, "--resume", "latest"], out / "resumed.log",
                                 max(1.0, deadline - time.perf_counter()), env)
    second = read_summary(resumed)
    result["resume"] = {"exit_status": status, "wall_seconds": round(seconds, 1),
                        "status": second["status"] if second else None, "steps": second["steps"] if second else None}
    if second and summary and second["after"] and summary["after"]:
        result["resume"] |= {
            "final_loss": second["after"]["loss"], "uninterrupted_final_loss": summary["after"]["loss"],
            "final_loss_relative_difference": abs(second["after"]["loss"] - summary["after"]["loss"])
            / summary["after"]["loss"],
            "max_weight_difference": max_weight_difference(straight, resumed),
        }
    result["ok"] = bool(second and second["status"] == "finished" and first and first["status"] == "interrupted")
    result["default_path"] = next((line for line in (out / "course.log").read_text().splitlines()
                                   if line.startswith("Model:")), None)  # which path the default flags took
    if not cpu:  # the same run eager: what the graphs cost to compile, and after how many steps they pay
        eager = work / "eager"
        status, seconds = run_logged([*course_arguments(assets, cpu, eager), "--cuda-graphs", "off"],
                                     out / "eager.log", max(1.0, deadline - time.perf_counter()), env)
        eager_summary = read_summary(eager)
        result["eager"] = {"exit_status": status, "wall_seconds": round(seconds, 1)}
        if eager_summary and summary:
            result["eager"] |= {"train_seconds": round(eager_summary["train_seconds"], 2),
                                "perplexity_after": eager_summary["after"]["perplexity"],
                                **steady_state(train_records(eager, "train"), eager_summary["steps"])}
            result |= steady_state(train_records(straight, "train"), summary["steps"])
            result["graphs_break_even"] = break_even(result, result["eager"], summary["steps"])
    return result


def break_even(graphs: dict, eager: dict, steps: int, tokens_per_step: int = 64 * 128) -> dict:
    """After how many steps CUDA graphs repay their compile: the extra seconds a graphs run spends beyond its
    steady state (compiling and recording, training and eval graphs both), over the seconds each step saves.
    mlm/speed/path.py GRAPHS_MIN_STEPS should be set from `steps_wall`."""
    if "steady_tokens_per_second" not in graphs or "steady_tokens_per_second" not in eager:
        return {}
    graph_step = tokens_per_step / graphs["steady_tokens_per_second"]
    eager_step = tokens_per_step / eager["steady_tokens_per_second"]
    saving = eager_step - graph_step
    extra_train = (graphs["train_seconds"] - steps * graph_step) - (eager["train_seconds"] - steps * eager_step)
    extra_wall = graphs["wall_seconds"] - eager["wall_seconds"] + steps * saving
    figures = {"seconds_saved_per_step": saving, "extra_train_seconds": extra_train, "extra_wall_seconds": extra_wall}
    if saving > 0:
        figures |= {"steps_train": extra_train / saving, "steps_wall": extra_wall / saving}
    return figures


def steady_state(records: list[dict], steps: int, tokens_per_step: int = 64 * 128) -> dict:
    """Median tokens/s of the log intervals after the first (which compiles), and what `steps` steps of the
    course's 64x128 batches take at that rate."""
    import statistics

    rates = [r["tokens_per_second"] for r in records[1:]]
    if not rates:
        return {}
    median = statistics.median(rates)
    return {"steady_tokens_per_second": round(median), "steady_seconds_all_steps": steps * tokens_per_step / median}


def max_weight_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((first[k].double() - second[k].double()).abs().max()) for k in first)


# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the CUDA tests, the GPU benchmark and the course run; "
                                                 "write report.json and the logs.")
    parser.add_argument("--cpu", action="store_true", help="every stage on the CPU with the tiny smoke model")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check",
                        help="folder for report.json and the logs (default: $OUT, else ./gpu-check)")
    parser.add_argument("--assets", default=str(ROOT / ".gpu-assets"),
                        help="folder with model/ (config.json, tokenizer files) and imdb/ (the dataset in the Hub "
                             "layout) for the GPU stages (default: %(default)s)")
    parser.add_argument("--work", default=None, help="scratch folder for the course runs (default: <out>/../"
                                                     "gpu-check-work, removed at the end)")
    parser.add_argument("--stages", default="env,tests,bench,course", help="comma-separated subset to run")
    parser.add_argument("--timeouts", default="60,150,330,240",
                        help="seconds allowed for env,tests,bench,course (default: %(default)s)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu-check-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    assets = Path(args.assets)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    limits = dict(zip(("env", "tests", "bench", "course"), map(float, args.timeouts.split(","))))
    if not args.cpu:
        import torch

        if not torch.cuda.is_available():
            print("error: torch sees no CUDA GPU; use --cpu to run every stage on the CPU", file=sys.stderr)
            return 2
        if ("bench" in stages or "course" in stages) and not (assets / "model" / "config.json").is_file():
            print(f"error: {assets}/model/config.json is missing: copy the model config and tokenizer to "
                  f"{assets}/model and the dataset to {assets}/imdb (see scripts/gpu_check.sh)", file=sys.stderr)
            return 2

    report = Report(out / "report.json", "cpu" if args.cpu else "cuda")
    for stage in stages:
        started = time.perf_counter()
        print(f"[{stage}] ...", flush=True)
        if stage == "env":
            result = stage_env(args.cpu)
        elif stage == "tests":
            result = stage_tests(out, limits["tests"])
        elif stage == "bench":
            result = stage_bench(out, assets, args.cpu, limits["bench"])
            result["targets"] = bench_targets(result)
        elif stage == "course":
            result = stage_course(out, work, assets, args.cpu, limits["course"])
        else:
            print(f"error: unknown stage {stage!r}", file=sys.stderr)
            return 2
        result.setdefault("seconds", round(time.perf_counter() - started, 1))
        report.stage(stage, **result)
        print(f"[{stage}] {'ok' if result.get('ok', True) else 'FAILED'} in {time.perf_counter() - started:.0f} s",
              flush=True)
    if not args.work:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    failed = [name for name, result in report.data["stages"].items() if result.get("ok") is False]
    print(f"report: {out / 'report.json'}" + (f"; failed stages: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
