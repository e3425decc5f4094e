"""Read and write models in the Hugging Face Hub layout: config.json + model.safetensors (+ tokenizer files).

Weights are only ever read from safetensors, never unpickled: a pickle file can run code when loaded. Loading is
strict: every tensor the model needs must be there with the right shape, and nothing unknown may be left over,
because a silently re-initialised tensor ruins a fine-tuning run without any error.

The reference (docs/reference.md#save-layout) stores the tied vocab_projector.weight nowhere: it is
the word-embedding matrix. Checkpoints written by other tools may still hold it, and old ones name the embedding
LayerNorm's parameters gamma/beta; both are accepted here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mlm.errors import MLMError
from mlm.files.hub import resolve_repo
from mlm.model import DistilBertConfig, DistilBertForMaskedLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
EMBEDDING_KEY = "distilbert.embeddings.word_embeddings.weight"
PROJECTOR_KEY = "vocab_projector.weight"
# Legacy names (TensorFlow-era checkpoints) that the reference loader still maps; it renames only these.
LEGACY_RENAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


def load_pretrained(name_or_path: str | Path, revision: str | None = None) -> DistilBertForMaskedLM:
    """Build a DistilBertForMaskedLM from a local Hub-layout folder or a Hub repo id, in float32."""
    folder = resolve_repo(name_or_path, revision=revision, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE])
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file():
        raise MLMError(f"No {CONFIG_FILE} in {folder}: a model folder needs config.json and model.safetensors.")
    if not weights_path.is_file():
        pickled = [name for name in ("pytorch_model.bin", "model.pt", "model.pth") if (folder / name).exists()]
        hint = (
            f" It has {pickled[0]}, a pickle file, which mlm never loads (unpickling can run arbitrary code): "
            "convert it to safetensors with a trusted tool first."
            if pickled
            else " Without pretrained weights, start from a random model with --init random (training only)."
        )
        raise MLMError(f"No {WEIGHTS_FILE} in {folder}.{hint}")
    config = DistilBertConfig.from_json_file(config_path)
    state = read_safetensors(weights_path)
    return model_from_state_dict(config, state, source=weights_path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise MLMError(
            f"{path} is not a readable safetensors file ({err}). It may be truncated by an interrupted "
            "download or copy: delete it and fetch or save it again."
        ) from None


def model_from_state_dict(
    config: DistilBertConfig, state: dict[str, torch.Tensor], *, source: str | Path = "the checkpoint"
) -> DistilBertForMaskedLM:
    """Check `state` against the model `config` describes and load it; every mismatch is named in the error."""
    state = {_rename_legacy(name): tensor for name, tensor in state.items()}
    # Building on the meta device allocates nothing; load_state_dict(assign=True) then adopts the tensors.
    with torch.device("meta"):
        model = DistilBertForMaskedLM(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}

    if config.tie_word_embeddings:
        state = _merge_tied_projector(state, source)
    problems = _describe_mismatches(expected, state)
    if problems:
        raise MLMError(f"{source} does not fit the model its config.json describes:\n  " + "\n  ".join(problems))

    # Checkpoints are sometimes stored in fp16/bf16; training keeps fp32 master weights.
    state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()  # assign=True replaced both Parameters; make them one again
    return model


def _rename_legacy(name: str) -> str:
    for old, new in LEGACY_RENAMES.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def _merge_tied_projector(state: dict[str, torch.Tensor], source) -> dict[str, torch.Tensor]:
    """With tied weights, one of the embedding and the projector suffices; if both are there, they must agree."""
    state = dict(state)
    embedding, projector = state.get(EMBEDDING_KEY), state.get(PROJECTOR_KEY)
    if embedding is None and projector is not None:
        state[EMBEDDING_KEY] = projector
    elif embedding is not None and projector is not None and not (
        embedding.shape == projector.shape and torch.equal(embedding, projector)
    ):
        raise MLMError(
            f"{source}: config.json ties vocab_projector.weight to the word embeddings, but the checkpoint "
            "holds a different vocab_projector.weight. Set \"tie_word_embeddings\": false in config.json to load "
            "them as two matrices."
        )
    if EMBEDDING_KEY in state:
        state[PROJECTOR_KEY] = state[EMBEDDING_KEY]
    return state


def _describe_mismatches(expected: dict[str, tuple], state: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {_short_list(unexpected)}")
    wrong_shape = [
        f"{name}: checkpoint {tuple(state[name].shape)} vs model {shape}"
        for name, shape in expected.items()
        if name in state and tuple(state[name].shape) != shape
    ]
    if wrong_shape:
        problems.append(f"wrong shapes ({len(wrong_shape)}): " + "; ".join(wrong_shape[:5])
                        + (" …" if len(wrong_shape) > 5 else ""))
    if wrong_shape or missing:
        problems.append("Does config.json (vocab_size, dim, n_layers, hidden_dim, …) belong to these weights?")
    return problems


def _short_list(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def save_pretrained(model: DistilBertForMaskedLM, directory: str | Path, tokenizer=None) -> None:
    """Write config.json and model.safetensors like the reference's save_pretrained (and the tokenizer if given).

    The tied projector weight is not stored (it is the embedding matrix); files appear atomically, so a crash
    mid-save leaves the previous files intact rather than a truncated model.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop(PROJECTOR_KEY)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / CONFIG_FILE, json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save(directory)


def atomic_write(path: Path, write) -> None:
    """Call write(temporary_path) for a file next to `path`, then rename it over `path` (atomic on POSIX)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        normal_permissions(Path(tmp))  # mkstemp makes the file private (0600); the final file should not be
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def normal_permissions(path: Path, *, directory: bool = False) -> None:
    """Give `path` the permissions a plain open()/mkdir() would: 0666 (0777 for a folder) less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def load_config(name_or_path: str | Path, revision: str | None = None) -> DistilBertConfig:
    """Only the config.json of a model folder or Hub repo: enough to build a randomly initialised model."""
    folder = resolve_repo(name_or_path, revision=revision, allow_patterns=[CONFIG_FILE])
    if not (folder / CONFIG_FILE).is_file():
        raise MLMError(f"No {CONFIG_FILE} in {folder}: a model folder needs config.json.")
    return DistilBertConfig.from_json_file(folder / CONFIG_FILE)
