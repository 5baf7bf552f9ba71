#!/usr/bin/env python3
"""The real `huggingface_hub` client's side of tools/hf-interop.sh, and readings of the mock
hub's log. The cache, endpoint, token and offline mode come from the environment (HF_HUB_CACHE,
HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE), as for any user of the client.

    client.py version                      the installed huggingface_hub version
    client.py cache-dir                    where the client puts its cache (HF_HUB_CACHE expanded)
    client.py offline                      True or False: the client's offline mode
    client.py download REPO PATH...        hf_hub_download of each file
    client.py resolve REPO DIR PATH...     hf_hub_download(local_files_only=True) of each file,
                                           compared byte for byte with DIR/PATH
    client.py scan [REPO=NFILES...]        scan_cache_dir: fails on any warning or left-over
                                           .incomplete file, or a repo without NFILES files
    client.py hold-lock PATH SECONDS READY_FILE RELEASED_FILE
                                           holds the client's own lock on PATH (WeakFileLock)
    client.py log HUB_URL [--host H] [--method M] [--path-end P] [--agent ultrapixel|python]
                  [--files] [--count]      requests the mock hub saw (JSON lines, or a count);
                                           --files: only those of files (not the client's
                                           other API calls)
"""

import json
import os
import sys
import time
import urllib.request


def fail(message):
    print(f"client.py: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "log":
        return log(args)
    import huggingface_hub
    from huggingface_hub import constants

    if cmd == "version":
        print(huggingface_hub.__version__)
    elif cmd == "cache-dir":
        print(constants.HF_HUB_CACHE)
    elif cmd == "offline":
        print(constants.HF_HUB_OFFLINE)
    elif cmd == "download":
        repo, paths = args[0], args[1:]
        for p in paths:
            huggingface_hub.hf_hub_download(repo, p)
    elif cmd == "resolve":
        repo, root, paths = args[0], args[1], args[2:]
        for p in paths:
            got = huggingface_hub.hf_hub_download(repo, p, local_files_only=True)
            with open(got, "rb") as a, open(os.path.join(root, p), "rb") as b:
                if a.read() != b.read():
                    fail(f"{repo}/{p}: {got} differs from {root}/{p}")
    elif cmd == "scan":
        info = huggingface_hub.scan_cache_dir()
        if info.warnings:
            fail("scan_cache_dir warnings: " + "; ".join(str(w) for w in info.warnings))
        if info.incomplete_files:
            fail(f"left-over partial downloads: {sorted(str(f.file_path) for f in info.incomplete_files)}")
        files = {r.repo_id: sum(len(rev.files) for rev in r.revisions) for r in info.repos}
        for spec in args:
            repo, _, n = spec.partition("=")
            if files.get(repo) != int(n):
                fail(f"scan_cache_dir lists {files.get(repo)} files of {repo}, expected {n}: {files}")
        print(json.dumps(files, sort_keys=True))
    elif cmd == "hold-lock":
        from huggingface_hub.utils import WeakFileLock

        path, seconds, ready, released = args[0], float(args[1]), args[2], args[3]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with WeakFileLock(path):
            open(ready, "w").close()
            time.sleep(seconds)
            with open(released, "w") as f:
                f.write(repr(time.time()))
    else:
        fail(f"unknown command {cmd}")


def log(args):
    hub, opts = args[0], list(args[1:])
    count, files = "--count" in opts, "--files" in opts
    opts = [o for o in opts if o not in ("--count", "--files")]
    want = dict(zip(opts[0::2], opts[1::2]))
    with urllib.request.urlopen(f"{hub.rstrip('/')}/_mock/log") as r:
        entries = json.loads(r.read())

    def keep(e):
        agent = "ultrapixel" if e["agent"].startswith("ultrapixel/") else "python"
        return (
            want.get("--host", e["host"]) == e["host"]
            and want.get("--method", e["method"]) == e["method"]
            and e["path"].endswith(want.get("--path-end", ""))
            and want.get("--agent", agent) == agent
            and (not files or e["host"] == "cdn" or "/resolve/" in e["path"])
        )

    entries = [e for e in entries if keep(e)]
    if count:
        print(len(entries))
    else:
        for e in entries:
            print(json.dumps(e, sort_keys=True))


if __name__ == "__main__":
    main(sys.argv[1:])
