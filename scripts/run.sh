#!/usr/bin/env bash
# The main job: `cdl demo` — a fresh local stack (Kafka, MinIO, PostgreSQL, Triton and the six
# cdl services) and the whole loop driven by itself in phases, shown live: records stream in,
# models train, compress and serve through the gateway, clients send traffic and late labels,
# the inputs drift and the loop retrains, a bad candidate is rolled back. It ends with a
# summary and a report (./cdl-demo-report/report.md with plots) and stops what it started.
# Options pass through: bash scripts/run.sh --duration 600 --keep   (docs/demo.md)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
if [ ! -x "$CDL_VENV/bin/cdl" ]; then
  bash scripts/setup.sh
fi
exec "$CDL_VENV/bin/cdl" demo "$@"
