{{/* Release-scoped name: the release name when it already says otel-ebpf. */}}
{{- define "otel-ebpf.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "otel-ebpf.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "otel-ebpf.labels" -}}
{{ include "otel-ebpf.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: agent
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "otel-ebpf.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "otel-ebpf.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The agent's otel-ebpf.yaml: values.config + selection + the fixed health file. */}}
{{- define "otel-ebpf.config" -}}
{{- $capture := dict "ports" (ternary .Values.selection.ports nil (gt (len .Values.selection.ports) 0)) -}}
{{- $fixed := dict "capture" $capture "health" (dict "file" "/run/otel-ebpf/health") -}}
{{- toYaml (mergeOverwrite (deepCopy .Values.config) $fixed) -}}
{{- end -}}
