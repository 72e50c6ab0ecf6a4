#!/usr/bin/env bash
# The test command: set up .venv with the [dev] extras, then run the whole suite (CPU only, ~minutes).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k gate -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh dev
export TRITON_INTERPRET=1
.venv/bin/ruff check --quiet .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
