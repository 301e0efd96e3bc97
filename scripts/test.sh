#!/usr/bin/env bash
# Quick start, the tests: install, type-check, then run the whole suite: tests/unit (the pure core, seconds),
# tests/integration (real onnxruntime, the agent on a local directory), tests/e2e (real sshd lab devices).
set -euo pipefail
cd "$(dirname "$0")/.."
EDGEOPS_TEST_TOOLS=1 bash scripts/install.sh
echo "type check: mypy --strict on edgeops/ (the on-device agent excepted)"
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
