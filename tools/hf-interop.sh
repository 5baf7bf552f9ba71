#!/usr/bin/env bash
# Our Hugging Face cache against the real Python client (issue 18): both write and read one
# cache, proven with the pinned huggingface_hub and a mock hub on 127.0.0.1 that behaves as the
# real one (302s to a storage host on another port for LFS files, X-Linked-Etag/X-Linked-Size,
# Range, EntryNotFound; tools/hf-interop/mock_hub.py). The repositories hold the tiny model of
# `ultrapixel make-tiny-model`, so `generate` runs from a cache the Python client filled.
#
# Checked: our `download` writes a cache that scan_cache_dir lists without warnings, that
# hf_hub_download(local_files_only=True) resolves byte for byte and `hf cache verify` passes,
# and that the client reuses without a download; our `generate` runs offline from the client's
# cache and our `download` finds it complete with zero GETs; resume after a dropped connection
# (ours within a run and across runs, the client's); two downloads at once (ours + ours, ours +
# the client's: each file fetched once) and the client holding the blob lock; `~` and `$VAR` in
# HF_HUB_CACHE / HF_HOME; TRANSFORMERS_OFFLINE; an LFS redirect without X-Linked-Size; a renamed
# repository (absolute and relative same-host redirects, the token never sent to the storage
# host); refs/main written only when it changes; download exit codes 1 and 2.
#
#   UPX_HF_VENV   venv of the pinned client (default: $HOME/.cache/upx/hf-hub-<version>)
#   UPX_BIN       the ultrapixel binary to check (default: built here as tools/test.sh builds it)
#   UPX_KEEP=1    keep the work folder (printed) for a look afterwards
#
# Loopback only; the mock hub is stopped by its PID. Exit 0 when every check passed, 1 at the
# first that fails (with what was expected and seen).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
# The huggingface_hub release the checks pin (PyPI's latest on 2026-12-04; the issue tried 2.4).
hf_hub_version=2.4.0

# shellcheck source=tools/lib/client-checks.sh
. tools/lib/client-checks.sh
ok() { echo "  ok: $*"; }

# --- the real client, pinned, in a cache venv outside the repository.
venv=$(tools/pinned-venv.sh "${UPX_HF_VENV:-$HOME/.cache/upx/hf-hub-$hf_hub_version}" \
    huggingface_hub "$hf_hub_version")
py="$venv/bin/python"
hf="$venv/bin/hf"

# --- our binary, copied so that nothing rebuilds it under the checks.
work=$(mktemp -d "${TMPDIR:-/tmp}/hf-interop.XXXXXX")
mock_pid=
cleanup() {
    if [ -n "$mock_pid" ]; then
        kill "$mock_pid" 2>/dev/null || true
        wait "$mock_pid" 2>/dev/null || true
    fi
    if [ "${UPX_KEEP:-}" = 1 ]; then
        echo "work folder kept: $work" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
use_upx_bin
cp "$UPX_BIN" "$work/ultrapixel"
bin=$work/ultrapixel
mock="$root/tools/hf-interop/mock_hub.py"
client="$root/tools/hf-interop/client.py"

# Every command sees only the variables set here: no proxy, no user cache, token or offline
# setting, HOME a fresh folder.
mkdir -p "$work/home" "$work/cwd"
# shellcheck disable=SC2054 # NO_PROXY's commas are its own
clean=(env -u HF_HOME -u HF_HUB_CACHE -u HUGGINGFACE_HUB_CACHE -u HF_TOKEN -u HUGGING_FACE_HUB_TOKEN
    -u HF_TOKEN_PATH -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE -u XDG_CACHE_HOME -u HF_ENDPOINT
    -u http_proxy -u https_proxy -u HTTP_PROXY -u HTTPS_PROXY -u ALL_PROXY -u all_proxy
    NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost HOME="$work/home"
    HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_DISABLE_UPDATE_CHECK=1 HF_HUB_DISABLE_PROGRESS_BARS=1
    PYTHONDONTWRITEBYTECODE=1)

step "huggingface_hub $("${clean[@]}" "$py" "$client" version), the tiny model as two repositories, the mock hub"
"$bin" make-tiny-model "$work/tiny" >/dev/null
sc="$work/repos/stable-cascade"
up="$work/repos/ultrapixel"
mkdir -p "$sc" "$up"
cp -r "$work/tiny/." "$sc/"
mv "$sc/ultrapixel_t2i.safetensors" "$up/"
"${clean[@]}" "$py" "$mock" serve --repo "stabilityai/stable-cascade=$sc" \
    --repo "stabilityai/stable-cascade-v2=$sc" --repo "roubaofeipi/UltraPixel=$up" \
    --ready "$work/ready" &
mock_pid=$!
for _ in $(seq 100); do
    [ -s "$work/ready" ] && break
    kill -0 "$mock_pid" 2>/dev/null || fail "the mock hub did not start"
    sleep 0.1
done
[ -s "$work/ready" ] || fail "the mock hub did not start within 10 s"
hub=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["hub"])' "$work/ready")
commit=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["commits"]["stabilityai/stable-cascade"])' "$work/ready")
echo "  mock hub $hub (pid $mock_pid), stable-cascade at $commit"

# Our `download` fetches these (MODEL_FILES and the previewer); the client gets every file.
sc_ours=(stage_c_bf16.safetensors stage_b_lite_bf16.safetensors stage_a.safetensors
    text_encoder/config.json text_encoder/model.safetensors tokenizer/vocab.json
    tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json
    previewer.safetensors)
mapfile -t sc_all < <(cd "$sc" && find . -type f | sed 's|^\./||' | sort)
expect_ours=(stabilityai/stable-cascade=${#sc_ours[@]} roubaofeipi/UltraPixel=1)

ctl() { "${clean[@]}" "$py" "$mock" ctl "$hub" "$@"; }
requests() { "${clean[@]}" "$py" "$client" log "$hub" --count "$@"; }
# The requests the mock hub saw (client.py log filters), one JSON object a line, in $work/log.
log_to_file() { "${clean[@]}" "$py" "$client" log "$hub" "$@" >"$work/log"; }
# ours CACHE ARGS...: our binary on the mock hub with HF_HUB_CACHE=CACHE (env VAR=... first).
ours() {
    local cache=$1
    shift
    "${clean[@]}" HF_ENDPOINT="$hub" HF_HUB_CACHE="$cache" "$@"
}
# python CACHE ARGS...: the client (client.py ARGS) on the mock hub with HF_HUB_CACHE=CACHE.
python_client() {
    local cache=$1
    shift
    "${clean[@]}" HF_ENDPOINT="$hub" HF_HUB_CACHE="$cache" "$py" "$client" "$@"
}
# Python's view of a cache: no warnings, our files there, each one byte for byte.
python_reads() {
    local cache=$1
    python_client "$cache" scan "${expect_ours[@]}" >/dev/null
    python_client "$cache" resolve stabilityai/stable-cascade "$sc" "${sc_ours[@]}"
    python_client "$cache" resolve roubaofeipi/UltraPixel "$up" ultrapixel_t2i.safetensors
}
# Every blob of a cache has the lock file huggingface_hub uses for it, and no other exists.
locks_match_blobs() {
    local cache=$1 repo
    for repo in models--stabilityai--stable-cascade models--roubaofeipi--UltraPixel; do
        diff <(find "$cache/$repo/blobs" -type f -printf '%f\n' | sort) \
            <(find "$cache/.locks/$repo" -type f -printf '%f\n' | sed 's/\.lock$//' | sort) >/dev/null ||
            fail "$cache/.locks/$repo does not hold one <etag>.lock per blob"
    done
}
sha() { sha256sum "$1" | cut -d' ' -f1; }

step "ours -> Python: our download, read by the client"
c1="$work/c1"
ctl reset
ours "$c1" "$bin" download -q >"$work/out" || fail "download: $(cat "$work/out")"
python_reads "$c1"
ok "scan_cache_dir: no warnings, no partial files; hf_hub_download(local_files_only=True) byte for byte"
for repo in stabilityai/stable-cascade roubaofeipi/UltraPixel; do
    "${clean[@]}" HF_ENDPOINT="$hub" "$hf" cache verify "$repo" --cache-dir "$c1" \
        --fail-on-extra-files >"$work/verify" 2>&1 || fail "hf cache verify $repo: $(cat "$work/verify")"
done
ok "hf cache verify passes on both repositories"
ctl reset
python_client "$c1" download stabilityai/stable-cascade "${sc_ours[@]}"
python_client "$c1" download roubaofeipi/UltraPixel ultrapixel_t2i.safetensors
[ "$(requests --files --method GET)" = 0 ] || fail "the client downloaded again what we downloaded"
locks_match_blobs "$c1"
ok "the client reuses every file with zero GETs; lock files at .locks/<repo>/<etag>.lock"

step "Python -> ours: the client's cache, used by our generate (offline) and download"
c2="$work/c2"
python_client "$c2" download stabilityai/stable-cascade "${sc_all[@]}"
python_client "$c2" download roubaofeipi/UltraPixel ultrapixel_t2i.safetensors
ctl reset
ours "$c2" TRANSFORMERS_OFFLINE=1 "$bin" generate --backend cpu --size 512x512 --steps-c 3 \
    --steps-b 2 --seed 7 -q --out "$work/from-python-cache.png" "a test" >"$work/out" 2>&1 ||
    fail "generate from the client's cache: $(cat "$work/out")"
[ -s "$work/from-python-cache.png" ] || fail "generate wrote no image"
[ "$(requests --agent ultrapixel)" = 0 ] || fail "generate under TRANSFORMERS_OFFLINE=1 made requests"
ok "generate --backend cpu ran from the client's cache under TRANSFORMERS_OFFLINE=1, no request"
ctl reset
ours "$c2" "$bin" download -q >"$work/out" || fail "download: $(cat "$work/out")"
grep -q downloaded "$work/out" && fail "download fetched files the client had: $(cat "$work/out")"
[ "$(grep -c 'up to date' "$work/out")" = $((${#sc_ours[@]} + 1)) ] || fail "$(cat "$work/out")"
[ "$(requests --files --method GET)" = 0 ] || fail "download made GETs on a complete cache"
locks_match_blobs "$c2"
ok "download finds the client's cache complete with zero GETs; the client's lock files are ours"

step "resume after a dropped connection"
c3="$work/c3"
ctl reset
ctl config '{"cut": ["stage_b_lite_bf16.safetensors", "text_encoder/model.safetensors"]}'
ours "$c3" "$bin" download -q >"$work/out" || fail "download with cut transfers: $(cat "$work/out")"
for f in stage_b_lite_bf16.safetensors text_encoder/model.safetensors; do
    [ "$(requests --host cdn --path-end "$(sha "$sc/$f")" --method GET)" = 2 ] ||
        fail "$f: expected the cut GET and one resumed GET"
done
log_to_file --host cdn --method GET
grep -q '"range": "bytes=[1-9]' "$work/log" ||
    fail "no Range request after the cut"
python_reads "$c3"
ok "ours: both cut files resumed with Range in the same run, verified"
c4="$work/c4"
te_sha=$(sha "$sc/text_encoder/model.safetensors")
ctl reset
ctl config '{"slow_ms": 8}'
# Started directly (not through a function) so that $! is the download's own PID.
"${clean[@]}" HF_ENDPOINT="$hub" HF_HUB_CACHE="$c4" "$bin" download -q >/dev/null 2>&1 &
pid=$!
partial="$c4/models--stabilityai--stable-cascade/blobs/$te_sha.incomplete"
for _ in $(seq 300); do
    [ "$(stat -c %s "$partial" 2>/dev/null || echo 0)" -gt 1000000 ] && break
    sleep 0.05
done
{
    kill -KILL "$pid"
    wait "$pid" || true
} 2>/dev/null
have=$(stat -c %s "$partial" 2>/dev/null || echo 0)
[ "$have" -gt 1000000 ] || fail "no partial download to resume (have $have bytes)"
# A partial file of huggingface_hub 2.x (unique to its process) beside ours: left alone.
python_partial="${partial%.incomplete}.0badc0de.incomplete"
printf 'theirs' >"$python_partial"
ctl config '{"slow_ms": 0}'
ours "$c4" "$bin" download -q >"$work/out" || fail "download after a kill: $(cat "$work/out")"
[ "$(cat "$python_partial")" = theirs ] || fail "the client's partial file was touched"
rm "$python_partial"
log_to_file --host cdn --method GET --path-end "$te_sha"
grep -q '"range": "bytes=[1-9][0-9]\{6,\}-"' "$work/log" || fail "the rerun did not resume the partial file"
python_reads "$c4"
ok "ours: a download killed at $have bytes resumes from there on the next run (the client's partial file untouched)"
c5="$work/c5"
ctl reset
ctl config '{"cut": ["stage_b_lite_bf16.safetensors"]}'
python_client "$c5" download stabilityai/stable-cascade stage_b_lite_bf16.safetensors 2>"$work/out" ||
    fail "the client after a cut transfer: $(cat "$work/out")"
python_client "$c5" resolve stabilityai/stable-cascade "$sc" stage_b_lite_bf16.safetensors
[ "$(requests --host cdn --agent python --method GET)" = 2 ] || fail "the client did not retry the cut transfer"
ok "the client: a cut transfer retried (from zero: it reads 10 MB at a time, more than this file)"

step "two downloads at once"
c6="$work/c6"
ctl reset
ctl config '{"slow_ms": 2}'
ours "$c6" "$bin" download -q >"$work/out-a" 2>&1 &
a=$!
ours "$c6" "$bin" download -q >"$work/out-b" 2>&1 &
b=$!
wait "$a" || fail "ours + ours: the first failed: $(cat "$work/out-a")"
wait "$b" || fail "ours + ours: the second failed: $(cat "$work/out-b")"
[ "$(requests --files --host cdn --method GET)" = 6 ] || fail "ours + ours: an LFS file was fetched twice"
[ "$(requests --files --host hub --method GET)" = 5 ] || fail "ours + ours: a small file was fetched twice"
python_reads "$c6"
ok "ours + ours: both succeed, each file fetched once"
c7="$work/c7"
ctl reset
ours "$c7" "$bin" download -q >"$work/out-a" 2>&1 &
a=$!
python_client "$c7" download stabilityai/stable-cascade "${sc_ours[@]}" >"$work/out-b" 2>&1 &
b=$!
wait "$a" || fail "ours + Python: ours failed: $(cat "$work/out-a")"
wait "$b" || fail "ours + Python: the client failed: $(cat "$work/out-b")"
[ "$(requests --files --host cdn --method GET)" = 6 ] || fail "ours + Python: an LFS file was fetched twice"
[ "$(requests --files --host hub --method GET)" = 5 ] || fail "ours + Python: a small file was fetched twice"
if [ "$(requests --agent python)" = 0 ] || [ "$(requests --agent ultrapixel)" = 0 ]; then
    fail "ours + Python: one side made no request"
fi
python_reads "$c7"
locks_match_blobs "$c7"
ok "ours + Python: both succeed, each file fetched once, one lock per blob"
c8="$work/c8"
sa_sha=$(sha "$sc/stage_a.safetensors")
ctl config '{"slow_ms": 0}'
ctl reset
python_client "$c8" hold-lock "$c8/.locks/models--stabilityai--stable-cascade/$sa_sha.lock" 2 \
    "$work/held" "$work/released" &
holder=$!
for _ in $(seq 100); do
    [ -e "$work/held" ] && break
    sleep 0.05
done
[ -e "$work/held" ] || fail "the client did not take the lock"
ours "$c8" "$bin" download -q >"$work/out" 2>&1 || fail "download beside a held lock: $(cat "$work/out")"
wait "$holder"
log_to_file --host cdn --path-end "$sa_sha"
"$py" - "$work/released" "$work/log" <<'EOF' ||
import json, sys
released = float(open(sys.argv[1]).read())
gets = [json.loads(l) for l in open(sys.argv[2])]
sys.exit(not gets or min(g["t"] for g in gets) < released)
EOF
    fail "ours fetched stage_a.safetensors while the client held its lock"
ok "ours waits while the client holds a blob's lock"

step "1: ~ and \$VAR in HF_HUB_CACHE and HF_HOME"
# shellcheck disable=SC2088,SC2016 # the literal ~ and ${...} are what is checked
{
ctl reset
(cd "$work/cwd" && "${clean[@]}" HF_ENDPOINT="$hub" HF_HUB_CACHE='~/hfc' "$bin" download -q) >"$work/out" ||
    fail "download with HF_HUB_CACHE=~/hfc: $(cat "$work/out")"
[ -e "$work/cwd/~" ] && fail "a literal ./~ folder was made"
[ -d "$work/home/hfc/models--stabilityai--stable-cascade" ] || fail "nothing in \$HOME/hfc"
[ "$("${clean[@]}" HF_HUB_CACHE='~/hfc' "$py" "$client" cache-dir)" = "$work/home/hfc" ] ||
    fail "the client reads HF_HUB_CACHE=~/hfc elsewhere"
python_reads '~/hfc'
(cd "$work/cwd" && "${clean[@]}" HF_ENDPOINT="$hub" UPX_T="$work" HF_HOME='${UPX_T}/hfhome' "$bin" download -q) \
    >"$work/out" || fail "download with HF_HOME=\${UPX_T}/hfhome: $(cat "$work/out")"
grep -q "complete in the Hugging Face cache ($work/hfhome/hub)" "$work/out" || fail "$(cat "$work/out")"
[ "$("${clean[@]}" UPX_T="$work" HF_HOME='${UPX_T}/hfhome' "$py" "$client" cache-dir)" = "$work/hfhome/hub" ] ||
    fail "the client reads HF_HOME=\${UPX_T}/hfhome elsewhere"
}
ok "both expand ~ and \$VAR to the same cache"

step "2: TRANSFORMERS_OFFLINE=1"
ctl reset
code=0
ours "$work/empty" TRANSFORMERS_OFFLINE=1 "$bin" download -q >"$work/out" 2>&1 || code=$?
[ "$code" = 2 ] || fail "offline with files missing exits $code, not 2: $(cat "$work/out")"
[ "$(requests --agent ultrapixel)" = 0 ] || fail "TRANSFORMERS_OFFLINE=1: requests were made"
ours "$c1" TRANSFORMERS_OFFLINE=1 "$bin" download -q >"$work/out" || fail "offline, cached: $(cat "$work/out")"
[ "$(requests --agent ultrapixel)" = 0 ] || fail "TRANSFORMERS_OFFLINE=1: requests were made"
[ "$("${clean[@]}" TRANSFORMERS_OFFLINE=1 "$py" "$client" offline)" = True ] || fail "the client is not offline"
ok "offline as the client is: no request, the cache served"

step "4: an LFS redirect without X-Linked-Size"
ctl reset
ctl config '{"no_linked_size": true}'
ours "$work/c9" "$bin" download -q >"$work/out" || fail "download without X-Linked-Size: $(cat "$work/out")"
python_reads "$work/c9"
ok "downloaded and verified by checksum"

step "5: a renamed repository (same-host redirects), the token kept on the hub"
for relative in false true; do
    ctl reset
    ctl config "{\"rename\": {\"stabilityai/stable-cascade\": \"stabilityai/stable-cascade-v2\"},
        \"rename_relative\": $relative, \"token\": \"hf_interop\"}"
    ours "$work/c10-$relative" HF_TOKEN=hf_interop "$bin" download -q >"$work/out" ||
        fail "download from a renamed repository (relative: $relative): $(cat "$work/out")"
    log_to_file
    "$py" - "$work/log" <<'EOF' || fail "renamed repository (relative: $relative)"
import json, sys
log = [json.loads(l) for l in open(sys.argv[1])]
assert any(e["status"] == 307 for e in log), "no redirect was followed"
assert all(e["auth"] is None for e in log if e["host"] == "cdn"), "the token reached the storage host"
assert all(e["auth"] == "Bearer hf_interop" for e in log if e["host"] == "hub"), "a hub request lacked the token"
EOF
    # The client stores the repository under the name it asked for, as we do.
    python_client "$work/c10-$relative" resolve stabilityai/stable-cascade "$sc" "${sc_ours[@]}"
done
ok "absolute and relative redirects followed with the token; none to the storage host"

step "6: refs/main written only when it changes, atomically"
ref="$c1/models--stabilityai--stable-cascade/refs/main"
touch -d '2001-01-01' "$ref"
before=$(stat -c '%i %Y' "$ref")
ctl reset
ours "$c1" "$bin" download -q >"$work/out" || fail "$(cat "$work/out")"
[ "$(stat -c '%i %Y' "$ref")" = "$before" ] || fail "refs/main rewritten unchanged"
printf '%s' "$(printf 'f%.0s' $(seq 40))" >"$ref"
inode=$(stat -c %i "$ref")
ours "$c1" "$bin" download -q >"$work/out" || fail "$(cat "$work/out")"
[ "$(cat "$ref")" = "$commit" ] || fail "refs/main not updated"
[ "$(stat -c %i "$ref")" != "$inode" ] || fail "refs/main changed in place, not replaced by a rename"
[ "$(ls -A "$(dirname "$ref")")" = main ] || fail "a temporary file was left in refs/"
python_reads "$c1"
ok "untouched when current; replaced through a rename when the commit changed"

step "7: download exit codes"
ctl reset
code=0
"${clean[@]}" HF_ENDPOINT=http://127.0.0.1:1 HF_HUB_CACHE="$work/c11" "$bin" download -q \
    >"$work/out" 2>&1 || code=$?
[ "$code" = 1 ] || fail "a network failure exits $code, not 1: $(cat "$work/out")"
ctl config '{"token": "hf_interop"}'
code=0
ours "$work/c11" "$bin" download -q >"$work/out" 2>&1 || code=$?
[ "$code" = 2 ] || fail "access denied exits $code, not 2: $(cat "$work/out")"
ok "network failure 1, access denied 2"

step "all checks passed in $((SECONDS - started)) s"
