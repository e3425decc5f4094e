"""The checkpoint families of mlm's one encoder (mlm/model.py): each one's config.json keys and tensor names. The
model carries DistilBERT's names; these tables give BERT's and RoBERTa's for the same things, so a checkpoint is
read and written in its own family's Hub layout (docs/base-models.md#model-families)."""

from __future__ import annotations

ARCHITECTURES = {"distilbert": "DistilBertForMaskedLM", "bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM"}

# DistilBertConfig field -> the family's config.json key. Fields a family lacks keep the defaults of DEFAULTS.
_SHARED = ("vocab_size", "max_position_embeddings", "pad_token_id", "initializer_range", "tie_word_embeddings")
_DISTILBERT = ("dim", "n_layers", "n_heads", "hidden_dim", "dropout", "attention_dropout", "activation")
_BERT = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
         "hidden_dim": "intermediate_size", "dropout": "hidden_dropout_prob",
         "attention_dropout": "attention_probs_dropout_prob", "activation": "hidden_act",
         "type_vocab_size": "type_vocab_size", "layer_norm_eps": "layer_norm_eps"}
CONFIG_KEYS = {"distilbert": {key: key for key in _SHARED + _DISTILBERT},
               "bert": {**{key: key for key in _SHARED}, **_BERT}}
CONFIG_KEYS["roberta"] = CONFIG_KEYS["bert"]
# The reference's defaults where a config.json leaves a key out and they differ from DistilBertConfig's.
DEFAULTS = {"distilbert": {}, "bert": {"n_layers": 12, "type_vocab_size": 2},
            "roberta": {"n_layers": 12, "type_vocab_size": 2, "vocab_size": 50265, "pad_token_id": 1}}

# mlm's parameter names -> the family's, by parts of the name, in this order.
_ENCODER = {"transformer.": "encoder.", "attention.q_lin.": "attention.self.query.",
            "attention.k_lin.": "attention.self.key.", "attention.v_lin.": "attention.self.value.",
            "attention.out_lin.": "attention.output.dense.", "sa_layer_norm.": "attention.output.LayerNorm.",
            "ffn.lin1.": "intermediate.dense.", "ffn.lin2.": "output.dense.", "output_layer_norm.": "output.LayerNorm."}
TENSOR_NAMES = {
    "distilbert": {},
    "bert": {"distilbert.": "bert.", **_ENCODER, "vocab_transform.": "cls.predictions.transform.dense.",
             "vocab_layer_norm.": "cls.predictions.transform.LayerNorm.",
             "vocab_projector.weight": "cls.predictions.decoder.weight",
             "vocab_projector.bias": "cls.predictions.bias"},
    "roberta": {"distilbert.": "roberta.", **_ENCODER, "vocab_transform.": "lm_head.dense.",
                "vocab_layer_norm.": "lm_head.layer_norm.", "vocab_projector.weight": "lm_head.decoder.weight",
                "vocab_projector.bias": "lm_head.bias"},
}
# Tensors that pretraining checkpoints (bert-base-uncased, roberta-base) hold and *ForMaskedLM has no use for, dropped
# on loading: the pooler and the next-sentence head, and position ids saved as a buffer by older transformers.
UNUSED = {"distilbert": (), "bert": ("bert.pooler.", "cls.seq_relationship.", "bert.embeddings.position_ids"),
          "roberta": ("roberta.pooler.", "roberta.embeddings.position_ids")}
# The reference ties the decoder's bias to the head's bias; files may hold it under either name or both.
BIAS_ALIASES = {"cls.predictions.decoder.bias": "cls.predictions.bias", "lm_head.decoder.bias": "lm_head.bias"}


def hub_name(name: str, family: str) -> str:
    """mlm's parameter name -> its tensor name in the family's model.safetensors."""
    for ours, theirs in TENSOR_NAMES[family].items():
        name = name.replace(ours, theirs)
    return name
