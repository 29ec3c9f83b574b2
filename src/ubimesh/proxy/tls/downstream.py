"""Server-side TLS on an accepted connection, after the filter chain was chosen.

The chain selector may already have read the ClientHello (tls_inspector); those bytes are fed
to the TLS protocol before the socket's next bytes, so nothing is read twice or lost. The
event loop's own TLS protocol does the work (uvloop's, written in Cython, or asyncio's): it is
created the way ``loop.start_tls`` creates it, with ``_Gate`` as its application protocol. When
the handshake completes, the gate verifies the peer (``PeerVerifier``), stores the result on the
chain's protocol (its ``tls`` attribute) and only then hands the connection to it (through
``buffered.BufferedApp``), so a refused peer never reaches the HTTP connection manager or an
upstream.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from ubimesh.proxy.tls.buffered import BufferedApp
from ubimesh.proxy.tls.manager import TlsEndpoint, TlsUnavailable
from ubimesh.telemetry.stats import Counter

log = logging.getLogger("ubimesh.tls")


class TlsStats:
    """``<prefix>ssl.*`` counters (Envoy's names where they exist)."""

    def __init__(self, counter: Callable[[str], Counter], prefix: str) -> None:
        self.handshake = counter(prefix + "ssl.handshake")
        self.connection_error = counter(prefix + "ssl.connection_error")
        self.fail_verify = counter(prefix + "ssl.fail_verify_san")
        self.no_certificate = counter(prefix + "ssl.no_certificate")


def _protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The loop's own SSL protocol class (both take the same arguments as in start_tls)."""
    if type(loop).__module__.startswith("uvloop"):
        import importlib

        # Not in uvloop's type stubs, but importable: what uvloop's start_tls uses.
        return importlib.import_module("uvloop.loop").SSLProtocol
    from asyncio.sslproto import SSLProtocol as AsyncioSSLProtocol

    return AsyncioSSLProtocol


class _Gate(asyncio.Protocol):
    """The TLS protocol's application until the peer is verified."""

    def __init__(self, app: asyncio.Protocol, verifier: Any, stats: TlsStats) -> None:
        self.app = app
        self.verifier = verifier
        self.stats = stats
        self.passed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls_transport: Any = transport
        from ubimesh.proxy.tls.verify import PeerRejected

        try:
            peer = self.verifier.verify(tls_transport.get_extra_info("ssl_object"))
        except PeerRejected as exc:
            self.stats.fail_verify.value += 1
            log.info(
                "TLS peer %s refused: %s", tls_transport.get_extra_info("peername"), exc
            )
            tls_transport.abort()
            return
        self.stats.handshake.value += 1
        if not peer.presented:
            self.stats.no_certificate.value += 1
        self.passed = True
        app = self.app
        if hasattr(app, "tls"):
            app.tls = peer
        # The application reads through BufferedApp: the TLS protocol then decrypts into a
        # reused buffer instead of allocating 256 KiB per read (see tls/buffered.py).
        tls_transport.set_protocol(BufferedApp(app))
        app.connection_made(tls_transport)

    def data_received(self, data: bytes) -> None:
        # Only reached when the peer was refused (the transport is closing).
        return None

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.passed and exc is not None:
            log.debug("TLS handshake failed: %s", exc)


def start_server_tls(
    transport: asyncio.Transport,
    app: asyncio.Protocol,
    endpoint: TlsEndpoint,
    buffered: bytes,
    handshake_timeout: float,
    stats: TlsStats,
) -> None:
    """Run the TLS handshake on ``transport`` (``buffered``: bytes already read from it), then
    give the verified connection to ``app``. A failure closes the connection."""
    try:
        context, verifier = endpoint.current()
    except TlsUnavailable as exc:
        stats.connection_error.value += 1
        log.warning("TLS connection refused: %s", exc)
        transport.abort()
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def handshake_done(fut: asyncio.Future[None]) -> None:
        if fut.cancelled():
            return
        if fut.exception() is not None:
            stats.connection_error.value += 1

    waiter.add_done_callback(handshake_done)
    gate = _Gate(app, verifier, stats)
    proto = _protocol_class(loop)(
        loop,
        gate,
        context,
        waiter,
        server_side=True,
        ssl_handshake_timeout=handshake_timeout,
    )
    transport.set_protocol(proto)
    proto.connection_made(transport)
    view = memoryview(buffered)
    while view and not transport.is_closing():
        buf = proto.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        proto.buffer_updated(n)
        view = view[n:]
