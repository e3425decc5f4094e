"""The model card: the README.md of an output folder, which the Hub shows as the model's page.

It opens with the YAML metadata the Hub reads (base model, datasets, tags, license, and a `model-index` holding
the perplexities, which the Hub lists as evaluation results), then the run in words: hyperparameters, perplexity
and fill-mask predictions before and after, and how to load the model. The metadata is written by
huggingface_hub's own `ModelCardData`, so its layout is the one the Hub parses.

Everything it says comes from the run record, run.json (mlm/run/record.py): `card_values` flattens its settings,
derived figures, world size and last segment into `args`; eval figures are the record's results (keys perplexity,
loss, accuracy, reference_perplexity, tokens) and fill-mask records its {"prompt": str, "predictions": [[[token,
score], …] per [MASK]]}. `write_run_model_card` reads run.json itself. The card says what the run did, no more:
the masking as run, a random init as such, and local data by file name in the prose only (the metadata names
Hub repos only, as the Hub links and checks them).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mlm.errors import MLMError
from mlm.files.hub import names_a_local_path, short_name
from mlm.files.pretrained import CONFIG_FILE
from mlm.files.writes import atomic_write_text
from mlm.run.record import RECORD_FILE, RunRecord, read_record

CARD_FILE = "README.md"
# Every DistilBERT checkpoint Hugging Face publishes (distilbert-base-uncased, -cased, …) is Apache-2.0, and a
# fine-tune inherits its base model's licence. For any other base we cannot know it, and the Hub's "other" says so.
DISTILBERT_LICENSE = "apache-2.0"
TASK_NAME = "Masked language modelling"
FAMILY_NAMES = {"distilbert": "DistilBERT", "bert": "BERT", "roberta": "RoBERTa"}

# (row label, `card_values` key) in the order the hyperparameter table shows them; absent keys are skipped.
HYPERPARAMETERS = (
    ("dataset", "dataset"),
    ("text column", "text_column"),
    ("chunk size (tokens)", "chunk_size"),
    ("train chunks", "train_chunks"),
    ("eval chunks", "eval_chunks"),
    ("masked eval tokens", "eval_tokens"),
    ("batch size per process", "batch_size"),
    ("gradient accumulation", "grad_accum"),
    ("processes", "world_size"),
    ("learning rate (peak)", "lr"),
    ("learning-rate schedule", "lr_scheduler"),
    ("AdamW betas, epsilon", "adam"),
    ("weight decay", "weight_decay"),
    ("warmup steps", "warmup_steps_used"),
    ("trained for", "length"),
    ("optimizer steps", "total_steps"),
    ("max gradient norm", "max_grad_norm"),
    ("seed", "seed"),
    ("data seed (train/eval draw, eval masks)", "data_seed"),
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
    dataset_label = _data_name(dataset) if dataset else "local data"
    # The eval chunks are held out of the train split (as the course does), or come from --eval-split of the same
    # dataset or from --validation-file. The Hub's model-index needs a Hub dataset: local eval data stays in prose.
    split = args.get("eval_split") or "train"
    eval_dataset_id = None if args.get("validation_file") else dataset_id

    def result(metric_type: str, value: float, name: str) -> EvalResult:
        return EvalResult(task_type="fill-mask", task_name=TASK_NAME, dataset_type=eval_dataset_id,
                          dataset_name=eval_dataset_id, dataset_split=split, metric_type=metric_type,
                          metric_value=round(float(value), 4), metric_name=name)

    eval_results = []
    if after and eval_dataset_id:
        eval_results.append(result("perplexity", after["perplexity"], "Perplexity"))
        if "accuracy" in after:
            eval_results.append(result("accuracy", after["accuracy"], "Masked-token accuracy"))
    if before and eval_dataset_id:
        eval_results.append(result("perplexity", before["perplexity"], "Perplexity before fine-tuning"))
    name = model_id.rstrip("/").split("/")[-1]
    tags = ["fill-mask", "masked-lm", args.get("family", "distilbert"), "mlm"]
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
        _results(before, after, _eval_data(args, dataset_label), args),
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
    """Write the card of the run in `output_dir` from its run.json; `overrides` as `render_model_card`'s.

    The record keeps the first segment's "before" across resumes and the last fill-mask predictions of each label.
    """
    output_dir = Path(output_dir)
    record = read_record(output_dir)
    if record is None:
        raise MLMError(f"No {RECORD_FILE} in {output_dir}: the model card is written from a run's folder.")
    args, results = card_values(record), record.results
    args["family"] = _read_json(output_dir / CONFIG_FILE).get("model_type") or "distilbert"
    fill_mask = results.get("fill_mask") or {}
    return write_model_card(output_dir, model_id=model_id or str(output_dir), args=args,
                            before=results.get("before"), after=results.get("after"),
                            fill_mask_before=fill_mask.get("before", []), fill_mask_after=fill_mask.get("after", []),
                            **overrides)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MLMError(f"{path} is not valid JSON ({err}); the model card cannot be written from it.") from None


def card_values(record: RunRecord) -> dict:
    """The record as one flat dict: its settings, what they gave (derived), the world size, and the device and
    precision of the last segment (the one that finished the run)."""
    values = {**record.settings, **{k: v for k, v in record.derived.items() if k != "warmup_steps"},
              "world_size": record.world_size}
    if "warmup_steps" in record.derived:  # the steps the schedule used; settings hold the flag (maybe a fraction)
        values["warmup_steps_used"] = record.derived["warmup_steps"]
    if "adam_beta1" in values:
        values["adam"] = f"{values['adam_beta1']:g}, {values['adam_beta2']:g}, {values['adam_epsilon']:g}"
    if "total_steps" in values and "steps_per_epoch" in values:  # the stop rule: all epochs, or --max-steps
        epochs = values["total_steps"] / values["steps_per_epoch"]
        values["length"] = (f"{values['epochs']} epochs" if epochs == values["epochs"] else
                            f"{values['total_steps']} steps (max_steps; {epochs:.2f} epochs)")
    if record.segments:
        values["precision_used"] = record.segments[-1].get("precision")
        values["device_used"] = record.segments[-1].get("device")
    return values


# ---------------------------------------------------------------------------------------------------------------
# The sections of the card body.


def _summary(name: str, base_model: str | None, args: dict, dataset_label: str, before, after) -> str:
    model = _local_name(args.get("model", "?"))
    if args.get("init") == "random":
        overrides = f" ({args['config_overrides']})" if args.get("config_overrides") else ""
        start = (f"a randomly initialised {FAMILY_NAMES.get(args.get('family'), 'DistilBERT')} with the "
                 f"configuration of {model}{overrides} (none of its weights), trained from scratch")
    else:
        start = (f"[{base_model}](https://huggingface.co/{base_model})" if base_model else model) + " trained further"
    text = (f"# {name}\n\nThis model is {start} with the masked-language-model objective ({_masking(args)}) on "
            f"{dataset_label}, with mlm (a from-scratch PyTorch reimplementation of the Hugging Face course's "
            "domain-adaptation chapter).")
    if before and after:
        text += f" Perplexity on {_eval_data(args, dataset_label)} went from {before['perplexity']:.2f} to " \
                f"{after['perplexity']:.2f}."
    return text


def _masking(args: dict) -> str:
    """The training masking as run: whole-word runs use wwm_probability, token runs mlm_probability."""
    if args.get("masking") == "wwm":
        return f"whole-word masking of {_percent(args.get('wwm_probability'))} of the words"
    return f"token masking of {_percent(args.get('mlm_probability'))} of the tokens, 80% [MASK] / 10% random / 10% kept"


def _eval_masking(args: dict) -> str:
    # Every run is scored on token-level masks, whatever it trained with, so runs compare on the same targets.
    return (f"token-level masks on {_percent(args.get('mlm_probability'))} of the tokens, frozen with data seed "
            f"{args.get('data_seed', args.get('seed', '?'))}")


def _percent(value) -> str:
    return f"{float(value):.0%}" if isinstance(value, (int, float)) else "?"


def _eval_data(args: dict, dataset_label: str) -> str:
    if args.get("validation_file"):
        return f"chunks of {_data_name(args['validation_file'])}"
    if args.get("eval_split"):
        return f"chunks of {dataset_label}'s {args['eval_split']} split"
    return f"held-out {dataset_label} chunks"


def _results(before: dict | None, after: dict | None, eval_data: str, args: dict) -> str:
    if not (before or after):
        return ""
    rows = [("perplexity", "perplexity", "{:.3f}"),
            ("perplexity, reference-style", "reference_perplexity", "{:.3f}"),
            ("loss (mean over masked tokens)", "loss", "{:.4f}"),
            ("masked-token accuracy", "accuracy", "{:.2%}")]
    lines = ["## Evaluation", "",
             f"On {args.get('eval_chunks', args.get('test_size', 'the'))} {eval_data}, with "
             f"{_eval_masking(args)}: every figure below scores the same masked tokens."
             " Perplexity is exp of the mean loss over all masked tokens; the reference-style figure "
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
    rows = [(label, _data_name(args[key], " (local)") if key == "dataset" else args[key])
            for label, key in HYPERPARAMETERS if args.get(key) is not None]
    if not rows:
        return ""
    if args.get("model"):
        random = args.get("init") == "random"
        rows[:0] = [("configuration of (random init)" if random else "base model", _local_name(args["model"])),
                    ("initial weights", "random" if random else "pretrained")]
        if args.get("config_overrides"):
            rows.insert(1, ("config overrides", args["config_overrides"]))
    if args.get("masking"):
        rows += [("training masking", _masking(args)), ("eval masking", _eval_masking(args))]
    if all(key in args for key in ("batch_size", "grad_accum", "world_size")):
        rows.append(("global batch (chunks per step)", args["batch_size"] * args["grad_accum"] * args["world_size"]))
    lines = ["## Training hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {label} | {_cell(_value(value))} |" for label, value in rows]
    schedule = {"linear": "linear decay", "cosine": "cosine decay"}.get(args.get("lr_scheduler", "linear"),
                                                                          "a constant learning rate")
    lines += ["", f"AdamW (no weight decay on biases and LayerNorms), {schedule} after warmup, gradient clipping. "
              f"Every setting of the run is in `{RECORD_FILE}` next to the model."]
    return "\n".join(lines)


def _data_name(name, suffix: str = "") -> str:
    # A Hub id as it is; local data by its folder or file stem (a card is public: no path), and `suffix`.
    return str(name) if is_hub_id(str(name)) else short_name(name) + suffix


def _local_name(name, suffix: str = " (local)") -> str:
    # A card is public: a local path would show the trainer's directory layout, its last part says enough.
    return str(name) if is_hub_id(str(name)) else f"{Path(str(name)).name}{suffix}"


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
python scripts/evaluate.py {compare}  # a run folder brings its eval set; a repo id needs the run's data flags
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
