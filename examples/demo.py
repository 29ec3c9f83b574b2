"""The README's main job: the example edge proxy in front of five small services.

Starts the services of examples/services.py, then ``ubimesh proxy -c examples/edge/bootstrap.yaml``,
waits until the proxy's admin /ready answers, prints what to curl, and runs until Ctrl-C
(or for ``--seconds N``). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVICES = {
    "web-dc": 18081,
    "web-cloud": 18082,
    "api-v1": 18083,
    "api-v2-canary": 18084,
    "api-shadow": 18085,
}
LISTENER = "http://127.0.0.1:10000"
ADMIN = "http://127.0.0.1:9901"


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the proxy exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout} s")


def _stop(signum: int, frame: object) -> None:
    # SIGTERM would end Python without running ``finally``: turn it into the Ctrl-C path so
    # that the services and the proxy are stopped too.
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=0, help="stop after N seconds")
    args = parser.parse_args()
    bin_dir = Path(sys.executable).parent
    ubimesh = str(bin_dir / "ubimesh")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "services.py"),
                    *[f"{n}={p}" for n, p in SERVICES.items()],
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        proxy = subprocess.Popen(
            [ubimesh, "proxy", "-c", str(HERE / "edge" / "bootstrap.yaml"), "-l", "warning"]
        )
        procs.append(proxy)
        wait_ready(ADMIN + "/ready", proxy)
        print(
            f"""
ubimesh edge proxy is up on {LISTENER} (admin on {ADMIN}).

  curl -s {LISTENER}/                    # web-dc (private data centre)
  curl -s {LISTENER}/static/app.js       # web-cloud, path rewritten to /assets/app.js
  curl -s {LISTENER}/api/orders          # api-v1 (95%) or api-v2 canary (5%), mirrored
  curl -si {LISTENER}/old/logo.png       # 308 redirect to /static/logo.png
  curl -s {LISTENER}/healthz             # answered by the proxy itself
  curl -s {ADMIN}/stats | grep edge      # Envoy-style stats
  curl -s {ADMIN}/stats/prometheus       # the same for Prometheus

Ctrl-C stops everything.""",
            flush=True,
        )
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while proxy.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
