#!/usr/bin/env bash
# The pull-request plan, as the workflow's plan job runs it: the pull request's files are data, never code.
#   scripts/plan-pull-request.sh BASE_REV [PR_CHECKOUT]   -> plan.md in the current directory, exit as edgeops plan
# edgeops itself comes from BASE_REV (installed into its own virtual environment from `git archive`), so a pull
# request that edits edgeops/ or pyproject.toml does not run its code next to the SSH agent or the ledger.
# It plans with --untrusted: only devices whose endpoints and credentials the base revision already has are
# contacted. EDGEOPS_PLAN_PYTHON: an interpreter that already has edgeops' dependencies (tests; skips the install).
set -euo pipefail
base="${1:?usage: plan-pull-request.sh BASE_REV [PR_CHECKOUT]}"
pr="$(cd "${2:-.}" && pwd)"
out="$PWD/plan.md"
tree="$(mktemp -d "${RUNNER_TEMP:-/tmp}/edgeops-base.XXXXXX")"
trap 'rm -rf "$tree"' EXIT
git -C "$pr" archive --format=tar "$base" -- edgeops pyproject.toml README.md | tar -x -C "$tree"
if [ -n "${EDGEOPS_PLAN_PYTHON:-}" ]; then
  python="$EDGEOPS_PLAN_PYTHON"
  export PYTHONPATH="$tree"
else
  python3 -m venv "$tree/.venv"
  "$tree/.venv/bin/pip" install --quiet "$tree[postgres]"
  python="$tree/.venv/bin/python"
fi
cd "$tree"   # never the pull request's directory: -P keeps the working directory off sys.path
set +e
"$python" -P -m edgeops plan --root "$pr" --untrusted --base "$base" --changed-since "$base" -o markdown > "$out"
code=$?
set -e
exit "$code"
