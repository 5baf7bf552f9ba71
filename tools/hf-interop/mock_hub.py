#!/usr/bin/env python3
"""A mock Hugging Face hub on 127.0.0.1 for tools/hf-interop.sh (standard library only).

It behaves as the real hub does towards `huggingface_hub` and our client:

- `HEAD|GET /{owner}/{name}/resolve/{revision}/{path}`: `X-Repo-Commit` on every answer. LFS
  files (`*.safetensors`) answer 302 to a storage host on another port (another origin, as the
  real CDN is), with `X-Linked-Etag` (sha256), `X-Linked-Size` and a `Content-Length` that is
  the redirect page's own; other files answer 200 with `ETag` (git blob sha1) and the file.
- `GET /api/models/{owner}/{name}/tree/{revision}`: the file list `hf cache verify` reads.
- errors with `X-Error-Code`: `RepoNotFound` (401), `RevisionNotFound`, `EntryNotFound` (404,
  with `X-Repo-Commit`), `GatedRepo` (401 when a token is required and missing).
- the storage host: `GET|HEAD /cdn/{sha256}`, `Range` (206, 416 with `bytes */len`), never asks
  for a token and records any it gets.

Behaviours switched at run time through `POST /_mock/config` (JSON merged into the state):
`token` (required on the hub), `no_linked_size` (LFS redirects without `X-Linked-Size`),
`slow_ms` (pause per 16 KiB sent by the storage host), `cut` (file paths whose next full
download is cut halfway, connection dropped), `rename` ({old repo: new repo}: a 307 to the new
name, absolute on the same host unless `rename_relative`). `GET /_mock/log` returns every
request seen (host, method, path, range, authorization, status, time); `POST /_mock/reset`
clears the log and the behaviours.

    mock_hub.py serve --repo OWNER/NAME=DIR... --ready FILE
        writes {"hub": URL, "cdn": URL, "pid": PID} to FILE when listening; stops on SIGTERM
    mock_hub.py ctl HUB_URL config JSON | reset | log
"""

import argparse
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

CHUNK = 16 * 1024
DEFAULTS = {
    "token": None,
    "no_linked_size": False,
    "slow_ms": 0,
    "cut": [],
    "rename": {},
    "rename_relative": False,
}


class File:
    def __init__(self, path, data):
        self.path = path
        self.data = data
        self.lfs = path.endswith(".safetensors")
        self.sha256 = hashlib.sha256(data).hexdigest()
        git = hashlib.sha1(b"blob %d\0" % len(data))
        git.update(data)
        self.git_sha1 = git.hexdigest()


class Repo:
    def __init__(self, name, root):
        self.name = name
        self.files = {}
        for dirpath, _, names in os.walk(root):
            for n in sorted(names):
                full = os.path.join(dirpath, n)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                with open(full, "rb") as f:
                    self.files[rel] = File(rel, f.read())
        listing = json.dumps(sorted((p, f.git_sha1) for p, f in self.files.items()))
        self.commit = hashlib.sha1((name + listing).encode()).hexdigest()


class Hub:
    def __init__(self, repos):
        self.repos = repos
        self.blobs = {f.sha256: f for r in repos.values() for f in r.files.values()}
        self.lock = threading.Lock()
        self.state = json.loads(json.dumps(DEFAULTS))
        self.log = []
        self.cdn_url = None

    def config(self, changes):
        with self.lock:
            self.state.update(changes)

    def get(self, key):
        with self.lock:
            return json.loads(json.dumps(self.state[key]))

    def take_cut(self, path):
        """Whether this full download of `path` is to be cut (each listed path once)."""
        with self.lock:
            if path in self.state["cut"]:
                self.state["cut"].remove(path)
                return True
            return False

    def record(self, entry):
        with self.lock:
            self.log.append(entry)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub = None  # set per server class
    storage = False

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.dispatch(head=True)

    def do_GET(self):
        self.dispatch(head=False)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        if self.storage or not url.path.startswith("/_mock/"):
            return self.answer(404, {}, b"", head=False)
        if url.path == "/_mock/config":
            self.hub.config(json.loads(body or b"{}"))
        elif url.path == "/_mock/reset":
            with self.hub.lock:
                self.hub.log.clear()
                self.hub.state = json.loads(json.dumps(DEFAULTS))
        else:
            return self.answer(404, {}, b"", head=False)
        self.answer(200, {"Content-Type": "application/json"}, b"{}", head=False)

    def answer(self, status, headers, body, head, entry=None, length=None):
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body) if length is None else length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if entry is not None:
            entry["status"] = status
            self.hub.record(entry)
        if not head and body:
            self.wfile.write(body)

    def dispatch(self, head):
        url = urlsplit(self.path)
        path = unquote(url.path)
        if not self.storage and path == "/_mock/log":
            with self.hub.lock:
                body = json.dumps(self.hub.log).encode()
            return self.answer(200, {"Content-Type": "application/json"}, body, head)
        entry = {
            "t": time.time(),
            "host": "cdn" if self.storage else "hub",
            "method": self.command,
            "path": path,
            "range": self.headers.get("Range"),
            "auth": self.headers.get("Authorization"),
            "agent": self.headers.get("User-Agent", ""),
        }
        if self.storage:
            return self.storage_host(path, head, entry)
        token = self.hub.get("token")
        if token and self.headers.get("Authorization") != f"Bearer {token}":
            return self.answer(401, {"X-Error-Code": "GatedRepo"}, b"", head, entry)
        parts = path.strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head, entry)
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "tree":
            return self.tree("/".join(parts[2:4]), parts[5], head, entry)
        self.answer(404, {}, b"", head, entry)

    def find(self, repo_name, revision, entry, head):
        repo = self.hub.repos.get(repo_name)
        if repo is None:
            self.answer(401, {"X-Error-Code": "RepoNotFound"}, b"", head, entry)
            return None
        if revision not in ("main", repo.commit):
            self.answer(404, {"X-Error-Code": "RevisionNotFound"}, b"", head, entry)
            return None
        return repo

    def resolve(self, repo_name, revision, file_path, head, entry):
        renamed = self.hub.get("rename").get(repo_name)
        if renamed:
            moved = f"/{renamed}/resolve/{revision}/{file_path}"
            if not self.hub.get("rename_relative"):
                moved = f"http://{self.headers['Host']}{moved}"
            return self.answer(307, {"Location": moved}, b"", head, entry)
        repo = self.find(repo_name, revision, entry, head)
        if repo is None:
            return
        f = repo.files.get(file_path)
        common = {"X-Repo-Commit": repo.commit}
        if f is None:
            headers = dict(common, **{"X-Error-Code": "EntryNotFound"})
            return self.answer(404, headers, b"", head, entry)
        if f.lfs:
            location = f"{self.hub.cdn_url}/cdn/{f.sha256}?sig=mock"
            page = f"Found. Redirecting to {location}".encode()
            headers = dict(common)
            headers["X-Linked-Etag"] = f'"{f.sha256}"'
            if not self.hub.get("no_linked_size"):
                headers["X-Linked-Size"] = str(len(f.data))
            # The pointer file's own ETag: a client must prefer X-Linked-Etag.
            headers["ETag"] = f'"{hashlib.sha1(f.sha256.encode()).hexdigest()}"'
            headers["Location"] = location
            return self.answer(302, headers, page, head, entry)
        headers = dict(common, ETag=f'"{f.git_sha1}"', **{"Accept-Ranges": "bytes"})
        self.send_content(f, head, entry, headers)

    def tree(self, repo_name, revision, head, entry):
        repo = self.find(repo_name, revision, entry, head)
        if repo is None:
            return
        items, dirs = [], set()
        for p, f in sorted(repo.files.items()):
            parts = p.split("/")
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            item = {"type": "file", "oid": f.git_sha1, "size": len(f.data), "path": p}
            if f.lfs:
                item["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            items.append(item)
        for d in sorted(dirs):
            items.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
        body = json.dumps(items).encode()
        self.answer(200, {"Content-Type": "application/json"}, body, head, entry)

    def storage_host(self, path, head, entry):
        f = self.hub.blobs.get(path[len("/cdn/"):]) if path.startswith("/cdn/") else None
        if f is None:
            return self.answer(404, {}, b"", head, entry)
        self.send_content(f, head, entry, {"Accept-Ranges": "bytes"})

    def send_content(self, f, head, entry, headers):
        data, total = f.data, len(f.data)
        start, end = 0, total - 1
        status = 200
        wanted = self.headers.get("Range")
        if wanted:
            first, _, last = wanted.replace("bytes=", "").partition("-")
            start = int(first or 0)
            end = min(int(last), total - 1) if last else total - 1
            if start >= total:
                headers["Content-Range"] = f"bytes */{total}"
                return self.answer(416, headers, b"", head, entry)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        body = data[start : end + 1]
        cut = not head and not wanted and self.hub.take_cut(f.path)
        entry["cut"] = cut
        self.answer(status, headers, b"", head=True, entry=entry, length=len(body))
        if head:
            return
        if cut:
            body = body[: len(body) // 2]
        slow = self.hub.get("slow_ms") / 1000
        try:
            for i in range(0, len(body), CHUNK):
                if slow:
                    time.sleep(slow)
                self.wfile.write(body[i : i + CHUNK])
            self.wfile.flush()
        except OSError:
            return
        if cut:
            # A dropped connection: the announced length never arrives.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def serve(args):
    repos = {}
    for spec in args.repo:
        name, _, root = spec.partition("=")
        repos[name] = Repo(name, root)
    hub = Hub(repos)
    servers = []
    for storage in (False, True):
        handler = type("H", (Handler,), {"hub": hub, "storage": storage})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        servers.append(server)
    hub_url = f"http://127.0.0.1:{servers[0].server_address[1]}"
    hub.cdn_url = f"http://127.0.0.1:{servers[1].server_address[1]}"
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ready = {"hub": hub_url, "cdn": hub.cdn_url, "pid": os.getpid()}
    for name, repo in repos.items():
        ready.setdefault("commits", {})[name] = repo.commit
    tmp = args.ready + ".tmp"
    with open(tmp, "w") as f:
        json.dump(ready, f)
    os.replace(tmp, args.ready)
    while not stop.wait(0.2):
        pass
    for server in servers:
        server.shutdown()


def ctl(args):
    url = args.hub.rstrip("/")
    if args.what == "log":
        with urllib.request.urlopen(f"{url}/_mock/log") as r:
            sys.stdout.write(r.read().decode() + "\n")
        return
    body = (args.json or "{}").encode() if args.what == "config" else b""
    req = urllib.request.Request(f"{url}/_mock/{args.what}", data=body, method="POST")
    urllib.request.urlopen(req).read()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--repo", action="append", required=True, help="OWNER/NAME=DIR")
    s.add_argument("--ready", required=True)
    c = sub.add_parser("ctl")
    c.add_argument("hub")
    c.add_argument("what", choices=["config", "reset", "log"])
    c.add_argument("json", nargs="?")
    args = p.parse_args()
    serve(args) if args.cmd == "serve" else ctl(args)


if __name__ == "__main__":
    main()
