# The gateway service: cdl[gateway] from uv.lock (no torch, ONNX Runtime or Optuna: pyproject.toml's extras),
# and its native lane (Go), built in a stage of its own: the gateway never compiles at start-up.
# Built from the repository root: docker build -f deploy/docker/gateway.Dockerfile .
FROM golang:1.26-bookworm AS lane
WORKDIR /src
COPY services/gateway/dataplane/lane/ ./
RUN CGO_ENABLED=0 GOFLAGS="-buildvcs=false -mod=readonly" go build -trimpath -o /out/cdl-gwlane .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 UV_SYSTEM_PYTHON=1 UV_COMPILE_BYTECODE=1
RUN pip install --no-cache-dir uv
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
COPY examples examples
RUN uv export --locked --no-dev --extra gateway --no-emit-project --no-emit-workspace -o /tmp/requirements.txt \
    && uv pip install --no-cache -r /tmp/requirements.txt
COPY cdl cdl
COPY services services
RUN uv pip install --no-cache --no-deps .
# what serves the public port (services.gateway.dataplane.lane.PROGRAM, found on PATH)
COPY --from=lane /out/cdl-gwlane /usr/local/bin/cdl-gwlane
ENV CDL_GATEWAY_DATA_PLANE=native
# state (handled-event ids, the monitor's tables) lives in a volume mounted here
ENV CDL_STATE_DIR=/var/lib/cdl
RUN mkdir -p /var/lib/cdl && chown 65534 /var/lib/cdl
USER 65534
HEALTHCHECK --interval=10s --timeout=3s --retries=12 CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['CDL_GATEWAY_METRICS_PORT'] + '/readyz', timeout=2)"
ENTRYPOINT ["python", "-m", "services.gateway"]
