#!/usr/bin/env bash
# Packs, for a device call, what `tools/gpu-check.sh` needs that git does not track: the
# stripped release binary and a BUILD note (commit, dirty flag, date, rustc and nvcc
# versions; the device copy has no .git). The pack goes to the git-ignored `.gpu/` (at most
# 40 MiB); the working tree travels with it (tracked files and untracked ones git does not
# ignore), and the two together must stay under the device call's 64 MiB. The device call
# then names `.gpu` in carry and runs `tools/gpu-check.sh` (README, "GPU machines").
#
#   tools/gpu-pack.sh [--stub] [--dir DIR]
#
# --stub     no build: packs tools/gpu-stub.sh as the binary (what `gpu-check.sh --dry-run`
#            uses; gpu-check refuses a stub pack outside a dry run)
# --dir DIR  pack folder (default .gpu)
#
# Exit 0 with the sizes printed, 1 when the build fails or a limit is exceeded, 2 on bad
# usage. Testing knobs: GPU_PACK_MAX_MIB (default 40), GPU_PACK_TOTAL_MIB (default 64).
set -euo pipefail
cd "$(dirname "$0")/.."

stub=0
dir=.gpu
while [ $# -gt 0 ]; do
    case $1 in
        --stub) stub=1 ;;
        --dir)
            [ $# -ge 2 ] || { echo "error: --dir needs a folder" >&2; exit 2; }
            dir=$2
            shift
            ;;
        -h | --help) sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "error: unknown argument $1 (usage: tools/gpu-pack.sh [--stub] [--dir DIR])" >&2; exit 2 ;;
    esac
    shift
done
max_mib=${GPU_PACK_MAX_MIB:-40}
total_mib=${GPU_PACK_TOTAL_MIB:-64}
mib=1048576
fail() { echo "error: $*" >&2; exit 1; }
in_mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

git rev-parse --git-dir >/dev/null 2>&1 || fail "not a git checkout: gpu-pack measures the tree with git"

# The pack folder: created, or emptied of an earlier pack. Anything else in it is left alone
# and refused, so a mistyped --dir never deletes files.
mkdir -p "$dir"
rm -f "$dir/ultrapixel" "$dir/BUILD"
[ -z "$(ls -A "$dir")" ] || fail "$dir holds other files than a pack (ultrapixel, BUILD); empty it or pick another --dir"
# A pack inside the tree must be git-ignored, or it would travel twice (as tree and carry).
case $(realpath "$dir")/ in
    "$(pwd -P)"/*)
        git check-ignore -q "$dir" || fail "$dir is not git-ignored (.gitignore needs /.gpu/): it would travel twice"
        ;;
esac

kernels="stub (no kernels)"
if [ "$stub" = 1 ]; then
    cp tools/gpu-stub.sh "$dir/ultrapixel"
    chmod +x "$dir/ultrapixel"
    rustc_v=stub
    nvcc_v=stub
else
    case ,${UPX_CUDA_ARCHS:-sm_90}, in
        *sm_90*) ;;
        *) fail "UPX_CUDA_ARCHS=$UPX_CUDA_ARCHS leaves out sm_90, the H100/H200's architecture" ;;
    esac
    NVCC=$(tools/install-cuda-toolchain.sh) || fail "the pinned nvcc could not be installed"
    export NVCC UPX_REQUIRE_NVCC=1
    echo "== cargo build --release --locked (nvcc: $NVCC)" >&2
    cargo build --release --locked || fail "cargo build --release failed"
    target=$(cargo metadata --no-deps --format-version 1 |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
    [ -x "$target/release/ultrapixel" ] || fail "no binary at $target/release/ultrapixel after the build"
    strip -o "$dir/ultrapixel" "$target/release/ultrapixel" || fail "strip failed"
    # The kernels must be in it: a build that fell back to no nvcc would pass every check
    # here and fail every one there.
    info=$("$dir/ultrapixel" info 2>&1) || true
    kernels=$(grep -m1 '^kernels:' <<<"$info" || echo "kernels: (no line from info)")
    [[ $kernels == *"compiled by nvcc"*sm_90* ]] || fail "the packed binary has no sm_90 kernels: $kernels"
    rustc_v=$(rustc -V)
    nvcc_v=$("$NVCC" --version | tail -n 1)
fi

dirty=$(git status --porcelain | wc -l)
{
    echo "commit: $(git rev-parse HEAD)"
    if [ "$dirty" -gt 0 ]; then echo "dirty: yes ($dirty changed or untracked files)"; else echo "dirty: no"; fi
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "rustc: $rustc_v"
    echo "nvcc: $nvcc_v"
    echo "cuda_archs: ${UPX_CUDA_ARCHS:-all (sm_80 sm_86 sm_89 sm_90 + PTX)}"
    echo "$kernels"
    echo "binary: ultrapixel, $(stat -c %s "$dir/ultrapixel") bytes, sha256 $(sha256sum "$dir/ultrapixel" | cut -d' ' -f1)"
    if [ "$stub" = 1 ]; then echo "stub: yes (tools/gpu-stub.sh, for gpu-check --dry-run)"; else echo "stub: no"; fi
} >"$dir/BUILD"

# What travels: the pack (carry) and the working tree as the device copies it.
pack=$(du -sb "$dir" | cut -f1)
files=0
tree=0
while IFS= read -r -d '' f; do
    [ -f "$f" ] || continue # deleted but still in the index
    files=$((files + 1))
    tree=$((tree + $(stat -c %s "$f")))
done < <(git ls-files -z --cached --others --exclude-standard)
total=$((pack + tree))
echo "pack $dir: $(in_mib "$pack") (limit $max_mib MiB)"
echo "tree (tracked + untracked not ignored, $files files): $(in_mib "$tree")"
echo "together: $(in_mib "$total") (limit $total_mib MiB)"
sed 's/^/  /' "$dir/BUILD"
[ "$pack" -le $((max_mib * mib)) ] || fail "the pack is $(in_mib "$pack"), over $max_mib MiB"
[ "$total" -lt $((total_mib * mib)) ] ||
    fail "pack + tree = $(in_mib "$total"), not under $total_mib MiB: the device call would refuse it (remove large untracked files?)"
echo "ok: two device calls, each with carry [\"$dir\"] (README, \"GPU machines\"):"
echo "  1. tools/gpu-check.sh                (truth checks bench shapes)"
echo "  2. tools/gpu-check.sh stages tune"
