{{/*
Names, labels and shared fragments of the shcr chart.
Invariants: every object carries the app.kubernetes.io/* labels; selectors use only the stable
name/instance/component labels (never the version), so upgrades never orphan pods.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "shcr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<name>" (or just the release name when it already contains the name), at most
50 characters so that "-operator"/"-gateway" suffixes stay within 63. */}}
{{- define "shcr.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shcr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "shcr.labels" -}}
helm.sh/chart: {{ include "shcr.chart" . }}
app.kubernetes.io/name: {{ include "shcr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shcr
{{- end }}

{{/* Selector labels of one component: (dict "context" $ "component" "gateway"). */}}
{{- define "shcr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shcr.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's objects. */}}
{{- define "shcr.componentLabels" -}}
{{ include "shcr.labels" .context }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "shcr.operator.fullname" -}}
{{- printf "%s-operator" (include "shcr.fullname" .) }}
{{- end }}

{{- define "shcr.gateway.fullname" -}}
{{- printf "%s-gateway" (include "shcr.fullname" .) }}
{{- end }}

{{- define "shcr.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "shcr.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shcr.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "shcr.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- required "gateway.serviceAccount.name is required when gateway.serviceAccount.create is false" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: repository:tag, pinned by @digest when one is given. */}}
{{- define "shcr.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* The Secret holding the identity-assertion key pair (private.pem, public.pem). */}}
{{- define "shcr.assertionSecretName" -}}
{{- default (printf "%s-identity-assertion" (include "shcr.fullname" .)) .Values.identityAssertion.existingSecret }}
{{- end }}

{{/* The `telemetry` section of a component's config file: (dict "context" $ "service" "shcr-gateway"). */}}
{{- define "shcr.telemetryConfig" -}}
telemetry:
  log_format: {{ .context.Values.telemetry.logFormat }}
  log_level: {{ .context.Values.telemetry.logLevel | quote }}
  {{- with .context.Values.telemetry.otlpEndpoint }}
  otlp_endpoint: {{ . | quote }}
  {{- end }}
  service_name: {{ .service }}
  sample_ratio: {{ .context.Values.telemetry.sampleRatio }}
{{- end }}

{{/* Pod security context shared by the operator and the gateway (restricted PSS). */}}
{{- define "shcr.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Container security context shared by every container of the chart. */}}
{{- define "shcr.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end }}

{{/* The `helm test` pod as a NetworkPolicy peer, so restricted ingress still lets it in. */}}
{{- define "shcr.testPeer" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/instance: {{ .Release.Name }}
      app.kubernetes.io/component: test
{{- end }}
