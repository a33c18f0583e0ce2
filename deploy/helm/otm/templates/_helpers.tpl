{{/* The release's base name. */}}
{{- define "otm.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "otm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "otm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "otm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector of every control-plane pod (routers and orchestrators). */}}
{{- define "otm.controlPlaneSelector" -}}
app.kubernetes.io/name: {{ include "otm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Selector of one role's pods; call with (dict "root" $ "role" "router"). */}}
{{- define "otm.roleSelector" -}}
{{ include "otm.controlPlaneSelector" .root }}
app.kubernetes.io/component: {{ .role }}
{{- end -}}

{{/* Labels of tenant pods, as the kube runtime sets them. */}}
{{- define "otm.tenantSelector" -}}
app.kubernetes.io/managed-by: otm
otm.dev/role: instance
{{- end -}}

{{- define "otm.tenantNamespace" -}}
{{- default (printf "%s-tenants" .Release.Namespace) .Values.tenants.namespace -}}
{{- end -}}

{{- define "otm.secretName" -}}
{{- default (include "otm.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{- define "otm.serviceAccount" -}}
{{- printf "%s-%s" (include "otm.fullname" .root) .role -}}
{{- end -}}

{{- define "otm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The taint of Kata nodes as a toleration. */}}
{{- define "otm.kataToleration" -}}
key: {{ .Values.kube.taint.key }}
operator: Equal
value: {{ .Values.kube.taint.value | quote }}
effect: {{ .Values.kube.taint.effect }}
{{- end -}}

{{- define "otm.registryUrl" -}}
{{- $d := .Values.registry.dynamodb -}}
{{- $q := list (printf "region=%s" (default .Values.aws.region $d.region)) -}}
{{- if $d.endpoint }}{{ $q = append $q (printf "endpoint=%s" $d.endpoint) }}{{ end -}}
{{- printf "dynamodb://%s?%s" $d.tablePrefix (join "&" $q) -}}
{{- end -}}

{{- define "otm.stateUrl" -}}
{{- $s := .Values.state.s3 -}}
{{- $q := list (printf "region=%s" (default .Values.aws.region $s.region)) -}}
{{- if $s.endpoint }}{{ $q = append $q (printf "endpoint=%s" $s.endpoint) }}{{ if hasPrefix "http://" $s.endpoint }}{{ $q = append $q "allow_http=true" }}{{ end }}{{ end -}}
{{- $prefix := trimAll "/" $s.prefix -}}
{{- printf "s3://%s%s?%s" $s.bucket (ternary (printf "/%s" $prefix) "" (ne $prefix "")) (join "&" $q) -}}
{{- end -}}

{{- define "otm.egressUrl" -}}
{{- printf "http://%s-egress.%s.svc:%v" (include "otm.fullname" .) .Release.Namespace .Values.ports.egress -}}
{{- end -}}
