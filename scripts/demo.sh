#!/usr/bin/env bash
# Quick start, the main job: install, bring up the lab fleet (real sshd devices on 127.0.0.1, each running
# the agent with its own device runtime), roll the wearable model out with on-device verification, show health.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export PATH="$PWD/.venv/bin:$PATH"
edgeops lab up lab
edgeops validate manifests device_profiles
edgeops apply manifests/wearable.yaml
edgeops status manifests/wearable.yaml
