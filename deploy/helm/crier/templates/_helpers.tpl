{{/* Names and labels. */}}
{{- define "crier.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "crier.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "crier.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crier.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "crier.labels" -}}
{{ include "crier.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "crier.redisName" -}}
{{- printf "%s-redis" (include "crier.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Secret holding CRIER_JWT_SECRET and CRIER_API_KEYS. */}}
{{- define "crier.authSecretName" -}}
{{- default (include "crier.fullname" .) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The CRIER_REDIS_* address values, checked: exactly what redis.mode asks for. */}}
{{- define "crier.redisAddress" -}}
{{- $r := .Values.redis -}}
{{- $has := dict "url" (ne (toString $r.url) "") "sentinel" (gt (len $r.sentinel.urls) 0) "cluster" (gt (len $r.cluster.urls) 0) -}}
{{- if eq (toString .Values.broker) "nats" -}}
{{- if or (ne $r.mode "internal") (get $has "url") (get $has "sentinel") (get $has "cluster") $r.tlsCa.secretName -}}
{{- fail "broker=nats: unset redis.* (one broker at a time; redis.* is for broker=redis)" -}}
{{- end -}}
{{- if and (not .Values.nats.urls) (not $.Values.auth.existingSecret) -}}
{{- fail "broker=nats needs its servers: set nats.urls (or put CRIER_NATS_URL in auth.existingSecret)" -}}
{{- end -}}
{{- if .Values.nats.urls }}CRIER_NATS_URL: {{ join "," .Values.nats.urls | quote }}{{ end }}
{{- else -}}
{{- if not (has $r.mode (list "internal" "url" "sentinel" "cluster")) -}}
{{- fail (printf "redis.mode is %q: it must be internal, url, sentinel or cluster" (toString $r.mode)) -}}
{{- end -}}
{{- range $mode := list "url" "sentinel" "cluster" -}}
{{- if and (get $has $mode) (ne $r.mode $mode) -}}
{{- fail (printf "redis.%s is set but redis.mode is %q: set redis.mode=%s (one Redis topology at a time)" $mode $r.mode $mode) -}}
{{- end -}}
{{- end -}}
{{- if and (ne $r.mode "internal") (not (get $has $r.mode)) (not $.Values.auth.existingSecret) -}}
{{- fail (printf "redis.mode=%s needs its address: set redis.%s (or put CRIER_REDIS_* in auth.existingSecret)" $r.mode (ternary "url" (printf "%s.urls" $r.mode) (eq $r.mode "url"))) -}}
{{- end -}}
{{- if and (eq $r.mode "sentinel") (not $r.sentinel.master) -}}
{{- fail "redis.mode=sentinel needs redis.sentinel.master (the master's name in `sentinel monitor <name> ...`)" -}}
{{- end -}}
{{- if eq $r.mode "url" }}{{ if $r.url }}CRIER_REDIS_URL: {{ $r.url | quote }}{{ end }}
{{- else if eq $r.mode "sentinel" }}{{ if $r.sentinel.urls }}CRIER_REDIS_SENTINEL_URLS: {{ join "," $r.sentinel.urls | quote }}{{ end }}
{{- else if eq $r.mode "cluster" }}{{ if $r.cluster.urls }}CRIER_REDIS_CLUSTER_URLS: {{ join "," $r.cluster.urls | quote }}{{ end }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* terminationGracePeriodSeconds from the drain values. */}}
{{- define "crier.terminationGrace" -}}
{{- $d := .Values.drain -}}
{{- add (int $d.preStopSeconds) (int $d.shutdownDrainSeconds) 10 (int $d.marginSeconds) -}}
{{- end -}}

{{/* The internal Redis's labels: a name of its own, so crier's selectors never match it. */}}
{{- define "crier.redisSelectorLabels" -}}
app.kubernetes.io/name: {{ include "crier.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}
