"""A real HTTP server on 127.0.0.1 that answers as the Hugging Face hub does for one small repository:
the API routes ``huggingface_hub`` reads (revision info, file tree) and ``resolve`` downloads with
HEAD, ETag, commit header and byte ranges.  ``HF_ENDPOINT`` pointed at it makes the real client use it."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CUT_BYTES = 1 << 20


class Mirror:
    def __init__(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repo_id = repo_id
        self.files = files
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range header
        #: file name -> how many more downloads of it break after CUT_BYTES (a dropped connection)
        self.breaks: dict[str, int] = {}

    def tree(self) -> list[dict]:
        entries = []
        for name, data in self.files.items():
            entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if len(data) > 100_000:  # large files live in LFS on the hub
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return entries


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    repo = re.escape(mirror.repo_id)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_args) -> None:  # quiet
            pass

        def _json(self, value: object) -> None:
            body = json.dumps(value).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _file(self, head: bool) -> None:
            match = re.fullmatch(rf"/{repo}/resolve/[^/]+/(.+)", self.path.split("?")[0])
            data = mirror.files.get(match.group(1)) if match else None
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = 0
            ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if ranged:
                start = int(ranged.group(1))
            self.send_response(206 if ranged else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            etag = hashlib.sha256(data).hexdigest() if len(data) > 100_000 else hashlib.sha1(data).hexdigest()
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(len(data) - start))
            if ranged:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if head:
                return
            body = data[start:]
            name = match.group(1)
            if mirror.breaks.get(name, 0) > 0:  # a broken connection: part of the file, then nothing
                mirror.breaks[name] -= 1
                self.wfile.write(body[:CUT_BYTES])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            mirror.requests.append(("HEAD", self.path, self.headers.get("Range")))
            self._file(head=True)

        def do_GET(self) -> None:
            mirror.requests.append(("GET", self.path, self.headers.get("Range")))
            path = self.path.split("?")[0]
            if re.fullmatch(rf"/api/models/{repo}(/revision/[^/]+)?", path):
                siblings = [{"rfilename": name} for name in mirror.files]
                self._json({"id": mirror.repo_id, "modelId": mirror.repo_id, "sha": COMMIT, "siblings": siblings})
            elif re.fullmatch(rf"/api/models/{repo}/tree/[^/]+/?", path):
                self._json(mirror.tree())
            elif path.startswith("/api/"):
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self._file(head=False)

    return Handler


@contextmanager
def serve_mirror(repo_id: str, folder: Path, extra: dict[str, bytes] | None = None) -> Iterator[tuple[str, Mirror]]:
    """The files of ``folder`` (and ``extra``) as the hub repository ``repo_id``; yields its URL."""
    files = {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file()} | (extra or {})
    mirror = Mirror(repo_id, files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(mirror))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", mirror
    finally:
        server.shutdown()
        server.server_close()
