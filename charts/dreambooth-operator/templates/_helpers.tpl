{{/* The release's full name, at most 63 characters. */}}
{{- define "dbo.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "dbo.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "dbo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: dreambooth
{{- end -}}

{{- define "dbo.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "dbo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dbo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dbo.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dbo.trainerImage" -}}
{{- printf "%s:%s" .Values.trainer.image.repository (default .Chart.AppVersion .Values.trainer.image.tag) -}}
{{- end -}}

{{/* Permissions on the namespaced objects the operator manages (used by the ClusterRole or each Role), exactly the
requests the operator and kopf make (tests/integration/test_chart.py checks them with `kubectl auth can-i`). No
"update" (PUT) except on finalizers: the operator and kopf only get, list, watch, create, patch (merge patches and
server-side apply) and delete. */}}
{{- define "dbo.namespacedRules" -}}
# The custom resources: watch them (kopf lists and watches), write kopf's annotations, finalizer and the
# counted-preemptions annotation; read a DreamBoothJob again when the watch lags behind the operator's own status
# write (get: an InferenceService is never read by name).
- apiGroups: [dreambooth.dev]
  resources: [dreamboothjobs]
  verbs: [get, list, watch, patch]
- apiGroups: [dreambooth.dev]
  resources: [inferenceservices]
  verbs: [list, watch, patch]
- apiGroups: [dreambooth.dev]
  resources: [dreamboothjobs/status, inferenceservices/status]
  verbs: [patch]
# ownerReferences with blockOwnerDeletion on children need update on the owner's finalizers.
- apiGroups: [dreambooth.dev]
  resources: [dreamboothjobs/finalizers, inferenceservices/finalizers]
  verbs: [update]
# A DreamBoothJob's batch Jobs: watched (kopf index), created, suspended or resumed (patch), deleted.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [list, watch, create, patch, delete]
# The children that are not watched: read before any write to check who controls them (the operator never
# overwrites or deletes an object it does not own), created, server-side applied (patch) and deleted (a
# DreamBoothJob's ConfigMap, headless Service and NetworkPolicy after its TTL; an InferenceService's stale HPA).
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
# The serving Deployment: watched (its changes wake the InferenceService), read, created and applied; never
# deleted by the operator (the garbage collector does, with the InferenceService).
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
# Pods are observed (phase, exit codes, termination messages, the rank-0 IP for /progress). delete is only used
# with gracePeriodSeconds 0 and a uid precondition, on a job's own pods still Terminating 30 s past their grace
# period (their node is lost), so that the job can go on (reason StuckPodsForceDeleted).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, delete]
# kopf posts core/v1 events (it never patches one, and never uses events.k8s.io).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}

{{/* Labels of the hooks' objects (helm test, uninstall): the release's, without app.kubernetes.io/name, so that a
hook's pod never matches the operator Deployment's or Service's selector. The argument is (list $ "component"). */}}
{{- define "dbo.hookLabels" -}}
{{- $ := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $.Chart.Name $.Chart.Version | replace "+" "_" }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
app.kubernetes.io/version: {{ $.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $.Release.Service }}
app.kubernetes.io/part-of: dreambooth
{{- end -}}

{{/* The hooks' pod spec fields, the same values as the operator's pod: pull secrets, placement, Pod Security. */}}
{{- define "dbo.podPlacement" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end -}}
