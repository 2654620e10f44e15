#!/usr/bin/env bash
# Lint, type-check, check the generated stubs, then run every test tier
# (unit, integration against real Kafka/MinIO/Triton, e2e CLI).
# Extra arguments go to pytest (e.g. `scripts/test.sh tests/unit -k events`).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
py="$CDL_VENV/bin/python"

echo "==> ruff"
"$CDL_VENV/bin/ruff" check .
"$CDL_VENV/bin/ruff" format --check .
echo "==> mypy (strict)"
"$CDL_VENV/bin/mypy"
echo "==> protobuf stubs"
bash scripts/gen_protos.sh --check 2>/dev/null
buf="$CDL_HOME/node/node_modules/.bin/buf"
if [[ -x "$buf" ]]; then
  echo "==> buf lint"
  "$buf" lint
elif [[ "${CI:-}" == "true" ]]; then
  echo "buf is missing in CI (scripts/setup.sh installs it)" >&2
  exit 1
fi
echo "==> pytest"
"$py" -m pytest -p no:cacheprovider "${@:-tests}"
