"""Every message that crosses a process boundary: between the client and the engine core
(ZMQ), and from the engine core to its tensor-parallel workers (`WorkerStep`).

Nothing else is sent between the processes: requests go one way as `EngineCoreRequest`,
aborts and utility calls as small structs, and everything comes back as `EngineCoreOutputs`.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from kvflow.lora.request import LoRARequest
from kvflow.sampling_params import SamplingParams


class FinishReason(enum.IntEnum):
    """Why a request stopped; `str()` gives the OpenAI / vLLM spelling."""

    STOP = 0
    LENGTH = 1
    ABORT = 2
    ERROR = 3

    def __str__(self) -> str:
        return ("stop", "length", "abort", "error")[self.value]


class MultiModalFeature(msgspec.Struct, array_like=True, omit_defaults=True):
    """One preprocessed image of a request and where its placeholder tokens sit.

    `identifier` is the image's content hash: the encoder cache and the prefix-cache keys use
    it, so equal images share work and different images never share KV.
    """

    identifier: str
    offset: int  # first placeholder position in the prompt
    length: int  # placeholder tokens (= embeddings the encoder produces)
    pixels: bytes  # the processor's pixel values, C order
    shape: list[int]
    dtype: str = "float32"


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One tokenized, validated request for the core."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    arrival_time: float
    priority: int = 0
    lora_request: LoRARequest | None = None
    mm_features: list[MultiModalFeature] | None = None  # in prompt order, not overlapping


class LogprobsLists(msgspec.Struct, array_like=True):
    """Logprobs of some positions: column 0 is the chosen token, then the top-k."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]  # rank of the chosen token (1 = most likely)


class RequestTimings(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """The core's clock for a traced request (time.time() seconds; 0.0: not in this output).

    On the first token: when the core received the request and first scheduled it. On the
    last (detailed traces only): the seconds of model steps the request took part in.
    """

    queued_time: float = 0.0
    scheduled_time: float = 0.0
    model_execute_time: float = 0.0


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """What one request produced in one step."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: LogprobsLists | None = None
    new_prompt_logprobs: LogprobsLists | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None
    timings: RequestTimings | None = None  # only while tracing is on


    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    """The core's current numbers, for stats logs, metrics and get_scheduler_stats()."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of blocks held by live requests
    num_kv_blocks: int = 0
    num_preemptions: int = 0  # since start
    prefix_cache_queries: int = 0  # prompt tokens looked up, since start
    prefix_cache_hits: int = 0  # of which found in the cache
    num_prompt_tokens: int = 0  # computed prompt tokens, since start
    num_generation_tokens: int = 0  # sampled tokens, since start
    num_steps: int = 0
    # LoRA (vLLM's lora_requests_info): requests per adapter name, and the slot count
    running_lora_adapters: dict[str, int] = {}
    waiting_lora_adapters: dict[str, int] = {}
    max_lora: int = 0
    # images (multimodal models): encoder cache lookups and hits, images encoded, since start
    mm_encoder_cache_queries: int = 0
    mm_encoder_cache_hits: int = 0
    mm_images_encoded: int = 0
    # the second KV tier: blocks found there for admitted requests, stored, loaded, bytes
    # moved (stored includes disk writes), seconds spent loading; since start
    kv_offload_hit_blocks: int = 0
    kv_offload_blocks_stored: int = 0
    kv_offload_blocks_loaded: int = 0
    kv_offload_bytes_stored: int = 0
    kv_offload_bytes_loaded: int = 0
    kv_offload_load_seconds: float = 0.0
    # speculative decoding: requests' verify steps with proposals, tokens proposed, tokens
    # accepted, and accepted at each proposal position; since start
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = []


class UtilityOutput(msgspec.Struct, array_like=True):
    """The answer to one utility call (`call_id` matches the request)."""

    call_id: int
    result: Any = None
    error: str | None = None
    invalid_argument: bool = False  # the error is a ValueError (the caller's input)


class KVCacheEvents(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """How a core's prefix cache changed since its last report (sent only when the engine
    has data-parallel replicas: the router mirrors each replica's cached block hashes).

    `cleared` (the cache was reset) applies first; `stored` and `removed` are disjoint (the
    last change of each hash wins), so the order within one report does not matter.
    """

    stored: list[int] = []  # block hashes now cached
    removed: list[int] = []  # block hashes evicted
    cleared: bool = False


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One message from the core: request outputs, or a utility answer, or a death notice."""

    outputs: list[EngineCoreOutput] = []
    timestamp: float = 0.0
    scheduler_stats: SchedulerStats | None = None
    utility_output: UtilityOutput | None = None
    engine_error: str | None = None  # set once, when the core is about to die
    kv_events: KVCacheEvents | None = None  # batched per step (data-parallel routing)


class UtilityRequest(msgspec.Struct, array_like=True):
    """Call a method of the core (pause, stats, reset cache, ...) and get its result back."""

    call_id: int
    method: str
    args: list[Any] = []


class RequestType(bytes, enum.Enum):
    """First frame of each client → core message."""

    ADD = b"\x00"
    ABORT = b"\x01"
    UTILITY = b"\x02"
    SHUTDOWN = b"\x03"


class ReadyMessage(msgspec.Struct):
    """The core's handshake once the model is loaded, or why it failed."""

    ok: bool
    num_kv_blocks: int = 0
    max_concurrency: float = 0.0
    error: str | None = None
    # a core that binds its own sockets (a Ray actor on another node): where to connect
    input_address: str = ""
    output_address: str = ""


class WorkerStep(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One step's forward inputs, broadcast by tensor-parallel rank 0 (in the engine core)
    to the other ranks, which run the same forward on their shards; `stop` ends them.

    `logit_rows` lists, in rank 0's order, each group of hidden rows whose logits rank 0
    computes (sampling parts, prompt logprobs): every rank computes its vocabulary slice
    of the same rows, gathered to rank 0."""

    input_ids: list[int] = []
    query_lens: list[int] = []
    seq_lens: list[int] = []
    block_ids: list[list[int]] = []
    logit_rows: list[list[int]] = []
    stop: bool = False
