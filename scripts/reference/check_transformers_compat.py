"""Check that a model saved by mlm loads unchanged in transformers (developer-only, needs the reference extra).

Saves a random mlm model (a local --config, default the full distilbert-base-uncased shape) with its tokenizer,
loads the folder with AutoModelForMaskedLM and pipeline("fill-mask"), and compares logits and predictions.

    python scripts/reference/check_transformers_compat.py --model-dir path/to/distilbert-base-uncased

With --families, for each family (DistilBERT, BERT, RoBERTa): mlm loads the tiny model transformers saved
(tests/fixtures/tiny-*), saves it again, and AutoModelForMaskedLM must load that as the family's *ForMaskedLM, no
tensor missing or unexpected, with equal logits; then the same for a random base-size model of each family.

    python scripts/reference/check_transformers_compat.py --families
"""

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

try:
    from transformers import AutoModelForMaskedLM, pipeline
except ImportError as err:  # pragma: no cover - developer script
    raise SystemExit(f"This script needs transformers: pip install -e '.[reference]' ({err})") from None

from mlm.files.families import ARCHITECTURES
from mlm.files.pretrained import config_from_dict, load_config, load_pretrained, save_pretrained
from mlm.fill_mask import fill_mask
from mlm.model import DistilBertForMaskedLM
from mlm.tokenizer import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", help="folder with config.json and the tokenizer files")
    parser.add_argument("--sentence", default="This is a great [MASK].")
    parser.add_argument("--families", action="store_true", help="check the three families' layouts instead")
    args = parser.parse_args()
    if args.families:
        return check_families()
    if args.model_dir is None:
        parser.error("--model-dir is required without --families")

    torch.manual_seed(0)
    ours = DistilBertForMaskedLM(load_config(args.model_dir)).eval()
    tokenizer = load_tokenizer(args.model_dir)
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(ours, folder, tokenizer=tokenizer)
        theirs = AutoModelForMaskedLM.from_pretrained(folder).eval()
        ids = torch.tensor([tokenizer.backend.encode(args.sentence).ids])
        with torch.no_grad():
            difference = (theirs(input_ids=ids).logits - ours(ids).logits).abs().max().item()
        print(f"AutoModelForMaskedLM loaded the mlm folder; max |logit difference| = {difference:.3g}")
        assert difference < 1e-4, difference
        theirs_top = [p["token"] for p in pipeline("fill-mask", model=folder, top_k=5)(args.sentence)]
        ours_top = [p.token_id for p in fill_mask(ours, tokenizer, [args.sentence], top_k=5)[0][0]]
        print(f"pipeline('fill-mask') top-5 ids {theirs_top}, mlm's {ours_top}")
        assert theirs_top == ours_top
    print("OK: transformers reads mlm's saved model and tokenizer unchanged")



FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
BASE = {"distilbert": {}, "bert": {}, "roberta": {"max_position_embeddings": 514, "type_vocab_size": 1,
                                                  "layer_norm_eps": 1e-5}}  # roberta-base's own values


def compare(ours, folder: str, family: str, ids: torch.Tensor, mask: torch.Tensor) -> str:
    """Load mlm's saved `folder` with AutoModelForMaskedLM; its class and logits must be the family's and mlm's."""
    theirs, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    assert type(theirs).__name__ == ARCHITECTURES[family], type(theirs).__name__
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    theirs.eval(), ours.eval()
    with torch.no_grad():
        differences = [(theirs(input_ids=ids, attention_mask=m).logits - ours(ids, m).logits).abs().max().item()
                       for m in (None, mask)]
    assert max(differences) < 1e-4, differences
    return f"{type(theirs).__name__}, max |logit difference| unpadded {differences[0]:.3g}, padded {differences[1]:.3g}"


def check_families() -> None:
    for family in ARCHITECTURES:
        tiny = FIXTURES / f"tiny-{family}"
        name = "model_golden.safetensors" if family == "distilbert" else f"{family}_golden.safetensors"
        golden = load_file(FIXTURES / name)
        ours = load_pretrained(tiny)
        with tempfile.TemporaryDirectory() as folder:
            save_pretrained(ours, folder)
            saved, original = load_file(Path(folder) / "model.safetensors"), load_file(tiny / "model.safetensors")
            assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
            print(f"tiny {family}: mlm re-saved transformers' file tensor for tensor; AutoModelForMaskedLM loads it as "
                  + compare(ours, folder, family, golden["padded_input_ids"], golden["attention_mask"]))
        torch.manual_seed(0)
        ours = DistilBertForMaskedLM(config_from_dict({"model_type": family, **BASE[family]}))
        ids = torch.randint(5, 1000, (2, 128))
        mask = torch.ones_like(ids)
        mask[1, 100:] = 0
        ids[1, 100:] = ours.config.pad_token_id
        with tempfile.TemporaryDirectory() as folder:
            save_pretrained(ours, folder)
            print(f"base {family} (random): AutoModelForMaskedLM loads mlm's save as " + compare(ours, folder, family,
                                                                                                 ids, mask))
    print("OK: transformers reads each family's model saved by mlm unchanged")


if __name__ == "__main__":
    main()
