{{/* Chart name (overridable). */}}
{{- define "guestcred.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource name prefix: the release name, plus the chart name unless it is already in it. */}}
{{- define "guestcred.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Selector labels of one component (dict "root" $ "component" "shim"). The name label is
fixed to "guestcred" (not nameOverride): the controller finds shim pods by exactly
app.kubernetes.io/name=guestcred,app.kubernetes.io/component=shim (src/controller/shims.rs).
*/}}
{{- define "guestcred.selectorLabels" -}}
app.kubernetes.io/name: guestcred
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels on every object of one component (dict "root" $ "component" "shim"). */}}
{{- define "guestcred.labels" -}}
{{ include "guestcred.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: guestcred
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "guestcred.controller.fullname" -}}
{{- printf "%s-controller" (include "guestcred.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "guestcred.shim.fullname" -}}
{{- printf "%s-shim" (include "guestcred.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Namespace of the shim DaemonSet (values shim.namespace; default "<release namespace>-shim"),
apart from the controller's so that the release namespace can enforce the `restricted`
Pod Security level while the shim's allows `privileged` (docs/security.md "Pod Security").
*/}}
{{- define "guestcred.shim.namespace" -}}
{{- $ns := default (printf "%s-shim" .Release.Namespace) .Values.shim.namespace }}
{{- if gt (len $ns) 63 }}
{{- fail (printf "shim namespace %q is longer than 63 characters: set shim.namespace" $ns) }}
{{- end }}
{{- $ns }}
{{- end }}

{{- define "guestcred.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* The Secret holding the optional extra bearer token (key "token"). */}}
{{- define "guestcred.shimTokenSecret" -}}
{{- default (printf "%s-shim-token" (include "guestcred.fullname" .)) .Values.shim.auth.existingTokenSecret }}
{{- end }}

{{/* Where both components read the extra bearer token. */}}
{{- define "guestcred.shimTokenDir" -}}/var/run/secrets/guestcred/shim-token{{- end }}

{{/*
mTLS names (docs/security.md): the shim's certificate names guestcred-shim, the
controller's guestcred-controller; the binaries default to the same names.
*/}}
{{- define "guestcred.shimServerName" -}}guestcred-shim{{- end }}
{{- define "guestcred.controllerClientName" -}}guestcred-controller{{- end }}

{{/* Secret with the shim's server certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "guestcred.shimTlsSecret" -}}
{{- if eq .Values.tls.source "existing" }}
{{- required "tls.existing.shimSecret is required with tls.source=existing" .Values.tls.existing.shimSecret }}
{{- else }}
{{- printf "%s-shim-tls" (include "guestcred.fullname" .) }}
{{- end }}
{{- end }}

{{/* Secret with the controller's client certificate (tls.crt, tls.key, ca.crt). */}}
{{- define "guestcred.controllerTlsSecret" -}}
{{- if eq .Values.tls.source "existing" }}
{{- required "tls.existing.controllerSecret is required with tls.source=existing" .Values.tls.existing.controllerSecret }}
{{- else }}
{{- printf "%s-controller-tls" (include "guestcred.fullname" .) }}
{{- end }}
{{- end }}

{{/* The release CA: ca.crt only (helm), or the CA key pair cert-manager's CA Issuer uses. */}}
{{- define "guestcred.caSecret" -}}
{{- printf "%s-ca" (include "guestcred.fullname" .) }}
{{- end }}

{{/* Mount points of the two Secret volumes (whole Secrets, never subPath: kubelet does
not update subPath mounts, so a renewal would never reach the pod). */}}
{{- define "guestcred.shimTlsDir" -}}/etc/guestcred/tls{{- end }}
{{- define "guestcred.controllerTlsDir" -}}/etc/guestcred/shim-tls{{- end }}

{{/* Host directory the shim's locator needs (the only hostPath it mounts). */}}
{{- define "guestcred.shim.hostDir" -}}
{{- if eq .Values.shim.locator "kubevirt" }}
{{- .Values.shim.kubevirt.kubeletPodsDir }}
{{- else if eq .Values.shim.locator "libvirt-uri" }}
{{- .Values.shim.libvirtUri.socketDir }}
{{- else if eq .Values.shim.locator "qga-socket" }}
{{- .Values.shim.qgaSocket.socketDir }}
{{- else }}
{{- fail (printf "shim.locator %q: expected kubevirt, libvirt-uri or qga-socket" .Values.shim.locator) }}
{{- end }}
{{- end }}

{{/* Capabilities the shim keeps after dropping ALL. */}}
{{- define "guestcred.shim.capabilities" -}}
{{- if kindIs "slice" .Values.shim.capabilities }}
{{- toJson .Values.shim.capabilities }}
{{- else if eq .Values.shim.locator "kubevirt" }}
{{- toJson (list "DAC_OVERRIDE") }}
{{- else }}
{{- toJson (list) }}
{{- end }}
{{- end }}

{{/* Cross-field checks the JSON schema cannot express. */}}
{{- define "guestcred.validate" -}}
{{- if le (int .Values.controller.shimRequestTimeoutSeconds) (int .Values.shim.agentTimeoutSeconds) }}
{{- fail "controller.shimRequestTimeoutSeconds must be greater than shim.agentTimeoutSeconds (a shim call includes one agent call)" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "serviceMonitor.enabled needs metrics.enabled (it scrapes the metrics Service)" }}
{{- end }}
{{- if le (int .Values.shim.shutdownGraceSeconds) (int .Values.shim.agentTimeoutSeconds) }}
{{- fail "shim.shutdownGraceSeconds must be greater than shim.agentTimeoutSeconds (a draining shim lets its agent calls finish)" }}
{{- end }}
{{- if le (int .Values.shim.terminationGracePeriodSeconds) (int .Values.shim.shutdownGraceSeconds) }}
{{- fail "shim.terminationGracePeriodSeconds must be greater than shim.shutdownGraceSeconds (else the kubelet kills the shim while it drains)" }}
{{- end }}
{{- if eq (int .Values.shim.metricsPort) (int .Values.shim.port) }}
{{- fail "shim.metricsPort must differ from shim.port (the API port serves mutual TLS only)" }}
{{- end }}
{{- if and (gt (int .Values.controller.replicas) 1) (not .Values.controller.leaderElection.enabled) }}
{{- fail "controller.replicas > 1 needs controller.leaderElection.enabled (two active controllers would race)" }}
{{- end }}
{{- /* Pod Security: the shim mounts a hostPath, which both the baseline and the restricted
level refuse (docs/security.md "Pod Security"). It runs in its own namespace: created by the
chart with the privileged labels, or (shim.createNamespace=false) one that exists. An
existing namespace that enforces baseline or restricted would leave the DaemonSet without
pods, with the reason only in its Events: refuse the install instead. (lookup sees nothing
under helm template; a cluster-wide default level set in the API server's
AdmissionConfiguration is not visible here either.) The release namespace holds only the
controller, whose pod meets restricted: nothing is asked of it. */}}
{{- $shimNs := include "guestcred.shim.namespace" . }}
{{- if and .Values.shim.createNamespace (eq $shimNs .Release.Namespace) }}
{{- fail (printf "shim.namespace is the release namespace %s, which helm does not create as part of the release: set shim.createNamespace=false and label it pod-security.kubernetes.io/enforce=privileged (docs/security.md \"Pod Security\")" .Release.Namespace) }}
{{- end }}
{{- if not .Values.shim.createNamespace }}
{{- $enforce := dig "metadata" "labels" "pod-security.kubernetes.io/enforce" "" (lookup "v1" "Namespace" "" $shimNs) }}
{{- if has $enforce (list "baseline" "restricted") }}
{{- fail (printf "namespace %s (shim.namespace) enforces the Pod Security level %q, which refuses the shim's pods (hostPath volume): label it pod-security.kubernetes.io/enforce=privileged, or let the chart create the shim namespace (shim.createNamespace=true) (docs/security.md \"Pod Security\")" $shimNs $enforce) }}
{{- end }}
{{- end }}
{{- /* cert-manager: a namespaced Issuer signs Certificates of its own namespace only; the
shim's Certificate lives in the shim namespace, the controller's in the release namespace. */}}
{{- if and (eq .Values.tls.source "cert-manager") (ne $shimNs .Release.Namespace) (ne (dig "kind" "" .Values.tls.certManager.issuerRef) "ClusterIssuer") }}
{{- fail (printf "tls.source=cert-manager with the shim in its own namespace (%s) needs tls.certManager.issuerRef of kind ClusterIssuer: a namespaced Issuer signs only in its own namespace. Or keep the shim in the release namespace: shim.namespace=%s, shim.createNamespace=false" $shimNs .Release.Namespace) }}
{{- end }}
{{- if and (eq .Values.shim.locator "qga-socket") (not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.shim.qgaSocket.socketDir)) .Values.shim.qgaSocket.socketTemplate)) }}
{{- fail "shim.qgaSocket.socketTemplate must lie inside shim.qgaSocket.socketDir (only that directory is mounted)" }}
{{- end }}
{{- end }}

{{/*
The controller's rules on the objects it reconciles and what they name: a ClusterRole in
cluster-wide mode, one Role per watched namespace in namespaced mode (watchNamespaces).
Each rule is what the code calls, no more: tests/helm_chart.rs checks both modes against
the list of the controller's calls, and tests/real_control_plane.rs reads the API
server's audit log and lists any rule no flow used.
*/}}
{{- define "guestcred.controller.rules" -}}
# Our own objects: read and watch them.
- apiGroups: [guestcred.io]
  resources: [guestpasswordresets]
  verbs: [get, list, watch]
# patch: the finalizer guestcred.io/keys (deleting a KeypairRebuild removes its keys).
- apiGroups: [guestcred.io]
  resources: [keypairrebuilds]
  verbs: [get, list, watch, patch]
# Status is written by merge patch only (carrying the resourceVersion it came from).
- apiGroups: [guestcred.io]
  resources: [guestpasswordresets/status, keypairrebuilds/status]
  verbs: [patch]
# Where a VM runs (status.nodeName, activePods), whether its agent is connected.
# patch: a VMI that has no VM carries the record of the SSH keys guestcred added
# (annotation keys.guestcred.io/<user>), as a VM does otherwise.
- apiGroups: [kubevirt.io]
  resources: [virtualmachineinstances]
  verbs: [get, list, watch, patch]
# Rebuild mode writes new cloud-init keys into the VM spec; the VM (or VMI) records
# the keys guestcred added (read with get, never listed).
- apiGroups: [kubevirt.io]
  resources: [virtualmachines]
  verbs: [get, patch]
# ... and restarts the VM so they take effect.
- apiGroups: [subresources.kubevirt.io]
  resources: [virtualmachines/restart]
  verbs: [update]
# get: the input Secret a spec names (same namespace only). create: one output Secret
# per target for generated passwords. list/watch: the controller watches Secret
# METADATA only (PartialObjectMeta), so a changed input Secret re-runs its objects;
# RBAC cannot narrow a list/watch grant to metadata, see docs/install.md.
# delete: scheduled rotation (spec.rotation) prunes its own earlier generated Secrets
# beyond keepPrevious (owned by the reset; checked before deleting).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, delete]
# Runs of more than 100 targets keep every target's record in ConfigMaps the object owns
# (api/src/shards.rs), so no object grows with the fleet: get (a run resumes), create
# and update (as the run goes, with resourceVersion), list by the owner's label (shards
# a stopped controller left unnamed), delete (a new run replaces them).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, create, update, delete]
# Events on the objects it reconciles (kube-rs's Recorder writes events.k8s.io only).
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
