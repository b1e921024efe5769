"""A local stand-in for the Hugging Face Hub: the part of its HTTP protocol that downloads use.

What huggingface_hub (1.x; the requests are the same in 0.2x) sends, and what this server answers:

- ``GET /api/models/{org}/{name}[/revision/{rev}]`` (``HfApi.model_info``, called by
  ``snapshot_download`` and so by ``hf download``): JSON with ``id``, ``sha`` (the resolved commit)
  and ``siblings`` (``[{"rfilename": ...}]``, the files of that commit). ``rev`` is a branch or tag,
  a commit sha or an unambiguous short sha.
- ``HEAD /{org}/{name}/resolve/{rev}/{file}`` (``get_hf_file_metadata``, made without following
  redirects to other hosts). Small files, stored in git: ``200`` with ``X-Repo-Commit``, ``ETag``
  (the git blob sha1) and ``Content-Length``. Large files, stored in LFS: ``302`` to a CDN URL with
  ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256) and ``X-Linked-Size``; the client then GETs the
  CDN URL. Since this "CDN" is the same server under ``/cdn/``, no token is dropped or needed.
- ``GET /{org}/{name}/resolve/{rev}/{file}``: the file (or the same redirect for LFS files).
- ``GET /cdn/{sha256}``: an LFS object.
- Errors carry ``X-Error-Code`` as the Hub does (``RepoNotFound`` with 401, ``RevisionNotFound`` and
  ``EntryNotFound`` with 404), which huggingface_hub turns into its typed errors.

Every request is recorded in :attr:`FakeHub.requests`. The server speaks HTTP/1.0 (one request per
connection), so once :meth:`FakeHub.stop` returns nothing answers any more.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
LFS_MIN_SIZE = 10 * 1024 * 1024


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob: what the Hub sends as the ETag of a file stored in git."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    files: dict[str, bytes]
    message: str = ""


@dataclass
class Repo:
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        """A branch or tag name, a full commit sha, or an unambiguous short sha (7+ hex digits), as the Hub
        resolves revisions."""
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if 7 <= len(revision) < 40 and all(c in "0123456789abcdef" for c in revision):
            matches = [sha for sha in self.commits if sha.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        return None


class FakeHub:
    """A threaded HTTP server on ``127.0.0.1`` (free port) serving model repos made of folders."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.lfs: dict[str, bytes] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ content
    def add_commit(self, repo_id: str, folder: Path | dict[str, bytes], branch: str = "main", message: str = "") -> str:
        """Commit the files of ``folder`` (its top level) to ``branch`` of ``repo_id``; returns the sha."""
        if isinstance(folder, dict):
            files = dict(folder)
        else:
            files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        repo = self.repos.setdefault(repo_id, Repo())
        parent = repo.refs.get(branch, "")
        digest = hashlib.sha1(parent.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + git_blob_sha1(files[name]).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = Commit(sha, files, message)
        repo.refs[branch] = sha
        for name, data in files.items():
            if self.is_lfs(name, data):
                self.lfs[hashlib.sha256(data).hexdigest()] = data
        return sha

    def set_ref(self, repo_id: str, name: str, sha: str) -> None:
        """Point the branch or tag ``name`` of ``repo_id`` at the commit ``sha`` (creating or moving it)."""
        repo = self.repos[repo_id]
        if sha not in repo.commits:
            raise KeyError(f"{repo_id} has no commit {sha}")
        repo.refs[name] = sha

    @staticmethod
    def is_lfs(name: str, data: bytes) -> bool:
        return name.endswith(LFS_SUFFIXES) or len(data) >= LFS_MIN_SIZE

    # ------------------------------------------------------------------ lifecycle
    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the fake hub is not running")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    fake_hub: FakeHub
    server_version = "FakeHub/1.0"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep test output quiet
        return

    # ------------------------------------------------------------------ responses
    def _send(self, status: int, headers: dict[str, str], body: bytes = b"", *, head: bool = False) -> None:
        self.send_response(status)
        headers = {"Content-Length": str(len(body)), **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str, *, head: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit is not None:
            headers["X-Repo-Commit"] = commit
        self._send(status, headers, json.dumps({"error": message}).encode(), head=head)

    # ------------------------------------------------------------------ routing
    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._route(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._route(head=False)

    def _route(self, *, head: bool) -> None:
        path = urlsplit(self.path).path
        self.fake_hub.record("HEAD" if head else "GET", path)
        parts = path.strip("/").split("/")
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            self._model_info(parts[2:], head=head)
        elif len(parts) == 2 and parts[0] == "cdn":
            self._cdn(parts[1], head=head)
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._resolve(f"{parts[0]}/{parts[1]}", unquote(parts[3]), unquote("/".join(parts[4:])), head=head)
        else:
            self._error(404, "NotFound", f"no route for {path}", head=head)

    def _repo(self, repo_id: str, *, head: bool) -> Repo | None:
        repo = self.fake_hub.repos.get(repo_id)
        if repo is None:  # the Hub answers 401 for missing (or private) repos
            self._error(401, "RepoNotFound", f"Repository {repo_id} not found", head=head)
        return repo

    def _model_info(self, parts: list[str], *, head: bool) -> None:
        if len(parts) == 2:
            revision = "main"
        elif len(parts) == 4 and parts[2] == "revision":
            revision = unquote(parts[3])
        else:
            self._error(404, "NotFound", "bad model info path", head=head)
            return
        repo_id = f"{parts[0]}/{parts[1]}"
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return
        info = {
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit.sha,
            "private": False,
            "disabled": False,
            "gated": False,
            "library_name": "magnet-zoo",
            "tags": ["magnet-zoo"],
            "lastModified": "2024-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": name} for name in sorted(commit.files)],
        }
        self._send(200, {"Content-Type": "application/json"}, json.dumps(info).encode(), head=head)

    def _resolve(self, repo_id: str, revision: str, filename: str, *, head: bool) -> None:
        repo = self._repo(repo_id, head=head)
        if repo is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return
        data = commit.files.get(filename)
        if data is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist", head=head, commit=commit.sha)
            return
        if FakeHub.is_lfs(filename, data):
            sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
            headers = {
                "Location": f"{self.fake_hub.endpoint}/cdn/{sha256}",
                "X-Repo-Commit": commit.sha,
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
                "ETag": f'"{git_blob_sha1(pointer.encode())}"',
            }
            self._send(302, headers, head=head)
            return
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{git_blob_sha1(data)}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(200, headers, data, head=head)

    def _cdn(self, sha256: str, *, head: bool) -> None:
        data = self.fake_hub.lfs.get(sha256)
        if data is None:
            self._error(404, "NotFound", f"no object {sha256}", head=head)
            return
        headers = {"ETag": f'"{sha256}"', "Content-Type": "application/octet-stream"}
        self._send(200, headers, data, head=head)


# ---------------------------------------------------------------------- pointing huggingface_hub at it
def hub_environment(endpoint: str | None, hf_home: Path, *, offline: bool = False) -> dict[str, str]:
    """Environment variables that point huggingface_hub (and the ``hf`` CLI) at ``endpoint`` and at a
    private cache under ``hf_home``, with no token, telemetry or update check."""
    env = {
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_HUB_OFFLINE": "1" if offline else "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_XET": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }
    if endpoint is not None:
        env["HF_ENDPOINT"] = endpoint
    return env


def point_huggingface_hub_at(monkeypatch, endpoint: str | None, hf_home: Path, *, offline: bool = False) -> None:
    """Do :func:`hub_environment` in this process, where huggingface_hub is already imported.

    huggingface_hub reads its environment once, into ``huggingface_hub.constants``, when it is first
    imported (timm imports it with magnet_zoo), so the constants are patched as well as the
    variables, and the shared HTTP client is dropped so the next one sees the new proxy settings.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    env = hub_environment(endpoint, hf_home, offline=offline)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    if endpoint is not None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
    monkeypatch.setattr(constants, "HF_HOME", str(hf_home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    close = getattr(_http, "close_session", None) or getattr(_http, "reset_sessions", None)
    if close is not None:
        close()
