"""The model card: the README.md of an output folder, which the Hub shows as the model's page.

It opens with the YAML metadata the Hub reads (base model, datasets, tags, license, and a `model-index` holding
the perplexities, which the Hub lists as evaluation results), then the run in words: hyperparameters, perplexity
and fill-mask predictions before and after, and how to load the model. The metadata is written by
huggingface_hub's own `ModelCardData`, so its layout is the one the Hub parses.

Inputs are plain values, the ones a run writes to its output folder: `args` as in args.json, eval figures as in
summary.json / metrics.jsonl `eval` lines (keys perplexity, loss, accuracy, reference_perplexity, tokens), and
fill-mask records as metrics.jsonl `fill_mask` lines ({"prompt": str, "predictions": [[[token, score], …] per
[MASK]]}). `write_run_model_card` reads those files itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mlm.errors import MLMError
from mlm.files.hub import names_a_local_path
from mlm.files.pretrained import atomic_write_text

CARD_FILE = "README.md"
# Every DistilBERT checkpoint Hugging Face publishes (distilbert-base-uncased, -cased, …) is Apache-2.0, and a
# fine-tune inherits its base model's licence. For any other base we cannot know it, and the Hub's "other" says so.
DISTILBERT_LICENSE = "apache-2.0"
TASK_NAME = "Masked language modelling"

# (row label, args.json key) in the order the hyperparameter table shows them; absent keys are skipped.
HYPERPARAMETERS = (
    ("base model", "model"),
    ("initial weights", "init"),
    ("dataset", "dataset"),
    ("text column", "text_column"),
    ("chunk size (tokens)", "chunk_size"),
    ("train chunks", "train_chunks"),
    ("eval chunks", "eval_chunks"),
    ("masked eval tokens", "eval_tokens"),
    ("masking", "masking"),
    ("token masking probability", "mlm_probability"),
    ("whole-word masking probability", "wwm_probability"),
    ("batch size per process", "batch_size"),
    ("gradient accumulation", "grad_accum"),
    ("processes", "world_size"),
    ("learning rate (peak)", "lr"),
    ("weight decay", "weight_decay"),
    ("warmup steps", "warmup_steps_used"),
    ("epochs", "epochs"),
    ("optimizer steps", "total_steps"),
    ("max gradient norm", "max_grad_norm"),
    ("seed", "seed"),
    ("precision", "precision_used"),
    ("device", "device_used"),
    ("parameters", "parameters"),
)


def is_hub_id(name: str | None) -> bool:
    """True for a Hub repo id ("distilbert-base-uncased", "org/name"), False for a local path or None.

    Only Hub ids belong in `base_model` / `datasets`: the Hub links them, and rejects names it cannot resolve.
    """
    if not name:
        return False
    return not (names_a_local_path(name) or Path(name).expanduser().exists())


def default_license(base_model: str | None) -> str:
    if base_model and base_model.split("/")[-1].startswith("distilbert-base-"):
        return DISTILBERT_LICENSE
    return "other"


def render_model_card(
    *,
    model_id: str,
    args: dict,
    before: dict | None = None,
    after: dict | None = None,
    fill_mask_before: Sequence[dict] = (),
    fill_mask_after: Sequence[dict] = (),
    base_model: str | None = None,
    license: str | None = None,
) -> str:
    """The README.md text for a run. `model_id`: the Hub repo id it is pushed to, or the output folder's path.

    `base_model` defaults to args["model"] when that is a Hub id and the run started from its weights
    (a `--init random` run has no base model); `license` defaults from the base model (see DISTILBERT_LICENSE).
    """
    from huggingface_hub import EvalResult, ModelCardData

    dataset = str(args.get("dataset") or "")
    if base_model is None and args.get("init", "pretrained") == "pretrained" and is_hub_id(args.get("model")):
        base_model = str(args["model"])
    dataset_id = dataset if is_hub_id(dataset) else None
    # The eval chunks are drawn from the train split and held out from training, as the course does.
    split = "train"
    dataset_label = dataset_id or (Path(dataset).name if dataset else "local data")

    def result(metric_type: str, value: float, name: str) -> EvalResult:
        return EvalResult(task_type="fill-mask", task_name=TASK_NAME, dataset_type=dataset_id or dataset_label,
                          dataset_name=dataset_label, dataset_split=split, metric_type=metric_type,
                          metric_value=round(float(value), 4), metric_name=name)

    eval_results = []
    if after:
        eval_results.append(result("perplexity", after["perplexity"], "Perplexity"))
        if "accuracy" in after:
            eval_results.append(result("accuracy", after["accuracy"], "Masked-token accuracy"))
    if before:
        eval_results.append(result("perplexity", before["perplexity"], "Perplexity before fine-tuning"))
    name = model_id.rstrip("/").split("/")[-1]
    tags = ["fill-mask", "masked-lm", "distilbert", "mlm"]
    card_data = ModelCardData(
        base_model=base_model,
        datasets=[dataset_id] if dataset_id else None,
        license=license or default_license(base_model),
        library_name="transformers",  # the folder is in the transformers layout; mlm reads it too
        pipeline_tag="fill-mask",
        tags=tags,
        model_name=name if eval_results else None,
        eval_results=eval_results or None,
    )
    sections = [
        f"---\n{card_data.to_yaml()}\n---",
        _summary(name, base_model, args, dataset_label, before, after),
        _results(before, after, dataset_label, args),
        _fill_mask(fill_mask_before, fill_mask_after),
        _hyperparameters(args),
        _usage(model_id, args, base_model),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def write_model_card(output_dir: str | Path, **card) -> Path:
    """Write README.md into `output_dir` (atomically: a crash never leaves half a card); return its path.

    Keyword arguments as `render_model_card`; `model_id` defaults to the folder's path.
    """
    output_dir = Path(output_dir)
    card.setdefault("model_id", str(output_dir))
    path = output_dir / CARD_FILE
    atomic_write_text(path, render_model_card(**card))
    return path


def write_run_model_card(output_dir: str | Path, *, model_id: str | None = None, **overrides) -> Path:
    """Write the card of the finished run in `output_dir` from its args.json, summary.json and metrics.jsonl.

    `before` is the first run's figure even after --resume (metrics.jsonl keeps it, summary.json does not); the
    fill-mask predictions are the last ones logged for each prompt and label.
    """
    output_dir = Path(output_dir)
    args = _read_json(output_dir / "args.json")
    summary = _read_json(output_dir / "summary.json")
    before, after = summary.get("before"), summary.get("after")
    fill_mask: dict[str, dict[str, dict]] = {"before": {}, "after": {}}
    metrics = output_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash: the card is still worth writing
            if record.get("kind") == "eval" and record.get("label") == "before":
                before = before or record
            elif record.get("kind") == "fill_mask" and record.get("label") in fill_mask:
                fill_mask[record["label"]][record.get("prompt", "")] = record
    return write_model_card(output_dir, model_id=model_id or str(output_dir), args=args, before=before, after=after,
                            fill_mask_before=list(fill_mask["before"].values()),
                            fill_mask_after=list(fill_mask["after"].values()), **overrides)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MLMError(f"No {path.name} in {path.parent}: the model card is written from a finished run's folder.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MLMError(f"{path} is not valid JSON ({err}); the model card cannot be written from it.") from None


# ---------------------------------------------------------------------------------------------------------------
# The sections of the card body.


def _summary(name: str, base_model: str | None, args: dict, dataset_label: str, before, after) -> str:
    start = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else (
        "a randomly initialised DistilBERT" if args.get("init") == "random" else f"`{args.get('model', '?')}`")
    text = (f"# {name}\n\nThis model is {start} trained further with the masked-language-model objective on "
            f"{dataset_label}, with mlm (a from-scratch PyTorch reimplementation of the Hugging Face course's "
            "domain-adaptation chapter).")
    if before and after:
        text += (f" Perplexity on held-out {dataset_label} chunks went from {before['perplexity']:.2f} to "
                 f"{after['perplexity']:.2f}.")
    return text


def _results(before: dict | None, after: dict | None, dataset_label: str, args: dict) -> str:
    if not (before or after):
        return ""
    rows = [("perplexity", "perplexity", "{:.3f}"),
            ("perplexity, reference-style", "reference_perplexity", "{:.3f}"),
            ("loss (mean over masked tokens)", "loss", "{:.4f}"),
            ("masked-token accuracy", "accuracy", "{:.2%}")]
    lines = ["## Evaluation", "",
             f"On {args.get('eval_chunks', args.get('test_size', 'the'))} held-out chunks of {dataset_label} "
             f"with frozen token-level masks (seed {args.get('seed', '?')}): every figure below scores the same "
             "masked tokens. Perplexity is exp of the mean loss over all masked tokens; the reference-style figure "
             "averages per-batch means as transformers' Trainer does (it depends on the eval batch size).", "",
             "| | before | after |", "|---|---|---|"]
    for label, key, fmt in rows:
        values = [fmt.format(d[key]) if d and key in d else "–" for d in (before, after)]
        if values != ["–", "–"]:
            lines.append(f"| {label} | {values[0]} | {values[1]} |")
    return "\n".join(lines)


def _predictions(record: dict | None) -> list[str]:
    """One cell per [MASK]: "film 0.123, movie 0.101, …"."""
    if not record:
        return []
    return [", ".join(f"{token} {float(score):.3f}" for token, score in per_mask)
            for per_mask in record.get("predictions", [])]


def _fill_mask(before: Sequence[dict], after: Sequence[dict]) -> str:
    by_prompt_before = {r.get("prompt"): r for r in before}
    by_prompt_after = {r.get("prompt"): r for r in after}
    prompts = list(dict.fromkeys([*by_prompt_before, *by_prompt_after]))
    if not prompts:
        return ""
    lines = ["## Fill-mask predictions", "", "Top predictions for each `[MASK]`, with their probabilities.", "",
             "| prompt | before | after |", "|---|---|---|"]
    for prompt in prompts:
        cells_before, cells_after = _predictions(by_prompt_before.get(prompt)), _predictions(
            by_prompt_after.get(prompt))
        for index in range(max(len(cells_before), len(cells_after))):
            label = _cell(prompt) + (f" (mask {index + 1})" if max(len(cells_before), len(cells_after)) > 1 else "")
            cell_before = cells_before[index] if index < len(cells_before) else "–"
            cell_after = cells_after[index] if index < len(cells_after) else "–"
            lines.append(f"| {label} | {_cell(cell_before)} | {_cell(cell_after)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    # A pipe would end the table cell; [MASK] in backticks so Markdown does not read it as a link.
    return str(text).replace("|", "\\|").replace("[MASK]", "`[MASK]`")


def _hyperparameters(args: dict) -> str:
    hidden = set() if args.get("masking") == "wwm" else {"wwm_probability"}  # token runs never use it
    rows = [(label, _local_name(args[key]) if key in ("model", "dataset") else args[key])
            for label, key in HYPERPARAMETERS if args.get(key) is not None and key not in hidden]
    if not rows:
        return ""
    if all(key in args for key in ("batch_size", "grad_accum", "world_size")):
        rows.append(("global batch (chunks per step)", args["batch_size"] * args["grad_accum"] * args["world_size"]))
    lines = ["## Training hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {label} | {_cell(_value(value))} |" for label, value in rows]
    lines += ["", "AdamW (no weight decay on biases and LayerNorms), linear decay after warmup, gradient clipping. "
              "Every setting of the run is in `args.json` next to the model."]
    return "\n".join(lines)


def _local_name(name) -> str:
    # A card is public: a local path would show the trainer's directory layout, its last part says enough.
    return str(name) if is_hub_id(str(name)) else f"{Path(str(name)).name} (local)"


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _usage(model_id: str, args: dict, base_model: str | None) -> str:
    prompt = (args.get("prompts") or ["This is a great [MASK]."])[0]
    compare = f"--model {base_model} --model {model_id}" if base_model else f"--model {model_id}"
    return f"""## How to use

The folder is in the Hugging Face layout (`config.json`, `model.safetensors`, `tokenizer.json`).

With mlm (no transformers needed), from a checkout of its repository:

```bash
python scripts/fill_mask.py --model {model_id} "{prompt}"
python scripts/evaluate.py {compare}  # add the run's data flags to score its own eval set
```

```python
from mlm.files.pretrained import load_pretrained
from mlm.fill_mask import fill_mask
from mlm.tokenizer import load_tokenizer

model, tokenizer = load_pretrained("{model_id}"), load_tokenizer("{model_id}")
print(fill_mask(model, tokenizer, ["{prompt}"], top_k=5))
```

With transformers:

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

fill = pipeline("fill-mask", model="{model_id}")
print(fill("{prompt}"))
model = AutoModelForMaskedLM.from_pretrained("{model_id}")
tokenizer = AutoTokenizer.from_pretrained("{model_id}")
```"""
