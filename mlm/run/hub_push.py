"""Push a finished output folder to the Hugging Face Hub with huggingface_hub's own calls.

`push_folder` creates the repo if needed (`create_repo(exist_ok=True)`) and uploads the model, its tokenizer, the
model card and the run's logs in one commit (`upload_folder`). The token is the one huggingface_hub finds itself
(HF_TOKEN, else the saved `hf auth login`); the endpoint is HF_ENDPOINT's (default https://huggingface.co).

Pushing only reads the folder: whatever fails, every local file stays where it is, and the error says how to push
again. Every failure is one MLMError line naming the endpoint and keeping the Hub's own reason.
"""

from __future__ import annotations

from pathlib import Path

from mlm.errors import MLMError
from mlm.files.hub import exception_chain

# Training checkpoints hold optimizer state (twice the model's size) and are only useful to resume a run;
# dot files are temporary files of an atomic write in progress.
IGNORE_PATTERNS = ["checkpoints/*", "checkpoints/**", ".*", "**/.*"]


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    path_in_repo: str | None = None,
    commit_message: str = "Upload model trained with mlm",
    ignore_patterns: list[str] | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> str:
    """Create `repo_id` (a model repo) if it does not exist and upload `folder` to it; return the commit's URL.

    repo_id: "namespace/name", or a bare name for a repo in the token owner's namespace.

    private: None leaves the Hub's default (public, unless the organisation defaults to private); an existing
    repo keeps its visibility. path_in_repo: upload under this folder of the repo (default: its root).
    endpoint/token: None means huggingface_hub's own resolution (HF_ENDPOINT; HF_TOKEN or the saved login).
    """
    from huggingface_hub import HfApi, constants, get_token

    folder = Path(folder)
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    if not folder.is_dir():
        raise MLMError(f"Cannot push {folder} to {endpoint}: it is not a folder.")
    token = token or get_token()
    if not token:
        raise MLMError(f"No Hugging Face token to push {repo_id!r} to {endpoint}: set HF_TOKEN to a token with write "
                       f"access, or run `hf auth login` once. The model is intact in {folder}.")
    api = HfApi(endpoint=endpoint, token=token)
    kept = f"The model is intact in {folder}; push it again once this is fixed."
    ignore = list(IGNORE_PATTERNS if ignore_patterns is None else ignore_patterns)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # A bare name ("my-model") is created in the token owner's namespace; the Hub answers with the full id.
        repo_id = getattr(repo_url, "repo_id", None) or repo_id
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, path_in_repo=path_in_repo,
                                   repo_type="model", commit_message=commit_message,
                                   ignore_patterns=ignore)
    except Exception as err:  # classified below; anything unforeseen is still one line, not a traceback
        raise MLMError(f"{describe_push_error(err, repo_id, endpoint)} {kept}") from err
    return str(getattr(commit, "commit_url", commit))


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


def push_checkpoint(checkpoint: str | Path, repo_id: str, **kwargs) -> str:
    """Upload one training checkpoint (checkpoints/step-N/) to the same folder of the repo, e.g. while training.

    Its optimizer state is uploaded too: the repo then holds everything needed to resume the run.
    """
    checkpoint = Path(checkpoint)
    return push_folder(checkpoint, repo_id, path_in_repo=f"checkpoints/{checkpoint.name}", ignore_patterns=[".*"],
                       commit_message=f"Upload checkpoint {checkpoint.name}", **kwargs)


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
