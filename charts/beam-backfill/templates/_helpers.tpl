{{/* Names are capped at 63 characters: they become label values and DNS names. */}}
{{- define "beam-backfill.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "beam-backfill.fullname" -}}
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

{{- define "beam-backfill.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "beam-backfill.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: beam-backfill
{{- end }}

{{- define "beam-backfill.selectorLabels" -}}
app.kubernetes.io/name: {{ include "beam-backfill.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "beam-backfill.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "beam-backfill.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Empty when Jobs should use each namespace's default ServiceAccount. */}}
{{- define "beam-backfill.workerServiceAccountName" -}}
{{- if .Values.worker.serviceAccount.create }}
{{- default (printf "%s-worker" (include "beam-backfill.fullname" .) | trunc 63 | trimSuffix "-") .Values.worker.serviceAccount.name }}
{{- else }}
{{- .Values.worker.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "beam-backfill.apiServiceAccountName" -}}
{{- if .Values.api.serviceAccount.create }}
{{- default (printf "%s-api" (include "beam-backfill.fullname" .) | trunc 63 | trimSuffix "-") .Values.api.serviceAccount.name }}
{{- else }}
{{- required "api.serviceAccount.name is required when api.serviceAccount.create is false" .Values.api.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The API keys' namespace: never the release namespace, whose Helm release Secrets have
predictable names that the API's Role (get secrets) could then read. */}}
{{- define "beam-backfill.apiKeysNamespace" -}}
{{- $ns := default (printf "%s-api-keys" .Release.Namespace | trunc 63 | trimSuffix "-") .Values.api.apiKeysNamespace }}
{{- if eq $ns .Release.Namespace }}
{{- fail (printf "api.apiKeysNamespace must not be the release namespace %q: the API may read every Secret of its keys namespace, and Helm keeps its release Secrets here; name a namespace that holds only API keys" .Release.Namespace) }}
{{- end }}
{{- $ns }}
{{- end }}

{{- define "beam-backfill.image" -}}
{{- printf "%s:%s" .image.repository (default .chart.AppVersion .image.tag) }}
{{- end }}

{{/*
One BEAM_* env value from a config value. Helm reads every YAML number as a float64, which
prints 67108864 as 6.7108864e+07: whole numbers go through int64 first. Lists are joined with
commas and maps become JSON, as OperatorConfig.from_env parses them; null becomes "", which the
operator reads as "keep the default".
*/}}
{{- define "beam-backfill.envValue" -}}
{{- $v := . }}
{{- if kindIs "invalid" $v }}
{{- "" }}
{{- else if kindIs "slice" $v }}
{{- join "," $v }}
{{- else if kindIs "map" $v }}
{{- toJson $v }}
{{- else if and (kindIs "float64" $v) (eq (float64 (int64 $v)) $v) }}
{{- int64 $v }}
{{- else }}
{{- toString $v }}
{{- end }}
{{- end }}

{{/* The operator's rules on namespaced resources: in its ClusterRole, or with watchNamespaces in
a Role per watched namespace. Each rule says why it is there. */}}
{{- define "beam-backfill.operatorNamespacedRules" -}}
# get/list/watch: kopf watches every BeamBackfill. patch: the operator adds its finalizer (a
# merge patch with the resourceVersion seen) and removes it (a JSON patch that tests the uid
# and the finalizer's place). delete: a finished backfill whose ttl_seconds_after_finished has
# passed. Nothing writes a whole object, so no update.
- apiGroups: ["beam-backfill.dev"]
  resources: ["beambackfills"]
  verbs: ["get", "list", "watch", "patch", "delete"]
# get/patch: the operator reports staging/transporting/completed, chunk counts and errors in
# status with a merge patch.
- apiGroups: ["beam-backfill.dev"]
  resources: ["beambackfills/status"]
  verbs: ["get", "patch"]
# The Jobs carry an ownerReference to their BeamBackfill (deleting it deletes them); with
# blockOwnerDeletion set, the OwnerReferencesPermissionEnforcement admission plugin demands
# update on the owner's finalizers subresource.
- apiGroups: ["beam-backfill.dev"]
  resources: ["beambackfills/finalizers"]
  verbs: ["update"]
# Previews (docs/console.md): watch them, run each one's preview Job (owned by the BeamPreview,
# hence its finalizers), report the answer in status, delete one preview_ttl_seconds after it ended.
- apiGroups: ["beam-backfill.dev"]
  resources: ["beampreviews"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["beam-backfill.dev"]
  resources: ["beampreviews/status"]
  verbs: ["patch"]
- apiGroups: ["beam-backfill.dev"]
  resources: ["beampreviews/finalizers"]
  verbs: ["update"]
# create: one staging Job and one indexed transport Job per backfill. get/list/watch: follow
# their progress. delete: cancel, fail or delete a backfill. patch: spec.suspend only
# (spec.suspend of the backfill: pause and resume); nothing else of a Job is changed in place.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# create: a spec too large for an env variable (a filter of thousands of values) reaches the
# workers in an immutable ConfigMap owned by the backfill; the garbage collector deletes it.
# Never read, changed or deleted by the operator.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create"]
# create only: each backfill's staged-data key, an immutable Secret owned by the backfill that
# only its workers read (secretKeyRef); the operator never reads, lists or changes a Secret.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# Read-only: a failed worker's termination message (why the backfill failed) is on its Pod.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# kopf posts Kubernetes events about each handler on the BeamBackfill (kubectl describe);
# patch lets it bump the count of a repeated event. Both API groups, for either client.
# list (core): a Job without Pods long after its creation, to quote the cluster's
# FailedCreate Event (a ResourceQuota that refuses Pods) when the backfill fails for it.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
