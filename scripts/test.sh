#!/usr/bin/env bash
# Quick start, the tests: install, then run the whole suite (real sshd, real onnxruntime).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
