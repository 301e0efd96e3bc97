#!/usr/bin/env bash
# Quick start, the main job: install, bring up the lab fleet (real sshd devices on 127.0.0.1),
# roll the wearable model out to it with on-device verification, and show fleet health.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
edgeops validate manifests device_profiles
edgeops lab up lab
edgeops apply manifests/wearable.yaml
edgeops status manifests/wearable.yaml
