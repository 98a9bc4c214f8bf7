"""A container's environment and command line, resolved as the kubelet does.

Order: the kubernetes Service variables, envFrom, then env (each value may reference earlier ones as
$(VAR)); the "image" variables (PATH...) only fill what the pod leaves unset. Secrets and ConfigMaps
are read through the API at container start.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping
from typing import Any

from kube_rest import Rest, not_found
from kubernetes.utils.quantity import parse_quantity


class ConfigError(Exception):
    """The container cannot start yet (CreateContainerConfigError): a missing Secret key, a bad fieldRef."""


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubelet expansion: $(VAR) -> value when VAR is defined, else kept; $$ -> $."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def _subscript(path: str, prefix: str) -> str | None:
    # metadata.labels['key'] -> key
    if path.startswith(prefix + "['") and path.endswith("']"):
        return path[len(prefix) + 2 : -2]
    return None


def field_value(pod: dict[str, Any], path: str) -> str:
    """The value of a downward-API fieldRef (metadata.name, status.podIP, metadata.labels['k']...)."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "status.hostIP": status.get("hostIP"),
        "status.podIP": status.get("podIP"),
        "status.hostIPs": ",".join(a["ip"] for a in status.get("hostIPs") or []),
        "status.podIPs": ",".join(a["ip"] for a in status.get("podIPs") or []),
    }
    if path in simple:
        return simple[path] or ""
    for prefix, values in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        if (key := _subscript(path, prefix)) is not None:
            return (meta.get(values) or {}).get(key, "")
        if path == prefix:
            items = sorted((meta.get(values) or {}).items())
            return "".join(f'{k}="{v}"\n' for k, v in items)
    raise ConfigError(f"unsupported fieldRef {path!r}")


def resource_value(container: dict[str, Any], ref: dict[str, Any], node_allocatable: dict[str, str]) -> str:
    """A resourceFieldRef (limits.cpu, requests.memory...), rounded up in units of its divisor."""
    kind, _, resource = ref["resource"].partition(".")
    resources = container.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(resource)
    if raw is None:
        raw = node_allocatable.get(resource, "0")  # an unset limit is the node's allocatable
    divisor = parse_quantity(str(ref.get("divisor") or "1"))
    return str(math.ceil(parse_quantity(str(raw)) / divisor))


def _read(rest: Rest, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    try:
        return rest.get(f"/api/v1/namespaces/{namespace}/{kind}/{name}")
    except Exception as exc:
        if not_found(exc):
            return None
        raise


def object_data(rest: Rest, namespace: str, kind: str, name: str) -> dict[str, bytes] | None:
    """A Secret's or ConfigMap's keys as bytes (None when the object does not exist)."""
    obj = _read(rest, namespace, kind, name)
    if obj is None:
        return None
    data: dict[str, bytes] = {}
    if kind == "secrets":
        data.update({k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()})
        data.update({k: v.encode() for k, v in (obj.get("stringData") or {}).items()})
    else:
        data.update({k: v.encode() for k, v in (obj.get("data") or {}).items()})
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _key_ref(rest: Rest, namespace: str, kind: str, ref: dict[str, Any]) -> str | None:
    data = object_data(rest, namespace, kind, ref["name"])
    if data is None or ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"{kind[:-1]} {ref['name']!r} or its key {ref['key']!r} is missing")
    return data[ref["key"]].decode()


def container_env(
    rest: Rest,
    pod: dict[str, Any],
    container: dict[str, Any],
    base: Mapping[str, str],
    node_allocatable: dict[str, str],
) -> dict[str, str]:
    """The pod-defined environment of a container, on top of `base` (the Service variables)."""
    namespace = pod["metadata"]["namespace"]
    env = dict(base)
    for source in container.get("envFrom") or []:
        kind, ref = (
            ("secrets", source["secretRef"])
            if "secretRef" in source
            else ("configmaps", source["configMapRef"])
        )
        data = object_data(rest, namespace, kind, ref["name"])
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f"{kind[:-1]} {ref['name']!r} for envFrom is missing")
        env.update({source.get("prefix", "") + k: v.decode() for k, v in data.items()})
    for var in container.get("env") or []:
        value_from = var.get("valueFrom")
        if value_from is None:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        if "fieldRef" in value_from:
            value: str | None = field_value(pod, value_from["fieldRef"]["fieldPath"])
        elif "resourceFieldRef" in value_from:
            value = resource_value(container, value_from["resourceFieldRef"], node_allocatable)
        elif "secretKeyRef" in value_from:
            value = _key_ref(rest, namespace, "secrets", value_from["secretKeyRef"])
        elif "configMapKeyRef" in value_from:
            value = _key_ref(rest, namespace, "configmaps", value_from["configMapKeyRef"])
        else:
            raise ConfigError(f"unsupported valueFrom {sorted(value_from)} for {var['name']}")
        if value is not None:
            env[var["name"]] = value
    return env


def command_line(container: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """command + args with $(VAR) expanded; without a command the "image" has no entrypoint to run."""
    command = [expand(part, env) for part in container.get("command") or []]
    args = [expand(part, env) for part in container.get("args") or []]
    if not command:
        if not args:
            raise ConfigError("the container has no command: this fake runtime has no image entrypoint")
        return args
    return command + args
