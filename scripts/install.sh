#!/usr/bin/env bash
# Install everything edgeops, its lab fleet and its tests need, on a fresh Debian machine (as root).
# Idempotent: a second run only checks. Creates .venv/ in the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh-keygen >/dev/null || need_apt+=(openssh-client)
command -v git >/dev/null || need_apt+=(git)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
mkdir -p /run/sshd   # sshd refuses to start without its privilege-separation directory

extras="${EDGEOPS_EXTRAS:-dev,distill,examples}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.edgeops-installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  # torch==2.13.0 (CPU build) is pinned by the distill extra
  .venv/bin/pip install -q -e ".[${extras}]"
  touch "$stamp"
fi
echo "edgeops installed in .venv ($(.venv/bin/edgeops --version))"
