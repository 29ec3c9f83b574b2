"""The serving process's side of the ADS client: ``python -m ubimesh.proxy.xds.ads_client``.

The ADS client runs in a long-lived child (decision 0001: the serving process never imports
protobuf or grpc). The two talk over the child's stdin and stdout with length-prefixed pickles:

- child -> parent: ``("snapshot", Snapshot, info)`` for each configuration to apply, where
  ``info`` is a plain dict (``origin``: "xds" or "cache", ``versions``: type URL -> version,
  ``resources``: type URL -> list of (name, resource as JSON dict) for /config_dump);
  ``("fatal", message)`` when the child cannot run at all (it then exits);
- parent -> child: ``("applied", "")`` or ``("failed", message)`` after each snapshot; the
  child ACKs or NACKs the responses behind it accordingly.

This module imports nothing from protobuf. ``AdsChild`` restarts the child when it dies
(bounded backoff); the proxy keeps its last configuration meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from ubimesh.proxy.snapshot.types import Snapshot

log = logging.getLogger("ubimesh.ads")

HEADER = struct.Struct("!I")
#: The largest frame accepted on the link (a snapshot of many thousand routes fits well within).
MAX_FRAME = 64 * 1024 * 1024
#: Restart delays of a child that died: doubling from the first to the last.
RESTART_DELAYS = (0.5, 10.0)

#: Applies one snapshot; returns "" on success or the reason it could not be applied.
ApplyFn = Callable[[Snapshot, dict[str, Any]], Awaitable[str]]


def frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


async def read_frame(reader: asyncio.StreamReader) -> Any:
    """One frame; raises asyncio.IncompleteReadError at EOF and ValueError when too large."""
    size = HEADER.unpack(await reader.readexactly(HEADER.size))[0]
    if size > MAX_FRAME:
        raise ValueError(f"ADS link frame of {size} bytes is over the limit of {MAX_FRAME}")
    # The peer is our own code run from our own interpreter: its pickle is trusted.
    return pickle.loads(await reader.readexactly(size))


class AdsChild:
    """Runs the ADS client child for one bootstrap and applies what it sends.

    ``argv_extra`` are the child's options after the config path (--service-node, ...).
    """

    def __init__(self, config_path: str, argv_extra: list[str], apply: ApplyFn) -> None:
        self.argv = [sys.executable, "-m", "ubimesh.proxy.xds.ads_client", config_path]
        self.argv += argv_extra
        self.apply = apply
        self.proc: asyncio.subprocess.Process | None = None
        self._stopping = False
        self.last_info: dict[str, Any] = {}
        self.restarts = 0

    async def run(self) -> None:
        """Run the child until ``stop``; restart it (with backoff) whenever it exits."""
        delay = RESTART_DELAYS[0]
        while not self._stopping:
            applied = await self._run_once()
            if self.stopping():
                return
            self.restarts += 1
            if applied:
                delay = RESTART_DELAYS[0]
            log.warning("the ADS client exited; starting it again in %.1f s", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_DELAYS[1])

    async def _run_once(self) -> bool:
        """One child's life; returns whether it delivered at least one snapshot."""
        applied = False
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=MAX_FRAME,
        )
        self.proc = proc
        assert proc.stdout is not None and proc.stdin is not None
        try:
            while True:
                try:
                    message = await read_frame(proc.stdout)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                kind = message[0]
                if kind == "fatal":
                    log.error("the ADS client cannot run: %s", message[1])
                    continue
                if kind != "snapshot":
                    log.error("unexpected message from the ADS client: %r", kind)
                    break
                snapshot, info = message[1], message[2]
                try:
                    reason = await self.apply(snapshot, info)
                except Exception as exc:  # an apply that breaks must still be answered
                    log.exception("applying the configuration from ADS failed")
                    reason = f"the proxy could not apply the configuration: {exc}"
                if not reason:
                    applied = True
                    self.last_info = info
                proc.stdin.write(frame(("failed", reason) if reason else ("applied", "")))
                await proc.stdin.drain()
        except (ConnectionError, ValueError) as exc:
            log.error("ADS link to the child broken: %s", exc)
        finally:
            await self._end(proc)
        return applied

    async def _end(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 3.0)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self.proc = None

    def stopping(self) -> bool:
        """Whether ``stop`` was called (a method: the flag changes while run() awaits)."""
        return self._stopping

    async def stop(self) -> None:
        self._stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            await self._end(proc)
