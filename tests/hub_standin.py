"""A local stand-in for the Hugging Face hub's file API, serving folders as repositories.

Enough of the protocol for `from_pretrained` through huggingface_hub: HEAD and GET of
`/{owner}/{name}/resolve/{revision}/{path}` (with the commit and ETag headers the client
reads, and the hub's error codes for a missing repository or file) and the model-info API
`/api/models/{owner}/{name}[/revision/{revision}]` and its folder listing `.../tree/{revision}/{folder}`. Requests are recorded, so a test can see
what the client asked for. Serves 127.0.0.1 only.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

COMMIT = "0123456789abcdef0123456789abcdef01234567"  # every repository's one revision


class HubStandIn:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {name: Path(folder) for name, folder in repos.items()}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                stand_in._answer(self, body=False)

            def do_GET(self):
                stand_in._answer(self, body=True)

            def log_message(self, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(handler.path).path)
        parts = path.strip("/").split("/")
        status, headers, data = 404, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'
        if len(parts) >= 4 and parts[0] == "api" and parts[1] == "models":
            repo = "/".join(parts[2:4])
            if repo in self.repos and len(parts) >= 6 and parts[4] == "tree":  # .../tree/{revision}/{folder}
                folder = "/".join(parts[6:])
                entries = [{"type": "file", "path": f} for f in self._files(repo) if f.startswith(folder + "/")]
                status, headers, data = 200, {"Content-Type": "application/json"}, json.dumps(entries).encode()
            elif repo in self.repos:
                info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in self._files(repo)]}
                status, headers, data = 200, {"Content-Type": "application/json"}, json.dumps(info).encode()
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, file = "/".join(parts[:2]), "/".join(parts[4:])
            if repo in self.repos:
                target = self.repos[repo] / file
                if target.is_file():
                    data = target.read_bytes()
                    etag = hashlib.sha256(data).hexdigest()
                    status, headers = 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'}
                else:
                    status = 404
                    headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
                    data = b'{"error": "Entry not found"}'
        self.requests.append((handler.command, path, status))
        handler.send_response(status)
        for key, value in headers.items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body:
            handler.wfile.write(data)
