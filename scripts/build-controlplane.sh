#!/usr/bin/env bash
# Builds the lab's real control plane (lab/controlplane: etcd + kube-apiserver +
# kube-controller-manager from the Kubernetes Go modules) into .lab/bin/controlplane.
# Test world only, never shipped.
#
# Cached: the build is skipped when .lab/bin/controlplane.stamp holds the hash of
# go.mod, go.sum, every *.go file, the Go version and the version ldflags. The Go build
# cache (~/.cache/go-build by default) makes a rebuild after a small change fast; the
# first (cold) build compiles most of Kubernetes: ~10-30 min on 2 cores.
#
# Usage: scripts/build-controlplane.sh [--force]     Prints the binary's path last.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src="$repo/lab/controlplane"
out="${GUESTCRED_CONTROLPLANE_BIN:-$repo/.lab/bin/controlplane}"
stamp="$out.stamp"

command -v go >/dev/null || { echo "build-controlplane: go is not installed" >&2; exit 1; }

# /version must report the real release (Helm checks kubeVersion against it): take it
# from the k8s.io/kubernetes requirement in go.mod.
k8s=$(cd "$src" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
[[ "$k8s" =~ ^v1\.([0-9]+)\.[0-9]+$ ]] || { echo "build-controlplane: odd k8s.io/kubernetes version $k8s" >&2; exit 1; }
minor="${BASH_REMATCH[1]}"
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$k8s"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"

hash=$(
	cd "$src"
	{
		go version
		echo "$ldflags"
		find . -name '*.go' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum go.mod go.sum
	} | sha256sum | cut -d' ' -f1
)

if [[ "${1:-}" != "--force" && -x "$out" && -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; then
	echo "build-controlplane: up to date ($k8s)" >&2
	echo "$out"
	exit 0
fi

mkdir -p "$(dirname "$out")"
echo "build-controlplane: building $k8s (a cold build takes 10-30 min on 2 cores)" >&2
start=$(date +%s)
# No -trimpath: it changes every package's cache key, so `go build` / `go vet` run by hand
# in lab/controlplane would not share the cache with this script. A temp name + mv means
# an interrupted build never leaves a half-written binary that looks current.
(cd "$src" && nice -n 10 go build -ldflags "$ldflags" -o "$out.tmp" .)
mv "$out.tmp" "$out"
echo "$hash" >"$stamp"
echo "build-controlplane: built in $(($(date +%s) - start))s" >&2
echo "$out"
