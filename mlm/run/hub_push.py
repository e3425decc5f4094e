"""Push a finished run folder to the Hugging Face Hub with huggingface_hub's own calls.

`push_run` creates the repo if needed (`create_repo(exist_ok=True)`) and uploads, in one commit (`create_commit`),
the files of PUSHED_FILES the folder holds, and `tensorboard/` when the run wrote it (`--report-to tensorboard`).
Nothing else in the folder is uploaded, whatever a user keeps there: checkpoints, data, notes, keys. run.json and
metrics.jsonl go as copies without local paths (`public_record`); the files on disk stay as they are, since a
resume needs their absolute paths. The token is the one huggingface_hub finds itself (HF_TOKEN, else the saved
`hf auth login`); the endpoint is HF_ENDPOINT's (default https://huggingface.co).

Pushing only reads the folder: whatever fails, every local file stays where it is, and the error says how to push
again. Every failure is one MLMError line naming the endpoint and keeping the Hub's own reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from mlm.errors import MLMError
from mlm.files.hub import exception_chain
from mlm.files.pretrained import CONFIG_FILE, WEIGHTS_FILE
from mlm.run.model_card import is_hub_id
from mlm.run.record import RECORD_FILE, RunRecord, read_record
from mlm.run.tensorboard_log import LOG_DIR

METRICS_FILE = "metrics.jsonl"
MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)

# What a push uploads, each when the folder holds it; any other file in the folder stays local.
PUSHED_FILES = (
    # The model: what from_pretrained and mlm-fill-mask load; a folder without both is refused.
    *MODEL_FILES,
    # The tokenizer, so the repo loads on its own: tokenizer.json for fast tokenizers, vocab.txt for slow WordPiece
    # loaders, vocab.json and merges.txt for byte-level BPE ones (RoBERTa), and the special tokens' names.
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
    # The model card: the Hub shows it as the model's page.
    "README.md",
    # The run record and its log, as copies without local paths: how the model was made, and the figures and
    # curves behind the card.
    RECORD_FILE, METRICS_FILE,
)

# Settings naming a Hub repo or a local folder or file: a Hub id is public, a local path is not.
HUB_OR_LOCAL_SETTINGS = ("model", "tokenizer", "dataset")
# Settings that only ever name local things ("latest" for resume is no path, and stays).
LOCAL_SETTINGS = ("validation_file", "cache_dir", "output_dir", "resume")
# Values that are text the run was given or predicted, not paths: a prompt may start with "/", a token may be "/".
TEXT_KEYS = frozenset({"prompts", "prompt", "predictions"})


def push_run(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    commit_message: str = "Upload model trained with mlm",
    endpoint: str | None = None,
    token: str | None = None,
) -> str:
    """Create `repo_id` (a model repo) if it does not exist and upload the run in `folder` to it (the files of
    PUSHED_FILES, and tensorboard/ when the run wrote it) in one commit; return the commit's URL.

    repo_id: "namespace/name", or a bare name for a repo in the token owner's namespace.

    private: None leaves the Hub's default (public, unless the organisation defaults to private); an existing
    repo keeps its visibility. endpoint/token: None means huggingface_hub's own resolution (HF_ENDPOINT; HF_TOKEN
    or the saved login).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token

    folder = Path(folder)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if not folder.is_dir():
        raise MLMError(f"Cannot push {folder} to {endpoint}: it is not a folder.")
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise MLMError(f"Cannot push {folder} to {endpoint}: it holds no {' and no '.join(missing)}, so it is not "
                       "a finished run's folder. Push the --output-dir of a finished run.")
    uploads = run_files(folder)
    token = token or get_token()
    if not token:
        raise MLMError(f"No Hugging Face token to push {repo_id!r} to {endpoint}: set HF_TOKEN to a token with write "
                       f"access, or run `hf auth login` once. The model is intact in {folder}.")
    api = HfApi(endpoint=endpoint, token=token)
    kept = f"The model is intact in {folder}; push it again once this is fixed."
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # A bare name ("my-model") is created in the token owner's namespace; the Hub answers with the full id.
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content)
                      for name, content in uploads.items()]
        commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                                   repo_type="model")
    except Exception as err:  # classified below; anything unforeseen is still one line, not a traceback
        raise MLMError(f"{describe_push_error(err, repo_id, endpoint)} {kept}") from err
    return str(getattr(commit, "commit_url", commit))


def run_files(folder: Path) -> dict[str, Path | bytes]:
    """What a push of `folder` uploads: name in the repo -> the local file, or the bytes of a public copy."""
    files: dict[str, Path | bytes] = {name: folder / name for name in PUSHED_FILES if (folder / name).is_file()}
    record = read_record(folder)  # None in a folder written before run.json: pushed without it
    if record is not None:
        files[RECORD_FILE] = RunRecord(**public_record(asdict(record))).to_json().encode()
    if METRICS_FILE in files:
        files[METRICS_FILE] = public_metrics(files[METRICS_FILE].read_bytes())
    if record is not None and wrote_tensorboard(record):
        for path in sorted((folder / LOG_DIR).rglob("*")):
            name = path.relative_to(folder)
            # Dot files are temporary files of a write in progress, not logs.
            if path.is_file() and not any(part.startswith(".") for part in name.parts):
                files[name.as_posix()] = path
    return files


def wrote_tensorboard(record: RunRecord) -> bool:
    """True when some segment of the run wrote tensorboard/: the settings say so now, or did before a resume
    changed them (a segment's `changed` holds [before, now])."""
    if record.settings.get("report_to") == "tensorboard":
        return True
    return any("tensorboard" in (segment.get("changed") or {}).get("report_to", ())
               for segment in record.segments)


def public_record(data: dict) -> dict:
    """A run record (run.json as a dict) without local paths, for a public repo. Replaced, each by its last path
    part ("/home/me/data/reviews.jsonl" -> "reviews.jsonl"), as the model card names local things:

    - the settings model, tokenizer and dataset when they are local paths (exist here, or can only be paths); a
      Hub id stays as it is;
    - the settings validation_file, cache_dir, output_dir and resume, which are never Hub ids;
    - every other string at any depth, dict keys too, that is an absolute or home path ("/…", "~…"): the
      checkpoint a resume started from, the folders a resume changed (a segment's `changed`), any path setting.

    Prompts and fill-mask predictions (under the keys of TEXT_KEYS) are text and stay: the card shows them anyway.
    """
    public = dict(data)
    settings = dict(public.get("settings") or {})
    for name in (*HUB_OR_LOCAL_SETTINGS, *LOCAL_SETTINGS):
        value = settings.get(name)
        if isinstance(value, str) and (name in LOCAL_SETTINGS or not is_hub_id(value)):
            settings[name] = _last_part(value)
    public["settings"] = settings
    return _without_paths(public)


def public_metrics(data: bytes) -> bytes:
    """metrics.jsonl without local paths (its `resume` lines name a checkpoint), each line cleaned as
    `public_record` cleans the record. A line that is not a JSON object, such as one cut short by a crash, is left
    out: it holds no figure anyone can read, and could hold a path."""
    lines = []
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            lines.append(json.dumps(_without_paths(entry)) + "\n")
    return "".join(lines).encode()


def _without_paths(value):
    if isinstance(value, str):
        return _last_part(value) if value.startswith(("/", "~")) else value
    if isinstance(value, dict):
        return {_without_paths(key): item if key in TEXT_KEYS else _without_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_paths(item) for item in value]
    return value


def _last_part(path: str) -> str:
    name = Path(path).name
    # "/" has no last part, and "~me" would name the user: neither says anything a reader needs.
    return name if name and not name.startswith("~") else "local"


def full_repo_id(repo_id: str, *, endpoint: str | None = None, token: str | None = None) -> str:
    """"namespace/name" for `repo_id`; a bare name gets the token owner's namespace (one whoami request).

    For the model card, which names the repo before the push creates it.
    """
    if "/" in repo_id:
        return repo_id
    from huggingface_hub import HfApi, constants, get_token

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    token = token or get_token()
    if not token:
        raise MLMError(f"No Hugging Face token to push {repo_id!r} to {endpoint}: set HF_TOKEN to a token with write "
                       "access, or run `hf auth login` once.")
    try:
        return f"{HfApi(endpoint=endpoint, token=token).whoami()['name']}/{repo_id}"
    except Exception as err:  # classified below; anything unforeseen is still one line, not a traceback
        raise MLMError(describe_push_error(err, repo_id, endpoint)) from err


def describe_push_error(err: BaseException, repo_id: str, endpoint: str) -> str:
    """What went wrong while pushing `repo_id` to `endpoint`, in one line, with the cause the Hub or network gave."""
    status = _status_code(err)
    reason = _one_line(_server_message(err) or str(err) or type(err).__name__)
    repo = repr(repo_id)
    if status == 401:
        return (f"The Hub at {endpoint} rejected the token while pushing {repo} (HTTP 401: {reason}). Set HF_TOKEN "
                "to a valid token with write access, or run `hf auth login` again.")
    if status == 403:
        return (f"Not allowed to push to {repo} on {endpoint} (HTTP 403: {reason}). The repo belongs to another user "
                "or organisation, or the token lacks write access: choose a repo id in your own namespace "
                "(your-name/model, --hub-model-id), or use a token with write access to it.")
    if status == 409:
        return (f"The Hub at {endpoint} refused to push {repo} (HTTP 409 Conflict: {reason}). The repo may belong to "
                "someone else (choose a repo id in your own namespace with --hub-model-id), or another push to it "
                "was under way (push again).")
    if status == 404:
        return (f"The Hub at {endpoint} has no repo {repo} and did not create it (HTTP 404: {reason}). Check the repo "
                "id, and that the token may create repos in that namespace.")
    if status is not None and status >= 500:
        return f"The Hub at {endpoint} failed while pushing {repo} (HTTP {status}: {reason}). Try again later."
    if status is not None:
        return f"The Hub at {endpoint} refused the push of {repo} (HTTP {status}: {reason})."
    if _is_network_error(err):
        return (f"Could not reach the Hub at {endpoint} to push {repo} ({type(err).__name__}: {reason}). Check the "
                "network connection and HF_ENDPOINT.")
    return f"Pushing {repo} to {endpoint} failed ({type(err).__name__}: {reason})."


def _status_code(err: BaseException) -> int | None:
    # HfHubHTTPError carries the response; an LFS upload error arrives wrapped in a RuntimeError.
    for error in exception_chain(err):
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def _server_message(err: BaseException) -> str | None:
    for error in exception_chain(err):
        message = getattr(error, "server_message", None)
        if message:
            return message
    return None


def _is_network_error(err: BaseException) -> bool:
    """Connection refused, DNS failure, timeout: huggingface_hub lets its HTTP client's errors through."""
    for error in exception_chain(err):
        if isinstance(error, (OSError, TimeoutError)):
            return True
        # httpx (huggingface_hub >= 1.0) and requests (before) name their transport errors like this.
        names = {cls.__name__ for cls in type(error).__mro__}
        if names & {"TransportError", "ConnectError", "ConnectionError", "TimeoutException", "NetworkError"}:
            return True
    return False


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:300]
