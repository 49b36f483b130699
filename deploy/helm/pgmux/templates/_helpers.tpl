{{/* Names and labels. */}}
{{- define "pgmux.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pgmux.fullname" -}}
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

{{- define "pgmux.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgmux.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pgmux.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pgmux.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pgmux.secretName" -}}
{{- default (include "pgmux.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{- define "pgmux.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "pgmux.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/*
A whole number from values: (list "name.in.values" value). YAML numbers arrive as
float64, --set ones as int64; strings such as "25%" and fractions are refused.
*/}}
{{- define "pgmux.int" -}}
{{- $name := index . 0 }}
{{- $v := index . 1 }}
{{- if not (or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v)) }}
{{- fail (printf "pgmux: %s must be a whole number, got %v" $name $v) }}
{{- end }}
{{- if or (ne (float64 (int64 $v)) (float64 $v)) (lt (int64 $v) 0) }}
{{- fail (printf "pgmux: %s must be a whole number >= 0, got %v" $name $v) }}
{{- end }}
{{- int64 $v }}
{{- end }}

{{/* An environment variable name for a user or database name: PGMUX_<PREFIX>_<NAME>. */}}
{{- define "pgmux.envName" -}}
{{- $prefix := index . 0 }}
{{- $name := index . 1 }}
{{- printf "PGMUX_%s_%s" $prefix (regexReplaceAll "[^A-Z0-9_]" (upper $name) "_") }}
{{- end }}

{{/* A name that may be part of a Secret key (user-NAME-password). */}}
{{- define "pgmux.checkKeyName" -}}
{{- $what := index . 0 }}
{{- $name := index . 1 }}
{{- if not (regexMatch "^[-._a-zA-Z0-9]+$" $name) }}
{{- fail (printf "pgmux: %s %q: only letters, digits, '-', '_' and '.' can be part of its Secret key" $what $name) }}
{{- end }}
{{- end }}

{{/*
A TOML value: strings as basic strings (JSON escapes are TOML escapes; "${" is written
"$${" so pgmux does not read it as an environment variable), numbers, booleans, arrays.
*/}}
{{- define "pgmux.toml" -}}
{{- $v := . }}
{{- if kindIs "string" $v }}
{{- replace "${" "$${" $v | toJson }}
{{- else if kindIs "bool" $v }}
{{- $v }}
{{- else if or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v) }}
{{- if eq (float64 (int64 $v)) (float64 $v) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else if kindIs "slice" $v }}
{{- $items := list }}
{{- range $v }}{{ $items = append $items (include "pgmux.toml" .) }}{{ end }}
{{- printf "[%s]" (join ", " $items) }}
{{- else }}
{{- fail (printf "pgmux: cannot write %v (%s) as a TOML value; tables go in their own section" $v (kindOf $v)) }}
{{- end }}
{{- end }}

{{/* key = value lines of a map, sorted; (list map "section" forbiddenKeys). */}}
{{- define "pgmux.tomlKeys" -}}
{{- $m := index . 0 }}
{{- $section := index . 1 }}
{{- $forbidden := index . 2 }}
{{- range $k := keys $m | sortAlpha }}
{{- if has $k $forbidden }}
{{- fail (printf "pgmux: %s.%s is set by the chart (see values.yaml); remove it from the values" $section $k) }}
{{- end }}
{{ $k }} = {{ include "pgmux.toml" (index $m $k) }}
{{- end }}
{{- end }}

{{/* Seconds of the drain, from values. */}}
{{- define "pgmux.preStopSeconds" -}}
{{- include "pgmux.int" (list "drain.preStopSleepSeconds" .Values.drain.preStopSleepSeconds) }}
{{- end }}
{{- define "pgmux.drainDelaySeconds" -}}
{{- include "pgmux.int" (list "drain.delaySeconds" .Values.drain.delaySeconds) }}
{{- end }}
{{- define "pgmux.shutdownTimeoutSeconds" -}}
{{- $s := include "pgmux.int" (list "drain.shutdownTimeoutSeconds" .Values.drain.shutdownTimeoutSeconds) | int }}
{{- if lt $s 1 }}{{ fail "pgmux: drain.shutdownTimeoutSeconds must be at least 1" }}{{ end }}
{{- $s }}
{{- end }}

{{/*
terminationGracePeriodSeconds: preStop sleep + drain_delay + shutdown_timeout + margin,
strictly more than the time pgmux may take after SIGTERM.
*/}}
{{- define "pgmux.graceSeconds" -}}
{{- $margin := include "pgmux.int" (list "drain.graceMarginSeconds" .Values.drain.graceMarginSeconds) | int }}
{{- if lt $margin 1 }}
{{- fail "pgmux: drain.graceMarginSeconds must be at least 1: Kubernetes would kill pgmux while it still finishes transactions" }}
{{- end }}
{{- add (include "pgmux.preStopSeconds" . | int) (include "pgmux.drainDelaySeconds" . | int) (include "pgmux.shutdownTimeoutSeconds" . | int) $margin }}
{{- end }}

{{/*
Pods that can hold server connections at once: the most replicas (autoscaling.maxReplicas
when an autoscaler scales the Deployment), plus the surge pods of a rolling update, plus
the pods that are terminating (still draining) while their replacements start.
*/}}
{{- define "pgmux.podsAtOnce" -}}
{{- $replicas := include "pgmux.int" (list "replicaCount" .Values.replicaCount) | int }}
{{- if .Values.autoscaling.enabled }}
{{- $replicas = include "pgmux.int" (list "autoscaling.maxReplicas" .Values.autoscaling.maxReplicas) | int }}
{{- end }}
{{- if lt $replicas 1 }}{{ fail "pgmux: replicaCount (or autoscaling.maxReplicas) must be at least 1" }}{{ end }}
{{- $surge := include "pgmux.int" (list "rollingUpdate.maxSurge" .Values.rollingUpdate.maxSurge) | int }}
{{- $unavailable := include "pgmux.int" (list "rollingUpdate.maxUnavailable" .Values.rollingUpdate.maxUnavailable) | int }}
{{- if and (eq $surge 0) (eq $unavailable 0) }}
{{- fail "pgmux: rollingUpdate.maxSurge and maxUnavailable cannot both be 0" }}
{{- end }}
{{- add $replicas $surge $unavailable }}
{{- end }}

{{/*
Each database's server connection budget, as JSON {"NAME": {"total": T, "perPod": P}}:
databases with their own connectionBudget take it, the others share the rest of the
total equally; each pod gets floor(T / podsAtOnce). Fails when a database's budget is
below the number of pods (a pod would get 0 connections, which pgmux reads as unlimited).
*/}}
{{- define "pgmux.budgets" -}}
{{- $total := include "pgmux.int" (list "connectionBudget" .Values.connectionBudget) | int }}
{{- $pods := include "pgmux.podsAtOnce" . | int }}
{{- if not .Values.databases }}{{ fail "pgmux: databases is empty: name at least one database" }}{{ end }}
{{- $explicit := 0 }}
{{- $shared := list }}
{{- range $name, $db := .Values.databases }}
{{- $db = default dict $db }}
{{- if hasKey $db "connectionBudget" }}
{{- $explicit = add $explicit (include "pgmux.int" (list (printf "databases.%s.connectionBudget" $name) $db.connectionBudget) | int) }}
{{- else }}
{{- $shared = append $shared $name }}
{{- end }}
{{- end }}
{{- if gt $explicit $total }}
{{- fail (printf "pgmux: the databases' own connectionBudget values add up to %d, more than connectionBudget (%d)" $explicit $total) }}
{{- end }}
{{- $out := dict }}
{{- range $name, $db := .Values.databases }}
{{- $db = default dict $db }}
{{- $t := 0 }}
{{- if hasKey $db "connectionBudget" }}
{{- $t = int $db.connectionBudget }}
{{- else }}
{{- $t = div (sub $total $explicit) (len $shared) }}
{{- end }}
{{- if lt $t $pods }}
{{- fail (printf "pgmux: database %q has a server connection budget of %d, less than the %d pgmux pods that can run at once (replicas + maxSurge + maxUnavailable): each would get 0 connections. Raise connectionBudget or lower replicaCount" $name $t $pods) }}
{{- end }}
{{- $_ := set $out $name (dict "total" $t "perPod" (div $t $pods)) }}
{{- end }}
{{- toJson $out }}
{{- end }}
