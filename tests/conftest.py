"""Shared fixtures: a tiny BERT-style WordPiece tokenizer that needs neither the Hub nor any downloaded file."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_IMDB = SHARED / "hub" / "datasets" / "stanfordnlp" / "imdb"
SHARED_TOKENIZER = SHARED / "hub" / "models" / "distilbert-base-uncased"

# Same special tokens and ids as distilbert-base-uncased's [PAD]=0 first, then the rest in a different order
# from the real vocabulary ([UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4), so code that hard-codes 100-103 fails.
TINY_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_WORDS = [
    "the", "a", "an", "this", "that", "it", "is", "was", "i", "and", "or", "not", "of", "to", "in",
    "movie", "film", "plot", "actor", "act", "story", "good", "bad", "great", "terrible", "boring", "fun",
    "watch", "love", "hate", "really", "very", "too", "long",
    ".", ",", "!", "?", "'", "-", "(", ")",
]
TINY_PIECES = ["##s", "##ed", "##ing", "##ly", "##er", "##est"]
# Every lowercase letter and digit, alone and as a continuation, so any ASCII word tokenizes without [UNK].
TINY_CHARACTERS = list(string.ascii_lowercase + string.digits)
TINY_VOCAB = (
    TINY_SPECIAL_TOKENS + TINY_WORDS + TINY_PIECES + TINY_CHARACTERS + ["##" + c for c in TINY_CHARACTERS]
)


def build_tiny_tokenizer() -> Tokenizer:
    """A lowercasing BERT WordPiece tokenizer over TINY_VOCAB that wraps every text in [CLS] … [SEP]."""
    vocab = {token: index for index, token in enumerate(TINY_VOCAB)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    # Registered as special added tokens, as in the real tokenizer: a literal "[MASK]" in text stays one token.
    tokenizer.add_special_tokens(TINY_SPECIAL_TOKENS)
    return tokenizer


def write_tiny_tokenizer(directory: Path) -> Path:
    """Save the tiny tokenizer as tokenizer.json + tokenizer_config.json, loadable by mlm.tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer().save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "DistilBertTokenizer",
        "do_lower_case": True,
        "model_max_length": 512,
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "mask_token": "[MASK]",
        "unk_token": "[UNK]",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with a tiny WordPiece tokenizer (vocab TINY_VOCAB, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4).

    Shared by the whole session: copy it before modifying it.
    """
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture()
def no_dropout_smoke_model(tmp_path) -> Path:
    """mlm/smoke's tiny model folder with dropout off, for comparing runs whose dropout draws cannot match
    (e.g. one batch of 16 against two micro-batches or two processes of 8)."""
    smoke = Path(__file__).resolve().parents[1] / "mlm" / "smoke"
    folder = tmp_path / "no-dropout-model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smoke / name).read_bytes())
    config = json.loads((smoke / "config.json").read_text()) | {"dropout": 0.0, "attention_dropout": 0.0}
    (folder / "config.json").write_text(json.dumps(config))
    return folder
