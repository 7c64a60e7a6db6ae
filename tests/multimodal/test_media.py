"""kvflow.multimodal.media: image URLs to RGB images, every failure a clear ValueError.

HTTP is served by a local ThreadingHTTPServer; nothing leaves the machine.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

import pytest
from PIL import Image, ImageFile

from kvflow.multimodal.media import (
    MAX_URL_CHARS,
    MediaLimits,
    decode_image,
    load_image,
    load_image_bytes_sync,
    load_image_sync,
)

Loader = Callable[[str, MediaLimits], Awaitable[Image.Image]]

LIMITS = MediaLimits(max_image_bytes=10_000, fetch_timeout_s=0.5)
SLOW_S = 3.0  # a slow handler's stall: far past LIMITS' timeout, cut short at teardown
BIG_BODY = 20_000  # bytes, over LIMITS.max_image_bytes


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


PNG = _encode(Image.new("RGB", (6, 4), (255, 0, 0)), "PNG")
JPEG = _encode(Image.new("RGB", (8, 5), (0, 0, 255)), "JPEG")


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _black_1bit_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG, built row by row so no full-size image is ever held."""
    compressor = zlib.compressobj(1)
    row = bytes(1 + (width + 7) // 8)  # filter byte, then the packed bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", pixels)
        + _png_chunk(b"IEND", b"")
    )


# --- a local HTTP server --------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stop = threading.Event()  # replaced per instance in the fixture

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients hang up on purpose (timeouts, oversize bodies)


class _Handler(BaseHTTPRequestHandler):
    """Fixed responses, one per path."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        routes: dict[str, Callable[[], None]] = {
            "/image.png": lambda: self._send(200, PNG, "image/png"),
            "/image.jpg": lambda: self._send(200, JPEG, "image/jpeg"),
            "/text": lambda: self._send(200, b"hello, not an image", "text/plain"),
            "/redirect": lambda: self._redirect("/image.png"),
            "/redirect-loop": lambda: self._redirect("/redirect-loop"),
            "/slow": self._slow,
            "/drip": self._drip,
            "/big-length": lambda: self._send(200, bytes(BIG_BODY), "image/png"),
            "/big-chunked": self._big_chunked,
        }
        try:
            routes.get(self.path, lambda: self._send(404, b"not found", "text/plain"))()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    @property
    def _stop(self) -> threading.Event:
        return cast(_Server, self.server).stop

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _slow(self) -> None:
        self._stop.wait(SLOW_S)
        self._send(200, PNG, "image/png")

    def _drip(self) -> None:
        """One byte every 50 ms: every read succeeds, only a whole-fetch deadline stops it."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        deadline = time.monotonic() + SLOW_S
        while time.monotonic() < deadline and not self._stop.wait(0.05):
            self.wfile.write(b"\0")
            self.wfile.flush()

    def _big_chunked(self) -> None:
        """Up to 1 MB with no Content-Length: the client must stop counting on its own."""
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = bytes(4096)
        for _ in range(256):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        self.wfile.write(b"0\r\n\r\n")


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.stop.set()  # wakes stalled handlers so shutdown is quick
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(params=["sync", "async"])
def load(request: pytest.FixtureRequest) -> Loader:
    """load_image_sync and load_image behind one awaitable signature."""

    async def load_(url: str, limits: MediaLimits) -> Image.Image:
        if request.param == "sync":
            return load_image_sync(url, limits)
        return await load_image(url, limits)

    return load_


# --- data: URLs and decoding ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "fmt", "color"),
    [
        ("RGB", "PNG", (255, 0, 0)),
        ("RGB", "JPEG", (0, 0, 255)),
        ("L", "PNG", 128),
        ("RGBA", "PNG", (10, 20, 30, 0)),
        ("P", "PNG", 3),
        ("1", "PNG", 1),
        ("CMYK", "JPEG", (0, 0, 0, 0)),
        ("I;16", "PNG", 1000),
        ("P", "GIF", 7),
    ],
)
async def test_data_url_comes_out_rgb(
    load: Loader, mode: str, fmt: str, color: int | tuple[int, ...]
) -> None:
    data = _encode(Image.new(mode, (7, 3), color), fmt)
    image = await load(_data_url(data, f"image/{fmt.lower()}"), LIMITS)
    assert image.mode == "RGB"
    assert image.size == (7, 3)
    if mode == "RGBA":
        assert image.getpixel((0, 0)) == (10, 20, 30)  # alpha dropped, as vLLM does


async def test_data_url_without_media_type(load: Loader) -> None:
    image = await load("data:;base64," + base64.b64encode(PNG).decode(), LIMITS)
    assert image.size == (6, 4)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,@@@@", "invalid base64"),
        ("data:image/png;base64,iVBORw0", "invalid base64"),  # bad padding
        ("data:image/png;base64,ïïïï", "invalid base64"),
        (_data_url(PNG, "text/plain"), "not an image type"),
        ("data:image/png," + PNG.hex(), "not base64"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64,", "empty"),
        (_data_url(b"hello, not an image"), "cannot decode the image"),
        (_data_url(PNG[: len(PNG) // 2]), "cannot decode the image"),
        (_data_url(bytes(LIMITS.max_image_bytes + 1)), "over the limit of 10000 bytes"),
    ],
)
async def test_bad_data_url(load: Loader, url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await load(url, LIMITS)


@pytest.mark.parametrize("size", [30, 31, 32])  # base64 with 0, 2 and 1 padding characters
def test_data_url_size_bound_is_exact(size: int) -> None:
    data = os.urandom(size)
    assert load_image_bytes_sync(_data_url(data), MediaLimits(max_image_bytes=size)) == data
    with pytest.raises(ValueError, match="over the limit"):
        load_image_bytes_sync(_data_url(data), MediaLimits(max_image_bytes=size - 1))


def test_messages_do_not_echo_long_urls() -> None:
    long_data_url = "data:image/png;base64" + "A" * 100_000  # no ','
    with pytest.raises(ValueError, match="no ','") as caught:
        load_image_bytes_sync(long_data_url, LIMITS)
    assert len(str(caught.value)) < 200
    with pytest.raises(ValueError, match="ftp") as caught:
        load_image_bytes_sync("ftp://example.com/" + "a" * 5000, LIMITS)
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/cat.png", "scheme 'ftp'"),
        ("cat.png", "no scheme"),
        ("javascript:alert(1)", "scheme 'javascript'"),
        ("http://[::1/cat.png", "malformed image URL"),
        ("http:///cat.png", "no host"),
        ("https://example.com/" + "a" * MAX_URL_CHARS, "over 8192"),
    ],
)
async def test_bad_url(load: Loader, url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await load(url, LIMITS)


def test_pixel_limit_is_width_times_height() -> None:
    data = _encode(Image.new("RGB", (100, 100)), "PNG")
    assert decode_image(data, MediaLimits(max_image_pixels=10_000)).size == (100, 100)
    with pytest.raises(ValueError, match="100x100 = 10000 pixels, over the limit of 9999"):
        decode_image(data, MediaLimits(max_image_pixels=9_999))


@pytest.mark.parametrize("side", [8_000, 20_000])  # under and over pillow's own bomb limit
def test_pixel_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    bomb = _black_1bit_png(side, side)
    assert len(bomb) < 300_000  # small on the wire, side*side bytes once decoded

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels decoded before the pixel check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValueError, match="pixels"):
        decode_image(bomb, MediaLimits())


# --- file:// URLs ---------------------------------------------------------------------------


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """An allowed folder holding one PNG, next to a PNG outside it."""
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "my cat.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    return folder


def _in(folder: Path) -> MediaLimits:
    return MediaLimits(max_image_bytes=10_000, allowed_local_media_path=folder)


async def test_file_url_inside_allowed_folder(load: Loader, media: Path) -> None:
    (media / "link.png").symlink_to(media / "my cat.png")
    for name in ("my cat.png", "link.png"):
        image = await load((media / name).as_uri(), _in(media))
        assert (image.mode, image.size) == ("RGB", (6, 4))
    image = await load(f"file://localhost{media}/sub/../my%20cat.png", _in(media))
    assert image.size == (6, 4)


async def test_file_url_refused_without_the_option(load: Loader, media: Path) -> None:
    with pytest.raises(ValueError, match="start the server with --allowed-local-media-path"):
        await load((media / "my cat.png").as_uri(), LIMITS)


async def test_file_url_escapes_refused(load: Loader, media: Path) -> None:
    (media / "escape.png").symlink_to(media.parent / "secret.png")
    for url in (f"file://{media}/../secret.png", (media / "escape.png").as_uri()):
        with pytest.raises(ValueError, match="outside --allowed-local-media-path"):
            await load(url, _in(media))


async def test_bad_file_urls(load: Loader, media: Path) -> None:
    (media / "big.png").write_bytes(bytes(10_001))
    (media / "folder").mkdir()
    (media / "loop").symlink_to(media / "loop")
    cases = {
        (media / "missing.png").as_uri(): "no such image file",
        (media / "big.png").as_uri(): "is 10001 bytes, over the limit",
        (media / "folder").as_uri(): "is a directory",
        f"file://otherhost{media}/my%20cat.png": "names a host",
        (media / "loop").as_uri(): "symbolic links|symlink loop|cannot",
    }
    for url, message in cases.items():
        with pytest.raises(ValueError, match=message):
            await load(url, _in(media))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
async def test_fifo_refused_without_waiting(load: Loader, media: Path) -> None:
    os.mkfifo(media / "pipe.png")  # opening it for reading would wait for a writer
    with pytest.raises(ValueError, match="not a regular file"):
        await load((media / "pipe.png").as_uri(), _in(media))


def test_allowed_folder_must_exist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not a directory"):
        MediaLimits(allowed_local_media_path=tmp_path / "absent")


# --- http(s) URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "size"), [("/image.png", (6, 4)), ("/image.jpg", (8, 5))])
async def test_http_image(load: Loader, base_url: str, path: str, size: tuple[int, int]) -> None:
    image = await load(base_url + path, LIMITS)
    assert (image.mode, image.size) == ("RGB", size)


async def test_http_redirect_followed(load: Loader, base_url: str) -> None:
    assert (await load(base_url + "/redirect", LIMITS)).size == (6, 4)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/missing", "failed: HTTP 404 Not Found"),
        ("/redirect-loop", "more than 5 redirects"),
        ("/big-length", "is 20000 bytes, over the limit of 10000 bytes"),
        ("/big-chunked", "is larger, over the limit of 10000 bytes"),
        ("/text", "cannot decode the image"),
    ],
)
async def test_http_failures(load: Loader, base_url: str, path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await load(base_url + path, LIMITS)


@pytest.mark.parametrize("path", ["/slow", "/drip"])
async def test_http_whole_fetch_times_out(load: Loader, base_url: str, path: str) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"timed out after 0\.5 s"):
        await load(base_url + path, LIMITS)
    assert time.monotonic() - start < 1.5


async def test_http_connection_refused(load: Loader) -> None:
    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match="cannot fetch"):
        await load(f"http://127.0.0.1:{port}/image.png", LIMITS)


async def test_async_fetch_leaves_event_loop_free(base_url: str) -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    with pytest.raises(ValueError, match="timed out"):
        await load_image(base_url + "/slow", LIMITS)
    ticker.cancel()
    assert ticks >= 20  # about 50 in the 0.5 s the fetch waited


# --- MediaLimits.from_env -------------------------------------------------------------------

_ENV = ("KVFLOW_IMAGE_FETCH_TIMEOUT", "KVFLOW_MAX_IMAGE_BYTES", "KVFLOW_MAX_IMAGE_PIXELS")


def test_from_env_defaults_and_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    assert MediaLimits.from_env() == MediaLimits()
    monkeypatch.setenv("KVFLOW_IMAGE_FETCH_TIMEOUT", "2.5")
    monkeypatch.setenv("KVFLOW_MAX_IMAGE_BYTES", "1000")
    monkeypatch.setenv("KVFLOW_MAX_IMAGE_PIXELS", " 4096 ")
    limits = MediaLimits.from_env(str(tmp_path))
    assert limits == MediaLimits(1000, 4096, 2.5, tmp_path)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KVFLOW_IMAGE_FETCH_TIMEOUT", "soon"),
        ("KVFLOW_IMAGE_FETCH_TIMEOUT", "-1"),
        ("KVFLOW_IMAGE_FETCH_TIMEOUT", "nan"),
        ("KVFLOW_IMAGE_FETCH_TIMEOUT", "inf"),
        ("KVFLOW_MAX_IMAGE_BYTES", "1.5"),
        ("KVFLOW_MAX_IMAGE_BYTES", "20MB"),
        ("KVFLOW_MAX_IMAGE_PIXELS", "0"),
    ],
)
def test_from_env_bad_values(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        MediaLimits.from_env()
