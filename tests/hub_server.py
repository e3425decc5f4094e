"""A tiny stand-in for the Hugging Face Hub on 127.0.0.1: the endpoints huggingface_hub calls for create_repo and
create_commit (which upload_folder uses too), without hf_xet (HF_HUB_DISABLE_XET=1), read from huggingface_hub's own
client code.

    POST /api/repos/create                              create_repo (409 if it exists, 403 outside your namespace)
    GET  /api/models/{repo}[/revision/{rev}]            repo_info (create_repo(exist_ok=True) asks after a 403)
    GET  /api/models/{repo}/tree/{rev}                  list_repo_files: every file, one page
    GET  /api/whoami-v2                                 whoami
    POST /api/validate-yaml                             README.md metadata check before an upload
    POST /api/models/{repo}/preupload/{rev}             per file: "regular" (base64 in the commit) or "lfs"
    POST /{repo}.git/info/lfs/objects/batch             LFS batch: where to PUT each large file
    PUT  /lfs-upload/{sha256}                           the LFS upload itself (content checked against its sha256)
    POST /api/models/{repo}/commit/{rev}                the commit, NDJSON: header, file (base64), lfsFile, deletedFile

Use it as a context manager; it serves from a daemon thread and stops on exit. Every request is read by its
Content-Length (or chunk by chunk with a bounded count), sockets time out after a few seconds, so no request can
keep a test waiting. `fail` makes an endpoint answer an error status, e.g. {"create": 500}.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

USER = "me"
TOKEN = "hf_test_token_for_the_local_hub"
MAX_CHUNKS = 100_000  # chunked request bodies: more chunks than this is a runaway client, not an upload


@dataclass
class Repo:
    owner: str
    private: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)  # commit messages, oldest first


class HubServer:
    def __init__(self, *, user: str = USER, token: str = TOKEN):
        self.user, self.token = user, token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 hex -> content
        self.fail: dict[str, int] = {}  # endpoint name -> HTTP status to answer instead
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.yaml_checked: list[dict] = []  # metadata of every README.md validated
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        timeout = 10  # seconds a silent client may hold a connection

        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

        # -- plumbing

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                parts = []
                for _ in range(MAX_CHUNKS):
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                raise ValueError("too many chunks")
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload=None, *, error_code: str | None = None) -> None:
            data = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if error_code:
                self.send_header("X-Error-Code", error_code)
            if status >= 400 and isinstance(payload, dict) and "error" in payload:
                self.send_header("X-Error-Message", payload["error"])
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {hub.token}":
                return True
            self._send(401, {"error": "Invalid credentials in Authorization header"})
            return False

        def _failing(self, name: str) -> bool:
            status = hub.fail.get(name)
            if status is None:
                return False
            self._send(status, {"error": f"injected failure of {name}"})
            return True

        def _writable_repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._send(404, {"error": "Repository not found"}, error_code="RepoNotFound")
            elif repo.owner != hub.user:
                self._send(403, {"error": f"You don't have the rights to write to {repo_id}"})
                return None
            return repo

        # -- routes

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path))
            path = self.path.split("?")[0]
            if path == "/api/whoami-v2":
                if self._authorized() and not self._failing("whoami"):
                    self._send(200, {"type": "user", "name": hub.user, "orgs": [{"name": "org"}]})
                return
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(/tree/[^/]+|/revision/[^/]+)?", path)
            if not match:
                return self._send(404, {"error": f"no route GET {path}"})
            repo = hub.repos.get(match[1])
            if repo is None or (repo.private and repo.owner != hub.user):
                self._send(404, {"error": "Repository not found"}, error_code="RepoNotFound")
            elif (match[2] or "").startswith("/tree/"):  # list_repo_files: every file, one page
                self._send(200, [{"type": "file", "path": name, "oid": hashlib.sha1(data).hexdigest(),
                                  "size": len(data)} for name, data in sorted(repo.files.items())])
            else:  # repo_info
                self._send(200, {"id": match[1], "author": repo.owner, "private": repo.private,
                                 "sha": hashlib.sha1(str(repo.commits).encode()).hexdigest()})

        def do_PUT(self) -> None:
            hub.requests.append(("PUT", self.path))
            body = self._body()
            match = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
            if not match:
                self._send(404, {"error": f"no route PUT {self.path}"})
            elif self._failing("lfs-upload"):
                pass
            elif hashlib.sha256(body).hexdigest() != match[1]:
                self._send(400, {"error": "content does not match its sha256"})
            else:
                hub.lfs[match[1]] = body
                self._send(200, {})

        def do_POST(self) -> None:
            hub.requests.append(("POST", self.path))
            body = self._body()
            path = self.path.split("?")[0]
            if path == "/api/repos/create":
                return self._create(json.loads(body))
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
            if match and match[2] == "preupload":
                return self._preupload(match[1], json.loads(body))
            if match and match[2] == "commit":
                return self._commit(match[1], body)
            match = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
            if match:
                return self._lfs_batch(match[1], json.loads(body))
            self._send(404, {"error": f"no route POST {path}"})

        def _create(self, payload: dict) -> None:
            if not self._authorized() or self._failing("create"):
                return
            namespace = payload.get("organization") or hub.user
            repo_id = f"{namespace}/{payload['name']}"
            if repo_id in hub.repos:
                self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            elif namespace != hub.user:
                self._send(403, {"error": f"You don't have the rights to create a model under the namespace "
                                          f"\"{namespace}\""})
            else:
                hub.repos[repo_id] = Repo(owner=hub.user, private=payload.get("visibility") == "private")
                self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self, payload: dict) -> None:
            content = payload.get("content", "")
            match = re.match(r"---\n(.*?)\n---\n", content, re.DOTALL)
            try:
                metadata = yaml.safe_load(match[1]) if match else {}
            except yaml.YAMLError as err:
                return self._send(400, {"errors": [{"message": str(err)}], "error": "invalid YAML"})
            if not isinstance(metadata, dict):
                return self._send(400, {"errors": [{"message": "metadata is not a mapping"}], "error": "bad YAML"})
            hub.yaml_checked.append(metadata)
            self._send(200, {"errors": [], "warnings": []})

        def _preupload(self, repo_id: str, payload: dict) -> None:
            if not self._authorized() or self._failing("preupload"):
                return
            if self._writable_repo(repo_id) is None:
                return
            files = []
            for entry in payload["files"]:
                sample = base64.b64decode(entry["sample"])
                # The real Hub stores binary files (and big ones) through LFS; doing the same exercises both paths.
                lfs = b"\0" in sample or entry["path"].endswith(".safetensors")
                files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": None})
            self._send(200, {"files": files})

        def _lfs_batch(self, repo_id: str, payload: dict) -> None:
            if not self._authorized() or self._failing("lfs-batch"):
                return
            if self._writable_repo(repo_id) is None:
                return
            objects = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                        "actions": {"upload": {"href": f"{hub.url}/lfs-upload/{o['oid']}"}}}
                       for o in payload["objects"]]
            self._send(200, {"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, body: bytes) -> None:
            if not self._authorized() or self._failing("commit"):
                return
            repo = self._writable_repo(repo_id)
            if repo is None:
                return
            staged, deleted, message = {}, set(), ""
            for line in body.decode().splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "header":
                    message = value["summary"]
                elif item["key"] == "file":
                    staged[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._send(400, {"error": f"LFS object {value['oid']} was never uploaded"})
                    staged[value["path"]] = hub.lfs[value["oid"]]
                elif item["key"] == "deletedFile":
                    deleted.add(value["path"])
                else:
                    return self._send(400, {"error": f"unsupported commit operation {item['key']}"})
            repo.files = {name: data for name, data in repo.files.items() if name not in deleted} | staged
            repo.commits.append(message)
            oid = hashlib.sha1(f"{repo_id}{len(repo.commits)}".encode()).hexdigest()
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid,
                             "pullRequestUrl": None})

    return Handler
