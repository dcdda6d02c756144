"""A local stand-in for the Hugging Face Hub, for tests: stdlib HTTP on 127.0.0.1, state in memory.

huggingface_hub has no offline backend, so the tests point the real client (`HF_ENDPOINT`) at this server. It speaks
the part of the Hub API that publishing and loading a model use: create a repo, preupload (always "regular": files
travel base64 inside the commit, no LFS/xet), commit (add and delete, atomic: a commit that fails changes nothing),
branches as revisions, repo info and file trees, `resolve` downloads (HEAD and GET, with the commit and ETag headers
the client caches by), `validate-yaml` and `whoami`. Anything else answers 404/405 so that a client path we do not
speak fails loudly instead of passing by accident.

    with LocalHub() as hub:          # hub.endpoint == "http://127.0.0.1:PORT"
        ...
"""

import base64
import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class _Repo:
    def __init__(self):
        self.commits: dict[str, dict[str, bytes]] = {}
        self.branches: dict[str, str] = {}
        self.log: list[str] = []  # commit ids, oldest first
        self._commit({}, "initial commit", "main")

    def _commit(self, files: dict[str, bytes], message: str, branch: str) -> str:
        sha = hashlib.sha1(f"{message}{time.time_ns()}{len(self.log)}".encode()).hexdigest()
        self.commits[sha] = files
        self.branches[branch] = sha
        self.log.append(sha)
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class LocalHub:
    """The server. `repos` maps "namespace/name" to its state; `fail_next_commit` makes the next commit answer 500."""

    def __init__(self):
        self.repos: dict[str, _Repo] = {}
        self.fail_next_commit = False
        self.commit_requests = 0
        self.commit_authorizations: list[str | None] = []  # the Authorization header of every commit request
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def _handler_class(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            # -- plumbing --------------------------------------------------------------------------------------------
            def _send(self, status: int, body=b"", headers: dict | None = None, head: bool = False):
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str, head: bool = False):
                self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message}, head=head)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _repo(self, repo_id: str, head: bool = False):
                repo = hub.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head=head)
                return repo

            def _revision(self, repo, revision: str, head: bool = False):
                sha = repo.resolve(unquote(revision))
                if sha is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
                return sha

            # -- routes ----------------------------------------------------------------------------------------------
            def do_HEAD(self):
                self._get(head=True)

            def do_GET(self):
                self._get(head=False)

            def _get(self, head: bool):
                path = urlsplit(self.path).path
                if path == "/api/whoami-v2":
                    return self._send(200, {"type": "user", "name": "local", "auth": {"type": "access_token"}})
                match = re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if match:
                    return self._resolve(match.group(2), match.group(3), unquote(match.group(4)), head)
                match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                if match:
                    return self._info(match.group(2), match.group(3) or "main", head)
                match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
                if match:
                    return self._tree(match.group(2), match.group(3), match.group(4) or "")
                match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/refs", path)
                if match and (repo := self._repo(match.group(2))):
                    branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in repo.branches.items()]
                    return self._send(200, {"branches": branches, "converts": [], "tags": []})
                self._error(404, "NotFound", f"local hub does not serve GET {path}", head=head)

            def _resolve(self, repo_id, revision, filename, head):
                with hub._lock:
                    repo = self._repo(repo_id, head)
                    sha = repo and self._revision(repo, revision, head)
                    if not sha:
                        return
                    content = repo.commits[sha].get(filename)
                if content is None:
                    return self._error(404, "EntryNotFound", f"{filename} not found at {revision}", head=head)
                etag = '"' + hashlib.sha256(content).hexdigest() + '"'
                self._send(200, content, {"X-Repo-Commit": sha, "ETag": etag}, head=head)

            def _info(self, repo_id, revision, head):
                with hub._lock:
                    repo = self._repo(repo_id, head)
                    sha = repo and self._revision(repo, revision, head)
                    if not sha:
                        return
                    siblings = [{"rfilename": name} for name in sorted(repo.commits[sha])]
                self._send(200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                                 "siblings": siblings, "tags": [], "downloads": 0, "likes": 0}, head=head)  # fmt: skip

            def _tree(self, repo_id, revision, prefix):
                with hub._lock:
                    repo = self._repo(repo_id)
                    sha = repo and self._revision(repo, revision)
                    if not sha:
                        return
                    files = repo.commits[sha]
                    entries = [
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in sorted(files.items())
                        if not prefix or name.startswith(prefix.rstrip("/") + "/")
                    ]
                self._send(200, entries)

            def do_POST(self):
                path = urlsplit(self.path).path
                body = self._body()
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = f"{payload.get('organization') or 'local'}/{payload['name']}"
                    with hub._lock:
                        if repo_id in hub.repos:  # the real Hub names the existing repo's url in its 409
                            message = "You already created this model repo"
                            return self._send(409, {"error": message, "url": f"{hub.endpoint}/{repo_id}"},
                                              {"X-Error-Message": message})  # fmt: skip
                        hub.repos[repo_id] = _Repo()
                    return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/preupload/([^/]+)", path)
                if match:
                    if not self._repo(match.group(2)):
                        return
                    files = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                        for f in json.loads(body)["files"]
                    ]
                    return self._send(200, {"files": files, "commitOid": None})
                match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/commit/([^/]+)", path)
                if match:
                    return self._commit(match.group(2), unquote(match.group(3)), body)
                match = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/branch/([^/]+)", path)
                if match:
                    return self._branch(match.group(2), unquote(match.group(3)), body)
                self._error(404, "NotFound", f"local hub does not serve POST {path}")

            def _commit(self, repo_id, branch, body):
                with hub._lock:
                    hub.commit_requests += 1
                    hub.commit_authorizations.append(self.headers.get("Authorization"))
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    if branch not in repo.branches:
                        return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
                    if hub.fail_next_commit:
                        hub.fail_next_commit = False
                        return self._error(500, "InternalError", "simulated failure: nothing was committed")
                    files = dict(repo.commits[repo.branches[branch]])
                    summary = ""
                    for line in body.splitlines():
                        entry = json.loads(line)
                        key, value = entry["key"], entry["value"]
                        if key == "header":
                            summary = value.get("summary", "")
                        elif key == "file":
                            files[value["path"]] = base64.b64decode(value["content"])
                        elif key == "deletedFile":
                            files.pop(value["path"], None)
                        elif key == "deletedFolder":
                            folder = value["path"].rstrip("/") + "/"
                            files = {k: v for k, v in files.items() if not k.startswith(folder)}
                        else:
                            return self._error(400, "BadRequest", f"local hub does not support {key!r} operations")
                    sha = repo._commit(files, summary, branch)
                self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha,
                                 "success": True, "pullRequestUrl": None})  # fmt: skip

            def _branch(self, repo_id, branch, body):
                with hub._lock:
                    repo = self._repo(repo_id)
                    if repo is None:
                        return
                    start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                    if branch in repo.branches:
                        return self._error(409, "BranchExists", f"Branch {branch} already exists")
                    sha = self._revision(repo, start)
                    if sha:
                        repo.branches[branch] = sha
                        self._send(200, {})

        return Handler
