"""Local port picking: outside the kernel's ephemeral range, so no implicit bind can take a port first."""

from __future__ import annotations

import socket
from pathlib import Path

from kvrelay_worker.ports import candidate_ports, ephemeral_range, free_ports


def test_ports_are_distinct_bindable_and_outside_the_ephemeral_range() -> None:
    low, high = ephemeral_range()
    ports = free_ports(24)
    assert len(set(ports)) == 24
    assert not any(low <= p <= high for p in ports), (ports, low, high)
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_the_larger_stretch_outside_the_range_is_used() -> None:
    assert candidate_ports((32768, 60999)) == range(15000, 32768)
    assert candidate_ports((16000, 50000)) == range(50001, 65536)
    assert len(candidate_ports((1024, 65535))) == 0


def test_unreadable_range_falls_back_to_linux_default(tmp_path: Path) -> None:
    assert ephemeral_range(tmp_path / "missing") == (32768, 60999)
    (tmp_path / "range").write_text("20000\t30000\n")
    assert ephemeral_range(tmp_path / "range") == (20000, 30000)


def test_a_busy_port_is_never_returned(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import kvrelay_worker.ports as ports

    # A pool of two ports with one held busy: every pick must land on the other.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        with socket.socket() as spare_probe:
            spare_probe.bind(("127.0.0.1", 0))
            spare = spare_probe.getsockname()[1]
        monkeypatch.setattr(ports, "candidate_ports", lambda _: [taken, spare] * 8)
        assert {ports.free_ports(1)[0] for _ in range(10)} == {spare}


def test_without_room_outside_the_range_the_kernel_chooses(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import kvrelay_worker.ports as ports

    monkeypatch.setattr(ports, "candidate_ports", lambda _: range(0))
    picked = ports.free_ports(5)
    assert len(set(picked)) == 5 and all(p > 0 for p in picked)
