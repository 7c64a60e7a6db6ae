"""POST /v1/chat/completions: messages → the model's chat template → a streamed or whole reply."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from kvflow.engine.processor import Processor
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
from kvflow.entrypoints.openai.request_checks import (
    check_bad_words_volume,
    check_messages_size,
    check_sampling_bounds,
    check_template_kwargs,
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


async def render_chat(ctx: ServingContext, messages: list[ChatMessage],
                      add_generation_prompt: bool, continue_final_message: bool,
                      template_kwargs: dict[str, Any] | None,
                      request_template: str | None = None) -> tuple[str, list[Any]]:
    """Apply the chat template in the pool, within a time limit; any failure is a 400.
    Returns the prompt text and the image URLs of `image_url` parts, in order.

    The model's own template renders in transformers' sandbox; a request's own template (only
    under --trust-request-chat-template) in a worker process with memory and output limits.
    """
    if add_generation_prompt and continue_final_message:
        raise OpenAIError("add_generation_prompt and continue_final_message cannot both be "
                          "true", 400, "continue_final_message")
    check_messages_size([text for m in messages for text in _texts(m)], ctx.prompt_bound)
    trusted = ctx.limits.trust_request_chat_template
    template = check_template_kwargs(template_kwargs, trusted)
    if request_template is not None:
        if not trusted:
            raise OpenAIError("chat_template: a request-supplied chat template is not allowed "
                              "(the server runs without --trust-request-chat-template)", 400,
                              "chat_template")
        template = request_template
    kwargs = {k: v for k, v in (template_kwargs or {}).items() if k != "chat_template"}
    timeout = ctx.limits.chat_template_timeout_s
    try:
        if template is None:
            work = ctx.run(_render_model_template, ctx.engine.processor, messages,
                           add_generation_prompt, continue_final_message, kwargs)
        else:
            work = ctx.run(_render_request_template, ctx, template, messages,
                           add_generation_prompt, continue_final_message, kwargs,
                           pool=ctx.template_pool)
        return await asyncio.wait_for(work, timeout)
    except OpenAIError:
        raise
    except ValueError as exc:
        raise OpenAIError(str(exc), 400, "messages") from exc
    except TimeoutError:
        raise OpenAIError(f"the chat template took longer than {timeout:g} s to render", 400,
                          "messages") from None
    except Exception as exc:  # jinja errors (e.g. roles out of order) are not ValueErrors
        raise OpenAIError(f"cannot apply the chat template: {exc}", 400, "messages") from exc


def _texts(message: ChatMessage) -> list[str]:
    content = message.content
    if isinstance(content, str):
        return [content]
    parts = [p.get("text") for p in content or () if isinstance(p, dict)]
    return [t for t in parts if isinstance(t, str)]


def _render_model_template(processor: Processor, messages: list[ChatMessage],
                           add_generation_prompt: bool, continue_final_message: bool,
                           kwargs: dict[str, Any]) -> tuple[str, list[Any]]:
    if continue_final_message:
        kwargs = {**kwargs, "continue_final_message": True}
    if any(_has_images(m) for m in messages):  # image parts become the model's placeholders
        return processor.render_chat([_with_parts(m) for m in messages], add_generation_prompt,
                                     **kwargs)
    converted = [template_message(m) for m in messages]
    return processor.apply_chat_template(
        converted, add_generation_prompt=add_generation_prompt, **kwargs), []


def _has_images(message: ChatMessage) -> bool:
    content = message.content
    return isinstance(content, list) and any(
        isinstance(p, dict) and p.get("type") == "image_url" for p in content)


def _with_parts(message: ChatMessage) -> dict[str, Any]:
    """template_message keeping list content as parts (text and image_url only)."""
    result = template_message(message.model_copy(update={"content": None}))
    content = message.content or ""
    for part in content if isinstance(content, list) else ():
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("text", "image_url"):
            raise OpenAIError(f"content parts of type {kind!r} are not supported (text, "
                              "image_url)", 400, "messages")
    result["content"] = content
    return result


def _render_request_template(ctx: ServingContext, template: str, messages: list[ChatMessage],
                             add_generation_prompt: bool, continue_final_message: bool,
                             kwargs: dict[str, Any]) -> tuple[str, list[Any]]:
    assert ctx.sandbox is not None
    converted = [template_message(m) for m in messages]
    tokens = ctx.engine.get_tokenizer().special_tokens_map
    text = ctx.sandbox.render(
        template, converted, add_generation_prompt=add_generation_prompt,
        special_tokens={k: v for k, v in tokens.items() if isinstance(v, str)},
        extra_kwargs=kwargs)
    if continue_final_message:  # end the text where the final message's content ends
        final = converted[-1]["content"]
        end = text.rfind(final) if final else -1
        if end < 0:
            raise OpenAIError("continue_final_message: the rendered template does not contain "
                              "the final message's content", 400, "continue_final_message")
        text = text[:end + len(final)]
    return text, []


def chat_logprobs(token_ids: list[int], entries: SampleLogprobs, top_k: int,
                  name: TokenNamer, token_bytes: Callable[[int], bytes]) -> ChatLogprobs:
    """The chat shape: per token {token, logprob, bytes, top_logprobs: the k most likely}.

    `bytes` are the token's own (a token holding part of a character has no text of its own:
    its decoded text is U+FFFD, its bytes are that part).
    """
    content = []
    for token_id, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(token_id)
        # Entries ranked 1..k are the top-k (the chosen token keeps its own rank).
        ranked = sorted((lp.rank, t) for t, lp in entry.items()
                        if lp.rank is not None and 1 <= lp.rank <= top_k)
        tops = [TopLogprob(token=name(t, entry[t]), logprob=clamp_logprob(entry[t].logprob),
                           bytes=list(token_bytes(t))) for _, t in ranked]
        content.append(ChatLogprobToken(
            token=name(token_id, chosen), logprob=clamp_logprob(chosen.logprob if chosen else None),
            bytes=list(token_bytes(token_id)), top_logprobs=tops))
    return ChatLogprobs(content=content)


class OpenAIServingChat:
    """Turns chat requests into engine requests and engine outputs into responses."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: ChatCompletionRequest,
                     trace_headers: Mapping[str, str] | None = None
                     ) -> ChatCompletionResponse | AsyncIterator[ChatCompletionChunk]:
        ctx = self.ctx
        lora = await ctx.check_ready(request.model)
        refuse_unsupported(request)
        if request.top_logprobs and not request.logprobs:
            raise OpenAIError("top_logprobs needs logprobs to be true", 400, "top_logprobs")
        check_sampling_bounds(request, ctx.limits, ctx.vocab_size)
        check_bad_words_volume(request.bad_words, request.n, ctx.limits)
        max_logprobs = ctx.engine.config.model_config.max_logprobs
        if request.top_logprobs is not None and not 0 <= request.top_logprobs <= max_logprobs:
            raise OpenAIError(f"top_logprobs must be in 0..{max_logprobs}, got "
                              f"{request.top_logprobs}", 400, "top_logprobs")
        ctx.check_capacity(request.n)
        prompt, image_urls = await render_chat(
            ctx, request.messages, request.add_generation_prompt,
            request.continue_final_message, request.chat_template_kwargs, request.chat_template)
        ids = await ctx.tokenize(prompt, request.add_special_tokens, "messages",
                                 bounded=request.truncate_prompt_tokens is None)
        images, features = None, None
        if image_urls:
            if request.truncate_prompt_tokens is not None:
                raise OpenAIError("truncate_prompt_tokens cannot be used with images (it could "
                                  "cut an image's placeholders)", 400, "truncate_prompt_tokens")
            images, ids, features = await ctx.load_images(image_urls, prompt, ids)
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
        await ctx.validate(request_id, ids, params, request.priority, "messages", lora,
                           features)
        ctx.check_capacity(request.n)  # again: others may have come in while this one waited
        outputs = await ctx.start(request_id, prompt, ids, params, request.priority, lora,
                                  images, trace_headers)
        namer = TokenNamer(ctx.engine.get_tokenizer(), bool(request.return_tokens_as_token_ids))
        model = ctx.models.response_name(lora)
        if request.stream:
            return self._stream(request, request_id, model, len(ids), outputs, namer)
        return await self._full(request, request_id, model, len(ids), outputs, namer)

    def _logprobs(self, request: ChatCompletionRequest, c: CompletionOutput,
                  namer: TokenNamer) -> ChatLogprobs | None:
        if not request.logprobs:
            return None
        return chat_logprobs(list(c.token_ids), c.logprobs or [], request.top_logprobs or 0,
                             namer, self.ctx.token_bytes)

    async def _full(self, request: ChatCompletionRequest, request_id: str, model: str,
                    prompt_len: int, outputs: AsyncIterator[RequestOutput],
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
        return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=usage_of([prompt_len], completion_tokens))

    async def _stream(self, request: ChatCompletionRequest, request_id: str, model: str,
                      prompt_len: int, outputs: AsyncIterator[RequestOutput],
                      namer: TokenNamer) -> AsyncIterator[ChatCompletionChunk]:
        created = int(time.time())
        options = request.stream_options
        usage_each = bool(options and options.continuous_usage_stats)
        completion_tokens = 0

        def chunk(choices: list[ChatStreamChoice]) -> ChatCompletionChunk:
            result = ChatCompletionChunk(id=request_id, created=created, model=model,
                                         choices=choices)
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
            yield ChatCompletionChunk(id=request_id, created=created, model=model,
                                      choices=[], usage=usage_of([prompt_len], completion_tokens))
