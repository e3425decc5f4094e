"""Check that a model whose vocabulary mlm extended (`--add-tokens`) loads in transformers and tokenizes the same.

Developer-only (needs the reference extra). For each tokenizer family, BERT's WordPiece (--tokenizer, e.g.
distilbert-base-uncased's files) with a random tiny BERT (tests/fixtures/tiny-bert's config), and byte-level BPE
laid out as RoBERTa's (tests/fixtures/tiny-bpe) with a random tiny RoBERTa: add words to the tokenizer and the model
with mlm (mlm/vocabulary.py), save the folder as a run does, and load it with AutoTokenizer and
AutoModelForMaskedLM. Checks that each added word is one token in transformers too, that the
ids and word ids of a few texts are mlm's, that the new rows are the mean of the pieces' rows, and that the
logits agree.

    python scripts/reference/check_added_tokens.py --tokenizer path/to/distilbert-base-uncased
"""

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch

try:
    from transformers import AutoModelForMaskedLM, AutoTokenizer
except ImportError as err:  # pragma: no cover - developer script
    raise SystemExit(f"This script needs transformers: pip install -e '.[reference]' ({err})") from None

from mlm.files.pretrained import load_config, save_pretrained
from mlm.model import DistilBertForMaskedLM
from mlm.tokenizer import load_tokenizer
from mlm.vocabulary import add_words

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["believable", "Cheesy", "unconvincing"]  # split by both tokenizers (IMDb's report lists them)
TEXTS = ["The plot was UNCONVINCING, cheesy and unbelievable.", "believable\n\n cheesy unconvincingly",
         "A naïve, believable, Cheesy cast."]


def check(folder: str, name: str, family: str) -> None:
    tokenizer = load_tokenizer(folder)
    torch.manual_seed(0)
    config = load_config(ROOT / "tests" / "fixtures" / f"tiny-{family}")
    model = DistilBertForMaskedLM(dataclasses.replace(config, vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():
        model.vocab_projector.bias.normal_()
    embeddings = model.distilbert.embeddings.word_embeddings.weight.detach().clone()
    bias = model.vocab_projector.bias.detach().clone()
    extended, model = add_words(tokenizer, model, WORDS)
    with tempfile.TemporaryDirectory() as saved:
        save_pretrained(model, saved, tokenizer=extended)
        print(f"{name} ({family}): mlm saved {sorted(p.name for p in Path(saved).iterdir())}")
        theirs = AutoTokenizer.from_pretrained(saved)
        added = [word for word, index in theirs.get_vocab().items() if index >= tokenizer.vocab_size]
        print(f"  transformers: {type(theirs).__name__}, len {len(theirs)} (was {tokenizer.vocab_size}); added {added}")
        for text in TEXTS:
            ours = extended.backend.encode(text)
            encoded = theirs(text)
            assert encoded["input_ids"] == ours.ids and encoded.word_ids() == ours.word_ids, text
            print(f"  {text!r} -> {theirs.convert_ids_to_tokens(encoded['input_ids'])}")
        for word in added:
            assert len(theirs(word, add_special_tokens=False)["input_ids"]) == 1, word
        hf = AutoModelForMaskedLM.from_pretrained(saved).eval()
        new, new_bias = hf.get_input_embeddings().weight.detach(), hf.get_output_embeddings().bias.detach()
        for word in added:
            pieces = tokenizer.backend.encode((" " if name == "bpe" else "") + word, add_special_tokens=False).ids
            index = theirs.convert_tokens_to_ids(word)
            assert torch.equal(new[index], embeddings[pieces].mean(0)), word
            assert torch.equal(new_bias[index], bias[pieces].mean(0)), word
        ids = torch.tensor([extended.backend.encode(TEXTS[0]).ids])
        with torch.no_grad():
            difference = (hf(input_ids=ids).logits - model(ids).logits).abs().max().item()
        print(f"  AutoModelForMaskedLM: {type(hf).__name__}, vocab_size {hf.config.vocab_size}, new rows = mean of "
              f"pieces, max |logit difference| {difference:.2g}")
        assert difference < 1e-5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="folder with a BERT WordPiece tokenizer.json")
    args = parser.parse_args()
    check(args.tokenizer, "wordpiece", "bert")
    check(str(ROOT / "tests" / "fixtures" / "tiny-bpe"), "bpe", "roberta")
    print("OK: transformers loads the extended folders and splits each added word into one token, as mlm does")


if __name__ == "__main__":
    main()
