"""Request and response bodies of the OpenAI-compatible API (OpenAI's names plus vLLM's extras)."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator

from kvflow.entrypoints.openai.limits import INT64_MAX, INT64_MIN

# Every integer a client sends fits int64, as in vLLM (msgpack and torch need no more).
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
PromptInput = str | list[str] | list[int] | list[list[int]]


def _check_prompt(value: Any) -> PromptInput:
    """One pass per element: pydantic's union of four list types took seconds on a big list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if all(type(v) is str for v in value):
            return value
        if all(type(v) is int for v in value):
            return value
        if all(type(v) is list and all(type(t) is int for t in v) for v in value):
            return value
    raise ValueError("prompt must be a string, a list of strings, a list of token ids or a "
                     "list of lists of token ids")


class OpenAIBaseModel(BaseModel):
    """Unknown fields are kept (and logged by the server), as vLLM does, never refused."""

    model_config = ConfigDict(extra="allow")

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class RequestModel(OpenAIBaseModel):
    """A request body: types are strict, as OpenAI's are ("2" or true is no integer)."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(RequestModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class ResponseFormat(RequestModel):
    type: str
    json_schema: dict[str, Any] | None = None


class SamplingRequest(RequestModel):
    """The fields completions and chat completions share."""

    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Int64 = 1
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling parameters
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Int64 | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Int64] | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    allowed_token_ids: list[Int64] | None = None
    bad_words: list[str] | None = None
    priority: Int64 = 0
    cache_salt: str | None = None
    prompt_logprobs: Int64 | None = None
    truncate_prompt_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    return_tokens_as_token_ids: bool | None = None
    # Structured output (structured_request.py maps both spellings to the engine's params)
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    # Known parameters the engine cannot honour: refused with a 400 when set.
    best_of: Int64 | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: Annotated[PromptInput, PlainValidator(_check_prompt,
                                                  json_schema_input_type=PromptInput)]
    echo: bool | None = False
    logprobs: Int64 | None = None
    suffix: str | None = None
    add_special_tokens: bool = True


class ChatMessage(RequestModel):
    """One message; content is a string or a list of {"type": "text", "text": ...} parts."""

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int64 | None = None
    logprobs: bool | None = False
    top_logprobs: Int64 | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Known parameters the engine cannot honour yet: refused with a 400 when set.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    chat_template: str | None = None
    documents: list[dict[str, Any]] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    echo: bool | None = False


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


# ---- completions ----------------------------------------------------------------------
class CompletionLogprobs(OpenAIBaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[int, dict[str, Any]] | None] | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# ---- chat completions -----------------------------------------------------------------
class TopLogprob(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(OpenAIBaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(OpenAIBaseModel):
    content: list[ChatLogprobToken] | None = None


class AssistantMessage(OpenAIBaseModel):
    role: str = "assistant"
    content: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(OpenAIBaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo | None = None


class DeltaMessage(OpenAIBaseModel):
    role: str | None = None
    content: str | None = None


class ChatStreamChoice(OpenAIBaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIBaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# ---- models, tokenizer, errors ---------------------------------------------------------
class ModelCard(OpenAIBaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "kvflow"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIBaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(RequestModel):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(RequestModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    return_token_strs: bool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None


class TokenizeResponse(OpenAIBaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(OpenAIBaseModel):
    prompt: str


class LoadLoRAAdapterRequest(RequestModel):
    """POST /v1/load_lora_adapter (with KVFLOW_ALLOW_RUNTIME_LORA_UPDATING)."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRAAdapterRequest(RequestModel):
    """POST /v1/unload_lora_adapter (with KVFLOW_ALLOW_RUNTIME_LORA_UPDATING)."""

    lora_name: str
    lora_int_id: Int64 | None = None  # accepted as vLLM does; the name decides


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
