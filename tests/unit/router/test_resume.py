"""ResumeState (what a resume sends to workers, the text it continues) and the pure migration decision."""

from __future__ import annotations

import grpc
import pytest
from kvrelay_worker.router.kserve import WorkerFailed, _from_grpc, in_band_failure
from kvrelay_worker.router.migration import GiveUp, Migrate, MigrationPolicy, decide, no_decode_worker
from kvrelay_worker.router.resume import ResumeState
from kvrelay_worker.tokenizer import Tokenizer

SAMPLING = {"max_tokens": 10, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "seed": 42, "ignore_eos": False}


def test_fresh_request_sends_the_original_calls(tokenizer: Tokenizer) -> None:
    state = ResumeState.start("r", [5, 6, 7], SAMPLING, tokenizer, [])
    assert state.position == 0 and state.max_tokens_left == 10 and not state.done
    assert state.prefill_inputs() == ([5, 6, 7], SAMPLING)  # no output_offset: old workers accept it
    with pytest.raises(ValueError):
        state.decode_inputs()
    state.advance(20, None)
    assert state.decode_inputs() == ([5, 6, 7], 20, SAMPLING)


def test_resume_sends_prompt_plus_generated_tokens_at_their_position(tokenizer: Tokenizer) -> None:
    state = ResumeState.start("r", [5, 6, 7], SAMPLING, tokenizer, [])
    for token in (20, 21, 22, 23):
        state.advance(token, None)
    assert state.position == 4 and state.max_tokens_left == 6
    # a prefill worker samples output token 4 of the request from prompt + the 4 generated tokens
    ids, sampling = state.prefill_inputs()
    assert ids == [5, 6, 7, 20, 21, 22, 23]
    assert sampling == {**SAMPLING, "max_tokens": 6, "output_offset": 4}
    # a decode worker goes on after token 3 (the last generated), which it counts as its first output
    ids, first, sampling = state.decode_inputs()
    assert (ids, first) == ([5, 6, 7, 20, 21, 22], 23)
    assert sampling == {**SAMPLING, "max_tokens": 7, "output_offset": 3}
    assert SAMPLING["max_tokens"] == 10  # the original is never modified


def test_logprobs_are_asked_of_every_call_prompt_logprobs_of_the_first_prefill_only(
    tokenizer: Tokenizer,
) -> None:
    """A resume's input holds generated tokens, whose logprobs the client already has: a re-prefill asks
    `logprobs` (for the token it samples) but never `prompt_logprobs`; decode workers never get it."""
    asked = {**SAMPLING, "logprobs": 3, "prompt_logprobs": 3}
    state = ResumeState.start("r", [5, 6, 7], asked, tokenizer, [])
    assert (state.logprobs, state.prompt_logprobs) == (3, 3)
    assert "prompt_logprobs" not in state.sampling and asked["prompt_logprobs"] == 3  # a copy was kept
    assert state.prefill_inputs() == ([5, 6, 7], asked)
    state.advance(20, None)
    assert state.decode_inputs() == ([5, 6, 7], 20, {**SAMPLING, "logprobs": 3})
    state.advance(21, None)
    ids, sampling = state.prefill_inputs()
    assert ids == [5, 6, 7, 20, 21]
    assert sampling == {**SAMPLING, "max_tokens": 8, "output_offset": 2, "logprobs": 3}
    plain = ResumeState.start("r", [5], SAMPLING, tokenizer, [])
    assert plain.logprobs is None and plain.prefill_inputs()[1] == SAMPLING


def test_advance_ends_on_finish_budget_or_stop_string(tokenizer: Tokenizer) -> None:
    eos = tokenizer.eos_token_ids[0]
    state = ResumeState.start("r", [5], SAMPLING, tokenizer, [])
    state.advance(20, None)
    assert state.advance(eos, "stop") == "" and state.done and state.final_reason() == "stop"
    assert state.generated_ids == [20, eos]  # EOS counts as generated, but has no text

    short = ResumeState.start("r", [5], {**SAMPLING, "max_tokens": 2}, tokenizer, [])
    short.advance(20, None)
    short.advance(21, None)
    assert short.done and short.final_reason() == "length"  # budget used up, even without a finish

    final_without_token = ResumeState.start("r", [5], SAMPLING, tokenizer, [])
    assert final_without_token.advance(None, "length") == "" and final_without_token.done


def test_text_continues_across_a_resume_like_an_uninterrupted_run(tokenizer: Tokenizer) -> None:
    """The detokenizer and stop matcher stay in the router: the concatenated text equals one decode."""
    text = "héllo wörld — naïve café, 東京 and 🙂 emoji STOP after"
    ids = tokenizer.encode(text, add_special_tokens=False)
    state = ResumeState.start("r", [5], {**SAMPLING, "max_tokens": 100}, tokenizer, ["STOP"])
    out = []
    for token in ids:
        out.append(state.advance(token, None))
        if len(state.generated_ids) % 3 == 0:  # a resume here and there changes nothing on this side
            assert state.prefill_inputs()[0] == [5, *state.generated_ids]
        if state.done:
            break
    out.append(state.tail())
    assert "".join(out) == text[: text.index(" STOP")] + " "
    assert state.final_reason() == "stop"


def _unavailable(details: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def test_failures_are_classified_by_what_the_worker_said() -> None:
    lost = _from_grpc(_unavailable("Socket closed"), "decode on w")
    assert (lost.worker_down, lost.reason) == (True, "worker_lost")
    drained = _from_grpc(_unavailable("draining: deadline passed"), "decode on w")
    assert (drained.worker_down, drained.reason) == (True, "draining")
    refused = in_band_failure("w", "draining: not admitting new requests")
    assert (refused.worker_down, refused.reason) == (True, "draining")
    # grpc aio's lost status (a stream its worker ended while the client side was open) is a lost worker;
    # a worker's own INTERNAL, with its message, is the request's error.
    broken = _from_grpc(_unavailable("Internal error from Core", grpc.StatusCode.INTERNAL), "decode on w")
    assert (broken.worker_down, broken.reason) == (True, "worker_lost")
    crashed = _from_grpc(_unavailable("Exception iterating responses: boom", grpc.StatusCode.INTERNAL), "w")
    assert (crashed.worker_down, crashed.reason) == (False, None)
    bad = in_band_failure("w", "KV transfer failed: holder unreachable")
    assert (bad.worker_down, bad.reason) == (False, None)
    stalled = WorkerFailed("decode on w: no token for 5 s", False, "stalled")
    assert (stalled.worker_down, stalled.reason) == (False, "stalled")


def test_migration_decision() -> None:
    policy = MigrationPolicy(max_migrations=3)
    lost = WorkerFailed("decode on w: UNAVAILABLE Socket closed", True)
    assert decide(lost, 0, policy) == Migrate("worker_lost")
    assert decide(lost, 2, policy) == Migrate("worker_lost")
    over = decide(lost, 3, policy)
    assert isinstance(over, GiveUp) and over.limit_reached
    assert over.error.status == 500 and over.error.code == "migration_limit_exceeded"
    assert "4 times, over the limit of 3" in over.error.message and "Socket closed" in over.error.message
    never = decide(lost, 0, MigrationPolicy(max_migrations=0))
    assert isinstance(never, GiveUp) and never.limit_reached
    # the request's own failure never migrates: another worker would refuse it too
    kv = decide(in_band_failure("w", "KV transfer failed: x"), 0, policy)
    assert isinstance(kv, GiveUp) and not kv.limit_reached and kv.error.code == "kv_transfer_failed"
    bad = decide(in_band_failure("w", "input_ids: bad"), 0, policy)
    assert isinstance(bad, GiveUp) and bad.error.code == "decode_failed"
    none_left = no_decode_worker(1, "decode on w: UNAVAILABLE")
    assert none_left.status == 503 and "after 1 migration(s); last failure: decode on w" in none_left.message
    assert no_decode_worker(0, None).message == "no ready decode worker"
