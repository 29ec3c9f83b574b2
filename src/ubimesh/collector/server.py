"""``ubimesh collector``: the collector alone, on its own port (Zipkin's 9411 by default).

After binding it writes ``<data dir>/collector.json`` (``address``: the base URL with the
port resolved, ``pid``) atomically, and prints the URL on stdout; that is how tests and
scripts find a collector started on port 0. SIGTERM or SIGINT stops it: queued spans are
written first, and collector.json is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from pathlib import Path

from aiohttp import web

from ubimesh.collector.api import CollectorOptions, add_collector

log = logging.getLogger("ubimesh.collector")

ADDRESS_FILE = "collector.json"
DEFAULT_ADDRESS = "127.0.0.1:9411"

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in a duration like ``24h``, ``90m``, ``1h30m``, ``2.5s``, ``500ms``, ``7d``;
    ``0`` means none. ValueError otherwise."""
    text = text.strip()
    if text == "0":
        return 0.0
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"{text!r} is not a duration (e.g. 24h, 30m, 1h30m, 10s, 500ms)")
    return total


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ubimesh" / "collector"


async def serve(host: str, port: int, options: CollectorOptions) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    app = web.Application()
    collector = add_collector(app, options)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    url = f"http://[{host}]:{bound}" if ":" in host else f"http://{host}:{bound}"
    path = options.data_dir / ADDRESS_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"address": url, "pid": os.getpid()}) + "\n")
    tmp.replace(path)  # atomic: a reader never sees half a file
    print(f"ubimesh collector listening on {url} (spans in {collector.reader.path})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        await runner.cleanup()
    return 0
