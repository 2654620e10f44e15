{{/* What each service adds to its environment beyond cdl.commonEnv and cdl.serviceEnv: the same
     variables compose passes it (deploy/compose.yml). (dict "root" $ "name" "ingest") */}}
{{- define "cdl.ownEnv" -}}
{{- $v := index .root.Values .name -}}
{{- if eq .name "ingest" -}}
- name: CDL_INGEST_GRPC_HOST
  value: 0.0.0.0
- name: CDL_INGEST_TLS_CERT_FILE
  value: /etc/cdl/server/public.crt
- name: CDL_INGEST_TLS_KEY_FILE
  value: /etc/cdl/server/private.key
- name: CDL_INGEST_GRPC_PORT
  value: {{ $v.service.grpcPort | quote }}
- name: CDL_INGEST_API_KEY_HASHES
  value: {{ $v.apiKeyHashes | toJson | quote }}
{{- else if eq .name "trainer" -}}
- name: CDL_TRAINER_DEVICE
  value: auto
{{- else if eq .name "tuner" -}}
{{ include "cdl.secretEnv" (dict "name" "CDL_TUNER_STORAGE_URL" "secret" .root.Values.secrets.tuner "key" "storage-url") }}
- name: CDL_TUNER_WORKERS
  value: {{ $v.workers | quote }}
{{- else if eq .name "compressor" -}}
- name: CDL_COMPRESSOR_TRITON_BACKEND
  value: {{ $v.tritonBackend | quote }}
- name: CDL_COMPRESSOR_SIGNING_KEY_FILE
  value: /run/secrets/model-signing-key
{{- else if eq .name "gateway" -}}
{{- $triton := include "cdl.tritonHost" .root -}}
- name: CDL_GATEWAY_GRPC_HOST
  value: 0.0.0.0
- name: CDL_GATEWAY_TLS_CERT_FILE
  value: /etc/cdl/server/public.crt
- name: CDL_GATEWAY_TLS_KEY_FILE
  value: /etc/cdl/server/private.key
- name: CDL_GATEWAY_GRPC_PORT
  value: {{ $v.service.grpcPort | quote }}
- name: CDL_GATEWAY_HTTP_PORT
  value: {{ $v.service.httpPort | quote }}
- name: CDL_GATEWAY_TRITON_GRPC
  value: {{ list (printf "%s:8001" $triton) | toJson | quote }}
- name: CDL_GATEWAY_TRITON_HTTP
  value: {{ list (printf "%s:8000" $triton) | toJson | quote }}
- name: CDL_GATEWAY_API_KEY_HASHES
  value: {{ $v.apiKeyHashes | toJson | quote }}
- name: CDL_GATEWAY_ADMIN_KEY_HASHES
  value: {{ $v.adminKeyHashes | toJson | quote }}
- name: CDL_GATEWAY_TRUSTED_KEYS
  value: {{ $v.trustedKeys | toJson | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A service's container: image, environment, ports, probes, mounts. (dict "root" $ "name" "ingest") */}}
{{- define "cdl.container" -}}
{{- $v := index .root.Values .name -}}
- name: {{ .name }}
  image: {{ include "cdl.image" (dict "root" .root "svc" $v) }}
  imagePullPolicy: {{ .root.Values.images.pullPolicy }}
  env:
    {{- include "cdl.commonEnv" .root | nindent 4 }}
    {{- include "cdl.serviceEnv" . | nindent 4 }}
    {{- with include "cdl.ownEnv" . }}{{ . | nindent 4 }}{{ end }}
  ports:
    - {name: metrics, containerPort: 9100, protocol: TCP}
    {{- if eq .name "ingest" }}
    - {name: grpc, containerPort: {{ $v.service.grpcPort }}, protocol: TCP}
    {{- else if eq .name "gateway" }}
    - {name: grpc, containerPort: {{ $v.service.grpcPort }}, protocol: TCP}
    - {name: http, containerPort: {{ $v.service.httpPort }}, protocol: TCP}
    {{- end }}
  {{- include "cdl.probes" .root | nindent 2 }}
  resources:
    {{- $res := deepCopy $v.resources }}
    {{- if gt (int ($v.gpus | default 0)) 0 }}
    {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $v.gpus) ($res.limits | default dict)) }}
    {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" $v.gpus) ($res.requests | default dict)) }}
    {{- end }}
    {{- toYaml $res | nindent 4 }}
  securityContext:
    {{- include "cdl.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    - {name: state, mountPath: /var/lib/cdl}
    - {name: trust, mountPath: /etc/cdl/tls, readOnly: true}
    {{- if or (eq .name "ingest") (eq .name "gateway") }}
    - {name: server-tls, mountPath: /etc/cdl/server, readOnly: true}
    {{- end }}
    {{- if eq .name "compressor" }}
    - {name: model-signing-key, mountPath: /run/secrets/model-signing-key, subPath: model-signing-key, readOnly: true}
    {{- end }}
{{- end -}}

{{/* The pod's volumes but its state (a claim in a StatefulSet). (dict "root" $ "name" "ingest") */}}
{{- define "cdl.volumes" -}}
{{- include "cdl.trustVolume" .root }}
{{- if or (eq .name "ingest") (eq .name "gateway") }}
- name: server-tls
  secret:
    secretName: {{ index .root.Values.secrets (printf "%sTls" .name) }}
    defaultMode: 0440
    items:
      - {key: tls.crt, path: public.crt}
      - {key: tls.key, path: private.key}
{{- end }}
{{- if eq .name "compressor" }}
- name: model-signing-key
  secret:
    secretName: {{ .root.Values.secrets.modelSigning.name }}
    defaultMode: 0440
    items:
      - {key: {{ .root.Values.secrets.modelSigning.key | quote }}, path: model-signing-key}
{{- end }}
{{- end -}}
