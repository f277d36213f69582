{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "trazor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified prefix of every object name. */}}
{{- define "trazor.fullname" -}}
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

{{- define "trazor.operatorName" -}}
{{- printf "%s-operator" (include "trazor.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trazor.collectorName" -}}
{{- printf "%s-collector" (include "trazor.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The agents' ServiceAccount; the operator puts this name into the DaemonSet. */}}
{{- define "trazor.agentName" -}}
{{- printf "%s-node-agent" (include "trazor.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Where the agents stream windows: agent.collectorEndpoint, or the collector Service by DNS. */}}
{{- define "trazor.collectorEndpoint" -}}
{{- if .Values.agent.collectorEndpoint }}
{{- .Values.agent.collectorEndpoint }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "trazor.collectorName" .) .Release.Namespace (int .Values.collector.service.grpcPort) }}
{{- end }}
{{- end }}

{{- define "trazor.tag" -}}
{{- default .Chart.AppVersion .Values.images.tag }}
{{- end }}

{{- define "trazor.image" -}}
{{- printf "%s/%s:%s" .root.Values.images.registry .image (include "trazor.tag" .root) }}
{{- end }}

{{/* Name of the auth Secret, empty when auth is off. */}}
{{- define "trazor.authSecret" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if .Values.auth.token }}
{{- printf "%s-auth" (include "trazor.fullname" .) }}
{{- end }}
{{- end }}

{{- /* The Secret holding the feed and dashboard token; empty: the feed is open. */}}
{{- define "trazor.feedAuthSecret" -}}
{{- if .Values.auth.feed.existingSecret }}
{{- .Values.auth.feed.existingSecret }}
{{- else if .Values.auth.feed.token }}
{{- printf "%s-feed-auth" (include "trazor.fullname" .) }}
{{- end }}
{{- end }}

{{- define "trazor.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: trazor
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "trazor.operatorSelector" -}}
app.kubernetes.io/name: trazor-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trazor.collectorSelector" -}}
app.kubernetes.io/name: trazor-collector
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}
