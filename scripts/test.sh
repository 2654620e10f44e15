#!/usr/bin/env bash
# Lint, type-check, check the generated stubs, then run every test tier: unit (pure Python, no
# servers, no compilers), native (C and Go builds, sanitizers, fuzzing), integration (real
# Kafka/MinIO/Triton), e2e (the CLI). What CI runs.
#   scripts/test.sh                   everything
#   scripts/test.sh unit|native|integration|e2e [pytest args]   one tier, no lint (unit: seconds)
#   scripts/test.sh lint              ruff, mypy, the stubs, buf
#   scripts/test.sh tests/unit -k events   any other arguments go to pytest, after the lint
# Tests run in CDL_TEST_WORKERS processes (pytest-xdist; default 2: everything in ~14 min instead
# of ~30 on two cores; 0 = in this process), a test file to a worker in the order collected
# (e2e first: the longest files start first); the workers share one local stack
# (tests/conftest.py), and the tests that stop the broker have their own (tests/integration/broker).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
py="$CDL_VENV/bin/python"
workers=(--numprocesses "${CDL_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder)
if [[ "${CDL_TEST_WORKERS:-2}" != "0" ]]; then
  # two workers' services share two cores: one OpenMP thread each (torch's spinning threads,
  # two per process by default, slowed a ResNet test beside the demo sevenfold)
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi

case "${1:-}" in
  unit|native|integration|e2e)
    tier=$1
    shift
    exec "$py" -m pytest -p no:cacheprovider "${workers[@]}" "tests/$tier" "$@"
    ;;
esac

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
if [[ "${1:-}" == "lint" ]]; then exit 0; fi
echo "==> pytest"
"$py" -m pytest -p no:cacheprovider "${workers[@]}" "${@:-tests}"
