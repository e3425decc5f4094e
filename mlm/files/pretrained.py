"""Read and write models in the Hugging Face Hub layout: config.json + model.safetensors (+ tokenizer files).

Weights are only ever read from safetensors, never unpickled: a pickle file can run code when loaded. Loading is
strict: every tensor the model needs must be there with the right shape, and nothing unknown may be left over,
because a silently re-initialised tensor ruins a fine-tuning run without any error. Each family is read and written
in its own keys and tensor names (mlm/files/families.py). The tied vocab_projector.weight is stored nowhere
(docs/reference.md#save-layout): it is the word-embedding matrix, though files written by other tools may hold it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mlm.errors import MLMError, is_int, listed
from mlm.files.families import ARCHITECTURES, BIAS_ALIASES, CONFIG_KEYS, DEFAULTS, UNUSED, hub_name
from mlm.files.hub import resolve_repo
from mlm.files.writes import atomic_write, atomic_write_text
from mlm.model import ACTIVATIONS, DistilBertConfig, DistilBertForMaskedLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMBEDDING_KEY = "distilbert.embeddings.word_embeddings.weight"
PROJECTOR_KEY = "vocab_projector.weight"
UNTIED = ("mlm ties {}'s output layer to the word embeddings (an untied one is DistilBERT's only), so it cannot load "
          "or build this model.")
# TensorFlow-era names, which older Hub checkpoints still use; the reference renames only these.
LEGACY_RENAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
# Size keys of the families and of other architectures (GPT-2, T5, …). A config holding size keys its model_type
# does not use describes another model, whose sizes would otherwise be silently replaced by the defaults.
SIZE_KEYS = ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_position_embeddings")
FOREIGN_SIZE_KEYS = (*SIZE_KEYS[1:5], "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "n_embd", "n_layer", "n_head", "d_model", "num_layers", "d_ff")


def load_pretrained(name_or_path: str | Path, revision: str | None = None) -> DistilBertForMaskedLM:
    """Build a DistilBertForMaskedLM from a local Hub-layout folder or a Hub repo id, in float32 and, as any new
    module, in train mode (dropout on; transformers' from_pretrained returns eval mode): `.eval()` for inference."""
    shards = f"{WEIGHTS_FILE}.index.json"  # what transformers writes beside the pieces of a model cut in shards
    folder = resolve_repo(name_or_path, revision=revision, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE, shards])
    config, weights_path = load_config(folder), folder / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [name for name in ("pytorch_model.bin", "model.pt", "model.pth") if (folder / name).exists()]
        from_hub = not Path(name_or_path).expanduser().is_dir()  # only the files mlm reads were downloaded
        hint = (f"It has {pickled[0]}, a pickle file, which mlm never loads (unpickling can run arbitrary code): "
                "convert it to safetensors with a trusted tool first." if pickled else
                f"It has {shards}, a model cut in shards, and mlm reads one file: save the model again in one "
                "(transformers: save_pretrained(folder, max_shard_size=\"20GB\"))." if (folder / shards).is_file() else
                "mlm downloads no other weights (a pickled pytorch_model.bin is never loaded): use a repo that has "
                "model.safetensors." if from_hub else
                "Point to a folder that has the weights; without any, mlm-train --init random trains a model of "
                "this configuration from scratch.")
        raise MLMError(f"No {WEIGHTS_FILE} in {f'the Hub repo {name_or_path}' if from_hub else folder}. {hint}")
    return model_from_state_dict(config, read_safetensors(weights_path), source=weights_path)


def load_model(name_or_path: str | Path, *, init: str = "pretrained", revision: str | None = None,
               tokenizer=None, config_overrides: str | None = None) -> DistilBertForMaskedLM:
    """The pretrained model, or (init="random") a fresh one of its config.json with `config_overrides` applied, in
    float32 on the CPU; with `tokenizer`, refused unless the model has an embedding row for every token id."""
    if init == "pretrained":
        model = load_pretrained(name_or_path, revision=revision)
    else:
        model = DistilBertForMaskedLM(load_config(name_or_path, revision=revision, overrides=config_overrides))
    if tokenizer is not None:
        check_tokenizer_fits(model, tokenizer.vocab_size, str(name_or_path), random=init != "pretrained")
    return model


def check_tokenizer_fits(model: DistilBertForMaskedLM, tokenizer_vocab_size: int, name: str, *,
                         random: bool = False) -> None:
    """Refuse a tokenizer whose ids go past the model's embedding rows (an IndexError in the first forward)."""
    if model.config.vocab_size < tokenizer_vocab_size and random:
        raise MLMError(f"The tokenizer has {tokenizer_vocab_size} tokens but the random model of {name} only "
                       f"{model.config.vocab_size} (its vocab_size): add vocab_size={tokenizer_vocab_size} to "
                       "`config_overrides`, or use a tokenizer that fits.")
    if model.config.vocab_size < tokenizer_vocab_size:
        raise MLMError(f"The tokenizer has {tokenizer_vocab_size} tokens but the model {name} only "
                       f"{model.config.vocab_size} (its vocab_size): they do not belong together. Use the tokenizer "
                       "the model was trained with, or a vocab_size that covers the tokenizer.")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise MLMError(f"{path} is not a readable safetensors file ({err}). It may be truncated by an interrupted "
                       "download or copy: delete it and fetch or save it again.") from None


def model_from_state_dict(config: DistilBertConfig, state: dict[str, torch.Tensor], *,
                          source: str | Path = "the checkpoint") -> DistilBertForMaskedLM:
    """Check `state` (the family's tensor names) against the model `config` describes and load it; every mismatch
    is named in the error."""
    state = {name: tensor for name, tensor in state.items() if not name.startswith(UNUSED[config.family])}
    for old, new in LEGACY_RENAMES.items():
        state = {name.removesuffix(old) + new if name.endswith(old) else name: t for name, t in state.items()}
    for alias, name in BIAS_ALIASES.items():
        if alias in state:
            state.setdefault(name, state.pop(alias))
    not_float = [f"{name} ({t.dtype})" for name, t in state.items() if not t.is_floating_point()]
    if not_float:  # an integer or bool tensor would be adopted as is and fail deep inside the first forward
        raise MLMError(f"{source} holds non-float weights: {listed(not_float, 6)}. Model weights are floating "
                       "point: this file does not hold a model's weights, or it is damaged.")
    # Building on the meta device allocates nothing; load_state_dict(assign=True) then adopts the tensors.
    with torch.device("meta"):
        model = DistilBertForMaskedLM(config)
    names = {name: hub_name(name, config.family) for name in model.state_dict()}  # ours -> the file's
    expected = {names[name]: tuple(t.shape) for name, t in model.state_dict().items()}

    if config.tie_word_embeddings:  # one of the two suffices; if both are there, they must agree
        embedding_key, projector_key = names[EMBEDDING_KEY], names[PROJECTOR_KEY]
        embedding, projector = state.get(embedding_key), state.get(projector_key)
        if embedding is not None and projector is not None and not torch.equal(embedding, projector):
            fix = (UNTIED.format(config.family) if config.family != "distilbert" else
                   "set \"tie_word_embeddings\": false in config.json to load them as two matrices.")
            raise MLMError(f"{source}: config.json ties {projector_key} to the word embeddings, but the checkpoint "
                           f"holds a different {projector_key}: {fix}")
        if (tied := embedding if embedding is not None else projector) is not None:
            state[embedding_key] = state[projector_key] = tied
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong_shape = [f"{name}: checkpoint {tuple(state[name].shape)} vs model {shape}"
                   for name, shape in expected.items() if name in state and tuple(state[name].shape) != shape]
    problems = [f"missing tensors ({len(missing)}): {listed(missing, 6)}"] if missing else []
    problems += [f"unexpected tensors ({len(unexpected)}): {listed(unexpected, 6)}"] if unexpected else []
    problems += [f"wrong shapes ({len(wrong_shape)}): {listed(wrong_shape, 6, '; ')}"] if wrong_shape else []
    if problems:
        ask = ("Does config.json (its vocab_size and layer sizes) belong to these weights?" if missing or wrong_shape
               else "")
        raise MLMError(f"{source} does not fit the model its config.json describes: {' | '.join(problems)}. {ask}"
                       .rstrip())

    # Checkpoints are sometimes stored in fp16/bf16; training keeps fp32 master weights.
    model.load_state_dict({name: state[theirs].float() for name, theirs in names.items()}, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced both Parameters; make them one again
    return model


def save_pretrained(model: DistilBertForMaskedLM, directory: str | Path, tokenizer=None) -> None:
    """Write config.json and model.safetensors like the reference's save_pretrained (and the tokenizer if given),
    each atomically: a crash mid-save leaves the previous files intact rather than a truncated model."""
    check_config(model.config, "the model's config")  # never write a folder that does not load again
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop(PROJECTOR_KEY)
    tensors = {hub_name(name, model.config.family): t.detach().to("cpu").contiguous() for name, t in state.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    config_text = json.dumps(config_to_dict(model.config), indent=2, sort_keys=True) + "\n"
    atomic_write_text(directory / CONFIG_FILE, config_text)
    if tokenizer is not None:
        tokenizer.save(directory)


def load_config(name_or_path: str | Path, revision: str | None = None, overrides: str | None = None
                ) -> DistilBertConfig:
    """Only the config.json of a model folder or Hub repo (`overrides` applied): enough to build a randomly
    initialised model."""
    folder = resolve_repo(name_or_path, revision=revision, allow_patterns=[CONFIG_FILE])
    if not (folder / CONFIG_FILE).is_file():
        raise MLMError(f"No {CONFIG_FILE} in {folder}: a model folder needs config.json.")
    return read_config(folder / CONFIG_FILE, overrides)


# ---------------------------------------------------------------------------------------------------------------
# config.json: read, checked key by key, written back as the reference writes it.


def read_config(path: str | Path, overrides: str | None = None) -> DistilBertConfig:
    """The DistilBertConfig in the config.json at `path`, with `overrides` ("key=value,...", config.json's keys)
    applied; any unreadable or invalid value is one MLMError."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MLMError(f"Cannot read the model config {path}: {err}") from None
    if not isinstance(values, dict):
        raise MLMError(f"{path} does not hold a JSON object, so it is not a model config.")
    if (known := CONFIG_KEYS.get(values.get("model_type") or "distilbert")) is None:
        return config_from_dict(values, source=path)  # refuses the architecture, before its overrides are read
    for item in filter(None, (overrides or "").split(",")):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or key not in known.values():
            raise MLMError(f"`config_overrides` {item!r} is not KEY=VALUE with KEY a config.json key mlm reads: "
                           f"{', '.join(sorted(known.values()))}.")
        try:
            values[key] = json.loads(value)  # 4, 0.1, true, "gelu"
        except json.JSONDecodeError:
            values[key] = value  # gelu unquoted
    return config_from_dict(values, source=f"{path} with `config_overrides` {overrides}" if overrides else path)


def config_from_dict(values: dict, *, source: str | Path = "config") -> DistilBertConfig:
    """A config.json's keys (of model_type distilbert, bert or roberta; none: distilbert) -> DistilBertConfig. Keys
    mlm does not use are kept in `extra` for the next save."""
    values = dict(values)
    family = values.get("model_type") or "distilbert"
    if family not in ARCHITECTURES:
        architecture = (values.get("architectures") or [family])[0]
        raise MLMError(f"{source}: {architecture} (model_type {family!r}) is not an encoder mlm builds: it builds "
                       "DistilBERT, BERT and RoBERTa (model_type 'distilbert', 'bert', 'roberta').")
    keys = CONFIG_KEYS[family]
    foreign = [key for key in FOREIGN_SIZE_KEYS if key in values and key not in keys.values()]
    if foreign:
        raise MLMError(f"{source}: {', '.join(foreign)} belong to another architecture's config.json; {family}'s "
                       f"are {', '.join(keys[size] for size in SIZE_KEYS[1:5])}. Use a {family} config, or set "
                       "\"model_type\" to the config's own.")
    if values.get("sinusoidal_pos_embds"):
        raise MLMError(f"{source}: sinusoidal_pos_embds=true is not supported (distilbert uses learned positions).")
    # The Hub file predates tie_word_embeddings and spells it "tie_weights_".
    if "tie_word_embeddings" not in values and "tie_weights_" in values:
        values["tie_word_embeddings"] = values.pop("tie_weights_")
    given = {name: values.pop(key) for name, key in keys.items() if key in values}
    config = DistilBertConfig(**{**DEFAULTS[family], **given}, family=family, extra=values)
    check_config(config, source)
    return config


def check_config(config: DistilBertConfig, source: str | Path = "config") -> None:
    """Refuse values that would fail deep inside the model (or be misread), naming the file and the key: 768.0,
    "768" and true where an integer is meant, "no" where a boolean is (any non-empty string would read as true)."""
    if config.family not in ARCHITECTURES:
        raise MLMError(f"{source}: family {config.family!r} is not one of {list(ARCHITECTURES)}.")
    keys = CONFIG_KEYS[config.family]
    where = "`config_overrides`" if "`config_overrides`" in str(source) else "config.json"  # the value came from there

    def refuse(key: str, wanted: str) -> MLMError:
        return MLMError(f"{source}: \"{keys.get(key, key)}\" must be {wanted}, got {getattr(config, key)!r}. Fix it "
                        f"in {where}.")

    for key in SIZE_KEYS + (("type_vocab_size",) if "type_vocab_size" in keys else ()):
        if not (is_int(getattr(config, key)) and getattr(config, key) >= 1):
            raise refuse(key, "a positive integer")
    dim, heads = keys["dim"], keys["n_heads"]
    if config.dim % config.n_heads:
        raise MLMError(f"{source}: \"{dim}\" {config.dim} is not divisible by \"{heads}\" {config.n_heads}: each "
                       f"head takes {dim} / {heads} features. Fix them in {where}.")
    for key in ("dropout", "attention_dropout"):
        if not (_is_number(getattr(config, key)) and 0 <= getattr(config, key) < 1):
            raise refuse(key, "a probability in [0, 1)")
    for key, what in (("initializer_range", " (the standard deviation of the random init)"), ("layer_norm_eps", "")):
        if not (_is_number(getattr(config, key)) and getattr(config, key) > 0):
            raise refuse(key, f"a number > 0{what}")
    if not (is_int(config.pad_token_id) and 0 <= config.pad_token_id < config.vocab_size):
        raise refuse("pad_token_id", f"a token id from 0 to vocab_size - 1 = {config.vocab_size - 1}")
    if not isinstance(config.tie_word_embeddings, bool):
        raise refuse("tie_word_embeddings", "true or false")
    if config.family != "distilbert" and not config.tie_word_embeddings:  # its head then has two biases
        raise MLMError(f"{source}: \"tie_word_embeddings\" is false: {UNTIED.format(config.family)}")
    if config.max_length < 1:
        raise refuse("max_position_embeddings", f"more than pad_token_id + 1 = {config.position_offset} (RoBERTa's "
                     "first token position)")
    if config.extra.get("is_decoder"):
        raise MLMError(f"{source}: \"is_decoder\" is true, a causal mask; mlm builds bidirectional encoders for MLM.")
    if config.activation not in ACTIVATIONS:
        raise MLMError(f"{source}: {keys['activation']} {config.activation!r} is not supported (use one of "
                       f"{list(ACTIVATIONS)}).")


def _is_number(value) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def config_to_dict(config: DistilBertConfig) -> dict:
    """config.json as the reference's save_pretrained writes it, so transformers loads it unchanged."""
    values = asdict(config)
    extra = values.pop("extra")
    extra.pop("tie_weights_", None)
    return {
        **extra,
        **{key: values[name] for name, key in CONFIG_KEYS[config.family].items()},
        "architectures": [ARCHITECTURES[config.family]],
        "model_type": config.family,
        **({"sinusoidal_pos_embds": False} if config.family == "distilbert" else {}),
        "dtype": "float32",
    }
