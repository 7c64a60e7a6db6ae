"""uvicorn's HTTP/1.1 protocol with two guards: a deadline on request headers, JSON 400s.

uvicorn closes an idle kept-alive connection, but a client that opens a connection and sends
half a request line, or trickles its headers, is held forever; a few thousand of them use up
the server's file descriptors. And malformed HTTP (a bad Content-Length, bad chunking) is
answered by uvicorn itself, as text/plain, before the app sees it.
"""

from __future__ import annotations

import asyncio
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvflow.entrypoints.openai.errors import error_body


class GuardedH11Protocol(H11Protocol):
    """Headers must arrive within `header_timeout_s` of a request's first byte (or connect)."""

    header_timeout_s = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request has begun, its headers are not in
            self._arm_header_deadline()
        else:
            self._disarm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        # From here uvicorn's keep-alive timer guards the idle connection, until data comes.
        self._disarm_header_deadline()
        super().on_response_complete()

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None and not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout_s,
                                                         self._headers_overdue)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE and self.conn.trailing_data[0]:
            self._send_error(408, f"the request headers did not arrive within "
                                  f"{self.header_timeout_s:g} s")
        else:  # nothing of a request arrived: just hang up
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self._send_error(400, f"malformed HTTP request: {msg}")

    def _send_error(self, status: int, message: str) -> None:
        body = json.dumps(error_body(message, status)).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(body)).encode())]
        try:
            for event in (h11.Response(status_code=status, headers=headers),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already begun on this connection
            pass
        self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with this header deadline."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s})
