#!/usr/bin/env bash
# Smoke test of the lab's real control plane (lab/controlplane): brings it up in a temp
# dir, checks what only a real API server + controller manager can show (CRD structural
# schema + CEL acceptance, CEL rule enforcement, service-account tokens, RBAC, namespace
# deletion and garbage collection by kube-controller-manager), then stops it with SIGTERM
# and checks every child process is gone. Exits non-zero on the first failure.
#
# Usage: scripts/controlplane-smoke.sh     (KEEP=1 keeps the temp dir for inspection)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
bin=$(scripts/build-controlplane.sh | tail -n1)

work=$(mktemp -d /tmp/guestcred-cp.XXXXXX)
up_pid=""
passed=0

cleanup() {
	local rc=$?
	if [[ -n "$up_pid" ]] && kill -0 "$up_pid" 2>/dev/null; then
		kill -TERM "$up_pid" 2>/dev/null || true
		for _ in $(seq 1 120); do kill -0 "$up_pid" 2>/dev/null || break; sleep 0.5; done
	fi
	if ((rc != 0)); then
		echo "--- FAILED; up's output:" >&2
		tail -n 40 "$work/up.out" >&2 || true
	fi
	if [[ "${KEEP:-}" == 1 || $rc -ne 0 ]]; then
		echo "state kept in $work" >&2
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { passed=$((passed + 1)); echo "ok   $*"; }
k() { kubectl --kubeconfig "$work/admin.kubeconfig" "$@"; }
# until SECONDS CMD...: retry CMD every 0.5 s for at most SECONDS.
until_ok() {
	local deadline=$((SECONDS + $1)); shift
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || return 1
		sleep 0.5
	done
}

# --- up ----------------------------------------------------------------------------
t0=$SECONDS
"$bin" up --dir "$work" >"$work/up.out" 2>&1 &
up_pid=$!
deadline=$((SECONDS + 240))
until [[ -f "$work/ready" ]]; do
	kill -0 "$up_pid" 2>/dev/null || fail "up exited before ready"
	((SECONDS < deadline)) || fail "no $work/ready after 240s"
	sleep 0.5
done
server=$(cat "$work/ready")
ok "up: ready in $((SECONDS - t0))s at $server"

# --- version -----------------------------------------------------------------------
k version >"$work/version.txt" 2>&1 || { cat "$work/version.txt"; fail "kubectl version"; }
want=$(cd lab/controlplane && go list -m -f '{{.Version}}' k8s.io/kubernetes)
grep -q "Server Version: $want" "$work/version.txt" || { cat "$work/version.txt"; fail "server does not report $want"; }
ok "kubectl version: $(grep 'Server Version' "$work/version.txt")"

# --- CRDs: accepted (structural schema, CEL syntax and cost) and Established ---------
k apply -f crds/ >/dev/null || fail "kubectl apply -f crds/ was refused"
k wait --for=condition=Established --timeout=60s -f crds/ >/dev/null || fail "CRDs not Established"
ok "CRDs accepted and Established: $(k get -f crds/ -o name | tr '\n' ' ')"

# --- example 01 ----------------------------------------------------------------------
ex=examples/01-reset-from-secret.yaml
sed -n 's/^[[:space:]]*namespace:[[:space:]]*\([^[:space:]]*\).*/\1/p' "$ex" | sort -u | while read -r ns; do
	k get namespace "$ns" >/dev/null 2>&1 || k create namespace "$ns" >/dev/null
done
# Right after Established, discovery and the OpenAPI of a new CRD can lag a moment.
until_ok 30 k apply -f "$ex" || { k apply -f "$ex"; fail "apply $ex"; }
k get -f "$ex" >/dev/null || fail "objects of $ex not found"
ok "applied $ex: $(k get -f "$ex" -o name | tr '\n' ' ')"

# --- a CEL one-of rule is enforced by the server ------------------------------------
out=$(k apply -f - 2>&1 <<'YAML'
apiVersion: guestcred.io/v1alpha1
kind: GuestPasswordReset
metadata:
  name: breaks-one-of
  namespace: default
spec:
  target:
    vmName: db-0
    selector:
      matchLabels: {app: db}
  user: root
  password:
    generate: {}
YAML
) && fail "object breaking the target one-of rule was accepted"
grep -q "set exactly one of target.vmName and target.selector" <<<"$out" || { echo "$out"; fail "refusal lacks the rule's message"; }
ok "CEL one-of refused: $(grep -o 'spec.target: Invalid value[^:]*: set exactly one of target.vmName and target.selector' <<<"$out" | head -n1)"

# --- service account, token, RBAC ---------------------------------------------------
k create namespace smoke >/dev/null
# The serviceaccount controller creates "default" in every namespace; the root-CA
# publisher puts kube-root-ca.crt there.
until_ok 60 k -n smoke get serviceaccount default || fail "serviceaccount controller did not create smoke/default"
until_ok 60 k -n smoke get configmap kube-root-ca.crt || fail "root-ca publisher did not create smoke/kube-root-ca.crt"
ok "controllers: serviceaccount smoke/default and configmap smoke/kube-root-ca.crt exist"
k -n smoke create serviceaccount robot >/dev/null
token=$(k -n smoke create token robot --duration=10m)
[[ -n "$token" ]] || fail "empty token"
# As the service account itself (no client cert): the token must authenticate...
sa() { kubectl --kubeconfig=/dev/null --server="$server" --certificate-authority="$work/pki/ca.crt" --token="$token" "$@"; }
who=$(sa auth whoami -o jsonpath='{.status.userInfo.username}') || fail "token not accepted"
[[ "$who" == "system:serviceaccount:smoke:robot" ]] || fail "whoami says $who"
# ...and RBAC must deny it secrets. `can-i` prints "no" and exits 1.
ans=$(sa auth can-i get secrets -n smoke 2>&1) && fail "can-i get secrets said yes"
[[ "$ans" == no* ]] || fail "can-i get secrets: $ans"
ok "token for $who works; can-i get secrets: $ans"

# --- garbage collector: a dependent goes with its owner -----------------------------
k -n smoke create configmap owner >/dev/null
uid=$(k -n smoke get configmap owner -o jsonpath='{.metadata.uid}')
k apply -f - >/dev/null <<YAML
apiVersion: v1
kind: ConfigMap
metadata:
  name: dependent
  namespace: smoke
  ownerReferences:
  - {apiVersion: v1, kind: ConfigMap, name: owner, uid: "$uid"}
YAML
k -n smoke delete configmap owner >/dev/null
gone() { ! k "$@" >/dev/null 2>&1; }
until_ok 60 gone -n smoke get configmap dependent || fail "garbage collector left smoke/dependent"
ok "garbage collector deleted the dependent of a deleted owner"

# --- namespace deletion by the namespace controller ---------------------------------
k create namespace smoke-gc >/dev/null
k -n smoke-gc create configmap filler >/dev/null
sed 's/namespace: default/namespace: smoke-gc/' "$ex" | k apply -f - >/dev/null
k delete namespace smoke-gc --wait=false >/dev/null
until_ok 90 gone get namespace smoke-gc || { k get namespace smoke-gc -o yaml; fail "namespace smoke-gc still there"; }
ok "namespace smoke-gc (with a Secret, ConfigMap and GuestPasswordReset) removed by the namespace controller"

# --- audit log (Metadata level, written by the API server) --------------------------
grep '"verb":"delete"' "$work/audit.log" | grep '"resource":"namespaces"' | grep -q '"name":"smoke-gc"' ||
	fail "audit.log has no entry for the deletion of namespace smoke-gc"
ok "audit.log records the namespace deletion ($(wc -l <"$work/audit.log") events)"

# --- stop ---------------------------------------------------------------------------
mapfile -t pids < <(sed -n 's/^ *"\([a-z-]*\)": \([0-9][0-9]*\),\{0,1\}$/\1=\2/p' "$work/endpoints.json" | grep -v '^up=')
((${#pids[@]} == 3)) || fail "expected 3 child pids in endpoints.json, got: ${pids[*]}"
kill -TERM "$up_pid"
t1=$SECONDS
rc=0
wait "$up_pid" || rc=$?
up_pid=""
((rc == 0)) || fail "up exited $rc after SIGTERM"
for p in "${pids[@]}"; do
	! kill -0 "${p#*=}" 2>/dev/null || fail "${p%%=*} (pid ${p#*=}) still running after up exited"
done
[[ ! -f "$work/ready" ]] || fail "$work/ready left behind"
ok "SIGTERM: up exited 0 in $((SECONDS - t1))s; ${pids[*]} all gone"

echo "controlplane smoke: $passed passed, 0 failed"
