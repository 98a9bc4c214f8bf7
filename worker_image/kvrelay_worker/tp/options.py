"""Where a worker's TP ranks run and how they find each other (the ``--tensor-parallel`` flags).

A worker of TP degree N spans ``nodes`` pods (a LeaderWorkerSet group when N exceeds a node's
GPUs), each running N / nodes rank processes: pod k runs ranks k*L .. k*L+L-1. Rank 0 (on the
leader pod) owns the gRPC server and the scheduler; its address is where every rank meets.

``auto`` values come from what LeaderWorkerSet gives a pod: ``LWS_WORKER_INDEX`` and
``LWS_LEADER_ADDRESS`` when its webhook injected them, otherwise the pod's own name (LWS names a
group's leader ``<lws>-<group>`` and its workers ``<lws>-<group>-<index>``, all under a headless
Service named after the LWS) with ``KVRELAY_LWS_NAME`` and ``POD_NAMESPACE`` from the operator.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_TP_PORT = 29500


class TPError(ValueError):
    """The TP flags or the pod's environment do not say where this rank belongs."""


class TPOptions(BaseModel):
    """The TP flags as given (``auto`` unresolved)."""

    model_config = ConfigDict(frozen=True)

    size: int = Field(1, ge=1, le=64, description="ranks in the worker (its tensor-parallel degree)")
    nodes: int = Field(1, ge=1, description="pods the worker spans; each runs size / nodes ranks")
    node_rank: int | Literal["auto"] = 0
    leader_addr: str = "127.0.0.1"
    port: int = Field(DEFAULT_TP_PORT, ge=1, le=65534, description="rendezvous; port + 1 is rank 0's link")

    @model_validator(mode="after")
    def _nodes_divide(self) -> TPOptions:
        if self.size % self.nodes:
            raise ValueError(f"--tp-nodes {self.nodes} does not divide --tensor-parallel {self.size}")
        return self


class TPPlacement(BaseModel):
    """This pod's place in the group: resolved, every value concrete."""

    model_config = ConfigDict(frozen=True)

    size: int
    nodes: int
    node_rank: int
    leader_addr: str
    port: int

    @property
    def ranks_per_node(self) -> int:
        return self.size // self.nodes

    @property
    def local_ranks(self) -> list[int]:
        """The global ranks this pod runs, its primary process's first."""
        first = self.node_rank * self.ranks_per_node
        return list(range(first, first + self.ranks_per_node))

    def local_index(self, rank: int) -> int:
        return rank - self.node_rank * self.ranks_per_node


_POD_NAME = re.compile(r"^(?P<group>\d+)(?:-(?P<index>\d+))?$")


def resolve(opts: TPOptions, env: Mapping[str, str]) -> TPPlacement:
    """Resolve ``auto`` node rank and leader address from the pod's environment (see the module doc)."""
    node_rank, leader = opts.node_rank, opts.leader_addr
    if node_rank == "auto" or leader == "auto":
        group, index = _from_lws(env)
        if node_rank == "auto":
            node_rank = index
        if leader == "auto":
            leader = env.get("LWS_LEADER_ADDRESS") or _leader_dns(env, group)
    assert isinstance(node_rank, int)
    if not 0 <= node_rank < opts.nodes:
        raise TPError(f"node rank {node_rank} outside the group's {opts.nodes} pods")
    return TPPlacement(
        size=opts.size, nodes=opts.nodes, node_rank=node_rank, leader_addr=leader, port=opts.port
    )


def _from_lws(env: Mapping[str, str]) -> tuple[str, int]:
    """(group index, worker index) of this pod, from LWS's env or the pod's name."""
    injected = env.get("LWS_WORKER_INDEX")
    lws, pod = env.get("KVRELAY_LWS_NAME", ""), env.get("POD_NAME", "")
    group = ""
    if lws and pod.startswith(lws + "-"):
        m = _POD_NAME.match(pod[len(lws) + 1 :])
        if m:
            group = m["group"]
            if injected is None:
                return group, int(m["index"] or 0)
    if injected is not None:
        return group, int(injected)
    raise TPError(
        f"cannot tell this pod's place in its LeaderWorkerSet group: no LWS_WORKER_INDEX, and POD_NAME "
        f"{pod!r} is not <KVRELAY_LWS_NAME>-<group>[-<index>] with KVRELAY_LWS_NAME {lws!r}"
    )


def _leader_dns(env: Mapping[str, str], group: str) -> str:
    lws, namespace = env.get("KVRELAY_LWS_NAME", ""), env.get("POD_NAMESPACE", "")
    if not (lws and group and namespace):
        raise TPError(
            "no LWS_LEADER_ADDRESS, and KVRELAY_LWS_NAME, POD_NAME and POD_NAMESPACE do not name the leader"
        )
    return f"{lws}-{group}.{lws}.{namespace}"
