"""Torch-free continuous-batching scheduler over a paged KV cache.

A step is one sentence: keep every running request going (one decode token, or the next chunk of
its prompt), then admit waiting requests while the token budget, the sequence limit and the free
blocks allow, chunking the last prompt to fit. The model runner gets a ``SchedulerOutput`` and
hands sampled tokens back to ``update``. Prefill, decode and local recompute are the same rule:
compute ``num_tokens - num_computed_tokens`` tokens and sample once all of them have KV.

With the prefix cache on, a request admitted without blocks first takes the longest run of cached
full blocks that matches its tokens (``BlockPool.lookup``) and starts computing after them; a block
joins the cache once its KV is computed (``update``). At least one token is always computed: its
logits are what the step samples.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvrelay_worker.engine.block_pool import BlockPool
from kvrelay_worker.engine.request import Request, RequestStatus, TokenLogprobs
from kvrelay_worker.engine.sampling_params import SamplingParams
from kvrelay_worker.prefix_hash import BlockHash, chain_hashes, root_hash

log = logging.getLogger(__name__)

_RUNNING = RequestStatus.RUNNING


class RequestRefused(ValueError):
    """The request can never be served by this engine (too long for the cache or the model)."""


@dataclass(frozen=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 64
    max_batch_tokens: int = 2048
    max_model_len: int = 2048
    enable_prefix_caching: bool = True
    cache_salt: str = ""  # mixed into every block hash: what else changes the KV (model, dtype)


@dataclass(slots=True)
class ScheduledSeq:
    """One request's share of a step: compute ``token_ids`` at positions ``start_pos...``."""

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool
    params: SamplingParams
    num_output_tokens: int
    # the request's own lists, no copies: the sampler's token history (penalties, min_tokens); update()
    # appends the sampled token only after the runner has used them
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # the request's prompt positions already scored (params.prompt_logprobs), no copy either: the runner
    # scores only the ones past it, so a recompute after preemption reports none twice
    prompt_logprobs: list[TokenLogprobs]
    matcher: Any = None  # params.grammar: the request's matcher; the runner masks the sampled row by it


@dataclass(slots=True)
class StepLogprobs:
    """What a step scored, for the requests that asked only (``SamplingParams.wants_logprobs``)."""

    sampled: dict[str, TokenLogprobs] = field(default_factory=dict)  # request id -> its sampled token's
    prompt: dict[str, list[TokenLogprobs]] = field(default_factory=dict)  # the next prompt positions'


@dataclass
class KVTarget:
    """Blocks allocated for a remote-KV request; the KV relay reads the prompt's KV into them.

    The prompt's first ``skip_blocks`` blocks were found in this worker's prefix cache: the relay
    reads only the rest, into ``block_ids`` (empty when the cache held the whole prompt).
    """

    request_id: str
    block_ids: list[int]
    num_tokens: int
    skip_blocks: int = 0


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    kv_targets: list[KVTarget] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    # prompt positions computed this step (prefill chunks, recomputes); not the KV read from a relay
    num_prompt_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None
    # prefill-only requests: the blocks that hold the prompt's KV (kept until ``release``)
    kv_block_ids: list[int] | None = None
    num_prompt_tokens: int = 0
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    # params.logprobs: one entry per new token; params.prompt_logprobs: every prompt token's after the
    # first, on the request's first output only
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None


def check_stop(
    request: Request,
    token: int,
    eos_token_ids: frozenset[int],
    max_model_len: int,
    detokenize: Callable[[list[int]], str] | None = None,
) -> RequestStatus | None:
    """Finished status after ``token`` was appended to ``request``, or None to continue."""
    p = request.params
    if token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids):
        return RequestStatus.FINISHED_STOPPED
    # vLLM's min_tokens: no stop string either until then (the sampler bans EOS and stop ids)
    if p.stop and detokenize is not None and p.output_offset + len(request.output_token_ids) > p.min_tokens:
        text = detokenize(request.output_token_ids)
        if any(s in text for s in p.stop):
            return RequestStatus.FINISHED_STOPPED
    if len(request.output_token_ids) >= p.max_tokens or request.num_tokens >= max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def _attach_logprobs(result: RequestOutput, request: Request, logprobs: StepLogprobs) -> None:
    """Give a request's output the logprobs it asked for: its new token's, and on its first output the
    prompt's (complete by then: the prompt's last chunk ran in the step that sampled it)."""
    p = request.params
    if p.logprobs is not None:
        result.logprobs = [logprobs.sampled[request.request_id]]
    # the first output of this call; a decode request (prefill's token as its first) never asks
    if p.prompt_logprobs is not None and len(request.output_token_ids) == 1:
        if len(request.prompt_logprobs) != request.num_prompt_tokens - 1:  # a runner bug, not the client's
            raise RuntimeError(
                f"request {request.request_id}: {len(request.prompt_logprobs)} prompt logprobs for "
                f"{request.num_prompt_tokens} prompt tokens"
            )
        result.prompt_logprobs = list(request.prompt_logprobs)


def blocks_needed(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class Scheduler:
    """Owns requests, their block tables and the block pool; never touches tensors."""

    def __init__(
        self,
        config: SchedulerConfig,
        eos_token_ids: list[int] | None = None,
        detokenize: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.config = config
        self.pool = BlockPool(config.num_blocks)
        self._root_hash = root_hash(config.cache_salt)
        self.num_cache_query_tokens = 0  # since start: tokens looked up in the prefix cache
        self.num_cache_hit_tokens = 0  # of those, found cached
        self.eos_token_ids = frozenset(eos_token_ids or [])
        self.detokenize = detokenize
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.pending_remote: deque[Request] = deque()  # remote-KV requests still without blocks
        self.fetching: dict[str, Request] = {}  # WAITING_FOR_REMOTE_KV

    # ---- admission -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; refuse it if it could never fit the cache or the model length."""
        self._validate(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def add_remote_request(self, request: Request) -> None:
        """Queue a request whose prompt KV arrives from a prefill worker; ``request`` already holds the
        first token in ``output_token_ids``."""
        self._validate(request)
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.pending_remote.append(request)

    def remote_kv_done(self, request_id: str, ok: bool) -> None:
        """The KV relay finished reading (``ok``) or failed; on failure the request recomputes what
        its cached prefix does not cover."""
        request = self.fetching.pop(request_id, None)
        if request is None:
            return
        if ok:
            request.num_computed_tokens = request.num_prompt_tokens
            if self.config.enable_prefix_caching:
                self._register_computed_blocks(request)
        else:
            request.num_computed_tokens = request.num_registered_blocks * self.config.block_size
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def _validate(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise RequestRefused(f"request id {request.request_id!r} is already in use")
        if not request.prompt_token_ids:
            raise RequestRefused("empty prompt: input_ids needs at least one token")
        n = request.num_tokens + 1
        if n > self.config.max_model_len:
            raise RequestRefused(
                f"prompt of {request.num_tokens} tokens leaves no room to generate within "
                f"max_model_len {self.config.max_model_len}"
            )
        if blocks_needed(n, self.config.block_size) > self.pool.num_usable_blocks:
            raise RequestRefused(
                f"prompt of {request.num_tokens} tokens needs more KV blocks than the cache has "
                f"({self.pool.num_usable_blocks} of {self.config.block_size} tokens)"
            )

    # ---- the step ---------------------------------------------------------------------------
    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.pending_remote:
            self._allocate_remote(out)
        budget = self.config.max_batch_tokens
        block_size = self.config.block_size
        seqs = out.seqs
        # Runs once per running request every step: attribute reads and one ScheduledSeq, no calls
        # on the common path (the request keeps its blocks and computes one or more tokens).
        for request in list(self.running):
            if budget <= 0 or request.status != _RUNNING:
                continue
            start = request.num_computed_tokens
            prompt, output = request.prompt_token_ids, request.output_token_ids
            n_prompt = len(prompt)
            total = n_prompt + len(output)
            num_new = total - start if total - start < budget else budget
            if (start + num_new + block_size - 1) // block_size > len(request.block_ids):
                while not self._grow(request, num_new):
                    victim = self.running[-1]
                    self._preempt(victim, out)
                    if victim is request:
                        break
                if request.status != _RUNNING:
                    continue
            budget -= num_new
            if num_new == 1 and start >= n_prompt:  # decode: the last sampled token
                token_ids = [output[start - n_prompt]]
            else:
                token_ids = request.token_ids(start, start + num_new)
                if start < n_prompt:  # a later chunk of a long prompt
                    out.num_prompt_tokens += min(start + num_new, n_prompt) - start
            seqs.append(
                ScheduledSeq(
                    request.request_id,
                    token_ids,
                    start,
                    request.block_ids,  # no copy: nothing changes it before the runner has used it
                    start + num_new == total,
                    request.params,
                    len(output),
                    prompt,
                    output,
                    request.prompt_logprobs,
                    request.matcher,
                )
            )

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            num_new = self._admit_blocks(request, budget)
            if num_new is None:
                if not self.running and self._reclaim_from_waiting(request, out):
                    continue  # nothing runs to free blocks: waiting requests gave theirs back
                break  # wait for blocks to free up; FIFO keeps long prompts from starving
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            self.running.append(request)
            budget -= num_new
            start = request.num_computed_tokens
            if start < request.num_prompt_tokens:  # fetched KV starts past the prompt: nothing counted
                out.num_prompt_tokens += min(start + num_new, request.num_prompt_tokens) - start
            out.seqs.append(self._seq(request, num_new))
        return out

    def _allocate_remote(self, out: SchedulerOutput) -> None:
        """Give fetch targets to pending remote-KV requests, keeping one free block per running
        request so fetches never starve the batch that is already decoding."""
        block_size = self.config.block_size
        while self.pending_remote and len(self.fetching) < self.config.max_num_seqs:
            request = self.pending_remote[0]
            hits: list[int] = []
            if self.config.enable_prefix_caching:
                # Every full prompt block may come from the cache: the relay brings the prompt's KV,
                # nothing of the prompt is computed here.
                hits = self.pool.lookup(self._hashes(request, request.num_prompt_tokens // block_size))
            need = blocks_needed(request.num_prompt_tokens, block_size) - len(hits)
            if self.pool.num_free_after_touch(hits) - need < len(self.running):
                return
            self.pool.touch(hits)
            ids = self.pool.allocate(need)
            assert ids is not None  # the free blocks were counted above
            self.pending_remote.popleft()
            request.block_ids = hits + ids
            request.num_registered_blocks = len(hits)
            if self.config.enable_prefix_caching:
                self.num_cache_query_tokens += request.num_prompt_tokens
                self.num_cache_hit_tokens += len(hits) * block_size
            self.fetching[request.request_id] = request
            target = KVTarget(request.request_id, list(ids), request.num_prompt_tokens, skip_blocks=len(hits))
            out.kv_targets.append(target)

    def _admit_blocks(self, request: Request, budget: int) -> int | None:
        """Give a request about to run the blocks for its next ``num_new`` tokens (returned): cached
        prefix blocks first when it has none, then fresh ones. None, changing nothing, if too few are free."""
        block_size = self.config.block_size
        hits: list[int] = []
        lookup = (
            self.config.enable_prefix_caching
            and not request.block_ids
            and request.params.prompt_logprobs is None  # a cached prefix would leave positions unscored
        )
        if lookup:
            # the last token is always computed, so a block holding it is never taken from the cache
            hits = self.pool.lookup(self._hashes(request, (request.num_tokens - 1) // block_size))
        start = len(hits) * block_size if lookup else request.num_computed_tokens
        num_new = min(request.num_tokens - start, budget)
        extra = blocks_needed(start + num_new, block_size) - len(hits) - len(request.block_ids)
        if extra > self.pool.num_free_after_touch(hits):
            return None
        if hits:
            self.pool.touch(hits)
            request.block_ids = list(hits)
            request.num_registered_blocks = len(hits)
            request.num_computed_tokens = start
        grown = self._grow(request, num_new)
        assert grown  # the free blocks were counted above
        if lookup:
            self.num_cache_query_tokens += request.num_tokens
            self.num_cache_hit_tokens += start
        return num_new

    def _hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The request's first ``num_blocks`` block hashes, extending its chain as needed."""
        have = request.block_hashes
        if len(have) < num_blocks:
            bs = self.config.block_size
            tokens = request.token_ids(len(have) * bs, num_blocks * bs)
            have.extend(chain_hashes(tokens, bs, have[-1] if have else self._root_hash))
        return have[:num_blocks]

    def _register_computed_blocks(self, request: Request) -> None:
        """Put the request's blocks whose KV is now complete into the prefix cache."""
        full = request.num_computed_tokens // self.config.block_size
        hashes = self._hashes(request, full)
        pool, block_ids = self.pool, request.block_ids
        for b in range(request.num_registered_blocks, full):
            pool.register(block_ids[b], hashes[b])
        request.num_registered_blocks = full

    def _grow(self, request: Request, num_new: int) -> bool:
        """Make the block table cover ``num_computed + num_new`` tokens; False if blocks ran out."""
        need = blocks_needed(request.num_computed_tokens + num_new, self.config.block_size)
        extra = need - len(request.block_ids)
        if extra <= 0:
            return True
        ids = self.pool.allocate(extra)
        if ids is None:
            return False
        request.block_ids.extend(ids)
        return True

    def _reclaim_from_waiting(self, head: Request, out: SchedulerOutput) -> bool:
        """Deadlock breaker: waiting requests may hold blocks (fetched KV) while nothing runs. Take
        them back from the newest such request (it recomputes later); True if any were freed."""
        for request in reversed(self.waiting):
            if request is not head and request.block_ids:
                self._free_blocks(request)
                request.num_computed_tokens = 0
                request.status = RequestStatus.PREEMPTED
                out.preempted.append(request.request_id)
                return True
        return False

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Take the blocks back; the request recomputes prompt + output when re-admitted."""
        self.running.remove(request)
        self._free_blocks(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        out.preempted.append(request.request_id)

    def _seq(self, request: Request, num_new: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        return ScheduledSeq(
            request_id=request.request_id,
            token_ids=request.token_ids(start, start + num_new),
            start_pos=start,
            block_ids=request.block_ids,  # no copy: nothing changes it before the runner has used it
            sample=start + num_new == request.num_tokens,
            params=request.params,
            num_output_tokens=len(request.output_token_ids),
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=request.output_token_ids,
            prompt_logprobs=request.prompt_logprobs,
            matcher=request.matcher,
        )

    def update(
        self, out: SchedulerOutput, sampled: dict[str, int], logprobs: StepLogprobs | None = None
    ) -> list[RequestOutput]:
        """Apply a step's results: advance computed counts, append sampled tokens, retire finished.

        ``logprobs``: the runner's scores for the requests that asked (None when none did this step).
        """
        results: list[RequestOutput] = []
        requests = self.requests
        eos, max_len, detokenize = self.eos_token_ids, self.config.max_model_len, self.detokenize
        caching, block_size = self.config.enable_prefix_caching, self.config.block_size
        for seq in out.seqs:
            request = requests.get(seq.request_id)
            if request is None or request.status != _RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += len(seq.token_ids)
            if caching and request.num_computed_tokens >= (request.num_registered_blocks + 1) * block_size:
                self._register_computed_blocks(request)
            if logprobs is not None and seq.request_id in logprobs.prompt:
                request.prompt_logprobs.extend(logprobs.prompt[seq.request_id])
            if not seq.sample:
                continue
            token = sampled[seq.request_id]
            output = request.output_token_ids
            output.append(token)
            if request.matcher is not None and not request.matcher.consume_token(token):
                # the mask allowed it, so only a matcher bug gets here: end the request, never emit past it
                error = request.matcher.get_error()
                log.error("request %s: grammar refused token %d: %s", request.request_id, token, error)
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                output.pop()
                results.append(
                    RequestOutput(request.request_id, [], True, "abort", None, request.num_prompt_tokens)
                )
                continue
            # check_stop inline for the common case: no stop token, no stop string, room left
            p = request.params
            if (
                not p.stop
                and token not in p.stop_token_ids
                and (p.ignore_eos or token not in eos)
                and len(output) < p.max_tokens
                and len(request.prompt_token_ids) + len(output) < max_len
                and not request.prefill_only
            ):
                results.append(
                    RequestOutput(
                        request.request_id,
                        [token],
                        False,
                        None,
                        None,
                        0,
                        request.arrival_time,
                        request.first_scheduled_time,
                    )
                )
                if logprobs is not None:
                    _attach_logprobs(results[-1], request, logprobs)
                continue
            status = check_stop(request, token, eos, max_len, detokenize)
            if status is not None:
                self._finish(request, status)
                results.append(
                    RequestOutput(
                        request.request_id,
                        [token],
                        True,
                        status.finish_reason,
                        None,
                        request.num_prompt_tokens,
                    )
                )
            elif request.prefill_only:
                # Prompt KV is complete: keep the blocks for the reader, leave the batch.
                self.running.remove(request)
                request.status = RequestStatus.SENDING_KV
                results.append(
                    RequestOutput(
                        request.request_id,
                        [token],
                        False,
                        None,
                        list(request.block_ids),
                        request.num_prompt_tokens,
                    )
                )
            else:
                results.append(RequestOutput(request.request_id, [token], False))
            results[-1].arrival_time = request.arrival_time
            results[-1].first_scheduled_time = request.first_scheduled_time
            if logprobs is not None:
                _attach_logprobs(results[-1], request, logprobs)
        return results

    # ---- release / abort --------------------------------------------------------------------
    def release(self, request_id: str) -> bool:
        """Free a SENDING_KV request's blocks once the reader has them (or its lease expired)."""
        request = self.requests.get(request_id)
        if request is None or request.status != RequestStatus.SENDING_KV:
            return False
        self._finish(request, RequestStatus.FINISHED_STOPPED)
        return True

    def abort(self, request_id: str) -> bool:
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.pending_remote:
            self.pending_remote.remove(request)
        self.fetching.pop(request_id, None)
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        return True

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request in self.running:
            self.running.remove(request)
        request.status = status
        self._free_blocks(request)
        self.requests.pop(request.request_id, None)

    def _free_blocks(self, request: Request) -> None:
        if request.block_ids:
            self.pool.free(request.block_ids)
            request.block_ids = []
            request.num_registered_blocks = 0

    # ---- introspection ------------------------------------------------------------------------
    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.pending_remote)

    @property
    def num_queued_prefill_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)

    @property
    def num_held(self) -> int:
        """Requests holding blocks for a remote reader (prefill role)."""
        return sum(1 for r in self.requests.values() if r.status == RequestStatus.SENDING_KV)
