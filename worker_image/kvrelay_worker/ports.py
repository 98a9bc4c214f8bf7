"""Pick free TCP ports for local child processes (`kvrelay serve`, tests, benchmarks).

A port from `bind(port 0)` comes out of the kernel's ephemeral range, the same range every
outgoing connection and every UCX listener draws from, so in the seconds before the child binds
it, another socket may take it (seen in CI: a worker's KV port was taken while torch imported).
Ports below that range are never handed out implicitly, so only an explicit bind can take them.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default
LOWEST = 15000  # above the usual fixed service ports (8080, 9090, 10250...)
MAX_ATTEMPTS = 2000


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The kernel's implicit-bind port range, or Linux's default where it cannot be read."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL
    return low, high


def candidate_ports(ephemeral: tuple[int, int]) -> range:
    """The larger stretch of unprivileged ports outside `ephemeral` (empty when none is left)."""
    low, high = ephemeral
    below, above = range(LOWEST, low), range(max(high + 1, LOWEST), 65536)
    return below if len(below) >= len(above) else above


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free on `host` now, outside the ephemeral range where it allows."""
    pool = candidate_ports(ephemeral_range())
    rng = random.Random()
    socks: list[socket.socket] = []  # held bound until every port is chosen, so they are distinct
    try:
        attempts = 0
        while len(socks) < count:
            # Port 0 (the kernel's choice, with its race) only when no room is left outside the range.
            outside = len(pool) >= 4 * count and attempts < MAX_ATTEMPTS
            attempts += 1
            sock = socket.socket()
            try:
                sock.bind((host, rng.choice(pool) if outside else 0))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """One port free on `host` now (see `free_ports`)."""
    return free_ports(1, host)[0]


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p with p and p + 1 both free on `host` now (a TP rendezvous and rank 0's link)."""
    pool = candidate_ports(ephemeral_range())
    rng = random.Random()
    for _ in range(MAX_ATTEMPTS):
        port = rng.choice(pool[:-1])
        socks = []
        try:
            for p in (port, port + 1):
                sock = socket.socket()
                socks.append(sock)
                sock.bind((host, p))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise OSError(f"no two consecutive free ports on {host}")
