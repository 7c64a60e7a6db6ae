"""Images over the OpenAI chat API (issue 17, "Must show" 4, server side): `image_url` parts
(data:, file:// under --allowed-local-media-path, http://) give the same greedy tokens as the
offline `LLM.generate` of the equivalent prompt; bad images are OpenAI-shaped 400s and the
server keeps serving; the image metrics count what was sent. Every test ends with a leak check
(the /metrics gauges of requests and KV cache back to 0).

One `kvflow serve` process on a tiny random LLaVA (CLIP tower, Llama decoder; 25 placeholder
tokens per image), and the offline reference in this process on the same folder.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import openai
import pytest
from PIL import Image

from kvflow import LLM, SamplingParams
from kvflow.multimodal.example import save_random_llava
from tests.entrypoints.conftest import TINY_ARGS, RemoteServer, free_port
from tests.entrypoints.hostile import assert_error, wait_for_no_leftovers
from tests.entrypoints.vision_server import (
    ImageHost,
    counters,
    data_url,
    decoded,
    encode,
    noise_image,
)

MODEL = "tiny-llava"
TOKENS_PER_IMAGE = 25
MAX_TOKENS = 8
FETCH_TIMEOUT_S = 1  # KVFLOW_IMAGE_FETCH_TIMEOUT of the server
SLOW_S = 3.0  # the local image host's slow route answers after this
LOGPROB_TOL = 1e-4  # same engine, same threads: equal up to float printing; images move ~1e-3
# token ids in the response: the logprobs' tokens as "token_id:N"
AS_IDS: dict[str, Any] = {"ignore_eos": True, "return_tokens_as_token_ids": True}
ENGINE_KWARGS: dict[str, Any] = dict(num_threads=1, kv_cache_memory_gb=0.05, max_model_len=1024)

# File bytes of the test images (JPEG is lossy: the server sees `decoded(JPEG)`).
CAT = encode(noise_image(40, 50, seed=0), "PNG")
JPEG = encode(Image.new("RGB", (64, 32), "white"), "JPEG")
DOG = encode(Image.new("RGB", (33, 33), "red"), "PNG")
CAT_URL, DOG_URL = data_url(CAT), data_url(DOG)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return save_random_llava(tmp_path_factory.mktemp("llava") / "model", tokenizer_dir,
                             tower="clip", decoder="llama")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder file:// URLs may read: the cat as a PNG file."""
    folder = tmp_path_factory.mktemp("media")
    (folder / "cat.png").write_bytes(CAT)
    return folder


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    with ImageHost({"/cat.png": (0.0, CAT), "/slow.png": (SLOW_S, CAT)}) as running:
        yield running


@pytest.fixture(scope="module")
def server(llava_dir: Path, media_dir: Path) -> Iterator[RemoteServer]:
    args = [str(llava_dir), "--dtype", "float32", "--limit-mm-per-prompt", '{"image": 2}',
            "--allowed-local-media-path", str(media_dir), "--served-model-name", MODEL,
            *TINY_ARGS]
    with RemoteServer(args, env={"KVFLOW_IMAGE_FETCH_TIMEOUT": str(FETCH_TIMEOUT_S)}) as remote:
        yield remote


@pytest.fixture(scope="module")
def offline(llava_dir: Path) -> LLM:
    return LLM(str(llava_dir), dtype="float32", limit_mm_per_prompt={"image": 2},
               **ENGINE_KWARGS)


@pytest.fixture(scope="module")
def sent() -> set[bytes]:
    """The distinct images (file bytes decoded alike count once) that reached the engine."""
    return set()


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict[str, Any] | str) -> dict[str, Any]:
    return {"role": "user", "content": [
        {"type": "text", "text": p} if isinstance(p, str) else p for p in parts]}


def chat(server: RemoteServer, messages: list[dict[str, Any]], sent: set[bytes],
         images: list[bytes], max_tokens: int = MAX_TOKENS, **kwargs: Any) -> Any:
    """A greedy chat completion with token ids in its logprobs; `images` (the bytes behind
    its URLs) are recorded as sent once it succeeds."""
    out = server.client().chat.completions.create(
        model=MODEL, messages=messages, temperature=0,  # type: ignore[arg-type]
        max_tokens=max_tokens, logprobs=True, extra_body=AS_IDS, **kwargs)
    sent.update(images)
    return out


class Greedy(NamedTuple):
    """Greedy token ids and each one's logprob (a random tiny model's tokens barely depend on
    the image; their logprobs do)."""

    ids: list[int]
    logprobs: list[float]

    def same_as(self, other: Greedy) -> bool:
        return self.ids == other.ids and self.logprobs == pytest.approx(other.logprobs,
                                                                        abs=LOGPROB_TOL)


def greedy_of(out: Any) -> Greedy:
    content = out.choices[0].logprobs.content
    return Greedy([int(t.token.removeprefix("token_id:")) for t in content],
                  [t.logprob for t in content])


def reference(llm: LLM, prompt: str, images: list[bytes]) -> tuple[int, Greedy, str]:
    """(prompt tokens, greedy tokens, text) of the offline prompt with these images."""
    data = [decoded(i) for i in images]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=0)
    request = llm.generate({"prompt": prompt, "multi_modal_data": {"image": data}}, params,
                           use_tqdm=False)[0]
    out = request.outputs[0]
    logprobs = [entry[t].logprob for t, entry in zip(out.token_ids, out.logprobs or [],
                                                     strict=True)]
    return len(request.prompt_token_ids or []), Greedy(list(out.token_ids), logprobs), out.text


def assert_no_leaks(server: RemoteServer) -> None:
    leftovers = wait_for_no_leftovers(server)
    assert not leftovers, f"request state left: {leftovers}"


# ---- 1, 2: token parity with the offline prompt; streaming ---------------------------------


@pytest.mark.parametrize("image,media_type", [(CAT, "image/png"), (JPEG, "image/jpeg")],
                         ids=["png", "jpeg"])
def test_chat_matches_offline_generate(server: RemoteServer, offline: LLM, sent: set[bytes],
                                       image: bytes, media_type: str) -> None:
    prompt = "USER: <image>\nWhat?\nASSISTANT:"
    prompt_len, want, text = reference(offline, prompt, [image])
    out = chat(server, [user(image_part(data_url(image, media_type)), "What?")], sent, [image])
    assert greedy_of(out).same_as(want) and out.choices[0].message.content == text
    assert out.choices[0].finish_reason == "length"
    text_tokens = len(offline.get_tokenizer()(prompt)["input_ids"]) - 1  # <image> is one token
    assert out.usage.prompt_tokens == prompt_len == TOKENS_PER_IMAGE + text_tokens
    assert out.usage.completion_tokens == MAX_TOKENS
    # the image counts: another one gives other logprobs
    other = CAT if image is JPEG else JPEG
    assert not reference(offline, prompt, [other])[1].same_as(want)
    assert_no_leaks(server)


def test_streamed_chunks_make_the_greedy_text(server: RemoteServer, sent: set[bytes]) -> None:
    messages = [user(image_part(CAT_URL), "What?")]
    whole = chat(server, messages, sent, [CAT])
    stream = server.client().chat.completions.create(
        model=MODEL, messages=messages, temperature=0,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS, stream=True, extra_body={"ignore_eos": True})
    chunks: list[Any] = list(stream)
    assert chunks and all(len(c.choices) == 1 for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert_no_leaks(server)


# ---- 3: two images, the same image by every kind of URL, multi-turn ------------------------


def test_two_images_in_one_message(server: RemoteServer, offline: LLM, sent: set[bytes]) -> None:
    prompt = "USER: <image>\n<image>\nCompare.\nASSISTANT:"
    got = {}
    for order in ([CAT, DOG], [DOG, CAT]):
        prompt_len, want, _ = reference(offline, prompt, order)
        out = chat(server, [user(*(image_part(data_url(i)) for i in order), "Compare.")],
                   sent, order)
        assert greedy_of(out).same_as(want)
        assert out.usage.prompt_tokens == prompt_len
        got[order[0]] = want
    text_tokens = len(offline.get_tokenizer()(prompt)["input_ids"]) - 2  # two <image> tokens
    assert prompt_len == 2 * TOKENS_PER_IMAGE + text_tokens
    assert not got[CAT].same_as(got[DOG])  # each image in its own place
    assert_no_leaks(server)


def test_same_image_by_data_file_and_http_url(server: RemoteServer, offline: LLM,
                                              media_dir: Path, host: ImageHost,
                                              sent: set[bytes]) -> None:
    _, want, _ = reference(offline, "USER: <image>\nWhat?\nASSISTANT:", [CAT])
    for url in (CAT_URL, (media_dir / "cat.png").as_uri(), host.url("/cat.png")):
        out = chat(server, [user(image_part(url), "What?")], sent, [CAT])
        assert greedy_of(out).same_as(want), url
    assert_no_leaks(server)


def test_multi_turn_with_an_image_in_the_first_turn(server: RemoteServer, offline: LLM,
                                                    sent: set[bytes]) -> None:
    messages = [user(image_part(DOG_URL), "What?"),
                {"role": "assistant", "content": "A dog."},
                user("And its colour?")]
    prompt = "USER: <image>\nWhat?\nASSISTANT: A dog.</s>\nUSER: And its colour?\nASSISTANT:"
    prompt_len, want, _ = reference(offline, prompt, [DOG])
    out = chat(server, messages, sent, [DOG])
    assert greedy_of(out).same_as(want) and out.usage.prompt_tokens == prompt_len
    assert_no_leaks(server)


# ---- 4, 5: bad input ----------------------------------------------------------------------


def bad_requests(host: ImageHost, media_dir: Path) -> dict[str, tuple[list[Any], str]]:
    """name -> (the user message's parts, a word of the 400's message)."""
    closed = f"http://127.0.0.1:{free_port()}/cat.png"  # the port was free: nothing listens
    return {
        "3 images, limit 2": ([image_part(CAT_URL)] * 3 + ["What?"], "limit of 2"),
        "not an image": ([image_part(data_url(b"no image here"))], "cannot decode"),
        "unknown part": ([image_part(CAT_URL), {"type": "input_audio", "input_audio": {
            "data": "", "format": "wav"}}], "'input_audio'"),
        "unknown part alone": ([{"type": "video_url", "video_url": {"url": CAT_URL}}],
                               "'video_url'"),
        "file outside": ([image_part("file:///etc/hostname")], "outside"),
        "file missing": ([image_part((media_dir / "nope.png").as_uri())], "no such image"),
        "unreachable": ([image_part(closed)], "cannot fetch"),
        "http 404": ([image_part(host.url("/missing.png"))], "404"),
        "slow host": ([image_part(host.url("/slow.png"))], "timed out"),
        "no url": ([{"type": "image_url", "image_url": {}}, "What?"], "needs a url"),
    }


BAD = ["3 images, limit 2", "not an image", "unknown part", "unknown part alone",
       "file outside", "file missing", "unreachable", "http 404", "slow host", "no url"]


@pytest.mark.parametrize("case", BAD)
def test_bad_image_input_is_400(server: RemoteServer, host: ImageHost, media_dir: Path,
                                sent: set[bytes], case: str) -> None:
    parts, word = bad_requests(host, media_dir)[case]
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, [user(*parts)], sent, [])
    elapsed = time.monotonic() - start
    # within_s: even the slow host's case is answered before that host would answer
    error = assert_error(caught.value.response, 400, "messages", contains=word,  # type: ignore[arg-type]
                         within_s=SLOW_S)
    assert caught.value.body == error  # what the openai client hands its caller
    if case == "slow host":  # the fetch timeout ends it, long before the host answers
        assert FETCH_TIMEOUT_S <= elapsed < SLOW_S, elapsed
    out = chat(server, [user(image_part(CAT_URL), "What?")], sent, [CAT], max_tokens=2)
    assert out.choices[0].finish_reason == "length"  # served right afterwards
    assert_no_leaks(server)


def test_image_pil_part_from_json_is_400(server: RemoteServer, sent: set[bytes]) -> None:
    """image_pil (images in memory) is the offline API's; over HTTP only image_url."""
    for part in ({"type": "image_pil", "image_pil": 5}, {"type": "image"}):
        with pytest.raises(openai.BadRequestError, match="not supported"):
            chat(server, [user(image_part(CAT_URL), part)], sent, [])
    assert_no_leaks(server)


@pytest.fixture(scope="module")
def text_only(tiny_llama_path: Path) -> LLM:
    return LLM(str(tiny_llama_path), **ENGINE_KWARGS)


def test_text_only_model_refuses_images(text_only: LLM) -> None:
    """Offline, not by a second server (~25 s to start on 2 busy cores): the server answers
    this ValueError of Processor.render_chat with a 400, as for "3 images, limit 2" above."""
    params = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(ValueError, match="text-only model"):
        text_only.chat([user(image_part(CAT_URL), "What?")], params, use_tqdm=False)
    out = text_only.chat([{"role": "user", "content": "What?"}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2  # still serving
    assert not text_only.llm_engine.has_unfinished_requests()


def test_text_parts_on_a_text_only_model(text_only: LLM) -> None:
    """Text parts are joined for a template that reads strings, as the server does."""
    params = SamplingParams(max_tokens=2, temperature=0)
    out = text_only.chat([user("What?")], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


# ---- 6, 7: image metrics; nothing left --------------------------------------------------


def test_image_metrics_count_what_was_sent(server: RemoteServer, sent: set[bytes]) -> None:
    fresh = [encode(noise_image(30, 30, seed=10 + i), "PNG") for i in range(2)]
    before = counters(server.url("/metrics"))
    chat(server, [user(image_part(data_url(fresh[0])), "One.")], sent, fresh[:1])
    chat(server, [user(image_part(data_url(fresh[0])), "One again.")], sent, fresh[:1])
    # text before the image: no prefix-cache hit, so the encoder cache is asked for it
    chat(server, [user("First", image_part(data_url(fresh[1])), image_part(
        data_url(fresh[0])))], sent, fresh)
    after = counters(server.url("/metrics"))

    def delta(name: str) -> float:
        return after[f"kvflow:{name}_total"] - before.get(f"kvflow:{name}_total", 0.0)

    assert delta("mm_images_encoded") == 2  # each fresh image once
    assert delta("mm_images_processed") == 2
    # processor cache: the misses are the 2 fresh images; fresh[0]'s 2 repeats at least hit
    assert delta("mm_cache_queries") - delta("mm_cache_hits") == 2
    assert delta("mm_cache_hits") >= 2 and delta("mm_encoder_cache_hits") >= 1
    # over the whole module: one encoding and one preprocessing per distinct image
    assert after["kvflow:mm_images_encoded_total"] == len(sent)
    assert after["kvflow:mm_images_processed_total"] == len(sent)
    assert after["kvflow:mm_cache_hits_total"] > 0
    text = httpx.get(server.url("/metrics"), timeout=10).text
    for gauge in ("kvflow:mm_cache_hit_rate", "kvflow:mm_encoder_cache_hit_rate"):
        value = next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                     if line.startswith(gauge + "{"))
        assert 0 < value < 1, (gauge, value)
    assert_no_leaks(server)


def test_nothing_left_at_the_end(server: RemoteServer) -> None:
    gauges = wait_for_no_leftovers(server)
    assert not gauges, f"left after the module: {gauges}"
    assert server.proc.poll() is None, "the server died"
