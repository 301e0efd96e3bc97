#!/usr/bin/env bash
# Install everything edgeops, its lab fleet and its tests need, on a fresh Debian machine (as root).
# Idempotent: a second run only checks. Creates .venv/ in the repository; the details go to .edgeops/install.log.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .edgeops
log="$PWD/.edgeops/install.log"
: > "$log"

quietly() {  # run a step with its output in the log; on failure show the end of the log
  if ! "$@" >>"$log" 2>&1; then
    echo "install failed: $*" >&2
    tail -n 25 "$log" >&2
    echo "(full log: $log)" >&2
    exit 1
  fi
}

need_apt=()
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh-keygen >/dev/null || need_apt+=(openssh-client)
command -v git >/dev/null || need_apt+=(git)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
# the tests open `edgeops report` pages in a real headless browser (scripts/test.sh asks for it)
# and run the shared ledger against a throw-away PostgreSQL cluster, and pull-mode devices against mosquitto
# and docker-registry
if [ "${EDGEOPS_TEST_TOOLS:-0}" = 1 ]; then
  command -v chromium >/dev/null || need_apt+=(chromium)
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_apt+=(postgresql)
  [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)          # pull-mode lab: the MQTT broker
  [ -x /usr/bin/docker-registry ] || need_apt+=(docker-registry)  # and the OCI registry
  command -v ip >/dev/null && command -v tc >/dev/null || need_apt+=(iproute2)  # lab links: netns, veth, tbf
  command -v nsenter >/dev/null || need_apt+=(util-linux)
  command -v promtool >/dev/null || need_apt+=(prometheus)      # alert rules: promtool, and a real Prometheus
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  quietly apt-get update -q
  quietly apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi
mkdir -p /run/sshd   # sshd refuses to start without its privilege-separation directory

extras="${EDGEOPS_EXTRAS:-dev,distill,examples,postgres,generative}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv"
  quietly python3 -m venv .venv
fi
stamp=".venv/.edgeops-installed-$(sha256sum pyproject.toml | cut -c1-16)-${extras//,/_}"
if [ ! -f "$stamp" ]; then
  echo "installing edgeops with its ${extras} extras into .venv (pip; a few minutes the first time)"
  quietly .venv/bin/pip install --upgrade pip
  # torch==2.13.0 (CPU build) is pinned by the distill extra
  quietly .venv/bin/pip install -e ".[${extras}]"
  touch "$stamp"
fi
echo "edgeops installed in .venv ($(.venv/bin/edgeops --version))"
