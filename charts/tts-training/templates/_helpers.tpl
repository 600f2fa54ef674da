{{/* Chart name, truncated to a DNS label. */}}
{{- define "tts-training.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the chart-owned objects (ServiceAccount, RBAC, PVC, monitors, dashboards). */}}
{{- define "tts-training.fullname" -}}
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

{{- define "tts-training.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The run name: prefix of every stage object, like `name` in a ttsctl pipeline spec. */}}
{{- define "tts-training.run" -}}
{{- $run := .Values.runName | default .Release.Name }}
{{- if or (gt (len $run) 30) (not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $run)) }}
{{- fail (printf "run name %q (runName, or the release name) must be a lowercase DNS label of at most 30 characters" $run) }}
{{- end }}
{{- $run }}
{{- end }}

{{/* Selector labels of the chart-owned objects. */}}
{{- define "tts-training.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tts-training.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels of every object. */}}
{{- define "tts-training.labels" -}}
helm.sh/chart: {{ include "tts-training.chart" . }}
{{ include "tts-training.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tts-training
{{- end }}

{{/*
Labels of a stage object: the user's extra labels, then ours (ours win), the same keys ttsctl writes
(speechlm.io/run, speechlm.io/stage, app.kubernetes.io/component), which the monitors and ttsctl select on.
Call with (dict "root" $ "stage" "sft" "component" "trainer").
*/}}
{{- define "tts-training.stageSelectorLabels" -}}
speechlm.io/run: {{ include "tts-training.run" .root }}
speechlm.io/stage: {{ .stage }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "tts-training.stageLabels" -}}
{{- /* instance = the run (as ttsctl writes it); it equals the release name unless runName is set. */}}
{{- $run := dict "app.kubernetes.io/instance" (include "tts-training.run" .root) }}
{{- $ours := merge (include "tts-training.stageSelectorLabels" . | fromYaml) $run (include "tts-training.labels" .root | fromYaml) }}
{{- toYaml (merge $ours .root.Values.labels) }}
{{- end }}

{{- define "tts-training.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tts-training.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tts-training.claimName" -}}
{{- .Values.workspace.existingClaim | default (printf "%s-workspace" (include "tts-training.fullname" .)) }}
{{- end }}

{{- define "tts-training.image" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{/* `<base>/<part>` for local paths and URLs alike. */}}
{{- define "tts-training.join" -}}
{{- printf "%s/%s" (trimSuffix "/" (index . 0)) (index . 1) }}
{{- end }}

{{- define "tts-training.rolloutName" -}}
{{- printf "%s-rollout" (include "tts-training.run" .) }}
{{- end }}

{{/* The codec every stage uses: the trained one when the codec stage runs, else codecModelPath. */}}
{{- define "tts-training.codecPath" -}}
{{- if .Values.stages.codec.enabled }}
{{- include "tts-training.join" (list .Values.storage.checkpoints "codec/final") }}
{{- else }}
{{- required "codecModelPath is required when stages.codec is disabled" .Values.codecModelPath }}
{{- end }}
{{- end }}

{{/*
Stage runs in pipeline order, as a YAML list of {name, trainerStage, settings}: export-<src> runs when
<src> and stages.export are both enabled (as in controller/plan.py).
*/}}
{{- define "tts-training.stageRuns" -}}
{{- $s := .Values.stages }}
{{- $runs := list }}
{{- range $name := list "codec" "vectorize" "merge" "sft" "export-sft" "rlhf" "export-rlhf" "eval" }}
{{- $source := trimPrefix "export-" $name }}
{{- $key := ternary "export" $name (hasPrefix "export-" $name) }}
{{- $on := and (index $s $key).enabled (or (not (hasPrefix "export-" $name)) (index $s $source).enabled) }}
{{- if $on }}
{{- $trainer := get (dict "codec" "codec-train" "export-sft" "export" "export-rlhf" "export") $name | default $name }}
{{- $runs = append $runs (dict "name" $name "trainerStage" $trainer "key" $key) }}
{{- end }}
{{- end }}
{{- toYaml $runs }}
{{- end }}

{{/*
The resolved `tts-train` config of a stage run: the user's `config` plus the keys that chain stages,
the cluster's collective timeout and, for RLHF, the rollout server address. Call with
(dict "root" $ "run" $run); returns JSON.
*/}}
{{- define "tts-training.stageConfig" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $name := .run.name }}
{{- $cfg := deepCopy ((index $v.stages .run.key).config | default dict) }}
{{- $vectorized := include "tts-training.join" (list $v.storage.data "vectorized") }}
{{- $training := get $cfg "training" | default dict }}
{{- $_ := set $training "process_group_timeout_s" (int $v.jobs.processGroupTimeoutSeconds) }}
{{- $_ := set $cfg "training" $training }}
{{- if eq $name "codec" }}
{{- $codec := get $cfg "codec" | default dict }}
{{- $train := get $codec "train" | default dict }}
{{- $_ := set $train "output_dir" (include "tts-training.join" (list $v.storage.checkpoints "codec")) }}
{{- $_ := set $codec "train" $train }}
{{- $_ := set $cfg "codec" $codec }}
{{- else if eq $name "vectorize" }}
{{- $sec := get $cfg "vectorize" | default dict }}
{{- $_ := set $sec "output_dir" $vectorized }}
{{- $_ := set $sec "codec_model_path" (include "tts-training.codecPath" $root) }}
{{- $_ := set $cfg "vectorize" $sec }}
{{- else if eq $name "merge" }}
{{- $sec := get $cfg "merge" | default dict }}
{{- $_ := set $sec "dataset_path" $vectorized }}
{{- $_ := set $cfg "merge" $sec }}
{{- else if or (eq $name "sft") (eq $name "rlhf") }}
{{- $_ := set $cfg "train_weighted_datasets" (dict $vectorized 1.0) }}
{{- $_ := set $cfg "val_weighted_datasets" (dict $vectorized 1.0) }}
{{- $_ := set $training "output_dir" $v.storage.checkpoints }}
{{- $_ := set $training "run_name" $name }}
{{- if eq $name "rlhf" }}
{{- $rl := get $cfg "rlhf_training" | default dict }}
{{- $rollout := $v.stages.rlhf.rollout }}
{{- $_ := set $rl "base_model_dir" (include "tts-training.join" (list $v.storage.outputs "export/sft")) }}
{{- $_ := set $rl "use_vllm" true }}
{{- $_ := set $rl "vllm_server_host" (printf "%s.%s.svc" (include "tts-training.rolloutName" $root) $root.Release.Namespace) }}
{{- $_ := set $rl "vllm_server_port" (int $rollout.port) }}
{{- $_ := set $rl "vllm_group_port" (int $rollout.groupPort) }}
{{- if and (eq (include "tts-training.weightSync" $root) "storage") (not $rl.weight_sync_dir) }}
{{- /* vLLM reloads weights from a local path: the workspace claim, mounted by the trainer and the rollout
pods at the same path, is where they meet (as controller/render/config_map.py). */}}
{{- if not $v.workspace.enabled }}
{{- fail "stages.rlhf: weight_sync storage needs the workspace claim (workspace.enabled), which the trainer and rollout pods both mount, or rlhf_training.weight_sync_dir on a shared mount; or set weight_sync: nccl" }}
{{- end }}
{{- $_ := set $rl "weight_sync_dir" (printf "%s/rollout-weights/%s" $v.workspace.mountPath (include "tts-training.run" $root)) }}
{{- end }}
{{- $_ := set $cfg "rlhf_training" $rl }}
{{- end }}
{{- else if hasPrefix "export-" $name }}
{{- $source := trimPrefix "export-" $name }}
{{- $sec := get $cfg "export" | default dict }}
{{- $_ := set $sec "checkpoint_path" (include "tts-training.join" (list $v.storage.checkpoints (printf "%s/final_model" $source))) }}
{{- $_ := set $sec "output_path" (include "tts-training.join" (list $v.storage.outputs (printf "export/%s" $source))) }}
{{- $_ := set $sec "codec_model_path" (include "tts-training.codecPath" $root) }}
{{- $_ := set $cfg "export" $sec }}
{{- else if eq $name "eval" }}
{{- $sec := get $cfg "eval" | default dict }}
{{- $sources := ternary (list "sft" "rlhf") (list "sft") $v.stages.rlhf.enabled }}
{{- $_ := set $sec "model_path" (include "tts-training.join" (list $v.storage.outputs (printf "export/%s" (last $sources)))) }}
{{- $_ := set $sec "codec_model_path" (include "tts-training.codecPath" $root) }}
{{- $_ := set $sec "output_dir" (include "tts-training.join" (list $v.storage.outputs "eval")) }}
{{- $dirs := list }}
{{- range $sources }}{{ $dirs = append $dirs (include "tts-training.join" (list $v.storage.checkpoints .)) }}{{ end }}
{{- $_ := set $sec "metrics_dirs" $dirs }}
{{- $_ := required "stages.eval.config.eval.test_list is required (the JSONL test list)" (get $sec "test_list") }}
{{- $_ := set $cfg "eval" $sec }}
{{- end }}
{{- toPrettyJson $cfg }}
{{- end }}

{{/* How the rollout server gets the policy's weights: the rlhf config's weight_sync (default storage). */}}
{{- define "tts-training.weightSync" -}}
{{- dig "rlhf_training" "weight_sync" "storage" (.Values.stages.rlhf.config | default dict) }}
{{- end }}

{{/* The metrics port a stage's trainer serves (its config's metrics.port, default 9090; 0: none). */}}
{{- define "tts-training.metricsPort" -}}
{{- $cfg := (index .root.Values.stages .run.key).config | default dict }}
{{- dig "metrics" "port" 9090 $cfg }}
{{- end }}

{{/* Pod-level fields every trainer and rollout pod shares (controller/render/pod.py). */}}
{{- define "tts-training.podCommon" -}}
serviceAccountName: {{ include "tts-training.serviceAccountName" . }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  runAsNonRoot: true
  runAsUser: 1000
  runAsGroup: 1000
  fsGroup: 1000
  seccompProfile:
    type: RuntimeDefault
# Service links put every Service of the namespace into env (a Service named vllm clobbers VLLM_PORT).
enableServiceLinks: false
{{- end }}

{{- define "tts-training.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: [ALL]
{{- end }}

{{/* Volumes every pod mounts: /dev/shm in memory, GCS credentials, the workspace claim. */}}
{{- define "tts-training.commonVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.jobs.shmSize }}
{{- with .Values.secrets.gcs }}
{{- if .name }}
- name: gcs-credentials
  secret:
    secretName: {{ .name }}
{{- end }}
{{- end }}
{{- if .Values.workspace.enabled }}
- name: workspace
  persistentVolumeClaim:
    claimName: {{ include "tts-training.claimName" . }}
{{- end }}
{{- end }}

{{- define "tts-training.commonMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.secrets.gcs.name }}
- name: gcs-credentials
  mountPath: /var/secrets/gcs
  readOnly: true
{{- end }}
{{- if .Values.workspace.enabled }}
- name: workspace
  mountPath: {{ .Values.workspace.mountPath }}
{{- end }}
{{- end }}

{{/* Secrets by reference: their values never pass through Helm. */}}
{{- define "tts-training.credentialEnv" -}}
{{- with .Values.secrets.wandb }}
{{- if .name }}
- name: WANDB_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- with .Values.secrets.gcs }}
{{- if .name }}
- name: GOOGLE_APPLICATION_CREDENTIALS
  value: /var/secrets/gcs/{{ .key }}
{{- end }}
{{- end }}
{{- end }}

{{/* A name -> value map as a container env list, sorted by name. */}}
{{- define "tts-training.plainEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* requests/limits plus the GPU count. Call with (dict "resources" $r "gpus" $n). */}}
{{- define "tts-training.resources" -}}
{{- $gpu := dict }}
{{- if gt (int .gpus) 0 }}{{ $gpu = dict "nvidia.com/gpu" (toString (int .gpus)) }}{{ end }}
{{- $requests := merge (deepCopy (.resources.requests | default dict)) $gpu }}
{{- $limits := merge (deepCopy (.resources.limits | default dict)) $gpu }}
{{- with $requests }}
requests:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $limits }}
limits:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Container env: credentials by reference, then the plain map sorted by name. (dict "root" $ "env" $map) */}}
{{- define "tts-training.env" -}}
{{ include "tts-training.credentialEnv" .root | trim }}
{{ include "tts-training.plainEnv" .env | trim }}
{{- end }}
