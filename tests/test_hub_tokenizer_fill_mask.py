"""Finding repos (local folder or HF cache), the tokenizer files, fill-mask inference and its command line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from mlm.errors import MLMError
from mlm.evaluate import evaluate
from mlm.files.hub import resolve_repo
from mlm.files.pretrained import load_pretrained, save_pretrained
from mlm.fill_mask import fill_mask
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = ROOT.parent / "shared" / "hub" / "models" / "distilbert-base-uncased"


@pytest.fixture()
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF cache with the Hub switched off, as HF_HUB_OFFLINE=1 does."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return tmp_path / "hub-cache"


def put_in_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay `source`'s files out as huggingface_hub's cache holds a downloaded snapshot of `repo_id`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


@pytest.fixture()
def tiny_model_dir(tmp_path, tiny_tokenizer_dir) -> Path:
    """A random tiny model saved together with the tiny test tokenizer."""
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    folder = tmp_path / "tiny-model"
    save_pretrained(DistilBertForMaskedLM(config), folder, tokenizer=tokenizer)
    return folder


# ---------------------------------------------------------------- Hub ids and local folders

def test_hub_repo_id_is_read_from_the_hf_cache_offline(offline_cache, tiny_model_dir):
    snapshot = put_in_cache(offline_cache, "someone/tiny-mlm", tiny_model_dir)
    assert resolve_repo("someone/tiny-mlm") == snapshot
    model = load_pretrained("someone/tiny-mlm")
    assert model.config.dim == 16
    assert load_tokenizer("someone/tiny-mlm").mask_token_id == 4


def test_uncached_repo_id_offline_says_how_to_work_offline(offline_cache):
    with pytest.raises(MLMError, match="(?s)not in the local HF cache.*HF_HUB_OFFLINE.*local folder"):
        load_pretrained("someone/not-there")


def test_a_name_that_is_no_folder_here_says_so_before_the_hub(offline_cache, tmp_path, monkeypatch):
    """A typo in a local folder's name (corp_jsnl for corp_jsonl) read as a Hub problem alone."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corp_jsonl").mkdir()
    with pytest.raises(MLMError, match="^No local folder or file 'corp_jsnl' here. The dataset repository 'corp_jsnl' "
                                       "is not in the local HF cache"):
        resolve_repo("corp_jsnl", repo_type="dataset")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(MLMError, match="^No local folder or file 'corp_jsnl' here. Could not reach the Hub"):
        resolve_repo("corp_jsnl", repo_type="dataset")


def test_missing_local_folder_and_revision_on_a_folder(tmp_path):
    with pytest.raises(MLMError, match="No such folder"):
        resolve_repo(tmp_path / "nope")
    with pytest.raises(MLMError, match="only applies to Hub repo ids"):
        resolve_repo(tmp_path, revision="main")


# ---------------------------------------------------------------- tokenizer

def test_special_token_ids_come_from_the_files(tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id,
            tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
    assert tokenizer.special_token_ids == (0, 1, 2, 3, 4)


def test_tokenizer_save_round_trip(tmp_path, tiny_tokenizer_dir):
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    tokenizer.save(tmp_path)
    reloaded = load_tokenizer(tmp_path)
    text = "the movie was great [MASK] ."
    assert reloaded.backend.encode(text).ids == tokenizer.backend.encode(text).ids
    assert (tmp_path / "vocab.txt").read_text().splitlines()[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def test_folder_without_tokenizer_json(tmp_path):
    with pytest.raises(MLMError, match="No tokenizer.json.*--tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.skipif(not SHARED_MODEL.is_dir(), reason="needs a local copy of the distilbert-base-uncased tokenizer")
def test_real_tokenizer_encodes_the_course_prompt():
    tokenizer = load_tokenizer(SHARED_MODEL)
    assert tokenizer.backend.encode("This is a great [MASK].").ids == [101, 2023, 2003, 1037, 2307, 103, 1012, 102]
    assert tokenizer.vocab_size == 30522 and tokenizer.special_token_ids == (0, 100, 101, 102, 103)


# ---------------------------------------------------------------- fill-mask

def test_fill_mask_matches_the_full_softmax(tiny_model_dir):
    model = load_pretrained(tiny_model_dir).eval()
    tokenizer = load_tokenizer(tiny_model_dir)
    sentences = ["the movie was [MASK] .", "a [MASK] and [MASK] film with a long title"]
    results = fill_mask(model, tokenizer, sentences, top_k=3)
    assert [len(per_mask) for per_mask in results] == [1, 2]

    # Each sentence alone (no padding) must give the same predictions as the padded batch.
    for sentence, per_mask in zip(sentences, results):
        ids = torch.tensor([tokenizer.backend.encode(sentence).ids])
        probabilities = model(ids).logits.softmax(-1)[0]
        positions = (ids[0] == tokenizer.mask_token_id).nonzero().flatten().tolist()
        for position, predictions in zip(positions, per_mask):
            top = probabilities[position].topk(3)
            assert [p.token_id for p in predictions] == top.indices.tolist()
            torch.testing.assert_close(torch.tensor([p.score for p in predictions]), top.values)
    first = results[0][0][0]
    assert first.sequence.startswith("the movie was") and first.token.lstrip("#") in first.sequence
    assert "[MASK]" in results[1][0][0].sequence  # the other mask of a two-mask sentence stays visible


def test_fill_mask_predicts_only_tokens_of_the_tokenizer(tiny_tokenizer_dir):
    # A vocabulary padded past the tokenizer's (BERT-style checkpoints round it up): the padding ids are no token, and
    # predicting one gave a token of None, a traceback in mlm-fill-mask.
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=tokenizer.vocab_size + 6, dim=16, n_layers=1, n_heads=2,
                                                   hidden_dim=32)).eval()
    padding = [i for i in range(model.config.vocab_size) if tokenizer.backend.id_to_token(i) is None]
    with torch.no_grad():
        model.vocab_projector.bias[padding] = 100.0  # the ids that are no token are the most likely by far
    (predictions,), = fill_mask(model, tokenizer, ["the movie was [MASK] ."], top_k=tokenizer.vocab_size + 6)
    assert len(predictions) == len(tokenizer.backend.get_vocab()) and all(isinstance(p.token, str) for p in predictions)
    assert sum(p.score for p in predictions) < 1e-6  # still probabilities over the model's whole vocabulary


def test_fill_mask_without_mask_token(tiny_model_dir):
    model = load_pretrained(tiny_model_dir)
    with pytest.raises(MLMError, match=r"No \[MASK\] in 'no mask here'"):
        fill_mask(model, load_tokenizer(tiny_model_dir), ["no mask here"])


def test_fill_mask_command_line(tiny_model_dir):
    script = [sys.executable, str(ROOT / "scripts" / "fill_mask.py"), "--model", str(tiny_model_dir)]
    text = subprocess.run([*script, "--top-k", "2", "the [MASK] movie"], capture_output=True, text=True, timeout=120)
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("the [MASK] movie\n") and len(text.stdout.strip().splitlines()) == 3
    as_json = subprocess.run([*script, "--json", "a [MASK] [MASK]"], capture_output=True, text=True, timeout=120)
    record = json.loads(as_json.stdout)
    assert [len(m) for m in record["masks"]] == [5, 5] and set(record["masks"][0][0]) == {
        "token_id", "token", "score", "sequence"}
    error = subprocess.run([*script, "nothing to fill"], capture_output=True, text=True, timeout=120)
    assert error.returncode == 2 and error.stderr.startswith("error: No [MASK]") and "Traceback" not in error.stderr


# ---------------------------------------------------------------- evaluation averages

def test_eval_token_weighted_and_reference_weighted_means():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, hidden_dim=32))
    ids = torch.randint(5, 30, (5, 10))
    labels = torch.full_like(ids, -100)
    labels[0, :6], labels[1, :1], labels[2, :2], labels[4, :3] = ids[0, :6], ids[1, :1], ids[2, :2], ids[4, :3]
    # Targets only (the inputs, hence the logits, stay as they are): make the first target of each labelled row
    # the model's own top-1, so the accuracy is known to be at least 4/12 and an argmin or wrong axis shows.
    model.eval()
    with torch.no_grad():
        predicted = model(ids).logits.argmax(dim=-1)  # (5, 10) over the vocabulary
    for row in (0, 1, 2, 4):
        labels[row, 0] = predicted[row, 0]
    result = evaluate(model, ids, labels, batch_size=2)

    model.eval()
    with torch.no_grad():
        token_losses = torch.nn.functional.cross_entropy(model(ids).logits.flatten(0, 1), labels.flatten(),
                                                         reduction="none")[labels.flatten() != -100]
        batch_means = [model(ids[i:i + 2], labels=labels[i:i + 2]).loss for i in (0, 2, 4)]
    assert result.tokens == 12 and result.sequences == 5
    torch.testing.assert_close(torch.tensor(result.loss), token_losses.double().mean().float(), rtol=1e-6, atol=0)
    # The reference: batch means weighted by the rows in each batch (2, 2 and 1).
    expected = (2 * batch_means[0] + 2 * batch_means[1] + batch_means[2]) / 5
    torch.testing.assert_close(torch.tensor(result.reference_loss), expected.double().float(), rtol=1e-6, atol=0)
    # Accuracy: the top-1 of the full logits at the labelled positions, counted here independently.
    labelled = labels != -100
    assert result.accuracy == int((predicted[labelled] == labels[labelled]).sum()) / 12 >= 4 / 12
