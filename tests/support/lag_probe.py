"""Time a proxy's admin ``/ready`` from a process of its own: the proxy's event-loop lag.

A load test that times ``/ready`` from its own event loop measures its own lag too: the
client loop that fires 500 requests/s, and any thread beside it, stalls far more than the
proxy does (seen in CI: one 160 ms sample among 60). Here the probe runs alone, so what it
reads is the proxy's loop plus the machine's scheduling.

``python -m tests.support.lag_probe ADMIN_PORT INTERVAL`` probes every INTERVAL seconds
until a line (or EOF) arrives on stdin, then prints one latency in seconds per line. Every
probe has a 2 s timeout; a timeout is reported as 2.0.
"""

from __future__ import annotations

import http.client
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.support.procs import LOOPBACK

TIMEOUT = 2.0


def probe_once(port: int) -> float:
    start = time.monotonic()
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/ready")
        conn.getresponse().read()
    except OSError:
        return TIMEOUT
    finally:
        conn.close()
    return time.monotonic() - start


def main(argv: list[str]) -> int:
    port, interval = int(argv[0]), float(argv[1])
    lags: list[float] = []
    deadline = time.monotonic() + 120  # bounded even if the test never says stop
    while time.monotonic() < deadline:
        lags.append(probe_once(port))
        ready, _, _ = select.select([sys.stdin], [], [], interval)
        if ready:
            break
    sys.stdout.write("".join(f"{lag}\n" for lag in lags))
    return 0


class LagProbe:
    """Run the probe beside a test: ``with LagProbe(admin) as probe: ...; probe.lags``."""

    def __init__(self, admin: int, interval: float = 0.02) -> None:
        self.admin = admin
        self.interval = interval
        self.lags: list[float] = []
        self._proc: subprocess.Popen[str] | None = None

    def __enter__(self) -> LagProbe:
        root = Path(__file__).resolve().parents[2]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.lag_probe", str(self.admin), str(self.interval)],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        return self

    def stop(self) -> list[float]:
        """Stop probing and return every latency measured (seconds)."""
        if self._proc is not None:
            out, _ = self._proc.communicate("stop\n", timeout=10)
            self.lags = [float(line) for line in out.split()]
            self._proc = None
        return self.lags

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
            self._proc = None


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
