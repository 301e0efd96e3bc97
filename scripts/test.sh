#!/usr/bin/env bash
# Quick start, the tests: install, type-check, then run the whole suite: tests/unit (the pure core, seconds),
# tests/integration (real onnxruntime, the agent on a local directory), tests/e2e (real sshd lab devices).
set -euo pipefail
cd "$(dirname "$0")/.."
EDGEOPS_TEST_TOOLS=1 bash scripts/install.sh
echo "type check: mypy --strict on edgeops/ (the on-device agent excepted)"
.venv/bin/python -m mypy
# one worker per core (at most 4): each test file runs whole on one worker, so a module's lab starts once; every
# lab takes free ports and device roots of its own, so two run side by side (EDGEOPS_TEST_WORKERS=0: one process)
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 \
  -n "${EDGEOPS_TEST_WORKERS:-auto}" --maxprocesses 4 --dist loadfile "$@"
