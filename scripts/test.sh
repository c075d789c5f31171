#!/usr/bin/env bash
# Set up (if needed) and run the test suite. Extra arguments go to pytest:
#   bash scripts/test.sh              # the fast suite (default)
#   bash scripts/test.sh -m slow      # the real-data learning tests (minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
