{{/* The name every object starts with: the release's, with "-cdl" unless it says cdl already. */}}
{{- define "cdl.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The Kafka consumer services: StatefulSets scaled by KEDA on consumer lag. */}}
{{- define "cdl.consumers" -}}
ingest trainer tuner compressor monitor
{{- end -}}

{{/* Labels of a component: (dict "root" $ "component" "ingest") */}}
{{- define "cdl.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: cdl
{{ include "cdl.selectorLabels" . }}
{{- end -}}

{{- define "cdl.selectorLabels" -}}
app.kubernetes.io/name: cdl
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* A cdl image: (dict "root" $ "svc" .Values.ingest) */}}
{{- define "cdl.image" -}}
{{- $tag := .svc.image.tag | default .root.Values.images.tag | default .root.Chart.AppVersion -}}
{{- printf "%s%s:%s" .root.Values.images.registry .svc.image.repository $tag -}}
{{- end -}}

{{- define "cdl.required" -}}
{{- $_ := required "kafka.bootstrap is required: the external Kafka's host:port[,host:port]" .Values.kafka.bootstrap -}}
{{- $_ := required "s3.endpoint is required: the external MinIO's host:port" .Values.s3.endpoint -}}
{{- end -}}

{{/* The connections every service reads from the generic CDL_<FIELD> variables (compose's x-cdl). */}}
{{- define "cdl.commonEnv" -}}
{{- include "cdl.required" . -}}
- name: CDL_KAFKA_BOOTSTRAP
  value: {{ .Values.kafka.bootstrap | quote }}
- name: CDL_KAFKA_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
- name: CDL_KAFKA_SSL_CA_FILE
  value: /etc/cdl/tls/ca.pem
- name: CDL_S3_SECURE
  value: {{ .Values.s3.secure | quote }}
- name: CDL_S3_CA_FILE
  value: /etc/cdl/tls/ca.pem
- name: CDL_S3_ENDPOINT
  value: {{ .Values.s3.endpoint | quote }}
- name: CDL_INSECURE
  value: {{ .Values.insecure | quote }}
{{- end -}}

{{- define "cdl.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end -}}

{{/* A service's own identity: its Kafka user, its store user, its metrics endpoint, its instance.
     (dict "root" $ "name" "ingest") */}}
{{- define "cdl.serviceEnv" -}}
{{- $p := printf "CDL_%s_" (upper .name) -}}
{{- $secret := index .root.Values.secrets .name -}}
- name: {{ $p }}S3_ACCESS_KEY
  value: cdl-{{ .name }}
{{ include "cdl.secretEnv" (dict "name" (printf "%sKAFKA_SASL_USERNAME" $p) "secret" $secret "key" "kafka-username") }}
{{ include "cdl.secretEnv" (dict "name" (printf "%sKAFKA_SASL_PASSWORD" $p) "secret" $secret "key" "kafka-password") }}
{{ include "cdl.secretEnv" (dict "name" (printf "%sS3_SECRET_KEY" $p) "secret" $secret "key" "s3-secret-key") }}
- name: {{ $p }}METRICS_HOST
  value: 0.0.0.0
- name: {{ $p }}METRICS_PORT
  value: "9100"
{{- if ne .name "monitor" }}
{{- /* the transactional id is <group_id>-<instance>: the pod's name, stable in a StatefulSet */}}
- name: {{ $p }}INSTANCE
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- end -}}

{{/* Probes on the metrics port: /healthz (liveness), /readyz (readiness), a generous start-up. */}}
{{- define "cdl.probes" -}}
{{- $p := .Values.probes -}}
startupProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: {{ $p.startup.periodSeconds }}
  timeoutSeconds: {{ $p.startup.timeoutSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
livenessProbe:
  httpGet: {path: /healthz, port: metrics}
  periodSeconds: {{ $p.liveness.periodSeconds }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
readinessProbe:
  httpGet: {path: /readyz, port: metrics}
  periodSeconds: {{ $p.readiness.periodSeconds }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
{{- end -}}

{{/* The CA every client trusts, read-only at /etc/cdl/tls/ca.pem (compose's trust volume). */}}
{{- define "cdl.trustVolume" -}}
- name: trust
{{- if .Values.secrets.ca.configMap }}
  configMap:
    name: {{ .Values.secrets.ca.name }}
    items: [{key: {{ .Values.secrets.ca.key | quote }}, path: ca.pem}]
{{- else }}
  secret:
    secretName: {{ .Values.secrets.ca.name }}
    items: [{key: {{ .Values.secrets.ca.key | quote }}, path: ca.pem}]
{{- end }}
{{- end -}}

{{- define "cdl.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65534
runAsGroup: 65534
fsGroup: 65534
seccompProfile: {type: RuntimeDefault}
{{- end -}}

{{- define "cdl.containerSecurityContext" -}}
allowPrivilegeEscalation: false
capabilities: {drop: [ALL]}
{{- end -}}

{{- define "cdl.scheduling" -}}
{{- with .nodeSelector -}}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "cdl.pullSecrets" -}}
{{- with .Values.images.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The Triton servers' endpoints as the gateway takes them (JSON lists). */}}
{{- define "cdl.tritonHost" -}}
{{ include "cdl.fullname" . }}-triton
{{- end -}}
