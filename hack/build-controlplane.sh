#!/usr/bin/env bash
# Builds kube-apiserver and etcd from Go modules once and caches them, keyed by version.
# Prints the directory holding both binaries (usable as KUBEBUILDER_ASSETS).
# Upstream publishes no binaries we can reach here, so we build them the way out-of-tree
# scheduler plugins consume k8s.io/kubernetes: every staging module pinned with `replace`.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-3.6.14}"
CACHE="${KVRELAY_CACHE:-$HOME/.cache/kvrelay}"
OUT="$CACHE/controlplane/k8s-v${K8S_VERSION}-etcd-v${ETCD_VERSION}"

if [[ -x "$OUT/kube-apiserver" && -x "$OUT/etcd" ]]; then
  echo "$OUT"
  exit 0
fi
# The official tarball installs to /usr/local/go without touching PATH.
command -v go >/dev/null || { [[ -x /usr/local/go/bin/go ]] && export PATH="$PATH:/usr/local/go/bin"; }
command -v go >/dev/null || { echo "go not found: cannot build kube-apiserver" >&2; exit 3; }
mkdir -p "$OUT"
MINOR="${K8S_VERSION#*.}"; STAGING_VERSION="v0.${MINOR}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

if [[ ! -x "$OUT/kube-apiserver" ]]; then
  mkdir -p "$work/apiserver"; cd "$work/apiserver"
  go mod init kvrelay.dev/controlplane-apiserver >/dev/null 2>&1
  staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
    cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
    cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt
    kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
    mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller streaming)
  for m in "${staging[@]}"; do go mod edit -replace="k8s.io/$m=k8s.io/$m@$STAGING_VERSION"; done
  go mod edit -require="k8s.io/kubernetes@v${K8S_VERSION}"
  printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver"\n' > tools.go
  go get "k8s.io/kubernetes/cmd/kube-apiserver@v${K8S_VERSION}" >&2
  go mod tidy >&2 || true
  ldflags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X '$pkg.gitVersion=v${K8S_VERSION}' -X '$pkg.gitMajor=1' -X '$pkg.gitMinor=${MINOR%%.*}'"
    ldflags+=" -X '$pkg.gitTreeState=clean' -X '$pkg.buildDate=1970-01-01T00:00:00Z'"
  done
  go build -tags grpcnotrace -ldflags "$ldflags" -o "$OUT/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver >&2
  mv "$OUT/kube-apiserver.tmp" "$OUT/kube-apiserver"
fi

if [[ ! -x "$OUT/etcd" ]]; then
  # etcd's own go.mod uses relative replaces, so `go install` refuses it; a wrapper module works.
  mkdir -p "$work/etcd"; cd "$work/etcd"
  go mod init kvrelay.dev/controlplane-etcd >/dev/null 2>&1
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
  go get "go.etcd.io/etcd/server/v3@v${ETCD_VERSION}" >&2
  go mod tidy >&2 || true
  go build -ldflags "-s -w" -o "$OUT/etcd.tmp" go.etcd.io/etcd/server/v3 >&2
  mv "$OUT/etcd.tmp" "$OUT/etcd"
fi
echo "$OUT"
