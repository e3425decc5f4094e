"""Pushing a run folder to the Hub, against tests/hub_server.py on 127.0.0.1, and the model card it carries."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from hub_server import TOKEN, HubServer, Repo
from huggingface_hub import ModelCard, metadata_load

from mlm.errors import MLMError
from mlm.files.hashing import file_sha256
from mlm.files.pretrained import save_pretrained
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.run.hub_push import full_repo_id, push_run
from mlm.run.model_card import write_run_model_card
from mlm.run.record import RunRecord, read_record, write_record
from mlm.settings import TrainConfig
from mlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
# huggingface_hub's LFS upload passes a file as data=, which its HTTP client deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")

BEFORE = {"loss": 3.08, "perplexity": 21.76, "reference_loss": 3.09, "reference_perplexity": 21.98,
          "accuracy": 0.41, "tokens": 18000, "sequences": 1000}
AFTER = {"loss": 2.45, "perplexity": 11.59, "reference_loss": 2.46, "reference_perplexity": 11.70,
         "accuracy": 0.52, "tokens": 18000, "sequences": 1000}
SETTINGS = {**asdict(TrainConfig()), "global_batch": 64}
DERIVED = {"train_chunks": 10000, "eval_chunks": 1000, "eval_tokens": 18000, "steps_per_epoch": 157,
           "total_steps": 471, "warmup_steps": 0, "parameters": 66985530}
FILL_BEFORE = [{"prompt": "This is a great [MASK].", "predictions": [[["deal", 0.0396], ["success", 0.0237]]]}]
FILL_AFTER = [{"prompt": "This is a great [MASK].", "predictions": [[["film", 0.1523], ["movie", 0.0994]]]}]


@pytest.fixture()
def hub(monkeypatch):
    """The local Hub, with hf_xet off (it would take over uploads) and HF_TOKEN set to the server's token."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with HubServer() as server:
        yield server


@pytest.fixture()
def run_dir(tmp_path, tiny_tokenizer_dir) -> Path:
    """A finished run's folder as scripts/train.py leaves it, with a model card and a checkpoint."""
    folder = tmp_path / "run"
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2,
                                                   hidden_dim=32))
    save_pretrained(model, folder, tokenizer=tokenizer)
    save_pretrained(model, folder / "checkpoints" / "step-000003", tokenizer=tokenizer)
    (folder / "checkpoints" / "step-000003" / "optimizer.safetensors").write_bytes(b"\0" * 64)
    write_record(folder, finished_record())
    write_run_model_card(folder, model_id="me/tiny-imdb")
    return folder


def finished_record(**settings) -> RunRecord:
    """run.json of a finished run, as train() writes it (mlm/run/record.py)."""
    results = {"before": BEFORE, "evals": [{"label": "before", "step": 0, "epoch": 0, **BEFORE},
                                           {"label": "epoch 3", "step": 471, "epoch": 3, **AFTER}],
               "after": AFTER, "fill_mask": {"before": FILL_BEFORE, "after": FILL_AFTER}}
    segments = [{"started": "2025-01-01T00:00:00+0000", "ended": "2025-01-01T01:00:00+0000", "from_step": 0,
                 "to_step": 471, "end": "finished", "device": "cuda", "precision": "bf16", "model_variant": "plain",
                 "world_size": 1, "changed": {}}]
    return RunRecord(settings={**SETTINGS, **settings}, derived=DERIVED, world_size=1, status="finished",
                     results=results, segments=segments)


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


# ---------------------------------------------------------------- the model card


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def run_card(tmp_path: Path, *, derived: dict | None = None, config: dict | None = None, results: dict | None = None,
             data: dict | None = None, model_id: str = "me/run", **settings) -> tuple[str, dict]:
    """The card write_run_model_card writes from a finished run's record with these settings (and derived figures,
    results, config.json), and its metadata."""
    folder = tmp_path / "run"
    folder.mkdir(parents=True)
    record = finished_record(**settings)
    record.derived = {**record.derived, **(derived or {})}
    record.results = {**record.results, **(results or {})}
    record.data = {**record.data, **(data or {})}
    if config:
        (folder / "config.json").write_text(json.dumps(config))
    write_record(folder, record)
    text = write_run_model_card(folder, model_id=model_id).read_text()
    return text, card_metadata(text)


def test_card_metadata_is_what_the_hub_reads(tmp_path):
    _, meta = run_card(tmp_path, model_id="me/tiny-imdb")
    path = tmp_path / "run" / "README.md"
    assert meta["base_model"] == "distilbert-base-uncased"
    assert meta["datasets"] == ["stanfordnlp/imdb"]
    assert "fill-mask" in meta["tags"] and meta["pipeline_tag"] == "fill-mask"
    assert meta["license"] == "apache-2.0"
    [entry] = meta["model-index"]
    assert entry["name"] == "tiny-imdb"
    [result] = entry["results"]
    assert result["task"]["type"] == "fill-mask"
    assert result["dataset"] == {"name": "stanfordnlp/imdb", "type": "stanfordnlp/imdb", "split": "train"}
    metrics = {m["name"]: (m["type"], m["value"]) for m in result["metrics"]}
    assert metrics == {"Perplexity": ("perplexity", 11.59), "Masked-token accuracy": ("accuracy", 0.52),
                       "Perplexity before fine-tuning": ("perplexity", 21.76)}

    # huggingface_hub's own parsers agree, eval results included.
    assert metadata_load(path) == meta
    card = ModelCard.load(path)
    assert card.data.base_model == "distilbert-base-uncased"
    assert sorted((r.metric_type, r.metric_value) for r in card.data.eval_results) == [
        ("accuracy", 0.52), ("perplexity", 11.59), ("perplexity", 21.76)]


def test_card_body_holds_hyperparameters_results_predictions_and_usage(tmp_path):
    text, _ = run_card(tmp_path, model_id="me/tiny-imdb")
    assert "| perplexity | 21.760 | 11.590 |" in text
    assert "| perplexity, reference-style | 21.980 | 11.700 |" in text
    assert "| masked-token accuracy | 41.00% | 52.00% |" in text
    assert "| This is a great `[MASK]`. | deal 0.040, success 0.024 | film 0.152, movie 0.099 |" in text
    assert "| learning rate (peak) | 2e-05 |" in text and "| parameters | 66,985,530 |" in text
    assert "| global batch (chunks per step) | 64 |" in text
    assert 'pipeline("fill-mask", model="me/tiny-imdb")' in text
    assert "AutoModelForMaskedLM.from_pretrained(\"me/tiny-imdb\")" in text
    assert "python scripts/fill_mask.py --model me/tiny-imdb" in text
    assert "python scripts/evaluate.py --model distilbert-base-uncased --model me/tiny-imdb" in text


def test_card_of_a_local_random_run_names_no_hub_repos(tmp_path):
    data = tmp_path / "reviews.jsonl"
    data.write_text('{"text": "a"}\n')
    text, meta = run_card(tmp_path, model_id="me/out", model=str(tmp_path), init="random", dataset=str(data),
                          results={"before": None})
    assert str(tmp_path) not in text  # a public card does not show the trainer's directories
    assert f"| configuration of (random init) | {tmp_path.name} (local) |" in text
    assert "| dataset | reviews (local) |" in text
    assert "whole-word" not in text  # a token-masking run does not use it
    # The Hub rejects base_model/datasets that are not repos, and a random init has no base model.
    assert "base_model" not in meta and "datasets" not in meta
    assert meta["license"] == "other"
    assert "reviews.jsonl" not in text.split("---\n")[1]  # local data: prose only, never in the metadata
    assert "model-index" not in meta and "| perplexity | – | 11.590 |" in text
    assert "python scripts/evaluate.py --model me/out " in text  # no base model to compare with


def test_card_of_a_whole_word_masking_run_gives_the_masking_as_run(tmp_path):
    text, meta = run_card(tmp_path, masking="wwm", wwm_probability=0.3)
    body = text.split("---\n", 2)[2]
    assert "whole-word masking of 30% of the words" in body
    assert "token masking" not in body and "token masking probability" not in body
    # Its eval set is token-level all the same (mlm_probability), and the card says so as such.
    assert "| eval masking | token-level masks on 15% of the tokens, frozen with data seed 42 |" in body
    assert meta["base_model"] == "distilbert-base-uncased"


def test_card_of_a_random_init_run_has_no_base_model(tmp_path):
    text, meta = run_card(tmp_path, init="random")
    assert "base_model" not in meta
    assert "a randomly initialised DistilBERT with the configuration of distilbert-base-uncased" in text
    assert "trained further" not in text and "| initial weights | random |" in text
    assert "| base model |" not in text


def test_card_of_a_local_dataset_run_names_it_in_the_prose_only(tmp_path):
    data = tmp_path / "imdb"
    data.mkdir()  # a local copy of the Hub's layout, named like a Hub dataset
    text, meta = run_card(tmp_path, dataset=str(data), validation_file=None)
    metadata = text.split("---\n")[1]
    assert "datasets" not in meta and "model-index" not in meta and "imdb" not in metadata
    assert str(tmp_path) not in text and "held-out imdb chunks" in text and "| dataset | imdb (local) |" in text
    # A Hub dataset with a local --validation-file: the dataset is listed, the results (local data) are not.
    text, meta = run_card(tmp_path / "b", validation_file=str(tmp_path / "val.jsonl"))
    assert meta["datasets"] == ["stanfordnlp/imdb"] and "model-index" not in meta and "chunks of val " in text


def test_card_names_local_data_by_folder_or_stem_and_the_runs_stop_rule(tmp_path):
    text, _ = run_card(tmp_path / "a", dataset=str(tmp_path / "docs" / "**" / "*.txt"))
    assert "held-out docs chunks" in text and "| dataset | docs (local) |" in text and "*.txt" not in text
    assert "| trained for | 3 epochs |" in text
    text, _ = run_card(tmp_path / "b", dataset=str(tmp_path / "reviews.jsonl.gz"), max_steps=40,
                       derived={"total_steps": 40})
    assert "held-out reviews chunks" in text and "| trained for | 40 steps (max_steps; 0.25 epochs) |" in text


def test_card_says_where_a_resume_changed_the_runs_length(tmp_path):
    # The card said "linear" and "80 steps" of a run whose schedule decayed over 400 steps until step 71.
    folder = tmp_path / "run"
    folder.mkdir()
    record = finished_record(max_steps=80)
    record.segments = [{**record.segments[0], "to_step": 71, "end": "interrupted by SIGINT"},
                       {**record.segments[0], "from_step": 71, "to_step": 80, "changed": {"max_steps": [400, 80],
                                                                                        "device": ["cuda", "cpu"]}}]
    write_record(folder, record)
    text = write_run_model_card(folder).read_text()
    assert ("The run's length was changed when it was resumed (at step 71, `max_steps` 400 -> 80): from there the "
            "learning-rate schedule runs to the new end.") in text
    assert "length was changed" not in run_card(tmp_path / "plain")[0]


def test_card_gives_a_text_column_only_for_data_that_has_columns(tmp_path):
    # A corpus of .txt files has none: the card said "| text column | abstract |" of a setting never used.
    text, _ = run_card(tmp_path / "a", text_column="abstract", data={"files": {"a.txt": "1", "b/c.txt.gz": "2"}})
    assert "text column" not in text
    for data in ({"a.jsonl": "1"}, {"a.txt": "1", "export.txt.csv": "2"}):  # with columns, somewhere
        text, _ = run_card(tmp_path / str(len(data)), text_column="abstract", data={"files": data})
        assert "| text column | abstract |" in text


def test_card_gives_the_schedule_the_optimizer_and_the_family(tmp_path):
    text, meta = run_card(tmp_path / "a", lr_scheduler="cosine", adam_beta2=0.98, adam_epsilon=1e-6)
    assert "| learning-rate schedule | cosine |" in text and "| AdamW betas, epsilon | 0.9, 0.98, 1e-06 |" in text
    # "after warmup" only where the schedule has warmup steps: the course's has none, and `constant` refuses them.
    assert "cosine decay, gradient clipping." in text and meta["tags"][2] == "distilbert"
    assert "), a constant learning rate, gradient clipping." in run_card(tmp_path / "d", lr_scheduler="constant")[0]
    text, _ = run_card(tmp_path / "e", lr_scheduler="constant-with-warmup", derived={"warmup_steps": 48})
    assert "a constant learning rate after warmup, gradient clipping." in text
    text, _ = run_card(tmp_path / "c", max_grad_norm=0.0)  # the course's Accelerate loop: it said "gradient clipping"
    assert "| max gradient norm | 0 |" in text and "linear decay, no gradient clipping." in text
    text, meta = run_card(tmp_path / "b", init="random", config_overrides="num_hidden_layers=4",
                          config={"model_type": "bert"})
    assert meta["tags"][2] == "bert" and "| config overrides | num_hidden_layers=4 |" in text
    assert "a randomly initialised BERT with the configuration of distilbert-base-uncased (num_hidden_layers=4)" in text


def test_the_cards_usage_writes_the_prompt_with_the_models_mask_token(tmp_path):
    # transformers' fill-mask pipeline needs RoBERTa's <mask>: "[MASK]" (mlm's placeholder in any prompt) fails there.
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((ROOT / "tests" / "fixtures" / "tiny-bpe" / name).read_bytes())
    (folder / "config.json").write_text(json.dumps({"model_type": "roberta"}))
    write_record(folder, finished_record())
    text = write_run_model_card(folder, model_id="me/run").read_text()
    assert 'print(fill("This is a great <mask>."))' in text and "| This is a great `[MASK]`. |" in text


def test_card_of_an_eval_split_run_names_that_split(tmp_path):
    _, meta = run_card(tmp_path, eval_split="test")
    assert meta["model-index"][0]["results"][0]["dataset"]["split"] == "test"


def test_run_card_is_the_record(run_dir):
    text = (run_dir / "README.md").read_text()
    meta = card_metadata(text)
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert ("Perplexity before fine-tuning", 21.76) in [(m["name"], m["value"]) for m in metrics]
    assert "| perplexity | 21.760 | 11.590 |" in text and "| film 0.152, movie 0.099 |" in text
    assert "| precision | bf16 |" in text and "| optimizer steps | 471 |" in text and "`run.json`" in text


def test_run_card_needs_a_run_folder(tmp_path):
    with pytest.raises(MLMError, match="No run.json"):
        write_run_model_card(tmp_path)


# ---------------------------------------------------------------- pushing


def test_push_uploads_the_run_byte_for_byte(hub, run_dir):
    before = local_files(run_dir)
    url = push_run(run_dir, "me/tiny-imdb", private=True, endpoint=hub.url)

    repo = hub.repos["me/tiny-imdb"]
    assert repo.private and repo.commits == ["Upload model trained with mlm"]
    expected = {name: data for name, data in before.items() if not name.startswith("checkpoints/")}
    # Every file but the checkpoints, byte for byte: this record names no local path, so its copy is the same but
    # for the repo it was pushed to (a push to a corrected id named the old one).
    record = json.loads(expected["run.json"])
    assert record["settings"]["hub_model_id"] != "me/tiny-imdb"
    record["settings"]["hub_model_id"] = "me/tiny-imdb"
    expected["run.json"] = (json.dumps(record, indent=2) + "\n").encode()
    assert repo.files == expected
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "run.json"} <= set(repo.files)
    assert url.startswith(f"{hub.url}/me/tiny-imdb/commit/")
    # model.safetensors went through LFS, the text files as base64 in the commit; the card's YAML was validated.
    assert ("POST", "/me/tiny-imdb.git/info/lfs/objects/batch") in hub.requests
    assert repo.files["model.safetensors"] in hub.lfs.values()
    assert hub.yaml_checked and hub.yaml_checked[0]["base_model"] == "distilbert-base-uncased"
    assert metadata_load_from_bytes(repo.files["README.md"], run_dir)["model-index"][0]["name"] == "tiny-imdb"
    assert local_files(run_dir) == before


def metadata_load_from_bytes(data: bytes, tmp: Path) -> dict:
    path = tmp.parent / "pushed-README.md"
    path.write_bytes(data)
    return metadata_load(path)


def test_push_again_updates_the_existing_repo(hub, run_dir):
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    (run_dir / "config.json").write_text((run_dir / "config.json").read_text().replace("0.02", "0.03"))
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)  # create_repo answers 409: it exists, that is fine
    repo = hub.repos["me/tiny-imdb"]
    assert len(repo.commits) == 2 and repo.files["config.json"] == (run_dir / "config.json").read_bytes()


def test_push_removes_what_an_earlier_push_left_that_this_run_has_not(hub, run_dir):
    # A RoBERTa run pushed over a DistilBERT run's repo left its vocab.txt beside the new tokenizer: two models' files.
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    repo = hub.repos["me/tiny-imdb"]
    repo.files |= {"vocab.json": b"{}", "merges.txt": b"", "tensorboard/events.out": b"old", "notes.txt": b"mine"}
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    assert {"vocab.json", "merges.txt", "tensorboard/events.out"}.isdisjoint(repo.files)
    assert repo.files["notes.txt"] == b"mine" and "vocab.txt" in repo.files  # not mlm's to remove; this run's own


def test_hub_private_on_an_existing_public_repo_is_refused_before_training(hub, run_dir):
    # The Hub keeps an existing repo's visibility: --hub-private pushed the model into the public repo.
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    with pytest.raises(MLMError, match="^me/tiny-imdb exists and is public, and the Hub keeps an existing repo's "
                                       "visibility: make it private"):
        full_repo_id("tiny-imdb", private=True, endpoint=hub.url)
    assert full_repo_id("new-one", private=True, endpoint=hub.url) == "me/new-one"  # to be created private
    hub.repos["me/tiny-imdb"].private = True
    assert full_repo_id("tiny-imdb", private=True, endpoint=hub.url) == "me/tiny-imdb"


def test_bare_name_goes_to_the_users_namespace(hub, run_dir):
    url = push_run(run_dir, "tiny-imdb", endpoint=hub.url)
    assert url.startswith(f"{hub.url}/me/tiny-imdb/commit/")
    assert hub.repos["me/tiny-imdb"].files["config.json"] == (run_dir / "config.json").read_bytes()


def test_full_repo_id_checks_the_token_before_training(hub, monkeypatch):
    # For a namespace/name it asked the Hub nothing: a wrong token, an unreachable or offline Hub were found only
    # after training, while the docs say the token is checked before it starts.
    assert full_repo_id("org/x", endpoint=hub.url) == "org/x" and hub.requests == [("GET", "/api/whoami-v2")]
    assert full_repo_id("x", endpoint=hub.url) == "me/x"
    for repo in ("org/x", "x"):
        with monkeypatch.context() as patch:
            patch.setenv("HF_TOKEN", "hf_wrong")
            with pytest.raises(MLMError, match="rejected the token.*HTTP 401"):
                full_repo_id(repo, endpoint=hub.url)
        with monkeypatch.context() as patch:
            patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
            with pytest.raises(MLMError, match="HF_HUB_OFFLINE=1"):
                full_repo_id(repo, endpoint=hub.url)
    with pytest.raises(MLMError, match="HTTP 500"):
        hub.fail["whoami"] = 500
        full_repo_id("x", endpoint=hub.url)


@pytest.mark.parametrize("repo, message", [
    ("someone-else/x", "The token belongs to me, who may not push to someone-else/x: someone-else is neither me nor "
                       "one of their organisations \\(org\\)"),
    ("my run (v2)", "'my run \\(v2\\)' is not a Hub repo id"),  # an output folder's name, the default id
    ("a/b/c", "'a/b/c' is not a Hub repo id")])
def test_a_repo_id_that_cannot_be_pushed_to_is_refused_before_training(hub, repo, message):
    # Each was found only by the push, after training.
    with pytest.raises(MLMError, match=message):
        full_repo_id(repo, endpoint=hub.url)


# ---------------------------------------------------------------- what a push uploads, and what it never does


def string_values(value, keys=False):
    """Every string in a JSON value, at any depth (dict keys too when `keys`)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if keys:
                yield key
            yield from string_values(item, keys)
    elif isinstance(value, list):
        for item in value:
            yield from string_values(item, keys)


def test_push_uploads_only_the_listed_files(hub, run_dir):
    # What a user may keep in the folder they train into: none of it is the model's, none may become public.
    (run_dir / "api_key.txt").write_text("sk-secret\n")
    (run_dir / "private_reviews.jsonl").write_text('{"text": "mine"}\n')
    (run_dir / "notes").mkdir()
    (run_dir / "notes" / "todo.md").write_text("call the lawyer\n")
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 3.5}\n')
    (run_dir / "special_tokens_map.json").write_text('{"mask_token": "[MASK]"}\n')
    before = local_files(run_dir)
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    repo = hub.repos["me/tiny-imdb"]
    assert set(repo.files) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                               "special_tokens_map.json", "vocab.txt", "README.md", "run.json", "metrics.jsonl"}
    assert repo.commits == ["Upload model trained with mlm"]  # one commit, whatever the number of files
    assert local_files(run_dir) == before


def test_pushed_run_json_names_no_local_path(hub, run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / "step-000003"
    record = finished_record(model=str(tmp_path / "models" / "distil"), tokenizer="distilbert-base-uncased",
                             dataset=str(tmp_path / "data" / "reviews.jsonl"),
                             validation_file=str(tmp_path / "data" / "val.jsonl"), cache_dir=str(tmp_path / "cache"),
                             output_dir=str(run_dir), resume=str(checkpoint), hub_model_id="me/tiny-imdb")
    record.data = {"files": {"reviews.jsonl": "ab" * 32, "val.jsonl": "cd" * 32}, "tokenizer_sha256": "ef" * 32}
    # A resume that changed the cache folder records both folders, deep inside a segment.
    record.segments.append({**record.segments[0], "changed": {"cache_dir": [str(tmp_path / "old-cache"),
                                                                            str(tmp_path / "cache")]}})
    write_record(run_dir, record)
    resume_line = {"kind": "resume", "time": 1.0, "segment": 1, "step": 3, "checkpoint": str(checkpoint),
                   "changed": {"cache_dir": [str(tmp_path / "old-cache"), str(tmp_path / "cache")]}}
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 3.5}\n' + json.dumps(resume_line)
                                           + "\n")
    before = local_files(run_dir)
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)

    files = hub.repos["me/tiny-imdb"].files
    pushed = json.loads(files["run.json"])
    leaks = [s for s in string_values(pushed, keys=True) if s.startswith(("/", "~")) or str(tmp_path) in s]
    assert leaks == []
    settings = pushed["settings"]
    # Local things by their last path part, as the model card names them; Hub ids as they are.
    assert (settings["model"], settings["tokenizer"], settings["dataset"], settings["validation_file"]) == (
        "distil", "distilbert-base-uncased", "reviews.jsonl", "val.jsonl")
    assert (settings["cache_dir"], settings["output_dir"], settings["resume"]) == ("cache", "run", "step-000003")
    assert settings["hub_model_id"] == "me/tiny-imdb" and settings["prompts"] == list(TrainConfig.prompts)
    assert pushed["segments"][1]["changed"] == {"cache_dir": ["old-cache", "cache"]}
    assert {k: v for k, v in pushed.items() if k not in ("settings", "segments")} == {
        k: v for k, v in json.loads(before["run.json"]).items() if k not in ("settings", "segments")}
    # metrics.jsonl's resume line names the checkpoint it continued from: that is cleaned the same way.
    lines = [json.loads(line) for line in files["metrics.jsonl"].decode().splitlines()]
    assert lines[0] == {"kind": "train", "step": 1, "loss": 3.5}
    assert lines[1]["checkpoint"] == "step-000003" and lines[1]["changed"] == {"cache_dir": ["old-cache", "cache"]}
    assert not [s for s in string_values(lines) if s.startswith("/") or str(tmp_path) in s]
    # The local record keeps its absolute paths: a resume needs them.
    assert local_files(run_dir) == before


def test_prompts_and_predictions_are_text_not_paths(hub, run_dir):
    prompt = "/r/movies says this is a great [MASK]."
    fill = [{"prompt": prompt, "predictions": [[["/", 0.2], ["film", 0.1]]]}]
    record = finished_record(prompts=[prompt])
    record.results["fill_mask"] = {"before": fill, "after": fill}
    write_record(run_dir, record)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "fill_mask", "label": "after", **fill[0]}) + "\n")
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    files = hub.repos["me/tiny-imdb"].files
    pushed = json.loads(files["run.json"])
    assert pushed["settings"]["prompts"] == [prompt] and pushed["results"]["fill_mask"]["after"] == fill
    assert files["metrics.jsonl"] == (run_dir / "metrics.jsonl").read_bytes()


@pytest.mark.parametrize("report_to", ["none", "tensorboard"])
def test_tensorboard_goes_only_when_the_run_wrote_it(hub, run_dir, report_to):
    write_record(run_dir, finished_record(report_to=report_to))
    # Left from an earlier run in this folder when report_to is none: not this run's logs.
    (run_dir / "tensorboard" / "sub").mkdir(parents=True)
    (run_dir / "tensorboard" / "events.out.tfevents.1.host.1.0").write_bytes(b"\0event")
    (run_dir / "tensorboard" / "sub" / "events.out.tfevents.2.host.1.0").write_bytes(b"\0event2")
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    files = hub.repos["me/tiny-imdb"].files
    logs = {name for name in files if name.startswith("tensorboard/")}
    if report_to == "tensorboard":
        assert logs == {"tensorboard/events.out.tfevents.1.host.1.0", "tensorboard/sub/events.out.tfevents.2.host.1.0"}
        assert files["tensorboard/sub/events.out.tfevents.2.host.1.0"] == b"\0event2"
    else:
        assert logs == set()
    assert not [name for name in files if name.startswith("checkpoints/")]
    assert "model.safetensors" in files


def test_a_folder_without_a_model_is_refused(hub, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "api_key.txt").write_text("sk-secret\n")
    with pytest.raises(MLMError) as err:
        push_run(folder, "me/tiny-imdb", endpoint=hub.url)
    message = str(err.value)
    assert "\n" not in message and "config.json" in message and "model.safetensors" in message
    assert hub.requests == [] and "me/tiny-imdb" not in hub.repos


def test_a_run_that_is_not_finished_is_refused(hub, run_dir):
    # An --extend stopped midway: the folder's model is the earlier segment's, the record (and card) the new length's.
    record = read_record(run_dir)
    record.start_segment(step=3, device="cpu", precision="fp32", model_variant="plain", world_size=1, changed={})
    record.end_segment("interrupted by SIGINT", step=5)
    write_record(run_dir, record)
    with pytest.raises(MLMError, match=f"Cannot push {run_dir}: its run is interrupted at step .*Finish the run first"):
        push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    assert hub.requests == []


def test_push_honours_hf_endpoint_in_a_fresh_process(hub, run_dir):
    # What a user does: HF_ENDPOINT and HF_TOKEN in the environment, no endpoint passed (read at import).
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1",
           "PYTHONPATH": str(ROOT)}
    code = f"from mlm.run.hub_push import push_run; print(push_run({str(run_dir)!r}, 'me/from-env'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{hub.url}/me/from-env/commit/")
    assert hub.repos["me/from-env"].files["model.safetensors"] == (run_dir / "model.safetensors").read_bytes()


def assert_one_line_and_intact(err: pytest.ExceptionInfo, run_dir: Path, before: dict, *fragments: str) -> None:
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert f"intact in {run_dir}" in message
    assert local_files(run_dir) == before


def test_no_token_is_one_line(hub, run_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    before = local_files(run_dir)
    with pytest.raises(MLMError) as err:
        push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    message = str(err.value)
    assert "\n" not in message and "No Hugging Face token" in message and "HF_TOKEN" in message
    assert hub.url in message and "hf auth login" in message
    assert hub.requests == [] and local_files(run_dir) == before
    # mlm-train --push-to-hub asks for the repo's full id before training: a missing token is refused then, also
    # for a namespace/name that needs no whoami.
    for repo in ("tiny-imdb", "me/tiny-imdb"):
        with pytest.raises(MLMError, match="No Hugging Face token"):
            full_repo_id(repo, endpoint=hub.url)


def test_the_pushed_card_names_the_repo_and_an_edited_card_goes_as_it_is(hub, run_dir):
    write_run_model_card(run_dir)  # a run trained without --push-to-hub: its card names the local folder
    record = read_record(run_dir)
    record.written = {**record.written, "README.md": file_sha256(run_dir / "README.md")}
    write_record(run_dir, record)
    assert str(run_dir) in (run_dir / "README.md").read_text()
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    pushed = hub.repos["me/tiny-imdb"].files["README.md"].decode()
    assert str(run_dir) not in pushed and "--model me/tiny-imdb" in pushed
    (run_dir / "README.md").write_text("# My own card\n")
    push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    assert hub.repos["me/tiny-imdb"].files["README.md"] == b"# My own card\n"


def test_repo_of_someone_else_is_refused_at_create(hub, run_dir):
    before = local_files(run_dir)
    with pytest.raises(MLMError) as err:
        push_run(run_dir, "someone-else/model", endpoint=hub.url)
    assert_one_line_and_intact(err, run_dir, before, f"Not allowed to push to 'someone-else/model' on {hub.url}",
                               "HTTP 403", "rights to create a model", "--hub-model-id")
    assert "someone-else/model" not in hub.repos


def test_public_repo_of_someone_else_is_refused_at_upload(hub, run_dir):
    # create_repo(exist_ok=True) accepts a 403 when the repo exists; the upload is then what the Hub refuses.
    hub.repos["someone-else/model"] = Repo(owner="someone-else", files={"README.md": b"theirs"})
    before = local_files(run_dir)
    with pytest.raises(MLMError) as err:
        push_run(run_dir, "someone-else/model", endpoint=hub.url)
    assert_one_line_and_intact(err, run_dir, before, "Not allowed to push to 'someone-else/model'", "HTTP 403",
                               "rights to write")
    assert hub.repos["someone-else/model"].files == {"README.md": b"theirs"}


def test_conflict_on_commit_is_refused(hub, run_dir):
    hub.fail["commit"] = 409
    before = local_files(run_dir)
    with pytest.raises(MLMError) as err:
        push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    assert_one_line_and_intact(err, run_dir, before, "HTTP 409 Conflict", "injected failure of commit", "push again")


def test_server_error_is_one_line(hub, run_dir):
    hub.fail["create"] = 500
    before = local_files(run_dir)
    with pytest.raises(MLMError) as err:
        push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    assert_one_line_and_intact(err, run_dir, before, f"The Hub at {hub.url} failed", "HTTP 500",
                               "injected failure of create", "Try again later",
                               f"mlm-train --resume latest --output-dir {run_dir} --push-to-hub pushes it again")


def test_wrong_token_is_one_line(hub, run_dir, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_the_right_one")
    before = local_files(run_dir)
    with pytest.raises(MLMError) as err:
        push_run(run_dir, "me/tiny-imdb", endpoint=hub.url)
    assert_one_line_and_intact(err, run_dir, before, "rejected the token", "HTTP 401")


def test_unreachable_hub_is_one_line(hub, run_dir):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    before = local_files(run_dir)
    with pytest.raises(MLMError) as err:
        push_run(run_dir, "me/tiny-imdb", endpoint=endpoint)
    assert_one_line_and_intact(err, run_dir, before, f"Could not reach the Hub at {endpoint}", "ConnectError")
