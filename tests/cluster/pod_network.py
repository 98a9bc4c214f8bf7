"""Pod addresses for the test cluster: one Linux bridge per cluster and a network namespace per pod.

Every name starts with the cluster's prefix (`kvr` + 6 hex, also the bridge's name), so a cleanup
finds all that a run made; the bridge's alias records the owning process, so a later run also
removes what a crashed run left behind. See tests/cluster/README.md for why pods need real addresses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PREFIX_ROOT = "kvr"
ALIAS_TAG = "kvrelay-test-cluster"
OCTET_RANGE = range(200, 250)  # 10.R.0.0/16 with R drawn from here
IFNAMSIZ = 15  # the longest interface name Linux takes


def unavailable_reason() -> str:
    """Why pod networking cannot work on this host ('' when it can): needs root, ip netns, unshare."""
    if os.geteuid() != 0:
        return "pod network namespaces need root (ip netns, veth, bridges, mount namespaces)"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2 / util-linux)"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return ""


def run_ip(*args: str, netns: str = "", check: bool = True) -> str:
    """Runs `ip [-n netns] args...`, raising with its stderr on failure; returns stdout."""
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


@dataclass(frozen=True)
class PodNetwork:
    """A cluster's bridge (also the name prefix of all it owns) and its 10.R.0.0/16 subnet."""

    bridge: str
    subnet: str

    @property
    def gateway(self) -> str:
        """The bridge's own address: pods' default route, and where the host (apiserver) answers them."""
        return str(ipaddress.ip_network(self.subnet).network_address + 1)

    @property
    def prefix_len(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def node_cidr(self, index: int) -> str:
        """Node `index`'s pod range, 10.R.index.0/24 (index 1..254; 0 holds the gateway)."""
        if not 1 <= index <= 254:
            raise ValueError(f"node index {index} is outside 1..254")
        base = ipaddress.ip_network(self.subnet).network_address
        return f"{base + index * 256}/24"


def netns_name(bridge: str, ip: str) -> str:
    """A pod's network namespace name: the bridge's prefix and the pod's address."""
    return f"{bridge}-{ip.replace('.', '-')}"


def node_netns_prefix(bridge: str, node_cidr: str) -> str:
    """The prefix shared by the netns names of one node's pods (the trailing dash keeps 1 from 12)."""
    a, b, c, _ = str(ipaddress.ip_network(node_cidr).network_address).split(".")
    return f"{bridge}-{a}-{b}-{c}-"


def _veth_names(bridge: str, ip: str) -> tuple[str, str]:
    # The last two octets make the pair unique within the /16 and keep both names within IFNAMSIZ.
    _, _, c, d = (int(part) for part in ip.split("."))
    host, peer = f"{bridge}{c:02x}{d:02x}", f"{bridge}p{c:02x}{d:02x}"
    if len(peer) > IFNAMSIZ:
        raise ValueError(f"bridge name {bridge!r} is too long for veth names")
    return host, peer


def create_pod_netns(network: PodNetwork, ip: str) -> str:
    """A netns whose eth0 (veth to the bridge) has `ip`, with lo up and a default route; returns its name."""
    name = netns_name(network.bridge, ip)
    host, peer = _veth_names(network.bridge, ip)
    delete_pod_netns(network.bridge, ip)  # a leftover from an earlier pod with this address
    run_ip("netns", "add", name)
    try:
        run_ip("link", "add", host, "type", "veth", "peer", "name", peer)
        run_ip("link", "set", peer, "netns", name)
        run_ip("link", "set", host, "master", network.bridge, "up")
        run_ip("link", "set", peer, "name", "eth0", netns=name)
        run_ip("addr", "add", f"{ip}/{network.prefix_len}", "dev", "eth0", netns=name)
        run_ip("link", "set", "eth0", "up", netns=name)
        run_ip("link", "set", "lo", "up", netns=name)
        run_ip("route", "add", "default", "via", network.gateway, netns=name)
    except Exception:
        delete_pod_netns(network.bridge, ip)
        raise
    return name


def delete_pod_netns(bridge: str, ip: str) -> None:
    """Kills what still runs in a pod's netns and deletes it with its veth pair (no error if absent)."""
    _delete_netns(netns_name(bridge, ip))
    host, _ = _veth_names(bridge, ip)
    run_ip("link", "del", host, check=False)


def _delete_netns(name: str) -> None:
    pids = run_ip("netns", "pids", name, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    run_ip("netns", "del", name, check=False)


def _netns_names() -> list[str]:
    return [line.split()[0] for line in run_ip("netns", "list", check=False).splitlines() if line.strip()]


def _links() -> list[dict[str, str]]:
    return json.loads(run_ip("-j", "link", "show") or "[]")


def cleanup(prefix: str) -> None:
    """Removes every netns (killing its processes) and link whose name starts with `prefix`."""
    for name in _netns_names():
        if name.startswith(prefix):
            _delete_netns(name)
    # Veths first: deleting the bridge leaves its ports behind.
    links = [link["ifname"] for link in _links() if link.get("ifname", "").startswith(prefix)]
    for name in sorted(links, key=lambda n: n == prefix):
        run_ip("link", "del", name, check=False)


def _process_start(pid: int) -> str:
    """The process's start time in clock ticks ('' if it is gone): a pid alone may have been reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _owner_alias() -> str:
    return f"{ALIAS_TAG} pid={os.getpid()} start={_process_start(os.getpid())}"


def remove_stale() -> list[str]:
    """Cleans up clusters whose owning process is gone (a crashed or killed test run); returns prefixes."""
    removed = []
    for link in _links():
        alias, name = link.get("ifalias", ""), link.get("ifname", "")
        if not alias.startswith(ALIAS_TAG) or not name.startswith(PREFIX_ROOT):
            continue
        fields = dict(part.split("=", 1) for part in alias.split()[1:] if "=" in part)
        pid = int(fields.get("pid", "0"))
        if pid <= 0 or _process_start(pid) != fields.get("start"):
            cleanup(name)
            # The agents' state and log dirs (run_node_agent names them after the bridge).
            for leftover in Path(tempfile.gettempdir()).glob(f"{name}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            removed.append(name)
    return removed


def _routes() -> list[ipaddress.IPv4Network]:
    routes = []
    for route in json.loads(run_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                routes.append(ipaddress.ip_network(dst, strict=False))
    return routes


def _free_subnet() -> ipaddress.IPv4Network:
    taken = _routes()
    for octet in random.sample(list(OCTET_RANGE), len(OCTET_RANGE)):
        candidate = ipaddress.ip_network(f"10.{octet}.0.0/16")
        if not any(candidate.overlaps(route) for route in taken):
            return candidate
    raise RuntimeError(f"every 10.R.0.0/16 with R in {OCTET_RANGE} overlaps an existing route")


def create_pod_network() -> PodNetwork:
    """A new bridge with a free 10.R.0.1/16 (R in 200..249), tagged with this process as its owner."""
    subnet = _free_subnet()
    bridge = f"{PREFIX_ROOT}{secrets.token_hex(3)}"
    network = PodNetwork(bridge, str(subnet))
    run_ip("link", "add", bridge, "type", "bridge")
    try:
        run_ip("link", "set", "dev", bridge, "alias", _owner_alias())
        run_ip("addr", "add", f"{network.gateway}/{subnet.prefixlen}", "dev", bridge)
        run_ip("link", "set", bridge, "up")
    except Exception:
        cleanup(bridge)
        raise
    return network


@contextlib.contextmanager
def pod_network() -> Iterator[PodNetwork]:
    """A cluster's pod network for the block; everything named with its prefix is removed on exit."""
    remove_stale()
    network = create_pod_network()
    try:
        yield network
    finally:
        cleanup(network.bridge)


class AddressPool:
    """Pod addresses of one node's /24, handed out lowest first and reused once released."""

    def __init__(self, node_cidr: str) -> None:
        self._free = [str(host) for host in ipaddress.ip_network(node_cidr).hosts()]
        self._used: set[str] = set()
        self._lock = threading.Lock()

    def allocate(self) -> str:
        """A free address; RuntimeError when the node's range is exhausted."""
        with self._lock:
            for ip in self._free:
                if ip not in self._used:
                    self._used.add(ip)
                    return ip
        raise RuntimeError("no free pod address left on this node")

    def release(self, ip: str) -> None:
        """Returns an address to the pool (no error if it was not allocated)."""
        with self._lock:
            self._used.discard(ip)


def network_from_bridge(bridge: str) -> PodNetwork:
    """The PodNetwork of an existing bridge, read from its IPv4 address (for a separate agent process)."""
    for entry in json.loads(run_ip("-j", "-4", "addr", "show", "dev", bridge) or "[]"):
        for addr in entry.get("addr_info") or []:
            if addr.get("family") == "inet":
                subnet = ipaddress.ip_interface(f"{addr['local']}/{addr['prefixlen']}").network
                return PodNetwork(bridge, str(subnet))
    raise RuntimeError(f"bridge {bridge} has no IPv4 address")
