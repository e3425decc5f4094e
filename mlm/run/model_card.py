"""The model card: the README.md of an output folder, which the Hub shows as the model's page, written from run.json.

It opens with the YAML metadata the Hub reads, written by huggingface_hub's own `ModelCardData` (base model,
datasets, tags, license, and a `model-index` of the perplexities, which the Hub lists as evaluation results), then
the run in words: summary, results and fill-mask predictions before and after, hyperparameters, how to load it.
It says what the run did, no more: the masking as run, a random init as such, and a local model or data by its
folder or file stem, in the prose only (a card is public: no path; the metadata names Hub repos only, as the Hub
links and checks them).
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path

from mlm.errors import MLMError
from mlm.files.corpus_files import file_format
from mlm.files.hub import names_a_local_path, short_name
from mlm.files.pretrained import CONFIG_FILE
from mlm.files.writes import atomic_write_text
from mlm.run.record import RECORD_FILE, read_record
from mlm.settings import LENGTH_SETTINGS
from mlm.tokenizer import tokenizer_from_folder

CARD_FILE = "README.md"
# Every DistilBERT checkpoint Hugging Face publishes (distilbert-base-uncased, -cased, …) is Apache-2.0, and a
# fine-tune inherits its base model's licence. For any other base we cannot know it, and the Hub's "other" says so.
DISTILBERT_LICENSE = "apache-2.0"
FAMILY_NAMES = {"distilbert": "DistilBERT", "bert": "BERT", "roberta": "RoBERTa"}
# (row label, key of the card's values) in the order the hyperparameter table shows them; absent keys are skipped.
HYPERPARAMETERS = (
    ("dataset", "dataset"), ("text column", "text_column"), ("chunk size (tokens)", "chunk_size"),
    ("train chunks", "train_chunks"), ("eval chunks", "eval_chunks"), ("masked eval tokens", "eval_tokens"),
    ("batch size per process", "batch_size"), ("gradient accumulation", "grad_accum"), ("processes", "world_size"),
    ("learning rate (peak)", "lr"), ("learning-rate schedule", "lr_scheduler"), ("AdamW betas, epsilon", "adam"),
    ("weight decay", "weight_decay"), ("warmup steps", "warmup_steps"), ("trained for", "length"),
    ("optimizer steps", "total_steps"), ("max gradient norm", "max_grad_norm"), ("seed", "seed"),
    ("data seed (train/eval draw, eval masks)", "data_seed"), ("precision", "precision_used"),
    ("device", "device_used"), ("parameters", "parameters"), ("added tokens (`add_tokens`)", "added"),
)
# (row label, results key, format) of the evaluation table.
RESULTS = (("perplexity", "perplexity", "{:.3f}"), ("perplexity, reference-style", "reference_perplexity", "{:.3f}"),
           ("loss (mean over masked tokens)", "loss", "{:.4f}"), ("masked-token accuracy", "accuracy", "{:.2%}"))


def is_hub_id(name: str | None) -> bool:
    """True for a Hub repo id ("distilbert-base-uncased", "org/name"), False for a local path or None."""
    return bool(name) and not (names_a_local_path(name) or Path(name).expanduser().exists())


def write_run_model_card(output_dir: str | Path, *, model_id: str | None = None) -> Path:
    """Write README.md (atomically) into the run folder `output_dir` from its run.json; return its path.
    `model_id`: the Hub repo id the card names, by default the folder's path."""
    path = Path(output_dir) / CARD_FILE
    atomic_write_text(path, run_model_card(output_dir, model_id=model_id))
    return path


def run_model_card(output_dir: str | Path, *, model_id: str | None = None) -> str:
    output_dir = Path(output_dir)
    record = read_record(output_dir)
    if record is None:
        raise MLMError(f"No {RECORD_FILE} in {output_dir}: the model card is written from a run's folder.")
    config = output_dir / CONFIG_FILE
    try:
        family = json.loads(config.read_text(encoding="utf-8")).get("model_type") if config.is_file() else None
    except json.JSONDecodeError as err:
        raise MLMError(f"{config} is not valid JSON ({err}); the model card cannot be written from it.") from None
    # The record as one flat dict. The warmup steps are the schedule's (derived), not the flag (maybe a fraction); the
    # device and precision are the last segment's, the one that finished the run.
    last = record.segments[-1] if record.segments else {}
    values = {**record.settings, **record.derived, "warmup_steps": record.derived.get("warmup_steps"),
              "world_size": record.world_size, "family": family or "distilbert",
              "precision_used": last.get("precision"), "device_used": last.get("device")}
    if (files := record.data.get("files")) and all(file_format(Path(name))[0] == ".txt" for name in files):
        values["text_column"] = None  # .txt files have no columns: the setting was not used
    if "adam_beta1" in values:
        values["adam"] = f"{values['adam_beta1']:g}, {values['adam_beta2']:g}, {values['adam_epsilon']:g}"
    if "total_steps" in values and "steps_per_epoch" in values:  # the stop rule: all epochs, or --max-steps
        epochs = values["total_steps"] / values["steps_per_epoch"]
        values["length"] = (f"{values['epochs']} epochs" if epochs == values["epochs"] else
                            f"{values['total_steps']} steps (max_steps; {epochs:.2f} epochs)")
    # A resume with `extend` changes the length, and the schedule follows the new one from there: say where.
    values["resized"] = [f"at step {segment['from_step']}, " + ", ".join(
        f"`{name}` {'unset' if old is None else old} -> {'unset' if new is None else new}"
        for name, (old, new) in segment["changed"].items() if name in LENGTH_SETTINGS)
        for segment in record.segments if LENGTH_SETTINGS & segment.get("changed", {}).keys()]
    if words := values.get("added_tokens"):
        values["added"] = f"{len(words)}: {', '.join(words[:20])}{', …' if len(words) > 20 else ''}"
    if (output_dir / "tokenizer.json").is_file():  # the usage example's prompt, in the model's own mask token
        values["mask_token"] = tokenizer_from_folder(output_dir).mask_token
    return _render(model_id or str(output_dir), values, record.results)


def _render(model_id: str, args: dict, results: dict) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    before, after, fill_mask = results.get("before"), results.get("after"), results.get("fill_mask") or {}
    name = model_id.rstrip("/").split("/")[-1]
    random_init, model = args.get("init") == "random", _data_name(args.get("model", "?"), " (local)")
    # A --init random run has no base model; a local one is left out (the Hub only links repos).
    base_model = str(args["model"]) if not random_init and is_hub_id(args.get("model")) else None
    dataset = str(args.get("dataset") or "")
    dataset_id = dataset if is_hub_id(dataset) else None
    label = _data_name(dataset) if dataset else "local data"
    # The eval chunks are held out of the train split (as the course does), or come from --eval-split of the same
    # dataset or from --validation-file. The Hub's model-index needs a Hub dataset: local eval data stays in prose.
    eval_data = (f"chunks of {_data_name(args['validation_file'])}" if args.get("validation_file") else
                 f"chunks of {label}'s {args['eval_split']} split" if args.get("eval_split") else
                 f"held-out {label} chunks")
    eval_id = None if args.get("validation_file") else dataset_id
    eval_results = [
        EvalResult(task_type="fill-mask", task_name="Masked language modelling", dataset_type=eval_id,
                   dataset_name=eval_id, dataset_split=args.get("eval_split") or "train", metric_type=key,
                   metric_value=round(float(figures[key]), 4), metric_name=metric)
        for figures, key, metric in ((after, "perplexity", "Perplexity"), (after, "accuracy", "Masked-token accuracy"),
                                     (before, "perplexity", "Perplexity before fine-tuning"))
        if eval_id and figures and key in figures]
    license = DISTILBERT_LICENSE if (base_model or "").split("/")[-1].startswith("distilbert-base-") else "other"
    metadata = ModelCardData(base_model=base_model, datasets=[dataset_id] if dataset_id else None, license=license,
                             library_name="transformers",  # the folder is in the transformers layout; mlm reads it
                             pipeline_tag="fill-mask", tags=["fill-mask", "masked-lm", args["family"], "mlm"],
                             model_name=name if eval_results else None, eval_results=eval_results or None)

    def percent(value) -> str:
        return f"{float(value):.0%}" if isinstance(value, (int, float)) else "?"

    # The training masking as run; every run is scored on token-level masks, so runs compare on the same targets.
    masking = (f"whole-word masking of {percent(args.get('wwm_probability'))} of the words"
               if args.get("masking") == "wwm" else f"token masking of {percent(args.get('mlm_probability'))} of "
               "the tokens, 80% [MASK] / 10% random / 10% kept")
    eval_masking = (f"token-level masks on {percent(args.get('mlm_probability'))} of the tokens, frozen with data "
                    f"seed {args.get('data_seed', args.get('seed', '?'))}")

    if random_init:
        overrides = f" ({args['config_overrides']})" if args.get("config_overrides") else ""
        start = (f"a randomly initialised {FAMILY_NAMES.get(args['family'], 'DistilBERT')} with the configuration "
                 f"of {model}{overrides} (none of its weights), trained from scratch")
    else:
        start = (f"[{base_model}](https://huggingface.co/{base_model})" if base_model else model) + " trained further"
    summary = (f"# {name}\n\nThis model is {start} with the masked-language-model objective ({masking}) on {label}, "
               "with mlm (a from-scratch PyTorch reimplementation of the Hugging Face course's domain-adaptation "
               "chapter).")
    if before and after:
        summary += f" Perplexity on {eval_data} went from {before['perplexity']:.2f} to {after['perplexity']:.2f}."
    if args.get("added"):  # both figures on the extended tokenization: other tokens, not comparable with the base's
        summary += (f" Its tokenizer has {len(args['added_tokens'])} tokens added for words of the domain, so its "
                    "perplexities are not comparable with those of models on the base tokenizer.")

    evaluation = []
    if before or after:
        evaluation = ["## Evaluation", "", f"On {args.get('eval_chunks', args.get('test_size', 'the'))} {eval_data}, "
                      f"with {eval_masking}: every figure below scores the same masked tokens. Perplexity is exp of "
                      "the mean loss over all masked tokens; the reference-style figure averages per-batch means as "
                      "transformers' Trainer does (it depends on the eval batch size).", "",
                      "| | before | after |", "|---|---|---|"]
        for row, key, form in RESULTS:
            cells = [form.format(figures[key]) if figures and key in figures else "–" for figures in (before, after)]
            if cells != ["–", "–"]:
                evaluation.append(f"| {row} | {cells[0]} | {cells[1]} |")

    # A row per [MASK] of each prompt (its last record), a cell per stage: "film 0.123, movie 0.101, …".
    predictions = [{record.get("prompt"): [", ".join(f"{token} {float(score):.3f}" for token, score in per_mask)
                                           for per_mask in record.get("predictions", [])]
                    for record in fill_mask.get(stage, [])} for stage in ("before", "after")]
    predicted = []
    for prompt in dict.fromkeys([*predictions[0], *predictions[1]]):
        cells = [by_prompt.get(prompt, []) for by_prompt in predictions]
        masks = max(map(len, cells))
        for index, per_stage in enumerate(zip_longest(*cells, fillvalue="–")):
            row = [_cell(prompt) + (f" (mask {index + 1})" if masks > 1 else ""), *map(_cell, per_stage)]
            predicted.append(f"| {' | '.join(row)} |")
    if predicted:
        predicted[:0] = ["## Fill-mask predictions", "", "Top predictions for each `[MASK]`, with their "
                         "probabilities.", "", "| prompt | before | after |", "|---|---|---|"]

    rows = [(row, _data_name(args[key], " (local)") if key == "dataset" else args[key])
            for row, key in HYPERPARAMETERS if args.get(key) is not None]
    if args.get("model"):
        rows[:0] = [("configuration of (random init)" if random_init else "base model", model),
                    ("initial weights", "random" if random_init else "pretrained")]
        if args.get("config_overrides"):
            rows.insert(1, ("config overrides", args["config_overrides"]))
    if args.get("masking"):
        rows += [("training masking", masking), ("eval masking", eval_masking)]
    if all(key in args for key in ("batch_size", "grad_accum", "world_size")):
        rows.append(("global batch (chunks per step)", args["batch_size"] * args["grad_accum"] * args["world_size"]))
    schedule = {"linear": "linear decay", "cosine": "cosine decay"}.get(args.get("lr_scheduler", "linear"),
                                                                          "a constant learning rate")
    schedule += " after warmup" if args.get("warmup_steps") else ""  # the schedule's steps (derived)
    hyperparameters = ["## Training hyperparameters", "", "| setting | value |", "|---|---|",
                       *(f"| {row} | {_cell(_value(value))} |" for row, value in rows), "",
                       f"AdamW (no weight decay on biases and LayerNorms), {schedule}, "
                       f"{'gradient clipping' if args.get('max_grad_norm', 1) else 'no gradient clipping'}. "
                       f"Every setting of the run is in `{RECORD_FILE}` next to the model."]
    if args.get("resized"):
        hyperparameters[-1] += (f" The run's length was changed when it was resumed ({'; '.join(args['resized'])}): "
                                "from there the learning-rate schedule runs to the new end.")

    prompt = (args.get("prompts") or ["This is a great [MASK]."])[0].replace("[MASK]", args.get("mask_token", "[MASK]"))
    compare = f"--model {base_model} --model {model_id}" if base_model else f"--model {model_id}"
    sections = [f"---\n{metadata.to_yaml()}\n---", summary, "\n".join(evaluation), "\n".join(predicted),
                "\n".join(hyperparameters), _usage(model_id, prompt, compare)]
    return "\n\n".join(section for section in sections if section) + "\n"


def _cell(text) -> str:
    # A pipe would end the table cell; [MASK] in backticks so Markdown does not read it as a link.
    return str(text).replace("|", "\\|").replace("[MASK]", "`[MASK]`")


def _data_name(name, suffix: str = "") -> str:
    return str(name) if is_hub_id(str(name)) else short_name(name) + suffix


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def _usage(model_id: str, prompt: str, compare: str) -> str:
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
