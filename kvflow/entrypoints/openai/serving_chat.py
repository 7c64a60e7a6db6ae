"""POST /v1/chat/completions: messages → the model's chat template → a streamed or whole reply."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from kvflow.engine.async_llm import AsyncLLM
from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatLogprobToken,
    ChatMessage,
    ChatStreamChoice,
    DeltaMessage,
    TopLogprob,
)
from kvflow.entrypoints.openai.serving_completion import TokenNamer
from kvflow.entrypoints.openai.serving_engine import (
    ServingContext,
    build_sampling_params,
    clamp_logprob,
    random_id,
    refuse_unsupported,
    resolve_max_tokens,
    usage_of,
)
from kvflow.outputs import CompletionOutput, RequestOutput, SampleLogprobs

# Message fields passed to the chat template besides role and content.
_PASSED_FIELDS = ("name", "tool_calls", "tool_call_id", "reasoning_content")


def template_message(message: ChatMessage) -> dict[str, Any]:
    """A message as chat templates expect it: content as one string."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise OpenAIError(
                    f"content parts of type {part.get('type')!r} are not supported "
                    "(only text)", 400, "messages")
            texts.append(part["text"])
        content = "\n".join(texts)
    result: dict[str, Any] = {"role": message.role, "content": content or ""}
    fields = {"name": message.name, **(message.model_extra or {})}
    result.update({k: fields[k] for k in _PASSED_FIELDS if fields.get(k) is not None})
    return result


def render_chat(engine: AsyncLLM, messages: list[ChatMessage], add_generation_prompt: bool,
                continue_final_message: bool, template_kwargs: dict[str, Any] | None) -> str:
    """Apply the model's chat template; any failure is the request's (400)."""
    if add_generation_prompt and continue_final_message:
        raise OpenAIError("add_generation_prompt and continue_final_message cannot both be "
                          "true", 400, "continue_final_message")
    converted = [template_message(m) for m in messages]
    kwargs = dict(template_kwargs or {})
    if continue_final_message:
        kwargs["continue_final_message"] = True
    try:
        return engine.processor.apply_chat_template(
            converted, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # jinja errors (e.g. roles out of order) are not ValueErrors
        raise OpenAIError(f"cannot apply the chat template: {exc}", 400, "messages") from exc


def chat_logprobs(token_ids: list[int], entries: SampleLogprobs, top_k: int,
                  name: TokenNamer) -> ChatLogprobs:
    """The chat shape: per token {token, logprob, bytes, top_logprobs: the k most likely}."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(token_id)
        token = name(token_id, chosen)
        # Entries ranked 1..k are the top-k (the chosen token keeps its own rank).
        ranked = sorted((lp.rank, t) for t, lp in entry.items()
                        if lp.rank is not None and 1 <= lp.rank <= top_k)
        tops = [TopLogprob(token=(text := name(t, entry[t])),
                           logprob=clamp_logprob(entry[t].logprob),
                           bytes=list(text.encode("utf-8"))) for _, t in ranked]
        content.append(ChatLogprobToken(
            token=token, logprob=clamp_logprob(chosen.logprob if chosen else None),
            bytes=list(token.encode("utf-8")), top_logprobs=tops))
    return ChatLogprobs(content=content)


class OpenAIServingChat:
    """Turns chat requests into engine requests and engine outputs into responses."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: ChatCompletionRequest
                     ) -> ChatCompletionResponse | AsyncIterator[ChatCompletionChunk]:
        ctx = self.ctx
        await ctx.check_ready(request.model)
        refuse_unsupported(request)
        if request.top_logprobs and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs to be true", 400, "top_logprobs")
        prompt = render_chat(ctx.engine, request.messages, request.add_generation_prompt,
                             request.continue_final_message, request.chat_template_kwargs)
        ids = await ctx.tokenize(prompt, request.add_special_tokens, "messages")
        if request.truncate_prompt_tokens is not None:
            ids = ids[-request.truncate_prompt_tokens:]
        requested = (request.max_completion_tokens if request.max_completion_tokens is not None
                     else request.max_tokens)
        max_tokens = resolve_max_tokens(requested, len(ids), ctx.max_model_len, "messages")
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = build_sampling_params(request, max_tokens=max_tokens, logprobs=logprobs,
                                       prompt_logprobs=request.prompt_logprobs,
                                       stream=bool(request.stream))
        request_id = random_id("chatcmpl")
        ctx.validate(request_id, ids, params, request.priority)
        outputs = ctx.generate(request_id, prompt, ids, params, request.priority)
        namer = TokenNamer(ctx.engine.get_tokenizer(), bool(request.return_tokens_as_token_ids))
        if request.stream:
            return self._stream(request, request_id, len(ids), outputs, namer)
        return await self._full(request, request_id, len(ids), outputs, namer)

    def _logprobs(self, request: ChatCompletionRequest, c: CompletionOutput,
                  namer: TokenNamer) -> ChatLogprobs | None:
        if not request.logprobs:
            return None
        return chat_logprobs(list(c.token_ids), c.logprobs or [], request.top_logprobs or 0,
                             namer)

    async def _full(self, request: ChatCompletionRequest, request_id: str, prompt_len: int,
                    outputs: AsyncIterator[RequestOutput],
                    namer: TokenNamer) -> ChatCompletionResponse:
        final: RequestOutput | None = None
        async for out in outputs:
            final = out
        if final is None:
            raise OpenAIError("the engine ended the request without output", 500)
        choices = [
            ChatChoice(index=c.index, message=AssistantMessage(content=c.text),
                       logprobs=self._logprobs(request, c, namer),
                       finish_reason=c.finish_reason, stop_reason=c.stop_reason)
            for c in sorted(final.outputs, key=lambda c: c.index)
        ]
        completion_tokens = sum(len(c.token_ids) for c in final.outputs)
        return ChatCompletionResponse(id=request_id, model=self.ctx.model_name, choices=choices,
                                      usage=usage_of([prompt_len], completion_tokens))

    async def _stream(self, request: ChatCompletionRequest, request_id: str, prompt_len: int,
                      outputs: AsyncIterator[RequestOutput],
                      namer: TokenNamer) -> AsyncIterator[ChatCompletionChunk]:
        created = int(time.time())
        options = request.stream_options
        usage_each = bool(options and options.continuous_usage_stats)
        completion_tokens = 0

        def chunk(choices: list[ChatStreamChoice]) -> ChatCompletionChunk:
            result = ChatCompletionChunk(id=request_id, created=created,
                                         model=self.ctx.model_name, choices=choices)
            if usage_each:
                result.usage = usage_of([prompt_len], completion_tokens)
            return result

        # Every choice opens with the assistant role, as OpenAI streams it.
        for index in range(request.n):
            yield chunk([ChatStreamChoice(index=index,
                                          delta=DeltaMessage(role="assistant", content=""))])
        async for out in outputs:
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                logprobs = self._logprobs(request, c, namer) if c.token_ids else None
                if not (c.text or c.finish_reason or logprobs):
                    continue  # nothing to say yet (e.g. text held back by a stop string)
                yield chunk([ChatStreamChoice(
                    index=c.index, delta=DeltaMessage(content=c.text), logprobs=logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
        if options and options.include_usage:
            yield ChatCompletionChunk(id=request_id, created=created, model=self.ctx.model_name,
                                      choices=[], usage=usage_of([prompt_len], completion_tokens))
