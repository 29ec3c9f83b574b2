"""The etcd v3 store, through etcd's HTTP/JSON gRPC gateway (etcd 3.4: ``/v3/kv/range``,
``/v3/kv/put``, ``/v3/kv/deleterange``, ``/v3/kv/txn``, ``/v3/watch``), with aiohttp.

A resource lives at ``/ubimesh/resources/<kind>/<namespace>/<name>`` as the JSON of
``Resource.to_dict()`` without its version; its ``resource_version`` is the key's
``mod_revision``. Writes are transactions that compare the key's ``mod_revision`` with the one
just read (``create_revision == 0`` to create), which is how ``expected_version`` is enforced
and how a concurrent writer is detected; an apply whose content equals the stored one writes
nothing.

Several endpoints: requests go to the last endpoint that answered; on a connection failure,
timeout or 5xx the next one is tried, round after round, until ``operation_timeout``. Every
request has a timeout (``request_timeout``). A write that failed after it was sent may have
been applied: the store then reads the key again and treats "already stored with our content"
as success, so a retried conditional apply does not report its own write as a conflict.

Watches are one streaming ``/v3/watch`` request each, read at the consumer's pace (no buffer
grows in this process: etcd holds what the consumer has not read). When the stream breaks, or
stays silent for ``watch_probe_interval`` and a linearizable read on its endpoint then fails
(member cut off from the leader), the watch reconnects to the next endpoint and resumes after
the last revision it delivered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import weakref
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import aiohttp

from ubimesh.control.resources.model import Key, Resource
from ubimesh.control.store.base import (
    StoreError,
    StoreUnavailableError,
    WatchError,
    WatchEvent,
    check_expected,
    check_key,
)

__all__ = ["PREFIX", "EtcdStore"]

PREFIX = "/ubimesh/resources/"


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def _prefix_end(prefix: str) -> str:
    """The range_end covering every key that starts with ``prefix`` (ASCII, ends in '/')."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _key_of(key: Key) -> str:
    return f"{PREFIX}{key.kind}/{key.namespace}/{key.name}"


def _encode(resource: Resource) -> str:
    return json.dumps(resource.with_version("").to_dict(), ensure_ascii=False)


def _decode_kv(kv: dict[str, Any]) -> Resource:
    raw_key = _unb64(kv.get("key", "")).decode(errors="replace")
    try:
        data = json.loads(_unb64(kv.get("value", "")))
        return Resource.from_dict(data).with_version(str(int(kv.get("mod_revision", 0))))
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreError(
            f"etcd store: the value at {raw_key!r} is not a resource: {exc!r}"
        ) from exc


def _placeholder(raw_key: str, revision: int) -> Resource:
    """A DELETE whose previous value etcd no longer has: only the identity is known."""
    parts = raw_key[len(PREFIX) :].split("/")
    kind, namespace, name = [*parts, "", "", ""][:3]
    return Resource("", kind, name, namespace, {}, resource_version=str(revision))


class _ServerFailure(Exception):
    """A 5xx/429 answer: the member could not serve the request (no leader, timeout, ...)."""


class _Ambiguous(Exception):
    """A write failed after it was sent: it may or may not have been applied."""


class EtcdStore:
    """``Store`` on an etcd v3 cluster. See the module docstring."""

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        *,
        request_timeout: float = 2.0,
        operation_timeout: float = 10.0,
        watch_probe_interval: float = 5.0,
        max_response_bytes: int = 64 * 1024 * 1024,
        page_size: int = 500,
        write_attempts: int = 8,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd store: no endpoints; expected etcd://host:port[,host:port...]")
        self.endpoints = [
            f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            for host, port in endpoints
        ]
        self.request_timeout = request_timeout
        self.operation_timeout = operation_timeout
        self.watch_probe_interval = watch_probe_interval
        self.max_response_bytes = max_response_bytes
        self.page_size = page_size
        self.write_attempts = write_attempts
        self.closed = False
        self._preferred = 0
        self._session: aiohttp.ClientSession | None = None
        self._watches: weakref.WeakSet[_EtcdWatch] = weakref.WeakSet()

    @property
    def current_endpoint(self) -> str:
        """The endpoint requests go to first (the last one that answered)."""
        return self.endpoints[self._preferred]

    # ------------------------------------------------------------------------- HTTP plumbing

    def _session_get(self) -> aiohttp.ClientSession:
        if self.closed:
            raise StoreError(f"etcd store {','.join(self.endpoints)} is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32), json_serialize=json.dumps
            )
        return self._session

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        body = bytearray()
        while chunk := await resp.content.readany():
            body += chunk
            if len(body) > self.max_response_bytes:
                raise StoreError(
                    f"etcd answer from {resp.url} exceeds {self.max_response_bytes} bytes"
                )
        return bytes(body)

    async def _post(self, base: str, path: str, body: dict[str, Any], timeout: float) -> Any:
        session = self._session_get()
        async with session.post(
            base + path, json=body, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            raw = await self._read_body(resp)
            if resp.status == 200:
                return json.loads(raw)
            message = raw[:200].decode(errors="replace")
            try:
                detail = json.loads(raw)
                message = str(detail.get("error") or detail.get("message") or message)
            except (ValueError, AttributeError):
                pass
            if resp.status >= 500 or resp.status == 429:
                raise _ServerFailure(f"HTTP {resp.status}: {message}")
            raise StoreError(
                f"etcd {base}{path} refused the request: HTTP {resp.status}: {message}"
            )

    async def _call(self, path: str, body: dict[str, Any], *, idempotent: bool) -> Any:
        """POST ``body`` to the first endpoint that answers. A non-idempotent request that
        failed after it may have reached a member raises ``_Ambiguous`` instead of retrying."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.operation_timeout
        failures: list[str] = []
        count = len(self.endpoints)
        while True:
            start = self._preferred
            for step in range(count):
                index = (start + step) % count
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                base = self.endpoints[index]
                try:
                    answer = await self._post(
                        base, path, body, min(self.request_timeout, remaining)
                    )
                except aiohttp.ClientConnectorError as exc:
                    # Never reached the member: safe to try the next one, write or not.
                    failures.append(f"{base}: {exc}")
                    self._preferred = (index + 1) % count
                    continue
                except (aiohttp.ClientError, TimeoutError, _ServerFailure, ValueError) as exc:
                    failures.append(f"{base}: {exc!r}")
                    self._preferred = (index + 1) % count
                    if not idempotent:
                        raise _Ambiguous(f"{base}{path}: {exc!r}") from exc
                    continue
                self._preferred = index
                return answer
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise StoreUnavailableError(
                    f"etcd: no endpoint of {', '.join(self.endpoints)} answered {path} within "
                    f"{self.operation_timeout} s; last errors: {'; '.join(failures[-count:])}"
                )
            await asyncio.sleep(min(0.1, remaining))

    async def _range_one(self, key: str) -> dict[str, Any] | None:
        answer = await self._call("/v3/kv/range", {"key": _b64(key)}, idempotent=True)
        kvs = answer.get("kvs") or []
        return kvs[0] if kvs else None

    # ------------------------------------------------------------------------- the Store API

    async def get(self, key: Key) -> Resource | None:
        check_key(key)
        kv = await self._range_one(_key_of(key))
        return None if kv is None else _decode_kv(kv)

    async def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> list[Resource]:
        prefix = PREFIX
        if kind is not None:
            check_key(Key(kind, namespace or "", "x"))
            prefix += f"{kind}/"
            if namespace is not None:
                prefix += f"{namespace}/"
        start, end = prefix, _prefix_end(prefix)
        revision = 0
        found: list[Resource] = []
        # Pages read at one revision, so the list is one consistent snapshot.
        while True:
            body: dict[str, Any] = {"key": _b64(start), "range_end": _b64(end)}
            body["limit"] = self.page_size
            if revision:
                body["revision"] = revision
            answer = await self._call("/v3/kv/range", body, idempotent=True)
            revision = revision or int(answer["header"]["revision"])
            kvs = answer.get("kvs") or []
            for kv in kvs:
                resource = _decode_kv(kv)
                if namespace is None or resource.namespace == namespace:
                    found.append(resource)
            if not answer.get("more") or not kvs:
                break
            start = _unb64(kvs[-1]["key"]).decode() + "\x00"
        found.sort(key=lambda r: r.key)
        return found

    async def apply(self, resource: Resource, *, expected_version: str | None = None) -> Resource:
        key = resource.key
        check_key(key)
        raw_key = _key_of(key)
        value = _b64(_encode(resource))
        ambiguous = False
        for _ in range(self.write_attempts):
            kv = await self._range_one(raw_key)
            stored = None if kv is None else _decode_kv(kv)
            if stored is not None and stored.same_content(resource):
                if ambiguous:  # our own earlier attempt landed
                    return resource.with_version(stored.resource_version)
                check_expected(key, expected_version, stored.resource_version)
                return resource.with_version(stored.resource_version)
            actual = None if stored is None else stored.resource_version
            check_expected(key, expected_version, actual)
            compare: dict[str, Any] = {"key": _b64(raw_key), "result": "EQUAL"}
            if kv is None:
                compare.update(target="CREATE", create_revision=0)
            else:
                compare.update(target="MOD", mod_revision=int(kv["mod_revision"]))
            put = {"request_put": {"key": _b64(raw_key), "value": value}}
            txn = {"compare": [compare], "success": [put]}
            try:
                answer = await self._call("/v3/kv/txn", txn, idempotent=False)
            except _Ambiguous:
                ambiguous = True
                continue
            if answer.get("succeeded"):
                # A one-put transaction: the header's revision is the put's mod_revision.
                return resource.with_version(str(int(answer["header"]["revision"])))
            # Someone wrote in between: read again (and report a conflict if one is due).
        raise StoreUnavailableError(
            f"etcd: could not apply {key} in {self.write_attempts} attempts (it kept changing "
            f"or the cluster kept failing)"
        )

    async def delete(self, key: Key, *, expected_version: str | None = None) -> bool:
        check_key(key)
        raw_key = _key_of(key)
        ambiguous = False
        for _ in range(self.write_attempts):
            kv = await self._range_one(raw_key)
            if kv is None and ambiguous:  # our own earlier attempt landed
                return True
            actual = None if kv is None else str(int(kv["mod_revision"]))
            check_expected(key, expected_version, actual)
            if kv is None:
                return False
            txn = {
                "compare": [
                    {
                        "key": _b64(raw_key),
                        "target": "MOD",
                        "result": "EQUAL",
                        "mod_revision": int(kv["mod_revision"]),
                    }
                ],
                "success": [{"request_delete_range": {"key": _b64(raw_key)}}],
            }
            try:
                answer = await self._call("/v3/kv/txn", txn, idempotent=False)
            except _Ambiguous:
                ambiguous = True
                continue
            if answer.get("succeeded"):
                return True
        raise StoreUnavailableError(
            f"etcd: could not delete {key} in {self.write_attempts} attempts (it kept changing "
            f"or the cluster kept failing)"
        )

    def watch(self, *, kind: str | None = None, since: int | None = None) -> _EtcdWatch:
        if since is not None and (not isinstance(since, int) or since < 0):
            raise ValueError(f"watch since={since!r}: expected a revision >= 0 or None")
        if kind is not None:
            check_key(Key(kind, "", "x"))
        watch = _EtcdWatch(self, kind, since)
        self._watches.add(watch)
        return watch

    async def revision(self) -> int:
        body = {"key": _b64(PREFIX), "range_end": _b64(_prefix_end(PREFIX)), "count_only": True}
        answer = await self._call("/v3/kv/range", body, idempotent=True)
        return int(answer["header"]["revision"])

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for watch in list(self._watches):
            watch._drop()
        if self._session is not None:
            await self._session.close()
            self._session = None


class _EtcdWatch:
    """The iterator ``EtcdStore.watch`` returns: one ``/v3/watch`` stream, reconnected on
    failure. The stream is opened on the first ``__anext__`` (see ``since`` in base.py)."""

    def __init__(self, store: EtcdStore, kind: str | None, since: int | None) -> None:
        self._store = store
        self._prefix = PREFIX + (f"{kind}/" if kind is not None else "")
        # The revision to (re)start from; None until the first stream says where "now" is.
        self._next: int | None = since + 1 if since is not None else None
        self._pending: deque[WatchEvent] = deque()
        self._resp: aiohttp.ClientResponse | None = None
        self._endpoint = store._preferred
        self._buf = bytearray()
        self._closed = False

    def __aiter__(self) -> _EtcdWatch:
        return self

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._closed or self._store.closed:
                self._drop()
                raise StopAsyncIteration
            try:
                if self._resp is None:
                    await self._connect()
                    continue
                line = await self._read_line()
                if line is None or not self._handle(line):
                    self._drop()
                    self._endpoint = (self._endpoint + 1) % len(self._store.endpoints)
            except WatchError:
                # The watch cannot go on: release its stream now, not when collected.
                self._closed = True
                self._drop()
                raise

    async def aclose(self) -> None:
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None
        self._buf.clear()

    async def _connect(self) -> None:
        """Open a stream on the first endpoint that accepts, rounds bounded in time."""
        store = self._store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + store.operation_timeout
        failures: list[str] = []
        count = len(store.endpoints)
        while True:
            for _ in range(count):
                base = store.endpoints[self._endpoint]
                try:
                    await self._open(base)
                    return
                except (aiohttp.ClientError, TimeoutError, ValueError, _ServerFailure) as exc:
                    failures.append(f"{base}: {exc!r}")
                    self._drop()
                    self._endpoint = (self._endpoint + 1) % count
                if self._closed or store.closed:
                    return
            remaining = deadline - loop.time()
            if remaining <= 0:
                resume = None if self._next is None else self._next - 1
                raise WatchError(
                    f"etcd: watch lost: no endpoint of {', '.join(store.endpoints)} accepted a "
                    f"watch within {store.operation_timeout} s; last errors: "
                    f"{'; '.join(failures[-count:])}",
                    resume_from=resume,
                )
            await asyncio.sleep(min(0.1, remaining))

    async def _open(self, base: str) -> None:
        store = self._store
        request: dict[str, Any] = {
            "key": _b64(self._prefix),
            "range_end": _b64(_prefix_end(self._prefix)),
            "prev_kv": True,
        }
        if self._next is not None:
            request["start_revision"] = self._next
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=store.request_timeout, sock_read=None
        )
        self._resp = await store._session_get().post(
            base + "/v3/watch", json={"create_request": request}, timeout=timeout
        )
        if self._resp.status != 200:
            raise _ServerFailure(f"watch answered HTTP {self._resp.status}")
        # The first message confirms the watch (and tells "now" when no revision was given).
        async with asyncio.timeout(store.request_timeout):
            line = await self._read_line(probe=False)
        if line is None:
            raise _ServerFailure("watch stream ended before it was created")
        if not self._handle(line):
            raise _ServerFailure(f"watch was not created: {line[:200]!r}")

    async def _read_line(self, probe: bool = True) -> bytes | None:
        """The next non-empty line of the stream; None when it ended or its member failed."""
        assert self._resp is not None
        store = self._store
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                if line.strip():
                    return line
                continue
            if len(self._buf) > store.max_response_bytes:
                raise WatchError(
                    f"etcd: a watch message exceeds {store.max_response_bytes} bytes",
                    resume_from=None if self._next is None else self._next - 1,
                )
            try:
                if probe:
                    async with asyncio.timeout(store.watch_probe_interval):
                        chunk = await self._resp.content.readany()
                else:
                    chunk = await self._resp.content.readany()
            except TimeoutError:
                # Silence is normal; a member that lost the cluster is silent too.
                if await self._healthy(str(self._resp.url.origin())):
                    continue
                return None
            except (aiohttp.ClientError, OSError):
                return None
            if not chunk:
                return None
            self._buf += chunk

    async def _healthy(self, base: str) -> bool:
        # A linearizable read needs a leader: it fails on a member cut off from the cluster.
        body = {"key": _b64(PREFIX), "count_only": True}
        try:
            await self._store._post(base, "/v3/kv/range", body, self._store.request_timeout)
            return True
        except (aiohttp.ClientError, TimeoutError, ValueError, _ServerFailure, StoreError):
            return False

    def _handle(self, line: bytes) -> bool:
        """Turn one stream message into events; False when the stream must be reopened."""
        try:
            message = json.loads(line)
        except ValueError:
            return False
        if not isinstance(message, dict) or "error" in message:
            return False  # the gateway reports a broken gRPC stream this way
        result = message.get("result") or {}
        if result.get("canceled"):
            compacted = int(result.get("compact_revision") or 0)
            if compacted:
                since = None if self._next is None else self._next - 1
                raise WatchError(
                    f"etcd: cannot watch since revision {since}: history was compacted up to "
                    f"revision {compacted}; list again and watch from revision() instead"
                )
            return False
        if self._next is None and result.get("created"):
            self._next = int(result.get("header", {}).get("revision", 0)) + 1
        for event in result.get("events") or []:
            kv = event.get("kv") or {}
            revision = int(kv.get("mod_revision", 0))
            kind: Literal["PUT", "DELETE"] = "DELETE" if event.get("type") == "DELETE" else "PUT"
            if kind == "PUT":
                resource = _decode_kv(kv)
            elif event.get("prev_kv"):
                resource = _decode_kv(event["prev_kv"])
            else:
                raw_key = _unb64(kv.get("key", "")).decode(errors="replace")
                resource = _placeholder(raw_key, revision)
            self._pending.append(WatchEvent(kind, resource, revision))
            self._next = revision + 1
        return True
