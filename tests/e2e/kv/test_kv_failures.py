"""Failures across real processes: dead or frozen holder, dead reader, refused handles."""

from __future__ import annotations

import signal
import socket
import time
from typing import Any

import pytest
from kv_testlib import SECRET, wait_all_released
from kvrelay_worker.kv import KVHandle
from kvrelay_worker.kv.control import recv_frame, send_frame, split_endpoint

BLOCKS = [5, 9, 2]
TOKENS = 20


def publish(holder: Any, request_id: str = "req") -> dict[str, Any]:
    return holder.call(op="publish", request_id=request_id, block_ids=BLOCKS, num_tokens=TOKENS)["handle"]


@pytest.mark.parametrize("flavour", ["nixl-tcp", "tcp"])
def test_holder_killed_before_read_fails_fast(spawn: Any, pool: Any, flavour: str) -> None:
    holder, reader = spawn(flavour, seed=1), pool(flavour)
    handle = publish(holder)
    holder.kill(signal.SIGKILL)
    holder.proc.wait(timeout=5)
    reply = reader.call(op="fetch", handle=handle, dst_block_ids=[1, 2, 3], timeout_s=5)
    assert not reply["ok"]
    assert reply["reason"] == "holder_unreachable", reply
    assert reply["seconds"] < 5


@pytest.mark.parametrize("flavour", ["nixl-tcp", "tcp"])
def test_frozen_holder_times_out_within_deadline(spawn: Any, pool: Any, flavour: str) -> None:
    holder, reader = spawn(flavour, seed=1), pool(flavour)
    handle = publish(holder)
    holder.kill(signal.SIGSTOP)
    try:
        reply = reader.call(op="fetch", handle=handle, dst_block_ids=[1, 2, 3], timeout_s=1.5)
    finally:
        holder.kill(signal.SIGCONT)
    assert not reply["ok"]
    assert reply["reason"] == "timeout", reply
    assert 1.4 < reply["seconds"] < 3.0


@pytest.mark.parametrize("flavour", ["nixl-tcp", "tcp"])
def test_holder_frozen_mid_read_times_out_and_reader_recovers(spawn: Any, pool: Any, flavour: str) -> None:
    """The holder stops after accepting the claim: the READ stalls, the deadline ends it, no hang."""
    if flavour == "tcp":
        # 64 MiB (2 MiB blocks), more than the socket buffers can ever hold in flight (tcp_rmem and
        # tcp_wmem max: 32 + 4 MiB by default), so the holder is still sending when it is frozen.
        big = {"layout": {"head_dim": 4096}}
        holder, reader = spawn(flavour, seed=1, lease_s=2.0, **big), spawn(flavour, **big)
        src, dst = list(range(1, 33)), list(range(32, 64))
    else:
        holder, reader = spawn(flavour, seed=1, lease_s=2.0), pool(flavour)
        src, dst = BLOCKS, [1, 2, 3]
    handle = holder.call(op="publish", request_id="frozen", block_ids=src, num_tokens=len(src) * 8)["handle"]
    try:
        reply = reader.call(
            op="fetch", handle=handle, dst_block_ids=dst, timeout_s=1.5, freeze_pid=holder.proc.pid
        )
    finally:
        holder.kill(signal.SIGCONT)
    assert not reply["ok"]
    assert reply["reason"] == "timeout", reply
    assert 1.4 < reply["seconds"] < 3.0
    # The holder recovers and serves the same reader again; the stalled lease ends by expiry.
    again = holder.call(op="publish", request_id="after", block_ids=[40, 41], num_tokens=9)["handle"]
    assert reader.call(op="fetch", handle=again, dst_block_ids=[50, 51], timeout_s=10)["ok"]
    status = wait_all_released(holder, 2, timeout=15)
    assert sorted(map(sorted, status["released"])) == sorted([sorted(src), [40, 41]])
    assert status["held_blocks"] == 0


@pytest.mark.parametrize("flavour", ["nixl-tcp", "tcp"])
def test_dead_reader_blocks_freed_at_lease_expiry(spawn: Any, flavour: str) -> None:
    holder = spawn(flavour, seed=1, lease_s=1.5)
    handle = publish(holder)
    # A reader that claimed the handle and died mid-transfer: claim by hand, then drop the socket.
    host, port = split_endpoint(handle["holder"]["endpoint"])
    with socket.create_connection((host, port), timeout=5) as sock:
        claim = {
            "op": "claim",
            "handle": handle,
            "reader_rank": 0,
            "reader_tp_size": 1,
            "reader_num_blocks": 64,
            "dst_block_ids": [1, 2, 3],
            "deadline_s": 0.5,
        }
        send_frame(sock, claim)
        assert recv_frame(sock)["ok"]
    status = holder.call(op="status")
    assert status["held_blocks"] == len(BLOCKS) and status["held_bytes"] > 0
    assert status["released"] == []
    started = time.monotonic()
    status = wait_all_released(holder, 1, timeout=10)
    assert status["released"] == [BLOCKS]
    assert (status["held_blocks"], status["held_bytes"]) == (0, 0)
    assert time.monotonic() - started < 6  # lease 1.5 s, extended by the claim to 0.5 s + margin


@pytest.mark.parametrize("flavour", ["nixl-cma", "tcp"])
def test_refused_handles(spawn: Any, pool: Any, flavour: str) -> None:
    holder, reader = pool(flavour, seed=7), pool(flavour)
    wrong = spawn(flavour, layout={"block_size": 16})
    short = spawn(flavour, seed=1, lease_s=0.3)
    dst = [1, 2, 3]

    def fetch(peer: Any, handle: dict[str, Any]) -> dict[str, Any]:
        reply = peer.call(op="fetch", handle=handle, dst_block_ids=dst, timeout_s=5)
        assert not reply["ok"], reply
        return reply

    good = publish(holder)
    # Wrong layout: refused before any byte moves, naming both sides.
    reply = fetch(wrong, good)
    assert reply["reason"] == "layout_mismatch"
    assert "block_size 8 (holder) != 16 (reader)" in reply["message"]
    # Forged: edited block ids, a lease stretched by hand, or signed with another secret.
    edited = {**good, "ranks": [{**good["ranks"][0], "block_ids": [7, 8, 9]}]}
    assert fetch(reader, edited)["reason"] == "bad_signature"
    stretched = {**good, "lease_expires_at": good["lease_expires_at"] + 3600}
    assert fetch(reader, stretched)["reason"] == "bad_signature"
    resigned = KVHandle.model_validate(good).signed(b"not-the-holder-secret").model_dump(mode="json")
    assert fetch(reader, resigned)["reason"] == "bad_signature"
    # Expired: the reader refuses it; the holder has freed the blocks.
    expired = publish(short)
    time.sleep(0.5)
    reply = fetch(reader, expired)
    assert reply["reason"] == "expired"
    assert short.call(op="status")["released"] == [BLOCKS]
    # Unknown: the genuine handle works once, then the blocks are released and it is refused.
    before = len(holder.call(op="status")["released"])
    ok = reader.call(op="fetch", handle=good, dst_block_ids=dst, timeout_s=5)
    assert ok["ok"], ok
    wait_all_released(holder, before + 1)
    assert fetch(reader, good)["reason"] == "unknown_handle"
    assert KVHandle.model_validate(good).verify(SECRET.encode())
    # The reader now knows this holder, so its READ runs alongside the claim: a refused claim must
    # still fail the fetch and send no done-notice (the holder keeps the genuine handle's blocks).
    again = publish(holder)
    edited = {**again, "ranks": [{**again["ranks"][0], "block_ids": [7, 8, 9]}]}
    assert fetch(reader, edited)["reason"] == "bad_signature"
    time.sleep(0.3)
    assert len(holder.call(op="status")["released"]) == before + 1
    ok = reader.call(op="fetch", handle=again, dst_block_ids=dst, timeout_s=5)
    assert ok["ok"], ok
    wait_all_released(holder, before + 2)
