"""Push a finished run folder to the Hugging Face Hub with huggingface_hub's own calls: the files of PUSHED_FILES the
folder holds, and `tensorboard/` when the run wrote it. Nothing else in the folder goes, whatever a user keeps there
(checkpoints, data, notes, keys); run.json and metrics.jsonl go as copies without local paths, and the files on disk
keep them for a resume. Pushing only reads the folder, and every failure is one MLMError line naming the endpoint
and keeping the Hub's own reason.
"""

from __future__ import annotations

import json
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path

from mlm.errors import MLMError, clipped
from mlm.files.hashing import file_sha256
from mlm.files.hub import NETWORK_ERRORS, check_repo_id, hub_failure
from mlm.files.pretrained import CONFIG_FILE, WEIGHTS_FILE
from mlm.run.metrics import METRICS_FILE
from mlm.run.model_card import CARD_FILE, is_hub_id, run_model_card
from mlm.run.record import RECORD_FILE, RunRecord, read_record
from mlm.run.tensorboard_log import LOG_DIR

MODEL_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what from_pretrained loads: a folder without both is refused
# What a push uploads, each when the folder holds it: the model; the tokenizer, so the repo loads on its own
# (tokenizer.json when fast, vocab.txt for WordPiece, vocab.json and merges.txt for byte-level BPE); the model card,
# the repo's page; the run record and its log (public copies): how the model was made, the figures behind the card.
PUSHED_FILES = (*MODEL_FILES, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                "vocab.json", "merges.txt", CARD_FILE, RECORD_FILE, METRICS_FILE)
# Settings naming a Hub repo or a local path (a Hub id is public, a path is not), and settings naming local things
# only ("latest" for resume is no path, and stays).
HUB_OR_LOCAL_SETTINGS = ("model", "tokenizer", "dataset")
LOCAL_SETTINGS = ("validation_file", "cache_dir", "output_dir", "resume")
# Values that are text the run was given or predicted, not paths: a prompt may start with "/", a token may be "/".
TEXT_KEYS = frozenset({"prompts", "prompt", "predictions"})
# What went wrong in a push, by the HTTP status of the Hub's answer (500: any 5xx; 400: any other), else whether
# the network failed (NETWORK_ERRORS) or huggingface_hub is offline.
PUSH_ERRORS = {
    401: "The Hub at {endpoint} rejected the token while pushing {repo} (HTTP 401: {reason}). Set HF_TOKEN to a "
         "valid token with write access, or run `hf auth login` again.",
    403: "Not allowed to push to {repo} on {endpoint} (HTTP 403: {reason}). The repo belongs to another user or "
         "organisation, or the token lacks write access: choose a repo id in your own namespace (your-name/model, "
         "--hub-model-id), or use a token with write access to it.",
    404: "The Hub at {endpoint} has no repo {repo} and did not create it (HTTP 404: {reason}). Check the repo id, "
         "and that the token may create repos in that namespace.",
    409: "The Hub at {endpoint} refused to push {repo} (HTTP 409 Conflict: {reason}). The repo may belong to someone "
         "else (choose a repo id in your own namespace with --hub-model-id), or another push to it was under way "
         "(push again).",
    500: "The Hub at {endpoint} failed while pushing {repo} (HTTP {status}: {reason}). Try again later.",
    400: "The Hub at {endpoint} refused the push of {repo} (HTTP {status}: {reason}).",
    "network": "Could not reach the Hub at {endpoint} to push {repo} ({kind}: {reason}). Check the network "
               "connection and HF_ENDPOINT.",
    "offline": "HF_HUB_OFFLINE=1 forbids pushing {repo} to {endpoint}: unset it to push.",
    "other": "Pushing {repo} to {endpoint} failed ({kind}: {reason}).",
}


def push_run(folder: str | Path, repo_id: str, *, private: bool | None = None, endpoint: str | None = None) -> str:
    """Create `repo_id` (a model repo) if it does not exist and upload the run in `folder` to it in one commit;
    return the commit's URL. private: None leaves the Hub's default; an existing repo keeps its visibility. The
    token is huggingface_hub's (HF_TOKEN or the saved `hf auth login`), and so is the endpoint, unless given."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, constants

    folder, endpoint = Path(folder), (endpoint or constants.ENDPOINT).rstrip("/")
    if missing := [name for name in MODEL_FILES if not (folder / name).is_file()]:  # or no folder at all
        raise MLMError(f"Cannot push {folder} to {endpoint}: it is not a finished run's folder (no "
                       f"{' and no '.join(missing)} there). Push the --output-dir of a finished run.")
    if (record := read_record(folder)) is not None and not record.finished:  # its model is an earlier segment's
        raise MLMError(f"Cannot push {folder}: its run is {record.status} at step {record.progress['step']}, and the "
                       "model there is not what its record describes. Finish the run first (mlm-train --resume latest "
                       f"--output-dir {folder}), then push.")
    api = _hub_api(repo_id, endpoint, f" The model is intact in {folder}.")
    try:
        # A bare name ("my-model") is created in the token owner's namespace; the Hub answers with the full id.
        repo_id = getattr(api.create_repo(repo_id, private=private, exist_ok=True), "repo_id", None) or repo_id
        uploads = run_files(folder, repo_id)
        # A file of an earlier push that this run has not (a DistilBERT run's vocab.txt beside a RoBERTa run's
        # tokenizer) would make a repo of two models. A README.md stays where the run has no card of its own.
        stale = [name for name in api.list_repo_files(repo_id) if name not in uploads and name != CARD_FILE
                 and (name in PUSHED_FILES or name.startswith(f"{LOG_DIR}/"))]
        commit = api.create_commit(repo_id=repo_id, commit_message="Upload model trained with mlm", operations=[
            *(CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in uploads.items()),
            *(CommitOperationDelete(path_in_repo=name) for name in stale)])
    except Exception as err:  # classified below; anything unforeseen is still one line, not a traceback
        raise MLMError(f"{describe_push_error(err, repo_id, endpoint)} The model is intact in {folder}; once this "
                       f"is fixed, mlm-train --resume latest --output-dir {folder} --push-to-hub pushes it again."
                       ) from err
    return str(getattr(commit, "commit_url", commit))


def full_repo_id(repo_id: str, *, private: bool = False, endpoint: str | None = None) -> str:
    """"namespace/name" for `repo_id`; a bare name gets the token owner's namespace, so that the model card can name
    the repo before the push creates it. One whoami request, also for a namespace/name: a missing or rejected token,
    an unreachable or offline Hub, an invalid id and a namespace neither the user's nor one of their organisations'
    are refused now, before training, not after it; with `private`, so is a public repo of that id, which the Hub
    would keep public."""
    check_repo_id(repo_id)  # the default id is the output folder's name, which may hold anything
    api = _hub_api(repo_id, endpoint)
    try:
        who = api.whoami()
    except Exception as err:  # classified below; anything unforeseen is still one line, not a traceback
        raise MLMError(describe_push_error(err, repo_id, api.endpoint)) from err
    owner, orgs = who["name"], [org.get("name") for org in who.get("orgs") or []]
    if (namespace := repo_id.partition("/")[0] if "/" in repo_id else owner) not in (owner, *orgs):
        raise MLMError(f"The token belongs to {owner}, who may not push to {repo_id}: {namespace} is neither "
                       f"{owner} nor one of their organisations ({', '.join(orgs) or 'none'}). Choose a repo id in "
                       f"your own namespace (`hub_model_id` {owner}/NAME).")
    repo_id = f"{namespace}/{repo_id.rpartition('/')[2]}"
    if private:
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            public = api.repo_info(repo_id).private is False
        except RepositoryNotFoundError:
            public = False  # created private by the push
        except Exception as err:
            raise MLMError(describe_push_error(err, repo_id, api.endpoint)) from err
        if public:
            raise MLMError(f"{repo_id} exists and is public, and the Hub keeps an existing repo's visibility: make it "
                           "private in its settings on the Hub first, or push to a new repo id.")
    return repo_id


def _hub_api(repo_id: str, endpoint: str | None, kept: str = ""):
    from huggingface_hub import HfApi, constants, get_token

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if not (token := get_token()):
        raise MLMError(f"No Hugging Face token to push {repo_id!r} to {endpoint}: set HF_TOKEN to a token with write "
                       f"access, or run `hf auth login` once.{kept}")
    return HfApi(endpoint=endpoint, token=token)


def run_files(folder: Path, repo_id: str) -> dict[str, Path | bytes]:
    """What a push of `folder` to `repo_id` uploads: name in the repo -> the local file, or the bytes of a public
    copy."""
    files: dict[str, Path | bytes] = {name: folder / name for name in PUSHED_FILES if (folder / name).is_file()}
    if METRICS_FILE in files:
        files[METRICS_FILE] = public_metrics(files[METRICS_FILE].read_bytes())
    if (record := read_record(folder)) is None:  # no run.json: pushed without it
        return files
    public = public_record(asdict(record))
    public["settings"]["hub_model_id"] = repo_id  # where it is now, also after a push to a corrected repo id
    files[RECORD_FILE] = RunRecord(**public).to_json().encode()
    # The card mlm wrote names the repo it was written for, perhaps the local folder: the pushed one names this repo.
    # A card the user edited goes as it is.
    if CARD_FILE in files and record.written.get(CARD_FILE) == file_sha256(files[CARD_FILE]):
        files[CARD_FILE] = run_model_card(folder, model_id=repo_id).encode()
    # tensorboard/ when some segment wrote it: the settings say so now, or did before a resume changed them (a
    # segment's `changed` holds [before, now]). Dot files are temporary files of a write in progress, not logs.
    if record.settings.get("report_to") == "tensorboard" or any(
            "tensorboard" in (segment.get("changed") or {}).get("report_to", ()) for segment in record.segments):
        files |= {path.relative_to(folder).as_posix(): path for path in sorted((folder / LOG_DIR).rglob("*"))
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts)}
    return files


def public_record(data: dict) -> dict:
    """A run record (run.json as a dict) without local paths, for a public repo: each replaced by its last part
    ("/home/me/data/reviews.jsonl" -> "reviews.jsonl"), as the model card names local things: the settings above that
    name one, and any other string at any depth, dict keys too, that is an absolute or home path ("/…", "~…"): the
    checkpoint a resume started from, the folders a resume changed. The TEXT_KEYS stay: the card shows them anyway."""
    settings = dict(data.get("settings") or {})
    for name in (*HUB_OR_LOCAL_SETTINGS, *LOCAL_SETTINGS):
        if isinstance(value := settings.get(name), str) and (name in LOCAL_SETTINGS or not is_hub_id(value)):
            settings[name] = _last_part(value)
    return _without_paths({**data, "settings": settings})


def public_metrics(data: bytes) -> bytes:
    """metrics.jsonl cleaned as `public_record` cleans the record (its `resume` lines name a checkpoint). A line that
    is not a JSON object, such as one cut short by a crash, is left out: it holds no figure, and could hold a path."""
    entries = []
    for line in data.splitlines():
        with suppress(ValueError):
            entries.append(json.loads(line))
    return "".join(json.dumps(_without_paths(entry)) + "\n" for entry in entries if isinstance(entry, dict)).encode()


def _without_paths(value):
    if isinstance(value, str):
        return _last_part(value) if value.startswith(("/", "~")) else value
    if isinstance(value, dict):
        return {_without_paths(key): item if key in TEXT_KEYS else _without_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_paths(item) for item in value]
    return value


def _last_part(path: str) -> str:
    # "/" has no last part, and "~me" would name the user: neither says anything a reader needs.
    return name if (name := Path(path).name) and not name.startswith("~") else "local"


def describe_push_error(err: BaseException, repo_id: str, endpoint: str) -> str:
    """What went wrong while pushing `repo_id` to `endpoint`, in one line, with the cause the Hub or network gave."""
    status, names, chain = hub_failure(err)
    reason = next((message for error in chain if (message := getattr(error, "server_message", None))), None)
    reason = clipped(str(reason or str(err) or type(err).__name__), 300)
    key = (status if status in PUSH_ERRORS else 500 if status >= 500 else 400) if status is not None else (
        "offline" if "OfflineModeIsEnabled" in names else "network" if names & NETWORK_ERRORS else "other")
    return PUSH_ERRORS[key].format(endpoint=endpoint, repo=repr(repo_id), reason=reason, status=status,
                                   kind=type(err).__name__)
