"""A tiny example service for examples/mesh (standard library only).

Answers every request with JSON: who it is (workload, service, site, version from the
environment `ubimesh up` sets), the method, the path and the headers it got. When it has a
``CALLS`` host (e.g. ``ledger.default``) and is asked a path ending in ``/ledger``, it first
calls that service through its sidecar's outbound listener (``UBIMESH_OUTBOUND``, routed by
Host) and includes the answer, forwarding the trace headers it got (as a mesh needs its
applications to do, so that both calls join one trace).

Environment: PORT (required), UBIMESH_WORKLOAD, UBIMESH_SERVICE, UBIMESH_SITE, VERSION, CALLS,
UBIMESH_OUTBOUND.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ME = {
    "workload": os.environ.get("UBIMESH_WORKLOAD", "app"),
    "service": os.environ.get("UBIMESH_SERVICE", ""),
    "site": os.environ.get("UBIMESH_SITE", ""),
    "version": os.environ.get("VERSION", ""),
}
CALLS = os.environ.get("CALLS", "")
OUTBOUND = os.environ.get("UBIMESH_OUTBOUND", "")
#: What an application passes on to its own calls so that the mesh joins them into one trace
#: (W3C trace context, Zipkin's B3 in both forms, and the request id).
TRACE_HEADERS = (
    "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
    "x-b3-sampled", "x-b3-flags", "x-request-id",
)


def call_upstream(path: str, incoming: Any) -> Any:
    headers = {"Host": CALLS}
    for name in TRACE_HEADERS:
        value = incoming.get(name)
        if value is not None:
            headers[name] = value
    request = urllib.request.Request(OUTBOUND + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return {"error": f"{CALLS} answered {exc.code}"}
    except (OSError, ValueError) as exc:
        return {"error": f"calling {CALLS} through {OUTBOUND}: {exc}"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # The head and the body go out as two writes: with Nagle's algorithm on, the body waits
    # for the ACK of the head, which the peer delays (about 40 ms) on a keep-alive connection.
    disable_nagle_algorithm = True

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(min(length, 1 << 20))
        body: dict[str, Any] = {
            **ME,
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        if CALLS and OUTBOUND and self.path.split("?")[0].endswith("/ledger"):
            body["upstream"] = call_upstream("/ledger", self.headers)
        data = json.dumps(body, indent=1).encode() + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Served-By", ME["workload"])
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the proxies log


def main() -> int:
    port = int(os.environ["PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"{ME['workload']} ({ME['service']}, site {ME['site']}) on 127.0.0.1:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
