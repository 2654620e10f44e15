#!/usr/bin/env bash
# The main job: start the local stack (Kafka, MinIO, Triton, the cdl services),
# stream the digits demo into data.raw and follow the loop live.
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$CDL_VENV/bin/cdl" stack up --follow --demo "$@"
