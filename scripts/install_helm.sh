#!/usr/bin/env bash
# Helm, built from the Go module proxy into $CDL_HOME/bin/helm (outside the checkout), only when
# it is missing or another version: tests/unit/test_helm.py lints and renders deploy/helm/cdl with
# it. Built like MinIO (scripts/setup.sh): `go install` of the pinned module, a version stamp
# beside the binary. The -X flags set what `helm version` reports and the Kubernetes version
# that lint and template assume when no cluster is asked (1.33; the tests also pass
# --kube-version 1.33.0). Takes minutes on 2 cores, once per machine.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
CDL_HELM_VERSION="${CDL_HELM_VERSION:-v3.21.4}"
CDL_HELM_K8S_MINOR="${CDL_HELM_K8S_MINOR:-33}"
mkdir -p "$CDL_HOME/bin"
stamp="$CDL_HELM_VERSION k8s-1.$CDL_HELM_K8S_MINOR"
if [[ ! -x "$CDL_HOME/bin/helm" || "$(cat "$CDL_HOME/bin/helm.version" 2>/dev/null)" != "$stamp" ]]; then
  if ! command -v go >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null
  fi
  echo "    building helm $CDL_HELM_VERSION from the Go module proxy (minutes on 2 cores, once)"
  CGO_ENABLED=0 GOBIN="$CDL_HOME/bin" GOFLAGS=-buildvcs=false go install -ldflags "-s -w \
-X helm.sh/helm/v3/internal/version.version=$CDL_HELM_VERSION \
-X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$CDL_HELM_K8S_MINOR \
-X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$CDL_HELM_K8S_MINOR" \
    "helm.sh/helm/v3/cmd/helm@$CDL_HELM_VERSION"
  echo "$stamp" > "$CDL_HOME/bin/helm.version"
fi
echo "    $("$CDL_HOME/bin/helm" version --short) in $CDL_HOME/bin/helm"
