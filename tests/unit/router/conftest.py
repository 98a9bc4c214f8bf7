"""Router unit-test fixtures: a byte-level BPE tokenizer directory and in-process KServe v2 stand-in workers.

The stand-ins speak the real wire contract (docs/wire-contracts.md section 3) over real gRPC with a
deterministic toy "model" (next = (prev * 7 + 3) % vocab), so router behaviour (retry, decode death,
cancellation, SSE framing) is tested fast; the e2e tests run the real workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from kvrelay_worker.router.pool import WorkerPool
from kvrelay_worker.tokenizer import Tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

SPECIALS = ["<s>", "</s>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "héllo wörld — naïve café, 東京 and 🙂 emoji",
    "stop here STOP and continue; numbers 0 1 2 3 42 2048",
] * 4


def write_tokenizer_dir(path: Path, chat_template: str | None = None) -> Path:
    """A small byte-level BPE (multi-byte characters split across tokens) plus configs."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config: dict[str, Any] = {"bos_token": "<s>", "eos_token": "</s>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 128, "eos_token_id": 1}))
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(tokenizer_dir)


def toy_next(token: int, vocab: int) -> int:
    """The stand-in model: never EOS (ids 0 and 1 are the special tokens)."""
    return 2 + (token * 7 + 3) % (vocab - 2)


def toy_generate(prompt: list[int], max_tokens: int, vocab: int) -> list[int]:
    out = [toy_next(prompt[-1], vocab)]
    while len(out) < max_tokens:
        out.append(toy_next(out[-1], vocab))
    return out


def toy_logprobs(prev: int, token: int, k: int, vocab: int) -> tuple[float, list[tuple[int, float]]]:
    """The stand-in model's logprob of `token` after `prev`, and its top k (its choice, then the next ids)."""
    best = toy_next(prev, vocab)
    top = [(2 + (best - 2 + j) % (vocab - 2), -0.25 - j) for j in range(k)]
    logprob = -0.25 if token == best else -2.0 - ((prev * 31 + token) % 50) / 10
    return logprob, top


def _add_output(resp: pb.ModelInferResponse, name: str, dtype: str, array: np.ndarray) -> None:
    resp.outputs.add(name=name, datatype=dtype, shape=list(array.shape))
    resp.raw_output_contents.append(array.tobytes())


def add_logprob_outputs(
    resp: pb.ModelInferResponse, names: tuple[str, str, str], pairs: list[tuple[int, int]], k: int, vocab: int
) -> None:
    """The contract's logprob outputs for (prev, token) pairs: logprob [n], top ids and logprobs [n, k]."""
    rows = [toy_logprobs(prev, token, k, vocab) for prev, token in pairs]
    _add_output(resp, names[0], "FP32", np.asarray([lp for lp, _ in rows], np.float32))
    ids = np.asarray([[i for i, _ in top] for _, top in rows], np.int64).reshape(len(rows), k)
    lps = np.asarray([[lp for _, lp in top] for _, top in rows], np.float32).reshape(len(rows), k)
    _add_output(resp, names[1], "INT64", ids)
    _add_output(resp, names[2], "FP32", lps)


TOKEN_OUTPUTS = ("logprob", "top_token_ids", "top_logprobs")
PROMPT_OUTPUTS = ("prompt_logprobs", "prompt_top_token_ids", "prompt_top_logprobs")


def _bytes_tensor(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def _inputs(req: pb.ModelInferRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tensor, raw in zip(req.inputs, req.raw_input_contents, strict=True):
        if tensor.datatype == "BYTES":
            n = struct.unpack_from("<I", raw)[0]
            out[tensor.name] = raw[4 : 4 + n]
        else:
            out[tensor.name] = np.frombuffer(raw, np.int64).tolist()
    return out


@dataclass
class FakeWorker:
    """Behaviour knobs a test flips while the server runs."""

    vocab: int
    fail_prefill: bool = False
    die_after: int | None = None  # decode: abort the stream (UNAVAILABLE) after this many tokens
    # decode: also die when the sequence (prompt + generated) has one of these lengths, taking it out of
    # the set: one set shared by every worker kills a request once at each length, whichever worker runs it
    die_at_len: set[int] = field(default_factory=set)
    die_message: str = "decode worker died"
    die_in_band: bool = False  # decode: fail with an in-band error response instead of UNAVAILABLE
    token_delay_s: float = 0.0
    prefill_delay_s: float = 0.0
    garbage_tokens: bool = False  # decode: emit token id -1 (a worker bug the router must survive)
    prefill_cancelled: int = 0
    prefill_calls: int = 0
    decode_calls: int = 0
    cancelled: int = 0
    sampling_seen: list[dict[str, Any]] = field(default_factory=list)
    handles_seen: list[bytes] = field(default_factory=list)
    prefill_inputs_seen: list[list[int]] = field(default_factory=list)
    decode_requests_seen: list[dict[str, Any]] = field(default_factory=list)  # input_ids, first, sampling


class _Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: FakeWorker) -> None:
        self.state = state

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        self.state.prefill_calls += 1
        if self.state.fail_prefill:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker is failing on purpose")
        values = _inputs(request)
        sampling = json.loads(values["sampling"])
        self.state.sampling_seen.append(sampling)
        self.state.prefill_inputs_seen.append(values["input_ids"])
        try:
            await asyncio.sleep(self.state.prefill_delay_s)
        except asyncio.CancelledError:
            self.state.prefill_cancelled += 1
            raise
        ids, vocab = values["input_ids"], self.state.vocab
        first = toy_next(ids[-1], vocab)
        done = sampling["max_tokens"] == 1
        handle = b"" if done else json.dumps({"prompt": ids}).encode()
        resp = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, dtype, raw in (
            ("token_id", "INT64", np.asarray([first], np.int64).tobytes()),
            ("kv_handle", "BYTES", _bytes_tensor(handle)),
            ("finish_reason", "BYTES", _bytes_tensor(b"length" if done else b"")),
        ):
            resp.outputs.add(name=name, datatype=dtype, shape=[1])
            resp.raw_output_contents.append(raw)
        if "logprobs" in sampling:
            add_logprob_outputs(resp, TOKEN_OUTPUTS, [(ids[-1], first)], sampling["logprobs"], vocab)
        if "prompt_logprobs" in sampling:
            pairs = list(itertools.pairwise(ids))
            add_logprob_outputs(resp, PROMPT_OUTPUTS, pairs, sampling["prompt_logprobs"], vocab)
        return resp

    async def ModelStreamInfer(
        self, request_iterator: Any, context: Any
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        self.state.decode_calls += 1
        request = await anext(aiter(request_iterator))
        values = _inputs(request)
        sampling = json.loads(values["sampling"])
        self.state.handles_seen.append(values["kv_handle"])
        token = values["first_token"][0]
        self.state.decode_requests_seen.append(
            {"input_ids": values["input_ids"], "first_token": token, "sampling": sampling}
        )
        try:
            for i in range(sampling["max_tokens"] - 1):
                length = len(values["input_ids"]) + 1 + i
                at_length = length in self.state.die_at_len
                if at_length or (self.state.die_after is not None and i >= self.state.die_after):
                    self.state.die_at_len.discard(length)
                    if self.state.die_in_band:
                        error = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                        yield pb.ModelStreamInferResponse(
                            error_message=self.state.die_message, infer_response=error
                        )
                        return
                    await context.abort(grpc.StatusCode.UNAVAILABLE, self.state.die_message)
                await asyncio.sleep(self.state.token_delay_s)
                prev = token
                token = -1 if self.state.garbage_tokens else toy_next(token, self.state.vocab)
                resp = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
                resp.outputs.add(name="token_id", datatype="INT64", shape=[1])
                resp.raw_output_contents.append(np.asarray([token], np.int64).tobytes())
                if "logprobs" in sampling:
                    k = sampling["logprobs"]
                    add_logprob_outputs(resp, TOKEN_OUTPUTS, [(prev, token)], k, self.state.vocab)
                if i == sampling["max_tokens"] - 2:
                    resp.parameters["triton_final_response"].bool_param = True
                    resp.parameters["finish_reason"].string_param = "length"
                yield pb.ModelStreamInferResponse(infer_response=resp)
        except asyncio.CancelledError:
            self.state.cancelled += 1
            raise


@contextlib.asynccontextmanager
async def run_fake_worker(vocab: int) -> AsyncIterator[tuple[str, FakeWorker, grpc.aio.Server]]:
    state = FakeWorker(vocab)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(state), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", state, server
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    workers = WorkerPool(health_interval_s=0.2)
    yield workers
    await workers.close()
