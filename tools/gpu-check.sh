#!/usr/bin/env bash
# The one command for a lent GPU machine (README, "GPU machines"). It runs from the pack of
# `tools/gpu-pack.sh` (the stripped release binary and its BUILD note in .gpu/, carried next
# to the working tree) on a bare machine: no git, no cargo, no registry.
#
#   tools/gpu-check.sh [--dry-run] [--budget SECONDS] [--bin PATH] [PART...]
#
# PARTS, in the order given (default: truth checks bench shapes; the second call: stages tune)
#   truth   verify --truth: the sm_90 truth fixture (returned as truth-sm90.safetensors)
#   checks  info --size 4096x4096 (which kernel each GEMM / attention op runs); verify
#           (UPX_REQUIRE_GPU=1; on compute capability 9.0 the op[sm90a] checks too); every
#           golden case on cuda;
#           the tiny random model generated twice with one seed (with previews, then
#           without): the PNGs must be bit-identical
#   bench   every kernel against the copy and cuBLASLt ceilings
#   shapes  every GEMM / attention / dwconv+LN shape at 1K, 2K, 4K: our portable and (on
#           compute capability 9.0) sm_90a kernels against cuBLASLt, and the same shapes in
#           PyTorch (tools/torch-peer.py; skipped without python3 or torch)
#   stages  every part of a generation at 1024², 2048², 4096², 5120x2560
#   tune    tune --out-dir: the tuning table (returned as tuning-<device>.json)
#   dispatch the tuning table at work (the one `tune` wrote earlier in this call, else the
#           embedded one): which table `info` selects, `tune --check` (every cuBLASLt and
#           sm_90a winner as a GEMM node builds it, against our kernel, rerun bit-identical),
#           4096² stages with the table and with UPX_TUNING=off
#   serve   `bench --serve` on the tiny random model: cold start by part (CUDA init, model
#           load, first image with its weight upload), a warm pipeline's time to first step
#           and per image at 1024² and 2048² (kept sessions), throughput with two clients
#
# Every command runs under `timeout`: a step gets min(its cap, what its part has left, what
# the budget has left), a part min(its cap, what the budget has left); the whole selection
# ends inside --budget (default 510 s, under the device call's limit). A hung or failing step
# is recorded and the rest go on. Logs go to a temporary folder; $OUT (default
# ./gpu-check-out) receives at most 8 files: summary.txt, logs.tar.gz (every log and JSON),
# truth-sm90.safetensors and tuning-<device>.json when produced. The script checks those
# limits at the end (≤ 8 files, ≤ 16 MiB each, names [A-Za-z0-9._-], ≤ 2 folders deep) and
# says so in the summary, which it prints last.
#
# --dry-run  the whole script without a GPU: packs tools/gpu-stub.sh with
#            `tools/gpu-pack.sh --stub` into the temporary folder and runs every part against
#            it, with 3-second step caps (8 s per part). UPX_STUB_HANG=STEP[,STEP] makes steps
#            hang, UPX_STUB_FAIL=STEP[,STEP] fail (tools/gpu-stub.sh). tools/gpu-check-test.sh
#            (CI) checks the outcomes.
# --bin PATH the binary (default .gpu/ultrapixel)
#
# Exit 0 when every part passed and the output is within the limits, 1 otherwise, 2 on bad
# usage or a missing binary. GPU_CHECK_KEEP=1 keeps the temporary folder.
set -uo pipefail
caller=$(pwd)
cd "$(dirname "$0")/.." || exit 2
root=$(pwd)

all_parts=(truth checks bench shapes stages tune dispatch serve)
usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die2() { echo "error: $*" >&2; exit 2; }

dry=0
budget=510
bin=
parts=()
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry=1 ;;
        --budget)
            [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || die2 "--budget needs a number of seconds"
            budget=$2
            shift
            ;;
        --bin)
            [ -n "${2:-}" ] || die2 "--bin needs a path"
            bin=$2
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        -*) die2 "unknown option $1 (tools/gpu-check.sh [--dry-run] [--budget SECONDS] [--bin PATH] [PART...])" ;;
        *)
            [[ " ${all_parts[*]} " == *" $1 "* ]] || die2 "unknown part '$1' (parts: ${all_parts[*]})"
            [[ " ${parts[*]} " == *" $1 "* ]] || parts+=("$1")
            ;;
    esac
    shift
done
[ ${#parts[@]} -gt 0 ] || parts=(truth checks bench shapes)
command -v timeout >/dev/null || die2 "timeout (coreutils) not found"

abs() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s' "$caller/$1" ;; esac; }
out=$(abs "${OUT:-$root/gpu-check-out}")
mkdir -p "$out" || die2 "cannot create $out"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || die2 "cannot create a temporary folder"
logs=$tmp/logs
mkdir -p "$logs"
cleanup() { if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then echo "kept $tmp" >&2; else rm -rf "$tmp"; fi; }
trap cleanup EXIT

# Limits of what a device call returns, and of this script's time.
max_files=8
max_bytes=$((16 * 1048576))
start=$SECONDS
if [ "$dry" = 1 ]; then
    kill_after=1 reserve=2
else
    kill_after=5 reserve=12 # after the last step: the archive, the copies, the summary
fi
deadline=$((start + budget - reserve - kill_after))

# ---- rows of the summary: one per part, then one per step -------------------------------
r_name=() r_status=() r_secs=() r_note=()
failures=()
add_row() { # NAME STATUS SECS NOTE
    r_name+=("$1") r_status+=("$2") r_secs+=("$3") r_note+=("$4")
}
mib() { awk -v b="$1" 'BEGIN { if (b < 1048576) printf "%.1f KiB", b / 1024; else printf "%.1f MiB", b / 1048576 }'; }

# Key lines of a step's log for the summary: the counts, or the numbers that answer "how fast".
keys() {
    local name=$1 log=$2 lines
    lines=$(step_keys "$name" "$log")
    [ -n "$lines" ] || [ -s "$log" ] || { echo "(no output)"; return; }
    # Then the first error and the last "N passed, M failed"; else the last line.
    lines+=$'\n'$(grep -m1 -E '^error' "$log")
    lines+=$'\n'$(grep -E '[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1)
    lines=$(grep -v '^[[:space:]]*$' <<<"$lines")
    [ -n "$lines" ] || lines=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1)
    printf '%s\n' "$lines"
}
step_keys() {
    local name=$1 log=$2
    case $name in
        pack) grep -m1 '^together:' "$log" ;;
        info) grep -m1 -E '^GPU:' "$log" ;;
        shapeslist)
            [ -s "$logs/shapes.json" ] && echo "shapes.json: $(stat -c %s "$logs/shapes.json") bytes"
            ;;
        truth)
            [ -f "$tmp/truth-sm90.safetensors" ] &&
                echo "wrote truth-sm90.safetensors ($(mib "$(stat -c %s "$tmp/truth-sm90.safetensors")"))"
            grep -E '^FAIL' "$log" | head -n 3
            ;;
        verify | cases) grep -E '^FAIL' "$log" | head -n 3 ;;
        bench)
            grep -m1 '^copy bandwidth' "$log"
            # Every kernel row ends with "(NN % of matmul)" or "(NN % of copy)": the count,
            # the median share of its ceiling and the three lowest.
            grep -E '\([0-9]+ % of (matmul|copy)\)' "$log" |
                awk '{ name = substr($0, 1, 80); sub(/ +$/, "", name)
                       match($0, /\([0-9]+ % of (matmul|copy)\)/)
                       split(substr($0, RSTART + 1, RLENGTH - 2), a, " ")
                       printf "%d\t%s\t%s\n", a[1], substr(name, 1, 48), a[4] }' |
                sort -n | awk -F '\t' '{ share[NR] = $1; what[NR] = $2 " " $1 " % of " $3 } END {
                    if (NR == 0) exit
                    line = NR " kernels, median " share[int((NR + 1) / 2)] " % of their ceiling; lowest:"
                    for (i = 1; i <= NR && i <= 3; i++) line = line (i > 1 ? ";" : "") " " what[i]
                    print line }'
            ;;
        tuninginfo) grep -m1 -i '^tuning' "$log" ;;
        shapes | torchpeer | stages | tuned | untuned)
            grep -m1 -E 'skipped' "$log"
            awk '/^[0-9]+x[0-9]+: / { size = $1 }
                 /^(GEMMs|attention|depthwise conv \+ LayerNorm) of one image/ ||
                 /^end to end/ { print size " " $0 }' "$log"
            ;;
        generate)
            local png=$tmp/img/gpu-a-11.png
            if [ -f "$png" ]; then
                echo "image $(stat -c %s "$png") bytes, $(find "$tmp/img/previews" -type f 2>/dev/null | wc -l) previews"
            fi
            ;;
        tune)
            [ -d "$tmp/tuning" ] && echo "wrote: $(cd "$tmp/tuning" && find . -maxdepth 1 -name '*.json' -printf '%f ')"
            ;;
        serve) grep -E '^  (backend open|first image|[0-9]+x[0-9]+ +time to first step)|^throughput' "$log" ;;
    esac
}

# ---- running one step ----------------------------------------------------------------------
current='' interrupted=0
on_signal() {
    interrupted=1
    [ -n "$current" ] && kill -TERM "$current" 2>/dev/null
}
trap on_signal INT TERM
part_deadline=$deadline
part_ok=1
full_echo=" bench shapes torchpeer stages tune tunecheck tuned untuned "

# step NAME CAP [--stdout FILE] -- COMMAND...: runs COMMAND under timeout with the time this
# step may take, its output in logs/NAME.log (stdout in FILE with --stdout), and records it.
step() {
    local name=$1 cap=$2 stdout_file='' log=$logs/$1.log
    shift 2
    if [ "$1" = --stdout ]; then stdout_file=$2; shift 2; fi
    [ "$1" = -- ] && shift
    [ "$dry" = 1 ] && [ "$name" != pack ] && cap=3
    local now=$SECONDS t
    t=$cap
    [ $((part_deadline - now)) -lt "$t" ] && t=$((part_deadline - now))
    [ $((deadline - now)) -lt "$t" ] && t=$((deadline - now))
    if [ "$interrupted" = 1 ]; then
        add_row "  $name" "not run" 0 "interrupted"
        part_ok=0
        return 1
    fi
    if [ "$t" -lt 1 ]; then
        add_row "  $name" "not run" 0 "no time left ($([ $((deadline - now)) -lt 1 ] && echo "budget of $budget s" || echo "part's time") spent)"
        part_ok=0
        return 1
    fi
    local shown="$*"
    [ ${#shown} -le 200 ] || shown="${shown:0:200} ..."
    printf '\n== %s (at most %s s): %s\n' "$name" "$t" "$shown"
    local t0=$SECONDS rc
    if [ -n "$stdout_file" ]; then
        timeout -k "$kill_after" "$t" "$@" >"$stdout_file" 2>"$log" </dev/null &
    else
        timeout -k "$kill_after" "$t" "$@" >"$log" 2>&1 </dev/null &
    fi
    current=$!
    wait "$current"
    rc=$?
    while kill -0 "$current" 2>/dev/null; do # a trapped signal interrupted the wait
        wait "$current"
        rc=$?
    done
    current=
    local secs=$((SECONDS - t0)) status=$rc note
    note=$(keys "$name" "$log" | cut -c 1-220)
    if { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && [ "$secs" -ge $((t - 1)) ]; then
        status="$rc timeout"
        note="timed out after $t s; last: $note"
        echo "gpu-check: timed out after $t s (exit $rc)" >>"$log"
    fi
    if [[ $full_echo == *" $name "* ]]; then cat "$log"; else tail -n 25 "$log"; fi
    [ -n "$stdout_file" ] && [ "$rc" = 0 ] && echo "(stdout: $(basename "$stdout_file"), $(stat -c %s "$stdout_file") bytes)"
    # The torch peer without torch (or without CUDA in torch) says so and exits 0.
    if [ "$rc" = 0 ] && [ "$name" = torchpeer ] && grep -q 'skipped' "$log"; then status=skip; fi
    [ "$rc" = 0 ] || part_ok=0
    add_row "  $name" "$status" "$secs" "$note"
    return "$rc"
}

# ---- the parts ---------------------------------------------------------------------------
part_cap() {
    if [ "$dry" = 1 ]; then echo 8; return; fi
    case $1 in
        truth) echo 120 ;;
        checks) echo 300 ;;
        bench) echo 150 ;;
        shapes) echo 330 ;;
        stages) echo 300 ;;
        tune) echo 480 ;;
        dispatch) echo 500 ;;
        serve) echo 150 ;;
    esac
}
part_truth() {
    step truth 120 -- "$bin" verify --truth "$tmp/truth-sm90.safetensors"
}
part_checks() {
    step info 60 -- "$bin" info --size 4096x4096
    step verify 150 -- "$bin" verify
    # Every golden case on the GPU (bf16 rule); an unknown kind would exit 2, never pass.
    step cases 120 -- "$bin" validate --backend cuda tests/cases/*.safetensors
    # The product on the tiny random model: a 512x512 PNG with previews, then again with the
    # same seed and no previews: bit-identical.
    local tiny=$tmp/tiny img=$tmp/img
    mkdir -p "$img"
    step tinymodel 30 -- "$bin" make-tiny-model "$tiny"
    step generate 90 -- "$bin" generate --model-dir "$tiny" --backend cuda --size 512x512 \
        --seed 11 --out "$img/gpu-a-{seed}.png" --preview "$img/previews" --json "a gpu check"
    # shellcheck disable=SC2016 # expanded by the inner bash
    step determinism 90 -- bash -c '
        [ -f "$2/gpu-a-11.png" ] || { echo "0 passed, 1 failed (the first run wrote no image)"; exit 1; }
        "$0" generate --model-dir "$1" --backend cuda --size 512x512 --seed 11 \
            --out "$2/gpu-b-{seed}.png" -q "a gpu check" ||
            { echo "0 passed, 1 failed (the second run failed)"; exit 1; }
        cmp "$2/gpu-a-11.png" "$2/gpu-b-11.png" && echo "1 passed, 0 failed (bit-identical)" ||
            { echo "0 passed, 1 failed (images differ)"; exit 1; }' "$bin" "$tiny" "$img"
}
part_bench() {
    step bench 150 -- "$bin" bench
}
part_shapes() {
    local sizes=(--size 1024x1024 --size 2048x2048 --size 4096x4096)
    step shapeslist 30 --stdout "$logs/shapes.json" -- "$bin" bench --shapes --list "${sizes[@]}"
    local listed=$?
    step shapes 200 -- "$bin" bench --shapes "${sizes[@]}" --iters 5
    if ! command -v python3 >/dev/null; then
        add_row "  torchpeer" skip 0 "skipped: python3 not found"
    elif [ "$listed" != 0 ] || [ ! -s "$logs/shapes.json" ]; then
        add_row "  torchpeer" "not run" 0 "no shapes.json (shapeslist failed)"
    else
        step torchpeer 150 -- python3 tools/torch-peer.py "$logs/shapes.json" --iters 5
    fi
}
part_stages() {
    step stages 300 -- "$bin" bench --stages --size 1024x1024 --size 2048x2048 \
        --size 4096x4096 --size 5120x2560 --iters 5
}
part_tune() {
    step tune 480 -- "$bin" tune --out-dir "$tmp/tuning"
    if [ -d "$tmp/tuning" ]; then
        mkdir -p "$logs/tuning"
        find "$tmp/tuning" -maxdepth 1 -name '*.json' -type f -exec cp {} "$logs/tuning/" \;
    fi
}

part_dispatch() {
    # The table the tune part just measured, when it ran (its sm_90a and cuBLASLt winners).
    local dir=
    compgen -G "$tmp/tuning/*.json" >/dev/null && dir=$tmp/tuning
    step tuninginfo 30 -- env ${dir:+UPX_TUNING_DIR="$dir"} "$bin" info
    step tunecheck 200 -- env ${dir:+UPX_TUNING_DIR="$dir"} "$bin" tune --check
    step tuned 130 -- env ${dir:+UPX_TUNING_DIR="$dir"} "$bin" bench --stages --size 4096x4096 --iters 3
    step untuned 130 -- env UPX_TUNING=off "$bin" bench --stages --size 4096x4096 --iters 3
}

part_serve() {
    local tiny=$tmp/tiny-serve
    step servemodel 30 -- "$bin" make-tiny-model "$tiny" || return
    step serve 110 -- "$bin" bench --serve --model-dir "$tiny" --backend cuda \
        --size 1024x1024 --size 2048x2048 --iters 3
}

run_part() {
    local p=$1 cap left row t0
    cap=$(part_cap "$p")
    left=$((deadline - SECONDS))
    [ "$left" -lt "$cap" ] && cap=$left
    row=${#r_name[@]}
    if [ "$interrupted" = 1 ] || [ "$cap" -lt 1 ]; then
        add_row "$p" "not run" 0 "$([ "$interrupted" = 1 ] && echo interrupted || echo "no time left (budget of $budget s spent)")"
        failures+=("$p (not run)")
        return
    fi
    printf '\n==== part %s (at most %s s)\n' "$p" "$cap"
    add_row "$p" "" 0 ""
    t0=$SECONDS
    part_deadline=$((SECONDS + cap))
    part_ok=1
    "part_$p"
    local i status=0 bad=()
    for ((i = row + 1; i < ${#r_name[@]}; i++)); do
        case ${r_status[i]} in
            0 | skip) ;;
            *) bad+=("${r_name[i]##* }") ;;
        esac
        if [ "$status" = 0 ] && [ "${r_status[i]}" != 0 ] && [ "${r_status[i]}" != skip ]; then
            status=${r_status[i]}
        fi
    done
    [ "$status" = 0 ] && [ ${#bad[@]} -gt 0 ] && status=1
    r_status[row]=$status
    r_secs[row]=$((SECONDS - t0))
    if [ ${#bad[@]} -eq 0 ]; then
        r_note[row]="ok (cap $cap s)"
    else
        r_note[row]="FAILED: ${bad[*]} (cap $cap s)"
        failures+=("$p: ${bad[*]}")
    fi
}

# ---- the binary and the machine (every probe under a timeout too) ------------------------
if [ "$dry" = 1 ] && [ -z "$bin" ]; then
    printf '== pack (stub): tools/gpu-pack.sh --stub --dir %s\n' "$tmp/pack"
    part_deadline=$deadline
    part_ok=1
    add_row pack "" 0 ""
    step pack 30 -- tools/gpu-pack.sh --stub --dir "$tmp/pack"
    r_status[0]=${r_status[1]}
    r_secs[0]=${r_secs[1]}
    if [ "$part_ok" = 1 ]; then r_note[0]="ok: the stub pack and the size check"; else
        r_note[0]="FAILED: tools/gpu-pack.sh --stub"
        failures+=("pack")
    fi
    bin=$tmp/pack/ultrapixel
fi
bin=$(abs "${bin:-$root/.gpu/ultrapixel}")
{ [ -f "$bin" ] && [ -x "$bin" ]; } ||
    die2 "$bin not found or not executable: run tools/gpu-pack.sh here and carry .gpu (or pass --bin)"
build_file=$(dirname "$bin")/BUILD
build="no BUILD next to the binary (not packed by tools/gpu-pack.sh)"
if [ -f "$build_file" ]; then
    cp "$build_file" "$logs/BUILD"
    if [ "$dry" = 0 ] && grep -q '^stub: yes' "$build_file"; then
        die2 "$bin is the dry-run stub (BUILD says stub: yes): run tools/gpu-pack.sh without --stub"
    fi
    field() { sed -n "s/^$1: //p" "$build_file" | head -n 1; }
    build="commit $(field commit | cut -c 1-12) (dirty: $(field dirty)), built $(field date); $(field rustc); nvcc $(field nvcc)"
    want=$(sed -n 's/^binary: .*sha256 \([0-9a-f]*\).*/\1/p' "$build_file")
    if [ -n "$want" ] && [ "$(sha256sum "$bin" | cut -d' ' -f1)" != "$want" ]; then
        build+="; WARNING: the binary's sha256 differs from BUILD's"
    fi
fi

# cuBLASLt (the matmul ceiling and the GEMM peer) is loaded at run time: the system's, or the
# one of a pip-installed CUDA wheel (nvidia/cublas/lib, nvidia/cu13/lib) in python3's
# site-packages, put on LD_LIBRARY_PATH.
cublas="not found (bench runs without the cuBLASLt ceiling and peer)"
# (grep reads all of ldconfig's list: an early exit would fail the pipe under pipefail.)
system_lib=$(ldconfig -p 2>/dev/null | grep 'libcublasLt\.so' | awk 'NR == 1 { print $NF }')
if [ -n "$system_lib" ]; then
    cublas="system ($system_lib)"
else
    sites=()
    if command -v python3 >/dev/null; then
        mapfile -t sites < <(timeout 30 python3 -c 'import site; print("\n".join(site.getsitepackages() + [site.getusersitepackages()]))' 2>/dev/null)
    fi
    lib=
    for d in "${sites[@]/%//nvidia/cublas/lib}" "${sites[@]/%//nvidia/cu13/lib}" \
        "${sites[@]/%//nvidia/cu12/lib}" /usr/local/cuda/lib64 /usr/local/cuda*/lib64 \
        /usr/local/cuda*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
        for f in "$d"/libcublasLt.so*; do
            [ -e "$f" ] && { lib=$f; break 2; }
        done
    done
    if [ -z "$lib" ]; then # anywhere below those roots, as a last resort
        lib=$(timeout 30 find /usr/local/cuda*/ "${sites[@]}" -name 'libcublasLt.so*' 2>/dev/null | head -n 1)
    fi
    if [ -n "$lib" ]; then
        LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        export LD_LIBRARY_PATH
        cublas=$lib
    fi
fi
export UPX_REQUIRE_GPU=1

if command -v nvidia-smi >/dev/null; then
    timeout 30 nvidia-smi >"$logs/nvidia-smi.log" 2>&1
    device=$(timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
        head -n 1 | awk -F', *' '{ printf "%s, driver %s, %s", $1, $2, $3 }')
    [ -n "$device" ] || device="unknown (nvidia-smi answered nothing; see logs/nvidia-smi.log)"
else
    device="none seen (nvidia-smi not found)"
fi
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(uname -a)"
    echo "binary: $bin"
    echo "cublasLt: $cublas"
    echo "LD_LIBRARY_PATH: ${LD_LIBRARY_PATH:-}"
    echo "python3: $(python3 -c 'import sys; print(sys.version.split()[0])' 2>/dev/null || echo none)"
    echo "torch: $(timeout 60 python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>/dev/null || echo none)"
    echo "parts: ${parts[*]}; budget $budget s"
} >"$logs/environment.log"

# ---- the run -------------------------------------------------------------------------------
for p in "${parts[@]}"; do
    run_part "$p"
done

# ---- what comes back: archive, fixtures, summary, limits -----------------------------------
for f in summary.txt logs.tar.gz truth-sm90.safetensors truth-sm90.safetensors.gz; do rm -f "${out:?}/$f"; done
find "$out" -maxdepth 1 -name 'tuning-*.json' -type f -delete
notes=()
# A file for $out, within the size limit (else gzip it when that fits, else leave it out).
deliver() { # SRC NAME
    local size
    size=$(stat -c %s "$1")
    if [ "$size" -le "$max_bytes" ]; then
        cp "$1" "$out/$2"
        notes+=("$2: $(mib "$size")")
    elif gzip -c "$1" >"$out/$2.gz" && [ "$(stat -c %s "$out/$2.gz")" -le "$max_bytes" ]; then
        notes+=("$2.gz: $(mib "$(stat -c %s "$out/$2.gz")") ($2 is $(mib "$size"), over 16 MiB: gzipped)")
    else
        rm -f "$out/$2.gz"
        notes+=("$2: NOT RETURNED, $(mib "$size") is over 16 MiB even gzipped")
        failures+=("$2 too large to return")
    fi
}
if [ -f "$tmp/truth-sm90.safetensors" ]; then
    deliver "$tmp/truth-sm90.safetensors" truth-sm90.safetensors
elif [[ " ${parts[*]} " == *" truth "* ]]; then
    notes+=("truth-sm90.safetensors: not produced")
fi
tuning=$(find "$tmp/tuning" -maxdepth 1 -name '*.json' -type f 2>/dev/null | sort | head -n 1)
if [ -n "$tuning" ]; then
    slug=$(basename "$tuning" .json)
    slug=$(printf '%s' "$slug" | tr -c 'A-Za-z0-9._-' '-')
    deliver "$tuning" "tuning-$slug.json"
    extra=$(find "$tmp/tuning" -maxdepth 1 -name '*.json' -type f | wc -l)
    [ "$extra" -gt 1 ] && notes+=("tune wrote $extra JSON files: the first is returned, all are in logs.tar.gz")
elif [[ " ${parts[*]} " == *" tune "* ]]; then
    notes+=("tuning JSON: not produced")
fi
# Every log and JSON in one archive; a log too large for the limit keeps its last MiB.
tar -czf "$out/logs.tar.gz" -C "$tmp" logs
if [ "$(stat -c %s "$out/logs.tar.gz")" -gt "$max_bytes" ]; then
    find "$logs" -type f -size +1M | while IFS= read -r f; do
        tail -c 1048576 "$f" >"$f.tail" && mv "$f.tail" "$f"
    done
    tar -czf "$out/logs.tar.gz" -C "$tmp" logs
    notes+=("logs over 1 MiB were cut to their last MiB to fit the archive in 16 MiB")
fi
notes=("logs.tar.gz: $(mib "$(stat -c %s "$out/logs.tar.gz")"), $(tar -tzf "$out/logs.tar.gz" | grep -vc '/$') files under logs/" "${notes[@]}")

# The checks of what comes back: every file, its name, depth and size.
check_out() {
    local n=0 largest=0 problems=() p rel size slashes
    while IFS= read -r -d '' p; do
        rel=${p#"$out"/}
        slashes=${rel//[^\/]/}
        [[ $(basename "$rel") =~ ^[A-Za-z0-9._-]+$ ]] || problems+=("name not [A-Za-z0-9._-]: '$rel'")
        if [ -L "$p" ]; then
            problems+=("a link: $rel")
        elif [ -d "$p" ]; then
            [ ${#slashes} -le 1 ] || problems+=("folder more than 2 deep: $rel")
        elif [ -f "$p" ]; then
            n=$((n + 1))
            size=$(stat -c %s "$p")
            [ "$size" -gt "$largest" ] && largest=$size
            [ "$size" -le "$max_bytes" ] || problems+=("over 16 MiB: $rel ($(mib "$size"))")
            [ ${#slashes} -le 2 ] || problems+=("more than 2 folders deep: $rel")
        else
            problems+=("not a plain file: $rel")
        fi
    done < <(find "$out" -mindepth 1 -print0)
    [ "$n" -le "$max_files" ] || problems+=("$n files, over $max_files")
    if [ ${#problems[@]} -eq 0 ]; then
        echo "limits: ok: $n files (at most $max_files), largest $(mib "$largest") (at most 16 MiB each), names [A-Za-z0-9._-], at most 2 folders deep"
    else
        echo "limits: VIOLATED: $(printf '%s; ' "${problems[@]}")($n files, largest $(mib "$largest"))"
        return 1
    fi
}

commit=$(sed -n 's/^commit: //p' "$logs/BUILD" 2>/dev/null | cut -c 1-12)
{
    echo "== gpu-check summary"
    if [ "$dry" = 1 ]; then
        echo "mode:    DRY RUN: stub binary (tools/gpu-stub.sh), no GPU; every number below is fake"
    fi
    echo "date:    $(date -u +%Y-%m-%dT%H:%M:%SZ); commit ${commit:-unknown}"
    echo "device:  $device"
    echo "build:   $build"
    echo "cublasLt: $cublas"
    echo "parts:   ${parts[*]}; budget $budget s, used $((SECONDS - start)) s"
    echo
    printf '%-16s %-12s %5s  %s\n' "part / step" exit s result
    for ((i = 0; i < ${#r_name[@]}; i++)); do
        first=${r_note[i]%%$'\n'*}
        printf '%-16s %-12s %5s  %s\n' "${r_name[i]}" "${r_status[i]}" "${r_secs[i]}" "$first"
        if [[ ${r_note[i]} == *$'\n'* ]]; then
            printf '%s\n' "${r_note[i]#*$'\n'}" | sed 's/^/                                     /'
        fi
    done
    echo
    echo "returned in OUT: summary.txt"
    printf '  %s\n' "${notes[@]}"
} >"$out/summary.txt"
limits=$(check_out)
limits_ok=$?
{
    echo "$limits"
    if [ "$interrupted" = 1 ]; then
        echo "result: INTERRUPTED"
    else
        [ "$limits_ok" = 0 ] || failures+=("the output limits")
        if [ ${#failures[@]} -eq 0 ]; then
            echo "result: all parts passed"
        else
            echo "result: FAILED: $(printf '%s; ' "${failures[@]}" | sed 's/; $//')"
        fi
    fi
} >>"$out/summary.txt"
echo
cat "$out/summary.txt"
[ "$interrupted" = 0 ] && [ ${#failures[@]} -eq 0 ] && [ "$limits_ok" = 0 ]
