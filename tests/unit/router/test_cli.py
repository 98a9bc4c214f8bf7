"""`kvrelay serve` pieces that need no workers: argument checks, ports, the worker command line."""

from __future__ import annotations

from pathlib import Path

from kvrelay_worker.cli import build_parser, serve, worker_command


def test_worker_command_follows_the_contract() -> None:
    cmd = worker_command("decode", Path("/m"), 1, 2, 3, ["--kv-backend", "tcp"])
    flags = cmd[cmd.index("--role") :]
    assert flags == [
        "--role", "decode", "--model", "/m", "--grpc-port", "1", "--metrics-port", "2", "--kv-port", "3",
        "--kv-backend", "tcp",
    ]  # fmt: skip


def test_serve_refuses_a_directory_that_is_not_a_checkpoint(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = build_parser().parse_args(["serve", "--model", str(tmp_path), "--log-dir", str(tmp_path / "logs")])
    assert serve(args) == 2
    assert "not a named model" in capsys.readouterr().out
    args = build_parser().parse_args(["serve", "--decode", "0"])
    assert serve(args) == 2


def test_serve_fails_fast_on_a_busy_port(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = build_parser().parse_args(["serve", "--port", str(port), "--log-dir", str(tmp_path)])
        assert serve(args) == 1
    out = capsys.readouterr().out
    assert f"cannot listen on 127.0.0.1:{port}" in out
    assert "worker" not in out  # nothing was started
