"""Turn an image URL from a chat message (data:, file://, http(s)://) into a decoded RGB image.

The URL comes from a client, so every step is bounded: the URL's length, the encoded bytes,
the pixel count (checked on the header, before any pixel is decoded) and the fetch time.
Every failure is a ValueError whose message can go back to the client as an HTTP 400.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import math
import os
import ssl
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
from PIL import Image

MAX_URL_CHARS = 8192  # for every URL but data:, whose payload is bounded by max_image_bytes
MAX_REDIRECTS = 5
_QUOTED_URL_CHARS = 80  # messages quote at most this much of a URL, never a whole data URL
_FILE_READ_CHUNK = 1 << 20
# Images are compressed already; asking for no content-encoding keeps a server from sending
# a small gzip body that inflates far past max_image_bytes inside a single chunk.
_HTTP_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "kvflow"}
# What pillow's decoders raise on corrupt input; all of it is the client's data at fault.
_DECODE_ERRORS = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError,
    ZeroDivisionError,
)  # fmt: skip


@dataclass(frozen=True)
class MediaLimits:
    """Bounds on images a client controls."""

    max_image_bytes: int = 20 * 2**20  # encoded size: data URL payload, file, HTTP body
    max_image_pixels: int = 40_000_000  # width * height, checked before decoding pixels
    fetch_timeout_s: float = 5.0  # a whole http(s) fetch, connect to last byte
    allowed_local_media_path: Path | None = None  # file:// only below it; None refuses file://

    def __post_init__(self) -> None:
        if self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ValueError("max_image_bytes and max_image_pixels must be positive")
        if not (math.isfinite(self.fetch_timeout_s) and self.fetch_timeout_s > 0):
            raise ValueError(f"fetch_timeout_s must be positive, got {self.fetch_timeout_s}")
        folder = self.allowed_local_media_path
        if folder is not None and not Path(folder).is_dir():
            raise ValueError(f"--allowed-local-media-path {folder} is not a directory")

    @classmethod
    def from_env(cls, allowed_local_media_path: str | Path | None = None) -> MediaLimits:
        """The defaults, overridden by KVFLOW_IMAGE_FETCH_TIMEOUT, KVFLOW_MAX_IMAGE_BYTES and
        KVFLOW_MAX_IMAGE_PIXELS; a bad value is a ValueError naming its variable."""
        defaults = cls()
        folder = None if allowed_local_media_path is None else Path(allowed_local_media_path)
        return cls(
            max_image_bytes=_env_number("KVFLOW_MAX_IMAGE_BYTES", defaults.max_image_bytes, int),
            max_image_pixels=_env_number("KVFLOW_MAX_IMAGE_PIXELS", defaults.max_image_pixels,
                                          int),
            fetch_timeout_s=_env_number("KVFLOW_IMAGE_FETCH_TIMEOUT", defaults.fetch_timeout_s,
                                         float),
            allowed_local_media_path=folder,
        )


def _env_number(name: str, default: float, kind: type[int] | type[float]) -> Any:
    """A positive, finite `kind` from the environment variable `name`, else `default`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{name}={raw!r} is not {what}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive, got {raw!r}")
    return value


# --- decoding -------------------------------------------------------------------------------


def decode_image(data: bytes, limits: MediaLimits) -> Image.Image:
    """Decode encoded image bytes into an RGB image, refusing too many pixels before decoding."""
    if not data:
        raise ValueError("the image is empty")
    if len(data) > limits.max_image_bytes:
        raise _too_many_bytes(f"the image is {len(data)} bytes", limits)
    with _open_image(data) as image:
        width, height = image.size  # from the header; no pixel is decoded yet
        if width * height > limits.max_image_pixels:
            raise ValueError(
                f"the image is {width}x{height} = {width * height} pixels, "
                f"over the limit of {limits.max_image_pixels}"
            )
        return _load_rgb(image)


def _open_image(data: bytes) -> Image.Image:
    # Pillow's own bomb check in open() refuses (or, above its lower bound, warns about)
    # images far larger than our default limit; those are refused by our check anyway.
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"the image has too many pixels: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise ValueError(f"cannot decode the image: {exc}") from None


def _load_rgb(image: Image.Image) -> Image.Image:
    # Plain convert("RGB") as vLLM does: alpha is dropped, palettes and CMYK are expanded.
    try:
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ValueError(f"the image has too many pixels: {exc}") from None
    except _DECODE_ERRORS as exc:
        raise ValueError(f"cannot decode the image: {exc}") from None


# --- loading --------------------------------------------------------------------------------


def load_image_bytes_sync(url: str, limits: MediaLimits) -> bytes:
    """The encoded bytes behind an image URL: data:, file:// or http(s)://."""
    scheme = _scheme_of(url)
    if scheme == "data":
        return _data_url_bytes(url, limits)
    if scheme == "file":
        return _local_file_bytes(url, limits)
    return _fetch_sync(url, limits)


def load_image_sync(url: str, limits: MediaLimits) -> Image.Image:
    """The RGB image behind an image URL, fetched and decoded in the calling thread."""
    return decode_image(load_image_bytes_sync(url, limits), limits)


async def load_image_bytes(url: str, limits: MediaLimits) -> bytes:
    """The encoded bytes behind an image URL, without blocking the event loop."""
    if _scheme_of(url) in ("http", "https"):
        return await _fetch(url, limits)
    # base64 decoding and file reads are blocking work: keep them off the event loop.
    return await asyncio.to_thread(load_image_bytes_sync, url, limits)


async def load_image(url: str, limits: MediaLimits) -> Image.Image:
    """The RGB image behind an image URL; decoding runs in a worker thread."""
    data = await load_image_bytes(url, limits)
    return await asyncio.to_thread(decode_image, data, limits)


def _scheme_of(url: str) -> str:
    if url[:5].lower() == "data:":
        return "data"
    if len(url) > MAX_URL_CHARS:
        raise ValueError(f"the image URL is {len(url)} characters, over {MAX_URL_CHARS}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed '[' of an IPv6 host
        raise ValueError(f"malformed image URL {_quote(url)}: {exc}") from None
    if parts.scheme not in ("file", "http", "https"):
        named = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(
            f"unsupported image URL {_quote(url)} ({named}): use data:, file://, http:// or https://"
        )
    if parts.scheme != "file" and not parts.hostname:
        raise ValueError(f"malformed image URL {_quote(url)}: no host")
    return parts.scheme


def _quote(url: str) -> str:
    if len(url) <= _QUOTED_URL_CHARS:
        return url
    return url[: _QUOTED_URL_CHARS - 3] + "..."


def _too_many_bytes(what: str, limits: MediaLimits) -> ValueError:
    return ValueError(f"{what}, over the limit of {limits.max_image_bytes} bytes")


def _data_url_bytes(url: str, limits: MediaLimits) -> bytes:
    # data:[<media type>][;<param>]*;base64,<payload>  (RFC 2397; only base64 is accepted)
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise ValueError(f"malformed data URL {_quote(url)}: no ',' before the payload")
    media_type, *params = (part.strip().lower() for part in header.split(";"))
    if media_type and not media_type.startswith("image/"):
        raise ValueError(f"data URL media type {_quote(media_type)!r} is not an image type")
    if not params or params[-1] != "base64":
        raise ValueError("data URL is not base64: use data:image/<type>;base64,<payload>")
    # Exact decoded size of valid base64, known before decoding anything.
    size = len(payload) * 3 // 4 - payload[-2:].count("=")
    if size > limits.max_image_bytes:
        raise _too_many_bytes(f"the data URL holds {size} bytes", limits)
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError as exc:  # binascii.Error, or a non-ASCII character
        raise ValueError(f"invalid base64 in the data URL: {exc}") from None


def _local_file_bytes(url: str, limits: MediaLimits) -> bytes:
    folder = limits.allowed_local_media_path
    if folder is None:
        raise ValueError(
            "file:// image URLs are not allowed: start the server with --allowed-local-media-path"
        )
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// image URL {_quote(url)} names a host; only local files")
    path = unquote(parts.path)
    if not path.startswith("/") or "\0" in path:
        raise ValueError(f"malformed file:// image URL {_quote(url)}")
    try:  # symlinks and '..' resolved, so neither can lead outside the folder
        real = Path(path).resolve()
        inside = real.is_relative_to(Path(folder).resolve())
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ValueError(f"cannot resolve file:// image URL {_quote(url)}: {exc}") from None
    if not inside:
        raise ValueError(f"file:// image URL {_quote(url)} is outside --allowed-local-media-path")
    return _read_regular_file(real, url, limits)


def _read_regular_file(path: Path, url: str, limits: MediaLimits) -> bytes:
    # O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: the resolved path
    # has no symlink, so one appearing now is a swap after the check.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ValueError(f"no such image file: {_quote(url)}") from None
    except OSError as exc:
        raise ValueError(f"cannot open image file {_quote(url)}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ValueError(f"image file {_quote(url)} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"image file {_quote(url)} is not a regular file")
        if info.st_size > limits.max_image_bytes:
            raise _too_many_bytes(f"image file {_quote(url)} is {info.st_size} bytes", limits)
        data = _read_at_most(fd, limits.max_image_bytes + 1)  # +1: a file grown since fstat
    finally:
        os.close(fd)
    if len(data) > limits.max_image_bytes:
        raise _too_many_bytes(f"image file {_quote(url)} is larger", limits)
    return data


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, _FILE_READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


# --- http(s) --------------------------------------------------------------------------------


class _CappedBody:
    """A response body's chunks, refused as soon as their total passes max_image_bytes."""

    __slots__ = ("_chunks", "_size", "_url", "_limits")

    def __init__(self, url: str, limits: MediaLimits) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._url = url
        self._limits = limits

    def add(self, chunk: bytes) -> None:
        self._size += len(chunk)
        if self._size > self._limits.max_image_bytes:
            raise _too_many_bytes(f"the image at {_quote(self._url)} is larger", self._limits)
        self._chunks.append(chunk)

    def data(self) -> bytes:
        return b"".join(self._chunks)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default context, built once: loading the CA bundle costs ~50 ms per client."""
    return httpx.create_ssl_context()


def _client_options(limits: MediaLimits) -> dict[str, Any]:
    return {
        "follow_redirects": True,
        "max_redirects": MAX_REDIRECTS,
        "timeout": limits.fetch_timeout_s,
        "headers": _HTTP_HEADERS,
        "verify": _tls_context(),
    }


def _check_response(response: httpx.Response, url: str, limits: MediaLimits) -> None:
    if not response.is_success:
        reason = f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
        raise ValueError(f"fetching {_quote(url)} failed: {reason}")
    length = response.headers.get("Content-Length", "")
    if length.isascii() and length.isdigit() and int(length) > limits.max_image_bytes:
        raise _too_many_bytes(f"the image at {_quote(url)} is {int(length)} bytes", limits)


def _timed_out(url: str, limits: MediaLimits) -> ValueError:
    return ValueError(f"fetching {_quote(url)} timed out after {limits.fetch_timeout_s:g} s")


def _fetch_failed(url: str, exc: Exception) -> ValueError:
    if isinstance(exc, httpx.TooManyRedirects):
        return ValueError(f"cannot fetch {_quote(url)}: more than {MAX_REDIRECTS} redirects")
    return ValueError(f"cannot fetch {_quote(url)}: {str(exc) or type(exc).__name__}")


def _fetch_sync(url: str, limits: MediaLimits) -> bytes:
    # httpx bounds each connect and read by the timeout; the deadline, checked as chunks
    # arrive, stops a server that drips bytes. A stalled last read can add one timeout.
    deadline = time.monotonic() + limits.fetch_timeout_s
    body = _CappedBody(url, limits)
    try:
        with (
            httpx.Client(**_client_options(limits)) as client,
            client.stream("GET", url) as response,
        ):
            _check_response(response, url, limits)
            for chunk in response.iter_bytes():
                if time.monotonic() > deadline:
                    raise _timed_out(url, limits)
                body.add(chunk)
    except httpx.TimeoutException:
        raise _timed_out(url, limits) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise _fetch_failed(url, exc) from None
    return body.data()


async def _fetch(url: str, limits: MediaLimits) -> bytes:
    try:
        return await asyncio.wait_for(_download(url, limits), limits.fetch_timeout_s)
    except asyncio.TimeoutError:
        raise _timed_out(url, limits) from None


async def _download(url: str, limits: MediaLimits) -> bytes:
    body = _CappedBody(url, limits)
    try:
        async with (
            httpx.AsyncClient(**_client_options(limits)) as client,
            client.stream("GET", url) as response,
        ):
            _check_response(response, url, limits)
            async for chunk in response.aiter_bytes():
                body.add(chunk)
    except httpx.TimeoutException:
        raise _timed_out(url, limits) from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise _fetch_failed(url, exc) from None
    return body.data()
