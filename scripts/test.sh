#!/usr/bin/env bash
# Set up (first run only) with the test dependencies, then run the whole test suite.
# Extra arguments go to pytest: scripts/test.sh -k contract
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
setup_all test
cd "$ROOT"
exec "$PY" -m pytest "$@"
