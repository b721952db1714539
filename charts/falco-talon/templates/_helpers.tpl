{{/* Names */}}
{{- define "falco-talon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "falco-talon.fullname" -}}
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

{{- define "falco-talon.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "falco-talon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "falco-talon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "falco-talon.labels" -}}
helm.sh/chart: {{ include "falco-talon.chart" . }}
{{ include "falco-talon.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: response-engine
app.kubernetes.io/part-of: falco
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "falco-talon.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "falco-talon.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "falco-talon.secretName" -}}
{{- default (include "falco-talon.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "falco-talon.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The bundled NATS server (nats.deploy): its names and labels. */}}
{{- define "falco-talon.nats.fullname" -}}
{{- printf "%s-nats" (include "falco-talon.fullname" . | trunc 52 | trimSuffix "-") }}
{{- end }}

{{- define "falco-talon.nats.selectorLabels" -}}
app.kubernetes.io/name: {{ include "falco-talon.name" . | trunc 58 | trimSuffix "-" }}-nats
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "falco-talon.nats.labels" -}}
helm.sh/chart: {{ include "falco-talon.chart" . }}
{{ include "falco-talon.nats.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.nats.deploy.image.tag | quote }}
app.kubernetes.io/component: queue
app.kubernetes.io/part-of: falco
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The NATS URL falco-talon uses: nats.url, or the bundled server's client Service (its pinned
ClusterIP when nats.deploy.service.clusterIP is set, else its DNS name); empty: none, the
in-memory queue of one process.
*/}}
{{- define "falco-talon.natsUrl" -}}
{{- $nats := .Values.nats }}
{{- if $nats.deploy.enabled }}
{{- if $nats.url }}
{{- fail "nats.url and nats.deploy.enabled are both set: use a NATS server of yours (nats.url) or the chart's (nats.deploy.enabled), not both" }}
{{- end }}
{{- $host := printf "%s.%s.svc" (include "falco-talon.nats.fullname" .) .Release.Namespace }}
{{- with $nats.deploy.service.clusterIP }}{{ $host = . }}{{ end }}
{{- printf "nats://%s:%d" $host (int $nats.deploy.service.port) }}
{{- else }}
{{- $nats.url }}
{{- end }}
{{- end }}

{{/*
Values that cannot work together fail the install here, with the reason (included by the
Deployment, so `helm template` fails too).
*/}}
{{- define "falco-talon.validate" -}}
{{- $nats := .Values.nats }}
{{- $url := include "falco-talon.natsUrl" . }}
{{- if and (gt (int .Values.replicaCount) 1) (not $url) }}
{{- fail (printf "replicaCount: %d needs a queue the replicas share: set nats.url (a NATS server with JetStream) or nats.deploy.enabled=true (one run by the chart). With the in-memory queue each replica would deduplicate and throttle on its own: the same event sent twice, or a storm spread over the replicas, would be acted on by each of them" (int .Values.replicaCount)) }}
{{- end }}
{{- if and (not $url) (or $nats.auth.tokenSecretName $nats.auth.nkeySecretName $nats.tls.caSecretName $nats.tls.certSecretName) }}
{{- fail "nats.auth / nats.tls name Secrets but no NATS server is configured: set nats.url or nats.deploy.enabled" }}
{{- end }}
{{- if and $nats.auth.tokenSecretName $nats.auth.nkeySecretName }}
{{- fail "nats.auth.tokenSecretName and nats.auth.nkeySecretName: NATS takes one way to authenticate, set one" }}
{{- end }}
{{- if and $nats.deploy.enabled $nats.auth.nkeySecretName }}
{{- fail "nats.auth.nkeySecretName with nats.deploy.enabled: the chart's NATS server authenticates with a token (nats.auth.tokenSecretName); NKEYs are for a NATS server of yours (nats.url)" }}
{{- end }}
{{- if and $nats.deploy.enabled (or $nats.tls.caSecretName $nats.tls.certSecretName) }}
{{- fail "nats.tls with nats.deploy.enabled: the chart's NATS server speaks plain nats:// inside the cluster (use nats.auth.tokenSecretName, and a NetworkPolicy); for TLS run a NATS server of yours and set nats.url" }}
{{- end }}
{{- end }}

{{/*
The configuration file, as rendered into the Secret. kubeConfig is forced empty (in-cluster
credentials) and rulesFile to the rules ConfigMap's mount (the command line passes the same
directory).
*/}}
{{- define "falco-talon.config" -}}
{{- $config := deepCopy (.Values.config | default dict) }}
{{- $_ := set $config "kubeConfig" "" }}
{{- $_ := set $config "rulesFile" (list "/etc/falco-talon/rules/") }}
{{- /* One server process per CPU of the container's CPU limit (the server reads the cgroup
quota: "auto"); without a limit, the server's default (one), not one per CPU of the node. */}}
{{- if and (not (hasKey $config "processes")) ((.Values.resources | default dict).limits | default dict).cpu }}
{{- $_ := set $config "processes" "auto" }}
{{- end }}
{{- /* The Secrets of tls and auth are mounted as directories (rotation reaches them). */}}
{{- if .Values.tls.secretName }}
{{- $tls := deepCopy ($config.tls | default dict) }}
{{- $_ := set $tls "certFile" "/etc/falco-talon/tls/tls.crt" }}
{{- $_ := set $tls "keyFile" "/etc/falco-talon/tls/tls.key" }}
{{- if .Values.tls.clientCASecretName }}
{{- $_ := set $tls "clientCAFile" (printf "/etc/falco-talon/client-ca/%s" .Values.tls.clientCAKey) }}
{{- end }}
{{- $_ := set $config "tls" $tls }}
{{- else if .Values.tls.clientCASecretName }}
{{- fail "tls.clientCASecretName (mutual TLS) needs tls.secretName (the server's certificate)" }}
{{- end }}
{{- if .Values.auth.tokenSecretName }}
{{- $auth := deepCopy ($config.auth | default dict) }}
{{- $_ := set $auth "tokenFile" (printf "/etc/falco-talon/auth/%s" .Values.auth.tokenKey) }}
{{- $_ := set $config "auth" $auth }}
{{- end }}
{{- /* The collector's CA and our client certificate (otel.tlsSecretName), a directory too. */}}
{{- if .Values.otel.tlsSecretName }}
{{- $otel := deepCopy ($config.otel | default dict) }}
{{- $_ := set $otel "certificate" (printf "/etc/falco-talon/otel-tls/%s" .Values.otel.caKey) }}
{{- if .Values.otel.clientCertificate }}
{{- $_ := set $otel "clientCertificate" "/etc/falco-talon/otel-tls/tls.crt" }}
{{- $_ := set $otel "clientKey" "/etc/falco-talon/otel-tls/tls.key" }}
{{- end }}
{{- $_ := set $config "otel" $otel }}
{{- else if .Values.otel.clientCertificate }}
{{- fail "otel.clientCertificate needs otel.tlsSecretName (the Secret holding tls.crt and tls.key)" }}
{{- end }}
{{- /* The nats section is the chart's: from nats.*, its Secrets mounted as directories. */}}
{{- $url := include "falco-talon.natsUrl" . }}
{{- if $url }}
{{- $n := .Values.nats }}
{{- $nats := dict "url" $url "stream" $n.stream "subject" $n.subject "ackWait" $n.ackWait "maxDeliver" $n.maxDeliver }}
{{- if $n.auth.tokenSecretName }}
{{- $_ := set $nats "tokenFile" (printf "/etc/falco-talon/nats/auth/%s" $n.auth.tokenKey) }}
{{- end }}
{{- if $n.auth.nkeySecretName }}
{{- $_ := set $nats "nkeySeedFile" (printf "/etc/falco-talon/nats/nkey/%s" $n.auth.nkeyKey) }}
{{- end }}
{{- $natsTls := dict }}
{{- if $n.tls.caSecretName }}
{{- $_ := set $natsTls "caFile" (printf "/etc/falco-talon/nats/ca/%s" $n.tls.caKey) }}
{{- end }}
{{- if $n.tls.certSecretName }}
{{- $_ := set $natsTls "certFile" "/etc/falco-talon/nats/tls/tls.crt" }}
{{- $_ := set $natsTls "keyFile" "/etc/falco-talon/nats/tls/tls.key" }}
{{- end }}
{{- if $natsTls }}
{{- $_ := set $nats "tls" $natsTls }}
{{- end }}
{{- $_ := set $config "nats" $nats }}
{{- end }}
{{- if and .Values.tls.clientCASecretName (not (.Values.config | default dict).probesPort) }}
{{- fail "mutual TLS (tls.clientCASecretName) needs config.probesPort: the kubelet's probes and Prometheus have no client certificate" }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/*
The port the probes and /metrics use: config.probesPort's "probes" port when set, else "http".
*/}}
{{- define "falco-talon.probesPortName" -}}
{{- if (.Values.config | default dict).probesPort }}probes{{ else }}http{{ end }}
{{- end }}

{{/*
The probes' scheme: HTTPS when the listen port serves TLS and the probes share it.
*/}}
{{- define "falco-talon.probesScheme" -}}
{{- if and .Values.tls.secretName (not (.Values.config | default dict).probesPort) }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/*
The ClusterRole's rules: the union of what files/rbac-declarations.yaml (the output of
`falco-talon rbac --declarations`) declares for each actionner the rules name (action.name)
and each notifier in use (the rules' `notifiers` plus config.defaultNotifiers). Verbs are
merged per (apiGroup, resource); resources of one API group that need the same verbs are
grouped into one rule, as engine/rbac.py's merge() does. An actionner or notifier that the
declarations do not know fails the install: its permissions would be unknown.
*/}}
{{- define "falco-talon.rbacRules" -}}
{{- $decl := .Files.Get "files/rbac-declarations.yaml" | fromYaml }}
{{- if or (not $decl) (hasKey $decl "Error") }}
{{- fail "files/rbac-declarations.yaml is missing or unreadable" }}
{{- end }}
{{- $all := concat (.Values.rules | default list) (.Values.rulesOverride | default list) }}
{{- $actionners := list }}
{{- $notifiers := list }}
{{- range $all }}
{{- if and (kindIs "map" .) (kindIs "map" .action) .action.name }}
{{- $actionners = append $actionners .action.name }}
{{- end }}
{{- if kindIs "map" . }}
{{- range (.notifiers | default list) }}
{{- $notifiers = append $notifiers . }}
{{- end }}
{{- end }}
{{- end }}
{{- $default := (.Values.config | default dict).defaultNotifiers | default list }}
{{- if kindIs "string" $default }}
{{- $default = splitList "," $default }}
{{- end }}
{{- range $default }}
{{- if trim . }}
{{- $notifiers = append $notifiers (trim .) }}
{{- end }}
{{- end }}
{{- $declared := list }}
{{- range ($actionners | uniq | sortAlpha) }}
{{- if not (hasKey $decl.actionners .) }}
{{- fail (printf "rules use actionner %q, which files/rbac-declarations.yaml does not declare (known: %s)" . (keys $decl.actionners | sortAlpha | join ", ")) }}
{{- end }}
{{- $declared = concat $declared (get $decl.actionners . | default list) }}
{{- end }}
{{- range ($notifiers | uniq | sortAlpha) }}
{{- if not (hasKey $decl.notifiers .) }}
{{- fail (printf "notifier %q is used but files/rbac-declarations.yaml does not declare it (known: %s)" . (keys $decl.notifiers | sortAlpha | join ", ")) }}
{{- end }}
{{- $declared = concat $declared (get $decl.notifiers . | default list) }}
{{- end }}
{{- /* (apiGroup, resource) -> verbs */}}
{{- $verbs := dict }}
{{- range $declared }}
{{- $rule := . }}
{{- range $rule.apiGroups }}
{{- $group := . }}
{{- range $rule.resources }}
{{- $key := printf "%s|%s" $group . }}
{{- $_ := set $verbs $key (concat (get $verbs $key | default list) $rule.verbs) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* (apiGroup, verbs) -> resources */}}
{{- $grouped := dict }}
{{- range $key := keys $verbs | sortAlpha }}
{{- $parts := splitList "|" $key }}
{{- $vs := get $verbs $key | uniq | sortAlpha }}
{{- $gkey := printf "%s|%s" (index $parts 0) (join "," $vs) }}
{{- $_ := set $grouped $gkey (append (get $grouped $gkey | default list) (index $parts 1)) }}
{{- end }}
{{- $rules := list }}
{{- range $gkey := keys $grouped | sortAlpha }}
{{- $parts := splitList "|" $gkey }}
{{- $rules = append $rules (dict "apiGroups" (list (index $parts 0)) "resources" (get $grouped $gkey) "verbs" (splitList "," (index $parts 1))) }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{/*
The pods' affinity: .Values.affinity when set; else, with more than one replica, a preferred
anti-affinity on the node (a node lost takes one replica, not all); else none.
*/}}
{{- define "falco-talon.affinity" -}}
{{- if .Values.affinity }}
{{- toYaml .Values.affinity }}
{{- else if gt (int .Values.replicaCount) 1 }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "falco-talon.selectorLabels" . | nindent 12 }}
{{- end }}
{{- end }}
