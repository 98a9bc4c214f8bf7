"""A KV relay endpoint in its own process, driven by JSON lines on stdin (one reply line each).

The kv_cache is filled with a pattern derived from (seed, global head) so any process can compute
the bytes a block must hold; replies carry sha256 digests of blocks instead of the bytes.
"""

from __future__ import annotations

import asyncio
import ctypes
import faulthandler
import hashlib
import json
import os
import signal
import sys
import time
from typing import Any

import torch
from kvrelay_worker.kv import KVHandle, KVLayout, KVTransferError, create_transport


def global_pattern(layout: KVLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """The full-TP (all heads) cache content: [layers, 2, blocks, heads, block_size, head_dim]."""
    gen = torch.Generator().manual_seed(seed)
    shape = (layout.num_layers, 2, num_blocks, layout.num_kv_heads, layout.block_size, layout.head_dim)
    bits = torch.randint(-(2**15), 2**15 - 1, shape, dtype=torch.int16, generator=gen)
    return bits.view(torch.bfloat16) if layout.itemsize == 2 else bits.to(torch.float32)


def rank_slice(full: torch.Tensor, layout: KVLayout, rank: int) -> torch.Tensor:
    local = layout.num_kv_heads_local
    return full[:, :, :, rank * local : (rank + 1) * local].contiguous()


def flush_c_streams() -> None:
    """fflush(NULL): UCX writes its log (UCX_LOG_FILE) through C stdio, which buffers it."""
    ctypes.CDLL(None).fflush(None)


def blocks_digest(cache: torch.Tensor, block_ids: list[int]) -> str:
    data = cache[:, :, block_ids].contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


class Peer:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.layout = KVLayout(**cfg["layout"])
        self.rank = cfg["tp_rank"]
        num_blocks = cfg["num_blocks"]
        if cfg.get("seed") is not None:
            self.cache = rank_slice(
                global_pattern(self.layout, num_blocks, cfg["seed"]), self.layout, self.rank
            )
        else:
            local = self.layout.num_kv_heads_local
            shape = (
                self.layout.num_layers,
                2,
                num_blocks,
                local,
                self.layout.block_size,
                self.layout.head_dim,
            )
            self.cache = torch.zeros(shape, dtype=getattr(torch, self.layout.dtype))
        self.released: list[list[int]] = []
        kwargs: dict[str, Any] = {"secret": cfg["secret"].encode(), "lease_s": cfg.get("lease_s", 30.0)}
        if cfg["backend"] == "nixl":
            kwargs["backend_params"] = cfg.get("backend_params")
        self.transport = create_transport(cfg["backend"], self.cache, self.layout, self.rank, **kwargs)
        self.transport.start()
        self.loop = asyncio.new_event_loop()

    def _freeze_after_claim(self, pid: int) -> None:
        """Test hook for one fetch: SIGSTOP the holder just before the data moves."""
        import kvrelay_worker.kv.tcp as tcp_mod

        def freeze_then(fn: Any) -> Any:
            def wrapped(*args: Any, **kwargs: Any) -> Any:
                restore()
                os.kill(pid, signal.SIGSTOP)
                return fn(*args, **kwargs)

            return wrapped

        if self.transport.backend == "tcp":
            original = tcp_mod.recv_views
            tcp_mod.recv_views = freeze_then(original)

            def restore() -> None:
                tcp_mod.recv_views = original
        else:
            # NIXL: freeze as the READ is posted (after the claim on first contact, alongside it later).
            original = self.transport._start_read  # type: ignore[attr-defined]
            self.transport._start_read = freeze_then(original)  # type: ignore[attr-defined]

            def restore() -> None:
                del self.transport._start_read  # type: ignore[attr-defined]

    def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd["op"]
        if op == "info":
            return {"endpoint": self.transport.endpoint}
        if op == "publish":
            handle = self.transport.publish(
                cmd["request_id"],
                cmd["block_ids"],
                cmd["num_tokens"],
                self.released.append,
                cmd.get("handle_id"),
            )
            return {"handle": handle.model_dump(mode="json")}
        if op == "fetch":
            handle = KVHandle.model_validate(cmd["handle"])
            started = time.monotonic()
            if cmd.get("freeze_pid"):
                self._freeze_after_claim(cmd["freeze_pid"])
            try:
                self.loop.run_until_complete(
                    self.transport.fetch(
                        handle, cmd["dst_block_ids"], cmd["timeout_s"], cmd.get("skip_blocks", 0)
                    )
                )
            except KVTransferError as err:
                return {
                    "ok": False,
                    "reason": err.reason,
                    "message": str(err),
                    "seconds": time.monotonic() - started,
                }
            return {
                "ok": True,
                "seconds": time.monotonic() - started,
                "digest": blocks_digest(self.cache, cmd["dst_block_ids"]),
            }
        if op == "flush_logs":  # the test reads UCX's log (which transport moved the data) after this
            flush_c_streams()
            return {"ok": True}
        if op == "digest":  # what some of this peer's blocks hold now
            return {"digest": blocks_digest(self.cache, cmd["block_ids"])}
        if op == "status":
            blocks, nbytes = self.transport.leases.held()
            return {"released": self.released, "held_blocks": blocks, "held_bytes": nbytes}
        raise ValueError(f"unknown op {op}")


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` dumps every thread's stack (debugging hangs)
    peer = Peer(json.loads(sys.stdin.readline()))
    print("KVPEER " + json.dumps({"ready": True, "endpoint": peer.transport.endpoint}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            break
        try:
            reply = peer.handle(cmd)
        except Exception as exc:  # reported to the test, which fails with the message
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        print("KVPEER " + json.dumps(reply), flush=True)
    peer.transport.close()
    sys.stdout.flush()
    flush_c_streams()
    os._exit(0)  # skip interpreter teardown (torch, NIXL): seconds on a loaded machine


if __name__ == "__main__":
    main()
