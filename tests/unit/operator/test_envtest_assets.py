"""The control-plane harness finds its binaries, or says exactly why not (no cluster started here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "controlplane"))
import kvrelay_envtest


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
