"""Client side of a request's way in: prompt or chat → validated token ids for the core."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvflow.config import EngineConfig, ModelConfig
from kvflow.engine.protocol import EngineCoreRequest, MultiModalFeature
from kvflow.lora.request import LoRARequest
from kvflow.sampling_params import SamplingParams
from kvflow.structured.options import StructuredOutputsConfig

if TYPE_CHECKING:
    from kvflow.multimodal.processing import MultiModalProcessor
    from kvflow.structured.grammar import GrammarCompiler

PromptType = str | Mapping[str, Any]


def check_unicode(text: str, where: str) -> None:
    """A lone surrogate (possible in a Python str, never in UTF-8) is a ValueError saying where."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{where} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character "
            f"{exc.start}"
        ) from None


def load_tokenizer(model_config: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_config.tokenizer_path))


def build_processor(config: EngineConfig, tokenizer: Any, num_kv_blocks: int) -> Processor:
    """The client's Processor; for an image model, with the model's own image processor."""
    mm = None
    if config.mm_config is not None:
        from kvflow.multimodal.processing import MultiModalProcessor, load_hf_processor

        mm = MultiModalProcessor(config.model_config, config.mm_config,
                                 load_hf_processor(config.model_config.path))
    return Processor(config.model_config, tokenizer, num_kv_blocks,
                     config.cache_config.block_size, mm, config.structured_outputs_config)


class Processor:
    """Tokenizes and validates; every error here is a ValueError raised before queueing."""

    def __init__(
        self, model_config: ModelConfig, tokenizer: Any, num_kv_blocks: int, block_size: int,
        mm_processor: MultiModalProcessor | None = None,
        structured_config: StructuredOutputsConfig | None = None,
    ) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.num_kv_blocks = num_kv_blocks
        self.block_size = block_size
        self.eos_token_ids = list(model_config.eos_token_ids)
        self._grammar_compiler: GrammarCompiler | None = None  # at the first structured request
        self.structured_config = structured_config or StructuredOutputsConfig()
        self.mm_processor = mm_processor  # images in prompts (LLaVA models); None: text only

    def mm_totals(self) -> dict[str, int] | None:
        """Images preprocessed, processor-cache lookups and hits since start (image models)."""
        mm = self.mm_processor
        if mm is None:
            return None
        return {"images_processed": mm.num_images_processed, "cache_queries": mm.cache.queries,
                "cache_hits": mm.cache.hits}

    @staticmethod
    def has_images(prompt: PromptType) -> bool:
        return isinstance(prompt, Mapping) and prompt.get("multi_modal_data") is not None

    def process(
        self, prompt: PromptType, tokenization_kwargs: dict[str, Any] | None = None
    ) -> tuple[str | None, list[int], list[MultiModalFeature] | None]:
        """tokenize(), plus the images of a prompt with `multi_modal_data`: (text, token ids
        with each image's placeholders expanded, the images in prompt order)."""
        if not self.has_images(prompt):
            text, ids = self.tokenize(prompt, tokenization_kwargs)
            return text, ids, None
        if self.mm_processor is None:
            raise ValueError(f"{self.model_config.model} is a text-only model: it takes no "
                             "images (multi_modal_data)")
        assert isinstance(prompt, Mapping)
        text = prompt.get("prompt")
        if isinstance(text, str):
            check_unicode(text, "prompt")
        return self.mm_processor.process(prompt, tokenization_kwargs)

    def tokenize(
        self, prompt: PromptType, tokenization_kwargs: dict[str, Any] | None = None
    ) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a str, {"prompt": str} or {"prompt_token_ids": [...]}."""
        if isinstance(prompt, str):
            text: str | None = prompt
        elif isinstance(prompt, Mapping) and "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if (
                not isinstance(ids, Sequence)
                or isinstance(ids, str)
                or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
            ):
                raise ValueError("prompt_token_ids must be a list of integers")
            return prompt.get("prompt"), list(ids)
        elif isinstance(prompt, Mapping) and isinstance(prompt.get("prompt"), str):
            text = prompt["prompt"]
        else:
            raise ValueError(
                "prompt must be a string, {'prompt': str} or {'prompt_token_ids': [int, ...]}, "
                f"got {type(prompt).__name__}"
            )
        assert text is not None
        if not text:
            raise ValueError("the prompt is empty")
        check_unicode(text, "prompt")
        kwargs = dict(tokenization_kwargs or {})
        ids = self.tokenizer(text, **kwargs)["input_ids"]
        return text, list(ids)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        if not kwargs.get("chat_template") and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        return str(
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        )

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> tuple[str, list[Any]]:
        """A conversation as prompt text, and its images (URL strings or images in memory)
        in order: image parts become the model's placeholder, one per image."""
        from kvflow.multimodal.chat import joined_text, render_with_images, split_images

        converted, images = split_images(messages)
        if not images:  # text parts joined, as templates that read strings expect
            return self.apply_chat_template(joined_text(converted), add_generation_prompt,
                                            **kwargs), []
        mm = self.mm_processor
        if mm is None:
            raise ValueError(f"{self.model_config.model} is a text-only model: it takes no "
                             "images (image_url content parts)")
        if len(images) > mm.config.image_limit:
            raise ValueError(f"the conversation has {len(images)} images, more than the limit "
                             f"of {mm.config.image_limit} per prompt (limit_mm_per_prompt)")
        template = kwargs.pop("chat_template", None) or mm.chat_template

        def render(msgs: list[dict[str, Any]]) -> str:
            return self.apply_chat_template(msgs, add_generation_prompt,
                                            chat_template=template, **kwargs)

        return render_with_images(render, converted, len(images), mm.image_token), images

    def make_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
        mm_features: list[MultiModalFeature] | None = None,
    ) -> EngineCoreRequest:
        """Validate a tokenized request and build what is sent to the core."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if not -(2**63) <= priority < 2**63:
            raise ValueError(f"priority must be within the 64-bit integer range, got {priority}")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise ValueError(
                f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        self._check_prompt(prompt_ids, bool(mm_features))
        mc = self.model_config
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > mc.max_logprobs:
                raise ValueError(f"{name} must be <= max_logprobs ({mc.max_logprobs}), got {value}")
        self._check_fits(len(prompt_ids), params)
        for index, stop in enumerate(params.stop or ()):
            check_unicode(stop, f"stop[{index}]")
        params = params.clone()
        params.all_stop_token_ids |= set(self.eos_token_ids)
        if params.allowed_token_ids is not None:  # each step masks these: no repeats
            params.allowed_token_ids = sorted(set(params.allowed_token_ids))
        if params.bad_words:
            params.bad_words_token_ids = self._bad_words_ids(params.bad_words)
        self._check_token_ids(params)
        if params.structured_outputs is not None:
            self._grammars().validate(params.structured_outputs)
        return EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling_params=params,
            eos_token_ids=self.eos_token_ids,
            arrival_time=arrival_time if arrival_time is not None else time.time(),
            priority=priority,
            lora_request=lora_request,
            mm_features=mm_features or None,
        )

    def _grammars(self) -> GrammarCompiler:
        """Compiles (and caches) each distinct grammar, so a bad one fails before queueing."""
        if self._grammar_compiler is None:
            from kvflow.structured.grammar import GrammarCompiler  # imports llguidance

            self._grammar_compiler = GrammarCompiler(self.tokenizer, self.model_config.vocab_size,
                                                     config=self.structured_config)
        return self._grammar_compiler

    def _check_prompt(self, prompt_ids: list[int], has_images: bool = False) -> None:
        mc = self.model_config
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if not has_images and mc.image_token_id is not None and mc.image_token_id in prompt_ids:
            raise ValueError("the prompt has image placeholders but no images: give the "
                             "images in multi_modal_data")
        bad = [t for t in prompt_ids if not 0 <= t < mc.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids out of vocabulary (0..{mc.vocab_size - 1}): {bad[:5]}"
            )
        if len(prompt_ids) > mc.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens, more than the model's context "
                f"length max_model_len={mc.max_model_len}"
            )

    def _check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        mc = self.model_config
        max_tokens = params.max_tokens if params.max_tokens is not None else mc.max_model_len
        total = min(prompt_len + max_tokens, mc.max_model_len)
        blocks = -(-total // self.block_size)
        if blocks > self.num_kv_blocks:
            raise ValueError(
                f"this request needs up to {total} tokens of KV cache ({blocks} blocks) but the "
                f"cache has {self.num_kv_blocks} blocks: lower max_tokens or enlarge the cache"
            )

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        for name in ("stop_token_ids", "allowed_token_ids"):
            ids = getattr(params, name) or []
            if any(t >= vocab for t in ids):
                raise ValueError(f"{name} has ids outside the vocabulary (0..{vocab - 1})")
        if params.logit_bias and any(t >= vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias has token ids outside the vocabulary (0..{vocab - 1})")

    def _bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each word as tokenized alone and after a space (vLLM's rule)."""
        seen: dict[tuple[int, ...], None] = {}  # ordered, and linear: a list scan was quadratic
        for index, word in enumerate(words):
            check_unicode(word, f"bad_words[{index}]")
            for variant in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer(variant, add_special_tokens=False)["input_ids"]
                if ids:
                    seen.setdefault(tuple(ids))
        return [list(ids) for ids in seen]
