"""A pod's volumes as host directories, and a container's volumeMounts as bind mounts.

emptyDir is a directory under the pod's state dir; secret, configMap, downwardAPI and projected
volumes are written once when the pod starts (no live updates); persistentVolumeClaim resolves to
its bound PV's hostPath or local path; hostPath is the host path itself.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kube_rest import Rest
from pod_env import ConfigError, field_value, object_data
from pod_sandbox import Mount

DEFAULT_MODE = 0o644
TOKEN_SECONDS = 3607  # the ServiceAccount admission plugin's default


class VolumeError(Exception):
    """A volume cannot be set up yet (a claim not bound, a missing Secret); retried."""


def _write(directory: Path, relative: str, data: bytes, mode: int) -> None:
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def _write_keys(
    directory: Path, data: dict[str, bytes], items: list[dict[str, Any]] | None, default_mode: int, what: str
) -> None:
    if not items:
        for key, value in data.items():
            _write(directory, key, value, default_mode)
        return
    for item in items:
        if item["key"] not in data:
            raise VolumeError(f"{what} has no key {item['key']!r}")
        _write(directory, item["path"], data[item["key"]], item.get("mode", default_mode))


def _object_volume(
    rest: Rest, namespace: str, kind: str, name: str, source: dict[str, Any], directory: Path, mode: int
) -> None:
    data = object_data(rest, namespace, kind, name)
    if data is None:
        if source.get("optional"):
            return
        raise VolumeError(f"{kind[:-1]} {name!r} does not exist")
    _write_keys(directory, data, source.get("items"), source.get("defaultMode", mode), f"{kind[:-1]} {name}")


def _downward_api(pod: dict[str, Any], items: list[dict[str, Any]], directory: Path, mode: int) -> None:
    for item in items:
        if "fieldRef" not in item:
            raise VolumeError("downwardAPI volumes support fieldRef items only")
        try:
            value = field_value(pod, item["fieldRef"]["fieldPath"])
        except ConfigError as exc:
            raise VolumeError(str(exc)) from exc
        _write(directory, item["path"], value.encode(), item.get("mode", mode))


def _token(rest: Rest, pod: dict[str, Any], source: dict[str, Any]) -> bytes:
    """A TokenRequest for the pod's ServiceAccount, bound to the pod (as the kubelet asks for it)."""
    meta = pod["metadata"]
    account = pod["spec"].get("serviceAccountName") or "default"
    spec: dict[str, Any] = {
        "expirationSeconds": source.get("expirationSeconds", TOKEN_SECONDS),
        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
    }
    if source.get("audience"):
        spec["audiences"] = [source["audience"]]
    path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token"
    response = rest.post(
        path, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    )
    return response["status"]["token"].encode()


def _projected(
    rest: Rest, pod: dict[str, Any], volume: dict[str, Any], directory: Path, ca_file: str | None
) -> None:
    namespace = pod["metadata"]["namespace"]
    mode = volume.get("defaultMode", DEFAULT_MODE)
    for source in volume.get("sources") or []:
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            _write(directory, token["path"], _token(rest, pod, token), mode)
        elif "configMap" in source:
            cm = source["configMap"]
            if (
                cm["name"] == "kube-root-ca.crt"
                and object_data(rest, namespace, "configmaps", cm["name"]) is None
            ):
                # No root-ca-cert-publisher (kube-controller-manager) yet: the agent's CA is the same cert.
                if ca_file is None:
                    raise VolumeError("configmap kube-root-ca.crt is missing and the agent has no --ca-file")
                _write_keys(directory, {"ca.crt": Path(ca_file).read_bytes()}, cm.get("items"), mode, "ca")
            else:
                _object_volume(rest, namespace, "configmaps", cm["name"], cm, directory, mode)
        elif "secret" in source:
            secret = source["secret"]
            _object_volume(rest, namespace, "secrets", secret["name"], secret, directory, mode)
        elif "downwardAPI" in source:
            _downward_api(pod, source["downwardAPI"].get("items") or [], directory, mode)
        else:
            raise VolumeError(f"unsupported projected source {sorted(source)}")


def _claim_path(rest: Rest, namespace: str, claim: str) -> str:
    pvc = rest.get(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
    volume_name = pvc.get("spec", {}).get("volumeName")
    if not volume_name or (pvc.get("status") or {}).get("phase") != "Bound":
        raise VolumeError(f"persistentVolumeClaim {claim!r} is not bound yet")
    pv = rest.get(f"/api/v1/persistentvolumes/{volume_name}")["spec"]
    for kind in ("hostPath", "local"):
        if kind in pv:
            return str(pv[kind]["path"])
    raise VolumeError(f"PV {volume_name} is neither hostPath nor local: this fake node cannot mount it")


def _host_path(source: dict[str, Any]) -> str:
    path, kind = source["path"], source.get("type", "")
    if kind in ("", "DirectoryOrCreate") and not os.path.exists(path):
        os.makedirs(path, exist_ok=True)  # what the runtime does for a missing hostPath
    elif kind == "FileOrCreate" and not os.path.exists(path):
        Path(path).touch()
    elif kind in ("Directory", "File", "Socket", "CharDevice", "BlockDevice") and not os.path.exists(path):
        raise VolumeError(f"hostPath {path} ({kind}) does not exist")
    return str(path)


def prepare_volumes(rest: Rest, pod: dict[str, Any], pod_dir: Path, ca_file: str | None) -> dict[str, str]:
    """Volume name -> host path for every volume of the pod; raises VolumeError to retry later."""
    namespace = pod["metadata"]["namespace"]
    paths: dict[str, str] = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        directory = pod_dir / "volumes" / name
        if "hostPath" in volume:
            paths[name] = _host_path(volume["hostPath"])
            continue
        if "persistentVolumeClaim" in volume:
            paths[name] = _claim_path(rest, namespace, volume["persistentVolumeClaim"]["claimName"])
            continue
        directory.mkdir(parents=True, exist_ok=True)
        paths[name] = str(directory)
        if "emptyDir" in volume:
            directory.chmod(0o777)
        elif "secret" in volume:
            source = volume["secret"]
            _object_volume(rest, namespace, "secrets", source["secretName"], source, directory, DEFAULT_MODE)
        elif "configMap" in volume:
            source = volume["configMap"]
            _object_volume(rest, namespace, "configmaps", source["name"], source, directory, DEFAULT_MODE)
        elif "downwardAPI" in volume:
            source = volume["downwardAPI"]
            _downward_api(pod, source.get("items") or [], directory, source.get("defaultMode", DEFAULT_MODE))
        elif "projected" in volume:
            _projected(rest, pod, volume["projected"], directory, ca_file)
        else:
            raise VolumeError(f"volume {name}: unsupported type {sorted(set(volume) - {'name'})}")
    return paths


def container_mounts(
    container: dict[str, Any], volumes: dict[str, str], always_read_only: set[str]
) -> list[Mount]:
    """The container's volumeMounts as bind mounts (a missing subPath is created, as the kubelet does)."""
    mounts = []
    for mount in container.get("volumeMounts") or []:
        source = volumes.get(mount["name"])
        if source is None:
            raise VolumeError(f"volumeMount {mount['name']!r} names no volume of the pod")
        if sub := mount.get("subPath"):
            source = os.path.join(source, sub)
            if not os.path.exists(source):
                os.makedirs(source, exist_ok=True)
        read_only = bool(mount.get("readOnly")) or mount["name"] in always_read_only
        mounts.append(Mount(source, mount["mountPath"], read_only))
    return mounts


def read_only_volumes(pod: dict[str, Any]) -> set[str]:
    """Volumes always mounted read-only: API-object volumes (as the kubelet does) and readOnly claims."""
    names = set()
    for volume in pod["spec"].get("volumes") or []:
        api_object = any(kind in volume for kind in ("secret", "configMap", "downwardAPI", "projected"))
        if api_object or (volume.get("persistentVolumeClaim") or {}).get("readOnly"):
            names.add(volume["name"])
    return names
