#!/usr/bin/env bash
# Installs one pinned PyPI package into a cache venv outside the repository (as
# tools/install-cuda-toolchain.sh installs nvcc) and prints the venv's path. Idempotent: a
# second run only checks the installed version.
#
#   tools/pinned-venv.sh VENV PACKAGE VERSION [MODULE]   (MODULE: the import name, default PACKAGE)
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 VENV PACKAGE VERSION [MODULE]" >&2; exit 2; }
venv=$1 package=$2 version=$3 module=${4:-$2}
if ! "$venv/bin/python" -c "import $module as m, sys; sys.exit(m.__version__ != '$version')" 2>/dev/null; then
    python=${PYTHON:-python3}
    command -v "$python" >/dev/null || { echo "error: $python not found; install Python 3 first" >&2; exit 1; }
    echo "installing $package $version from PyPI into $venv" >&2
    mkdir -p "$(dirname "$venv")"
    [ -x "$venv/bin/pip" ] || "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$package==$version" >&2
fi
echo "$venv"
