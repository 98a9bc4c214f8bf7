#!/usr/bin/env bash
# Builds the control plane once and caches it, keyed by version:
#   $CACHE/controlplane/k8s-v<K8S>-etcd-v<ETCD>/{kube-apiserver,kube-controller-manager,kube-scheduler,etcd}
#   $CACHE/controlplane/kwok-v<KWOK>/{kwok,stages.yaml}   (fake nodes/kubelets, and their lifecycle)
#   $CACHE/controlplane/lws-v<LWS>/{lws-controller,leaderworkersets.yaml}   (LeaderWorkerSet: controller + CRD)
# Prints only the k8s+etcd directory on stdout (usable as KUBEBUILDER_ASSETS); logs go to stderr.
# Upstream publishes no binaries we can reach here, so we build them the way out-of-tree
# scheduler plugins consume k8s.io/kubernetes: every staging module pinned with `replace`.
# Each binary is checked on its own, so adding one never rebuilds the others.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-1.36.3}"
ETCD_VERSION="${ETCD_VERSION:-3.6.14}"
KWOK_VERSION="${KWOK_VERSION:-0.8.0}"
# sigs.k8s.io/lws: the module proxy refuses @latest for it, so the version is pinned.
LWS_VERSION="${LWS_VERSION:-0.7.0}"
CACHE="${KVRELAY_CACHE:-$HOME/.cache/kvrelay}"
OUT="$CACHE/controlplane/k8s-v${K8S_VERSION}-etcd-v${ETCD_VERSION}"
KWOK_OUT="$CACHE/controlplane/kwok-v${KWOK_VERSION}"
LWS_OUT="$CACHE/controlplane/lws-v${LWS_VERSION}"
K8S_BINARIES=(kube-apiserver kube-controller-manager kube-scheduler)

missing_k8s=()
for bin in "${K8S_BINARIES[@]}"; do [[ -x "$OUT/$bin" ]] || missing_k8s+=("$bin"); done
if [[ ${#missing_k8s[@]} -eq 0 && -x "$OUT/etcd" && -x "$KWOK_OUT/kwok" && -f "$KWOK_OUT/stages.yaml"
      && -x "$LWS_OUT/lws-controller" && -f "$LWS_OUT/leaderworkersets.yaml" ]]; then
  echo "$OUT"
  exit 0
fi
# The official tarball installs to /usr/local/go without touching PATH.
command -v go >/dev/null || { [[ -x /usr/local/go/bin/go ]] && export PATH="$PATH:/usr/local/go/bin"; }
command -v go >/dev/null || { echo "go not found: cannot build the control plane" >&2; exit 3; }
mkdir -p "$OUT" "$KWOK_OUT" "$LWS_OUT"
MINOR="${K8S_VERSION#*.}"; STAGING_VERSION="v0.${MINOR}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false

if [[ ${#missing_k8s[@]} -gt 0 ]]; then
  echo "building ${missing_k8s[*]} v${K8S_VERSION}" >&2
  mkdir -p "$work/k8s"; cd "$work/k8s"
  go mod init kvrelay.dev/controlplane-k8s >/dev/null 2>&1
  staging=(api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
    cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
    cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt
    kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
    mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller streaming)
  for m in "${staging[@]}"; do go mod edit -replace="k8s.io/$m=k8s.io/$m@$STAGING_VERSION"; done
  go mod edit -require="k8s.io/kubernetes@v${K8S_VERSION}"
  pkgs=("${missing_k8s[@]/#/k8s.io/kubernetes/cmd/}")
  { printf '//go:build tools\n\npackage tools\n\nimport (\n'
    printf '\t_ "%s"\n' "${pkgs[@]}"
    printf ')\n'; } > tools.go
  go get "${pkgs[@]/%/@v${K8S_VERSION}}" >&2
  go mod tidy >&2 || true
  ldflags="-s -w"
  for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X '$pkg.gitVersion=v${K8S_VERSION}' -X '$pkg.gitMajor=1' -X '$pkg.gitMinor=${MINOR%%.*}'"
    ldflags+=" -X '$pkg.gitTreeState=clean' -X '$pkg.buildDate=1970-01-01T00:00:00Z'"
  done
  # One `go build` for all: shared packages compile once; binaries land in a temp dir, then move.
  mkdir -p "$work/bin"
  go build -tags grpcnotrace -ldflags "$ldflags" -o "$work/bin/" "${pkgs[@]}" >&2
  for bin in "${missing_k8s[@]}"; do
    mv "$work/bin/$bin" "$OUT/$bin.tmp" && mv "$OUT/$bin.tmp" "$OUT/$bin"
  done
fi

if [[ ! -x "$OUT/etcd" ]]; then
  echo "building etcd v${ETCD_VERSION}" >&2
  # etcd's own go.mod uses relative replaces, so `go install` refuses it; a wrapper module works.
  mkdir -p "$work/etcd"; cd "$work/etcd"
  go mod init kvrelay.dev/controlplane-etcd >/dev/null 2>&1
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
  go get "go.etcd.io/etcd/server/v3@v${ETCD_VERSION}" >&2
  go mod tidy >&2 || true
  go build -ldflags "-s -w" -o "$OUT/etcd.tmp" go.etcd.io/etcd/server/v3 >&2
  mv "$OUT/etcd.tmp" "$OUT/etcd"
fi

if [[ ! -x "$KWOK_OUT/kwok" ]]; then
  echo "building kwok v${KWOK_VERSION}" >&2
  # kwok's go.mod has no replace directives, so plain `go install` works (its documented method).
  mkdir -p "$work/kwok-bin"; cd "$work"
  GOBIN="$work/kwok-bin" go install -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@v${KWOK_VERSION}" >&2
  mv "$work/kwok-bin/kwok" "$KWOK_OUT/kwok.tmp" && mv "$KWOK_OUT/kwok.tmp" "$KWOK_OUT/kwok"
fi
if [[ ! -f "$KWOK_OUT/stages.yaml" ]]; then
  # The kwok binary has no built-in lifecycle: only kwokctl feeds it its default Stages (node
  # initialize + lease heartbeat, pod ready/complete/delete), so we ship the same files from its module.
  cd "$work"
  src="$(go mod download -json "sigs.k8s.io/kwok@v${KWOK_VERSION}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  stage="$src/kustomize/stage"
  [[ -d "$stage" ]] || { echo "kwok v${KWOK_VERSION} module has no kustomize/stage" >&2; exit 3; }
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
    pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    printf -- '---\n'; cat "$stage/$f"
  done > "$KWOK_OUT/stages.yaml.tmp"
  mv "$KWOK_OUT/stages.yaml.tmp" "$KWOK_OUT/stages.yaml"
fi
if [[ ! -x "$LWS_OUT/lws-controller" || ! -f "$LWS_OUT/leaderworkersets.yaml" ]]; then
  echo "building lws v${LWS_VERSION}" >&2
  # A wrapper module, as for etcd: `go install ...@v` would ask the proxy for the module's version
  # list (to check deprecation), which it refuses for lws; `go get` of the pinned version does not.
  mkdir -p "$work/lws"; cd "$work/lws"
  go mod init kvrelay.dev/controlplane-lws >/dev/null 2>&1
  printf '//go:build tools\n\npackage tools\n\nimport _ "sigs.k8s.io/lws/cmd"\n' > tools.go
  go get "sigs.k8s.io/lws/cmd@v${LWS_VERSION}" >&2
  go mod tidy >&2 || true
  go build -ldflags "-s -w" -o "$LWS_OUT/lws-controller.tmp" sigs.k8s.io/lws/cmd >&2
  src="$(go mod download -json "sigs.k8s.io/lws@v${LWS_VERSION}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  crd="$src/config/crd/bases/leaderworkerset.x-k8s.io_leaderworkersets.yaml"
  [[ -f "$crd" ]] || { echo "lws v${LWS_VERSION} module has no $crd" >&2; exit 3; }
  cp "$crd" "$LWS_OUT/leaderworkersets.yaml.tmp" && mv "$LWS_OUT/leaderworkersets.yaml.tmp" "$LWS_OUT/leaderworkersets.yaml"
  mv "$LWS_OUT/lws-controller.tmp" "$LWS_OUT/lws-controller"
fi
echo "$OUT"
