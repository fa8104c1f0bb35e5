#!/usr/bin/env bash
# guestcred demo (run by `make demo`): bring up the lab (a real kube-apiserver + etcd +
# kube-controller-manager with the Helm chart installed, kubevirt-lite, one private
# libvirtd and two tiny QEMU guests per node, a real shim per node, the real controller
# running as the chart's ServiceAccount), then reset passwords and rotate keys with
# kubectl and check the result inside the guests. Leaves the lab running; DEMO_DOWN=1
# stops it at the end. Prints how long it took.
#
# Environment: GUESTCRED_LAB_STATE (state dir, default .lab/run), DEMO_TIMEOUT (per wait,
# default 180s), DEMO_DOWN=1, DEMO_CONTROL_PLANE=emulator (the in-process API-server
# emulator instead of the real control plane: faster to start, no RBAC/CEL/GC).
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_START=$(date +%s)
CONTROL_PLANE=${DEMO_CONTROL_PLANE:-real}

TIMEOUT=${DEMO_TIMEOUT:-180s}
LAB=target/debug/guestcred-lab

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }

if [ "$(id -u)" = 0 ]; then bash scripts/install-deps.sh; else sudo bash scripts/install-deps.sh; fi
if [ ! -x "$LAB" ] || [ ! -x target/debug/guestcred ]; then
    cargo build --bins
fi
if [ ! -x target/debug/kubectl-guestcred ]; then
    cargo build -p kubectl-guestcred
fi
# kubectl finds plugins on PATH: `kubectl guestcred` runs target/debug/kubectl-guestcred.
export PATH="$PWD/target/debug:$PATH"
if [ "$CONTROL_PLANE" = real ]; then
    step "Build the real control plane (once; cached afterwards)"
    t0=$(date +%s)
    bash scripts/build-controlplane.sh >/dev/null
    echo "control plane build: $(($(date +%s) - t0)) s"
fi

step "Bring up the lab ($CONTROL_PLANE control plane): 2 nodes x 2 VMs, shims, controller"
export_line=$("$LAB" up --with-controller --control-plane "$CONTROL_PLANE")
eval "$export_line"
echo "$export_line"

step "What the cluster looks like"
run kubectl get nodes
run kubectl get vm --show-labels
run kubectl get vmi
run kubectl get pods -n guestcred-system-shim -o wide

step "guestcred's CRDs (up installs crds/ with KubeVirt's; in a real cluster: kubectl apply -f crds/)"
run kubectl get crd
run kubectl wait --for=condition=Established crd/guestpasswordresets.guestcred.io \
    crd/keypairrebuilds.guestcred.io --timeout="$TIMEOUT"

step "Apply the demo objects"
NEW_KEY="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of517d5Kg00cGhwfj7PqWgUgbbxnZyL96Twgi5 demo@guestcred"
CRYPTED='$6$exampleSalt$3CPr/vQb45sQFdvBm/TEkSym19vMe3VQweVAyOduj31BA4Mp6vxpjoDjssqBvU55c8jQk5a25w4TVseP2qvxD0'
FLEET_PASSWORD="rotate-me-quarterly-2026"
# The demo objects as YAML (printed, then applied): a Secret and a GuestPasswordReset each
# print one document and the separator after it.
secret() { # name, key, value (a YAML scalar)
    printf 'apiVersion: v1\nkind: Secret\nmetadata: {name: %s, namespace: default}\nstringData: {%s: %s}\n---\n' \
        "$1" "$2" "$3"
}
reset() { # name, target, user, password, then any further spec lines
    printf 'apiVersion: guestcred.io/v1alpha1\nkind: GuestPasswordReset\nmetadata: {name: %s, namespace: default}\n' "$1"
    printf 'spec:\n  target: %s\n  user: %s\n  password: %s\n' "$2" "$3" "$4"
    shift 4
    for line in "$@"; do printf '  %s\n' "$line"; done
    printf -- '---\n'
}
objects=$(
    echo "# 1. root on vm-1-2 from a Secret"
    secret web-root-password password '"change-me-0n-first-login"'
    reset vm-1-2-root '{vmName: vm-1-2}' root '{secretRef: {name: web-root-password, key: password}}'
    echo "# 2. alice on vm-2-2 from a crypt(3) hash: the plaintext never reaches the cluster"
    secret web-alice-hash hash "'$CRYPTED'"
    reset vm-2-2-alice '{vmName: vm-2-2}' alice '{secretRef: {name: web-alice-hash, key: hash}, crypted: true}'
    echo "# 3. a generated password for alice on vm-2-1, kept in an owned Secret"
    reset vm-2-1-generated '{vmName: vm-2-1}' alice '{generate: {length: 24}}'
    echo "# 4. root on every VM labelled tier=db, two at a time"
    secret fleet-root-password password "\"$FLEET_PASSWORD\""
    reset db-fleet-root '{selector: {matchLabels: {tier: db}}}' root \
        '{secretRef: {name: fleet-root-password, key: password}}' \
        'maxConcurrency: 2' 'maxFailures: 0' 'deadlineSeconds: 120'
    cat <<EOF
# 5. live SSH key rotation for root on vm-2-2, verified by reading the keys back
apiVersion: v1
kind: Secret
metadata: {name: web-authorized-keys, namespace: default}
stringData:
  authorized_keys: |
    $NEW_KEY
---
apiVersion: guestcred.io/v1alpha1
kind: KeypairRebuild
metadata: {name: vm-2-2-keys, namespace: default}
spec:
  target: {vmName: vm-2-2}
  user: root
  publicKeys: {secretRef: {name: web-authorized-keys, key: authorized_keys}}
  mode: Live
  strategy: Replace
EOF
)
printf '%s\n' "$objects"
printf '%s\n' "$objects" | kubectl apply -f -

step "Wait until each one is Ready"
run kubectl wait --for=condition=Ready --timeout="$TIMEOUT" \
    gpr/vm-1-2-root gpr/vm-2-2-alice gpr/vm-2-1-generated gpr/db-fleet-root kpr/vm-2-2-keys
# Ready is the GitOps contract; the phase shows the whole run has finished too.
run kubectl wait --for=jsonpath='{.status.phase}'=Succeeded --timeout="$TIMEOUT" \
    gpr/vm-1-2-root gpr/vm-2-2-alice gpr/vm-2-1-generated gpr/db-fleet-root kpr/vm-2-2-keys
run kubectl get gpr,kpr
run kubectl describe gpr db-fleet-root

step "Check inside the guests"
fail() { echo "demo: $*" >&2; exit 1; }
for vm in vm-1-1 vm-2-1; do
    line=$("$LAB" exec "$vm" -- grep '^root:' /etc/shadow)
    echo "$vm: $line"
    case "$line" in
        *"$FLEET_PASSWORD"*) fail "$vm stores root's password in plain text" ;;
        'root:$y$'* | 'root:$6$'*) ;;
        *) fail "$vm: root has no password hash" ;;
    esac
done
line=$("$LAB" exec vm-2-2 -- grep '^alice:' /etc/shadow)
echo "vm-2-2: $line"
[ "$(echo "$line" | cut -d: -f2)" = "$CRYPTED" ] || fail "vm-2-2: alice does not have the crypted hash"
echo "vm-2-2: /root/.ssh/authorized_keys:"
keys=$("$LAB" exec vm-2-2 -- cat /root/.ssh/authorized_keys)
echo "$keys"
grep -qF "$NEW_KEY" <<<"$keys" || fail "vm-2-2: the rotated key is not in root's authorized_keys"
run kubectl get secrets

step "The same without YAML: kubectl guestcred (the plugin creates a GuestPasswordReset and follows it)"
before=$("$LAB" exec vm-1-1 -- grep '^root:' /etc/shadow)
# The password goes through stdin into a Secret owned by the reset: never in argv or logs.
printf '$ printf %%s "$NEW_ROOT_PASSWORD" | kubectl guestcred set-password vm-1-1 --user root --stdin\n'
printf '%s' "plugin-demo-$RANDOM-$RANDOM" | kubectl guestcred set-password vm-1-1 --user root --stdin --timeout "$TIMEOUT"
run kubectl guestcred status
after=$("$LAB" exec vm-1-1 -- grep '^root:' /etc/shadow)
echo "vm-1-1: $after"
[ "$before" != "$after" ] || fail "vm-1-1: kubectl guestcred set-password did not change root's password"

step "Keys without YAML: kubectl guestcred list-keys / remove-key (KeypairRebuilds with mode Inspect / removeFingerprints)"
# A key root had before guestcred (added by hand in the guest), beside the one vm-2-2-keys put there.
HAND_KEY="ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOimy32Onc7iJCyVgWcE+d/LHx1OCqkqfeeXY5QKiYXE hand@demo"
# (The file may not end with a newline: start the key on a line of its own.)
printf '$ guestcred-lab exec vm-2-2 -- sh -c "printf ... >> /root/.ssh/authorized_keys"   # a key added by hand\n'
"$LAB" exec vm-2-2 -- sh -c "printf '\\n%s\\n' '$HAND_KEY' >> /root/.ssh/authorized_keys"
listed=$(kubectl guestcred list-keys vm-2-2 --user root --timeout "$TIMEOUT")
printf '$ kubectl guestcred list-keys vm-2-2 --user root\n%s\n' "$listed"
hand_fp=$(awk '$3 == "hand@demo" {print $1}' <<<"$listed")
[ -n "$hand_fp" ] || fail "list-keys does not show the hand-added key"
awk '$3 == "hand@demo" && $4 == "no" {found=1} END {exit !found}' <<<"$listed" \
    || fail "list-keys shows the hand-added key as managed"
awk '$3 == "demo@guestcred" && $4 == "yes" {found=1} END {exit !found}' <<<"$listed" \
    || fail "list-keys does not show vm-2-2-keys' key as managed"
run kubectl guestcred remove-key vm-2-2 --user root --fingerprint "$hand_fp" --timeout "$TIMEOUT"
keys=$("$LAB" exec vm-2-2 -- cat /root/.ssh/authorized_keys)
echo "vm-2-2: /root/.ssh/authorized_keys:"
echo "$keys"
! grep -qF "hand@demo" <<<"$keys" || fail "vm-2-2: remove-key left the named key"
grep -qF "$NEW_KEY" <<<"$keys" || fail "vm-2-2: remove-key removed a key it was not asked to"

step "Done in $(($(date +%s) - DEMO_START)) s ($CONTROL_PLANE control plane)"
if [ "${DEMO_DOWN:-0}" = 1 ]; then
    "$LAB" down
else
    echo "The lab is still running:"
    echo "  $export_line"
    echo "  $LAB status                  # nodes, shims, guests, agents"
    echo "  $LAB exec vm-1-1 -- id       # run a command in a guest"
    echo "  $LAB down                    # stop everything"
fi
