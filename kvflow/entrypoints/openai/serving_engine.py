"""What completions and chat completions share: model names, validation, generation, SSE."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from kvflow.engine.async_llm import AsyncLLM
from kvflow.engine.protocol import MultiModalFeature
from kvflow.engine.streams import RequestOutputCollector
from kvflow.engine.token_bytes import TokenBytes
from kvflow.entrypoints.openai.body import ByteBudget, read_body
from kvflow.entrypoints.openai.body import parse as parse_body
from kvflow.entrypoints.openai.errors import OpenAIError, error_body, error_from_exception
from kvflow.entrypoints.openai.limits import ServerLimits
from kvflow.entrypoints.openai.protocol import SamplingRequest, UsageInfo
from kvflow.entrypoints.openai.request_checks import BodyShape, PromptBound
from kvflow.entrypoints.openai.serving_models import LoRAModulePath, OpenAIServingModels
from kvflow.entrypoints.openai.structured_request import structured_outputs_of
from kvflow.entrypoints.openai.template_sandbox import TemplateSandbox
from kvflow.errors import EngineDeadError
from kvflow.lora.request import LoRARequest
from kvflow.metrics import ServerMetrics
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger(__name__)

T = TypeVar("T")

PREPROCESS_THREADS = 4
# How much a tokenizer may shrink text before splitting it (NFC composes 3 bytes into 2; a
# literal "▁" of 3 bytes becomes a SentencePiece space of 1).
SHRINK_FACTOR = 3.0
RETRY_AFTER_S = 1
SMALL_BODY_BYTES = 1 << 20  # bodies up to this size are read at once; larger ones...
BODY_BUDGET_BODIES = 16  # ...arrive within a budget of this many largest bodies, and...
LARGE_PARSES = 2  # ...are parsed this many at a time

# Known parameters the engine cannot honour yet, with the values that are harmless.
_REFUSED: list[tuple[str, Callable[[Any, SamplingRequest], bool], str]] = [
    ("best_of", lambda v, r: v is None or v == r.n, "best_of other than n is not supported"),
    ("use_beam_search", lambda v, r: not v, "beam search is not supported"),
    ("length_penalty", lambda v, r: v is None or v == 1.0, "length_penalty needs beam search"),
    # vLLM's removed guided_* fields: structured_outputs or response_format replace them
    ("guided_json", lambda v, r: v is None, "use structured_outputs or response_format"),
    ("guided_regex", lambda v, r: v is None, "use structured_outputs"),
    ("guided_choice", lambda v, r: v is None, "use structured_outputs"),
    ("guided_grammar", lambda v, r: v is None, "use structured_outputs"),
    ("guided_decoding_backend", lambda v, r: v is None, "one backend (llguidance)"),
    ("suffix", lambda v, r: not v, "suffix (fill-in-the-middle) is not supported"),
    ("tools", lambda v, r: not v, "tool calling is not supported yet"),
    ("tool_choice", lambda v, r: v in (None, "none"), "tool calling is not supported yet"),
    ("functions", lambda v, r: not v, "function calling is not supported yet"),
    ("function_call", lambda v, r: v in (None, "none"), "function calling is not supported yet"),
    ("documents", lambda v, r: not v, "documents are not supported"),
    ("modalities", lambda v, r: v is None or list(v) == ["text"], "only text output is supported"),
    ("audio", lambda v, r: v is None, "audio output is not supported"),
    ("prediction", lambda v, r: v is None, "predicted outputs are not supported"),
    ("web_search_options", lambda v, r: v is None, "web search is not supported"),
    ("echo", lambda v, r: not v or not hasattr(r, "messages"), "echo is not supported in chat"),
]


@dataclass
class ServingContext:
    """The engine and what every handler needs to know about the served model."""

    engine: AsyncLLM
    served_model_names: list[str]
    metrics: ServerMetrics
    limits: ServerLimits = field(default_factory=ServerLimits)
    lora_modules: Sequence[LoRAModulePath] = ()  # --lora-modules: init_static_loras loads them
    in_flight: set[str] = field(default_factory=set)  # request ids, aborted on shutdown

    def __post_init__(self) -> None:
        self.models = OpenAIServingModels(self.engine, self.served_model_names, self.lora_modules)
        # Parsing, tokenizing, rendering and validating run here, never on the event loop.
        self.pool = ThreadPoolExecutor(max_workers=PREPROCESS_THREADS,
                                       thread_name_prefix="kvflow-preprocess")
        self.body_budget = ByteBudget(BODY_BUDGET_BODIES * self.limits.max_body_bytes)
        self.large_parses = asyncio.Semaphore(LARGE_PARSES)
        # Client templates wait for the one sandbox worker here, never in `pool`.
        self.template_pool = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="kvflow-template")
        self.pending = 0  # sequences being queued in the engine right now
        self.body_shape = BodyShape(self.limits, self.max_model_len, self.vocab_size)
        self.token_bytes = TokenBytes(self.engine.get_tokenizer())
        self.prompt_bound = PromptBound(
            self.max_model_len, self.token_bytes.max_token_bytes,
            SHRINK_FACTOR if self.token_bytes.may_shrink_text else 1.0)
        config = self.engine.config
        self.max_num_seqs = config.scheduler_config.max_num_seqs
        dp = config.data_parallel_config  # each replica runs and queues its own share
        self.capacity = (dp.size if dp else 1) * (self.max_num_seqs + self.limits.waiting_bound(
            self.max_num_seqs, self.engine.engine_core.num_kv_blocks))
        from kvflow.multimodal.media import MediaLimits

        mm = config.mm_config
        self.media_limits = MediaLimits.from_env(mm.allowed_local_media_path if mm else None)
        self.sandbox: TemplateSandbox | None = None
        if self.limits.trust_request_chat_template:
            self.sandbox = TemplateSandbox(timeout_s=self.limits.chat_template_timeout_s,
                                           max_output_chars=self.prompt_bound.max_bytes)
            # its worker process starts in the background (~0.1 s, not on a request's time)
            self.template_pool.submit(self.sandbox.render, "", [],
                                      add_generation_prompt=False, special_tokens={})

    def close(self) -> None:
        """Stop the preprocessing threads and the template sandbox's process."""
        if self.sandbox is not None:
            self.sandbox.close()
        for pool in (self.pool, self.template_pool):
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def model_name(self) -> str:
        return self.models.model_name

    @property
    def max_model_len(self) -> int:
        return int(self.engine.config.model_config.max_model_len)

    @property
    def vocab_size(self) -> int:
        return int(self.engine.config.model_config.vocab_size)

    async def run(self, fn: Callable[..., T], *args: Any,
                  pool: ThreadPoolExecutor | None = None) -> T:
        """fn(*args) in the preprocessing pool; the event loop only waits for it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool or self.pool, functools.partial(fn, *args))

    async def parse(self, raw: Request, model: Any) -> Any:
        """The request body as `model`: bounded in size and time, parsed off the loop.

        Large bodies are held within a byte budget while they arrive (a slow client holds
        only its own share) and parsed a few at a time (parsing multiplies their size).
        """
        limits = self.limits
        announced = raw.headers.get("content-length", "")
        size = int(announced) if announced.isdigit() else limits.max_body_bytes
        if size <= SMALL_BODY_BYTES:
            data = await read_body(raw, limits.max_body_bytes, limits.request_read_timeout_s)
            return await self.run(parse_body, data, model, self.body_shape.check)
        async with self.body_budget.hold(min(size, limits.max_body_bytes)):
            data = await read_body(raw, limits.max_body_bytes, limits.request_read_timeout_s)
            async with self.large_parses:
                return await self.run(parse_body, data, model, self.body_shape.check)

    async def check_ready(self, name: str | None) -> LoRARequest | None:
        """The adapter `name` picks (None: the base model); 404 for an unknown model, 503 once
        the engine is dead: before any stream starts."""
        lora = self.check_model(name)
        try:
            await self.engine.check_health()
        except EngineDeadError as exc:
            raise OpenAIError(str(exc), 503) from exc
        return lora

    def check_model(self, name: str | None) -> LoRARequest | None:
        """404 unless the name is served: a name of the base model (an absent name means the
        first), or a LoRA adapter's, whose LoRARequest is returned."""
        return self.models.resolve(name)

    def check_capacity(self, sequences: int, param: str = "n") -> None:
        """400 if the request could never be taken, 503 while too many requests wait."""
        if sequences > self.capacity:
            raise OpenAIError(
                f"this request asks for {sequences} sequences (prompts x n) but the server takes "
                f"at most {self.capacity} at once", 400, param)
        tracked = self.engine.get_num_unfinished_requests() + self.pending
        if tracked + sequences > self.capacity:
            self.metrics.overloaded()
            raise OpenAIError(
                "the server is overloaded: too many requests are waiting; retry later", 503,
                headers={"Retry-After": str(RETRY_AFTER_S)})

    async def tokenize(self, text: str, add_special_tokens: bool, param: str,
                       bounded: bool = True) -> list[int]:
        """Token ids, in the pool; a text that cannot fit the context is refused before."""
        if bounded:
            self.prompt_bound.check(text, param)
        kwargs = {"add_special_tokens": add_special_tokens}
        try:
            _, ids = await self.run(self.engine.processor.tokenize, text, kwargs)
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, param) from exc
        return ids

    async def load_images(self, urls: list[Any], prompt: str, ids: list[int]
                          ) -> tuple[list[Any], list[int], list[MultiModalFeature]]:
        """Fetch and decode a chat's images (concurrently, off the event loop), preprocess
        them with the model's processor: (images, token ids with placeholders expanded,
        the images' features). Any failure is a 400 naming the problem."""
        from kvflow.multimodal.media import load_image

        try:
            images = await asyncio.gather(*(load_image(url, self.media_limits) for url in urls))
            _, expanded, features = await self.run(self.engine.processor.process, {
                "prompt": prompt, "prompt_token_ids": ids,
                "multi_modal_data": {"image": list(images)}})
        except ValueError as exc:
            raise OpenAIError(str(exc), 400, "messages") from exc
        return list(images), expanded, features or []

    async def validate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       priority: int, prompt_param: str, lora: LoRARequest | None = None,
                       images: list[MultiModalFeature] | None = None) -> None:
        """Run the engine's checks now (in the pool): a bad request is a 400 before streaming."""
        try:
            await self.run(self.engine.processor.make_request, request_id, prompt_ids, params,
                           None, priority, lora, images)
        except ValueError as exc:
            error = error_from_exception(exc)
            if error.param is None and "prompt" in error.message.split(" ", 2)[:2]:
                error.param = prompt_param  # "prompt token ids ...", "the prompt is ..."
            raise error from exc

    async def start(self, request_id: str, prompt_text: str | None, prompt_ids: list[int],
                    params: SamplingParams, priority: int, lora: LoRARequest | None = None,
                    images: list[Any] | None = None,
                    trace_headers: Mapping[str, str] | None = None
                    ) -> AsyncIterator[RequestOutput]:
        """Queue the request in the engine now, then stream it (tracked for metrics).

        Queued now, not when a streaming response starts iterating: that could be after other
        requests passed the capacity check, and overload control would not hold.
        """
        prompt: dict[str, Any] = {"prompt_token_ids": prompt_ids, "prompt": prompt_text}
        if images:  # processed again in the engine: the processor cache makes that a lookup
            prompt["multi_modal_data"] = {"image": images}
        self.pending += params.n
        try:
            async with self.models.queuing(lora) as current:
                collector = await self.engine.add_request(request_id, prompt, params,
                                                          lora_request=current,
                                                          priority=priority,
                                                          trace_headers=trace_headers)
        finally:
            self.pending -= params.n
        if len(self.in_flight) > 2 * self.capacity:  # ids of streams that never started
            self.in_flight = {r for r in self.in_flight if self.engine.is_unfinished(r)}
        self.in_flight.add(request_id)
        return self._stream(request_id, collector)

    async def _stream(self, request_id: str, collector: RequestOutputCollector
                      ) -> AsyncIterator[RequestOutput]:
        tracker = self.metrics.track_request()
        try:
            # aclosing: closing this generator must close the engine's (that aborts it)
            async with contextlib.aclosing(
                self.engine.stream_outputs(request_id, collector)
            ) as outputs:
                async for out in outputs:
                    tracker.observe(out)
                    yield out
        finally:
            self.in_flight.discard(request_id)
            tracker.finish()

    async def start_all(self, requests: Sequence[tuple[str, str | None, list[int],
                                                       SamplingParams]],
                        priority: int, lora: LoRARequest | None = None,
                        trace_headers: Mapping[str, str] | None = None
                        ) -> list[AsyncIterator[RequestOutput]]:
        """start() each; if one fails, those already queued are aborted before raising."""
        streams: list[AsyncIterator[RequestOutput]] = []
        try:
            for request_id, text, ids, params in requests:
                streams.append(await self.start(request_id, text, ids, params, priority, lora,
                                                trace_headers=trace_headers))
        except BaseException:
            started = [r[0] for r in requests[:len(streams)]]
            await self.engine.abort(started)
            self.in_flight.difference_update(started)
            raise
        return streams

    async def abort_all(self) -> None:
        """End every in-flight request (their streams finish with finish_reason "abort")."""
        if self.in_flight:
            logger.info("aborting %d in-flight requests", len(self.in_flight))
            await self.engine.abort(list(self.in_flight))


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def refuse_unsupported(request: SamplingRequest) -> None:
    """Parameters the engine cannot honour are a 400 naming them, never silently ignored."""
    for name, ok, why in _REFUSED:
        if name in type(request).model_fields and not ok(getattr(request, name), request):
            raise OpenAIError(f"{name}: {why}", 400, name)
    if request.stream_options is not None and not request.stream:
        raise OpenAIError("stream_options can only be set when stream is true", 400,
                          "stream_options")
    ignored = request.ignored_fields()
    if ignored:
        more = f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""
        logger.warning("ignored unknown request fields: %s%s", ", ".join(ignored[:10]), more)


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int,
                       prompt_param: str) -> int:
    """The default is what is left of the context; asking for more than that is a 400."""
    if prompt_len >= max_model_len:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {prompt_len} input tokens, which leaves no room for a completion. "
            "Please reduce the length of the input.", 400, prompt_param)
    room = max_model_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise OpenAIError(
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_len + requested} tokens ({prompt_len} in the input, "
            f"{requested} in the completion). Please reduce the length of the input or the "
            "completion.", 400, "max_tokens")
    return requested


def build_sampling_params(request: SamplingRequest, *, max_tokens: int, logprobs: int | None,
                          prompt_logprobs: int | None, stream: bool) -> SamplingParams:
    bias: dict[int, float] | None = None
    if request.logit_bias is not None:
        try:
            bias = {int(k): float(v) for k, v in request.logit_bias.items()}
        except ValueError as exc:
            raise OpenAIError("logit_bias keys must be token ids", 400, "logit_bias") from exc
    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    structured = structured_outputs_of(request)
    try:
        return SamplingParams.from_optional(
            n=request.n, presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty, temperature=request.temperature,
            top_p=request.top_p, top_k=request.top_k, min_p=request.min_p, seed=request.seed,
            stop=request.stop, stop_token_ids=request.stop_token_ids,
            bad_words=request.bad_words, ignore_eos=request.ignore_eos, max_tokens=max_tokens,
            min_tokens=request.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=request.skip_special_tokens,
            spaces_between_special_tokens=request.spaces_between_special_tokens,
            include_stop_str_in_output=request.include_stop_str_in_output, output_kind=kind,
            logit_bias=bias, allowed_token_ids=request.allowed_token_ids,
            cache_salt=request.cache_salt, structured_outputs=structured,
        )
    except (ValueError, TypeError) as exc:
        raise error_from_exception(ValueError(str(exc))) from exc


def usage_of(prompt_lens: Sequence[int], completion_tokens: int) -> UsageInfo:
    prompt_tokens = sum(prompt_lens)
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)


def clamp_logprob(value: float | None) -> float:
    """JSON has no -inf: vLLM's convention is to clamp at -9999."""
    return -9999.0 if value is None else max(value, -9999.0)


def sse(payload: BaseModel | dict[str, Any] | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump_json()
    elif isinstance(payload, dict):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


async def sse_stream(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[str]:
    """Server-sent events ending with [DONE]; a failure mid-stream becomes an error event."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except Exception as exc:
        err = error_from_exception(exc)
        yield sse(error_body(err.message, err.status, err.param))
    yield "data: [DONE]\n\n"


async def merge_async_iterators(
    iterators: Sequence[AsyncIterator[T]],
) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several streams as (stream index, item); closing this closes all of them."""
    if len(iterators) == 1:
        try:
            async for item in iterators[0]:
                yield 0, item
        finally:
            await _aclose(iterators[0])
        return
    pending = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                index = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(iterators[index]))] = index
                yield index, item
    finally:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for it in iterators:
            await _aclose(it)


async def _aclose(iterator: AsyncIterator[Any]) -> None:
    """Close an async generator now (which aborts its engine request), not at GC time."""
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        await aclose()


async def cancel_on_disconnect(coro: Any, is_disconnected: Callable[[], Any]) -> T:
    """Run a handler, cancelling it (which aborts its requests) if the client goes away."""
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(is_disconnected())
    try:
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            # wait for the handler's clean-up (closing its generators aborts the requests)
            await asyncio.gather(work, return_exceptions=True)
    if work.cancelled():
        raise OpenAIError("the client disconnected", 499)
    result: T = work.result()
    return result
