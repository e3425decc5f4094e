"""Exact shortcuts for tokenizing a corpus with a BERT-style WordPiece tokenizer, wrapped around the plain one.

The plain way, `Tokenizer.encode` of mlm/tokenizer.py, asks the tokenizer for the ids and the word ids.
`fast_tokenizer(tokenizer)` returns a Tokenizer whose `encode` gives the same arrays in less time, by two shortcuts,
the way mlm/speed/lean.py's modules wrap the model: mlm/data.py's `tokenize` calls it and does not know. Each
shortcut rests on the argument written above it, whose conditions are checked on the tokenizer; and before either is
used, its result is compared with the plain way's on texts made of the hard cases (PROBE_TEXTS). A tokenizer that
fails a condition or a comparison keeps the plain way (or gets the first shortcut alone).

1. Word ids derived from the token ids (`derived_word_ids`). Encoding.word_ids builds a Python list per
   document, and converting it costs about as much as the rest of the stream's work besides tokenizing; and
   encode_batch_fast, which skips the offsets, gives no word ids at all.
2. The normalizer skipped for texts on which it only lowercases (`_text_shortcut`). BertNormalizer runs on every
   character with alignment bookkeeping, a large share of the tokenizer's time (docs/corpora.md measures it);
   most documents of an English corpus are plain ASCII, where lowering them in Python gives the same text.
"""

from __future__ import annotations

import copy
import re
import string
import unicodedata
from functools import partial

import numpy as np
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors

from mlm.tokenizer import Tokenizer, encoded_ids, template_ids

# The hard cases of both arguments: literal special tokens in any case, inside and beside words; "#" and "##" in
# the text; [UNK] (an unknown character, a word over max_input_chars_per_word); what BertNormalizer removes,
# strips, splits or maps (control characters, tabs and line breaks, accents, zero-width characters, CJK);
# upper case; empty and blank texts.
PROBE_TEXTS = ["a [SEP] b[SEP]c [UNK] [MASK]x", "##s ## # #a a## ###", "x" * 150 + " y", "", "  \t\n ",
               "\x00\u0301 a\u200bb \ufeff c", "naïve café 中文字 état-d'âme", "[sep] [CLS][CLS] done.[PAD]",
               "The Movie WAS Great,\tI Loved It!\r\nReally.", "a\x0bB\x0cc\x01d\x7fe\x1ff", "[Mask] [MASK] [mask]",
               "X" * 101 + " Xy", "ÉTÉ Été été"]


def fast_tokenizer(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of `tokenizer` whose `encode` takes the shortcuts exact for it, or `tokenizer` itself when none is."""
    encode = fast_encoder(tokenizer)
    if encode is None:
        return tokenizer
    fast = copy.copy(tokenizer)
    fast.encode = encode
    return fast


def fast_encoder(tokenizer: Tokenizer):
    """A function (texts, special_tokens) -> (input_ids (T,) int32, word_ids (T,) int32 with -1 outside words,
    lengths (R,) int64) equal to `tokenizer.encode`'s, or None when no shortcut is exact."""
    continuation = continuation_pieces(tokenizer)
    if continuation is None:
        return None
    template = tuple(map(len, template_ids(tokenizer)))
    backend = tokenizer.backend

    def encode_with(shortcut, texts: list[str], special_tokens: bool = True):  # as Tokenizer.encode is called
        ids, lengths = encoded_ids(_encode_batch(backend, texts, special_tokens, shortcut))
        return ids, derived_word_ids(ids, lengths, continuation, *(template if special_tokens else (0, 0))), lengths

    for shortcut in (_text_shortcut(tokenizer), None):
        encode = partial(encode_with, shortcut)
        if all(np.array_equal(a, b) for special in (True, False)
               for a, b in zip(encode(PROBE_TEXTS, special), tokenizer.encode(PROBE_TEXTS, special_tokens=special))):
            return encode
    return None


def _encode_batch(backend: BackendTokenizer, texts: list[str], special: bool, shortcut):
    """Encodings of `texts` in order, with the same ids as backend.encode_batch's (encode_batch_fast skips the
    offsets, which nothing here reads); texts the shortcut covers go through its normalizer-free tokenizer."""
    if shortcut is None:
        return backend.encode_batch_fast(texts, add_special_tokens=special)
    bare, prepare, covered = shortcut
    take = [covered(text) for text in texts]
    fast = iter(bare.encode_batch_fast([prepare(t) for t, s in zip(texts, take) if s], add_special_tokens=special))
    rest = iter(backend.encode_batch_fast([t for t, s in zip(texts, take) if not s], add_special_tokens=special))
    return [next(fast) if s else next(rest) for s in take]  # back in the texts' order


# ---------------------------------------------------------------------------------------------------------
# 1. Word ids from token ids
#
# For a BERT-style WordPiece tokenizer the word ids follow from the token ids, exactly:
#   1. `tokenizers` gives each token the index of its pre-tokenized split as word id, and drops empty splits; a
#      WordPiece split gives at least one token ([UNK] for a word it cannot piece). So the word ids of a text's
#      tokens run 0, 1, 2, ... with no gap, and each new id begins at its split's first token.
#   2. WordPiece spells every piece after a word's first with continuing_subword_prefix ("##") and the first
#      without it. A first piece whose vocabulary entry starts with the prefix would need a split that starts
#      with it; BertPreTokenizer isolates every punctuation character, so when the prefix is two or more
#      characters starting with punctuation, no split does. Added tokens (a literal "[SEP]" in the text) are
#      splits of their own, hence words: exact as long as none is spelt with the prefix.
#   3. The template's tokens ([CLS] before, [SEP] after) are the only tokens without a word id: a fixed number
#      at each end of each encoding, as TemplateProcessing and BertProcessing put them, with truncation and
#      padding off.
# So a token's word id is the count of non-continuation tokens before it in its text, outside the template; read
# from the ids, provided each id names one token (`add_tokens` on a vocabulary with gaps can reuse an id).


def continuation_pieces(tokenizer: Tokenizer) -> np.ndarray | None:
    """(V,) bool, True at the ids of continuation pieces, when the conditions above hold; None when not."""
    backend = tokenizer.backend
    model = backend.model
    if not (isinstance(model, models.WordPiece) and isinstance(backend.pre_tokenizer, pre_tokenizers.BertPreTokenizer)
            and isinstance(backend.post_processor, (processors.TemplateProcessing, processors.BertProcessing))
            and backend.truncation is None and backend.padding is None):
        return None
    prefix = model.continuing_subword_prefix
    # Punctuation by BertPreTokenizer's rule: ASCII symbols (string.punctuation) and Unicode's P* categories.
    if (len(prefix) < 2 or not (prefix[0] in string.punctuation or unicodedata.category(prefix[0]).startswith("P"))
            or any(token.content.startswith(prefix) for token in backend.get_added_tokens_decoder().values())):
        return None
    vocab = backend.get_vocab(with_added_tokens=True)
    if len(set(vocab.values())) < len(vocab):  # an added token given an id the vocabulary already uses
        return None
    continuation = np.zeros(max(vocab.values()) + 1, bool)
    continuation[[index for token, index in vocab.items() if token.startswith(prefix)]] = True
    return continuation


def derived_word_ids(ids: np.ndarray, lengths: np.ndarray, continuation: np.ndarray, before: int,
                     after: int) -> np.ndarray:
    """(T,) int32 word ids of texts' encodings laid end to end (ids (T,) int32, lengths (R,) int64), -1 at the
    `before` first and `after` last tokens of each (the template): outside it, the count of tokens that are not
    continuation pieces (continuation (V,) bool, by id) up to and including this one in its text, minus 1."""
    position = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    in_word = (position >= before) & (position < np.repeat(lengths - after, lengths))
    count = np.cumsum(in_word & ~continuation[ids], dtype=np.int32)
    # Counts restart at each text: subtract the running count just before its first token.
    before_text = np.concatenate([[0], count])[np.cumsum(lengths) - lengths]
    words = count - np.repeat(before_text, lengths).astype(np.int32) - 1
    return np.where(in_word, words, np.int32(-1)).astype(np.int32, copy=False)


# ---------------------------------------------------------------------------------------------------------
# 2. The normalizer skipped where it only lowercases
#
# BertNormalizer does, in order: clean_text (drop U+0000, U+FFFD and control characters other than tab, line
# feed and carriage return; map whitespace to a space), handle_chinese_chars (spaces around CJK ideographs),
# strip_accents (NFD, then drop combining marks) and lowercase. On a text that is ASCII and has no control
# character besides \t \n \r, all that remains is the lowercasing and \t \n \r becoming spaces; and
# BertPreTokenizer splits at \t \n \r exactly as at a space. So the tokenizer without its normalizer, given the
# text lowered in Python, makes the same splits and hence the same tokens, provided the added tokens match alike:
# an added token marked normalized=False is matched in the raw text before any normalizing, and by the bare
# tokenizer in the lowered text, so a text that contains one either way ("[SEP]", or "Good Movie" for an added
# "good movie") keeps the normalizer. One marked normalized=True is matched in the normalized text, which the
# lowered text is not quite (its \t stays \t): alike only for a token without blanks (mlm/vocabulary.py's added
# words, which a text that contains them, in any case, also keeps the normalizer for); a tokenizer with a token
# with blanks marked so gets no shortcut.

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # ASCII control characters but \t \n \r


def _text_shortcut(tokenizer: Tokenizer):
    """(the tokenizer without its normalizer, text -> the text it is given, text -> whether the shortcut covers
    the text) when the argument above holds for `tokenizer`; None when not."""
    backend = tokenizer.backend
    normalizer = backend.normalizer
    added = list(backend.get_added_tokens_decoder().values())
    blank = [token for token in added if token.normalized and token.content.split() != [token.content]]
    if not isinstance(normalizer, normalizers.BertNormalizer) or blank:
        return None
    bare = BackendTokenizer.from_str(backend.to_str())
    bare.normalizer = None
    literals = [token.content for token in added]
    lowercase = normalizer.lowercase
    # Lowering cannot spell a literal with an upper-case letter ("[SEP]"): only the others are looked for in it.
    lower_literals = [literal for literal in literals if lowercase and literal == literal.lower()]

    def covered(text: str) -> bool:
        return (text.isascii() and not _CONTROL.search(text) and not any(literal in text for literal in literals)
                and not any(literal in text.lower() for literal in lower_literals))

    return bare, (str.lower if lowercase else (lambda text: text)), covered
