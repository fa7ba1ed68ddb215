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
- apiGroups: [corvid.dev]
  resources: [mqttclusters]
  verbs: [get, list, watch]
- apiGroups: [corvid.dev]
  resources: [mqttclusters/status]
  verbs: [get, patch, update]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [""]
  resources: [services, configmaps, serviceaccounts]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, delete]
# Broker admin API (evacuate, cluster view) through the API server's pod proxy.
- apiGroups: [""]
  resources: [pods/proxy]
  verbs: [get, create]
# The last log line of a crash-looping broker, for the Degraded condition.
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [get, list, watch]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, update, delete]
# The NetworkPolicy over the broker pods: applied, and pruned when spec.networkPolicy is off.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [list, create, patch, delete]
- apiGroups: [cert-manager.io]
  resources: [certificates]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [monitoring.coreos.com]
  resources: [servicemonitors]
  verbs: [get, list, watch, create, patch, update, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}

{{/* Cluster-scoped rules: read the MqttCluster CRD (and the ServiceMonitor CRD, to see whether
the Prometheus Operator is installed); patch the MqttCluster CRD when crds.applyOnStart. */}}
{{- define "corvid-operator.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get]
{{- if .Values.crds.applyOnStart }}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  resourceNames: [mqttclusters.corvid.dev]
  verbs: [patch]
{{- end }}
{{- end -}}
