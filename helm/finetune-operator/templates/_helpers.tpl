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

{{/* The Secret holding the governance report signing key, in the release namespace: the only
Secret the operator may read (rbac.yaml grants it by this name). */}}
{{- define "finetune-operator.signingSecretName" -}}
{{- printf "%s-signing" (include "finetune-operator.fullname" .) }}
{{- end }}

{{- /* Rules on namespaced resources, in every namespace the operator watches: one Role per
namespace when watch.namespaces lists them, cluster-wide (the ClusterRole) when it watches all.
Never Secrets (pods read credentials through secretKeyRef; the only Secret the operator touches is
its signing key, granted by name in its own namespace in rbac.yaml) and never pods/log (ftctl
reads logs with the user's own credentials; the operator reads none). */}}
{{- define "finetune-operator.namespacedRules" }}
# Our custom resources: Kopf patches finalizers and progress annotations, handlers write status.
- apiGroups: [finetune.dev]
  resources: [datasets, finetunejobs, syntheticdatasets, federatedfinetunejobs]
  verbs: [get, list, watch, patch, update]
- apiGroups: [finetune.dev]
  resources: [datasets/status, finetunejobs/status, syntheticdatasets/status, federatedfinetunejobs/status]
  verbs: [get, patch, update]
# A SyntheticDataset's result: the Dataset of its reviewed examples (owned by it).
- apiGroups: [finetune.dev]
  resources: [datasets]
  verbs: [create]
# Validation, trainer, synthesis and federation (SuperLink, server, site) Jobs.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, watch, delete, patch]
# Rendered trainer configuration.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, get, list, watch, delete, patch]
# Pod state (scheduling, OOM, preemption). `create` only for the admission dry run of each new
# Job's pod (POST pods?dryRun=All; RBAC cannot tell a dry run from a real create): no more power
# than `create` on Jobs, whose pods run the same way.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# The one egress NetworkPolicy per namespace for the operator's Job pods (created, then kept as
# rendered; never listed or deleted), and one per multi-node trainer Job letting its pods reach
# each other (owned by the FineTuneJob: garbage-collected with it).
# A federation's policies (docs/federated.md): the SuperLink's and the server's are owned by the
# FederatedFineTuneJob; a site's, in the participant's namespace, cannot be (no owner reference
# crosses namespaces), so the federation's finalizer lists and deletes it by label.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch, list, delete]
# The headless Service of a multi-node trainer Job (pod 0's DNS name for the rendezvous; owned by
# the FineTuneJob) and a federation's SuperLink Service (owned by the FederatedFineTuneJob).
- apiGroups: [""]
  resources: [services]
  verbs: [get, create]
# A federation's pods run as ServiceAccounts of their own, bound to no Role and without a token:
# created, and (in the participants' namespaces) deleted by the federation's finalizer. Not
# serviceaccounts/token: the operator cannot mint a token for any account.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, list, delete]
# Serving targets: the LoRA adapter list of a KServe LLMInferenceService (server-side apply).
- apiGroups: [serving.kserve.io]
  resources: [llminferenceservices]
  verbs: [get, patch]
{{- if .Values.peering.enabled }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}

{{- /* Rules in the operator's own namespace (.Release.Namespace), in every mode: the governance
Jobs run there, next to the signing key, so no watched namespace ever sees the key. */}}
{{- define "finetune-operator.operatorNamespaceRules" }}
# Governance Jobs, their inputs and their pods (as in a watched namespace).
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, get, list, watch, delete, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, get, list, watch, delete, patch]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create]
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# Kopf watches this namespace too (for the governance Jobs) and so lists our resources here; users'
# objects live in the watched namespaces, so nothing here is written.
- apiGroups: [finetune.dev]
  resources: [datasets, finetunejobs, syntheticdatasets, federatedfinetunejobs]
  verbs: [get, list, watch]
# The report signing key: read and rotated by name only.
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [{{ include "finetune-operator.signingSecretName" . }}]
  verbs: [get, patch, update]
# Creating it on first start. RBAC cannot restrict `create` by name (the name is not known when
# the request is authorized), so this allows creating any Secret in this namespace -- but not
# reading one back: get/list/watch exist only for the name above.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
{{- if and .Values.peering.enabled .Values.watch.namespaces }}
# Kopf peers per namespace when it watches a list, and this namespace is on its list.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
