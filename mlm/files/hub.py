"""Find a model or dataset: a local folder, or a Hugging Face Hub repository downloaded into the HF cache, so that
everything downstream reads plain files. Downloads go through huggingface_hub, which honours HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE and HF_TOKEN; an already downloaded snapshot is reused without touching the network."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mlm.errors import MLMError, clipped

# Models and datasets alike: no example path, which would name one of the two.
OFFLINE_HINT = ("To work offline, pass a local folder with the same files instead of a repo id, or set "
                "HF_HUB_OFFLINE=1 to use the HF cache only.")
# No Hub answered: httpx's (huggingface_hub >= 1.0) and requests' (before) transport errors, and the OS's (timeouts too)
NETWORK_ERRORS = {"TransportError", "ConnectError", "ConnectionError", "TimeoutException", "NetworkError", "OSError"}


def names_a_local_path(name: str) -> bool:
    """True when `name` can only mean a local path: it looks like one ('./x', '../x', '/x', '~/x', 'x.parquet'), has
    more parts than a repo id, or lies in a folder that exists here (`runs/a` with `runs/` present). Such a name that
    is missing is a typo or a run not made yet, which a Hub error would only hide."""
    path = Path(name).expanduser()
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith((".parquet", ".jsonl", ".json", ".csv", ".txt"))
    return looks_like_path or name.count("/") > 1 or (len(path.parts) > 1 and path.parent.is_dir())


def short_name(name: str) -> str:
    """What a model or dataset is called: a Hub id's name (imdb for stanfordnlp/imdb), a folder's name, a file's
    stem (reviews for reviews.jsonl.gz), the folder a glob searches (docs for docs/**/*.txt)."""
    parts = [part for part in Path(str(name)).expanduser().parts if part not in ("/", ".", "..")]
    if any(char in part for part in parts for char in "*?["):  # a glob: the folder it searches
        parts = parts[:next(i for i, part in enumerate(parts) if any(char in part for char in "*?["))]
        return parts[-1] if parts else "data"
    last = Path(parts[-1] if parts else "data")
    while last.suffix in (".parquet", ".jsonl", ".json", ".csv", ".txt", ".gz", ".zst"):
        last = last.with_suffix("")
    return last.name


def check_repo_id(repo_id: str) -> None:
    """Raise MLMError unless `repo_id` is a Hub repo id a model can be pushed to ("name" or "namespace/name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise MLMError(f"{repo_id!r} is not a Hub repo id ({err}). Give one with `hub_model_id`: NAME or "
                       "NAMESPACE/NAME, of letters, digits, '-', '_' and '.'.") from None


def resolve_repo(name_or_path: str | Path, *, repo_type: str = "model", revision: str | None = None,
                 allow_patterns: Sequence[str] | None = None) -> Path:
    """A local folder holding the repository `name_or_path`: a folder that exists as it is, else the Hub repo id
    ("distilbert-base-uncased", "stanfordnlp/imdb") fetched with huggingface_hub.snapshot_download, limited to
    `allow_patterns` so that we never download files we do not read (e.g. pickled weights)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise MLMError(f"--revision {revision!r} only applies to Hub repo ids, but {path} is a local folder.")
        return path
    if path.exists():
        raise MLMError(f"{path} is a file, but a folder laid out like a Hub {repo_type} repository was expected.")
    if names_a_local_path(str(name_or_path)):
        # A name with a data file's extension was meant as a file (e.g. --dataset ./reviews.jsonl).
        what = "file or folder" if Path(str(name_or_path)).suffix else "folder"
        raise MLMError(f"No such {what}: {name_or_path}. Check the path (it names a local {what}, not a Hub repo id "
                       "such as 'org/name').")
    return _download(str(name_or_path), repo_type=repo_type, revision=revision, allow_patterns=allow_patterns)


def _download(repo_id: str, *, repo_type: str, revision: str | None, allow_patterns) -> Path:
    # Imported here so that the local-folder path never pays for importing huggingface_hub's HTTP stack.
    from huggingface_hub import constants, errors, get_token, snapshot_download

    where = f"{repo_type} repository {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    endpoint = constants.ENDPOINT
    # Said first: the name may be a local folder's, mistyped (corp_jsnl), which a Hub error alone would hide.
    nothing_here = f"No local folder or file {repo_id!r} here."
    try:
        folder = snapshot_download(repo_id=repo_id, repo_type=repo_type, revision=revision,
                                   allow_patterns=list(allow_patterns) if allow_patterns else None)
    except errors.HFValidationError as err:
        raise MLMError(f"{repo_id!r} is neither an existing folder nor a valid Hub repo id ({err}).") from None
    except errors.GatedRepoError as err:
        if get_token() is None:
            raise MLMError(f"The {where} on {endpoint} is gated: accept its terms on the Hub and set HF_TOKEN."
                           ) from None
        reason = clipped(str(getattr(err, "server_message", None) or ""), 200)
        raise MLMError(f"The {where} on {endpoint} is gated, and the token in use has no access to it yet ({reason}): "
                       "accept its terms, or wait for the owners' approval, with the account of that token.") from None
    except errors.RepositoryNotFoundError:
        raise MLMError(f"{nothing_here} The Hub at {endpoint} has no {where} (or it is private: set HF_TOKEN)."
                       ) from None
    except errors.RevisionNotFoundError:
        raise MLMError(f"The Hub at {endpoint} has no {where}: check --revision.") from None
    except Exception as err:  # classified by its cause below: every failure is one line naming the endpoint
        cause = describe_download_error(err, where, endpoint, offline=constants.HF_HUB_OFFLINE)
        raise MLMError(f"{nothing_here} {cause}") from None
    return Path(folder)


def set_progress_bars(enabled: bool) -> None:
    """--no-progress: turn huggingface_hub's download bars off too (HF_HUB_DISABLE_PROGRESS_BARS=1 does the same)."""
    if not enabled:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def describe_download_error(err: BaseException, where: str, endpoint: str, *, offline: bool) -> str:
    """One line for a failed download, keeping its real cause: offline, unreachable, an error answer, a
    misconfigured HF_ENDPOINT, or a server that answers but is not a Hub."""
    status, names, chain = hub_failure(err)
    innermost = chain[-1]
    reason = clipped(f"{type(innermost).__name__}: {innermost}", 200)
    if offline and status is None and not names & {"ConnectError", "TransportError"}:
        return (f"The {where} is not in the local HF cache, and HF_HUB_OFFLINE=1 forbids downloading it: unset "
                "HF_HUB_OFFLINE, or pass a local folder with the same files instead of a repo id.")
    bad_url = names & {"UnsupportedProtocol", "InvalidURL", "LocalProtocolError"}
    if not endpoint.startswith(("http://", "https://")) or bad_url:
        return (f"HF_ENDPOINT={endpoint!r} is not a valid Hub address ({reason}): set it to a URL such as "
                "https://huggingface.co, or unset it.")
    if status == 401 and os.environ.get("HF_TOKEN"):  # the Hub rejects a bad token even for a public repo
        return (f"The Hub at {endpoint} rejected the token in HF_TOKEN (HTTP 401) for the {where}: fix HF_TOKEN, or "
                "unset it for a public repo.")
    if status is not None:
        kind = "failed" if status >= 500 else "refused the request"
        fix = "Try again later" if status >= 500 or status in (408, 429) else "Check the repo id"  # busy, not wrong
        return (f"The Hub at {endpoint} {kind} (HTTP {status}) for the {where}, and it is not in the local HF cache "
                f"({reason}). {fix}, or check HF_ENDPOINT. {OFFLINE_HINT}")
    if names & NETWORK_ERRORS:
        return (f"Could not reach the Hub at {endpoint} for the {where} ({reason}), and it is not in the local HF "
                f"cache. Check the network connection and HF_ENDPOINT. {OFFLINE_HINT}")
    if names & {"KeyError", "JSONDecodeError", "ValueError", "TypeError"}:
        return (f"The server at {endpoint} answered, but not as a Hugging Face Hub does ({reason}) while fetching the "
                f"{where}: check HF_ENDPOINT.")
    return f"Could not get the {where} from the Hub at {endpoint} ({reason}). {OFFLINE_HINT}"


def hub_failure(err: BaseException) -> tuple[int | None, set[str], list[BaseException]]:
    """The HTTP status of the Hub's answer among `err`'s causes and contexts (an LFS upload's arrives wrapped in a
    RuntimeError), the names of their classes and base classes, and the chain itself, `err` first."""
    chain = [err]
    while (err := err.__cause__ or err.__context__) is not None and err not in chain:
        chain.append(err)
    statuses = (getattr(getattr(error, "response", None), "status_code", None) for error in chain)
    return (next((code for code in statuses if isinstance(code, int)), None),
            {cls.__name__ for error in chain for cls in type(error).__mro__}, chain)
