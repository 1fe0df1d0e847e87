{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "finetune-operator.fullname" -}}
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

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-operator.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Kopf peering object's name: one per release, so two releases never share a leader. */}}
{{- define "finetune-operator.peeringName" -}}
{{- default (include "finetune-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{/* Namespaced mode needs an explicit list; cluster mode may restrict to a list or watch all. */}}
{{- define "finetune-operator.namespacedMode" -}}
{{- if eq .Values.watch.mode "namespaced" }}
{{- if not .Values.watch.namespaces }}
{{- fail "watch.namespaces must list at least one namespace when watch.mode is namespaced" }}
{{- end }}
{{- true }}
{{- end }}
{{- end }}

{{/* Name of the metrics Service: the ServiceMonitor's targets get it as their `job` label. */}}
{{- define "finetune-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- /* Rules on namespaced resources: cluster-wide in cluster mode, one Role per namespace otherwise. */}}
{{- define "finetune-operator.namespacedRules" }}
# Our custom resources: Kopf patches finalizers and progress annotations, handlers write status.
- apiGroups: [finetune.dev]
  resources: [datasets, finetunejobs]
  verbs: [get, list, watch, patch, update]
- apiGroups: [finetune.dev]
  resources: [datasets/status, finetunejobs/status]
  verbs: [get, patch, update]
# Validation, trainer and governance Jobs.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, watch, delete, patch]
# Rendered trainer configuration and governance inputs.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, get, list, watch, delete, patch]
# Pod state (scheduling, OOM, preemption) and the trainer's last log lines on failure. `create`
# only for the admission dry run of each new Job's pod (POST pods?dryRun=All; RBAC cannot tell a
# dry run from a real create): no more power than `create` on Jobs, whose pods run the same way.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
{{- if .Values.rbac.readSecrets }}
# Optional (rbac.readSecrets): the operator itself never needs Secret values; pods use secretKeyRef.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
{{- end }}
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
{{- if .Values.peering.enabled }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
