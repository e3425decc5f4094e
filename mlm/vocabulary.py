"""A domain vocabulary: how finely the tokenizer cuts a corpus's words, and new tokens for the words it cuts most.

A run with `add_tokens` is scored before and after training on the same extended tokenization, so its two
perplexities compare; runs on other tokenizations predict other tokens and do not (docs/base-models.md).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as BackendTokenizer
from torch import nn

from mlm.errors import MLMError, listed
from mlm.files.corpus_files import iter_texts
from mlm.files.data_files import find_corpus
from mlm.settings import TrainConfig
from mlm.tokenizer import Tokenizer


def count_words(source: str | Path, splits: tuple[str, ...], tokenizer: Tokenizer, *, text_column: str = "text",
                revision: str | None = None) -> Counter:
    """{word as the tokenizer's own normalizer and pre-tokenizer split it (the words its word ids number; for
    byte-level BPE "Ġword", the space before it included): occurrences} over `splits` of `source` (a dataset,
    folder or file), counted while the texts stream by: memory grows with the distinct words, not the corpus."""
    backend = tokenizer.backend
    if backend.pre_tokenizer is None:
        raise MLMError("The tokenizer has no pre-tokenizer, so it defines no words to count or add.")
    normalize = backend.normalizer.normalize_str if backend.normalizer is not None else str
    counts = Counter()
    for split in splits:
        files, one_document_per_file = find_corpus(source, split, revision=revision)
        for texts, _ in iter_texts(files, text_column=text_column, one_document_per_file=one_document_per_file):
            for text in texts:
                counts.update(word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalize(text)))
    return counts


def split_words(counts: Counter, tokenizer: Tokenizer) -> tuple[int, int, list[tuple[str, int, list[str]]]]:
    """(the occurrences of all words, the tokens they make (no template's), the words of letters cut in pieces as
    (word as written, occurrences, pieces), most tokens saved first). A word is as the pre-tokenizer spells it, so
    for byte-level BPE " word" and "word" (a text's first word) are two, as they are to the model."""
    model, decoder = tokenizer.backend.model, tokenizer.backend.decoder
    tokens, split = 0, []
    for word, count in counts.items():
        pieces = [token.value for token in model.tokenize(word)]
        tokens += count * len(pieces)
        written = decoder.decode([word]) if decoder is not None else word  # "Ġword" -> " word"
        if len(pieces) > 1 and written.strip().isalpha():
            split.append((written, count, pieces))
    split.sort(key=lambda entry: (-entry[1] * (len(entry[2]) - 1), entry[0]))  # ties in a fixed order
    return sum(counts.values()), tokens, split


def report(counts: Counter, tokenizer: Tokenizer, top: int = 20) -> str:
    """The lines mlm-prepare-data --vocab-report prints."""
    words, tokens, split = split_words(counts, tokenizer)
    in_pieces = sum(count for _, count, _ in split)
    lines = [f"{words:,} words ({len(counts):,} distinct) make {tokens:,} tokens: {tokens / max(words, 1):.3f} "
             "tokens per word (the template's special tokens not counted)"]
    if not split:  # no table without rows
        return "\n".join([*lines, "No word of letters is cut in pieces: the tokenizer has a token for each, and "
                                   "--add-tokens has nothing to add."])
    lines += [f"{in_pieces:,} occurrences ({in_pieces / max(words, 1):.1%}) are of words of letters cut in pieces; "
              "those that cost the most tokens (occurrences x (pieces - 1)):",
              f"{'word':<22} {'count':>9} {'pieces':>6}  as tokens"]
    lines += [f"{word.strip():<22} {count:>9,} {len(pieces):>6}  {' '.join(pieces)}"
              for word, count, pieces in split[:top]]
    return "\n".join(lines)


def extend_vocabulary(config: TrainConfig, tokenizer: Tokenizer, model: nn.Module,
                      recorded: list[str] | None = None) -> tuple[Tokenizer, nn.Module]:
    """(tokenizer, model) with the run's `add_tokens` added (`add_words`): None adds nothing; a count N, the N words
    of the training splits that save the most tokens (`split_words`); a file, its words, one per line. A resume
    passes the words its record lists (`recorded`): it needs neither the file, which may have changed since, nor a
    count over the corpus, and makes the same tokenizer, whose sha256 it checks.
    """
    add, count = config.add_tokens, None
    if add is None:
        return tokenizer, model
    if recorded is not None:  # the record lists the tokenizer's own added words too, if it had any
        words = [word for word in recorded if word not in added_words(tokenizer)]
    elif isinstance(add, int) or str(add).isdigit():
        if int(add) < 1:
            raise MLMError(f"`add_tokens` must be a count >= 1 or a file of words, got {add!r}.")
        counts = count_words(config.dataset, config.train_splits, tokenizer, text_column=config.text_column)
        words, count = list(dict.fromkeys(word.strip() for word, _, _ in split_words(counts, tokenizer)[2])), int(add)
    elif Path(add).expanduser().is_file():
        try:  # utf-8-sig: a byte order mark (Windows editors write one) would be part of the first word
            words = [line.strip() for line in Path(add).expanduser().read_text(encoding="utf-8-sig").splitlines()]
        except UnicodeDecodeError as err:
            raise MLMError(f"`add_tokens` {add} is not UTF-8 text ({err.reason} at byte {err.start}): save it as "
                           "UTF-8, one word per line.") from None
    else:
        raise MLMError(f"`add_tokens` {add} is neither a count nor a file of words (one per line).")
    return add_words(tokenizer, model, [word for word in words if word], count=count)


def add_words(tokenizer: Tokenizer, model: nn.Module, words: list[str], *,
              count: int | None = None) -> tuple[Tokenizer, nn.Module]:
    """`tokenizer` with `words` as new tokens, and `model` with a row for each (its embedding and output weights and
    output bias the mean of the word's pieces' rows: the model starts from what the pieces said). The model is grown
    in place; the tokenizer is a new one. A word that cannot be added is refused by name; with `count`, words
    found in a corpus, it is skipped, and the first `count` of the others are added.

    A token matches a whole word only (never "movie" inside "movies"), in the normalized text (so an uncased
    tokenizer's matches "Movie"). Where the tokenizer makes the space before a word part of it (byte-level BPE's
    "Ġ"), the token takes the whitespace before it too, as RoBERTa's <mask> does: " word" is one token, not "Ġ" +
    "word"; decoding then drops that space.
    """
    backend = BackendTokenizer.from_str(tokenizer.backend.to_str())
    bare = lambda text: backend.encode(text, add_special_tokens=False).ids  # noqa: E731
    normalize = backend.normalizer.normalize_str if backend.normalizer is not None else str
    # Byte-level BPE and Metaspace make the space before a word part of it ("Ġb", "▁b"); WordPiece splits it off.
    spaced = backend.pre_tokenizer is not None and backend.pre_tokenizer.pre_tokenize_str("a b")[-1][0] != "b"
    kept = {}  # word -> its pieces, as the word is met in a text
    for word in dict.fromkeys(normalize(word).strip() for word in words):
        ids = bare(" " + word if spaced else word)
        if not ids or any(char.isspace() for char in word):
            why = "is not one word; give one word per line."
        elif len(ids) == 1 and ids[0] != tokenizer.unk_token_id:
            why = "is one token already; give words the tokenizer cuts in pieces."
        elif backend.token_to_id(word) is not None:  # `tokenizers` would give the word that token's id, not a new one
            why = "is a token of the vocabulary already (as a piece inside words), not a word of its own; leave it out."
        else:
            kept[word] = ids
            continue
        if count is None:
            raise MLMError(f"`add_tokens`: {word!r} {why}")
    words, pieces = list(kept)[:count], list(kept.values())[:count]
    if not words:
        raise MLMError("`add_tokens` gives no word to add: the corpus has no word cut in pieces, or the file none.")
    taken = set(backend.get_vocab(with_added_tokens=True).values())
    backend.add_tokens([AddedToken(word, single_word=True, lstrip=spaced, normalized=True) for word in words])
    ids = [backend.token_to_id(word) for word in words]
    if taken & set(ids):  # `tokenizers` numbers new tokens from the count of tokens, not past the largest id
        raise MLMError(f"The tokenizer's {len(taken):,} token ids have gaps (up to {max(taken):,}), so new tokens "
                       "would reuse ids: renumber its vocabulary without gaps, or leave `add_tokens` out.")
    _grow(model, max(model.config.vocab_size, max(ids) + 1), ids, pieces)
    return dataclasses.replace(tokenizer, backend=backend), model


def added_words(tokenizer: Tokenizer) -> list[str]:
    """The tokenizer's added tokens that are not special: the words `add_words` added (for the run record)."""
    return [token.content for _, token in sorted(tokenizer.backend.get_added_tokens_decoder().items())
            if not token.special]


def added_words_notes(tokenizer: Tokenizer, add_tokens: str | int | None) -> list[str]:
    """The note a run with `add_tokens` prints before training: the words added, and fewer than a count asked."""
    if not (words := added_words(tokenizer)):
        return []
    asked = int(add_tokens) if str(add_tokens).isdigit() else len(words)
    fewer = (f" (of {asked} asked: no other word of letters in the corpus is cut in pieces and new)"
             if asked > len(words) else "")
    return [f"added {len(words)} tokens{fewer}: {listed(words, 10)}. Both perplexities of this run are on this "
            "extended tokenization, not comparable with the base tokenizer's (docs/base-models.md)."]


@torch.no_grad()
def _grow(model: nn.Module, size: int, ids: list[int], pieces: list[list[int]]) -> None:
    """Give the word embeddings and the output projection `size` rows, row ids[k] the mean of rows pieces[k]."""
    def grown(old: torch.Tensor) -> nn.Parameter:
        new = torch.cat([old, old.new_zeros((size - len(old), *old.shape[1:]))])
        for index, rows in zip(ids, pieces):
            new[index] = old[rows].mean(0)
        return nn.Parameter(new, requires_grad=old.requires_grad)

    embedding, projector = model.distilbert.embeddings.word_embeddings, model.vocab_projector
    embedding.weight, embedding.num_embeddings = grown(embedding.weight), size
    projector.bias, projector.out_features = grown(projector.bias), size
    projector.weight = embedding.weight if model.config.tie_word_embeddings else grown(projector.weight)
    model.config.vocab_size = size
