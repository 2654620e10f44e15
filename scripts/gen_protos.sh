#!/usr/bin/env bash
# Regenerates the Python stubs in cdl/v1/ from proto/. `--check` fails when the
# committed stubs differ from what the protos generate (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
out=cdl/v1
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)/cdl/v1
fi
mkdir -p "$out"
root=$(dirname "$(dirname "$out")")
"$CDL_VENV/bin/python" -m grpc_tools.protoc -I proto \
  --plugin=protoc-gen-mypy="$CDL_VENV/bin/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$CDL_VENV/bin/protoc-gen-mypy_grpc" \
  --python_out="$root" --mypy_out="$root" \
  --grpc_python_out="$root" --mypy_grpc_out="$root" \
  proto/cdl/v1/*.proto
# grpc_tools writes absolute imports (`from cdl.v1 import ...`), which is what we want.
# The Open Inference stubs go into cdl's private descriptor pool (see cdl/v1/_pool.py):
# tritonclient registers the same `inference.*` names in the default pool.
sed -i \
  -e 's/^from google.protobuf import descriptor_pool as _descriptor_pool$/from cdl.v1._pool import POOL as _cdl_pool/' \
  -e 's/_descriptor_pool\.Default()\.AddSerializedFile(/_cdl_pool.AddSerializedFile(/' \
  "$out/open_inference_pb2.py"
grep -q '_cdl_pool.AddSerializedFile(' "$out/open_inference_pb2.py" || { echo "pool rewrite failed" >&2; exit 1; }
if [[ ! -f "$out/__init__.py" ]]; then
  printf '"""Generated protobuf and gRPC stubs (do not edit; run scripts/gen_protos.sh)."""\n' > "$out/__init__.py"
fi
if [[ "${1:-}" == "--check" ]]; then
  cp cdl/v1/_pool.py "$out/_pool.py"
  if ! diff -r -x __pycache__ "$out" cdl/v1; then
    echo "generated stubs drifted from proto/: run scripts/gen_protos.sh and commit" >&2
    exit 1
  fi
  echo "protobuf stubs match proto/"
fi
