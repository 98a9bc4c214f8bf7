"""Router command line: API key sources, address lists, discovery choice."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvrelay_worker.router.discovery import EndpointSliceDiscovery, StaticDiscovery
from kvrelay_worker.router.main import build_parser, config_from_args, make_discovery


def parse(tokenizer_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    return config_from_args(build_parser().parse_args(["--model", str(tokenizer_dir), *extra]))


def test_addresses_defaults_and_static_discovery(
    tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KVRELAY_API_KEY", raising=False)
    config = parse(tokenizer_dir, "--prefill", "a:1,b:2", "--prefill", "c:3", "--decode=d:4")
    assert config.prefill == ["a:1", "b:2", "c:3"] and config.decode == ["d:4"]
    assert config.max_model_len == 128  # from config.json
    assert config.served_model_name == tokenizer_dir.name
    assert config.api_key is None
    assert isinstance(make_discovery(config), StaticDiscovery)
    with pytest.raises(SystemExit):
        make_discovery(parse(tokenizer_dir, "--prefill", "a:1"))  # no decode worker


def test_api_key_from_env_or_secret_file(
    tokenizer_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KVRELAY_API_KEY", "from-env")
    config = parse(tokenizer_dir)
    assert config.api_key is not None and config.api_key.get_secret_value() == "from-env"
    key_file = tmp_path / "api-key"
    key_file.write_text("from-secret\n")
    config = parse(tokenizer_dir, "--api-key-file", str(key_file))
    assert config.api_key is not None and config.api_key.get_secret_value() == "from-secret"
    assert "from-secret" not in repr(config)  # never logged by accident


def test_kubernetes_discovery_needs_an_instance(tokenizer_dir: Path) -> None:
    with pytest.raises(SystemExit):
        make_discovery(parse(tokenizer_dir, "--discovery", "kubernetes"))
    found = make_discovery(
        parse(tokenizer_dir, "--discovery", "kubernetes", "--instance", "m", "--namespace", "ns")
    )
    assert isinstance(found, EndpointSliceDiscovery) and found.namespace == "ns"
