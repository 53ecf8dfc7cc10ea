#!/usr/bin/env bash
# The TypeScript client's tests: install (from package-lock.json), build, and run node's test runner.
# The tests start their own momentum-service processes from the repository's .venv (MOMENTUM_VENV to
# use another) and a throwaway redis-server from PATH.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund
npm run build
node --test
