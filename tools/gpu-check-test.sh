#!/usr/bin/env bash
# CI check of the GPU machine scripts without a GPU (about 30 s): tools/gpu-check.sh
# --dry-run against the stub pack of tools/gpu-pack.sh --stub, in the cases that matter on a
# device call: every part passing, a hung step timed out while the others go on, a part
# running out of its time, the budget running out, a failing step, an output file over the
# 16 MiB limit, a returned folder that breaks the limits, bad usage, a missing binary, the
# stub refused outside a dry run, and gpu-pack's size limit. shellcheck too, when installed.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-test.XXXXXX")
mkdir "$work/tmp" # gpu-check's temporary folders, so that leftover processes can be found
trap 'rm -rf "$work"' EXIT
failed=0
n=0
fail() {
    echo "FAIL: $*" >&2
    failed=$((failed + 1))
}

# run NAME EXPECTED_RC [ENV=VALUE...] -- ARGS...: gpu-check with OUT=$work/NAME, output in
# $work/NAME.log.
run() {
    local name=$1 want=$2 rc=0
    shift 2
    local envs=()
    while [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    n=$((n + 1))
    env OUT="$work/$name" TMPDIR="$work/tmp" ${envs[@]+"${envs[@]}"} tools/gpu-check.sh "$@" >"$work/$name.log" 2>&1 || rc=$?
    [ "$rc" = "$want" ] || fail "$name: exit $rc, expected $want (log: $work/$name.log)"
    [ "$rc" = "$want" ] || { tail -n 40 "$work/$name.log" >&2; }
}
# has NAME PATTERN [FILE]: an extended regex in the summary (or FILE).
has() {
    local file=${3:-$work/$1/summary.txt}
    grep -qE -- "$2" "$file" 2>/dev/null || fail "$1: no /$2/ in $file"
}
hasnt() {
    local file=${3:-$work/$1/summary.txt}
    ! grep -qE -- "$2" "$file" 2>/dev/null || fail "$1: unexpected /$2/ in $file"
}
files() { # NAME EXPECTED...: exactly these files in OUT
    local got want
    got=$(cd "$work/$1" && find . -type f -printf '%P\n' | sort | tr '\n' ' ')
    shift
    want=$(printf '%s\n' "$@" | sort | tr '\n' ' ')
    [ "$got" = "$want" ] || fail "OUT holds [$got], expected [$want]"
}

# 1. Every part on the stub: all pass, the four files, the archive's layout, the summary last.
run all 0 -- --dry-run truth checks bench shapes stages tune dispatch serve
files all summary.txt logs.tar.gz truth-sm90.safetensors tuning-stub-gpu.json
for p in pack truth checks bench shapes stages tune dispatch serve; do has all "^$p +0 "; done
for s in truth info verify cases tinymodel generate determinism bench shapeslist shapes stages tune \
    tuninginfo tunecheck tuned untuned servemodel serve; do
    has all "^  $s +0 "
done
has all '^  torchpeer +(0|skip) '
has all 'DRY RUN'
has all '^limits: ok: 4 files'
has all '^result: all parts passed'
has all '1 passed, 0 failed \(bit-identical\)'
has all "4096x4096: GEMMs of one image.*; sm_90a 0.0015 s .*of cuBLASLt's speed"
has all '4096x4096: attention of one image: 0.001 s; sm_90a'
has all '5120x2560: end to end'
has all '3 kernels, median'
has all '^ +2048x2048 +time to first step .* time per image'
has all '^  tunecheck +0 .*137 passed, 0 failed'
has all '^  tuninginfo +0 .*tuning: stub-gpu.json'
tail -n 1 "$work/all.log" | grep -q '^result: all parts passed' || fail "all: the summary is not printed last"
tar -tzf "$work/all/logs.tar.gz" | sort >"$work/all.tar"
for f in BUILD environment.log pack.log truth.log info.log verify.log cases.log tinymodel.log \
    generate.log determinism.log bench.log shapeslist.log shapes.json shapes.log torchpeer.log \
    stages.log tune.log tuning/stub-gpu.json tuninginfo.log tunecheck.log tuned.log untuned.log \
    servemodel.log serve.log; do
    grep -qx "logs/$f" "$work/all.tar" || fail "all: logs.tar.gz lacks logs/$f"
done
grep -vqE '^logs/' "$work/all.tar" && fail "all: logs.tar.gz has files outside logs/"
head -c 8 "$work/all/truth-sm90.safetensors" | od -An -tu8 | grep -q '[1-9]' ||
    fail "all: the truth file has no safetensors header"

# 2. The default selection is run 1; a hung step times out and the others still run.
run hang 1 UPX_STUB_HANG=verify,bench -- --dry-run
files hang summary.txt logs.tar.gz truth-sm90.safetensors
has hang '^parts: +truth checks bench shapes;'
has hang '^  verify +124 timeout +[0-9]+ +timed out after [0-9]+ s'
has hang '^  bench +124 timeout'
has hang '^  cases +0 '
has hang '^  determinism +0 '
has hang '^  shapes +0 '
has hang '^result: FAILED: checks: verify; bench: bench$'
has hang 'gpu-check: timed out' <(tar -xzOf "$work/hang/logs.tar.gz" logs/verify.log)
pgrep -f "$work/tmp/" >/dev/null && fail "hang: a stub is still running after gpu-check ended"

# 3. A part that runs out of its own time: the rest of the part is not run, the next part is.
run partcap 1 UPX_STUB_HANG=info,verify,cases -- --dry-run checks bench
has partcap '^  tinymodel +not run +0 +no time left \(part'
has partcap '^checks +124 timeout'
has partcap '^bench +0 '

# 4. The budget runs out: later parts are recorded as not run, within the budget.
run budget 1 UPX_STUB_HANG=truth -- --dry-run --budget 6
has budget '^truth +124 timeout'
has budget '^checks +not run +0 +no time left \(budget of 6 s'
has budget '^shapes +not run'
used=$(sed -n 's/.*budget 6 s, used \([0-9]*\) s.*/\1/p' "$work/budget/summary.txt")
[ "${used:-99}" -le 6 ] || fail "budget: used ${used:-?} s of 6"

# 5. A failing step fails its part only (the stub passes every case and adds one failure).
run failing 1 UPX_STUB_FAIL=cases -- --dry-run checks bench
ncases=$(find tests/cases -maxdepth 1 -name '*.safetensors' | wc -l)
has failing "^  cases +1 +[0-9]+ +$ncases passed, 1 failed"
has failing '^checks +1 +[0-9]+ +FAILED: cases'
has failing '^bench +0 '

# 6. Output over 16 MiB: gzipped when that fits, else left out and reported.
run bigzero 0 UPX_STUB_TRUTH_PAD=17 -- --dry-run truth
files bigzero summary.txt logs.tar.gz truth-sm90.safetensors.gz
run bigrandom 1 UPX_STUB_TRUTH_PAD=17,random -- --dry-run truth
files bigrandom summary.txt logs.tar.gz
has bigrandom 'truth-sm90.safetensors: NOT RETURNED'

# 7. What the device would not return is found and reported, in any mode.
mkdir -p "$work/limits/a/b/c"
touch "$work/limits/a/b/c/deep" "$work/limits/bad name" "$work/limits/x1" "$work/limits/x2" \
    "$work/limits/x3" "$work/limits/x4"
truncate -s 17M "$work/limits/big.bin"
run limits 1 -- --dry-run bench
has limits '^limits: VIOLATED: '
has limits "name not \[A-Za-z0-9._-\]: 'bad name'"
has limits 'over 16 MiB: big.bin'
has limits 'folder more than 2 deep: a/b/c'
has limits 'more than 2 folders deep: a/b/c/deep'
has limits '9 files, over 8'
has limits '^result: FAILED: the output limits$'

# 8. Bad usage and a missing binary: exit 2 before anything runs.
run unknown 2 -- --dry-run checks nonsense
has unknown "unknown part 'nonsense' \(parts: truth checks bench shapes stages tune dispatch serve\)" "$work/unknown.log"
run option 2 -- --frobnicate
run badbudget 2 -- --budget soon
run nobin 2 -- --bin "$work/nowhere/ultrapixel" checks
has nobin 'not found or not executable' "$work/nobin.log"
[ ! -e "$work/nobin/summary.txt" ] || fail "nobin: wrote a summary"

# 9. The stub pack, its size check, and the stub refused outside a dry run.
tools/gpu-pack.sh --stub --dir "$work/pack" >"$work/pack.log" 2>&1 || fail "gpu-pack --stub failed"
has pack '^together: [0-9.]+ MiB \(limit 64 MiB\)' "$work/pack.log"
has pack '^commit: [0-9a-f]{40}$' "$work/pack/BUILD"
for k in dirty date rustc nvcc binary stub; do has pack "^$k: " "$work/pack/BUILD"; done
run stubrefused 2 -- --bin "$work/pack/ultrapixel" bench
has stubrefused 'dry-run stub' "$work/stubrefused.log"
rc=0
GPU_PACK_TOTAL_MIB=1 tools/gpu-pack.sh --stub --dir "$work/pack" >"$work/packbig.log" 2>&1 || rc=$?
[ "$rc" = 1 ] || fail "gpu-pack over the total: exit $rc, expected 1"
has packbig 'not under 1 MiB' "$work/packbig.log"
mkdir -p "$work/notapack" && touch "$work/notapack/precious"
rc=0
tools/gpu-pack.sh --stub --dir "$work/notapack" >"$work/notapack.log" 2>&1 || rc=$?
{ [ "$rc" = 1 ] && [ -e "$work/notapack/precious" ]; } || fail "gpu-pack emptied a folder that is not a pack"

if command -v shellcheck >/dev/null; then
    n=$((n + 1))
    shellcheck tools/gpu-check.sh tools/gpu-pack.sh tools/gpu-stub.sh tools/gpu-check-test.sh ||
        fail "shellcheck"
fi

if [ "$failed" -gt 0 ]; then
    echo "gpu scripts: $failed failures ($n runs)" >&2
    exit 1
fi
echo "gpu scripts: all checks passed ($n runs)"
