{{/* Name of the chart, truncated to the 63 characters a label value allows. */}}
{{- define "corvid-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name, with the chart name appended unless it already contains it. */}}
{{- define "corvid-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "corvid-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "corvid-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "corvid-operator.labels" -}}
{{ include "corvid-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "corvid-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "corvid-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "corvid-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
RBAC rules on namespaced objects: exactly the verbs the controller uses (the same list as
manifests/operator/rbac.yaml). The operator also holds the EndpointSlice read access it grants
to broker pods, because RBAC forbids granting what you do not have.
*/}}
{{- define "corvid-operator.namespacedRules" -}}
# Every verb below is one the operator calls; operator/tests/rbac_surface.rs and
# e2e/packaging-check fail when this list grows without operator/tests/rbac-surface.txt.
# Server-side apply is a PATCH that creates missing objects, so applied kinds need create + patch.
# The controller's watches need list + watch; pruning needs list + delete.
- apiGroups: [corvid.dev]
  resources: [mqttclusters]
  verbs: [list, watch]
# Status is written by server-side apply.
- apiGroups: [corvid.dev]
  resources: [mqttclusters/status]
  verbs: [patch]
# Applied and watched; read back after the apply to plan the pod step; deleted with
# propagationPolicy Orphan (pods kept) to re-create it when spec.persistence.size grows.
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch, delete]
# Volume expansion: the StatefulSet's claims are listed and their storage request patched.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [list, patch]
# Client and headless Services: applied, watched, extra ones pruned.
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [list, watch, create, patch]
# The broker pods' ServiceAccount: applied, and watched (like every kind below that lists
# watch) so a hand edit is put back within seconds.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [list, watch, create, patch]
# The cluster and admin-token Secrets are created once; the admin token is read for admin calls;
# the cluster Secret is patched only by a rotation (corvid.dev/rotate-cluster-secret).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create, patch]
# Listed and watched for status; deleted one at a time to roll them.
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, delete]
# Broker admin API (evacuate, rebalance, cluster view) through the API server's pod proxy.
- apiGroups: [""]
  resources: [pods/proxy]
  verbs: [get, create]
# The last log line of a crash-looping broker, for the Degraded condition.
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# The broker pods' Role and RoleBinding (peer discovery), applied and watched.
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [list, watch, create, patch]
# Not used by the operator itself: RBAC forbids granting (in the brokers' Role) what you do not hold.
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
# Optional objects: applied when wanted, pruned by instance label when not, watched (the
# cert-manager and Prometheus Operator kinds only when their API is served at start).
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [cert-manager.io]
  resources: [certificates]
  verbs: [list, watch, create, patch, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors, prometheusrules]
  verbs: [list, watch, create, patch, delete]
# kube's event recorder creates an Event and patches its series count.
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* Cluster-scoped rules: read the ServiceMonitor and PrometheusRule CRDs (to see whether the
Prometheus Operator is installed); read StorageClasses (whether volumes may grow); patch the
MqttCluster CRD when crds.applyOnStart. */}}
{{- define "corvid-operator.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  resourceNames: [servicemonitors.monitoring.coreos.com, prometheusrules.monitoring.coreos.com]
  verbs: [get]
- apiGroups: [storage.k8s.io]
  resources: [storageclasses]
  verbs: [get]
{{- if .Values.crds.applyOnStart }}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  resourceNames: [mqttclusters.corvid.dev]
  verbs: [patch]
{{- end }}
{{- end -}}
