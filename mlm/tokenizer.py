"""The model's tokenizer, read from a Hub-layout folder's tokenizer.json with the `tokenizers` library.

Special-token ids are looked up in the tokenizer files (tokenizer_config.json names the tokens, tokenizer.json
gives their ids), never hard-coded: BERT's WordPiece ([CLS] [SEP] [MASK] [PAD], cased or not) and RoBERTa's
byte-level BPE (<s> </s> <mask> <pad>) alike. A word is what the pre-tokenizer splits off (for byte-level BPE, a
piece spelt with "Ġ", a space before it, starts one). mlm/speed/fast_encode.py gives `Tokenizer.encode`'s arrays
faster.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from mlm.errors import MLMError
from mlm.files.hub import resolve_repo

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
# Names of the special tokens in tokenizer_config.json ("cls_token"). Where no file names them (roberta-base on the
# Hub ships tokenizer.json alone), they are the strings of the family whose tokens the vocabulary holds, as
# transformers takes them from the model's tokenizer class.
SPECIAL_TOKENS = ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token")
FAMILY_SPECIAL_TOKENS = (("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]"), ("<s>", "</s>", "<pad>", "<mask>", "<unk>"))


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token ids that masking and fill-mask need."""

    backend: BackendTokenizer
    config: dict  # tokenizer_config.json as read, with the special tokens' names wherever they were found
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    mask_token_id: int
    unk_token_id: int
    mask_token: str

    def encode(self, texts: list[str], *, special_tokens: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokenize `texts` in one call (the tokenizers library spreads it over every core) and lay them end to end:
        (input_ids (T,) int32, word_ids (T,) int32 with -1 where the word id is None, lengths (R,) int64)."""
        return encoded_arrays(self.backend.encode_batch(texts, add_special_tokens=special_tokens))

    @property
    def vocab_size(self) -> int:
        """len(tokenizer) in transformers: the vocabulary plus added tokens; random replacements draw from it."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """[CLS], [SEP], [PAD], [MASK], [UNK] (RoBERTa's <s>, </s>, <pad>, <mask>, <unk>): the reference collator
        never masks these (docs/reference.md#masking-draws)."""
        return tuple(sorted({self.cls_token_id, self.sep_token_id, self.pad_token_id, self.mask_token_id,
                             self.unk_token_id}))

    @property
    def saved_files(self) -> tuple[str, ...]:
        """The names save() writes, known before it writes them (a run lists them first: mlm/run/folder.py)."""
        wordpiece = isinstance(self.backend.model, models.WordPiece)
        return ("tokenizer.json", "tokenizer_config.json", *(("vocab.txt",) if wordpiece else ()))

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (and a WordPiece model's vocab.txt) so the folder loads
        anywhere: transformers' AutoTokenizer reads a byte-level BPE from tokenizer.json alone, added tokens too."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        (directory / "tokenizer_config.json").write_text(json.dumps(self.config, indent=2) + "\n")
        if "vocab.txt" in self.saved_files:
            # vocab.txt serves slow (non-`tokenizers`) loaders; its order is the id order of the WordPiece model.
            vocab = sorted(self.backend.get_vocab(with_added_tokens=False).items(), key=lambda item: item[1])
            (directory / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")


def load_tokenizer(name_or_path: str | Path, revision: str | None = None) -> Tokenizer:
    """Load the tokenizer of a local Hub-layout folder or a Hub repo id (tokenizer.json is required)."""
    return tokenizer_from_folder(resolve_repo(name_or_path, revision=revision, allow_patterns=TOKENIZER_FILES))


def tokenizer_from_folder(folder: Path) -> Tokenizer:
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise MLMError(f"No tokenizer.json in {folder}. Point to the folder that has the model's tokenizer (the "
                       "scripts' --tokenizer flag), or create one with transformers' "
                       "AutoTokenizer.from_pretrained(...).save_pretrained(folder) on a machine that has it.")
    try:
        backend = BackendTokenizer.from_file(str(tokenizer_file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise MLMError(f"{tokenizer_file} is not a valid tokenizers file: {err}") from None
    # Reviews are tokenized whole and then chunked (reference workflow), so any truncation or padding saved
    # in the file would silently drop text.
    backend.no_truncation()
    backend.no_padding()

    config = _read_json(folder / "tokenizer_config.json")
    named = {**_read_json(folder / "special_tokens_map.json"), **config}
    family = next((names for names in FAMILY_SPECIAL_TOKENS
                   if all(backend.token_to_id(name) is not None for name in names)), FAMILY_SPECIAL_TOKENS[0])
    tokens: dict[str, str] = {}
    for key, default in zip(SPECIAL_TOKENS, family):
        token = named.get(key, default)
        if isinstance(token, dict):  # older files store {"content": "[MASK]", ...}
            token = token.get("content", default)
        if not isinstance(token, str):
            raise MLMError(f"The tokenizer in {folder}: {key} is {token!r}, not a token string; fix "
                           "tokenizer_config.json or special_tokens_map.json.")
        if backend.token_to_id(token) is None:
            raise MLMError(f"The tokenizer in {folder} has no {key} {token!r}; an MLM tokenizer needs one.")
        tokens[key] = token
    # save() writes tokenizer_config.json alone: it names them, so the saved folder loads with the same ones.
    return Tokenizer(backend=backend, config={**tokens, **config}, mask_token=tokens["mask_token"],
                     **{key + "_id": backend.token_to_id(token) for key, token in tokens.items()})


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MLMError(f"{path} is not valid JSON ({err}); re-download or fix the file.") from None
    if not isinstance(values, dict):
        raise MLMError(f"{path} holds a JSON {type(values).__name__}, not an object of settings; re-download or fix "
                       "the file.")
    return values


def template_ids(tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(the ids the template puts before a text, those it puts after), e.g. ([CLS], [SEP]), int32."""
    whole = tokenizer.backend.encode("a").ids
    bare = tokenizer.backend.encode("a", add_special_tokens=False).ids
    at = next(i for i in range(len(whole) - len(bare) + 1) if whole[i : i + len(bare)] == bare)
    return np.array(whole[:at], np.int32), np.array(whole[at + len(bare) :], np.int32)


def encoded_ids(encodings) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids (T,) int32, lengths (R,) int64) of R tokenizers Encodings laid end to end."""
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    # Each .ids is a Python list; chaining them into fromiter fills one array without a list of lists.
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(lengths.sum()))
    return ids, lengths


def encoded_arrays(encodings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`Tokenizer.encode`'s arrays of R tokenizers Encodings: a few C-level conversions, no Python loop per token."""
    ids, lengths = encoded_ids(encodings)
    # word_ids holds None at special tokens, which numpy cannot read as an integer; pyarrow turns None into null
    # while converting in C, and fill_null(-1) gives the -1 stored.
    words = pa.array([e.word_ids for e in encodings], type=pa.list_(pa.int32())).flatten()
    return ids, words.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32, copy=False), lengths
