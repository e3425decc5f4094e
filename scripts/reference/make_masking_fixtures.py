"""Regenerate tests/fixtures/masking_golden*.{safetensors,json} from the reference implementations.

Developer-only: needs transformers (`pip install -e ".[reference]"`, fixtures made with 5.25.0). Once per tokenizer
family: BERT's WordPiece (the distilbert-base-uncased tokenizer files, no weights) and byte-level BPE laid out as
RoBERTa's (tests/fixtures/tiny-bpe, made by make_tiny_bpe.py; no real RoBERTa vocabulary is at hand offline, and
the code path is the same):

    python scripts/reference/make_masking_fixtures.py --tokenizer path/to/distilbert-base-uncased
    python scripts/reference/make_masking_fixtures.py --tokenizer tests/fixtures/tiny-bpe --fixture masking_golden_bpe

The reviews are the same for both, but that the literal [MASK] is written as the tokenizer's mask token, and that a
tokenizer without unknown characters (byte-level BPE has a piece for every byte) gets its unknown token written
out where BERT's meets ☃. The JSON file keeps the reviews as tokenized, so the tests can tokenize them with mlm.

Three kinds of cases, each a group of tensors named "<case>.<tensor>" plus an entry in the JSON file:

- "token": `DataCollatorForLanguageModeling` (global torch RNG after torch.manual_seed(seed), or its own seeded
  generator over consecutive calls). Stored: the padded batch before masking, the special-tokens mask the
  collator used (only when it came from a column), the collator's output, and the SHA-256 of the RNG state after
  the call (`torch.get_rng_state()` or `collator.generator.get_state()`), which compares the full state exactly.
- "wwm524": `DataCollatorForLanguageModeling(whole_word_mask=True)` with the offset-based word ids it computes.
- "wwm_split": whole-word masking with 80/10/10 decided once per WORD (mlm's option). No reference collator does
  this: transformers 5.24 forces mask_replace_prob to 1 with whole_word_mask=True. So the selection and the RNG
  use of the first two draws come from that collator (bernoulli consumes the same numbers whatever p is, so its
  bernoulli(1.0) advances the RNG as a bernoulli(0.8) does; the replay's state is checked equal to the
  collator's), and the two further draws follow mlm's documented order (docs/reference.md#masking-draws:
  bernoulli(0.1 / 0.2), then randint(vocab) over the full shape). Each word then takes the decision drawn at
  its first token, in a plain loop over words written independently of mlm's vectorised code.
- "course": the HF course chapter 7 whole-word collator (written out below from its published code), with its
  numpy selection, so `apply_word_selection` can be checked against it.

Integers are stored as int32 to keep the file small; the tests cast them to int64.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

try:
    import transformers
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, default_data_collator
except ImportError as err:  # pragma: no cover - developer script
    raise SystemExit(f"This script needs transformers: pip install -e '.[reference]' ({err})") from None
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))  # the course's collator is defined once, in bench/bench_masking.py
from bench_masking import course_whole_word_masking  # noqa: E402

OUT = ROOT / "tests" / "fixtures"

# IMDb-like reviews. They contain [UNK] (emoji, snowman), a literal [MASK], and one-word reviews whose word id 0
# meets the next review's word id 0 across [SEP] [CLS] (the course's grouping merges them).
REVIEWS = [
    "This movie was great fun, I'd watch it again 😀 with friends.",
    "Wow",
    "Bad movie. The [MASK] plot was hyperparameterized nonsense!",
    "An absolute ☃ masterpiece of 1970s cinema; the soundtrack alone is worth it.",
    "Boring",
    "Isn't it ironic? The director's cut is three hours long and still feels rushed.",
    "I laughed, I cried, I fell asleep. 🎬 Seven out of ten.",
    "The acting is wooden, the dialogue clunky, and yet I couldn't look away.",
    "Meh",
    "Great",
    "A quiet, patient film about grief that rewards attention [MASK] and repeated viewings.",
]


def for_tokenizer(tok, text: str) -> str:
    """A review with the tokenizer's own special tokens where BERT's are meant (see the docstring)."""
    text = text.replace("[MASK]", tok.mask_token)
    return text if tok("☃", add_special_tokens=False)["input_ids"] == [tok.unk_token_id] else \
        text.replace("☃", tok.unk_token)


def sha(state: torch.Tensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(hashlib.sha256(state.numpy().tobytes()).digest()), dtype=torch.uint8)


def concatenated(tok, n_tokens: int, offset: int = 0):
    """Course-style group_texts stream: reviews tokenized with [CLS]/[SEP], concatenated, cycled."""
    ids, words, offsets = [], [], []
    k = offset
    while len(ids) < n_tokens:
        enc = tok(REVIEWS[k % len(REVIEWS)], return_offsets_mapping=True)
        ids += enc["input_ids"]
        words += [-1 if w is None else w for w in enc.word_ids()]
        offsets += enc["offset_mapping"]
        k += 1
    return ids[:n_tokens], words[:n_tokens], offsets[:n_tokens]


def chunks(tok, batch: int, length: int, offset: int = 0):
    ids, words, offsets = concatenated(tok, batch * length, offset)
    cut = lambda seq: [seq[i * length:(i + 1) * length] for i in range(batch)]  # noqa: E731
    return cut(ids), cut(words), cut(offsets)


def ragged(tok, batch: int, max_len: int, offset: int = 0):
    """Whole reviews (with [CLS]/[SEP]) truncated to max_len: rows of different lengths, padded by the collator."""
    rows = []
    for i in range(batch):
        enc = tok(REVIEWS[(offset + i) % len(REVIEWS)], return_special_tokens_mask=True)
        rows.append({k: enc[k][:max_len] for k in ("input_ids", "special_tokens_mask")})
    return rows


def token_cases(tok, tensors: dict, meta: dict) -> None:
    specs = [
        # name, seed, rows, probabilities (mlm, mask, random), use the tokenizer's special_tokens_mask column
        ("chunks_b4_l32_s0", 0, ("chunks", 4, 32, 0), (0.15, 0.8, 0.1), False),
        ("chunks_b4_l32_s1", 1, ("chunks", 4, 32, 0), (0.15, 0.8, 0.1), False),
        ("chunks_b8_l64_s42", 42, ("chunks", 8, 64, 3), (0.15, 0.8, 0.1), False),
        ("chunks_b1_l17_s1234", 1234, ("chunks", 1, 17, 5), (0.15, 0.8, 0.1), False),
        ("chunks_b3_l7_s5", 5, ("chunks", 3, 7, 2), (0.5, 0.8, 0.1), False),
        ("ragged_b5_s0", 0, ("ragged", 5, 40, 0), (0.15, 0.8, 0.1), False),
        ("ragged_b5_s42", 42, ("ragged", 5, 40, 4), (0.3, 0.8, 0.1), False),
        ("ragged_b2_s9_column", 9, ("ragged", 2, 33, 1), (0.4, 0.8, 0.1), True),
        ("ragged_b6_s3_column", 3, ("ragged", 6, 30, 6), (0.15, 0.8, 0.1), True),
        ("chunks_b4_l32_s7_mask_only", 7, ("chunks", 4, 32, 1), (0.3, 1.0, 0.0), False),
        ("chunks_b4_l32_s8_no_random", 8, ("chunks", 4, 32, 1), (0.3, 0.8, 0.0), False),
        ("chunks_b4_l32_s11_50_30", 11, ("chunks", 4, 32, 2), (0.4, 0.5, 0.3), False),
        ("ragged_b3_s12_50_30", 12, ("ragged", 3, 25, 7), (0.5, 0.5, 0.3), False),
        ("chunks_b2_l31_s13_random_only", 13, ("chunks", 2, 31, 8), (0.5, 0.0, 1.0), False),
    ]
    for name, seed, (kind, batch, length, offset), (p, mask_p, random_p), column in specs:
        if kind == "chunks":
            rows = [{"input_ids": r} for r in chunks(tok, batch, length, offset)[0]]
        else:
            rows = ragged(tok, batch, length, offset)
            if not column:
                rows = [{"input_ids": r["input_ids"]} for r in rows]
        collator = DataCollatorForLanguageModeling(
            tok, mlm_probability=p, mask_replace_prob=mask_p, random_replace_prob=random_p)
        padded = tok.pad(rows, return_tensors="pt")  # the batch the collator masks (no RNG involved)
        torch.manual_seed(seed)
        out = collator(rows)
        tensors[f"{name}.input_ids"] = padded["input_ids"].int()
        if column:
            tensors[f"{name}.special_mask"] = padded["special_tokens_mask"].to(torch.uint8)
        tensors[f"{name}.expected_input_ids"] = out["input_ids"].int()
        tensors[f"{name}.expected_labels"] = out["labels"].int()
        tensors[f"{name}.rng_sha256"] = sha(torch.get_rng_state())
        meta[name] = {"kind": "token", "seed": seed, "generator": "global", "mlm_probability": p,
                      "mask_replace_prob": mask_p, "random_replace_prob": random_p,
                      "special_mask": "column" if column else "ids"}

    # The collator's own generator (seed=7): consecutive calls keep advancing it; the global RNG is untouched.
    collator = DataCollatorForLanguageModeling(tok, seed=7)
    for call in range(2):
        name = f"private_seed7_call{call}"
        rows = [{"input_ids": r} for r in chunks(tok, 3, 24, call)[0]]
        out = collator(rows)
        tensors[f"{name}.input_ids"] = torch.tensor([r["input_ids"] for r in rows], dtype=torch.int32)
        tensors[f"{name}.expected_input_ids"] = out["input_ids"].int()
        tensors[f"{name}.expected_labels"] = out["labels"].int()
        tensors[f"{name}.rng_sha256"] = sha(collator.generator.get_state())
        meta[name] = {"kind": "token", "seed": 7, "generator": "private", "call": call, "mlm_probability": 0.15,
                      "mask_replace_prob": 0.8, "random_replace_prob": 0.1, "special_mask": "ids"}


def wwm524_cases(tok, tensors: dict, meta: dict) -> None:
    for seed, (batch, length, offset), p in [(0, (4, 32, 0), 0.15), (3, (3, 40, 2), 0.3), (99, (1, 29, 5), 0.5)]:
        name = f"wwm524_b{batch}_l{length}_s{seed}"
        ids, _, offsets = chunks(tok, batch, length, offset)
        rows = [{"input_ids": i, "offset_mapping": o} for i, o in zip(ids, offsets, strict=True)]
        collator = DataCollatorForLanguageModeling(tok, whole_word_mask=True, mlm_probability=p,
                                                   mask_replace_prob=1.0, random_replace_prob=0.0)
        special = np.array([tok.get_special_tokens_mask(r, already_has_special_tokens=True) for r in ids])
        word_ids, _ = collator._calc_word_ids_and_prob_mask(np.array(offsets), special)
        torch.manual_seed(seed)
        out = collator(rows)
        tensors[f"{name}.input_ids"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"{name}.word_ids"] = torch.from_numpy(word_ids.astype(np.int32))
        tensors[f"{name}.expected_input_ids"] = out["input_ids"].int()
        tensors[f"{name}.expected_labels"] = out["labels"].int()
        tensors[f"{name}.rng_sha256"] = sha(torch.get_rng_state())
        meta[name] = {"kind": "wwm524", "seed": seed, "wwm_probability": p}


def per_word_split(ids, word_ids, selected, to_mask, to_random, random_ids, mask_token_id):
    """Whole-word 80/10/10, one word at a time: each token of a word takes the decision drawn at its first token
    ([MASK], its own random id from `random_ids`, or unchanged). Returns (input_ids, labels) as nested lists."""
    out, labels = [list(row) for row in ids], [[-100] * len(row) for row in ids]
    for b, row in enumerate(word_ids):
        words: dict = {}
        for i, w in enumerate(row):
            if w >= 0:
                words.setdefault(w, []).append(i)  # transformers' word ids are cumulative: never reused in a row
        for positions in words.values():
            first = positions[0]
            if not selected[b][first]:
                continue
            for i in positions:
                labels[b][i] = ids[b][i]
                if to_mask[b][first]:
                    out[b][i] = mask_token_id
                elif to_random[b][first]:
                    out[b][i] = random_ids[b][i]
    return out, labels


def wwm_split_cases(tok, tensors: dict, meta: dict) -> None:
    for seed, (batch, length, offset), p in [(10, (4, 32, 0), 0.5), (17, (6, 40, 3), 0.6)]:
        name = f"wwm_split_b{batch}_l{length}_s{seed}"
        ids, _, offsets = chunks(tok, batch, length, offset)
        rows = [{"input_ids": i, "offset_mapping": o} for i, o in zip(ids, offsets, strict=True)]
        collator = DataCollatorForLanguageModeling(tok, whole_word_mask=True, mlm_probability=p,
                                                   mask_replace_prob=1.0, random_replace_prob=0.0)
        special = np.array([tok.get_special_tokens_mask(r, already_has_special_tokens=True) for r in ids])
        word_ids, no_mask = collator._calc_word_ids_and_prob_mask(np.array(offsets), special)
        torch.manual_seed(seed)
        out = collator(rows)
        collator_state = torch.get_rng_state()
        # The collator's two draws replayed on its shapes (torch_mask_tokens in 5.24), then the two further ones.
        shape = (batch, length)
        torch.manual_seed(seed)
        first_draw = torch.bernoulli(torch.full(shape, p).masked_fill_(torch.from_numpy(no_mask), 0.0)).bool()
        to_mask = torch.bernoulli(torch.full(shape, 0.8)).bool()
        assert torch.equal(torch.get_rng_state(), collator_state), "the replay must make the collator's draws"
        to_random = torch.bernoulli(torch.full(shape, 0.1 / (1 - 0.8))).bool()
        random_ids = torch.randint(len(tok), shape, dtype=torch.long)
        final_state = torch.get_rng_state()
        expected_ids, expected_labels = per_word_split(ids, word_ids.tolist(), first_draw.tolist(), to_mask.tolist(),
                                                       to_random.tolist(), random_ids.tolist(), tok.mask_token_id)
        expected_ids, expected_labels = torch.tensor(expected_ids), torch.tensor(expected_labels)
        assert torch.equal(expected_labels, out["labels"]), "the selection is the collator's"
        tensors[f"{name}.input_ids"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"{name}.word_ids"] = torch.from_numpy(word_ids.astype(np.int32))
        tensors[f"{name}.expected_input_ids"] = expected_ids.int()
        tensors[f"{name}.expected_labels"] = expected_labels.int()
        tensors[f"{name}.rng_sha256"] = sha(final_state)
        meta[name] = {"kind": "wwm_split", "seed": seed, "wwm_probability": p, "mask_replace_prob": 0.8,
                      "random_replace_prob": 0.1}


def course_cases(tok, tensors: dict, meta: dict) -> None:
    for seed, (batch, length, offset), p in [(0, (4, 32, 0), 0.2), (42, (4, 32, 3), 0.2), (5, (2, 48, 1), 0.5)]:
        name = f"course_b{batch}_l{length}_s{seed}"
        ids, words, _ = chunks(tok, batch, length, offset)
        features = [{"input_ids": list(i), "labels": list(i), "word_ids": [None if w < 0 else w for w in ws]}
                    for i, ws in zip(ids, words, strict=True)]
        selections: list = []
        np.random.seed(seed)
        out = default_data_collator(course_whole_word_masking(features, tok, p, selections))
        tensors[f"{name}.input_ids"] = torch.tensor(ids, dtype=torch.int32)
        tensors[f"{name}.word_ids"] = torch.tensor(words, dtype=torch.int32)
        tensors[f"{name}.selection"] = torch.from_numpy(np.concatenate(selections).astype(np.uint8))
        tensors[f"{name}.expected_input_ids"] = out["input_ids"].int()
        tensors[f"{name}.expected_labels"] = out["labels"].int()
        meta[name] = {"kind": "course", "seed": seed, "wwm_probability": p, "offset": offset}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="folder (or Hub id) of the tokenizer: "
                        "distilbert-base-uncased's, or tests/fixtures/tiny-bpe")
    parser.add_argument("--fixture", default="masking_golden", help="file name, without suffix, in tests/fixtures")
    args = parser.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    REVIEWS[:] = [for_tokenizer(tok, text) for text in REVIEWS]  # what every case below tokenizes
    assert torch.get_default_dtype() == torch.float32
    tensors: dict = {}
    cases: dict = {}
    token_cases(tok, tensors, cases)
    wwm524_cases(tok, tensors, cases)
    wwm_split_cases(tok, tensors, cases)
    course_cases(tok, tensors, cases)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(OUT / f"{args.fixture}.safetensors"))
    meta = {
        "generated_with": {"transformers": transformers.__version__, "torch": torch.__version__,
                           "numpy": np.__version__, "tokenizer": Path(args.tokenizer).name},
        "mask_token_id": tok.mask_token_id,
        "vocab_size": len(tok),
        "special_token_ids": sorted(tok.all_special_ids),
        "reviews": REVIEWS,
        "cases": cases,
    }
    (OUT / f"{args.fixture}.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    size = (OUT / f"{args.fixture}.safetensors").stat().st_size
    print(f"wrote {len(cases)} cases, {size} bytes, to {OUT}")


if __name__ == "__main__":
    main()
