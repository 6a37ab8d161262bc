#!/usr/bin/env bash
# Installs everything (scripts/install.sh) and runs the test suite. Fails if no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh "${SFMP_VARIANT:-cpu}"
# Debian packages the end-to-end tests use (Prometheus, docker-compose), where apt is available.
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && ! command -v promtool >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus docker-compose) \
    >/dev/null 2>&1 || echo "warning: could not install prometheus/docker-compose; their tests will skip" >&2
fi
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
[ "$rc" = 5 ] && { echo "error: no test ran" >&2; exit 1; }
exit "$rc"
