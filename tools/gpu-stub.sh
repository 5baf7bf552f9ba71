#!/usr/bin/env bash
# A stand-in for the release binary in `tools/gpu-check.sh --dry-run` (packed by
# `tools/gpu-pack.sh --stub`): answers the subcommands gpu-check runs with plausible lines,
# "N passed, M failed" where the real command prints it, and writes the files the real
# commands write (a small truth file, a tiny model folder, PNGs, previews, a tuning JSON).
# Nothing here touches a GPU.
#
# Testing knobs, each a comma-separated list of gpu-check step names (truth info verify cases
# tinymodel generate bench shapes shapeslist stages tune tunecheck serve):
#   UPX_STUB_HANG=bench   that step sleeps until it is killed (gpu-check must time it out)
#   UPX_STUB_FAIL=cases   that step reports one failure and exits 1
# and UPX_STUB_TRUTH_PAD=MIB[,random] pads the truth file with MIB MiB of zeros (or random
# bytes), to try gpu-check's handling of a file over the 16 MiB a device call returns.
set -uo pipefail

cmd=${1:-}
shift $(($# > 0 ? 1 : 0))
args=("$@")
has() {
    local a
    for a in "${args[@]}"; do [ "$a" = "$1" ] && return 0; done
    return 1
}
value() { # the word after flag $1
    local i
    for ((i = 0; i < ${#args[@]} - 1; i++)); do
        [ "${args[i]}" = "$1" ] && { printf '%s' "${args[i + 1]}"; return 0; }
    done
    return 1
}

case $cmd in
    info) role=info ;;
    verify) if has --truth; then role=truth; else role=verify; fi ;;
    validate) role=cases ;;
    make-tiny-model) role=tinymodel ;;
    generate) role=generate ;;
    bench)
        if has --serve; then
            role=serve
        elif has --shapes && has --list; then
            role=shapeslist
        elif has --shapes; then
            role=shapes
        elif has --stages; then
            role=stages
        else
            role=bench
        fi
        ;;
    tune) if has --check; then role=tunecheck; else role=tune; fi ;;
    --version | -V) echo "ultrapixel 0.0.0-stub"; exit 0 ;;
    *) echo "error: the gpu-check stub does not know '$cmd'" >&2; exit 2 ;;
esac
listed() { [[ ",${1:-}," == *",$role,"* ]]; }

if listed "${UPX_STUB_HANG:-}"; then
    echo "stub: $role hangs (UPX_STUB_HANG)"
    sleep 100000
    exit 0
fi
failed=0
listed "${UPX_STUB_FAIL:-}" && failed=1
report() { # passed count; exit status from $failed
    echo "$1 passed, $failed failed"
    exit "$failed"
}

safetensors() { # a valid safetensors file without tensors: 8-byte little-endian header length, JSON
    local header='{"__metadata__":{"stub":"gpu-check dry run"}}' esc='' i n
    n=${#header}
    for ((i = 0; i < 8; i++)); do
        esc+=$(printf '\\x%02x' $(((n >> (8 * i)) & 255)))
    done
    { printf '%b' "$esc"; printf '%s' "$header"; } >"$1"
}

device="stub (dry run, no GPU)"
case $role in
    info)
        echo "ultrapixel 0.0.0-stub"
        echo "kernels: stub (no nvcc)"
        echo "GPU: $device"
        echo "tuning: stub-gpu.json (stub)"
        echo "memory plan $(value --size || echo none): weights 9.1 GiB, activations 4.2 GiB (stub)"
        [ "$failed" = 0 ] || exit 1
        ;;
    truth)
        out=$(value --truth) || { echo "error: --truth needs a file" >&2; exit 2; }
        safetensors "$out"
        if [ -n "${UPX_STUB_TRUTH_PAD:-}" ]; then
            src=/dev/zero
            [[ $UPX_STUB_TRUTH_PAD == *,random ]] && src=/dev/urandom
            head -c $((${UPX_STUB_TRUTH_PAD%%,*} * 1048576)) "$src" >>"$out"
        fi
        echo "truth: wrote $out (stub)"
        report 12
        ;;
    verify)
        echo "verify: seed 1 (rerun with --seed 1)"
        echo "ok   cuda     gemm_bf16 1.2e-3 <= 8.0e-3 (stub)"
        report 40
        ;;
    cases)
        n=0
        for a in "${args[@]}"; do
            case $a in *.safetensors) echo "$(basename "$a") out PASS (stub)"; n=$((n + 1)) ;; esac
        done
        report "$n"
        ;;
    tinymodel)
        dir=${args[0]:?a folder}
        mkdir -p "$dir" && echo "stub model" >"$dir/stub-model.txt" && echo "wrote $dir"
        ;;
    generate)
        seed=$(value --seed || echo 0)
        pattern=$(value --out || echo 'ultrapixel-{seed}.png')
        png=${pattern//\{seed\}/$seed}
        printf 'stub png seed %s size %s\n' "$seed" "$(value --size || echo 1024x1024)" >"$png"
        previews=$(value --preview) && mkdir -p "$previews" &&
            echo "stub preview" >"$previews/$seed-c-lowres-05.png"
        if has --json; then
            printf '{"images":[{"path":"%s","seed":%s}],"previews":["%s"]}\n' \
                "$png" "$seed" "${previews:+$previews/$seed-c-lowres-05.png}"
        fi
        [ "$failed" = 0 ] || exit 1
        ;;
    serve)
        echo "ultrapixel serve, backend cuda, devices 0 (stub)"
        echo "cold start:"
        echo "  backend open (CUDA init)                      0.310 s"
        echo "  first image 1024x1024 (weight upload incl.)     0.900 s (first step after 0.400 s)"
        echo "warm pipeline (median of 3):"
        for ((i = 0; i < ${#args[@]} - 1; i++)); do
            [ "${args[i]}" = --size ] &&
                printf '  %-11s time to first step %8.3f s   time per image %8.3f s\n' "${args[i + 1]}" 0.02 0.3
        done
        echo "throughput at 1024x1024: 1 client 3.000 images/s, 2 concurrent clients 3.100 images/s (1.03x)"
        [ "$failed" = 0 ] || exit 1
        ;;
    bench)
        echo "device: $device"
        echo "copy bandwidth: 3300 GB/s (device-to-device, read + write); matmul ceiling: 700 TFLOP/s (stub)"
        # The real rows: the check's name in 80 columns, time, rate, share of the ceiling.
        printf '%-80s %10.1f us %8.1f TFLOP/s (%d %% of matmul)\n' "gemm_bf16 4096x1536x1536 (stub)" 1000 137.4 20
        printf '%-80s %10.1f us %8.0f GB/s (%d %% of copy)\n' "layernorm_bf16 4096x1536 (stub)" 20 1200 36
        printf '%-80s %10.1f us %8.1f TFLOP/s (%d %% of matmul)\n' "attention_d64_bf16 b2 n4096 (stub)" 300 310.2 45
        [ "$failed" = 0 ] || exit 1
        ;;
    shapeslist)
        printf '{'
        sep=''
        for size in $(for ((i = 0; i < ${#args[@]} - 1; i++)); do
            [ "${args[i]}" = --size ] && echo "${args[i + 1]}"
        done); do
            printf '%s"%s":{"gemms":[{"m":4096,"n":1536,"k":1536,"per_image":40,"example":"stub"}],' "$sep" "$size"
            printf '"attention":[{"batch":2,"queries":1024,"extra":77,"heads":24,"head_dim":64,'
            printf '"causal":false,"key_mask":false,"per_image":40,"example":"stub"}],"dwconv_ln":[]}'
            sep=,
        done
        printf '}\n'
        [ "$failed" = 0 ] || exit 1
        ;;
    shapes | stages)
        echo "device: $device"
        for ((i = 0; i < ${#args[@]} - 1; i++)); do
            [ "${args[i]}" = --size ] || continue
            size=${args[i + 1]}
            if [ "$role" = shapes ]; then
                echo
                echo "$size: 1 GEMM shapes (stub)"
                echo "GEMMs of one image: 1.0 TFLOP in 0.002 s (500 TFLOP/s); cuBLASLt 0.002 s: ours at 95 % of its speed (target ≥ 90 %); sm_90a 0.0015 s (667.0 TFLOP/s): at 127 % of cuBLASLt's speed"
                echo
                echo "$size: 1 attention shapes"
                echo "attention of one image: 0.001 s; sm_90a 0.0008 s"
            else
                echo
                echo "$size: 20 Stage C steps per pass, 10 Stage B steps, CFG batch 2"
                echo "end to end (device time, one image): 1.00 s; planned peak memory 9000 MiB (stub)"
            fi
        done
        [ "$failed" = 0 ] || exit 1
        ;;
    tunecheck) report 137 ;;
    tune)
        dir=$(value --out-dir) || { echo "error: --out-dir needed" >&2; exit 2; }
        mkdir -p "$dir" && printf '{"device":"stub","gemm":{"4096x1536x1536":"128x128x32"}}\n' >"$dir/stub-gpu.json"
        echo "tune: wrote $dir/stub-gpu.json (stub)"
        [ "$failed" = 0 ] || exit 1
        ;;
esac
exit 0
