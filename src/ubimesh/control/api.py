"""The control plane's HTTP/JSON API over the store (aiohttp).

Every ``/api/`` path needs ``Authorization: Bearer <admin token>`` (401 otherwise; compared in
constant time). Errors are JSON ``{"error": str, "details": [...]}``; a validation error's
details carry ``message``, ``source``, ``resource``, ``field``, ``value`` and ``expected``.

- ``POST /api/v1/apply[?dryRun=true][&source=NAME]``: YAML/JSON documents (or, with content
  type :data:`FILES_TYPE`, several named files, so errors name each file). Validated alone and
  against the store (a change is refused only for the errors it introduces, so one old broken
  resource does not block every apply). ``metadata.resourceVersion`` makes the apply
  conditional (409 on mismatch). Answers ``{"dryRun", "results": [{kind, namespace, name,
  action: created|updated|unchanged, resourceVersion}]}``.
- ``POST /api/v1/diff[?source=NAME]``: as a dry run, each result with a unified ``diff`` of the
  YAML, and ``changed``.
- ``GET /api/v1/resources/{kind}[?namespace=]``: ``{"kind": "List", "items": [...]}``.
- ``GET|DELETE /api/v1/resources/{kind}/{namespace}/{name}``: one resource (404 when missing);
  ``_`` is the namespace of cluster-scoped kinds (Mesh). A delete that would leave dangling
  references is refused (400) naming them; ``POST /api/v1/delete`` ``{"keys": [...]}`` deletes
  several together (so a whole file can go at once).
- ``GET /api/v1/watch[?kind=][&since=REV]``: newline-delimited JSON events
  ``{"type", "revision", "resource"}``, streaming; ``{"type": "BOOKMARK"}`` lines keep idle
  streams alive.
- ``GET /api/v1/proxies``: the proxies connected to this replica, each with its workload
  ``registration`` (``none``, ``pending``, ``registered`` or ``refused``; ``registry.py``).
- ``GET /healthz``: no token needed.
- The trace collector, when the control plane mounts it here (docs/telemetry.md): ``POST
  /api/v2/spans`` and ``POST /v1/traces`` need no token (proxies report spans); its query API
  (``GET /api/v2/...``) needs the admin token unless ``open_query``.
- Identity (docs/identity.md section 2; present when the server passes ``identity``):
  ``POST /api/v1/identity/tokens`` (admin) makes a join token; ``POST /api/v1/identity/sign``
  and ``GET /api/v1/identity/bundle`` need no admin token (a workload authenticates with a
  join token or a proof of its current certificate; the bundle is public);
  ``GET /api/v1/identity/status`` (admin) lists the CA's certificates and the leaves issued.
  ``POST /api/v1/identity/rotation`` (admin) ``{"phase": "begin"|"finish", "force": false}``
  rotates the root: ``begin`` adds a new root (and intermediate) beside the old one, ``finish``
  removes the old one; either way the new bundle is pushed to every proxy at once
  (``Identity.on_change``). ``finish`` is refused (409, naming them) while leaves issued before
  ``begin`` are still live, unless ``force``.
- ``GET /metrics`` (no token: a Prometheus scrape; it shows expiry times, subjects and SPIFFE
  IDs, nothing secret): ``ubimesh_ca_cert_expiry_seconds`` and
  ``ubimesh_issued_leaf_expiry_seconds`` (``ubimesh.control.identity_metrics``).
  Sign requests are bounded in size (:data:`MAX_SIGN_BODY`) and rate (:data:`SIGN_RATE`,
  503 with Retry-After beyond).

Request bodies are bounded (:data:`MAX_BODY`, 413 beyond).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import difflib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web

from ubimesh.control.api_error import ApiError
from ubimesh.control.client import FILES_TYPE, NO_NAMESPACE
from ubimesh.control.identity_metrics import render_metrics, rotation_stragglers
from ubimesh.control.resources import (
    KINDS,
    Key,
    Resource,
    ResourceErrors,
    parse_documents,
    resolve_kind,
    validate_set,
)
from ubimesh.control.resources.errors import MISSING
from ubimesh.control.resources.scalars import parse_duration
from ubimesh.control.store import ConflictError, Store, WatchEvent
from ubimesh.identity.ca import CaError, CertificateAuthority
from ubimesh.identity.csr import ProofError, requested_uris, verify_proof
from ubimesh.identity.issued import IssuedLeaves
from ubimesh.identity.spiffe_id import SpiffeId, SpiffeIdError
from ubimesh.identity.svid import SvidError, load_certificates, verify_svid
from ubimesh.identity.tokens import JoinTokens, TokenError

log = logging.getLogger("ubimesh.control.api")

MAX_BODY = 8 * 1024 * 1024
#: How long an idle watch stream waits before sending a BOOKMARK line.
WATCH_BOOKMARK_S = 15.0
#: Events buffered per watch stream between the store and a slow client.
WATCH_QUEUE = 256

ProxyLister = Callable[[], Sequence[dict[str, Any]]]

STORE_KEY: web.AppKey[Store] = web.AppKey("store", Store)
TOKEN_KEY = web.AppKey("token", bytes)
PROXIES_KEY = web.AppKey("proxies", object)
LOCK_KEY = web.AppKey("lock", asyncio.Lock)

#: Largest sign request body (a CSR plus a chain and a proof are a few KB).
MAX_SIGN_BODY = 64 * 1024
#: Sign requests per second (token bucket; bursts up to SIGN_BURST) before 503 + Retry-After.
SIGN_RATE = 500.0
SIGN_BURST = 1000.0
#: Paths under /api/ that need no admin token (their own authentication is in the handler).
PUBLIC_PATHS = frozenset({"/api/v1/identity/sign", "/api/v1/identity/bundle"})
#: The trace collector's Zipkin ingest (POST only: GET is the span-name query). Proxies send
#: spans without credentials; OTLP's /v1/traces is outside /api/ and open anyway.
PUBLIC_POSTS = frozenset({"/api/v2/spans"})
#: Collector query paths (``GET /api/v2/...``) need no admin token when this is set.
OPEN_QUERY_KEY = web.AppKey("open_query", bool)


def error_details(errors: ResourceErrors) -> list[dict[str, Any]]:
    """The validator's errors as JSON objects (every field the contract names)."""
    out: list[dict[str, Any]] = []
    for err in errors.errors:
        key = getattr(err, "key", None)
        out.append(
            {
                "message": str(err),
                "source": getattr(err, "source", "") or "",
                "resource": str(key) if key is not None else "",
                "field": getattr(err, "path", "") or "",
                "value": _jsonable(getattr(err, "value", None)),
                "expected": _jsonable(getattr(err, "expected", None)),
            }
        )
    return out


def _jsonable(value: Any) -> Any:
    if value is MISSING:
        return None
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _error(status: int, error: str, details: Sequence[Any] = ()) -> web.Response:
    return _json({"error": error, "details": list(details)}, status)


def _kind(text: str) -> str:
    try:
        return resolve_kind(text)
    except ValueError as exc:
        raise ApiError(404, str(exc)) from None


def _key(kind_text: str, namespace: str, name: str) -> Key:
    kind = _kind(kind_text)
    if not KINDS[kind].namespaced or namespace == NO_NAMESPACE:
        namespace = ""
    return Key(kind, namespace, name)


def _key_dict(key: Key) -> dict[str, str]:
    return {"kind": key.kind, "namespace": key.namespace, "name": key.name}


def _summary(resource: Resource) -> dict[str, str]:
    return {"kind": resource.kind, "namespace": resource.namespace, "name": resource.name}


def _yaml(resource: Resource | None) -> str:
    if resource is None:
        return ""
    return yaml.safe_dump(resource.with_version("").to_dict(), sort_keys=False)


@dataclass(frozen=True)
class Change:
    """What applying ``resource`` does to the store."""

    resource: Resource
    current: Resource | None
    action: str  # "created" | "updated" | "unchanged"

    def result(self, version: str) -> dict[str, Any]:
        return {**_summary(self.resource), "action": self.action, "resourceVersion": version}

    def diff(self) -> str:
        name = f"{self.resource.key}"
        return "".join(
            difflib.unified_diff(
                _yaml(self.current).splitlines(keepends=True),
                _yaml(self.resource).splitlines(keepends=True),
                fromfile=f"{name} (stored)" if self.current else "/dev/null",
                tofile=f"{name} (applied)",
            )
        )


def _error_strings(resources: Iterable[Resource]) -> set[str]:
    try:
        validate_set(list(resources))
    except ResourceErrors as exc:
        return {str(e) for e in exc.errors}
    return set()


async def check_change(
    store: Store, upserts: Sequence[Resource], deletes: Sequence[Key] = ()
) -> None:
    """Refuse (ResourceErrors) a change for the cross-reference errors it would introduce.

    Errors the store already had are not this change's fault and do not block it.
    """
    stored = {r.key: r for r in await store.list()}
    merged = dict(stored)
    for key in deletes:
        merged.pop(key, None)
    for resource in upserts:
        merged[resource.key] = resource
    try:
        validate_set(list(merged.values()))
    except ResourceErrors as exc:
        before = _error_strings(stored.values())
        new = [e for e in exc.errors if str(e) not in before]
        if new:
            raise ResourceErrors(new) from None


async def plan(store: Store, resources: Sequence[Resource]) -> list[Change]:
    """Validate ``resources`` against the store and say what applying them changes.

    Raises ResourceErrors (validation) or ConflictError (a resourceVersion that does not
    match what is stored).
    """
    await check_change(store, resources)
    changes: list[Change] = []
    for resource in resources:
        current = await store.get(resource.key)
        expected = resource.resource_version
        if expected and (current is None or current.resource_version != expected):
            raise ConflictError(
                resource.key, expected, None if current is None else current.resource_version
            )
        if current is None:
            action = "created"
        elif current.same_content(resource):
            action = "unchanged"
        else:
            action = "updated"
        changes.append(Change(resource, current, action))
    return changes


async def _documents(request: web.Request) -> list[Resource]:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise ApiError(413, f"request body is {request.content_length} bytes; at most {MAX_BODY}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body is larger than {MAX_BODY} bytes") from None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not UTF-8: {exc}") from None
    source = request.query.get("source", "request")
    if request.content_type == FILES_TYPE:
        resources = _files(text)
    else:
        resources = parse_documents(text, source)
    if not resources:
        raise ApiError(400, f"{source}: no resources in the request body")
    return resources


def _files(text: str) -> list[Resource]:
    """A FILES_TYPE body: every file parsed with its own name as the source (for errors)."""
    try:
        files = [(str(f["name"]), str(f["text"])) for f in json.loads(text)["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ApiError(
            400, f'body: expected {{"files": [{{"name": str, "text": str}}, ...]}} ({exc})'
        ) from None
    resources: list[Resource] = []
    errors = []
    for name, file_text in files:
        try:
            resources.extend(parse_documents(file_text, name))
        except ResourceErrors as exc:
            errors.extend(exc.errors)
    if errors:
        raise ResourceErrors(errors)
    return resources


def _dry_run(request: web.Request) -> bool:
    value = request.query.get("dryRun", "false").lower()
    if value not in ("true", "false", "1", "0", ""):
        raise ApiError(400, f"dryRun: {value!r} is not a boolean; expected true or false")
    return value in ("true", "1")


async def apply_handler(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    dry_run = _dry_run(request)
    resources = await _documents(request)
    async with request.app[LOCK_KEY]:
        changes = await plan(store, resources)
        results = []
        for change in changes:
            if dry_run or change.action == "unchanged":
                version = change.current.resource_version if change.current else ""
            else:
                expected = change.resource.resource_version or None
                stored = await store.apply(
                    change.resource.with_version(""), expected_version=expected
                )
                version = stored.resource_version
                log.info("%s %s", change.action, change.resource.key)
            results.append(change.result(version))
    return _json({"dryRun": dry_run, "results": results})


async def diff_handler(request: web.Request) -> web.Response:
    resources = await _documents(request)
    changes = await plan(request.app[STORE_KEY], resources)
    results = [
        {**change.result(change.current.resource_version if change.current else ""),
         "diff": change.diff()}
        for change in changes
    ]
    changed = any(c.action != "unchanged" for c in changes)
    return _json({"changed": changed, "results": results})


async def list_handler(request: web.Request) -> web.Response:
    kind = _kind(request.match_info["kind"])
    namespace = request.query.get("namespace") or None
    if not KINDS[kind].namespaced:
        namespace = None
    items = await request.app[STORE_KEY].list(kind, namespace)
    items.sort(key=lambda r: (r.namespace, r.name))
    return _json({"kind": "List", "items": [r.to_dict() for r in items]})


async def get_handler(request: web.Request) -> web.Response:
    info = request.match_info
    key = _key(info["kind"], info["namespace"], info["name"])
    resource = await request.app[STORE_KEY].get(key)
    if resource is None:
        raise ApiError(404, f"{key} not found")
    return _json(resource.to_dict())


async def delete_keys(app: web.Application, keys: Sequence[Key], version: str | None) -> list[Key]:
    """Delete ``keys`` together (after checking the rest stays consistent); the deleted ones."""
    store = app[STORE_KEY]
    async with app[LOCK_KEY]:
        await check_change(store, (), keys)
        deleted = []
        for key in keys:
            if await store.delete(key, expected_version=version):
                log.info("deleted %s", key)
                deleted.append(key)
    return deleted


async def delete_handler(request: web.Request) -> web.Response:
    info = request.match_info
    key = _key(info["kind"], info["namespace"], info["name"])
    version = request.query.get("resourceVersion") or None
    if not await delete_keys(request.app, [key], version):
        raise ApiError(404, f"{key} not found")
    return _json({"deleted": [_key_dict(key)]})


async def delete_many_handler(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        keys = [
            _key(str(k["kind"]), str(k.get("namespace") or NO_NAMESPACE), str(k["name"]))
            for k in body["keys"]
        ]
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body is larger than {MAX_BODY} bytes") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ApiError(
            400, f'body: expected {{"keys": [{{"kind", "namespace", "name"}}, ...]}} ({exc})'
        ) from None
    deleted = await delete_keys(request.app, keys, None)
    missing = [str(k) for k in keys if k not in deleted]
    return _json(
        {
            "deleted": [_key_dict(k) for k in deleted],
            "missing": missing,
        }
    )


async def _pump(
    events: AsyncIterator[WatchEvent], queue: asyncio.Queue[WatchEvent | str]
) -> None:
    # A separate task reads the store's watch: cancelling a wait on the iterator itself would
    # close it, and the handler must be able to wake up for bookmarks. A failure (the store
    # closed, history compacted) is passed on as a string and ends the stream.
    try:
        async for event in events:
            await queue.put(event)
        await queue.put("the store closed the watch")
    except Exception as exc:
        await queue.put(f"watch failed: {exc}")


async def watch_handler(request: web.Request) -> web.StreamResponse:
    kind_text = request.query.get("kind")
    kind = _kind(kind_text) if kind_text else None
    since_text = request.query.get("since")
    try:
        since = int(since_text) if since_text else None
    except ValueError:
        raise ApiError(
            400, f"since: {since_text!r} is not a revision; expected an integer"
        ) from None
    store = request.app[STORE_KEY]
    queue: asyncio.Queue[WatchEvent | str] = asyncio.Queue(WATCH_QUEUE)
    loop = asyncio.get_running_loop()
    pump = loop.create_task(_pump(store.watch(kind=kind, since=since), queue))
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    try:
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), WATCH_BOOKMARK_S)
            except TimeoutError:
                line: dict[str, Any] = {"type": "BOOKMARK", "revision": await store.revision()}
            else:
                if isinstance(item, str):
                    await response.write(json.dumps({"type": "ERROR", "error": item}).encode()
                                         + b"\n")
                    break
                line = {
                    "type": item.type,
                    "revision": item.revision,
                    "resource": item.resource.to_dict(),
                }
            await response.write(json.dumps(line).encode() + b"\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pump
    return response


async def proxies_handler(request: web.Request) -> web.Response:
    lister = request.app[PROXIES_KEY]
    items = list(lister()) if callable(lister) else []
    return _json({"items": items})


async def healthz_handler(request: web.Request) -> web.Response:
    return _json({"status": "ok", "revision": await request.app[STORE_KEY].revision()})


class _Bucket:
    """A token bucket: ``take()`` is True while under ``rate`` per second (burst ``burst``)."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.level, self.at = burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level < 1.0:
            return False
        self.level -= 1.0
        return True


@dataclass
class Identity:
    """The control plane's identity state, shared by the identity handlers."""

    ca: CertificateAuthority
    tokens: JoinTokens
    issued: IssuedLeaves
    leaf_ttl: dt.timedelta = dt.timedelta(hours=24)
    bucket: _Bucket = field(default_factory=lambda: _Bucket(SIGN_RATE, SIGN_BURST))
    #: Called after the CA changed in this process (a root rotation), so that the server
    #: pushes the new bundle at once instead of at its next check of the files.
    on_change: Callable[[], None] | None = None


IDENTITY_KEY = web.AppKey("identity", Identity)


def _identity(request: web.Request) -> Identity:
    state = request.app.get(IDENTITY_KEY)
    if state is None:
        raise ApiError(404, "this control plane has no CA (identity is not enabled)")
    return state


def _ttl(value: Any, field_name: str, default: dt.timedelta) -> dt.timedelta:
    if value is None or value == "":
        return default
    try:
        seconds = float(value) if isinstance(value, int | float) else parse_duration(str(value))
    except ValueError:
        raise ApiError(400, f"{field_name}: {value!r} is not a duration; expected e.g. 1h, "
                       "30m or 90s") from None
    if seconds <= 0:
        raise ApiError(400, f"{field_name}: {value!r} must be more than 0")
    return dt.timedelta(seconds=seconds)


async def _json_body(request: web.Request, limit: int) -> dict[str, Any]:
    if request.content_length is None:
        raise ApiError(411, "a Content-Length is required")
    if request.content_length > limit:
        raise ApiError(413, f"request body is {request.content_length} bytes; at most {limit}")
    try:
        body = json.loads(await request.read())
    except ValueError as exc:
        raise ApiError(400, f"request body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body: expected a JSON object")
    return body


def _str_field(body: dict[str, Any], name: str, required: bool = True) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ApiError(400, f"{name}: expected a non-empty string, got {value!r}")
    return value


async def token_create_handler(request: web.Request) -> web.Response:
    state = _identity(request)
    body = await _json_body(request, MAX_SIGN_BODY)
    text = _str_field(body, "identity")
    try:
        identity = SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise ApiError(400, f"identity: {exc}") from None
    if identity.trust_domain != state.ca.trust_domain:
        raise ApiError(400, f"identity: {identity} is not in this CA's trust domain "
                       f"{state.ca.trust_domain!r}")
    ttl = _ttl(body.get("ttl"), "ttl", dt.timedelta(hours=1))
    try:
        token = state.tokens.create(identity, ttl)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    expires = dt.datetime.now(dt.UTC) + ttl
    log.info("join token created for %s (expires %s)", identity, expires.isoformat())
    return _json({"token": token, "identity": str(identity),
                  "expires": expires.isoformat(timespec="seconds")})


def _check_requested(csr_pem: bytes, identity: SpiffeId) -> None:
    try:
        uris = requested_uris(csr_pem)
    except ValueError as exc:
        raise ApiError(400, str(exc)) from None
    if uris and uris != [str(identity)]:
        raise ApiError(403, f"csr: asks for {', '.join(uris)}; this request may only get "
                       f"{identity}")


def _sign(state: Identity, csr_pem: bytes, identity: SpiffeId, ttl: dt.timedelta) -> bytes:
    try:
        return state.ca.sign(csr_pem, identity, min(ttl, state.leaf_ttl))
    except CaError as exc:
        raise ApiError(400, str(exc)) from None


async def sign_handler(request: web.Request) -> web.Response:
    state = _identity(request)
    if not state.bucket.take():
        return web.json_response(
            {"error": "the CA is busy (sign request rate limit); try again shortly",
             "details": []}, status=503, headers={"Retry-After": "1"})
    body = await _json_body(request, MAX_SIGN_BODY)
    csr_pem = _str_field(body, "csr").encode()
    token = _str_field(body, "token", required=False)
    chain = _str_field(body, "chain", required=False)
    ttl = _ttl(body.get("ttl"), "ttl", state.leaf_ttl)
    if token and chain:
        raise ApiError(400, "give either token (first certificate) or chain + proof (renewal), "
                       "not both")
    if token:
        try:
            identity = state.tokens.peek(token)
        except TokenError as exc:
            raise ApiError(403, str(exc)) from None
        _check_requested(csr_pem, identity)
        issued = _sign(state, csr_pem, identity, ttl)
        try:
            # Only now, after the CSR was found good: a bad request does not burn the token.
            # Two racing requests both get here; the one whose redeem fails gets nothing.
            state.tokens.redeem(token)
        except TokenError as exc:
            raise ApiError(403, str(exc)) from None
        how = "join token"
    elif chain:
        proof = _str_field(body, "proof")
        try:
            identity = verify_svid(chain, state.ca.bundles())
            verify_proof(load_certificates(chain)[0], csr_pem, proof)
        except (SvidError, ProofError) as exc:
            raise ApiError(403, f"renewal refused: {exc}") from None
        _check_requested(csr_pem, identity)
        issued = _sign(state, csr_pem, identity, ttl)
        how = "renewal"
    else:
        raise ApiError(401, "authenticate with token (a join token) or chain + proof (the "
                       "current certificate and a signature of the CSR by its key)")
    leaf = load_certificates(issued)[0]
    node = body.get("node")
    state.issued.record(str(identity), node if isinstance(node, str) else "",
                        format(leaf.serial_number, "x"), leaf.not_valid_before_utc.timestamp(),
                        leaf.not_valid_after_utc.timestamp())
    log.info("issued %s (%s), serial %x", identity, how, leaf.serial_number)
    return _json({"chain": issued.decode(), "bundle": state.ca.bundle_pem().decode(),
                  "identity": str(identity),
                  "not_after": leaf.not_valid_after_utc.isoformat(timespec="seconds")})


async def bundle_handler(request: web.Request) -> web.Response:
    return web.Response(body=_identity(request).ca.bundle_pem(),
                        content_type="application/x-pem-file")


async def identity_status_handler(request: web.Request) -> web.Response:
    state = _identity(request)
    leaves = [
        {**row,
         "not_before": dt.datetime.fromtimestamp(row["not_before"], dt.UTC).isoformat(),
         "not_after": dt.datetime.fromtimestamp(row["not_after"], dt.UTC).isoformat()}
        for row in state.issued.list()
    ]
    return _json({**state.ca.status(), "leaves": leaves})


async def rotation_handler(request: web.Request) -> web.Response:
    state = _identity(request)
    body = await _json_body(request, MAX_SIGN_BODY)
    phase = body.get("phase")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise ApiError(400, f"force: expected true or false, got {force!r}")
    ca = state.ca
    try:
        if phase == "begin":
            ca.begin_root_rotation()
        elif phase == "finish":
            if not ca.rotating:
                raise ApiError(409, "root rotation: none under way; begin it first "
                               '({"phase": "begin"})')
            stragglers = rotation_stragglers(ca.status(), state.issued.list())
            if stragglers and not force:
                names = sorted({f"{r['identity']} ({r.get('node') or 'unknown proxy'})"
                                for r in stragglers})
                raise ApiError(409, f"root rotation: {len(stragglers)} live leaf certificate(s) "
                               "still chain to the old root and would stop verifying; wait "
                               "for their renewal (at half their lifetime) or pass force",
                               names[:100])
            ca.finish_root_rotation()
        else:
            raise ApiError(400, f'phase: {phase!r} is not a rotation phase; expected "begin" or '
                           '"finish"')
    except CaError as exc:
        raise ApiError(409, str(exc)) from None
    log.info("root rotation: %s (bundle of %d root(s) pushed)", phase, len(ca.roots))
    if state.on_change is not None:
        state.on_change()
    return _json(ca.status())


async def metrics_handler(request: web.Request) -> web.Response:
    state = request.app.get(IDENTITY_KEY)
    text = "" if state is None else render_metrics(state.ca.status(), state.issued.list())
    return web.Response(body=text.encode(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    if request.path.startswith("/api/") and not _public(request):
        header = request.headers.get("Authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), request.app[TOKEN_KEY]
        ):
            return _error(401, "missing or wrong admin token (Authorization: Bearer <token>)")
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.error, exc.details)
    except ResourceErrors as exc:
        return _error(400, f"{len(exc.errors)} validation error(s)", error_details(exc))
    except ConflictError as exc:
        return _error(409, str(exc))
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason)
        raise


def _public(request: web.Request) -> bool:
    if request.path in PUBLIC_PATHS:
        return True
    if request.method == "POST":
        return request.path in PUBLIC_POSTS
    return request.path.startswith("/api/v2/") and request.app[OPEN_QUERY_KEY]


def make_app(
    store: Store,
    *,
    token: str,
    proxies: ProxyLister | None = None,
    identity: Identity | None = None,
    open_query: bool = False,
) -> web.Application:
    """The API application over ``store``; ``proxies`` lists connected proxies; ``identity``
    (the CA and join tokens) enables the identity routes; ``open_query``: a trace collector
    mounted on it (``ubimesh.collector.api.add_collector``) answers queries without the
    admin token."""
    if not token:
        raise ValueError("token: the admin token must not be empty")
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_BODY)
    app[STORE_KEY] = store
    app[TOKEN_KEY] = token.encode()
    app[PROXIES_KEY] = proxies if proxies is not None else (lambda: [])
    app[LOCK_KEY] = asyncio.Lock()
    app[OPEN_QUERY_KEY] = open_query
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_post("/api/v1/apply", apply_handler)
    app.router.add_post("/api/v1/diff", diff_handler)
    app.router.add_post("/api/v1/delete", delete_many_handler)
    app.router.add_get("/api/v1/resources/{kind}", list_handler)
    app.router.add_get("/api/v1/resources/{kind}/{namespace}/{name}", get_handler)
    app.router.add_delete("/api/v1/resources/{kind}/{namespace}/{name}", delete_handler)
    app.router.add_get("/api/v1/watch", watch_handler)
    app.router.add_get("/api/v1/proxies", proxies_handler)
    if identity is not None:
        app[IDENTITY_KEY] = identity
    app.router.add_post("/api/v1/identity/tokens", token_create_handler)
    app.router.add_post("/api/v1/identity/sign", sign_handler)
    app.router.add_get("/api/v1/identity/bundle", bundle_handler)
    app.router.add_get("/api/v1/identity/status", identity_status_handler)
    app.router.add_post("/api/v1/identity/rotation", rotation_handler)
    app.router.add_get("/metrics", metrics_handler)
    return app
