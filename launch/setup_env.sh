#!/usr/bin/env bash
# Creates (or reuses) .venv with torch 2.13.0 CPU installed first, then moe_pd in editable mode.
# Usage: source-free; `bash launch/setup_env.sh [extras]`, e.g. `bash launch/setup_env.sh dev`.
# Prints nothing but errors when the environment is already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
VENV="${MOE_PD_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${MOE_PD_TORCH:-2.13.0}"
# NIXL (KV transfer, kvcache.transfer=nixl) without its declared dependencies: the `nixl` meta package
# requires both CUDA builds and torch (about 6 GB); the cu12 build alone runs host-memory transfers on a
# CPU-only machine and needs only numpy and torch at import. MOE_PD_NIXL=0 skips it (pyzmq stays available).
NIXL_WHEELS=(nixl==1.5.2 nixl-cu12==1.5.1)

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"moe_pd needs Python >= 3.11, found {sys.version.split()[0]}")
PY

if [ ! -x "$VENV/bin/python" ]; then
    echo "setting up $VENV (one-off, about a minute)" >&2
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip -q --disable-pip-version-check)
STAMP="$VENV/.moe_pd-${EXTRAS:-base}-$(cat pyproject.toml setup.py launch/setup_env.sh | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
    # torch first and pinned: a looser requirement resolved later can pull a multi-GB CUDA build.
    SPEC="."
    [ -n "$EXTRAS" ] && SPEC=".[${EXTRAS}]"
    LOG="$VENV/setup.log"
    NIXL=("${PIP[@]}" install --no-deps "${NIXL_WHEELS[@]}")
    [ "${MOE_PD_NIXL:-1}" = 0 ] && NIXL=(true)
    if ! { "${PIP[@]}" install "torch==${TORCH_VERSION}" numpy && "${PIP[@]}" install -e "$SPEC" && "${NIXL[@]}"; } \
        >"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "setup failed; the pip output is above and in $LOG" >&2
        exit 1
    fi
    touch "$STAMP"
fi
