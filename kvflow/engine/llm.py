"""LLM: synchronous offline generation and chat, as in vLLM."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from kvflow.config import EngineArgs
from kvflow.engine.llm_engine import LLMEngine
from kvflow.engine.processor import PromptType
from kvflow.lora.request import LoRARequest
from kvflow.outputs import RequestOutput
from kvflow.sampling_params import RequestOutputKind, SamplingParams

ChatMessages = list[dict[str, Any]]


class LLM:
    """Offline batch inference: `LLM().generate(prompts, params)` returns outputs in order."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine_args = EngineArgs(model=model, **kwargs)
        self.llm_engine = LLMEngine.from_engine_args(self.engine_args)
        self._counter = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Empty the prefix cache; False while blocks are still in use."""
        return self.llm_engine.core.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt together; outputs come back in input order.

        `lora_request`: one adapter for every prompt, or a list with one entry (or None,
        the base model) per prompt."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompt_list = list(prompts)
        params_list = self._params_list(sampling_params, len(prompt_list))
        if priority is not None and len(priority) != len(prompt_list):
            raise ValueError("priority must have one entry per prompt")
        loras = _per_prompt(lora_request, len(prompt_list))
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompt_list, params_list, strict=True)):
                request_id = str(next(self._counter))
                self.llm_engine.add_request(
                    request_id, prompt, params, priority=priority[i] if priority else 0,
                    lora_request=loras[i],
                )
                ids.append(request_id)
        except Exception:
            self.llm_engine.abort_request(ids)  # nothing half-queued stays behind
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, generate."""
        one = bool(messages) and isinstance(messages[0], dict)
        conversations: Sequence[ChatMessages] = [messages] if one else messages  # type: ignore
        processor = self.llm_engine.processor
        prompts: list[PromptType] = []
        for conv in conversations:
            text, images = processor.render_chat(
                conv, add_generation_prompt, **(chat_template_kwargs or {})
            )
            _, ids = processor.tokenize(text, {"add_special_tokens": False})
            prompt: dict[str, Any] = {"prompt": text, "prompt_token_ids": ids}
            if images:  # each image's one placeholder id is expanded by the processor
                prompt["multi_modal_data"] = {"image": self._load_images(images)}
            prompts.append(prompt)
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm,
                             lora_request=lora_request)

    def _load_images(self, images: list[Any]) -> list[Any]:
        """URLs (data:, file:// under allowed_local_media_path, http(s)) fetched and decoded;
        images in memory as they are."""
        from kvflow.multimodal.media import MediaLimits, load_image_sync

        mm = self.llm_engine.config.mm_config
        limits = MediaLimits.from_env(mm.allowed_local_media_path if mm else None)
        return [load_image_sync(i, limits) if isinstance(i, str) else i for i in images]

    def sleep(self, level: int = 1) -> None:
        """Free the KV cache (level 1; the prefix cache too) and at level 2 the weights;
        generate() refuses while asleep. Needs enable_sleep_mode=True."""
        self.llm_engine.core.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restore the weights and the KV cache (or only "weights" / "kv_cache")."""
        self.llm_engine.core.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.llm_engine.core.is_sleeping()

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.llm_engine.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.llm_engine.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.llm_engine.list_loras()

    def pin_lora(self, lora_id: int) -> bool:
        return self.llm_engine.pin_lora(lora_id)

    def _params_list(
        self, sampling_params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * n
        else:
            params_list = list(sampling_params)
            if len(params_list) != n:
                raise ValueError(
                    f"got {len(params_list)} sampling params for {n} prompts; give one or one each"
                )
        result = []
        for params in params_list:
            params = params.clone()
            params.output_kind = RequestOutputKind.FINAL_ONLY  # the offline API returns once
            result.append(params)
        return result

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine = self.llm_engine
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Processed prompts", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]


def _per_prompt(lora_request: LoRARequest | Sequence[LoRARequest | None] | None,
                n: int) -> list[LoRARequest | None]:
    if lora_request is None or isinstance(lora_request, LoRARequest):
        return [lora_request] * n
    loras = list(lora_request)
    if len(loras) != n:
        raise ValueError(f"got {len(loras)} lora requests for {n} prompts; give one or one each")
    return loras
