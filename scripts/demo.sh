#!/usr/bin/env bash
# Quick start, the main job: install, validate every manifest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
edgeops validate manifests device_profiles
