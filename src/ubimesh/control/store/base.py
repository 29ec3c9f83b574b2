"""The store's contract (docs/control-plane.md, section 2): the ``Store`` protocol, its errors,
watch events and ``open_store``.

Semantics shared by every backend:

- ``resource_version`` is the decimal revision of the resource's last change. Revisions are
  global to the store and only grow; ``revision()`` is the latest one.
- ``apply(r, expected_version=None)`` writes unconditionally; ``""`` requires that the key does
  not exist; any other value must equal the stored ``resource_version``. A mismatch raises
  ``ConflictError``. An apply whose content equals what is stored (``Resource.same_content``)
  changes nothing: the version is kept and no event is emitted.
- ``delete(key, expected_version=None)`` returns True when it removed something, False when
  there was nothing. With ``""`` it requires that the key does not exist (so it can only return
  False or raise); with a version, the key must exist at that version, else ``ConflictError``.
- ``watch(kind=..., since=...)`` yields a ``WatchEvent`` for every change after revision
  ``since`` (replayed from history, then live), in revision order, without gaps or duplicates.
  ``since=None`` means "changes from when the watch is established"; that moment is not
  observable for every backend, so a consumer that must not miss a change reads
  ``revision()`` first, then lists, then watches with ``since=`` that revision (events between
  the two may repeat what the list showed: apply them idempotently). A DELETE event carries the
  resource as it was last stored (with that version); the event's ``revision`` is the deletion's.
  Watch iterators end (StopAsyncIteration) when the store is closed; they raise ``WatchError``
  when history needed for ``since`` is gone or the watcher fell behind, naming the revision to
  resume from after listing again.
- A store belongs to the event loop that first uses it (its connections and wakeups are bound
  to that loop); open one per loop.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal, Protocol

from ubimesh.control.resources.model import Key, Resource

__all__ = [
    "ConflictError",
    "Store",
    "StoreError",
    "StoreUnavailableError",
    "WatchError",
    "WatchEvent",
    "check_expected",
    "check_key",
    "open_store",
]

URL_FORMS = (
    "sqlite:///absolute/path/file.db, sqlite://:memory: (tests), "
    "etcd://host:port[,host:port...]"
)


class StoreError(Exception):
    """Base of the store's errors."""


class ConflictError(StoreError):
    """``expected_version`` did not match what is stored.

    ``expected`` is the version the caller gave ("" = must not exist); ``actual`` is the stored
    version, or None when nothing is stored.
    """

    def __init__(self, key: Key, expected: str, actual: str | None) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        want = "it not to exist" if expected == "" else f"resourceVersion {expected!r}"
        found = "nothing stored" if actual is None else f"resourceVersion {actual!r}"
        super().__init__(f"conflict on {key}: expected {want}, found {found}")


class StoreUnavailableError(StoreError):
    """The backend could not be reached within the time allowed."""


class WatchError(StoreError):
    """A watch cannot go on. ``resume_from``: list again, then ``watch(since=resume_from)``
    (None when the caller must start over from ``revision()``)."""

    def __init__(self, message: str, resume_from: int | None = None) -> None:
        super().__init__(message)
        self.resume_from = resume_from


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["PUT", "DELETE"]
    resource: Resource
    revision: int


class Store(Protocol):
    """Every method is a coroutine except ``watch``; see the module docstring for semantics."""

    async def get(self, key: Key) -> Resource | None: ...

    async def list(
        self, kind: str | None = None, namespace: str | None = None
    ) -> list[Resource]: ...

    async def apply(
        self, resource: Resource, *, expected_version: str | None = None
    ) -> Resource: ...

    async def delete(self, key: Key, *, expected_version: str | None = None) -> bool: ...

    def watch(
        self, *, kind: str | None = None, since: int | None = None
    ) -> AsyncIterator[WatchEvent]: ...

    async def revision(self) -> int: ...

    async def close(self) -> None: ...


def check_key(key: Key) -> None:
    """Refuse keys that cannot be stored unambiguously (etcd keys join the parts with '/')."""
    for field, value, may_be_empty in (
        ("kind", key.kind, False),
        ("namespace", key.namespace, True),
        ("name", key.name, False),
    ):
        if not isinstance(value, str):
            raise ValueError(f"store key {key}: {field} {value!r} is not a string")
        if not value and not may_be_empty:
            raise ValueError(f"store key {key}: {field} is empty; give a non-empty {field}")
        if "/" in value:
            raise ValueError(
                f"store key {key}: {field} {value!r} contains '/'; names may not contain '/'"
            )


def check_expected(key: Key, expected: str | None, actual: str | None) -> None:
    """Raise ``ConflictError`` unless the stored version ``actual`` (None: nothing stored)
    satisfies ``expected`` (None: anything; "": nothing stored; else that exact version)."""
    if expected is None:
        return
    if not isinstance(expected, str):
        raise TypeError(f"expected_version must be a str or None, not {expected!r}")
    if expected == "":
        if actual is not None:
            raise ConflictError(key, expected, actual)
        return
    if actual != expected:
        raise ConflictError(key, expected, actual)


def open_store(url: str) -> Store:
    """The store at ``url``: ``sqlite:///abs/path.db``, ``sqlite://:memory:`` or
    ``etcd://host:port[,host:port...]``. Opening does no network I/O (etcd connects on first
    use); a malformed URL raises ValueError naming it and the accepted forms."""
    if not isinstance(url, str):
        raise ValueError(f"store URL {url!r} is not a string; expected one of: {URL_FORMS}")
    if url.startswith("sqlite://"):
        rest = url[len("sqlite://") :]
        if rest != ":memory:" and not rest.startswith("/"):
            raise ValueError(
                f"store URL {url!r}: the SQLite path must be absolute (three slashes: "
                f"sqlite:///abs/path.db); expected one of: {URL_FORMS}"
            )
        if rest.endswith("/"):
            raise ValueError(
                f"store URL {url!r} names a directory, not a file; expected one of: {URL_FORMS}"
            )
        from ubimesh.control.store.sqlite import SqliteStore

        return SqliteStore(rest)
    if url.startswith("etcd://"):
        endpoints = parse_etcd_endpoints(url)
        from ubimesh.control.store.etcd import EtcdStore

        return EtcdStore(endpoints)
    raise ValueError(f"store URL {url!r} is not supported; expected one of: {URL_FORMS}")


def parse_etcd_endpoints(url: str) -> list[tuple[str, int]]:
    """``etcd://h1:p1,h2:p2`` -> [(h1, p1), (h2, p2)]; IPv6 hosts in brackets."""
    rest = url[len("etcd://") :]
    endpoints: list[tuple[str, int]] = []
    for part in rest.split(","):
        part = part.strip()
        host, sep, port_text = part.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not sep or not host or "/" in part or "?" in part:
            raise ValueError(
                f"store URL {url!r}: endpoint {part!r} is not host:port; "
                f"expected one of: {URL_FORMS}"
            )
        try:
            port = int(port_text)
        except ValueError:
            port = -1
        if not 0 < port < 65536:
            raise ValueError(
                f"store URL {url!r}: endpoint {part!r} has port {port_text!r}; expected a "
                f"number in 1..65535; accepted forms: {URL_FORMS}"
            )
        endpoints.append((host, port))
    return endpoints
