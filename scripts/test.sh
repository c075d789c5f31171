#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest:
#   bash scripts/test.sh              # the fast suite (default)
#   bash scripts/test.sh -m slow      # the real-data learning tests (minutes)
# The tests run in one pytest-xdist worker per CPU core, a test file per worker (--dist loadfile: a file's
# module-level caches and fixtures stay in one process); VISTUNE_TEST_WORKERS=0 runs them in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -n "${VISTUNE_TEST_WORKERS:-auto}" --dist loadfile "$@"
