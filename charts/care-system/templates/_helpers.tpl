{{/*
Names and labels of the care-system chart.
Invariant: the CareSystem name is a DNS label of at most 58 characters (its namespace is
care-<name>, at most 63).
*/}}

{{- define "care-system.name" -}}
{{- $name := default .Release.Name .Values.name }}
{{- if or (gt (len $name) 58) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name)) }}
{{- fail (printf "the CareSystem name %q must be a DNS label of at most 58 characters (lower-case letters, digits, '-'); set `name` when the release name does not fit" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "care-system.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: care-system
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shcr
{{- end }}
