"""mlm.masking against golden outputs of the reference collators, plus properties and statistics.

The goldens come from scripts/reference/make_masking_fixtures.py with transformers, once per tokenizer family:
tests/fixtures/masking_golden.* with BERT's WordPiece (distilbert-base-uncased) and masking_golden_bpe.* with a
byte-level BPE laid out as RoBERTa's (tests/fixtures/tiny-bpe)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_BPE
from safetensors.torch import load_file

from mlm.data import tokenize
from mlm.errors import MLMError
from mlm.masking import (
    IGNORE_INDEX,
    MaskingCollator,
    apply_word_selection,
    freeze_eval_masks,
    mask_tokens,
    mask_whole_words,
    special_tokens_mask,
    word_starts,
)
from mlm.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@dataclass(frozen=True)
class Golden:
    """One fixture set: its cases, tensors and the ids of its tokenizer."""

    meta: dict
    tensors: dict[str, torch.Tensor]
    mask_id: int
    vocab: int
    specials: list[int]

    def __getitem__(self, key: str) -> torch.Tensor:  # golden["case.tensor"]
        return self.tensors[key]


def load_golden(name: str) -> Golden:
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    tensors = {k: (v.long() if v.dtype == torch.int32 else v)
               for k, v in load_file(str(FIXTURES / f"{name}.safetensors")).items()}
    return Golden(meta, tensors, meta["mask_token_id"], meta["vocab_size"], meta["special_token_ids"])


GOLDENS = {"bert": load_golden("masking_golden"), "bpe": load_golden("masking_golden_bpe")}
META, GOLDEN = GOLDENS["bert"].meta, GOLDENS["bert"].tensors  # the property tests below use BERT's ids
MASK_ID = META["mask_token_id"]  # 103
VOCAB = META["vocab_size"]  # 30522
SPECIALS = META["special_token_ids"]  # [0, 100, 101, 102, 103]


def cases(kind: str, **where) -> list:
    """pytest params (golden set, case name) of every case of `kind` in both sets whose fields match `where`."""
    return [pytest.param(golden, name, id=f"{family}:{name}") for family, golden in GOLDENS.items()
            for name, case in golden.meta["cases"].items()
            if case["kind"] == kind and all(case.get(k) == v for k, v in where.items())]


def sha(state: torch.Tensor) -> bytes:
    return hashlib.sha256(state.numpy().tobytes()).digest()


@pytest.fixture(autouse=True)
def _restore_global_rng():
    with torch.random.fork_rng(devices=[]):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Golden outputs of the reference collators.


@pytest.mark.parametrize(("golden", "name"), cases("token", generator="global"))
def test_mask_tokens_matches_reference_collator(golden, name):
    case = golden.meta["cases"][name]
    ids = golden[f"{name}.input_ids"]
    if case["special_mask"] == "column":  # the tokenizer's own mask: [UNK] and literal [MASK] are maskable
        no_mask = golden[f"{name}.special_mask"].bool()
    else:
        no_mask = special_tokens_mask(ids, golden.specials)
    torch.manual_seed(case["seed"])
    out_ids, labels = mask_tokens(ids, no_mask, mask_token_id=golden.mask_id, vocab_size=golden.vocab,
                                  mlm_probability=case["mlm_probability"],
                                  mask_replace_prob=case["mask_replace_prob"],
                                  random_replace_prob=case["random_replace_prob"])
    assert out_ids.dtype == labels.dtype == torch.int64
    assert torch.equal(out_ids, golden[f"{name}.expected_input_ids"])
    assert torch.equal(labels, golden[f"{name}.expected_labels"])
    assert sha(torch.get_rng_state()) == bytes(golden[f"{name}.rng_sha256"].tolist())


@pytest.mark.parametrize("family", GOLDENS)
def test_fixtures_cover_the_hard_cases(family):
    golden = GOLDENS[family]
    names = [name for name, case in golden.meta["cases"].items() if case["kind"] == "token"]
    ids = torch.cat([golden[f"{n}.input_ids"].flatten() for n in names])
    for special in golden.specials:  # padding, unknown, the template's two and a literal mask token all occur
        assert (ids == special).any()
    mid = golden["chunks_b4_l32_s0.input_ids"][:, 1:-1]
    cls_sep = (101, 102) if family == "bert" else (0, 2)
    assert (mid == cls_sep[0]).any() and (mid == cls_sep[1]).any()  # [CLS]/[SEP] (<s>/</s>) inside chunks


@pytest.mark.parametrize("family", GOLDENS)
def test_private_generator_matches_seeded_reference_collator_over_calls(family):
    golden = GOLDENS[family]
    before = torch.get_rng_state()
    generator = torch.Generator().manual_seed(7)
    for call in range(2):
        name = f"private_seed7_call{call}"
        ids = golden[f"{name}.input_ids"]
        out_ids, labels = mask_tokens(ids, special_tokens_mask(ids, golden.specials), mask_token_id=golden.mask_id,
                                      vocab_size=golden.vocab, generator=generator)
        assert torch.equal(out_ids, golden[f"{name}.expected_input_ids"])
        assert torch.equal(labels, golden[f"{name}.expected_labels"])
        assert sha(generator.get_state()) == bytes(golden[f"{name}.rng_sha256"].tolist())
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched


@pytest.mark.parametrize("family", GOLDENS)
def test_masking_collator_matches_seeded_reference_collator(family):
    golden = GOLDENS[family]
    collator = MaskingCollator(mask_token_id=golden.mask_id, vocab_size=golden.vocab,
                               special_token_ids=golden.specials, seed=7)
    for call in range(2):
        name = f"private_seed7_call{call}"
        rows = [{"input_ids": row.numpy().astype(np.int32)} for row in golden[f"{name}.input_ids"]]
        batch = collator(rows)
        assert set(batch) == {"input_ids", "labels"}  # no padding, no attention_mask
        assert torch.equal(batch["input_ids"], golden[f"{name}.expected_input_ids"])
        assert torch.equal(batch["labels"], golden[f"{name}.expected_labels"])


@pytest.mark.parametrize(("golden", "name"), cases("wwm524"))
def test_mask_whole_words_matches_transformers_whole_word_mask(golden, name):
    case = golden.meta["cases"][name]
    torch.manual_seed(case["seed"])
    out_ids, labels = mask_whole_words(golden[f"{name}.input_ids"], golden[f"{name}.word_ids"],
                                       mask_token_id=golden.mask_id, vocab_size=golden.vocab,
                                       wwm_probability=case["wwm_probability"])
    assert torch.equal(out_ids, golden[f"{name}.expected_input_ids"])
    assert torch.equal(labels, golden[f"{name}.expected_labels"])
    assert sha(torch.get_rng_state()) == bytes(golden[f"{name}.rng_sha256"].tolist())


@pytest.mark.parametrize(("golden", "name"), cases("wwm_split"))
def test_mask_whole_words_80_10_10_per_word_matches_golden(golden, name):
    # The golden outputs come from the reference script's own per-word loop on the 5.24 collator's selection
    # (see its docstring): a bit-exact match pins the selection, each word's [MASK]/random/unchanged decision
    # (read at its first token), each random token's id, and the RNG use (four full-shape draws).
    case = golden.meta["cases"][name]
    torch.manual_seed(case["seed"])
    out_ids, labels = mask_whole_words(golden[f"{name}.input_ids"], golden[f"{name}.word_ids"],
                                       mask_token_id=golden.mask_id, vocab_size=golden.vocab,
                                       wwm_probability=case["wwm_probability"],
                                       mask_replace_prob=case["mask_replace_prob"],
                                       random_replace_prob=case["random_replace_prob"])
    assert torch.equal(labels, golden[f"{name}.expected_labels"])
    assert torch.equal(out_ids, golden[f"{name}.expected_input_ids"])
    assert sha(torch.get_rng_state()) == bytes(golden[f"{name}.rng_sha256"].tolist())


def word_outcomes(ids, word_ids, out, labels, mask_id=MASK_ID) -> list[str]:
    """For each selected word of several tokens: "mask", "keep", "random", or "mixed" when its tokens disagree."""
    outcomes = []
    for row in range(ids.shape[0]):
        for word in sorted(set(word_ids[row].tolist()) - {-1}):
            positions = (word_ids[row] == word).nonzero().flatten()
            if len(positions) < 2 or labels[row, positions[0]] == IGNORE_INDEX:
                continue
            got, original = out[row, positions], ids[row, positions]
            states = {"mask" if g == mask_id else "keep" if g == o else "random" for g, o in zip(got, original)}
            outcomes.append(states.pop() if len(states) == 1 else "mixed")
    return outcomes


@pytest.mark.parametrize("family", GOLDENS)
def test_whole_word_golden_cases_cover_every_per_word_outcome(family):
    # The golden cases are only worth their bits if multi-token words were selected and came out in each of the
    # three ways; and the reference itself must never split a word (the property the golden pins).
    golden, outcomes = GOLDENS[family], []
    for name in (name for name, case in golden.meta["cases"].items() if case["kind"] == "wwm_split"):
        outcomes += word_outcomes(*(golden[f"{name}.{t}"] for t in ("input_ids", "word_ids", "expected_input_ids",
                                                                    "expected_labels")), mask_id=golden.mask_id)
    assert "mixed" not in outcomes
    assert {k: outcomes.count(k) >= 3 for k in ("mask", "keep", "random")} == {"mask": True, "keep": True,
                                                                               "random": True}


@pytest.mark.parametrize(("golden", "name"), cases("course"))
def test_apply_word_selection_reproduces_course_collator(golden, name):
    out_ids, labels = apply_word_selection(golden[f"{name}.input_ids"], golden[f"{name}.word_ids"],
                                           golden[f"{name}.selection"], mask_token_id=golden.mask_id)
    assert torch.equal(out_ids, golden[f"{name}.expected_input_ids"])
    assert torch.equal(labels, golden[f"{name}.expected_labels"])


@pytest.mark.parametrize(("golden", "name"), [p for p in cases("course") if p.id.startswith("bpe:")])
def test_mlm_tokenizes_the_reviews_as_transformers_did(golden, name):
    # The course cases hold transformers' ids and word ids (`word_ids()`) of the reviews, concatenated from the
    # case's offset and cut; mlm's tokenizer must give the same, so its whole-word masks are the course's.
    batch, length = golden[f"{name}.input_ids"].shape
    offset, reviews = golden.meta["cases"][name]["offset"], golden.meta["reviews"]
    ids, words, _ = tokenize([reviews[(offset + k) % len(reviews)] for k in range(batch * length)],
                             load_tokenizer(TINY_BPE))
    assert torch.equal(torch.from_numpy(ids[: batch * length].astype(np.int64)).view(batch, length),
                       golden[f"{name}.input_ids"])
    assert torch.equal(torch.from_numpy(words[: batch * length].astype(np.int64)).view(batch, length),
                       golden[f"{name}.word_ids"])


def test_apply_word_selection_rejects_wrong_selection_length():
    name = next(name for name, case in META["cases"].items() if case["kind"] == "course")
    selection = GOLDEN[f"{name}.selection"]
    with pytest.raises(MLMError, match="words"):
        apply_word_selection(GOLDEN[f"{name}.input_ids"], GOLDEN[f"{name}.word_ids"], selection[:-1],
                             mask_token_id=MASK_ID)


# ---------------------------------------------------------------------------------------------------------------
# Whole-word grouping and properties.


def test_word_starts_follow_course_rule():
    # "[CLS] wow [SEP] [CLS] bad movie [SEP] [PAD]": word ids restart per review, so "wow" and "bad" (both 0,
    # separated only by specials) form one word, as in the course collator.
    word_ids = torch.tensor([[-1, 0, -1, -1, 0, 1, 1, -1, -1],
                             [3, 3, 4, -1, 4, 5, -1, -1, -1]])
    starts, in_word = word_starts(word_ids)
    assert starts.int().tolist() == [[0, 1, 0, 0, 0, 1, 0, 0, 0], [1, 0, 1, 0, 0, 1, 0, 0, 0]]
    assert torch.equal(in_word, word_ids >= 0)
    ids = torch.arange(10, 19).repeat(2, 1)
    out, labels = apply_word_selection(ids, word_ids, [1, 0, 0, 1, 0], mask_token_id=MASK_ID)
    assert (out == MASK_ID).int().tolist() == [[0, 1, 0, 0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 1, 0, 0, 0, 0]]
    assert torch.equal(labels, torch.where(out == MASK_ID, ids, IGNORE_INDEX))


def random_words(batch: int, length: int, seed: int):
    """Random chunks: words of 1-4 tokens, specials sprinkled in, padded tails; word ids restart at random."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (batch, length))
    word_ids = np.full((batch, length), -1)
    for b in range(batch):
        w, pos, end = int(rng.integers(0, 5)), 0, length - int(rng.integers(0, length // 4))
        while pos < end:
            if rng.random() < 0.08:
                ids[b, pos] = rng.choice([101, 102])
                pos += 1
                w = int(rng.integers(0, 3)) if rng.random() < 0.5 else w + 1
                continue
            n = int(rng.integers(1, 5))
            word_ids[b, pos:min(pos + n, end)] = w
            w, pos = w + 1, pos + n
        ids[b, end:] = 0
    return torch.from_numpy(ids), torch.from_numpy(word_ids)


def word_index(word_ids: torch.Tensor) -> torch.Tensor:
    starts, in_word = word_starts(word_ids)
    return torch.where(in_word, starts.flatten().cumsum(0).view_as(starts) - 1, -1)


def test_whole_words_are_masked_together():
    ids, word_ids = random_words(32, 64, seed=0)
    out, labels = mask_whole_words(ids, word_ids, mask_token_id=MASK_ID, vocab_size=VOCAB, wwm_probability=0.3,
                                   generator=torch.Generator().manual_seed(0))
    masked = out == MASK_ID
    index = word_index(word_ids)
    assert not masked[index < 0].any()  # specials and padding never
    for w in range(int(index.max()) + 1):
        states = masked[index == w]
        assert states.all() or not states.any()  # all tokens of a word, or none
    assert 0 < masked.sum() < (index >= 0).sum()
    assert torch.equal(labels, torch.where(masked, ids, IGNORE_INDEX))
    assert torch.equal(out[~masked], ids[~masked])


def test_whole_word_replacement_split_is_per_word():
    ids, word_ids = random_words(32, 64, seed=1)
    out, labels = mask_whole_words(ids, word_ids, mask_token_id=MASK_ID, vocab_size=VOCAB, wwm_probability=0.5,
                                   mask_replace_prob=0.5, random_replace_prob=0.0,
                                   generator=torch.Generator().manual_seed(1))
    selected, masked, index = labels != IGNORE_INDEX, out == MASK_ID, word_index(word_ids)
    assert (masked & ~selected).sum() == 0 and (selected & ~masked).any() and masked.any()
    for w in range(int(index.max()) + 1):
        in_w = index == w
        assert selected[in_w].all() or not selected[in_w].any()
        assert masked[in_w].all() or not masked[in_w].any()
    assert torch.equal(labels[selected], ids[selected])


def test_collator_whole_word_mode_with_padding():
    ids, word_ids = random_words(4, 16, seed=2)
    rows = [{"input_ids": ids[i, : 10 + i].numpy(), "word_ids": word_ids[i, : 10 + i].numpy()} for i in range(4)]
    collator = MaskingCollator(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=SPECIALS,
                               whole_word=True, wwm_probability=0.5, seed=3)
    batch = collator(rows)
    assert batch["input_ids"].shape == (4, 13) and batch["attention_mask"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == [10, 11, 12, 13]
    padding = batch["attention_mask"] == 0
    assert (batch["input_ids"][padding] == 0).all() and (batch["labels"][padding] == IGNORE_INDEX).all()
    tuples = MaskingCollator(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=SPECIALS,
                             whole_word=True, wwm_probability=0.5, seed=3)
    again = tuples([(r["input_ids"], r["word_ids"]) for r in rows])
    assert all(torch.equal(batch[k], again[k]) for k in batch)


def test_collator_token_mode_never_masks_padding():
    rows = [np.arange(1000, 1000 + n, dtype=np.int32) for n in (5, 40, 17)]
    collator = MaskingCollator(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=SPECIALS,
                               mlm_probability=1.0, seed=0)
    batch = collator([{"input_ids": r} for r in rows])
    real = batch["attention_mask"].bool()
    assert (batch["labels"][real] != IGNORE_INDEX).all() and (batch["labels"][~real] == IGNORE_INDEX).all()
    assert (batch["input_ids"][~real] == 0).all()


def test_collator_rejects_bad_rows():
    collator = MaskingCollator(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=SPECIALS,
                               whole_word=True)
    with pytest.raises(MLMError, match="word_ids"):
        collator([{"input_ids": np.arange(5)}])
    with pytest.raises(MLMError, match="same length"):
        collator([{"input_ids": np.arange(5), "word_ids": np.arange(4)}])


def _loader_batches(seed: int):
    chunks = np.random.default_rng(0).integers(1000, 30000, (8, 32)).astype(np.int32)
    collator = MaskingCollator(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=SPECIALS, seed=seed)
    loader = torch.utils.data.DataLoader([{"input_ids": c} for c in chunks], batch_size=4, num_workers=2,
                                         collate_fn=collator, multiprocessing_context="fork")
    return chunks, [batch["labels"] for batch in loader]


def test_collator_in_dataloader_workers_derives_seed_per_worker():
    chunks, labels = _loader_batches(seed=10)
    # Batches go round-robin to workers 0 and 1, whose generators are seeded 10 and 11.
    for worker, rows in enumerate((chunks[:4], chunks[4:])):
        expected = mask_tokens(rows, special_tokens_mask(rows, SPECIALS), mask_token_id=MASK_ID,
                               vocab_size=VOCAB, generator=torch.Generator().manual_seed(10 + worker))[1]
        assert torch.equal(labels[worker], expected)
    assert all(torch.equal(a, b) for a, b in zip(labels, _loader_batches(seed=10)[1], strict=True))  # reproducible


# ---------------------------------------------------------------------------------------------------------------
# Statistics on large batches.


def within(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_token_selection_rate_and_80_10_10_split():
    ids, _ = random_words(512, 128, seed=3)
    no_mask = special_tokens_mask(ids, SPECIALS)
    out, labels = mask_tokens(ids, no_mask, mask_token_id=MASK_ID, vocab_size=VOCAB,
                              generator=torch.Generator().manual_seed(3))
    selected = labels != IGNORE_INDEX
    assert not selected[no_mask].any()
    assert within(int(selected.sum()), int((~no_mask).sum()), 0.15)
    n = int(selected.sum())
    replaced = selected & (out == MASK_ID)
    changed = selected & (out != MASK_ID) & (out != ids)  # a random id equal to the original counts as kept
    kept = selected & (out == ids)
    assert within(int(replaced.sum()), n, 0.8)
    assert within(int(changed.sum()), n, 0.1 * (1 - 1 / VOCAB))
    assert within(int(kept.sum()), n, 0.1)
    assert torch.equal(out[~selected], ids[~selected])


def test_whole_word_selection_rate():
    ids, word_ids = random_words(512, 128, seed=4)
    _, labels = mask_whole_words(ids, word_ids, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                 generator=torch.Generator().manual_seed(4))
    starts, _ = word_starts(word_ids)
    chosen = (labels != IGNORE_INDEX) & starts
    assert within(int(chosen.sum()), int(starts.sum()), 0.2)


def test_whole_word_80_10_10_split_per_word():
    ids, word_ids = random_words(512, 128, seed=5)
    out, labels = mask_whole_words(ids, word_ids, mask_token_id=MASK_ID, vocab_size=VOCAB, wwm_probability=0.3,
                                   mask_replace_prob=0.8, random_replace_prob=0.1,
                                   generator=torch.Generator().manual_seed(5))
    selected = labels != IGNORE_INDEX
    starts, in_word = word_starts(word_ids)
    assert torch.equal(out[~selected], ids[~selected])
    # Every token of a selected word shares its word's outcome: 0 [MASK], 1 unchanged, 2 random id. A random id
    # that happens to equal the token or [MASK] (probability 2 / VOCAB per token) would read as another outcome;
    # at this seed none does, which the exact min == max check below relies on.
    outcome = torch.where(out == MASK_ID, 0, torch.where(out == ids, 1, 2))
    word = torch.where(in_word, starts.flatten().cumsum(0).view_as(starts) - 1, 0).flatten()
    n_words = int(starts.sum())
    chosen = selected.flatten()
    low = torch.full((n_words,), 3).scatter_reduce(0, word[chosen], outcome.flatten()[chosen], "amin")
    high = torch.full((n_words,), -1).scatter_reduce(0, word[chosen], outcome.flatten()[chosen], "amax")
    picked = high >= 0  # selected words
    tokens_per_word = torch.bincount(word[in_word.flatten()], minlength=n_words)
    multi = picked & (tokens_per_word > 1)
    assert torch.equal(low[picked], high[picked]), "a selected word came out partly [MASK] / random / unchanged"
    # The split itself, counted over words (not tokens): 80% [MASK], 10% random, 10% unchanged.
    n = int(picked.sum())
    assert within(int((low[picked] == 0).sum()), n, 0.8)
    assert within(int((low[picked] == 1).sum()), n, 0.1)
    assert within(int((low[picked] == 2).sum()), n, 0.1)
    # Multi-token words in each outcome, so the uniformity check above had something to bite on.
    assert all(int((low[multi] == k).sum()) > 100 for k in (0, 1, 2))


# ---------------------------------------------------------------------------------------------------------------
# Determinism, inputs, validation.


def test_same_seed_same_output_and_input_untouched():
    ids_np, word_np = (t.numpy().astype(np.int32) for t in random_words(8, 32, seed=6))
    ids_copy, word_copy = ids_np.copy(), word_np.copy()
    no_mask = special_tokens_mask(ids_np, SPECIALS)
    run = [mask_tokens(ids_np, no_mask, mask_token_id=MASK_ID, vocab_size=VOCAB, mlm_probability=0.5,
                       generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(run[0][0], run[1][0]) and torch.equal(run[0][1], run[1][1])
    assert not torch.equal(run[0][1], run[2][1])
    wwm = [mask_whole_words(ids_np, word_np, mask_token_id=MASK_ID, vocab_size=VOCAB, wwm_probability=0.5,
                            generator=torch.Generator().manual_seed(1)) for _ in range(2)]
    assert torch.equal(wwm[0][0], wwm[1][0]) and torch.equal(wwm[0][1], wwm[1][1])
    assert np.array_equal(ids_np, ids_copy) and np.array_equal(word_np, word_copy)
    ids_t = torch.from_numpy(ids_copy).long()
    mask_tokens(ids_t, no_mask, mask_token_id=MASK_ID, vocab_size=VOCAB, mlm_probability=1.0)
    assert torch.equal(ids_t, torch.from_numpy(ids_np).long())
    assert run[0][0].dtype == wwm[0][0].dtype == torch.int64


def test_special_tokens_mask_helper():
    ids = torch.tensor([[101, 2023, 100, 102, 103, 0, 5]])
    assert special_tokens_mask(ids, SPECIALS).tolist() == [[True, False, True, True, True, True, False]]
    assert special_tokens_mask(ids.numpy().astype(np.int32), SPECIALS).dtype == torch.bool


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32, np.int16, np.int32])
def test_every_integer_dtype_masks_alike(dtype):
    # The chunk store keeps ids as uint16 (int32 past 65,536 tokens): its arrays mask as int64 ones do.
    ids, _ = random_words(4, 16, seed=8)
    narrow = ids.numpy().astype(dtype)
    assert torch.equal(special_tokens_mask(narrow, SPECIALS), special_tokens_mask(ids, SPECIALS))
    kwargs = dict(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=SPECIALS, seed=3)
    expected, got = freeze_eval_masks(ids, **kwargs), freeze_eval_masks(narrow, **kwargs)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


BAD = [dict(mlm_probability=1.5), dict(mlm_probability=-0.1), dict(mlm_probability=float("nan")),
       dict(mask_replace_prob=1.2), dict(random_replace_prob=-0.5), dict(mask_replace_prob=0.8,
       random_replace_prob=0.3)]


@pytest.mark.parametrize("kwargs", BAD)
def test_bad_probabilities_raise_clear_value_error(kwargs):
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with pytest.raises(ValueError, match="must"):
        mask_tokens(ids, special_tokens_mask(ids, SPECIALS), mask_token_id=MASK_ID, vocab_size=VOCAB, **kwargs)
    wwm_kwargs = {("wwm_probability" if k == "mlm_probability" else k): v for k, v in kwargs.items()}
    with pytest.raises(MLMError, match="must"):
        mask_whole_words(ids, torch.tensor([[-1, 0, 1, -1]]), mask_token_id=MASK_ID, vocab_size=VOCAB,
                         **wwm_kwargs)
    with pytest.raises(MLMError, match="must"):
        MaskingCollator(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=SPECIALS, **kwargs)


def test_shape_mismatch_raises():
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with pytest.raises(MLMError, match="shape"):
        mask_tokens(ids, torch.zeros(1, 3, dtype=torch.bool), mask_token_id=MASK_ID, vocab_size=VOCAB)
    with pytest.raises(MLMError, match="2-D"):
        mask_tokens(ids[0], torch.zeros(4, dtype=torch.bool), mask_token_id=MASK_ID, vocab_size=VOCAB)


# ---------------------------------------------------------------------------------------------------------------
# Frozen eval masks.


def test_freeze_eval_masks_is_deterministic_and_leaves_global_rng_alone():
    ids, word_ids = random_words(16, 32, seed=7)
    before = torch.get_rng_state()
    kwargs = dict(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=SPECIALS, seed=123)
    first, second = freeze_eval_masks(ids, **kwargs), freeze_eval_masks(ids.numpy(), **kwargs)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(first) == {"input_ids", "labels"}
    assert all(torch.equal(first[k], second[k]) for k in first)
    expected = mask_tokens(ids, special_tokens_mask(ids, SPECIALS), mask_token_id=MASK_ID, vocab_size=VOCAB,
                           generator=torch.Generator().manual_seed(123))
    assert torch.equal(first["input_ids"], expected[0]) and torch.equal(first["labels"], expected[1])
    other = freeze_eval_masks(ids, **{**kwargs, "seed": 124})
    assert not torch.equal(first["labels"], other["labels"])

    whole = freeze_eval_masks(ids, word_ids, whole_word=True, **kwargs)
    expected = mask_whole_words(ids, word_ids, mask_token_id=MASK_ID, vocab_size=VOCAB,
                                generator=torch.Generator().manual_seed(123))
    assert torch.equal(whole["labels"], expected[1])
    with pytest.raises(MLMError, match="word_ids"):
        freeze_eval_masks(ids, whole_word=True, **kwargs)


def test_collator_from_tokenizer_reads_its_ids():
    from types import SimpleNamespace

    tok = SimpleNamespace(mask_token_id=MASK_ID, vocab_size=VOCAB, special_token_ids=tuple(SPECIALS), pad_token_id=0)
    collator = MaskingCollator.from_tokenizer(tok, whole_word=True)
    assert collator.special_token_ids == tuple(SPECIALS)
    assert (collator.mask_token_id, collator.vocab_size) == (MASK_ID, VOCAB)
    assert (collator.mask_replace_prob, collator.random_replace_prob) == (1.0, 0.0)


def test_word_starts_of_a_stores_read_only_rows_warns_nothing():
    # A memory-mapped store's rows are read-only: torch warned ("The given NumPy array is not writable").
    import warnings

    import numpy as np

    from mlm.masking import word_starts

    rows = np.array([[-1, 0, 0, 1, -1]], dtype=np.int32)
    rows.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        starts, in_word = word_starts(rows)
    assert starts.tolist() == [[False, True, False, True, False]]
    assert in_word.tolist() == [[False, True, True, True, False]]
