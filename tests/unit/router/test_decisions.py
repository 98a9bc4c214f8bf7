"""Pure decisions: worker choice, request checks, EndpointSlice addresses."""

from __future__ import annotations

import pytest
from kvrelay_worker.router.discovery import addresses_from_slices, role_selector
from kvrelay_worker.router.errors import OpenAIError
from kvrelay_worker.router.protocol import (
    MAX_PROMPTS,
    ChatCompletionRequest,
    CompletionRequest,
    completion_prompts,
    parse_body,
    reject_unsupported,
    resolve_max_tokens,
)
from kvrelay_worker.router.routing import WorkerLoad, choose_decode, choose_prefill


def loads(*specs: tuple[str, bool, int, int]) -> list[WorkerLoad]:
    return [WorkerLoad(a, h, q, r, i) for i, (a, h, q, r) in enumerate(specs)]


def test_prefill_least_queued_tokens_wins() -> None:
    pool = loads(("a", True, 500, 0), ("b", True, 20, 9), ("c", False, 0, 0))
    assert choose_prefill(pool) == "b"  # c is idle but unhealthy
    assert choose_prefill(pool, exclude={"b"}) == "a"
    assert choose_prefill(pool, exclude={"a", "b"}) is None


def test_decode_fewest_running_wins_and_ties_rotate() -> None:
    pool = loads(("a", True, 0, 3), ("b", True, 0, 1), ("c", True, 0, 1))
    assert choose_decode(pool) == "b"
    idle = loads(("a", True, 0, 0), ("b", True, 0, 0), ("c", True, 0, 0))
    assert [choose_decode(idle, turn=t) for t in range(4)] == ["a", "b", "c", "a"]
    assert [choose_prefill(idle, turn=t) for t in range(3)] == ["a", "b", "c"]


def test_ties_rotate_whatever_the_orders() -> None:
    """Orders come from one counter over both roles and re-discoveries: 1 and 3 must still alternate."""
    gapped = [WorkerLoad("x", True, 0, 0, 1), WorkerLoad("y", True, 0, 0, 3)]
    assert [choose_decode(gapped, turn=t) for t in range(4)] == ["x", "y", "x", "y"]
    assert [choose_prefill(gapped, turn=t) for t in range(4)] == ["x", "y", "x", "y"]
    # An unhealthy worker keeps its place in the round; its turn goes to the next healthy one.
    three = [WorkerLoad("x", True, 0, 0, 2), WorkerLoad("y", False, 0, 0, 5), WorkerLoad("z", True, 0, 0, 9)]
    assert [choose_decode(three, turn=t) for t in range(3)] == ["x", "z", "z"]


def test_no_healthy_worker_gives_none() -> None:
    assert choose_decode(loads(("a", False, 0, 0))) is None
    assert choose_prefill([]) is None


def test_resolve_max_tokens() -> None:
    assert resolve_max_tokens(None, 10, 100, 16) == 16
    assert resolve_max_tokens(None, 90, 100, 16) == 10  # the default shrinks to what fits
    assert resolve_max_tokens(None, 10, 100, None) == 90  # chat: fill the context
    assert resolve_max_tokens(90, 10, 100, 16) == 90
    for requested, prompt in ((91, 10), (None, 100), (1, 0)):
        with pytest.raises(OpenAIError) as info:
            resolve_max_tokens(requested, prompt, 100, 16)
        assert info.value.status == 400


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"model": "m", "prompt": "x", "temperature": -1}', "temperature"),
        (b'{"model": "m", "prompt": "x", "top_p": 1.5}', "top_p"),
        (b'{"model": "m", "prompt": 3}', "prompt"),
        (b'{"model": "m"}', "prompt"),
        (b"\xff\xfe", None),
    ],
)
def test_parse_body_errors_name_the_param(raw: bytes, param: str | None) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_body(raw, CompletionRequest)
    assert info.value.status == 400
    if param is not None:
        assert info.value.param is not None and info.value.param.startswith(param)


def test_unsupported_features_are_refused() -> None:
    chat = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    reject_unsupported(chat)
    for extra in ({"functions": [{"name": "f"}]}, {"top_logprobs": 2}, {"store": True}):
        bad = chat.model_copy(update=extra)
        with pytest.raises(OpenAIError):
            reject_unsupported(bad)


def test_completion_prompt_forms() -> None:
    def make(prompt: object) -> CompletionRequest:
        return CompletionRequest.model_validate({"model": "m", "prompt": prompt})

    assert completion_prompts(make("hi")) == ["hi"]
    assert completion_prompts(make([1, 2])) == [[1, 2]]
    assert completion_prompts(make([[1, 2]])) == [[1, 2]]
    assert completion_prompts(make(["only"])) == ["only"]
    assert completion_prompts(make([[1], [2]])) == [[1], [2]]
    assert completion_prompts(make(["a"] * MAX_PROMPTS)) == ["a"] * MAX_PROMPTS
    with pytest.raises(OpenAIError) as info:
        completion_prompts(make(["a"] * (MAX_PROMPTS + 1)))
    assert (info.value.param, info.value.code) == ("prompt", "invalid_value")


def test_addresses_from_endpointslices() -> None:
    slices = {
        "s1": {
            "ports": [{"name": "metrics", "port": 9000}, {"name": "grpc", "port": 8001}],
            "endpoints": [
                {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": False}},
                {"addresses": ["10.0.0.1"], "conditions": {}},  # unknown readiness counts as ready
            ],
        },
        "s2": {"ports": [{"name": "grpc", "port": 8001}], "endpoints": [{"addresses": ["fd00::5"]}]},
        "s3": {
            "ports": [{"name": "other", "port": 1}, {"name": "x", "port": 2}],
            "endpoints": [{"addresses": ["9.9.9.9"]}],
        },
        "s4": {"ports": None, "endpoints": None},
    }
    assert addresses_from_slices(slices, "grpc") == ["10.0.0.1:8001", "10.0.0.2:8001", "[fd00::5]:8001"]
    assert role_selector("llama", "decode") == "app.kubernetes.io/instance=llama,kvrelay.dev/role=decode"
