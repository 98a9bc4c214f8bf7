"""Engine API used by the server and the KV relay: prefill-only, remote KV, recompute, refusal."""

from __future__ import annotations

import pytest
import torch
from kvrelay_worker.engine import RequestRefused, RequestStatus, SamplingParams

PROMPT = [11, 22, 33, 44, 55, 66, 77, 88, 99, 101, 202]


def test_prefill_only_holds_blocks_until_release(make_engine, reference) -> None:
    engine = make_engine(num_blocks=32, block_size=4)
    engine.add_request("p", PROMPT, SamplingParams(max_tokens=8), now=0.0, prefill_only=True)
    (out,) = engine.step(now=0.0).outputs
    assert out.new_token_ids == reference(PROMPT, 1)
    assert not out.finished and out.kv_block_ids == [1, 2, 3]  # ceil(11 / 4) blocks, first ids
    assert engine.status("p") == RequestStatus.SENDING_KV
    assert not engine.has_work() and engine.scheduler.pool.num_used_blocks == 3
    assert engine.release("p") and engine.scheduler.pool.num_used_blocks == 0
    assert not engine.release("p")


def test_prefill_only_finishing_at_first_token_frees_at_once(make_engine) -> None:
    engine = make_engine(num_blocks=32, block_size=4)
    engine.add_request("p", PROMPT, SamplingParams(max_tokens=1), now=0.0, prefill_only=True)
    (out,) = engine.step(now=0.0).outputs
    assert out.finished and out.finish_reason == "length" and out.kv_block_ids is None


def test_remote_kv_handoff_between_engines_matches_reference(make_engine, reference) -> None:
    """Copy the prefill engine's blocks into the decode engine's target blocks (what the relay does)."""
    ref = reference(PROMPT, 10)
    prefill = make_engine(num_blocks=32, block_size=4)
    decode = make_engine(num_blocks=32, block_size=4)
    prefill.add_request("r", PROMPT, SamplingParams(max_tokens=10), now=0.0, prefill_only=True)
    (first,) = prefill.step(now=0.0).outputs
    decode.add_request("other", [5, 6, 7], SamplingParams(max_tokens=3), now=0.0)  # shift block ids
    decode.step(now=0.0)
    token, params = first.new_token_ids[0], SamplingParams(max_tokens=10)
    decode.add_decode_request("r", PROMPT, token, params, now=0.0, remote_kv=True)
    step = decode.step(now=1.0)
    (target,) = step.kv_targets
    assert target.num_tokens == len(PROMPT) and len(target.block_ids) == 3
    assert decode.status("r") == RequestStatus.WAITING_FOR_REMOTE_KV
    src = torch.tensor(first.kv_block_ids)
    dst = torch.tensor(target.block_ids)
    decode.kv_cache[:, :, dst] = prefill.kv_cache[:, :, src]
    prefill.release("r")
    decode.remote_kv_done("r", ok=True)
    tokens = list(first.new_token_ids)
    while decode.has_work():
        tokens += [t for o in decode.step(now=2.0).outputs if o.request_id == "r" for t in o.new_token_ids]
    assert tokens == ref


@pytest.mark.parametrize("use_remote", [True, False])
def test_recompute_paths_match_reference(make_engine, reference, use_remote: bool) -> None:
    ref = reference(PROMPT, 9)
    decode = make_engine(num_blocks=32, block_size=4)
    params = SamplingParams(max_tokens=9)
    if use_remote:  # the fetch failed: recompute into the blocks already allocated
        decode.add_decode_request("r", PROMPT, ref[0], params, now=0.0, remote_kv=True)
        assert decode.step(now=0.0).kv_targets
        decode.remote_kv_done("r", ok=False)
    else:  # empty handle: recompute from the start
        decode.add_decode_request("r", PROMPT, ref[0], params, now=0.0, remote_kv=False)
    tokens = [ref[0]]
    while decode.has_work():
        tokens += [t for o in decode.step(now=1.0).outputs for t in o.new_token_ids]
    assert tokens == ref


def test_refusals_are_clear(make_engine) -> None:
    engine = make_engine(num_blocks=5, block_size=4, max_model_len=64)
    with pytest.raises(RequestRefused, match="more KV blocks"):
        engine.add_request("big", list(range(5, 30)), SamplingParams(), now=0.0)
    with pytest.raises(RequestRefused, match="max_model_len"):
        make_engine(num_blocks=64, block_size=4, max_model_len=16).add_request(
            "long", list(range(5, 25)), SamplingParams(), now=0.0
        )
    with pytest.raises(RequestRefused, match="vocabulary"):
        engine.add_request("bad", [1, 10**6], SamplingParams(), now=0.0)
    with pytest.raises(RequestRefused, match="empty prompt"):
        engine.add_request("empty", [], SamplingParams(), now=0.0)
    engine.add_request("ok", [5, 6], SamplingParams(max_tokens=2), now=0.0)
    with pytest.raises(RequestRefused, match="already in use"):
        engine.add_request("ok", [5, 6], SamplingParams(), now=0.0)
    engine.abort("ok")


def test_out_of_blocks_waits_then_runs(make_engine) -> None:
    """Two requests that cannot both fit: the second waits in the queue, then completes."""
    engine = make_engine(num_blocks=7, block_size=4, max_num_seqs=4)  # 6 usable blocks
    engine.add_request("a", list(range(5, 21)), SamplingParams(max_tokens=4), now=0.0)  # 4 blocks + growth
    engine.add_request("b", list(range(5, 17)), SamplingParams(max_tokens=4), now=0.0)  # 3 blocks
    done = {o.request_id: o.new_token_ids for o in engine.step(now=0.0).outputs}
    assert engine.status("b") == RequestStatus.WAITING
    assert engine.scheduler.num_queued_prefill_tokens == 12
    while engine.has_work():
        for o in engine.step(now=1.0).outputs:
            done.setdefault(o.request_id, []).extend(o.new_token_ids)
    assert len(done["a"]) == 4 and len(done["b"]) == 4


def test_stop_tokens_and_abort(make_engine, reference) -> None:
    ref = reference(PROMPT, 6)
    engine = make_engine(num_blocks=32, block_size=4)
    out = engine.generate([PROMPT], SamplingParams(max_tokens=20, stop_token_ids=[ref[3]]))[0]
    assert out == ref[: ref.index(ref[3]) + 1]
    out = engine.generate([PROMPT], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert len(out) == 20
    engine.add_request("x", PROMPT, SamplingParams(max_tokens=50), now=0.0)
    engine.step(now=0.0)
    assert engine.abort("x") and not engine.has_work()


def test_stop_strings_use_the_detokenizer(tiny_dir) -> None:
    from kvrelay_worker.engine import Engine, EngineConfig

    engine = Engine.from_dir(tiny_dir, EngineConfig(num_blocks=32, block_size=4))
    free = engine.generate([PROMPT], SamplingParams(max_tokens=12))[0]
    text = engine.scheduler.detokenize(free)
    needle = text[len(text) // 2 : len(text) // 2 + 2]
    assert needle.strip(), text
    stopped = engine.generate([PROMPT], SamplingParams(max_tokens=12, stop=[needle]))[0]
    assert len(stopped) < len(free) and needle in engine.scheduler.detokenize(stopped)
    assert engine.scheduler.pool.num_used_blocks == 0


def test_scheduler_breaks_block_deadlock_between_waiting_requests() -> None:
    """Nothing runs, the queue head needs blocks that fetched-but-waiting requests hold: the
    scheduler takes them back (those requests recompute later) instead of stalling forever."""
    from kvrelay_worker.engine import Request
    from kvrelay_worker.engine.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(num_blocks=6, block_size=4, max_num_seqs=4, max_batch_tokens=64))
    params = SamplingParams(max_tokens=3)
    for rid in ("a", "b"):
        sched.add_remote_request(Request(rid, list(range(10, 18)), params, 0.0, output_token_ids=[99]))
    assert [t.block_ids for t in sched.schedule(0.0).kv_targets] == [[1, 2], [3, 4]]
    sched.add_request(Request("c", list(range(20, 28)), params, 0.0))
    sched.remote_kv_done("a", ok=True)
    sched.remote_kv_done("b", ok=True)
    out = sched.schedule(0.0)  # c needs 2 blocks, 1 is free, nothing runs: b gives its 2 back
    assert out.preempted == ["b"] and [s.request_id for s in out.seqs] == ["c", "a"]
    finished = set()
    for _ in range(50):
        out = sched.schedule(0.0)
        finished |= {
            o.request_id for o in sched.update(out, {s.request_id: 7 for s in out.seqs}) if o.finished
        }
        if not sched.has_work():
            break
    assert finished == {"a", "b", "c"} and sched.pool.num_used_blocks == 0


def test_many_remote_requests_on_a_small_cache_all_finish(make_engine, reference) -> None:
    """Fetched-but-waiting requests hold blocks; the scheduler must still make progress."""
    engine = make_engine(num_blocks=9, block_size=4, max_num_seqs=4)  # 8 usable blocks
    prompts = [[10 + i, 20 + i, 30 + i, 40 + i, 50 + i, 60 + i, 70 + i] for i in range(6)]  # 2 blocks each
    refs = [reference(p, 6) for p in prompts]
    for i, (prompt, ref) in enumerate(zip(prompts, refs, strict=True)):
        params = SamplingParams(max_tokens=6)
        engine.add_decode_request(str(i), prompt, ref[0], params, now=0.0, remote_kv=True)
    tokens = {str(i): [ref[0]] for i, ref in enumerate(refs)}
    for _ in range(200):
        if not engine.has_work() and not engine.scheduler.fetching:
            break
        step = engine.step(now=0.0)
        for target in step.kv_targets:  # the relay "fails": recompute into the allocated blocks
            engine.remote_kv_done(target.request_id, ok=False)
        for o in step.outputs:
            tokens[o.request_id].extend(o.new_token_ids)
    assert [tokens[str(i)] for i in range(6)] == refs


def _run(engine, now: float = 0.0) -> int:
    """Step until idle; the prompt tokens the steps computed."""
    computed = 0
    while engine.has_work():
        computed += engine.step(now).num_prompt_tokens
    return computed


def test_steps_count_the_prompt_tokens_they_compute(make_engine, reference) -> None:
    """What `kvrelay_prompt_tokens_computed_total` counts: chunked prefill and recompute, not relayed KV."""
    # 11 tokens in chunks 4, 4, 3; no prefix cache here (the next test counts with it)
    engine = make_engine(num_blocks=32, block_size=4, max_batch_tokens=4, enable_prefix_caching=False)
    engine.add_request("p", PROMPT, SamplingParams(max_tokens=3), now=0.0)
    assert _run(engine) == len(PROMPT)
    first = reference(PROMPT, 1)[0]
    engine.add_decode_request("relayed", PROMPT, first, SamplingParams(max_tokens=3), now=0.0, remote_kv=True)
    (target,) = engine.step(0.0).kv_targets
    engine.remote_kv_done(target.request_id, ok=True)
    assert _run(engine) == 0  # the first token's KV is computed, but it is no prompt token
    engine.add_decode_request("failed", PROMPT, first, SamplingParams(max_tokens=3), now=0.0, remote_kv=True)
    (target,) = engine.step(0.0).kv_targets
    engine.remote_kv_done(target.request_id, ok=False)
    assert _run(engine) == len(PROMPT)
    engine.add_decode_request("empty", PROMPT, first, SamplingParams(max_tokens=3), now=0.0, remote_kv=False)
    assert _run(engine) == len(PROMPT)


def test_a_cached_prefix_is_not_computed_again(make_engine, reference) -> None:
    """With the prefix cache, a prompt seen before computes only what follows its cached full blocks,
    and the output is the same."""
    engine = make_engine(num_blocks=32, block_size=4, max_batch_tokens=4)
    outputs = engine.generate([PROMPT], SamplingParams(max_tokens=3))
    before = engine.stats()
    computed = 0
    engine.add_request("again", PROMPT, SamplingParams(max_tokens=3), now=0.0)
    tokens: list[int] = []
    while engine.has_work():
        step = engine.step(0.0)
        computed += step.num_prompt_tokens
        tokens += [t for o in step.outputs for t in o.new_token_ids]
    assert tokens == outputs[0] == reference(PROMPT, 3)
    after = engine.stats()
    queried = after.num_cache_query_tokens - before.num_cache_query_tokens
    hit = after.num_cache_hit_tokens - before.num_cache_hit_tokens
    # 11 prompt tokens: the two full blocks (8 tokens) were cached, the last 3 are computed
    assert (queried, hit, computed) == (len(PROMPT), 8, len(PROMPT) - 8)
    assert engine.stats().num_cached_blocks >= 2 and engine.stats().kv_cache_usage == 0.0
