"""DistilBERT: parity with the reference's outputs, the sparse MLM head, and loading/saving checkpoints."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mlm.errors import MLMError
from mlm.files.pretrained import config_from_dict, config_to_dict, load_model, load_pretrained, save_pretrained
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.speed.compiled import label_positions
from mlm.tokenizer import load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"
TINY_DIR = FIXTURES / "tiny-distilbert"  # written by transformers' save_pretrained (scripts/reference/)
# Logits of the same fp32 operations agree bit for bit on one machine; across CPUs the BLAS may block and
# vectorise the matmuls differently, which moves fp32 results by a few ulp (~1e-7 relative) per operation. Two
# layers of such noise stay far below 1e-5 on logits of order 1.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def golden():
    return load_file(FIXTURES / "model_golden.safetensors")


@pytest.fixture()
def tiny_model():
    return load_pretrained(TINY_DIR).eval()


def tiny_config(**overrides) -> DistilBertConfig:
    values = dict(vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32)
    return DistilBertConfig(**{**values, **overrides})


# ---------------------------------------------------------------- parity with the reference

@torch.no_grad()
@pytest.mark.parametrize("case", ["unpadded", "padded"])
def test_logits_and_loss_match_reference(tiny_model, golden, case):
    ids = golden["input_ids"] if case == "unpadded" else golden["padded_input_ids"]
    mask = None if case == "unpadded" else golden["attention_mask"]
    labels = golden["labels"].masked_fill(ids == 0, -100)

    full = tiny_model(ids, mask)
    torch.testing.assert_close(full.logits, golden[f"logits_{case}"], **TOL)
    assert full.loss is None

    sparse = tiny_model(ids, mask, labels)
    torch.testing.assert_close(sparse.loss.reshape(1), golden[f"loss_{case}"], **TOL)
    # Sparse logits are the labelled rows of the full logits, in row-major position order.
    torch.testing.assert_close(sparse.logits, golden[f"logits_{case}"][labels != -100], **TOL)


@torch.no_grad()
def test_all_ones_mask_equals_no_mask(tiny_model, golden):
    ids = golden["input_ids"]
    assert torch.equal(tiny_model(ids, torch.ones_like(ids)).logits, tiny_model(ids).logits)


def test_full_size_parameter_count():
    with torch.device("meta"):  # no memory, no init time
        model = DistilBertForMaskedLM(DistilBertConfig())
    assert model.num_parameters() == 66_985_530  # the tied matrix counted once
    assert model.vocab_projector.weight is model.distilbert.embeddings.word_embeddings.weight
    assert len(model.state_dict()) == 106 and len(list(model.named_parameters())) == 105


# ---------------------------------------------------------------- the sparse head

def test_sparse_head_loss_and_gradients_equal_full_projection():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(tiny_config()).eval()
    ids = torch.randint(5, 50, (3, 12))
    labels = torch.where(torch.rand(3, 12) < 0.2, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]  # at least one labelled token

    sparse = model(ids, labels=labels)
    sparse.loss.backward()
    sparse_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    logits = model(ids).logits  # (B, L, V)
    full_loss = F.cross_entropy(logits.view(-1, 50), labels.view(-1), ignore_index=-100)
    full_loss.backward()
    # Same math, different matmul shapes (N rows vs B·L rows) and summation order: fp32 rounding only.
    torch.testing.assert_close(sparse.loss, full_loss, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(sparse_grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_output_positions_give_the_full_hidden_states_at_those_rows():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(tiny_config()).eval()
    ids = torch.randint(5, 50, (3, 12))
    attention_mask = torch.ones_like(ids)
    attention_mask[2, 7:] = 0  # padded keys must stay masked for the selected queries too
    positions = torch.tensor([0, 5, 11, 14, 30, 31, 35])
    full = model.distilbert(ids, attention_mask)  # (B, L, D)
    selected = model.distilbert(ids, attention_mask, output_positions=positions)  # (N, D)
    # The same operations on fewer rows; a matmul over 7 rows may round differently from one over 36.
    torch.testing.assert_close(selected, full.reshape(-1, full.shape[-1])[positions], rtol=1e-5, atol=1e-6)


def test_label_positions_from_the_host_give_exactly_the_same_result():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(tiny_config()).eval()
    ids = torch.randint(5, 50, (3, 12))
    labels = torch.where(torch.rand(3, 12) < 0.3, ids, torch.full_like(ids, -100))
    positions = (labels.view(-1) != -100).nonzero().squeeze(1)
    found = model(ids, labels=labels)
    given = model.loss_at(positions, ids, None, labels)  # what the GPU path calls (mlm/speed/compiled.py)
    assert given.logits.shape == (len(positions), 50)
    assert torch.equal(given.logits, found.logits) and torch.equal(given.loss, found.loss)
    # An empty position list is a batch without labels: loss 0, not NaN.
    assert model.loss_at(positions[:0], ids, None, torch.full_like(ids, -100)).loss.item() == 0.0


def test_padded_label_positions_change_neither_loss_nor_gradients():
    # --cuda-graphs pads the positions with an unlabelled one (label -100) so their length takes few values.
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(tiny_config(dropout=0.0, attention_dropout=0.0))
    ids = torch.randint(5, 50, (3, 12))
    labels = torch.where(torch.rand(3, 12) < 0.3, ids, torch.full_like(ids, -100))
    exact, padded = label_positions(labels, 1), label_positions(labels, 16)
    assert len(padded) == 16 and torch.equal(padded[: len(exact)], exact)
    assert (labels.view(-1)[padded[len(exact):]] == -100).all()

    def loss_and_grads(positions):
        model.zero_grad()
        out = model.loss_at(positions, ids, None, labels)
        out.loss.backward()
        return out, [p.grad.clone() for p in model.parameters()]

    (out, grads), (out_padded, grads_padded) = loss_and_grads(exact), loss_and_grads(padded)
    # The padded rows add exact zeros to the loss and its gradients, and the loss is divided by the same count;
    # only the longer matmuls may block and sum in another order (a few fp32 ulps).
    torch.testing.assert_close(out_padded.loss, out.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out_padded.logits[: len(exact)], out.logits, rtol=1e-6, atol=1e-7)
    for grad, grad_padded in zip(grads, grads_padded):
        torch.testing.assert_close(grad_padded, grad, rtol=1e-5, atol=1e-7)


def test_batch_without_labels_has_zero_loss_and_zero_gradients():
    model = DistilBertForMaskedLM(tiny_config())
    ids = torch.randint(5, 50, (2, 8))
    out = model(ids, labels=torch.full_like(ids, -100))
    assert out.logits.shape == (0, 50)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


def test_random_init_follows_the_reference():
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(tiny_config(dim=64, n_heads=4, vocab_size=2000))
    embedding = model.distilbert.embeddings.word_embeddings.weight
    assert torch.count_nonzero(embedding[0]) == 0  # padding row
    assert abs(embedding[1:].std().item() - 0.02) < 0.001
    assert torch.count_nonzero(model.vocab_projector.bias) == 0
    assert torch.equal(model.vocab_layer_norm.weight, torch.ones(64))


# ---------------------------------------------------------------- saving and loading

def test_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(tiny_config())
    save_pretrained(model, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(tmp_path / "model.safetensors")
    assert "vocab_projector.weight" not in stored and "vocab_projector.bias" in stored
    assert len(stored) == len(model.state_dict()) - 1
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["DistilBertForMaskedLM"] and config["model_type"] == "distilbert"
    assert config["tie_word_embeddings"] is True and config["dim"] == 16

    loaded = load_pretrained(tmp_path)
    assert loaded.vocab_projector.weight is loaded.distilbert.embeddings.word_embeddings.weight
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)


def test_reference_saved_config_keys_survive_a_round_trip(tmp_path, tiny_model):
    save_pretrained(tiny_model, tmp_path)
    before = json.loads((TINY_DIR / "config.json").read_text())
    after = json.loads((tmp_path / "config.json").read_text())
    for key in ("qa_dropout", "seq_classif_dropout", "vocab_size", "dim", "n_layers", "pad_token_id"):
        assert after[key] == before[key]


def test_hub_config_with_legacy_tie_key():
    config = config_from_dict({"vocab_size": 10, "dim": 8, "n_heads": 2, "tie_weights_": False})
    assert config.tie_word_embeddings is False
    assert "tie_weights_" not in config_to_dict(config)


def write_checkpoint(folder: Path, state: dict, config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(TINY_DIR / "config.json", folder / "config.json")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    return folder


@pytest.fixture()
def tiny_state():
    return load_file(TINY_DIR / "model.safetensors")


def test_checkpoint_with_projector_weight_loads_tied(tmp_path, tiny_state):
    tiny_state["vocab_projector.weight"] = tiny_state["distilbert.embeddings.word_embeddings.weight"].clone()
    model = load_pretrained(write_checkpoint(tmp_path, tiny_state))
    assert model.vocab_projector.weight is model.distilbert.embeddings.word_embeddings.weight


def test_checkpoint_with_only_projector_weight_fills_the_embedding(tmp_path, tiny_state):
    embedding = tiny_state.pop("distilbert.embeddings.word_embeddings.weight")
    tiny_state["vocab_projector.weight"] = embedding
    model = load_pretrained(write_checkpoint(tmp_path, tiny_state))
    assert torch.equal(model.distilbert.embeddings.word_embeddings.weight, embedding)


def test_legacy_gamma_beta_names_are_accepted(tmp_path, tiny_state, tiny_model):
    for new, old in (("weight", "gamma"), ("bias", "beta")):
        tiny_state[f"distilbert.embeddings.LayerNorm.{old}"] = tiny_state.pop(f"distilbert.embeddings.LayerNorm.{new}")
    model = load_pretrained(write_checkpoint(tmp_path, tiny_state))
    assert torch.equal(model.distilbert.embeddings.LayerNorm.weight, tiny_model.distilbert.embeddings.LayerNorm.weight)


def test_missing_config_file(tmp_path):
    shutil.copyfile(TINY_DIR / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(MLMError, match="No config.json"):
        load_pretrained(tmp_path)


def test_missing_weights_file_mentions_pickle_refusal(tmp_path):
    shutil.copyfile(TINY_DIR / "config.json", tmp_path / "config.json")
    with pytest.raises(MLMError, match="No model.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(MLMError, match="a model cut in shards, and mlm reads one file: save the model again"):
        load_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(MLMError, match="pickle"):
        load_pretrained(tmp_path)


def test_a_tokenizer_with_more_tokens_than_the_model_is_refused_naming_the_model():
    bigger = load_tokenizer(FIXTURES / "tiny-bpe")  # 577 tokens; the tiny model has 128 rows
    with pytest.raises(MLMError, match=f"^The tokenizer has 577 tokens but the model {TINY_DIR} only 128 \\(its "
                                       "vocab_size\\): they do not belong together"):
        load_model(TINY_DIR, tokenizer=bigger)
    # A random model is sized by its overrides: say so (it said only "a vocab_size that covers the tokenizer").
    with pytest.raises(MLMError, match=r"the random model of .* only 100 \(its vocab_size\): add vocab_size=577 to "
                                       r"`config_overrides`, or use a tokenizer that fits\.$"):
        load_model(TINY_DIR, init="random", tokenizer=bigger, config_overrides="vocab_size=100")


def test_a_hub_repo_without_safetensors_is_named_as_the_repo(tmp_path, monkeypatch):
    # Its pytorch_model.bin is never downloaded: the message named the cache snapshot and advised --init random.
    import huggingface_hub

    shutil.copyfile(TINY_DIR / "config.json", tmp_path / "config.json")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(tmp_path))
    with pytest.raises(MLMError, match="^No model.safetensors in the Hub repo someone/bin-only. mlm downloads no "
                                      "other weights .*use a repo that has model.safetensors.$"):
        load_pretrained("someone/bin-only")


def test_truncated_safetensors(tmp_path):
    shutil.copyfile(TINY_DIR / "config.json", tmp_path / "config.json")
    data = (TINY_DIR / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(MLMError, match="truncated"):
        load_pretrained(tmp_path)


def test_unreadable_config(tmp_path):
    shutil.copyfile(TINY_DIR / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MLMError, match="Cannot read the model config"):
        load_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path, tiny_state):
    tiny_state["vocab_transform.weight"] = torch.zeros(32, 31)
    with pytest.raises(MLMError, match=r"vocab_transform\.weight: checkpoint \(32, 31\) vs model \(32, 32\)"):
        load_pretrained(write_checkpoint(tmp_path, tiny_state))


def test_unknown_and_missing_tensors_are_named(tmp_path, tiny_state):
    tiny_state["pooler.weight"] = torch.zeros(2)
    del tiny_state["vocab_layer_norm.bias"]
    with pytest.raises(MLMError, match="(?s)missing tensors.*vocab_layer_norm.bias") as excinfo:
        load_pretrained(write_checkpoint(tmp_path, tiny_state))
    assert "unexpected tensors (1): pooler.weight" in str(excinfo.value) and "\n" not in str(excinfo.value)  # one line


def test_config_that_does_not_match_the_weights(tmp_path, tiny_state):
    config = json.loads((TINY_DIR / "config.json").read_text())
    config["n_layers"] = 3
    with pytest.raises(MLMError, match="(?s)missing tensors.*layer.2.*Does config.json"):
        load_pretrained(write_checkpoint(tmp_path, tiny_state, config))
    config["n_layers"], config["vocab_size"] = 2, 200
    with pytest.raises(MLMError, match="word_embeddings.weight: checkpoint \\(128, 32\\) vs model \\(200, 32\\)"):
        load_pretrained(write_checkpoint(tmp_path, tiny_state, config))


def test_tied_config_with_a_different_projector_is_refused(tmp_path, tiny_state):
    tiny_state["vocab_projector.weight"] = torch.randn(128, 32)
    with pytest.raises(MLMError, match="tie_word_embeddings"):
        load_pretrained(write_checkpoint(tmp_path, tiny_state))


def test_untied_config_loads_a_separate_projector(tmp_path, tiny_state):
    config = json.loads((TINY_DIR / "config.json").read_text()) | {"tie_word_embeddings": False}
    projector = torch.randn(128, 32)
    model = load_pretrained(write_checkpoint(tmp_path, tiny_state | {"vocab_projector.weight": projector}, config))
    assert torch.equal(model.vocab_projector.weight, projector)
    assert model.vocab_projector.weight is not model.distilbert.embeddings.word_embeddings.weight


@pytest.mark.parametrize(
    "values, message",
    [({"dim": 30, "n_heads": 4}, "not divisible"), ({"activation": "swish"}, "not supported"),
     ({"sinusoidal_pos_embds": True}, "sinusoidal")],
)
def test_invalid_configs(values, message):
    with pytest.raises(MLMError, match=message):
        config_from_dict(values)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients_with_dropout_on():
    config = tiny_config(dropout=0.3, attention_dropout=0.3)
    torch.manual_seed(0)
    model = DistilBertForMaskedLM(config).train()
    input_ids = torch.randint(5, 50, (3, 12))
    labels = torch.where(torch.rand(3, 12) < 0.4, input_ids, -100)
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0

    def loss_and_grads(checkpointed: bool):
        model.distilbert.gradient_checkpointing = checkpointed
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # same dropout masks; the rerun in backward must redraw exactly these
        loss = model(input_ids, attention_mask, labels).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    plain_loss, plain_grads = loss_and_grads(False)
    ckpt_loss, ckpt_grads = loss_and_grads(True)
    assert torch.equal(plain_loss, ckpt_loss)  # the forward runs the very same ops
    for name, grad in plain_grads.items():
        # Same ops on the same values; only accumulation order inside backward may differ (fp32 rounding).
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
