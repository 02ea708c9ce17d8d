{{/* Expand the name of the chart. */}}
{{- define "embedstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* A default fully qualified app name (63 characters at most, DNS naming spec). */}}
{{- define "embedstream.fullname" -}}
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

{{- define "embedstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedstream.labels" -}}
helm.sh/chart: {{ include "embedstream.chart" . }}
{{ include "embedstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: embedstream
{{- end }}

{{- define "embedstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The consumer pods (the rebuild Job's pods are not among them). */}}
{{- define "embedstream.consumerSelectorLabels" -}}
{{ include "embedstream.selectorLabels" . }}
app.kubernetes.io/component: consumer
{{- end }}

{{- define "embedstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "embedstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "embedstream.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "embedstream.secretName" -}}
{{- default (include "embedstream.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "embedstream.sinkKind" -}}
{{- dig "sink" "kind" "qdrant-edge" .Values.config }}
{{- end }}

{{- define "embedstream.edge" -}}
{{- if eq (include "embedstream.sinkKind" .) "qdrant-edge" }}true{{ end }}
{{- end }}

{{/* Checks that stop rendering with a clear message. */}}
{{- define "embedstream.validate" -}}
{{- if and (include "embedstream.edge" .) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount is %d but config.sink.kind is qdrant-edge: a Qdrant Edge store is open in one process only, so the consumer must run as a single replica (set replicaCount: 1, or use sink.kind: qdrant with a server)" (int .Values.replicaCount)) }}
{{- end }}
{{- if and (include "embedstream.edge" .) .Values.keda.enabled }}
{{- fail "keda.enabled needs config.sink.kind: qdrant: a Qdrant Edge store is open in one process only, so the consumer cannot scale out" }}
{{- end }}
{{- if and (not (include "embedstream.edge" .)) (not (dig "sink" "url" "" .Values.config)) }}
{{- fail "config.sink.kind is qdrant: set config.sink.url to the Qdrant server (http(s)://host:6333)" }}
{{- end }}
{{- $inConfig := list }}
{{- if dig "kafka" "security" "sasl_password" "" .Values.config }}{{ $inConfig = append $inConfig "kafka.security.sasl_password" }}{{ end }}
{{- if dig "kafka" "security" "ssl_key_password" "" .Values.config }}{{ $inConfig = append $inConfig "kafka.security.ssl_key_password" }}{{ end }}
{{- if dig "kafka" "schema_registry" "basic_auth_password" "" .Values.config }}{{ $inConfig = append $inConfig "kafka.schema_registry.basic_auth_password" }}{{ end }}
{{- if dig "sink" "api_key" "" .Values.config }}{{ $inConfig = append $inConfig "sink.api_key" }}{{ end }}
{{- if dig "embed" "api_key" "" .Values.config }}{{ $inConfig = append $inConfig "embed.api_key" }}{{ end }}
{{- with $inConfig }}
{{- fail (printf "config.%s is a secret: set it through secrets.* or existingSecret, not in config (which becomes a ConfigMap)" (first .)) }}
{{- end }}
{{- if and .Values.secrets.schemaRegistryPassword (not .Values.existingSecret) (not (include "embedstream.schemaRegistry" .)) }}
{{- fail "secrets.schemaRegistryPassword is set but config.kafka.schema_registry is not: give the registry's url there (the password alone is never used)" }}
{{- end }}
{{- include "embedstream.validateRoutes" . }}
{{- $moved := dict "precision" "config.embed.precision" "min_cosine" "config.embed.quality_guard" }}
{{- range $key := list "precision" "min_cosine" }}
{{- if hasKey (dig "bulk" dict $.Values.config) $key }}
{{- fail (printf "config.bulk.%s has moved to %s: one backend and precision for the stream and the rebuild (README, \"Backends and precision\")" $key (get $moved $key)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* With config.routes, each route names its topics, source and collection: the
     settings refuse the top-level ones (which the chart's defaults leave unset). */}}
{{- define "embedstream.validateRoutes" -}}
{{- $routes := dig "routes" (list) .Values.config }}
{{- if $routes }}
{{- $given := list }}
{{- if hasKey (dig "kafka" dict .Values.config) "topics" }}{{ $given = append $given "config.kafka.topics" }}{{ end }}
{{- if hasKey (dig "kafka" dict .Values.config) "topic_pattern" }}{{ $given = append $given "config.kafka.topic_pattern" }}{{ end }}
{{- if hasKey .Values.config "source" }}{{ $given = append $given "config.source" }}{{ end }}
{{- if hasKey (dig "sink" dict .Values.config) "collection" }}{{ $given = append $given "config.sink.collection" }}{{ end }}
{{- with $given }}
{{- fail (printf "config.routes is set, and so is %s: with routes, each route gives its own topics (or topic_pattern), source and collection; remove the top-level %s" (join ", " .) (join ", " .)) }}
{{- end }}
{{- if .Values.rebuild.enabled }}
{{- /* As the command does: --route names a route or its collection; without it, a
     --collection that is a route's collection picks that route. */}}
{{- $route := .Values.rebuild.route }}
{{- $collection := .Values.rebuild.collection }}
{{- $names := list }}
{{- $found := false }}
{{- range $routes }}
{{- $names = append $names (printf "%v" .name) }}
{{- if $route }}
{{- if or (eq (printf "%v" .name) $route) (eq (printf "%v" .collection) $route) }}{{ $found = true }}{{ end }}
{{- else if and $collection (eq (printf "%v" .collection) $collection) }}{{ $found = true }}
{{- end }}
{{- end }}
{{- if and .Values.rebuild.route (not $found) }}
{{- fail (printf "rebuild.route is %q, which is no route's name or collection (routes: %s)" .Values.rebuild.route (join ", " $names)) }}
{{- end }}
{{- if and (gt (len $routes) 1) (not $found) }}
{{- fail (printf "rebuild.enabled with %d routes: set rebuild.route to the one to rebuild (one of %s)" (len $routes) (join ", " $names)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when config.kafka.schema_registry is given. */}}
{{- define "embedstream.schemaRegistry" -}}
{{- if dig "kafka" "schema_registry" dict .Values.config }}true{{ end }}
{{- end }}

{{/* The data directory of the Edge store. */}}
{{- define "embedstream.sinkPath" -}}
{{- dig "sink" "path" (printf "%s/data" .Values.persistence.mountPath) .Values.config }}
{{- end }}

{{/* "true" when the local model embeds (not a remote API): it keeps a backend
     decision and exported graphs in embed.cache_dir. */}}
{{- define "embedstream.localModel" -}}
{{- if ne (dig "embed" "provider" "local" .Values.config) "openai" }}true{{ end }}
{{- end }}

{{/* "true" when the chart gives embed.cache_dir an emptyDir of its own: a local
     model, no cache_dir in config.embed, and no Edge volume to keep it on. */}}
{{- define "embedstream.embedCacheEmptyDir" -}}
{{- if and (include "embedstream.localModel" .) (not (dig "embed" "cache_dir" "" .Values.config)) (not (include "embedstream.edge" .)) }}true{{ end }}
{{- end }}

{{/* embed.cache_dir: config.embed's own, else a directory on the Edge store's
     volume (kept across restarts, shared with the rebuild Job), else the emptyDir. */}}
{{- define "embedstream.embedCacheDir" -}}
{{- if dig "embed" "cache_dir" "" .Values.config }}
{{- dig "embed" "cache_dir" "" .Values.config }}
{{- else if include "embedstream.edge" . }}
{{- printf "%s/%s" (trimSuffix "/" .Values.persistence.mountPath) .Values.embedCache.subPath }}
{{- else }}
{{- .Values.embedCache.mountPath }}
{{- end }}
{{- end }}

{{/* config.yaml: .Values.config with metrics on the container port and the paths the pod can write. */}}
{{- define "embedstream.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $metrics := default dict (get $cfg "metrics") }}
{{- $_ := set $metrics "enabled" true }}
{{- $_ = set $metrics "port" (int .Values.metricsPort) }}
{{- /* Probes and scrapes come to the pod IP: never the app's loopback default. */}}
{{- $_ = set $metrics "host" (default "0.0.0.0" (get $metrics "host")) }}
{{- $_ = set $cfg "metrics" $metrics }}
{{- $sink := default dict (get $cfg "sink") }}
{{- $_ = set $sink "kind" (include "embedstream.sinkKind" .) }}
{{- if include "embedstream.edge" . }}
{{- $_ = set $sink "path" (include "embedstream.sinkPath" .) }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.persistence.mountPath)) (include "embedstream.sinkPath" .)) }}
{{- fail (printf "config.sink.path (%s) must lie under persistence.mountPath (%s), the only writable volume for the Edge store" (include "embedstream.sinkPath" .) .Values.persistence.mountPath) }}
{{- end }}
{{- else }}
{{- $bulk := default dict (get $cfg "bulk") }}
{{- if not (get $bulk "state_dir") }}
{{- $_ = set $bulk "state_dir" "/tmp/embedstream-rebuild" }}
{{- $_ = set $cfg "bulk" $bulk }}
{{- end }}
{{- end }}
{{- $_ = set $cfg "sink" $sink }}
{{- if include "embedstream.localModel" . }}
{{- $embed := default dict (get $cfg "embed") }}
{{- $_ = set $embed "cache_dir" (include "embedstream.embedCacheDir" .) }}
{{- $_ = set $cfg "embed" $embed }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* The fields of `secrets` (and existingSecretKeys), in the order of the env list. */}}
{{- define "embedstream.secretFields" -}}
saslPassword sslKeyPassword sinkApiKey embedApiKey schemaRegistryPassword
{{- end }}

{{/* EMBEDSTREAM_* credentials from the Secret: only those set (chart Secret) or named
     (existingSecret). The registry's password only with config.kafka.schema_registry:
     alone it would make the settings ask for the registry's url. */}}
{{- define "embedstream.secretEnv" -}}
{{- $env := dict "saslPassword" "EMBEDSTREAM_KAFKA__SECURITY__SASL_PASSWORD" "sslKeyPassword" "EMBEDSTREAM_KAFKA__SECURITY__SSL_KEY_PASSWORD" "sinkApiKey" "EMBEDSTREAM_SINK__API_KEY" "embedApiKey" "EMBEDSTREAM_EMBED__API_KEY" "schemaRegistryPassword" "EMBEDSTREAM_KAFKA__SCHEMA_REGISTRY__BASIC_AUTH_PASSWORD" }}
{{- range $field := splitList " " (include "embedstream.secretFields" $) }}
{{- if and (eq $field "schemaRegistryPassword") (not (include "embedstream.schemaRegistry" $)) }}
{{- else if $.Values.existingSecret }}
{{- $key := get $.Values.existingSecretKeys $field }}
{{- if $key }}
- name: {{ get $env $field }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.existingSecret }}
      key: {{ $key }}
      optional: true
{{- end }}
{{- else if get $.Values.secrets $field }}
- name: {{ get $env $field }}
  valueFrom:
    secretKeyRef:
      name: {{ include "embedstream.fullname" $ }}
      key: {{ kebabcase $field }}
{{- end }}
{{- end }}
{{- end }}

{{- define "embedstream.hasChartSecret" -}}
{{- if not .Values.existingSecret }}
{{- range $field := splitList " " (include "embedstream.secretFields" $) }}
{{- if get $.Values.secrets $field }}true{{ end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Resources, with the GPU limit when gpu.enabled. */}}
{{- define "embedstream.resources" -}}
{{- $res := deepCopy (.resources | default dict) }}
{{- if .root.Values.gpu.enabled }}
{{- $limits := default dict (get $res "limits") }}
{{- $_ := set $limits .root.Values.gpu.resourceName (int .root.Values.gpu.count) }}
{{- $_ = set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Pod volumes shared by the consumer and the rebuild Job. */}}
{{- define "embedstream.volumes" -}}
- name: config
  configMap:
    name: {{ include "embedstream.fullname" . }}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmp.sizeLimit }}
- name: hf-cache
  emptyDir:
    sizeLimit: {{ .Values.hfCache.sizeLimit }}
{{- if include "embedstream.embedCacheEmptyDir" . }}
- name: embed-cache
  emptyDir:
    sizeLimit: {{ .Values.embedCache.sizeLimit }}
{{- end }}
{{- if include "embedstream.edge" . }}
- name: data
{{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim | default (include "embedstream.fullname" .) }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}
{{- if .Values.kafkaTls.secretName }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafkaTls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "embedstream.volumeMounts" -}}
- name: config
  mountPath: /etc/embedstream/config.yaml
  subPath: config.yaml
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: hf-cache
  mountPath: {{ .Values.hfCache.mountPath }}
{{- if include "embedstream.embedCacheEmptyDir" . }}
- name: embed-cache
  mountPath: {{ .Values.embedCache.mountPath }}
{{- end }}
{{- if include "embedstream.edge" . }}
- name: data
  mountPath: {{ .Values.persistence.mountPath }}
{{- end }}
{{- if .Values.kafkaTls.secretName }}
- name: kafka-tls
  mountPath: {{ .Values.kafkaTls.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "embedstream.env" -}}
- name: HF_HOME
  value: {{ .Values.hfCache.mountPath | quote }}
{{- include "embedstream.secretEnv" . }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
