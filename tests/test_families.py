"""BERT and RoBERTa checkpoints in mlm's one encoder: parity with the reference, each family's Hub layout both ways,
what is dropped and what is refused (mlm/files/families.py)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import SMOKE, tiny_run

from mlm.errors import MLMError
from mlm.files.pretrained import config_from_dict, load_config, load_pretrained, save_pretrained
from mlm.model import DistilBertConfig, DistilBertForMaskedLM
from mlm.tokenizer import load_tokenizer
from mlm.train import train

FIXTURES = Path(__file__).parent / "fixtures"  # written by scripts/reference/make_model_fixtures.py
PAD = {"bert": 0, "roberta": 1}
# As in test_model.py: the same fp32 operations, so only BLAS blocking across CPUs (a few ulp per op) can differ.
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_dir(family: str) -> Path:
    return FIXTURES / f"tiny-{family}"


@pytest.fixture(scope="module", params=["bert", "roberta"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def golden(family):
    return load_file(FIXTURES / f"{family}_golden.safetensors")


@pytest.fixture()
def tiny_model(family):
    return load_pretrained(tiny_dir(family)).eval()


# ---------------------------------------------------------------- parity with the reference

@torch.no_grad()
@pytest.mark.parametrize("case", ["unpadded", "padded"])
def test_logits_and_loss_match_reference(family, tiny_model, golden, case):
    # Row 2 holds the padding id mid-row without a mask: RoBERTa numbers positions around it as the reference does.
    ids = golden["input_ids"] if case == "unpadded" else golden["padded_input_ids"]
    mask = None if case == "unpadded" else golden["attention_mask"]
    labels = golden["labels"].masked_fill(ids == PAD[family], -100)

    full = tiny_model(ids, mask)
    torch.testing.assert_close(full.logits, golden[f"logits_{case}"], **TOL)
    sparse = tiny_model(ids, mask, labels)
    torch.testing.assert_close(sparse.loss.reshape(1), golden[f"loss_{case}"], **TOL)
    torch.testing.assert_close(sparse.logits, golden[f"logits_{case}"][labels != -100], **TOL)


@torch.no_grad()
def test_dropout_draws_the_references_masks(family, tiny_model, golden):
    """In training mode, seeded as the reference was, every dropout (embeddings, attention probabilities, attention
    output, feed-forward) drops the same elements: without BERT's dropout on the attention output, or with it
    elsewhere, the draws would shift and the logits move by ~0.2."""
    torch.manual_seed(1235)
    logits = tiny_model.train()(golden["input_ids"]).logits
    torch.testing.assert_close(logits, golden["logits_train"], **TOL)


def test_roberta_positions_count_tokens_after_the_padding_id():
    config = DistilBertConfig(vocab_size=10, dim=8, n_heads=2, family="roberta", type_vocab_size=1, pad_token_id=1)
    ids = torch.tensor([[0, 5, 6, 2], [0, 5, 1, 7], [0, 2, 1, 1]])
    assert torch.equal(DistilBertForMaskedLM(config).distilbert.embeddings.positions(ids),
                       torch.tensor([[2, 3, 4, 5], [2, 3, 1, 4], [2, 3, 1, 1]]))
    assert config.max_length == config.max_position_embeddings - 2


@pytest.mark.parametrize("family, parameters", [("bert", 109_514_298), ("roberta", 124_697_433)])
def test_base_size_parameter_counts_equal_the_references(family, parameters):
    # The reference's BertForMaskedLM()/RobertaForMaskedLM(roberta-base's config) counts, tied matrix counted once.
    values = {"model_type": family} | ({"max_position_embeddings": 514, "type_vocab_size": 1} if family == "roberta"
                                       else {})
    with torch.device("meta"):
        model = DistilBertForMaskedLM(config_from_dict(values))
    assert model.num_parameters() == parameters


# ---------------------------------------------------------------- the family's own layout, both ways

def test_reference_checkpoint_loads_exactly(family, tiny_model):
    stored = load_file(tiny_dir(family) / "model.safetensors")
    prefix = "cls.predictions" if family == "bert" else "lm_head"
    ours = tiny_model.state_dict()
    assert torch.equal(ours["distilbert.embeddings.token_type_embeddings.weight"],
                       stored[f"{family}.embeddings.token_type_embeddings.weight"])
    assert torch.equal(ours["distilbert.transformer.layer.1.ffn.lin2.weight"],
                       stored[f"{family}.encoder.layer.1.output.dense.weight"])
    assert torch.equal(ours["vocab_projector.bias"], stored[f"{prefix}.bias"])
    assert tiny_model.vocab_projector.weight is tiny_model.distilbert.embeddings.word_embeddings.weight
    assert sorted(t.sum().item() for t in stored.values()) == sorted(  # every tensor read, none twice
        t.sum().item() for name, t in ours.items() if name != "vocab_projector.weight")


def test_save_writes_the_family_layout_and_reloads_exactly(family, tiny_model, tmp_path):
    save_pretrained(tiny_model, tmp_path)
    theirs = load_file(tiny_dir(family) / "model.safetensors")
    saved = load_file(tmp_path / "model.safetensors")
    assert saved.keys() == theirs.keys() and all(torch.equal(saved[k], theirs[k]) for k in theirs)

    reference_config = json.loads((tiny_dir(family) / "config.json").read_text())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == reference_config  # the family's keys and values, the ones mlm does not use kept

    reloaded = load_pretrained(tmp_path)
    assert all(torch.equal(v, reloaded.state_dict()[k]) for k, v in tiny_model.state_dict().items())


def copy_with(tmp_path: Path, family: str, add: dict | None = None, config: dict | None = None) -> Path:
    folder = tmp_path / family
    shutil.copytree(tiny_dir(family), folder)
    if add is not None:
        save_file(load_file(folder / "model.safetensors") | add, folder / "model.safetensors")
    if config is not None:
        values = json.loads((folder / "config.json").read_text()) | config
        (folder / "config.json").write_text(json.dumps(values))
    return folder


def test_pretraining_leftovers_are_dropped(tmp_path, family):
    """bert-base-uncased and roberta-base hold a pooler (BERT also the next-sentence head), old files a position-id
    buffer and the decoder's bias under its tied alias: all load, unused."""
    stored = load_file(tiny_dir(family) / "model.safetensors")
    head = "cls.predictions" if family == "bert" else "lm_head"
    leftovers = {f"{family}.pooler.dense.weight": torch.randn(32, 32), f"{family}.pooler.dense.bias": torch.randn(32),
                 f"{family}.embeddings.position_ids": torch.arange(64)[None],  # int64: would be refused as a weight
                 f"{head}.decoder.bias": stored[f"{head}.bias"]}
    if family == "bert":
        leftovers |= {"cls.seq_relationship.weight": torch.randn(2, 32), "cls.seq_relationship.bias": torch.randn(2)}
    model = load_pretrained(copy_with(tmp_path, family, leftovers))
    reference = load_pretrained(tiny_dir(family))
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family, name", [("bert", "bert.encoder.layer.0.attention.self.rotary.weight"),
                                          ("roberta", "cls.seq_relationship.weight"),  # BERT's, not RoBERTa's
                                          ("roberta", "bert.pooler.dense.weight")])
def test_an_unknown_tensor_is_refused(tmp_path, family, name):
    with pytest.raises(MLMError, match=f"unexpected tensors \\(1\\): {name}"):
        load_pretrained(copy_with(tmp_path, family, {name: torch.zeros(2)}))


def test_missing_tensor_is_named_in_the_familys_names(tmp_path, family):
    folder = copy_with(tmp_path, family)
    state = load_file(folder / "model.safetensors")
    del state[f"{family}.encoder.layer.1.attention.output.LayerNorm.bias"]
    save_file(state, folder / "model.safetensors")
    with pytest.raises(MLMError, match=f"missing tensors \\(1\\): {family}.encoder.layer.1.attention.output.LayerNorm"):
        load_pretrained(folder)


# ---------------------------------------------------------------- config.json

def test_missing_keys_take_the_references_defaults():
    bert, roberta = config_from_dict({"model_type": "bert"}), config_from_dict({"model_type": "roberta"})
    assert (bert.n_layers, bert.type_vocab_size, bert.layer_norm_eps, bert.vocab_size) == (12, 2, 1e-12, 30522)
    assert (roberta.n_layers, roberta.pad_token_id, roberta.vocab_size) == (12, 1, 50265)
    assert DistilBertConfig().type_vocab_size == 0 and config_from_dict({}).family == "distilbert"


def test_distilbert_keeps_keys_of_other_families_unused():
    # The reference's DistilBERT has LayerNorm eps 1e-12 and no token types whatever its config.json says.
    config = config_from_dict({"dim": 16, "n_heads": 2, "layer_norm_eps": 1e-5, "type_vocab_size": 2})
    assert (config.layer_norm_eps, config.type_vocab_size) == (1e-12, 0)
    assert config.extra == {"layer_norm_eps": 1e-5, "type_vocab_size": 2}


@pytest.mark.parametrize("model_type, architecture", [
    ("albert", "AlbertForMaskedLM"), ("electra", "ElectraForMaskedLM"), ("deberta", "DebertaForMaskedLM"),
    ("deberta-v2", "DebertaV2ForMaskedLM"), ("modernbert", "ModernBertForMaskedLM"),
    ("xlm-roberta", "XLMRobertaForMaskedLM"),
])
def test_other_architectures_are_refused_by_name(tmp_path, model_type, architecture):
    folder = copy_with(tmp_path, "bert", config={"model_type": model_type, "architectures": [architecture]})
    for load in (load_pretrained, load_config):
        with pytest.raises(MLMError, match=f"{architecture} \\(model_type '{model_type}'\\) is not an encoder") as err:
            load(folder)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("family, changes, message", [
    ("bert", {"num_attention_heads": 0}, '"num_attention_heads" must be a positive integer'),
    ("bert", {"hidden_size": 30}, '"hidden_size" 30 is not divisible by "num_attention_heads" 4'),
    ("bert", {"hidden_dropout_prob": 1.0}, r'"hidden_dropout_prob" must be a probability in \[0, 1\)'),
    ("bert", {"type_vocab_size": 0}, '"type_vocab_size" must be a positive integer'),
    ("roberta", {"layer_norm_eps": 0}, '"layer_norm_eps" must be a number > 0'),
    ("roberta", {"max_position_embeddings": 2}, r'"max_position_embeddings" must be more than pad_token_id \+ 1'),
    ("roberta", {"hidden_act": "swish"}, "hidden_act 'swish' is not supported"),
    ("bert", {"tie_word_embeddings": False}, "\"tie_word_embeddings\" is false: mlm ties bert's output layer"),
    ("bert", {"is_decoder": True}, '"is_decoder" is true'),
    ("bert", {"dim": 32}, "dim belong to another architecture's config.json; bert's are hidden_size.*model_type"),
])
def test_bad_values_are_one_line_in_the_familys_keys(tmp_path, family, changes, message):
    folder = copy_with(tmp_path, family, config=changes)
    with pytest.raises(MLMError, match=message) as err:
        load_pretrained(folder)
    assert str(folder / "config.json") in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_an_untied_head_is_refused_without_sending_the_user_in_a_circle(tmp_path, family):
    # Untying in config.json was said to be refused for BERT, and tying it to say "set it false" again.
    head = "cls.predictions.decoder.weight" if family == "bert" else "lm_head.decoder.weight"
    decoder = {head: torch.randn(json.loads((tiny_dir(family) / "config.json").read_text())["vocab_size"], 32)}
    untied = copy_with(tmp_path / "untied", family, decoder, config={"tie_word_embeddings": False})
    for folder in (untied, copy_with(tmp_path / "tied", family, decoder)):
        with pytest.raises(MLMError, match="DistilBERT's only.*cannot load") as err:
            load_pretrained(folder)
        assert "Set" not in str(err.value) and "Fix it" not in str(err.value)


def test_a_model_whose_config_would_not_load_again_is_not_saved(tmp_path):
    model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=10, dim=8, n_heads=2, family="bert"))  # no token types
    with pytest.raises(MLMError, match='"type_vocab_size" must be a positive integer'):
        save_pretrained(model, tmp_path)
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- a run per family


@pytest.mark.parametrize("family, tokenizer, prompt", [("bert", SMOKE, "a great [MASK] ."),
                                                      ("roberta", FIXTURES / "tiny-bpe", "a great <mask> .")])
def test_a_smoke_sized_run_of_each_family_learns_and_saves_its_layout(tmp_path, family, tokenizer, prompt):
    # The fixture's config (random init) with a tokenizer of the family: WordPiece for BERT, byte-level BPE for
    # RoBERTa. The run takes the default CPU path, lean modules included.
    folder = tmp_path / family
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, folder / name)
    config = json.loads((tiny_dir(family) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": load_tokenizer(folder).vocab_size}))
    run = tmp_path / "run"
    summary = train(tiny_run(run, model=str(folder), init="random", epochs=3, prompts=(prompt,)))

    # A random init starts near the vocabulary size (uniform predictions); 18 steps must get well below it.
    assert summary.status == "finished" and summary.after.perplexity < 0.6 * summary.before.perplexity
    record = json.loads((run / "run.json").read_text())
    assert "lean" in record["segments"][0]["model_variant"]
    assert json.loads((run / "config.json").read_text())["model_type"] == family
    saved = load_file(run / "model.safetensors")
    assert all(name.startswith((f"{family}.", "lm_head.", "cls.")) for name in saved)
    assert torch.equal(load_pretrained(run).distilbert.embeddings.word_embeddings.weight,
                       saved[f"{family}.embeddings.word_embeddings.weight"])


def test_mask_in_a_prompt_stands_for_each_tokenizers_mask_token(tmp_path):
    # The default prompt, "This is a great [MASK].", was refused for RoBERTa ("No <mask> in …"): every RoBERTa run
    # needed --prompt. [MASK] now stands for the tokenizer's own mask token, and its own spelling still works.
    from mlm.files.pretrained import load_model
    from mlm.fill_mask import fill_mask

    tokenizer = load_tokenizer(FIXTURES / "tiny-bpe")
    config = json.loads((tiny_dir("roberta") / "config.json").read_text()) | {"vocab_size": tokenizer.vocab_size}
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = load_model(tmp_path, init="random")
    ours, theirs = fill_mask(model, tokenizer, ["a great [MASK] .", "a great <mask> ."], top_k=3)
    assert ours == theirs and ours[0][0].sequence.startswith("a great")
    # Each token as text, as the reference pipeline's token_str (tokenizer.decode([id])): " movie", not "Ġmovie".
    movie = tokenizer.backend.token_to_id("Ġmovie")
    assert [p.token for p in ours[0]] == [tokenizer.backend.decode([p.token_id], skip_special_tokens=False)
                                          for p in ours[0]]
    # A newline token ("Ċ") would break a printed line or a table row: it is written as a literal.
    newline = tokenizer.backend.token_to_id("Ċ")
    model.vocab_projector.bias.data[newline] = 100.0
    assert fill_mask(model, tokenizer, ["a [MASK] ."], top_k=1)[0][0][0].token == "'\\n'"
    assert tokenizer.backend.decode([movie]) == " movie" and not any("Ġ" in p.token for p in ours[0])
