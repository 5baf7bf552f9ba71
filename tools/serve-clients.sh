#!/usr/bin/env bash
# `ultrapixel serve` against a real client library (issue 17): the pinned `openai` Python
# package, installed once into a cache venv, calls images.generate (b64_json) on a server that
# runs the tiny model of `make-tiny-model` on the cpu backend, and checks the PNG it gets
# (tools/serve-clients/openai_client.py).
#
#   UPX_OPENAI_VENV  venv of the pinned client (default: $HOME/.cache/upx/openai-<version>)
#   UPX_BIN          the ultrapixel binary to check (default: built here as tools/test.sh does)
#
# Loopback only; the server is stopped by its PID with SIGTERM and must exit 0. Exit 0 when
# every check passed, 1 at the first that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# The openai release the checks pin (PyPI's latest on 2026-12-06).
openai_version=3.51.0

# shellcheck source=tools/lib/client-checks.sh
. tools/lib/client-checks.sh

venv=$(tools/pinned-venv.sh "${UPX_OPENAI_VENV:-$HOME/.cache/upx/openai-$openai_version}" \
    openai "$openai_version")
py="$venv/bin/python"

work=$(mktemp -d "${TMPDIR:-/tmp}/serve-clients.XXXXXX")
server_pid=
cleanup() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
use_upx_bin

step "the tiny model, the server on 127.0.0.1"
"$UPX_BIN" make-tiny-model "$work/model" >/dev/null
"$UPX_BIN" serve --model-dir "$work/model" --backend cpu --listen 127.0.0.1:0 \
    2>"$work/log" &
server_pid=$!
base=
for _ in $(seq 600); do
    base=$(sed -n 's/^listening on //p' "$work/log")
    [ -n "$base" ] && grep -q '^ready' "$work/log" && break
    kill -0 "$server_pid" 2>/dev/null || fail "the server exited: $(cat "$work/log")"
    sleep 0.1
done
grep -q '^ready' "$work/log" || fail "the server was not ready within 60 s: $(cat "$work/log")"
echo "  $base"

step "openai $openai_version: images.generate"
env -u OPENAI_API_KEY -u OPENAI_BASE_URL -u http_proxy -u https_proxy -u HTTP_PROXY \
    -u HTTPS_PROXY -u ALL_PROXY -u all_proxy NO_PROXY=127.0.0.1 no_proxy=127.0.0.1 \
    "$py" "$root/tools/serve-clients/openai_client.py" "$base" 512x512 42 ||
    fail "the openai client: see above; server log: $(cat "$work/log")"

step "SIGTERM"
kill -TERM "$server_pid"
code=0
wait "$server_pid" || code=$?
server_pid=
[ "$code" = 0 ] || fail "the server exited $code after SIGTERM: $(cat "$work/log")"
echo "  exit 0"

step "all checks passed in $((SECONDS - started)) s"
