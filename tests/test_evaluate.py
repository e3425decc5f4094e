"""mlm.evaluate against figures computed independently here: one plain forward of the whole eval set, the
cross-entropy and the top-1 prediction read off the full (N, L, V) logits at the labelled positions."""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from mlm.evaluate import evaluate
from mlm.files.pretrained import load_pretrained
from mlm.masking import freeze_eval_masks

TINY = Path(__file__).parent / "fixtures" / "tiny-distilbert"  # vocab 128, dim 32, 2 layers
SPECIALS = [0, 1, 2, 3, 4]
MASK_ID = 4


def eval_set(rows=7, length=24):
    ids = torch.randint(5, 128, (rows, length), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 2, 3
    return freeze_eval_masks(ids, mask_token_id=MASK_ID, vocab_size=128, special_token_ids=SPECIALS, seed=1,
                             mlm_probability=0.3)


def test_accuracy_and_loss_match_the_full_logits():
    model = load_pretrained(TINY).eval()
    masked = eval_set()
    with torch.no_grad():
        full = model(masked["input_ids"]).logits  # (N, L, V): every position, no label path involved
    labelled = masked["labels"] != -100
    predicted = full.argmax(dim=-1)  # over the vocabulary
    # A random model rarely predicts the original token, so accuracy would be ~0 and an argmin, or an argmax
    # over the wrong axis, could pass unnoticed. Relabel: every other labelled position gets the model's own
    # top-1 as its target, the others a token it does not predict, so the expected accuracy is about one half and
    # known exactly. (Labels are targets only: the model's input, and so its logits, do not change.)
    positions = labelled.nonzero()
    labels = masked["labels"].clone()
    for i, (row, col) in enumerate(positions.tolist()):
        labels[row, col] = predicted[row, col] if i % 2 == 0 else (predicted[row, col] + 1 + i % 7) % 128
    # The label path projects only the labelled rows, so its logits may differ from these by fp32 rounding;
    # keep clear of near-ties so the argmax cannot flip on it.
    top2 = full[labelled].topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4

    correct = int((predicted[labelled] == labels[labelled]).sum())
    tokens = int(labelled.sum())
    assert correct == (tokens + 1) // 2 and tokens > 20
    token_losses = F.cross_entropy(full[labelled], labels[labelled], reduction="none")

    result = evaluate(model, masked["input_ids"], labels, batch_size=3)  # 3 + 3 + 1 rows
    assert result.tokens == tokens and result.sequences == 7
    assert result.accuracy == correct / tokens
    # fp32 logits, float64 sums: the means agree to a few fp32 ulps of the per-token losses.
    assert math.isclose(result.loss, token_losses.double().mean().item(), rel_tol=1e-6)
    assert math.isclose(result.perplexity, math.exp(token_losses.double().mean().item()), rel_tol=1e-6)
