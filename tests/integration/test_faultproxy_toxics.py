"""The fault proxy's toxics, each measured on real sockets against a TCP echo upstream.

The proxy runs in-process (:class:`FaultProxyThread`); the client is a plain blocking socket
with a timeout on every operation.  Timing bounds are loose on the slow side (a loaded CI
machine) and tight on the fast side (a fault that did not happen).
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator

import pytest
from tests.support.faults import TcpEchoServer

from ubimesh.testing.faultproxy import ControlError, FaultProxy, FaultProxyThread, ProxyHandle

LOOPBACK = "127.0.0.1"


@pytest.fixture
def echo() -> Iterator[TcpEchoServer]:
    with TcpEchoServer() as server:
        yield server


@pytest.fixture
def runner() -> Iterator[FaultProxyThread]:
    with FaultProxyThread() as r:
        yield r


@pytest.fixture
def fp(runner: FaultProxyThread, echo: TcpEchoServer) -> ProxyHandle:
    return runner.start_proxy((LOOPBACK, echo.port), seed=7)


def connect(port: int, timeout: float = 2.0) -> socket.socket:
    sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_end(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything until EOF (bounded by ``limit`` and the socket's timeout)."""
    out = bytearray()
    while len(out) < limit:
        data = sock.recv(65536)
        if not data:
            break
        out += data
    return bytes(out)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(n - len(out))
        if not data:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += data
    return bytes(out)


def rtt(sock: socket.socket, payload: bytes = b"ping") -> float:
    start = time.monotonic()
    sock.sendall(payload)
    assert read_exactly(sock, len(payload)) == payload
    return time.monotonic() - start


def assert_reset(port: int) -> None:
    """A connection to ``port`` is reset: at connect (the RST can beat connect's return on
    loopback), on send or on the first read."""
    with pytest.raises(ConnectionResetError), connect(port) as sock:
        sock.sendall(b"x")
        sock.recv(10)


def wait_for(predicate: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")


def test_passthrough_and_counters(fp: ProxyHandle, echo: TcpEchoServer) -> None:
    payload = bytes(range(256)) * 400  # 100 KiB: several reads and writes each way
    with connect(fp.port) as sock:
        sock.sendall(payload)
        assert read_exactly(sock, len(payload)) == payload
        assert fp.stats()["connections_active"] == 1
        sock.shutdown(socket.SHUT_WR)
        assert read_until_end(sock) == b""  # the upstream's FIN is passed on
    wait_for(lambda: fp.stats()["connections_active"] == 0)
    stats = fp.stats()
    assert stats["connections_accepted"] == 1
    assert stats["bytes_upstream"] == stats["bytes_downstream"] == len(payload)
    assert echo.connections == 1


def test_latency_applies_to_existing_connections_within_tolerance(fp: ProxyHandle) -> None:
    with connect(fp.port) as sock:
        assert rtt(sock) < 0.05
        fp.add_toxic("latency", stream="downstream", latency=100, jitter=10)
        fp.add_toxic("latency", stream="upstream", latency=50)
        samples = [rtt(sock) for _ in range(3)]
        assert all(0.140 <= s < 0.140 + 0.08 for s in samples), samples
        fp.remove_toxic("latency_downstream")
        fp.remove_toxic("latency_upstream")
        assert rtt(sock) < 0.05


def test_latency_delays_a_stream_without_slowing_it(fp: ProxyHandle) -> None:
    """Chunks wait in a bounded queue while reading goes on: 8 chunks cost one latency."""
    fp.add_toxic("latency", latency=150)
    with connect(fp.port) as sock:
        start = time.monotonic()
        for _ in range(8):
            sock.sendall(b"x" * 1000)
            time.sleep(0.005)
        read_exactly(sock, 8000)
        assert time.monotonic() - start < 0.150 + 0.04 * 8 + 0.1


def test_bandwidth(fp: ProxyHandle) -> None:
    fp.add_toxic("bandwidth", rate=256)  # KiB/s
    payload = b"b" * (64 * 1024)
    with connect(fp.port, timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(payload)
        assert read_exactly(sock, len(payload)) == payload
        elapsed = time.monotonic() - start
    assert 0.22 <= elapsed < 0.8, elapsed


def test_slicer_splits_writes_with_delay(fp: ProxyHandle) -> None:
    fp.add_toxic("slicer", average_size=100, size_variation=20, delay=3000)  # delay in µs
    payload = bytes(range(256)) * 16  # 4096 bytes: about 41 pieces, 3 ms apart
    with connect(fp.port) as sock:
        start = time.monotonic()
        sock.sendall(payload)
        reads = []
        while sum(reads) < len(payload):
            reads.append(len(sock.recv(65536)))
        elapsed = time.monotonic() - start
    assert elapsed >= 0.1, elapsed
    assert len(reads) > 5 and max(reads) < 1000, reads


def test_truncate_forwards_n_bytes_then_closes(fp: ProxyHandle) -> None:
    toxic = fp.add_toxic("truncate", bytes=1000)
    assert toxic["type"] == "limit_data"
    with connect(fp.port) as sock:
        sock.sendall(b"t" * 5000)
        assert read_until_end(sock) == b"t" * 1000


def test_reset_after_n_bytes_is_econnreset(fp: ProxyHandle) -> None:
    fp.add_toxic("reset_peer", bytes=1000)
    with connect(fp.port) as sock:
        sock.sendall(b"r" * 5000)
        got = bytearray()
        with pytest.raises(ConnectionResetError):
            while len(got) < 5000:
                data = sock.recv(65536)
                assert data, "EOF instead of a reset"
                got += data
        assert len(got) == 1000
    assert fp.stats()["connections_reset"] == 1


def test_reset_peer_on_accept_never_reaches_upstream(fp: ProxyHandle, echo: TcpEchoServer) -> None:
    fp.add_toxic("reset_peer", timeout=0)
    assert_reset(fp.port)
    assert echo.connections == 0
    assert fp.stats()["upstream_connect_failures"] == 0


def test_reset_peer_with_timeout_resets_an_existing_connection(fp: ProxyHandle) -> None:
    with connect(fp.port) as sock:
        rtt(sock)
        fp.add_toxic("reset", timeout=100)
        start = time.monotonic()
        with pytest.raises(ConnectionResetError):
            sock.recv(10)
        assert 0.09 <= time.monotonic() - start < 0.5


def test_timeout_stops_forwarding_then_closes(fp: ProxyHandle) -> None:
    with connect(fp.port, timeout=0.3) as sock:
        rtt(sock)
        fp.add_toxic("timeout", timeout=0)
        sock.sendall(b"lost")
        with pytest.raises(TimeoutError):
            sock.recv(10)
        fp.remove_toxic("timeout_downstream")
        assert rtt(sock, b"back") < 0.1  # the data sent meanwhile was dropped
    fp.add_toxic("timeout", name="closing", timeout=200)
    with connect(fp.port, timeout=2) as sock:
        start = time.monotonic()
        sock.sendall(b"x")
        assert read_until_end(sock) == b""
        assert 0.19 <= time.monotonic() - start < 0.6
    assert fp.stats()["bytes_dropped_downstream"] >= 5


def test_blackhole_accepts_and_never_answers(fp: ProxyHandle, echo: TcpEchoServer) -> None:
    fp.add_toxic("blackhole")
    with connect(fp.port, timeout=0.3) as sock:
        sock.sendall(b"hello?")
        with pytest.raises(TimeoutError):
            sock.recv(10)
    assert echo.connections == 0
    fp.update_toxic("blackhole_downstream", timeout=150)
    with connect(fp.port, timeout=2) as sock:
        start = time.monotonic()
        assert read_until_end(sock) == b""
        assert 0.14 <= time.monotonic() - start < 0.6


def test_slow_close_delays_the_fin(fp: ProxyHandle) -> None:
    fp.add_toxic("slow_close", delay=300)
    with connect(fp.port) as sock:
        assert rtt(sock) < 0.1
        start = time.monotonic()
        sock.shutdown(socket.SHUT_WR)
        assert read_until_end(sock) == b""
        assert 0.29 <= time.monotonic() - start < 0.8


def test_down_refuses_then_comes_back_on_the_same_port(fp: ProxyHandle) -> None:
    port = fp.port
    with connect(port) as existing:
        rtt(existing)
        fp.disable()
        assert read_until_end(existing) == b""  # existing connections are closed
    with pytest.raises(ConnectionRefusedError):
        connect(port, timeout=1)
    fp.enable()
    assert fp.port == port
    with connect(port) as sock:
        rtt(sock)


def test_down_reset_mode_resets_on_accept(fp: ProxyHandle, echo: TcpEchoServer) -> None:
    fp.disable(mode="reset")
    assert_reset(fp.port)
    fp.reset()  # removes toxics and enables
    with connect(fp.port) as sock:
        rtt(sock)


def test_toxicity_is_drawn_per_connection(fp: ProxyHandle) -> None:
    fp.add_toxic("reset_peer", timeout=0, toxicity=0.5)
    outcomes = []
    for _ in range(16):
        try:
            with connect(fp.port) as sock:
                rtt(sock)
            outcomes.append("ok")
        except (ConnectionResetError, EOFError):
            outcomes.append("reset")
    assert 2 <= outcomes.count("reset") <= 14, outcomes  # seed 7 makes this deterministic


def test_connection_cap_resets_the_overflow(runner: FaultProxyThread, echo: TcpEchoServer) -> None:
    fp = runner.start_proxy((LOOPBACK, echo.port), max_connections=2)
    with connect(fp.port) as a, connect(fp.port) as b:
        rtt(a)
        rtt(b)
        assert_reset(fp.port)
    assert fp.stats()["connections_rejected"] == 1


def test_dead_upstream_is_passed_on_as_a_reset(runner: FaultProxyThread) -> None:
    with socket.create_server((LOOPBACK, 0)) as placeholder:
        dead_port = placeholder.getsockname()[1]
    fp = runner.start_proxy((LOOPBACK, dead_port))
    assert_reset(fp.port)
    assert fp.stats()["upstream_connect_failures"] == 1


def test_invalid_toxics_are_refused_with_the_reason(fp: ProxyHandle) -> None:
    cases = [
        ({"type": "lag"}, 400, "unknown toxic type 'lag'"),
        ({"type": "latency", "attributes": {"delay": 5}}, 400, "latency has no attribute"),
        ({"type": "latency", "attributes": {"latency": -1}}, 400, "at least 0"),
        ({"type": "bandwidth"}, 400, "bandwidth.rate"),
        ({"type": "latency", "stream": "sideways"}, 400, "stream must be"),
        ({"type": "latency", "toxicity": 2}, 400, "toxicity"),
    ]
    for spec, status, text in cases:
        with pytest.raises(ControlError) as info:
            fp.request("POST", "/toxics", spec)
        assert info.value.status == status and text in info.value.message, spec
    fp.add_toxic("latency", name="slow", latency=1)
    with pytest.raises(ControlError) as info:
        fp.add_toxic("latency", name="slow", latency=1)
    assert info.value.status == 409
    with pytest.raises(ControlError) as info:
        fp.remove_toxic("nope")
    assert info.value.status == 404
    assert [t["name"] for t in fp.toxics()] == ["slow"]


def test_errno_of_a_refusal_is_econnrefused(fp: ProxyHandle) -> None:
    """What a ubimesh proxy sees as connect-failure: the errno, not just an exception."""
    fp.disable()
    sock = socket.socket()
    sock.settimeout(1)
    try:
        assert sock.connect_ex((LOOPBACK, fp.port)) == errno.ECONNREFUSED
    finally:
        sock.close()


def test_listens_on_loopback_only() -> None:
    for listen in (("0.0.0.0", 0), ("10.1.2.3", 0)):
        with pytest.raises(ValueError, match="loopback only"):
            FaultProxy((LOOPBACK, 1), listen)
    with pytest.raises(ValueError, match="loopback only"):
        FaultProxy((LOOPBACK, 1), control=("0.0.0.0", 0))
