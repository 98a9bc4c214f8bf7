"""Applying a model's rendered children: server-side apply of only those whose content changed.

Sits between the kopf handlers and kube.py. Each child is annotated with a hash of its own content
(HASH_ANNOTATION); a child whose hash (and, for a Deployment, replicas) matches what was last
applied is skipped, so an unchanged spec sends no writes:

- while the operator runs, the hashes it applied are kept in memory per model;
- after a restart (a resume), they are read back from the live children: one labelled LIST per
  kind serves every model of a namespace for LIVE_CACHE_SECONDS, so resuming N models costs a
  handful of LISTs, not N per kind.

Any API error drops what is known of that model, so the next attempt re-reads the live children.

Children of PRUNED_KINDS that are known (applied, or found live) but no longer rendered are deleted:
a spec switch (spec.networkPolicy.enabled) can turn them off while the model lives on, so the
garbage collector, which removes children only with their parent, would never do it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes.client.exceptions import ApiException

from kvrelay_operator import api, resources
from kvrelay_operator.kube import CHILD_KINDS, KubeClient

log = logging.getLogger(__name__)
HASH_ANNOTATION = f"{api.GROUP}/applied-hash"
# Kinds deleted when no longer rendered; always looked up on a resume, rendered or not. The chart
# grants `delete` on these alone.
# A Job of an older model cache fill and the claim of a removed cache go as well, and a worker role's
# Deployment or LeaderWorkerSet when tensorParallel crosses gpusPerNode and it becomes the other.
PRUNED_KINDS = ("NetworkPolicy", "Job", "PersistentVolumeClaim", "Deployment", "LeaderWorkerSet")
SCALED_KINDS = ("Deployment", "LeaderWorkerSet")  # replicas can drift on the live object
LIVE_CACHE_SECONDS = 10.0  # how long one namespace-wide LIST of children answers resume lookups

ModelKey = tuple[str, str]  # (namespace, model name)


class ApplyError(Exception):
    """A child could not be applied; `refused` when the API server rejected the child itself."""

    def __init__(self, status: int | None, reason: str, detail: str) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail  # the API server's own message

    @property
    def refused(self) -> bool:
        """400/422: the child is invalid, so retrying cannot help."""
        return self.status in (400, 422)

    @property
    def namespace_terminating(self) -> bool:
        """403 because the namespace is being deleted: nothing may be created in it any more."""
        return self.status == 403 and "being terminated" in self.detail

    @classmethod
    def from_api(cls, exc: ApiException) -> ApplyError:
        """From the client's exception; the detail is the Status object's message, else the raw body."""
        try:
            detail = str(json.loads(exc.body)["message"])
        except (TypeError, ValueError, KeyError):
            detail = str(exc.body)
        return cls(exc.status, str(exc.reason), detail)


def child_key(manifest: dict[str, Any]) -> str:
    """`Kind/name`, unique among one model's children."""
    return f"{manifest['kind']}/{manifest['metadata']['name']}"


def with_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest annotated with a hash of its own content (the input is not mutated)."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:20]
    meta = {**manifest["metadata"], "annotations": {**manifest["metadata"].get("annotations", {}),
                                                     HASH_ANNOTATION: digest}}  # fmt: skip
    return {**manifest, "metadata": meta}


def fingerprint(manifest: dict[str, Any]) -> str:
    """What decides "already applied": the content hash, plus replicas for a Deployment.

    Replicas count separately because they can change on the live object (kubectl scale) while
    the annotation stays: a hand-scaled Deployment (or LeaderWorkerSet) must not look up to date.
    """
    digest = (manifest.get("metadata", {}).get("annotations") or {}).get(HASH_ANNOTATION, "")
    if manifest["kind"] in SCALED_KINDS:
        digest += f"/{(manifest.get('spec') or {}).get('replicas')}"
    return digest


def stale_children(known: Iterable[str], rendered: set[str]) -> list[str]:
    """`Kind/name` keys of PRUNED_KINDS children that are known but no longer rendered, sorted."""
    return sorted(k for k in known if k not in rendered and k.partition("/")[0] in PRUNED_KINDS)


class ChildApplier:
    """Applies children through one KubeClient; thread-safe (kopf runs sync handlers in threads)."""

    def __init__(self, kube: KubeClient, clock: Callable[[], float] = time.monotonic) -> None:
        self._kube = kube
        self._clock = clock
        self._lock = threading.Lock()  # guards _applied
        self._applied: dict[ModelKey, dict[str, str]] = {}  # model -> child key -> fingerprint
        # Held across a LIST: concurrent resumes wait for one LIST instead of each sending their own.
        self._live_lock = threading.Lock()
        # (namespace, kinds) -> (clock time, instance -> child key -> fingerprint)
        self._live: dict[tuple[str, tuple[str, ...]], tuple[float, dict[str, dict[str, str]]]] = {}

    def apply_changed(
        self, namespace: str, name: str, children: Iterable[dict[str, Any]], fresh: bool = False
    ) -> dict[str, dict[str, Any]]:
        """Applies the children whose content changed and deletes stale ones (stale_children); returns
        `Kind/name` -> the API's response for each child applied.

        `fresh` (a just-created parent) skips looking up live children: there are none of its uid.
        The in-memory fingerprints win even then: kopf may run the create handler twice when a
        status write races its bookkeeping. A re-created namesake differs anyway (its uid is hashed).
        """
        hashed = [with_hash(c) for c in children]
        key = (namespace, name)
        with self._lock:
            known = dict(self._applied.get(key) or {})
            cached = key in self._applied
        if not cached and not fresh:
            kinds = {c["kind"] for c in hashed} | set(PRUNED_KINDS)
            known = self._live_fingerprints(namespace, name, kinds)
        changed: dict[str, dict[str, Any]] = {}
        for child in hashed:
            ckey, print_ = child_key(child), fingerprint(child)
            if known.get(ckey) != print_:
                changed[ckey] = self._apply(key, child)
            known[ckey] = print_
        for ckey in stale_children(known, {child_key(c) for c in hashed}):
            self._delete(key, ckey)
            del known[ckey]
        with self._lock:
            self._applied[key] = known
        return changed

    def apply_one(self, namespace: str, name: str, child: dict[str, Any]) -> dict[str, Any]:
        """Applies one child unconditionally (it drifted or was deleted) and remembers it."""
        hashed = with_hash(child)
        response = self._apply((namespace, name), hashed)
        with self._lock:
            self._applied.setdefault((namespace, name), {})[child_key(hashed)] = fingerprint(hashed)
        return response

    def _apply(self, key: ModelKey, child: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._kube.apply(child)
        except ApiException as exc:
            with self._lock:
                self._applied.pop(key, None)
            raise ApplyError.from_api(exc) from exc

    def _delete(self, key: ModelKey, ckey: str) -> None:
        kind, _, child = ckey.partition("/")
        try:
            self._kube.delete(CHILD_KINDS[kind], kind, key[0], child)
        except ApiException as exc:
            if exc.status != 404:  # already gone is what we wanted
                with self._lock:
                    self._applied.pop(key, None)
                raise ApplyError.from_api(exc) from exc
        log.info("%s/%s: deleted %s, which the spec no longer renders", key[0], key[1], ckey)

    def _live_fingerprints(self, namespace: str, name: str, kinds: Iterable[str]) -> dict[str, str]:
        """Fingerprints of one model's live children, from namespace-wide LISTs shared by all models."""
        kinds = tuple(sorted(kinds))
        with self._live_lock:
            now = self._clock()
            cached = self._live.get((namespace, kinds))
            if cached is None or now - cached[0] > LIVE_CACHE_SECONDS:
                try:
                    cached = (now, self._list_by_instance(namespace, kinds))
                except ApiException as exc:
                    raise ApplyError.from_api(exc) from exc
                self._live[(namespace, kinds)] = cached
            return dict(cached[1].get(name, {}))

    def _list_by_instance(self, namespace: str, kinds: tuple[str, ...]) -> dict[str, dict[str, str]]:
        by_instance: dict[str, dict[str, str]] = {}
        selector = f"{resources.LABEL_NAME}={resources.APP_NAME}"
        for kind in kinds:
            try:
                items = self._kube.list(CHILD_KINDS[kind], kind, namespace, selector)
            except ApiException as exc:
                if exc.status != 404:
                    raise
                items = []  # a kind the cluster does not serve (LeaderWorkerSet without its CRD): none
            for item in items:
                meta = item.get("metadata") or {}
                instance = (meta.get("labels") or {}).get(resources.LABEL_INSTANCE, "")
                by_instance.setdefault(instance, {})[f"{kind}/{meta.get('name')}"] = fingerprint(
                    {**item, "kind": kind}
                )
        return by_instance
