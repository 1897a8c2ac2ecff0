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
