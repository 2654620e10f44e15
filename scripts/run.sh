#!/usr/bin/env bash
# The main job: start the local stack (Kafka, MinIO, Triton) and follow it live.
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$CDL_VENV/bin/cdl" stack up --follow "$@"
