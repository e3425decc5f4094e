"""Shared fixtures: tiny tokenizers of each family (BERT-style WordPiece, uncased and cased; byte-level BPE laid out
as RoBERTa's) that need neither the Hub nor any downloaded file."""

from __future__ import annotations

import json
import signal
import string
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_IMDB = SHARED / "hub" / "datasets" / "stanfordnlp" / "imdb"
SHARED_TOKENIZER = SHARED / "hub" / "models" / "distilbert-base-uncased"
# A byte-level BPE tokenizer laid out as RoBERTa's (<s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=576), trained on the smoke
# corpus by scripts/reference/make_tiny_bpe.py.
TINY_BPE = Path(__file__).parent / "fixtures" / "tiny-bpe"

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


# The cased variant: the words capitalised too, every letter in both cases, and the special tokens at the END of the
# vocabulary ([PAD]=238 … [MASK]=242), so that no id of BERT's, nor the uncased tiny one's, can be assumed.
CASED_VOCAB = [token for word in TINY_WORDS + TINY_CHARACTERS + ["##" + c for c in TINY_CHARACTERS]
               for token in dict.fromkeys([word, word.capitalize(), word.upper()])] + TINY_PIECES + TINY_SPECIAL_TOKENS


@pytest.fixture(autouse=True, scope="session")
def stop_signals_handled():
    """The suite sends itself Ctrl-C, SIGTERM and SIGHUP; a run leaves a signal ignored at its start ignored (nohup's
    SIGHUP, a background job's SIGINT), so under nohup or in the background those tests would see nothing."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def build_tiny_tokenizer(vocabulary: list[str] = TINY_VOCAB, lowercase: bool = True) -> Tokenizer:
    """A BERT WordPiece tokenizer over `vocabulary` (lowercasing or cased) that wraps every text in [CLS] … [SEP]."""
    vocab = {token: index for index, token in enumerate(vocabulary)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
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


def write_tiny_tokenizer(directory: Path, cased: bool = False) -> Path:
    """Save the tiny tokenizer (or its cased variant) as tokenizer.json + tokenizer_config.json, loadable by
    mlm.tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(CASED_VOCAB, lowercase=False) if cased else build_tiny_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "BertTokenizer" if cased else "DistilBertTokenizer",
        "do_lower_case": not cased,
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


@pytest.fixture(scope="session")
def cased_tokenizer_dir(tmp_path_factory) -> Path:
    """A folder with the cased tiny WordPiece tokenizer (CASED_VOCAB: [PAD]=238 [UNK]=239 [CLS]=240 [SEP]=241
    [MASK]=242). Shared by the whole session: copy it before modifying it."""
    return write_tiny_tokenizer(tmp_path_factory.mktemp("cased-tokenizer"), cased=True)


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
