{{/*
What the operator reads and writes in a namespace it watches (kopf handlers, resources.py children).
Children are written with server-side apply and garbage-collected through ownerReferences.
*/}}
{{- define "kvrelay.namespacedRules" -}}
# The custom resource: watch it, patch finalizers/annotations (kopf) and its status.
- apiGroups: ["kvrelay.dev"]
  resources: ["disaggregatedmodels"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kvrelay.dev"]
  resources: ["disaggregatedmodels/status"]
  verbs: ["get", "patch"]
# Children of a DisaggregatedModel: server-side apply (create + patch), list to compare hashes,
# watch for drift. No update/delete: the garbage collector removes children via ownerReferences.
# Worker roles are the exception: a role is a Deployment up to gpusPerNode GPUs a replica and a
# LeaderWorkerSet above, and the one it no longer is gets deleted when tensorParallel crosses over.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Only read and written where LeaderWorkerSet (sigs.k8s.io/lws) is installed; the operator works
# without it. Status is read from the objects themselves, so no leaderworkersets/status grant.
- apiGroups: ["leaderworkerset.x-k8s.io"]
  resources: ["leaderworkersets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Each model's NetworkPolicies (spec.networkPolicy), applied like the children above, and the one
# kind also deleted: spec.networkPolicy.enabled=false turns them off while the model lives on.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# spec.model.cache: the model's cache claim and the Job that fills it, applied like the children
# above and deleted when no longer rendered (the cache removed; a fill Job replaced by a newer one).
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Each model's router gets its own ServiceAccount and a Role to read EndpointSlices (below); the
# operator may create such Roles only because it holds the same EndpointSlice grant itself, so
# no escalate/bind verbs are needed.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The model's pods: read, for the scheduler's reason for a pod it cannot place (condition
# PodsScheduled). With rbac.podDeletionCost also patch, to set controller.kubernetes.io/pod-deletion-cost
# before a scale-down; RBAC cannot narrow patch to one field, so the ValidatingAdmissionPolicy in
# pod-deletion-cost-policy.yaml refuses the operator any other change to a pod.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"{{ if .Values.rbac.podDeletionCost }}, "patch"{{ end }}]
# A model whose tensor-parallel groups span pods gets one Secret, the key its ranks' links share
# (handlers._maybe_create_tp_secret). Created once and never read back, updated or listed: create only.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# kopf reports handler progress and errors as events on the resource.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
# The router discovers ready workers from the worker Services' EndpointSlices; the operator holds
# this grant so that it may hand it on to routers (RBAC forbids granting what one lacks).
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
{{- end }}
