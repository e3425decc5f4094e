"""Train tests/fixtures/tiny-bpe/: a small byte-level BPE tokenizer laid out as RoBERTa's, for the tests.

No RoBERTa vocabulary is available offline, but the code path of every byte-level BPE tokenizer is the same: the
ByteLevel pre-tokenizer (a word is one of its splits, "Ġ" marking the space before it), a BPE model without an
unknown token (every byte has a piece), RoBERTa's post-processor (<s> … </s>) and special tokens named in
tokenizer_config.json. Trained on mlm/smoke/reviews.jsonl with the `tokenizers` library only, so any Python with
mlm's dependencies reruns it:

    python scripts/reference/make_tiny_bpe.py

The training is deterministic (same corpus, same settings, same vocabulary and merges: the script checks it by
training twice); the ids of the special tokens are RoBERTa's order (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask> last).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "mlm" / "smoke" / "reviews.jsonl"
OUT = ROOT / "tests" / "fixtures" / "tiny-bpe"
VOCAB_SIZE = 600
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]  # <mask> comes last, as in RoBERTa


def train(texts: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE - 1, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # RoBERTa's <mask> swallows the space before it, so "a <mask>." predicts the word with its "Ġ".
    tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, normalized=False)])
    tokenizer.post_processor = processors.RobertaProcessing(
        ("</s>", tokenizer.token_to_id("</s>")), ("<s>", tokenizer.token_to_id("<s>")),
        trim_offsets=True, add_prefix_space=False)
    return tokenizer


def main() -> None:
    texts = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines()]
    tokenizer = train(texts)
    if tokenizer.to_str() != train(texts).to_str():
        raise SystemExit("training twice gave two tokenizers: not deterministic")
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(OUT / "tokenizer.json"))
    config = {"tokenizer_class": "RobertaTokenizer", "model_max_length": 128, "add_prefix_space": False,
              "trim_offsets": True, "bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
              "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>"}
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {OUT}: {tokenizer.get_vocab_size()} tokens")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
