#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs the servers the tests start
# (redis-server with redis-cli, rabbitmq-server, postgresql; the tests run their own on
# loopback ports, nothing is mocked), promtool (Debian's prometheus package) and
# chromium with chromium-driver (the console's browser test),
# validates the deploy files (scripts/validate-deploy.sh), then runs every test.
#
#   scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# promtool checks the Prometheus config and alert rules in deploy/.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# The console's browser test drives headless Chromium through ChromeDriver.
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The deploy files (Dockerfile, Compose, Kubernetes, shell scripts), before the build.
scripts/validate-deploy.sh

# One process per test binary, so each binary shares one set of servers (test-kit).
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
# cargo ends on the last binary's line (often a doc-test run with no tests); close on
# the totals instead.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
