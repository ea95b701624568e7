{{/*
The chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "thumbup.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name that object names start with. It leaves room for the longest
suffix ("-operator-admin", 15 characters) within a 63-character DNS label.
*/}}
{{- define "thumbup.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 48 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "thumbup.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "thumbup.labels" -}}
helm.sh/chart: {{ include "thumbup.chart" . }}
app.kubernetes.io/name: {{ include "thumbup.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: thumbup
{{- end }}

{{/*
Selector labels of a component; call with (dict "ctx" $ "component" "operator").
These are immutable on a Deployment, so they hold no version.
*/}}
{{- define "thumbup.selectorLabels" -}}
app.kubernetes.io/name: {{ include "thumbup.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
Object names.
*/}}
{{- define "thumbup.operatorName" -}}
{{- printf "%s-operator" (include "thumbup.fullname" .) }}
{{- end }}

{{- define "thumbup.serviceName" -}}
{{- printf "%s-service" (include "thumbup.fullname" .) }}
{{- end }}

{{- define "thumbup.adminSecretName" -}}
{{- if .Values.datacenterSecret.existingSecret }}
{{- .Values.datacenterSecret.existingSecret }}
{{- else }}
{{- printf "%s-operator-admin" (include "thumbup.fullname" .) }}
{{- end }}
{{- end }}

{{- define "thumbup.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "thumbup.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "thumbup.serviceServiceAccountName" -}}
{{- if .Values.service.serviceAccount.create }}
{{- default (include "thumbup.serviceName" .) .Values.service.serviceAccount.name }}
{{- else }}
{{- required "service.serviceAccount.name is required when service.serviceAccount.create is false" .Values.service.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The ClusterRole (and its binding) is cluster-scoped: the namespace in its
name keeps two releases of the same name in different namespaces apart.
*/}}
{{- define "thumbup.clusterRoleName" -}}
{{- printf "%s-%s-operator" .Release.Namespace (include "thumbup.fullname" .) }}
{{- end }}

{{/*
The image reference, defaulting the tag to the chart's appVersion.
*/}}
{{- define "thumbup.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Where the operator finds its config and the admin passwords.
*/}}
{{- define "thumbup.operatorConfigDir" -}}/etc/thumbup-operator{{- end }}

{{/*
Fails the render on datacenter values the operator would refuse at start.
*/}}
{{- define "thumbup.validateDatacenters" -}}
{{- if not .Values.datacenters }}
{{- fail "datacenters: at least one datacenter is required" }}
{{- end }}
{{- $names := list }}
{{- range .Values.datacenters }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString .name)) }}
{{- fail (printf "datacenters: name %q must match [a-z0-9]([-a-z0-9]*[a-z0-9])?" (toString .name)) }}
{{- end }}
{{- if has .name $names }}
{{- fail (printf "datacenters: %s is listed twice" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- if not (hasPrefix "mysql://" (toString .db.url)) }}
{{- fail (printf "datacenters: %s: db.url must start with mysql://" .name) }}
{{- end }}
{{- if not (hasPrefix "redis" (toString .redis.url)) }}
{{- fail (printf "datacenters: %s: redis.url must start with redis:// or rediss://" .name) }}
{{- end }}
{{- if or (not .db.adminUsername) (not .redis.adminUsername) }}
{{- fail (printf "datacenters: %s: db.adminUsername and redis.adminUsername are required" .name) }}
{{- end }}
{{- end }}
{{- include "thumbup.validateAdminCredentials" . }}
{{- if not (has .Values.activeDatacenter $names) }}
{{- fail (printf "activeDatacenter %q is not one of datacenters (%s)" .Values.activeDatacenter (join ", " $names)) }}
{{- end }}
{{- end }}

{{/*
Fails the render unless the operator gets admin credentials: every
datacenter's DB and Redis admin password, or a Secret of the user's that
holds them. Empty passwords would install an operator that cannot create a
single tenant.
*/}}
{{- define "thumbup.validateAdminCredentials" -}}
{{- if not .Values.datacenterSecret.existingSecret }}
{{- range .Values.datacenters }}
{{- $dc := . }}
{{- range $store := list "db" "redis" }}
{{- $password := get (get $dc $store | default dict) "adminPassword" | default "" | toString | trim }}
{{- if not $password }}
{{- fail (printf "admin credentials are required: datacenter %s has an empty %s.adminPassword. Give every datacenter's db.adminPassword and redis.adminPassword (e.g. --set-file), or name a Secret of yours with the keys <dc>-db-password and <dc>-redis-password in datacenterSecret.existingSecret" (toString $dc.name) $store) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The operator config file (operator.yaml, snake_case), in the format of
operator/src/config.rs.
*/}}
{{- /*
Where the CA files are in every pod that uses them (operator, service,
jobs): one path each, which the operator config's tls.ca_file names.
*/ -}}
{{- define "thumbup.tlsDir" -}}/etc/thumbup/tls{{- end }}
{{- define "thumbup.dbCaFile" -}}{{ include "thumbup.tlsDir" . }}/db/ca.crt{{- end }}
{{- define "thumbup.redisCaFile" -}}{{ include "thumbup.tlsDir" . }}/redis/ca.crt{{- end }}

{{- /*
The CA Secrets' volume mounts and volumes (operator and service pods).
*/ -}}
{{- define "thumbup.caMounts" -}}
{{- if and .Values.tls.db.mode .Values.tls.db.caSecret }}
- name: db-ca
  mountPath: {{ include "thumbup.tlsDir" . }}/db
  readOnly: true
{{- end }}
{{- if .Values.tls.redis.caSecret }}
- name: redis-ca
  mountPath: {{ include "thumbup.tlsDir" . }}/redis
  readOnly: true
{{- end }}
{{- end }}
{{- define "thumbup.caVolumes" -}}
{{- if and .Values.tls.db.mode .Values.tls.db.caSecret }}
- name: db-ca
  secret:
    secretName: {{ .Values.tls.db.caSecret }}
    items:
      - key: {{ .Values.tls.db.caKey }}
        path: ca.crt
{{- end }}
{{- if .Values.tls.redis.caSecret }}
- name: redis-ca
  secret:
    secretName: {{ .Values.tls.redis.caSecret }}
    items:
      - key: {{ .Values.tls.redis.caKey }}
        path: ca.crt
{{- end }}
{{- end }}

{{- define "thumbup.operatorConfig" -}}
{{- include "thumbup.validateDatacenters" . }}
{{- $perDc := (.Values.topology | default dict).perDatacenter }}
{{- $_ := include "thumbup.placements" . }}
{{- $secrets := printf "%s/secrets" (include "thumbup.operatorConfigDir" .) -}}
active_datacenter: {{ .Values.activeDatacenter | quote }}
registry:
  config_map: {{ .Values.registry.configMap | quote }}
  secret: {{ .Values.registry.secret | quote }}
job:
  image: {{ include "thumbup.image" . | quote }}
  image_pull_policy: {{ .Values.image.pullPolicy | quote }}
  log_format: {{ .Values.logging.format | quote }}
  {{- with .Values.job.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if or (and .Values.tls.db.mode .Values.tls.db.caSecret) .Values.tls.redis.caSecret }}
  # Mounted into the job pods at the datacenters' tls.ca_file paths.
  ca_secrets:
    {{- if and .Values.tls.db.mode .Values.tls.db.caSecret }}
    - { secret: {{ .Values.tls.db.caSecret | quote }}, key: {{ .Values.tls.db.caKey | quote }}, file: {{ include "thumbup.dbCaFile" . | quote }} }
    {{- end }}
    {{- with .Values.tls.redis.caSecret }}
    - { secret: {{ . | quote }}, key: {{ $.Values.tls.redis.caKey | quote }}, file: {{ include "thumbup.redisCaFile" $ | quote }} }
    {{- end }}
  {{- end }}
db_proxy:
  enabled: {{ .Values.dbProxy.enabled }}
  {{- with .Values.dbProxy.image }}
  image: {{ . | quote }}
  {{- end }}
  port: {{ .Values.dbProxy.port }}
  admin_port: {{ .Values.dbProxy.adminPort }}
  redis_port: {{ .Values.dbProxy.redisPort | default 6379 }}
  {{- if $perDc }}
  local_port: {{ .Values.dbProxy.localPort | default 3307 }}
  local_redis_port: {{ .Values.dbProxy.localRedisPort | default 6380 }}
  {{- end }}
  {{- with .Values.dbProxy.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
failover:
  enabled: {{ .Values.failover.enabled }}
  route_config_map: {{ .Values.failover.routeConfigMap | quote }}
  probe_period_ms: {{ .Values.failover.probePeriodMs | int64 }}
  probe_timeout_ms: {{ .Values.failover.probeTimeoutMs | int64 }}
  failure_threshold: {{ .Values.failover.failureThreshold | int64 }}
  grace_period_ms: {{ .Values.failover.gracePeriodMs | int64 }}
  cap: {{ .Values.failover.cap | int64 }}
  cap_window_ms: {{ .Values.failover.capWindowMs | int64 }}
  replay_window_ms: {{ .Values.failover.replayWindowMs | int64 }}
  max_lag_ms: {{ .Values.failover.maxLagMs | int64 }}
  catch_up_timeout_ms: {{ .Values.failover.catchUpTimeoutMs | int64 }}
  redis_tier: {{ .Values.failover.redisTier | default false }}
{{- if $perDc }}
topology:
  per_datacenter: true
  zone_label: {{ .Values.topology.zoneLabel | quote }}
{{- end }}
datacenters:
{{- range .Values.datacenters }}
  - name: {{ .name | quote }}
    {{- if $perDc }}
    zone: {{ .zone | default .name | quote }}
    {{- end }}
    db:
      url: {{ .db.url | quote }}
      admin_username: {{ .db.adminUsername | quote }}
      admin_password_file: {{ printf "%s/%s-db-password" $secrets .name | quote }}
      {{- with $.Values.tls.db.mode }}
      tls:
        mode: {{ . | quote }}
        {{- if $.Values.tls.db.caSecret }}
        ca_file: {{ include "thumbup.dbCaFile" $ | quote }}
        {{- end }}
      {{- end }}
    redis:
      url: {{ .redis.url | quote }}
      admin_username: {{ .redis.adminUsername | quote }}
      admin_password_file: {{ printf "%s/%s-redis-password" $secrets .name | quote }}
      {{- if .redis.cluster }}
      cluster: true
      {{- with .redis.seeds }}
      seeds: {{ toJson . }}
      {{- end }}
      {{- end }}
      {{- with .redis.replicaAcks }}
      replica_acks: {{ int . }}
      {{- end }}
      {{- if and (hasPrefix "rediss://" .redis.url) $.Values.tls.redis.caSecret }}
      tls:
        ca_file: {{ include "thumbup.redisCaFile" $ | quote }}
      {{- end }}
{{- end }}
{{- end }}

{{/*
The pod placement and hardening that the operator and the service share.
*/}}
{{- define "thumbup.podCommon" -}}
{{- include "thumbup.podCommonWith" (dict "ctx" . "nodeSelector" .Values.nodeSelector) }}
{{- end }}

{{/*
The same with a given nodeSelector; call with (dict "ctx" $ "nodeSelector"
$selector). The service of one datacenter (topology.perDatacenter) adds its
zone to the values' nodeSelector.
*/}}
{{- define "thumbup.podCommonWith" -}}
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .ctx.Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .ctx.Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .ctx.Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
"true" when the Redis tier that moves with the route is one Redis Cluster
spanning the datacenters (failover.redisTier and every datacenter's
redis.cluster): the cluster moves its slots itself, no sidecar forwards
Redis. Empty otherwise.
*/}}
{{- define "thumbup.redisTierCluster" -}}
{{- if .Values.failover.redisTier }}
{{- $all := true }}
{{- range .Values.datacenters }}
{{- if not (and .redis .redis.cluster) }}{{ $all = false }}{{ end }}
{{- end }}
{{- if $all }}true{{ end }}
{{- end }}
{{- end }}

{{/*
Where the service runs, as a JSON list of placements: one without a
datacenter (name ""), or with topology.perDatacenter one per datacenter
({"name": <datacenter>, "zone": <its zone label value>}). Fails the render
on a per-datacenter setting the operator would refuse.
*/}}
{{- define "thumbup.placements" -}}
{{- $t := .Values.topology | default dict }}
{{- if $t.perDatacenter }}
{{- if not (and .Values.dbProxy.enabled .Values.failover.redisTier) }}
{{- fail "topology.perDatacenter needs dbProxy.enabled and failover.redisTier: the pods of every datacenter read through their sidecar's local listeners and write through the ones that follow the route" }}
{{- end }}
{{- if include "thumbup.redisTierCluster" . }}
{{- fail "topology.perDatacenter reads through the sidecar's local listeners, which forward to one Redis server per datacenter, not to a cluster's nodes" }}
{{- end }}
{{- if not $t.zoneLabel }}
{{- fail "topology.zoneLabel is empty: the node label whose value is a datacenter's zone" }}
{{- end }}
{{- $ports := list (int .Values.dbProxy.port) (int .Values.dbProxy.adminPort) (int (.Values.dbProxy.redisPort | default 6379)) (int (.Values.dbProxy.localPort | default 3307)) (int (.Values.dbProxy.localRedisPort | default 6380)) }}
{{- if ne (len $ports) (len (uniq $ports)) }}
{{- fail (printf "dbProxy: port, adminPort, redisPort, localPort and localRedisPort must be distinct: %v" $ports) }}
{{- end }}
{{- $list := list }}
{{- range .Values.datacenters }}
{{- $name := printf "%s-%s" (include "thumbup.serviceName" $) .name }}
{{- if gt (len $name) 63 }}
{{- fail (printf "topology.perDatacenter: the service Deployment %s is longer than 63 characters: shorten the release name, fullnameOverride or the datacenter name" $name) }}
{{- end }}
{{- $dc := .name }}
{{- range $.Values.datacenters }}
{{- if hasSuffix (printf "-%s" .name) $dc }}
{{- fail (printf "topology.perDatacenter: datacenter name %s ends with -%s, another datacenter's name: two tenants' job Deployments (thumbup-job-<tenant>-<datacenter>) could share a name" $dc .name) }}
{{- end }}
{{- end }}
{{- $list = append $list (dict "name" .name "zone" (.zone | default .name)) }}
{{- end }}
{{- toJson $list }}
{{- else }}
{{- toJson (list (dict "name" "" "zone" "")) }}
{{- end }}
{{- end }}

{{/*
The db-proxy native sidecar (an init container that keeps running: up
before the main container, stopped after it). It follows the route
ConfigMap of the release namespace.
*/}}
{{- define "thumbup.dbProxySidecar" -}}
{{- include "thumbup.dbProxySidecarIn" (dict "ctx" . "datacenter" "") }}
{{- end }}

{{/*
The sidecar of a pod pinned to a datacenter; call with (dict "ctx" $
"datacenter" NAME). With a datacenter (topology.perDatacenter) it also
serves the local-read listeners for that datacenter's DB and Redis, which
the registry entry's local_reads names.
*/}}
{{- define "thumbup.dbProxySidecarIn" -}}
{{- $dc := .datacenter }}
{{- with .ctx -}}
- name: db-proxy
  image: {{ .Values.dbProxy.image | default (include "thumbup.image" .) | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  restartPolicy: Always
  command:
    - thumbup-db-proxy
    - --listen=127.0.0.1:{{ .Values.dbProxy.port }}
    - --admin-listen=0.0.0.0:{{ .Values.dbProxy.adminPort }}
    - --route-config-map={{ .Release.Namespace }}/{{ .Values.failover.routeConfigMap }}
    {{- if and .Values.failover.redisTier (not (include "thumbup.redisTierCluster" .)) }}
    - --redis-listen=127.0.0.1:{{ .Values.dbProxy.redisPort | default 6379 }}
    {{- end }}
    {{- if $dc }}
    - --datacenter={{ $dc }}
    - --local-listen=127.0.0.1:{{ .Values.dbProxy.localPort | default 3307 }}
    - --local-redis-listen=127.0.0.1:{{ .Values.dbProxy.localRedisPort | default 6380 }}
    {{- end }}
  env:
    - name: RUST_LOG
      value: info
    - name: THUMBUP_LOG_FORMAT
      value: {{ .Values.logging.format | quote }}
  ports:
    - name: proxy-admin
      containerPort: {{ .Values.dbProxy.adminPort }}
      protocol: TCP
  startupProbe:
    httpGet:
      path: /readyz
      port: proxy-admin
    periodSeconds: 1
    failureThreshold: 60
  readinessProbe:
    httpGet:
      path: /readyz
      port: proxy-admin
    periodSeconds: 5
    failureThreshold: 3
  livenessProbe:
    httpGet:
      path: /healthz
      port: proxy-admin
    periodSeconds: 10
    failureThreshold: 3
  {{- with .Values.dbProxy.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}
