"""Time masking one 64x128 batch: mlm.masking vs the reference collators.

    python bench/bench_masking.py [--tokenizer path/to/distilbert-base-uncased] [--repeats 200]

Compared, on the same batch of realistic chunks (IMDb-like reviews tokenized with the real tokenizer when its
folder is there, concatenated with [CLS]/[SEP] and cut into 128-token chunks; random ids with specials
sprinkled in otherwise):

- `mask_tokens` (special mask included) vs transformers' `DataCollatorForLanguageModeling` called on 64 dict
  rows, as the Trainer calls it (course columns input_ids/attention_mask/labels, as lists);
- `mask_whole_words` vs the HF course's whole-word collator (numpy draw per row, Python loops);
- `MaskingCollator.__call__` on 64 numpy rows (stacking included), in both modes.

Median over `repeats` calls after warm-up, one process, torch limited to one thread so the figures do not depend
on the core count. The reference parts are skipped with a note when transformers is not installed (it is only
needed here and in scripts/reference/). `bench_masking()` returns the figures as a dict.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from mlm.masking import MaskingCollator, mask_tokens, mask_whole_words, special_tokens_mask

DEFAULT_TOKENIZER = "distilbert-base-uncased"  # a Hub id or a folder with tokenizer.json
SPECIALS = (0, 100, 101, 102, 103)
MASK_ID, VOCAB = 103, 30522
BATCH, LENGTH = 64, 128

TEXT = (
    "I went in expecting a forgettable sequel and came out genuinely moved. The performances are restrained, "
    "the script trusts its audience, and the score never tells you what to feel. Some of the middle act drags, "
    "and one subplot about the brother's debts goes nowhere, but the final twenty minutes are as good as anything "
    "released this year. Isn't it strange how rarely films like this get made anymore? Eight out of ten."
)


def make_chunks(tokenizer: str | Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(64, 128) int32 input_ids and word_ids (-1 at specials), and where they came from."""
    if tokenizer is not None and (Path(tokenizer) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json"))
        sentences = TEXT.split(". ")
        ids: list[int] = []
        words: list[int] = []
        k = 0
        while len(ids) < BATCH * LENGTH:  # reviews of varying length, so [CLS]/[SEP] land mid-chunk
            enc = tok.encode(". ".join(sentences[k % len(sentences):]))
            ids += enc.ids
            words += [-1 if w is None else w for w in enc.word_ids]
            k += 1
        shape = (BATCH, LENGTH)
        return (np.array(ids[: BATCH * LENGTH], np.int32).reshape(shape),
                np.array(words[: BATCH * LENGTH], np.int32).reshape(shape), "real tokenizer")
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, VOCAB, (BATCH, LENGTH)).astype(np.int32)
    words = np.cumsum(rng.random((BATCH, LENGTH)) < 0.75, axis=1).astype(np.int32)
    specials = rng.random((BATCH, LENGTH)) < 0.03
    ids[specials] = 102
    words[specials] = -1
    return ids, words, "random ids"


def median_ms(fn, repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def course_whole_word_masking(features: list[dict], tokenizer, wwm_probability: float,
                              selections: list | None = None) -> list[dict]:
    """The HF course (chapter 7) whole_word_masking_data_collator, as published, minus its final
    default_data_collator call: edits `features` in place (pops word_ids, writes [MASK] and labels) and returns
    them. `selections`, if given, receives each feature's numpy word draws (the golden fixtures record them).
    It reads tokenizer.mask_token_id per masked token, as published: that attribute lookup is part of its cost."""
    for feature in features:
        word_ids = feature.pop("word_ids")
        mapping = collections.defaultdict(list)
        current_word_index = -1
        current_word = None
        for idx, word_id in enumerate(word_ids):
            if word_id is not None:
                if word_id != current_word:
                    current_word = word_id
                    current_word_index += 1
                mapping[current_word_index].append(idx)
        mask = np.random.binomial(1, wwm_probability, (len(mapping),))
        if selections is not None:
            selections.append(mask)
        input_ids = feature["input_ids"]
        labels = feature["labels"]
        new_labels = [-100] * len(labels)
        for word_id in np.where(mask)[0]:
            for idx in mapping[word_id.item()]:
                new_labels[idx] = labels[idx]
                input_ids[idx] = tokenizer.mask_token_id
        feature["labels"] = new_labels
    return features


def bench_masking(tokenizer: str | Path | None = DEFAULT_TOKENIZER, repeats: int = 200) -> dict:
    """Median milliseconds per 64x128 batch for each masking path, and ours/reference ratios."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _bench(tokenizer, repeats)
    finally:
        torch.set_num_threads(threads)


def _bench(tokenizer, repeats: int) -> dict:
    ids_np, words_np, source = make_chunks(tokenizer)
    ids = torch.from_numpy(ids_np)
    words = torch.from_numpy(words_np)
    kw = dict(mask_token_id=MASK_ID, vocab_size=VOCAB)
    results: dict = {"batch": [BATCH, LENGTH], "data": source, "repeats": repeats, "torch_threads": 1}

    results["mask_tokens_ms"] = median_ms(
        lambda: mask_tokens(ids, special_tokens_mask(ids, SPECIALS), **kw), repeats)
    results["mask_whole_words_ms"] = median_ms(lambda: mask_whole_words(ids, words, **kw), repeats)
    rows = [{"input_ids": i, "word_ids": w} for i, w in zip(ids_np, words_np, strict=True)]
    token_collator = MaskingCollator(special_token_ids=SPECIALS, seed=0, **kw)
    word_collator = MaskingCollator(special_token_ids=SPECIALS, whole_word=True, seed=0, **kw)
    results["collator_tokens_ms"] = median_ms(lambda: token_collator(rows), repeats)
    results["collator_whole_words_ms"] = median_ms(lambda: word_collator(rows), repeats)

    try:
        from transformers import AutoTokenizer, DataCollatorForLanguageModeling
    except ImportError:
        results["reference"] = "skipped: transformers is not installed (pip install -e '.[reference]')"
        return results
    if tokenizer is None or not (Path(tokenizer) / "tokenizer.json").is_file():
        results["reference"] = f"skipped: no tokenizer files at {tokenizer}"
        return results
    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    reference = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    # What the Trainer hands the collator for the course's dataset: dicts of Python lists.
    features = [{"input_ids": i.tolist(), "attention_mask": [1] * LENGTH, "labels": i.tolist()} for i in ids_np]
    results["reference_collator_ms"] = median_ms(lambda: reference(features), repeats)  # leaves features as is
    from transformers import default_data_collator

    def course(features):  # the course's collator: its masking, then default_data_collator
        return default_data_collator(course_whole_word_masking(features, tok, 0.2))

    word_features = [{"input_ids": i.tolist(), "attention_mask": [1] * LENGTH, "labels": i.tolist(),
                      "word_ids": [None if x < 0 else int(x) for x in w]} for i, w in zip(ids_np, words_np,
                                                                                            strict=True)]
    # The course collator edits its features in place (pops word_ids, writes [MASK]), so each call gets a fresh
    # copy of the lists; the copy is timed on its own and subtracted.
    fresh = lambda: [{k: list(v) for k, v in f.items()} for f in word_features]  # noqa: E731
    results["course_wwm_collator_ms"] = median_ms(lambda: course(fresh()), repeats)
    results["course_copy_overhead_ms"] = median_ms(fresh, repeats)
    ref_ms = results["reference_collator_ms"]
    course_ms = results["course_wwm_collator_ms"] - results["course_copy_overhead_ms"]
    results["course_wwm_collator_net_ms"] = course_ms
    results["ratio_mask_tokens"] = results["mask_tokens_ms"] / ref_ms
    results["ratio_collator_tokens"] = results["collator_tokens_ms"] / ref_ms
    results["ratio_mask_whole_words"] = results["mask_whole_words_ms"] / course_ms
    results["ratio_collator_whole_words"] = results["collator_whole_words_ms"] / course_ms
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    results = bench_masking(args.tokenizer, args.repeats)
    for key, value in results.items():
        print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")


if __name__ == "__main__":
    main()
