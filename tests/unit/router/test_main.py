"""Router command line: API key sources, address lists, discovery choice, migration flags."""

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
    assert (config.max_migrations, config.resume_via) == (3, "prefill")


def test_migration_flags(tokenizer_dir: Path) -> None:
    config = parse(tokenizer_dir, "--max-migrations", "0", "--resume-via", "decode")
    assert (config.max_migrations, config.resume_via) == (0, "decode")
    with pytest.raises(SystemExit):
        parse(tokenizer_dir, "--resume-via", "nowhere")
    with pytest.raises(ValueError):
        parse(tokenizer_dir, "--max-migrations", "-1")


def test_hold_flags_and_their_environment(tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVRELAY_MAX_WAITING_REQUESTS", raising=False)
    monkeypatch.delenv("KVRELAY_MAX_WAIT_SECONDS", raising=False)
    config = parse(tokenizer_dir)
    assert (config.max_waiting_requests, config.max_wait_s) == (256, 60.0)
    monkeypatch.setenv("KVRELAY_MAX_WAITING_REQUESTS", "8")
    monkeypatch.setenv("KVRELAY_MAX_WAIT_SECONDS", "2.5")
    assert (parse(tokenizer_dir).max_waiting_requests, parse(tokenizer_dir).max_wait_s) == (8, 2.5)
    config = parse(tokenizer_dir, "--max-waiting-requests", "3", "--max-wait-seconds", "0")
    assert (config.max_waiting_requests, config.max_wait_s) == (3, 0.0)  # flags win over the environment
    monkeypatch.setenv("KVRELAY_MAX_WAIT_SECONDS", "soon")
    with pytest.raises(SystemExit):  # argparse: invalid float value: 'soon'
        parse(tokenizer_dir)
    monkeypatch.delenv("KVRELAY_MAX_WAIT_SECONDS")
    with pytest.raises(ValueError, match="max_wait_s"):
        parse(tokenizer_dir, "--max-wait-seconds", "-1")


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


def test_worker_image_router_role_serves(tokenizer_dir: Path) -> None:
    """`kvrelay-worker --role router ...` (the image's entrypoint) starts the router, without torch."""
    import signal
    import subprocess
    import sys
    import time

    import httpx
    from kvrelay_worker.ports import free_ports

    port, metrics_port = free_ports(2)
    code = "import sys; from kvrelay_worker.entrypoint import main; sys.exit(main())"
    flags = ["--host", "127.0.0.1", "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2"]
    flags += ["--metrics-port", str(metrics_port), "--grpc-port", "9"]
    cmd = [
        sys.executable,
        "-c",
        code,
        "--role",
        "router",
        "--model",
        str(tokenizer_dir),
        "--port",
        str(port),
        *flags,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "router did not answer within 30 s"
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert health.status_code == 503  # no worker is reachable at those addresses
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).json()
        assert models["data"][0]["id"] == tokenizer_dir.name
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert "kvrelay_time_to_first_token_seconds" in metrics
        assert "libtorch" not in Path(f"/proc/{proc.pid}/maps").read_text()  # the router stays light
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal after a clean shutdown
    assert "Application shutdown complete" in out
    assert "ignoring flags the router does not use: --grpc-port 9" in out
