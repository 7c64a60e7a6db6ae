"""POST /v1/completions: prompts (text or token ids) → completions, streamed or whole."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from kvflow.entrypoints.openai.errors import OpenAIError
from kvflow.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from kvflow.entrypoints.openai.request_checks import (
    check_bad_words_volume,
    check_sampling_bounds,
)
from kvflow.entrypoints.openai.serving_engine import (
    ServingContext,
    build_sampling_params,
    clamp_logprob,
    merge_async_iterators,
    random_id,
    refuse_unsupported,
    resolve_max_tokens,
    usage_of,
)
from kvflow.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from kvflow.sampling_params import SamplingParams


@dataclass
class _Prompt:
    text: str | None
    ids: list[int]
    params: SamplingParams | None = None


class TokenNamer:
    """The string a logprobs entry shows for a token (or `token_id:N` when asked)."""

    def __init__(self, tokenizer: object, as_token_ids: bool) -> None:
        self.tokenizer = tokenizer
        self.as_token_ids = as_token_ids

    def __call__(self, token_id: int, logprob: Logprob | None = None) -> str:
        if self.as_token_ids:
            return f"token_id:{token_id}"
        if logprob is not None and logprob.decoded_token is not None:
            return logprob.decoded_token
        return str(self.tokenizer.decode([token_id]))  # type: ignore[attr-defined]


def completion_logprobs(token_ids: list[int], entries: PromptLogprobs, name: TokenNamer,
                        initial_offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy logprobs: each token, its logprob, its top alternatives, its offset."""
    result = CompletionLogprobs()
    offset = initial_offset
    for token_id, entry in zip(token_ids, entries, strict=False):
        token = name(token_id, entry.get(token_id) if entry else None)
        result.tokens.append(token)
        result.text_offset.append(offset)
        offset += len(token)
        if entry is None:  # the first prompt token has no logprob
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        chosen = entry.get(token_id)
        result.token_logprobs.append(clamp_logprob(chosen.logprob if chosen else None))
        # the entry holds the chosen token and the top-k, as vLLM returns them
        result.top_logprobs.append({name(t, lp): clamp_logprob(lp.logprob)
                                    for t, lp in entry.items()})
    return result


class OpenAIServingCompletion:
    """Turns completion requests into engine requests and engine outputs into responses."""

    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx

    async def create(self, request: CompletionRequest,
                     trace_headers: Mapping[str, str] | None = None
                     ) -> CompletionResponse | AsyncIterator[CompletionResponse]:
        ctx = self.ctx
        lora = await ctx.check_ready(request.model)
        refuse_unsupported(request)
        check_sampling_bounds(request, ctx.limits, ctx.vocab_size)
        prompts = await self._prompts(request)
        request_id = random_id("cmpl")
        prompt_logprobs = request.prompt_logprobs
        if prompt_logprobs is None and request.echo and request.logprobs is not None:
            prompt_logprobs = request.logprobs  # echoed tokens get logprobs too
        for i, prompt in enumerate(prompts):
            max_tokens = resolve_max_tokens(request.max_tokens, len(prompt.ids),
                                            ctx.max_model_len, "prompt")
            prompt.params = build_sampling_params(
                request, max_tokens=max_tokens, logprobs=request.logprobs,
                prompt_logprobs=prompt_logprobs, stream=bool(request.stream))
            await ctx.validate(f"{request_id}-{i}", prompt.ids, prompt.params, request.priority,
                               "prompt", lora)
        ctx.check_capacity(len(prompts) * request.n, _sequences_param(request))
        generators = await ctx.start_all(
            [(f"{request_id}-{i}", p.text, p.ids, p.params)
             for i, p in enumerate(prompts) if p.params is not None], request.priority, lora,
            trace_headers)
        namer = TokenNamer(ctx.engine.get_tokenizer(), bool(request.return_tokens_as_token_ids))
        model = ctx.models.response_name(lora)
        if request.stream:
            return self._stream(request, request_id, model, prompts, generators, namer)
        return await self._full(request, request_id, model, prompts, generators, namer)

    async def _prompts(self, request: CompletionRequest) -> list[_Prompt]:
        """One entry per prompt: a string, a list of strings, token ids, or lists of them."""
        raw = request.prompt
        single = isinstance(raw, str) or (raw and isinstance(raw[0], int))
        items: list[str | list[int]] = [raw] if single else list(raw)  # type: ignore[list-item, arg-type]
        if not items:
            raise OpenAIError("prompt must not be empty", 400, "prompt")
        ctx = self.ctx
        limit = ctx.limits.max_prompts_per_request
        if len(items) > limit:
            raise OpenAIError(f"prompt may hold at most {limit} prompts, got {len(items)}", 400,
                              "prompt")
        ctx.check_capacity(len(items) * request.n, _sequences_param(request))
        check_bad_words_volume(request.bad_words, len(items) * request.n, ctx.limits)
        bounded = request.truncate_prompt_tokens is None
        prompts = []
        for item in items:
            if isinstance(item, str):
                ids = await ctx.tokenize(item, request.add_special_tokens, "prompt", bounded)
                prompt = _Prompt(item, ids)
            else:
                if not item:  # (a too long one was refused by BodyShape, on the raw body)
                    raise OpenAIError("prompt must not be empty", 400, "prompt")
                prompt = _Prompt(None, list(item))
            if request.truncate_prompt_tokens is not None:
                prompt.ids = prompt.ids[-request.truncate_prompt_tokens:]
                prompt.text = None if prompt.text is None else self._decode(prompt.ids)
            if prompt.text is None and request.echo:
                prompt.text = self._decode(prompt.ids)
            prompts.append(prompt)
        return prompts

    def _decode(self, ids: list[int]) -> str:
        try:
            return str(self.ctx.engine.get_tokenizer().decode(ids))
        except Exception as exc:  # ids outside the vocabulary
            raise OpenAIError(f"cannot decode the prompt token ids: {exc}", 400, "prompt") from exc

    async def _full(self, request: CompletionRequest, request_id: str, model: str,
                    prompts: list[_Prompt], generators: list[AsyncIterator[RequestOutput]],
                    namer: TokenNamer) -> CompletionResponse:
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async for i, out in merge_async_iterators(generators):
            finals[i] = out
        fmt = _ChoiceFormatter(request, prompts, namer)
        choices: list[CompletionChoice] = []
        completion_tokens = 0
        for i, final in enumerate(finals):
            if final is None:
                raise OpenAIError("the engine ended a request without output", 500)
            for c in sorted(final.outputs, key=lambda c: c.index):
                completion_tokens += len(c.token_ids)
                choices.append(fmt.choice(i, c, True, final.prompt_logprobs, 0))
        return CompletionResponse(
            id=request_id, model=model, choices=choices,
            usage=usage_of([len(p.ids) for p in prompts], completion_tokens))

    async def _stream(self, request: CompletionRequest, request_id: str, model: str,
                      prompts: list[_Prompt], generators: list[AsyncIterator[RequestOutput]],
                      namer: TokenNamer) -> AsyncIterator[CompletionResponse]:
        created = int(time.time())
        fmt = _ChoiceFormatter(request, prompts, namer)
        offsets: dict[int, int] = {}  # choice index → characters sent (for text_offset)
        prompt_lps: dict[int, PromptLogprobs] = {}  # sent once per prompt, kept for each choice
        completion_tokens = 0
        options = request.stream_options
        usage_each = bool(options and options.continuous_usage_stats)
        async for i, out in merge_async_iterators(generators):
            if out.prompt_logprobs is not None:
                prompt_lps.setdefault(i, out.prompt_logprobs)
            for c in out.outputs:
                index = i * request.n + c.index
                completion_tokens += len(c.token_ids)
                choice = fmt.choice(i, c, index not in offsets, prompt_lps.get(i),
                                    offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(choice.text)
                if not (choice.text or c.finish_reason or c.token_ids and choice.logprobs):
                    continue  # nothing to say yet (e.g. text held back by a stop string)
                chunk = CompletionResponse(id=request_id, created=created, model=model,
                                           choices=[choice])
                if usage_each:
                    chunk.usage = usage_of([len(p.ids) for p in prompts], completion_tokens)
                yield chunk
        if options and options.include_usage:
            yield CompletionResponse(
                id=request_id, created=created, model=model, choices=[],
                usage=usage_of([len(p.ids) for p in prompts], completion_tokens))


def _sequences_param(request: CompletionRequest) -> str:
    """What to name when prompts x n is too many: n if it is more than one."""
    return "n" if request.n > 1 else "prompt"


class _ChoiceFormatter:
    """Builds one choice (or one streamed piece of it) from a CompletionOutput."""

    def __init__(self, request: CompletionRequest, prompts: list[_Prompt],
                 namer: TokenNamer) -> None:
        self.request = request
        self.prompts = prompts
        self.namer = namer

    def choice(self, prompt_index: int, c: CompletionOutput, first: bool,
               prompt_lps: PromptLogprobs | None, offset: int) -> CompletionChoice:
        """`first`: the choice's first piece, which carries the echo and prompt logprobs."""
        request, prompt = self.request, self.prompts[prompt_index]
        choice = CompletionChoice(index=prompt_index * request.n + c.index, text=c.text,
                                  finish_reason=c.finish_reason, stop_reason=c.stop_reason)
        ids: list[int] = list(c.token_ids)
        lps: PromptLogprobs = list(c.logprobs or [])
        if request.echo and first:
            choice.text = (prompt.text or "") + choice.text
            if request.logprobs is not None:
                ids = prompt.ids + ids
                lps = list(prompt_lps or [None] * len(prompt.ids)) + lps
        if request.prompt_logprobs is not None and first:
            choice.prompt_logprobs = _plain_prompt_logprobs(prompt_lps)
        if request.logprobs is not None:
            choice.logprobs = completion_logprobs(ids, lps, self.namer, offset)
        return choice


def _plain_prompt_logprobs(entries: PromptLogprobs | None
                           ) -> list[dict[int, dict[str, object]] | None] | None:
    """vLLM's prompt_logprobs field: per prompt token, {token id: {logprob, rank, decoded}}."""
    if entries is None:
        return None
    return [None if e is None else {
        t: {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank,
            "decoded_token": lp.decoded_token} for t, lp in e.items()} for e in entries]
