"""nftables faults inside a network namespace: drop and reject-with-RST traffic to an upstream
that runs in the namespace, reached from the test over a veth pair."""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.faults import start_echo_process
from tests.support.netns import NetNamespace, netns_support

REPO = Path(__file__).resolve().parents[2]
REQUEST = b"GET /ns HTTP/1.1\r\nHost: upstream\r\n\r\n"


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    reason = netns_support()
    if reason is not None:
        pytest.skip(f"network-namespace faults unavailable: {reason}")
    with NetNamespace() as namespace:
        yield namespace


def get(host: str, port: int, timeout: float = 2.0) -> int:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/ns")
        return conn.getresponse().status
    finally:
        conn.close()


def test_drop_and_reset_to_an_upstream_in_a_namespace(ns: NetNamespace, tmp_path: Path) -> None:
    echo, port = start_echo_process(tmp_path, name="echo-ns", host=ns.address, prefix=ns.prefix)
    ns.adopt(echo)
    assert get(ns.address, port) == 200
    established = socket.create_connection((ns.address, port), timeout=1)
    try:
        handle = ns.drop(port)
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            socket.create_connection((ns.address, port), timeout=0.3)
        assert time.monotonic() - start >= 0.29
        ns.remove(handle)
        assert get(ns.address, port) == 200

        ns.reject(port)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((ns.address, port), timeout=1)
        established.sendall(REQUEST)  # an open connection: its next segment is answered by RST
        with pytest.raises(ConnectionResetError):
            established.recv(100)
        assert "reject with tcp reset" in ns.rules()

        ns.clear()
        assert get(ns.address, port) == 200
        handle = ns.loss(port, 99)  # numgen random: 99 % of the packets
        assert "numgen random mod 100 < 99" in ns.rules()
        lost = 0
        for _ in range(5):  # each handshake gets through with p = 1 %
            try:
                socket.create_connection((ns.address, port), timeout=0.1).close()
            except TimeoutError:
                lost += 1
        assert lost >= 3, lost
        ns.remove(handle)
        assert get(ns.address, port) == 200
        echo.pause()  # SIGSTOP reaches the program itself: `ip netns exec` execs it
        with pytest.raises(TimeoutError):
            get(ns.address, port, timeout=0.3)
        echo.resume()
        assert get(ns.address, port) == 200
    finally:
        established.close()
    name = ns.name
    ns.close()
    listing = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    assert name not in listing


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_support_check_names_the_reason_when_namespaces_are_not_allowed() -> None:
    """Two real unprivileged settings: a non-root uid, and root of a user namespace (which
    may not create network namespaces of the host)."""
    code = "from tests.support.netns import netns_support; print(netns_support())"
    reasons = []
    for flags in (["--user"], ["--user", "--map-root-user"]):
        done = subprocess.run(
            ["unshare", *flags, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
            check=False,
        )
        if done.returncode != 0 and "unshare failed" in done.stderr:
            pytest.skip(f"user namespaces not available: {done.stderr.strip()}")
        assert done.returncode == 0, done.stderr
        reasons.append(done.stdout.strip())
    assert "needs root" in reasons[0] and "uid 65534" in reasons[0], reasons
    assert reasons[1].startswith("network namespaces are not permitted here:"), reasons
    assert "ip netns add" in reasons[1], reasons
