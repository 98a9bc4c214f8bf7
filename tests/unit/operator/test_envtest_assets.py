"""The control-plane harness finds its binaries, or says exactly why not (no cluster started here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "controlplane"))
import kvrelay_envtest
import kwok_nodes


def test_kubebuilder_assets_without_binaries_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    assets, reason = kvrelay_envtest.find_assets()
    assert assets is None and str(tmp_path) in reason and "kube-apiserver" in reason


def test_kubebuilder_assets_with_binaries_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("kube-apiserver", "etcd"):
        (tmp_path / name).write_text("#!/bin/sh\n")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    assert kvrelay_envtest.find_assets() == (tmp_path, "")


def test_wait_for_returns_the_value_or_names_what_timed_out() -> None:
    assert kvrelay_envtest.wait_for(lambda: 42, timeout=1) == 42
    with pytest.raises(TimeoutError, match="the moon"):
        kvrelay_envtest.wait_for(lambda: None, timeout=0.2, interval=0.05, what="the moon")


def test_kubebuilder_assets_without_controllers_is_refused_for_a_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("kube-apiserver", "etcd", "kube-scheduler"):
        (tmp_path / name).write_text("#!/bin/sh\n")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    assert kvrelay_envtest.find_assets() == (tmp_path, "")
    assets, reason = kvrelay_envtest.find_assets(controllers=True)
    assert assets is None and str(tmp_path) in reason
    assert "kube-controller-manager" in reason and "kube-scheduler" not in reason


def test_kubebuilder_assets_with_controllers_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("kube-apiserver", "etcd", "kube-controller-manager", "kube-scheduler"):
        (tmp_path / name).write_text("#!/bin/sh\n")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path))
    assert kvrelay_envtest.find_assets(controllers=True) == (tmp_path, "")


def test_kwok_is_found_beside_its_stages_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVRELAY_CACHE", str(tmp_path / "cache"))
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "kwok").write_text("#!/bin/sh\n")
    kwok, reason = kwok_nodes.find_kwok(assets)
    # Without stages.yaml the binary manages nothing, so it does not count.
    assert kwok is None and "stages.yaml" in reason and str(assets / "kwok") in reason
    cached = tmp_path / "cache" / "controlplane" / f"kwok-v{kwok_nodes.KWOK_VERSION}"
    cached.mkdir(parents=True)
    (cached / "kwok").write_text("#!/bin/sh\n")
    (cached / "stages.yaml").write_text("---\n")
    assert kwok_nodes.find_kwok(assets) == (cached / "kwok", "")
    (assets / "stages.yaml").write_text("---\n")
    assert kwok_nodes.find_kwok(assets) == (assets / "kwok", "")


def test_gpu_node_manifest_is_a_kwok_node_of_its_pool() -> None:
    node = kwok_nodes.node_manifest(kwok_nodes.gpu_node("l40s-0", "decode-l40s", 4, zone="zone-b"))
    meta, status = node["metadata"], node["status"]
    assert meta["annotations"] == {"kwok.x-k8s.io/node": "fake"}
    assert meta["labels"]["kvrelay.dev/node-pool"] == "decode-l40s"
    assert meta["labels"]["kubernetes.io/hostname"] == "l40s-0" and meta["labels"]["type"] == "kwok"
    assert meta["labels"]["topology.kubernetes.io/zone"] == "zone-b"
    assert node["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    assert status["capacity"] == status["allocatable"]
    assert status["allocatable"]["nvidia.com/gpu"] == "4" and status["allocatable"]["rdma/ib"] == "8"
    system = kwok_nodes.node_manifest(kwok_nodes.cpu_node("system-0"))
    assert system["spec"]["taints"] == [] and "nvidia.com/gpu" not in system["status"]["capacity"]
