"""Starting a worker's TP ranks: local rank processes, the torch.distributed group, fatal exits.

The pod's first process starts one child process per other local rank (the same command with
``--tp-rank``), so a pod is one container whatever its GPU count. Children die with their parent
(PR_SET_PDEATHSIG), and a parent whose child exits treats the rank as lost.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch

from kvrelay_worker.model.parallel import TensorParallel
from kvrelay_worker.tp.options import TPError, TPPlacement

log = logging.getLogger(__name__)

AUTHKEY_ENV = "KVRELAY_TP_SECRET"
# An all-reduce waits this long for a peer before failing. Ranks run every step together, so a
# wait this long means a peer hangs; a lost peer is usually seen sooner by the link's heartbeat.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)
# How long ranks wait for each other to join: every rank loads its shard meanwhile (a large checkpoint).
JOIN_TIMEOUT_S = 1800.0
EXIT_GRACE_S = 1.0  # for the streams ended just before to reach their clients
LINK_FIRST_S = 2.0  # a dead local rank: let the link's handler end the requests before this exits


def authkey(placement: TPPlacement, env: dict[str, str]) -> bytes:
    """The secret every rank's link proves it knows: from the environment, or made up for one pod."""
    value = env.get(AUTHKEY_ENV)
    if value:
        return value.encode()
    if placement.nodes > 1:
        raise TPError(
            f"a TP group that spans {placement.nodes} pods needs {AUTHKEY_ENV} (the operator sets it)"
        )
    key = secrets.token_hex(32)
    os.environ[AUTHKEY_ENV] = key  # inherited by the local rank processes
    return key.encode()


def die_with_parent() -> None:
    """Linux: SIGKILL this process when the process that started it exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        log.debug("prctl unavailable: relying on the link's heartbeat")


def spawn_local_ranks(placement: TPPlacement, argv: Sequence[str]) -> list[subprocess.Popen[bytes]]:
    """Start this pod's other ranks: ``argv`` plus ``--tp-rank r``."""
    children = []
    for rank in placement.local_ranks[1:]:
        cmd = [sys.executable, "-m", "kvrelay_worker.entrypoint", *argv, "--tp-rank", str(rank)]
        children.append(subprocess.Popen(cmd))
    return children


def watch_children(children: list[subprocess.Popen[bytes]], ranks: list[int]) -> threading.Event:
    """Exit when a local rank process exits, unless the returned event was set (an orderly stop).

    Rank 0 usually hears of it first through the link and ends the requests; this catches a rank
    that dies before it joined.
    """
    stopping = threading.Event()

    def watch() -> None:
        while not stopping.wait(0.2):
            for child, rank in zip(children, ranks, strict=True):
                code = child.poll()
                if code is not None and not stopping.wait(LINK_FIRST_S):
                    exit_now(1, f"TP rank {rank}'s process exited with code {code}")

    if children:
        threading.Thread(target=watch, name="tp-children", daemon=True).start()
    return stopping


def init_group(placement: TPPlacement, rank: int, device: str) -> TensorParallel:
    """Join the worker's torch.distributed group (gloo on CPU, NCCL on CUDA); rank 0 hosts the store."""
    import torch.distributed as dist

    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(placement.local_index(rank))
    dist.init_process_group(
        backend,
        init_method=f"tcp://{placement.leader_addr}:{placement.port}",
        rank=rank,
        world_size=placement.size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return TensorParallel(rank=rank, size=placement.size, group=dist.group.WORLD)


def rank_device(device: str, placement: TPPlacement, rank: int) -> str:
    """Each local rank on its own GPU (``cuda:<local index>``); CPU ranks share the host."""
    if device.startswith("cuda"):
        return f"cuda:{placement.local_index(rank)}"
    return device


def exit_now(code: int, why: str, before: Callable[[], None] | None = None) -> None:
    """Log, run ``before`` (end client streams), give it a moment, and exit without unwinding."""
    log.error("%s: the worker exits (%d)", why, code)
    if before is not None:
        try:
            before()
        except Exception:
            log.exception("ending requests before the exit failed")
        time.sleep(EXIT_GRACE_S)
    os._exit(code)
