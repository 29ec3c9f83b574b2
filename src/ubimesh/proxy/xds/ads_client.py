"""The proxy's ADS client: ``python -m ubimesh.proxy.xds.ads_client CONFIG [options]``.

A long-lived child of ``ubimesh proxy`` (decision 0001; ``ads_link.AdsChild`` runs it). It
holds one state-of-the-world ADS stream (../shared/docs/specs.md 4.3-4.4) to the static cluster
that ``dynamic_resources.ads_config`` names:

1. subscribe to CDS and LDS (wildcard), then to EDS for the EDS clusters, to RDS for the
   route configurations the listeners name and to SDS for the secrets the TLS contexts of the
   listeners and clusters name with ``sds_config: {ads: {}}`` (``ROOTCA``), except the local
   ``default`` (the subscriptions follow every change);
2. when the set is complete (the first CDS and LDS responses arrived, every EDS cluster has its
   ClusterLoadAssignment, every RDS name its RouteConfiguration and every secret its Secret:
   Envoy's warming), translate the bootstrap plus the resources into one Snapshot and send it
   to the parent, which applies it as a reload;
3. ACK each response behind it (``version_info`` = its version, ``response_nonce`` = its nonce)
   once the parent applied it, or NACK (``error_detail`` code 3 INVALID_ARGUMENT with the
   errors' text, ``version_info`` = the last applied version) when it does not translate or
   does not apply; the last good configuration keeps serving;
4. write the applied resources to the cache directory (one JSON file, tmp + rename); when the
   control plane cannot be reached within ``--initial-timeout`` seconds at start, apply the
   cache and keep trying;
5. when the stream breaks, reconnect with exponential backoff and jitter (0.25 s to 10 s); the
   first requests of a new stream carry the last applied versions;
6. the proxy's own identity (docs/identity.md): when the node metadata has ``ubimesh.identity``
   (a SPIFFE ID) and ``ubimesh.control_api`` (the control plane's API URL) and a join token is
   given (``--join-token-file``, or node metadata ``ubimesh.join_token_file``), make a key and
   get the certificate (``ubimesh.identity.workload``), renew it at half-life with jitter, and
   on every new certificate translate again with the new ``default`` secret and send the
   snapshot: new handshakes use it, open connections are not touched by the child.  Each new
   certificate (with its key) is also kept in ``<cache dir>/identity/svid.json`` (0600), and
   a restarted child (or proxy) starts from it and renews with it, so a restart needs no new
   join token (tokens are single-use).  Node metadata ``ubimesh.persist_identity: false``
   keeps the key in memory only (a restart then needs a fresh token).

Logs go to stderr; stdout and stdin carry the link to the parent (``ads_link``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format

from ubimesh import __version__
from ubimesh.proxy.snapshot.types import Snapshot
from ubimesh.proxy.xds import extensions
from ubimesh.proxy.xds.ads_link import frame, read_frame
from ubimesh.proxy.xds.cluster import eds_name
from ubimesh.proxy.xds.dynamic import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    LOCAL_CERTIFICATE,
    ROUTE_TYPE,
    SECRET_TYPE,
    TYPE_URLS,
    Resources,
    certificate_secret,
)
from ubimesh.proxy.xds.errors import ConfigError, ConfigErrors
from ubimesh.proxy.xds.parse import parse_message, parse_text
from ubimesh.proxy.xds.translate import translate_bootstrap

log = logging.getLogger("ubimesh.ads")

MESSAGES: dict[str, Any] = {
    LISTENER_TYPE: listener_pb2.Listener,
    ROUTE_TYPE: route_pb2.RouteConfiguration,
    CLUSTER_TYPE: cluster_pb2.Cluster,
    ENDPOINT_TYPE: endpoint_pb2.ClusterLoadAssignment,
    SECRET_TYPE: secret_pb2.Secret,
}
#: The types subscribed to by name (EDS, SDS, RDS), in make-before-break order.
NAMED_TYPES = (ENDPOINT_TYPE, SECRET_TYPE, ROUTE_TYPE)
#: The key of the local secrets' version among the versions the translator hashes.
LOCAL_VERSION = "local:" + SECRET_TYPE
DOWNSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
#: Reconnect delays: exponential from the first to the last, each drawn in [50%, 100%].
BACKOFF = (0.25, 10.0)
INITIAL_TIMEOUT = 2.0
#: How long the parent may take to apply one snapshot before the client gives up on it.
APPLY_TIMEOUT = 60.0
#: Requests waiting to go out on the stream (at most a few per type are ever queued).
REQUEST_QUEUE = 64
MAX_MESSAGE = 64 * 1024 * 1024
CACHE_FILE = "ads-cache.json"
INVALID_ARGUMENT = 3


def default_cache_dir(node_id: str) -> Path:
    """``$XDG_CACHE_HOME`` (or ``~/.cache``) + ``/ubimesh/xds/<node id>``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", node_id) or "_"
    return Path(base) / "ubimesh" / "xds" / safe


# ---------------------------------------------------------------------------------------------
# What the resources need


def _hcms(listener: Any) -> Iterable[Any]:
    chains = list(listener.filter_chains)
    if listener.HasField("default_filter_chain"):
        chains.append(listener.default_filter_chain)
    for chain in chains:
        for flt in chain.filters:
            if extensions.type_name(flt.typed_config.type_url) == extensions.HCM_TYPE:
                hcm = extensions.HttpConnectionManager()
                if flt.typed_config.Unpack(hcm):
                    yield hcm


def route_names(listeners: Iterable[Any]) -> set[str]:
    """The RDS names the listeners' HTTP connection managers refer to."""
    return {
        hcm.rds.route_config_name
        for listener in listeners
        for hcm in _hcms(listener)
        if hcm.HasField("rds") and hcm.rds.route_config_name
    }


def endpoint_names(clusters: Iterable[Any]) -> set[str]:
    """The ClusterLoadAssignment names the EDS clusters wait for."""
    return {eds_name(c) for c in clusters if c.type == cluster_pb2.Cluster.EDS}


def _tls_contexts(listeners: Iterable[Any], clusters: Iterable[Any]) -> Iterable[Any]:
    """The Downstream/UpstreamTlsContexts of the listeners' filter chains and the clusters."""
    sockets = []
    for listener in listeners:
        chains = list(listener.filter_chains)
        if listener.HasField("default_filter_chain"):
            chains.append(listener.default_filter_chain)
        sockets += [c.transport_socket for c in chains if c.HasField("transport_socket")]
    for cluster in clusters:
        if cluster.HasField("transport_socket"):
            sockets.append(cluster.transport_socket)
        sockets += [m.transport_socket for m in cluster.transport_socket_matches]
    for socket in sockets:
        if not socket.HasField("typed_config"):
            continue
        name = extensions.type_name(socket.typed_config.type_url)
        context: Any
        if name == DOWNSTREAM_TLS:
            context = tls_pb2.DownstreamTlsContext()
        elif name == UPSTREAM_TLS:
            context = tls_pb2.UpstreamTlsContext()
        else:
            continue
        if socket.typed_config.Unpack(context):
            yield context


def secret_names(listeners: Iterable[Any], clusters: Iterable[Any]) -> set[str]:
    """The SDS secrets the TLS contexts take over ADS (``sds_config: {ads: {}}``): their
    certificates, validation contexts (plain or combined) and session ticket keys."""
    out: set[str] = set()
    for context in _tls_contexts(listeners, clusters):
        common = context.common_tls_context
        configs = list(common.tls_certificate_sds_secret_configs)
        if common.HasField("validation_context_sds_secret_config"):
            configs.append(common.validation_context_sds_secret_config)
        if common.HasField("combined_validation_context"):
            combined = common.combined_validation_context
            if combined.HasField("validation_context_sds_secret_config"):
                configs.append(combined.validation_context_sds_secret_config)
        if isinstance(context, tls_pb2.DownstreamTlsContext) and context.HasField(
            "session_ticket_keys_sds_secret_config"
        ):
            configs.append(context.session_ticket_keys_sds_secret_config)
        out.update(
            c.name
            for c in configs
            if c.name and c.HasField("sds_config") and c.sds_config.HasField("ads")
        )
    return out


def resource_name(type_url: str, msg: Any) -> str:
    name: str = msg.cluster_name if type_url == ENDPOINT_TYPE else msg.name
    return name


# ---------------------------------------------------------------------------------------------
# The disk cache


def write_cache(directory: Path, resources: Resources) -> None:
    """Write the applied resources atomically (tmp + rename)."""
    doc: dict[str, Any] = {"versions": resources.versions, "resources": {}}
    for type_url in TYPE_URLS:
        packed = []
        for _name, msg in sorted(resources.of(type_url).items()):
            a = any_pb2.Any()
            a.Pack(msg)
            packed.append(json_format.MessageToDict(a, preserving_proto_field_name=True))
        doc["resources"][type_url] = packed
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CACHE_FILE
    tmp = path.with_name(f".{CACHE_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_cache(directory: Path) -> Resources | None:
    """The cached resources, or None (no cache, or one that cannot be read: logged)."""
    path = directory / CACHE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        out = Resources(versions={str(k): str(v) for k, v in doc["versions"].items()})
        for type_url, packed in doc["resources"].items():
            for item in packed:
                a = json_format.ParseDict(item, any_pb2.Any())
                msg = MESSAGES[type_url]()
                if not a.Unpack(msg):
                    raise ValueError(f"a cached resource is not a {type_url}")
                out.of(type_url)[resource_name(type_url, msg)] = msg
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, json_format.ParseError) as exc:
        log.warning("ignoring the ADS cache %s: %s", path, exc)
        return None
    return out


def dump_info(resources: Resources, origin: str) -> dict[str, Any]:
    """What the parent keeps for /config_dump: plain JSON types only."""
    return {
        "origin": origin,
        "versions": dict(resources.versions),
        "resources": {
            type_url: [
                (name, json_format.MessageToDict(msg, preserving_proto_field_name=True))
                for name, msg in sorted(resources.of(type_url).items())
            ]
            for type_url in TYPE_URLS
        },
    }


# ---------------------------------------------------------------------------------------------
# The link to the parent


class ParentLink:
    """stdout/stdin to the serving process (see ads_link)."""

    def __init__(self, reader: asyncio.StreamReader, writer: Any) -> None:
        self.reader = reader
        self.writer = writer
        self.lock = asyncio.Lock()

    async def apply(self, snapshot: Snapshot, info: dict[str, Any]) -> str:
        """Send a snapshot; returns "" once applied or the parent's reason for refusing it."""
        async with self.lock:
            self.writer.write(frame(("snapshot", snapshot, info)))
            self.writer.flush()
            kind, reason = await asyncio.wait_for(read_frame(self.reader), APPLY_TIMEOUT)
            return "" if kind == "applied" else str(reason or "the proxy refused it")


# ---------------------------------------------------------------------------------------------
# The client


class AdsClient:
    """The ADS state machine for one bootstrap. ``accepted`` is what the proxy serves (also
    what the cache holds); ``received`` is the latest of each type, not yet all applied."""

    def __init__(
        self,
        bootstrap: Any,
        source: dict[str, Any],
        node: Any,
        targets: list[str],
        cache_dir: Path,
        link: ParentLink,
        *,
        initial_timeout: float = INITIAL_TIMEOUT,
        local_secrets: Iterable[str] = (),
    ) -> None:
        """``local_secrets`` are the secret names this process makes itself (``default`` when
        the proxy has its own identity): never asked of the control plane; the configuration
        waits for them as it waits for resources over ADS."""
        self.bootstrap = bootstrap
        self.source = source
        self.node = node
        self.targets = targets
        self.cache_dir = cache_dir
        self.link = link
        self.initial_timeout = initial_timeout
        dyn = bootstrap.dynamic_resources
        #: The wildcard types, in make-before-break order.
        self.wildcard = [
            t
            for t, name in ((CLUSTER_TYPE, "cds_config"), (LISTENER_TYPE, "lds_config"))
            if dyn.HasField(name)
        ]
        static = bootstrap.static_resources
        self.static_eds = endpoint_names(static.clusters)
        self.static_rds = route_names(static.listeners)
        self.static_sds = secret_names(static.listeners, static.clusters)
        self.local_names = frozenset(local_secrets)
        self.warned_no_identity = False
        self.local: dict[str, Any] = {}
        """Name -> Secret made here (the certificate and key of the proxy's identity)."""
        self.local_version = ""
        self.accepted = Resources()
        self.received = Resources()
        self.got: set[str] = set()
        """Types with at least one response on some stream (initialization waits for the
        wildcard types)."""
        self.applied_once = False
        self.pending: dict[str, tuple[str, str]] = {}
        """Type URL -> (version, nonce) of responses not yet ACKed or NACKed."""
        self.nonces: dict[str, str] = {}
        self.subscribed: dict[str, frozenset[str]] = {}
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] | None = None
        self.first_request = True
        self.lock = asyncio.Lock()

    # -- requests -------------------------------------------------------------------------------

    def _request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        version: str | None = None,
        nonce: str = "",
        error: str = "",
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            version_info=self.accepted.versions.get(type_url, "") if version is None else version,
            resource_names=sorted(names),
            response_nonce=nonce,
        )
        if error:
            req.error_detail.code = INVALID_ARGUMENT  # a google.rpc.Status
            req.error_detail.message = error
        if self.first_request:
            req.node.CopyFrom(self.node)
            self.first_request = False
        if self.queue is not None:
            self.queue.put_nowait(req)

    def _names(self, type_url: str) -> frozenset[str]:
        """The names the received resources need for RDS, EDS or SDS (the local secrets are
        not asked for)."""
        if type_url == ENDPOINT_TYPE:
            clusters = self.received.of(CLUSTER_TYPE).values()
            return frozenset(self.static_eds | endpoint_names(clusters))
        if type_url == SECRET_TYPE:
            return self._secrets_referenced() - self.local_names
        listeners = self.received.of(LISTENER_TYPE).values()
        return frozenset(self.static_rds | route_names(listeners))

    def _secrets_referenced(self) -> frozenset[str]:
        listeners = self.received.of(LISTENER_TYPE).values()
        clusters = self.received.of(CLUSTER_TYPE).values()
        return frozenset(self.static_sds | secret_names(listeners, clusters))

    def _resubscribe(self) -> None:
        """Follow the EDS, SDS and RDS names the received clusters and listeners need."""
        for type_url in NAMED_TYPES:
            names = self._names(type_url)
            if names != self.subscribed.get(type_url, frozenset()):
                self.subscribed[type_url] = names
                self._request(type_url, names, nonce=self.nonces.get(type_url, ""))

    # -- the stream -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a stream up forever: reconnect with backoff when it breaks."""
        fallback = asyncio.get_running_loop().create_task(self._cache_fallback())
        attempt = 0
        index = 0
        try:
            while True:
                target = self.targets[index % len(self.targets)]
                index += 1
                try:
                    if await self._stream(target):
                        attempt = 0
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "ADS stream to %s ended: %s %s", target, exc.code().name, exc.details()
                    )
                delay = min(BACKOFF[1], BACKOFF[0] * 2**attempt) * random.uniform(0.5, 1.0)
                attempt = min(attempt + 1, 10)
                await asyncio.sleep(delay)
        finally:
            fallback.cancel()

    async def _cache_fallback(self) -> None:
        """At start: when nothing was applied within the initial timeout, serve the cache."""
        await asyncio.sleep(self.initial_timeout)
        async with self.lock:
            if self.applied_once:
                return
            cached = read_cache(self.cache_dir)
            if cached is None:
                log.warning(
                    "no configuration from the control plane after %.1f s and no cache in %s; "
                    "still trying",
                    self.initial_timeout,
                    self.cache_dir,
                )
                return
            try:
                snapshot = self._translate(cached)
            except ConfigError as exc:
                log.error("the ADS cache in %s does not translate: %s", self.cache_dir, exc)
                return
            reason = await self.link.apply(snapshot, dump_info(cached, "cache"))
            if reason:
                log.error("the proxy could not apply the cached configuration: %s", reason)
                return
            log.warning("control plane unreachable: serving the cached configuration")
            self.accepted = cached
            self.received = cached.copy()
            self.applied_once = True

    async def _stream(self, target: str) -> bool:
        """One stream's life; returns whether a response arrived on it."""
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.enable_retries", 0),
        ]
        got_response = False
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
            queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue(
                REQUEST_QUEUE
            )
            async with self.lock:
                self.queue = queue
                self.first_request = True
                self.nonces.clear()
                self.pending.clear()
                # Unapplied resources die with the stream: the server sends everything again.
                self.received = self.accepted.copy()
                self.subscribed = {}
                for type_url in self.wildcard:
                    self._request(type_url)
                self._resubscribe()
            call = stub.StreamAggregatedResources(_drain(queue))
            try:
                async for response in call:
                    got_response = True
                    async with self.lock:
                        await self._on_response(response)
            finally:
                self.queue = None
                queue.put_nowait(None)
                call.cancel()
        return got_response

    # -- responses ------------------------------------------------------------------------------

    async def _on_response(self, response: Any) -> None:
        type_url = response.type_url
        self.nonces[type_url] = response.nonce
        cls = MESSAGES.get(type_url)
        if cls is None:
            self._nack(type_url, response.nonce, f"type {type_url!r} was not subscribed to")
            return
        delivered: dict[str, Any] = {}
        problems: list[str] = []
        for i, packed in enumerate(response.resources):
            msg = cls()
            if packed.type_url != type_url or not packed.Unpack(msg):
                problems.append(f"resources[{i}]: {packed.type_url!r} is not {type_url!r}")
                continue
            name = resource_name(type_url, msg)
            if name in delivered:
                problems.append(f"resources[{i}]: duplicate resource name {name!r}")
            delivered[name] = msg
        if problems:
            self._nack(type_url, response.nonce, "\n".join(problems))
            return
        log.info(
            "ADS %s version %s: %d resources",
            type_url.rsplit(".", 1)[-1],
            response.version_info,
            len(delivered),
        )
        if type_url in (LISTENER_TYPE, CLUSTER_TYPE):
            self.received.by_type[type_url] = delivered
        else:
            self.received.of(type_url).update(delivered)
        self.received.versions[type_url] = response.version_info
        self.got.add(type_url)
        self.pending[type_url] = (response.version_info, response.nonce)
        self._resubscribe()
        await self._try_apply()

    def _nack(self, type_url: str, nonce: str, message: str) -> None:
        log.warning("NACK %s: %s", type_url.rsplit(".", 1)[-1], message)
        self._request(
            type_url, self.subscribed.get(type_url, ()), nonce=nonce, error=message
        )

    def _warm(self) -> bool:
        if not self.applied_once and not all(t in self.got for t in self.wildcard):
            return False
        for type_url in NAMED_TYPES:
            have = self.received.of(type_url)
            missing = [name for name in self._names(type_url) if name not in have]
            if missing:
                if type_url == SECRET_TYPE and LOCAL_CERTIFICATE in missing:
                    self._warn_no_identity()
                return False
        # A local secret (the proxy's certificate) that is referred to must have been made.
        return all(n in self.local for n in self._secrets_referenced() & self.local_names)

    def _warn_no_identity(self) -> None:
        """Say once why a configuration that needs the proxy's own certificate waits: this
        proxy has no identity to get one with (the control plane never serves ``default``)."""
        if self.warned_no_identity:
            return
        self.warned_no_identity = True
        log.warning(
            "the configuration needs this proxy's own certificate (SDS secret %r: the mesh's "
            "mTLS is on) but the node has no %s: it waits and serves nothing new. Give the "
            "proxy an identity (`ubimesh bootstrap --identity ID --control-api URL "
            "--join-token-file FILE`, token from `ubimesh token create --identity ID`) or set "
            "the Mesh's spec.mtls.mode to DISABLE", LOCAL_CERTIFICATE, IDENTITY_KEY)

    def _candidate(self) -> Resources:
        """The received resources, RDS, EDS and SDS cut down to what is still referred to."""
        out = self.received.copy()
        for type_url in NAMED_TYPES:
            names = self._names(type_url)
            out.by_type[type_url] = {
                n: m for n, m in out.of(type_url).items() if n in names
            }
        return out

    def _translate(self, resources: Resources) -> Snapshot:
        """The bootstrap plus ``resources`` plus the local secrets (which ``resources``, what is
        cached and reported, never hold) as one Snapshot."""
        if self.local:
            resources = resources.copy()
            resources.of(SECRET_TYPE).update(self.local)
            # A new certificate is a new configuration version.
            resources.versions[LOCAL_VERSION] = self.local_version
        return translate_bootstrap(
            self.bootstrap,
            self.source,
            service_node=self.node.id,
            service_cluster=self.node.cluster,
            dynamic_resources=resources,
        )

    async def set_local_secret(self, secret: Any, version: str) -> None:
        """Take a new local secret (a new certificate) and serve it: once the configuration is
        warm, translate again and send the snapshot, so new handshakes use it.  Before that,
        it is used by the first configuration applied.  A snapshot that fails to translate or
        apply is logged; the previous certificate keeps serving until it expires."""
        async with self.lock:
            self.local[secret.name] = secret
            self.local_version = version
            if self.pending:
                await self._try_apply()  # it may have waited for this secret
                return
            if not self.applied_once:
                return
            try:
                snapshot = self._translate(self.accepted)
            except ConfigErrors as exc:
                log.error("the configuration does not translate with the new certificate: %s",
                          exc)
                return
            reason = await self.link.apply(snapshot, dump_info(self.accepted, "xds"))
            if reason:
                log.error("the proxy could not apply the new certificate: %s", reason)
            else:
                log.info("new certificate (%s) applied", version)

    async def _try_apply(self) -> None:
        if not self.pending or not self._warm():
            return
        candidate = self._candidate()
        try:
            snapshot = self._translate(candidate)
            reason = ""
        except ConfigErrors as exc:
            reason = str(exc)
        if not reason:
            reason = await self.link.apply(snapshot, dump_info(candidate, "xds"))
        pending, self.pending = self.pending, {}
        if reason:
            for type_url, (_version, nonce) in pending.items():
                self._nack(type_url, nonce, reason)
                # Forget the refused resources of that type: the last good ones stand.
                self.received.by_type[type_url] = dict(self.accepted.of(type_url))
                if type_url in self.accepted.versions:
                    self.received.versions[type_url] = self.accepted.versions[type_url]
            return
        self.accepted = candidate
        self.received = candidate.copy()
        self.applied_once = True
        for type_url, (version, nonce) in pending.items():
            self._request(type_url, self._ack_names(type_url), version=version, nonce=nonce)
        try:
            write_cache(self.cache_dir, candidate)
        except OSError as exc:
            log.warning("cannot write the ADS cache in %s: %s", self.cache_dir, exc)

    def _ack_names(self, type_url: str) -> Iterable[str]:
        return () if type_url in self.wildcard else self.subscribed.get(type_url, ())


async def _drain(
    queue: asyncio.Queue[discovery_pb2.DiscoveryRequest | None],
) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
    while True:
        req = await queue.get()
        if req is None:
            return
        yield req


# ---------------------------------------------------------------------------------------------
# The process


def _node(bootstrap: Any, service_node: str, service_cluster: str) -> Any:
    node = base_pb2.Node()
    node.CopyFrom(bootstrap.node)
    if service_node:
        node.id = service_node
    if service_cluster:
        node.cluster = service_cluster
    node.user_agent_name = "ubimesh"
    node.user_agent_version = __version__
    return node


# ---------------------------------------------------------------------------------------------
# The proxy's own identity

#: Node metadata keys (docs/identity.md; the bootstraps ``ubimesh bootstrap`` makes carry them).
IDENTITY_KEY = "ubimesh.identity"
CONTROL_API_KEY = "ubimesh.control_api"
TOKEN_FILE_KEY = "ubimesh.join_token_file"
#: Optional: the certificate lifetime to ask for ("24h"); the CA grants at most what it allows.
CERT_TTL_KEY = "ubimesh.cert_ttl"
#: Optional: false keeps the proxy's key in memory only (no credential in the cache directory).
PERSIST_KEY = "ubimesh.persist_identity"


def identity_settings(node: Any, token_file: str) -> dict[str, str]:
    """The identity settings of the node metadata (plus ``token_file``, the flag, which wins
    over ``ubimesh.join_token_file``); {} when the node has no ``ubimesh.identity``."""
    metadata = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
    identity = metadata.get(IDENTITY_KEY)
    if not identity:
        return {}
    persist = metadata.get(PERSIST_KEY, True)
    if not isinstance(persist, bool):
        raise ConfigErrors([ConfigError(
            f"node.metadata.{PERSIST_KEY}", f"{persist!r}: expected true or false"
        )])
    return {
        "identity": str(identity),
        "control_api": str(metadata.get(CONTROL_API_KEY) or ""),
        "token_file": token_file or str(metadata.get(TOKEN_FILE_KEY) or ""),
        "ttl": str(metadata.get(CERT_TTL_KEY) or ""),
        "persist": "true" if persist else "",
    }


async def run_identity(client: AdsClient, settings: dict[str, str]) -> None:
    """Get the proxy's certificate and renew it forever, handing each to ``client`` as the
    local ``default`` secret.  Problems that retrying cannot fix are logged and end the task:
    the proxy keeps serving what it has (listeners that need ``default`` wait or NACK)."""
    from ubimesh.identity.credentials import CredentialStore
    from ubimesh.identity.workload import IdentityError, WorkloadIdentity, read_token_file

    identity = settings["identity"]
    try:
        if not settings["control_api"]:
            raise IdentityError(
                f"node metadata {IDENTITY_KEY} is {identity!r} but {CONTROL_API_KEY} is not "
                "set; add the control plane's API URL (http://HOST:PORT) to the node metadata"
            )
        store = CredentialStore(client.cache_dir / "identity") if settings["persist"] else None
        token: str | None = None
        token_problem: IdentityError | None = None
        if settings["token_file"]:
            try:
                token = read_token_file(settings["token_file"])
            except IdentityError as exc:
                token_problem = exc
        else:
            token_problem = IdentityError(
                f"node metadata {IDENTITY_KEY} is {identity!r} but no join token was given; "
                f"pass --join-token-file FILE (or node metadata {TOKEN_FILE_KEY}) with a token "
                f"from `ubimesh token create --identity {identity}`"
            )
        workload = WorkloadIdentity(
            settings["control_api"], identity, token, ttl=settings["ttl"], node=client.node.id,
            store=store,
        )
        if token is None and workload.restore() is None:
            assert token_problem is not None
            raise token_problem

        async def on_certificate(cert: Any) -> None:
            secret = certificate_secret(LOCAL_CERTIFICATE, cert.chain_pem, cert.key_pem)
            await client.set_local_secret(secret, f"{cert.serial:x}")

        await workload.run(on_certificate)
    except IdentityError as exc:
        log.error("no certificate for %s: %s", identity, exc)


def _targets(snapshot: Snapshot, cluster: str) -> list[str]:
    spec = snapshot.clusters[cluster]
    out = []
    for locality in spec.endpoints:
        for endpoint in locality.endpoints:
            host = endpoint.address.host
            host = f"[{host}]" if ":" in host else host
            out.append(f"{host}:{endpoint.address.port}")
    return out


async def _main_async(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_MESSAGE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    out = sys.stdout.buffer
    link = ParentLink(reader, out)

    def fatal(message: str) -> int:
        out.write(frame(("fatal", message)))
        out.flush()
        return 1

    try:
        with open(args.path, encoding="utf-8") as f:
            source = parse_text(f.read())
    except (OSError, ConfigError) as exc:
        return fatal(f"cannot load {args.path}: {exc}")
    bootstrap, errors, quiet = parse_message(source, extensions.Bootstrap)
    try:
        static = translate_bootstrap(
            bootstrap, source, errors=errors, quiet=quiet, source_name=args.path
        )
    except ConfigErrors as exc:
        return fatal(f"invalid configuration in {args.path}:\n{exc}")
    cluster = bootstrap.dynamic_resources.ads_config.grpc_services[0].envoy_grpc.cluster_name
    if not bootstrap.HasField("dynamic_resources") or not cluster:
        return fatal(f"{args.path} has no dynamic_resources.ads_config")
    node = _node(bootstrap, args.service_node, args.service_cluster)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir(node.id)
    try:
        identity = identity_settings(node, args.join_token_file)
    except ConfigErrors as exc:
        return fatal(f"invalid configuration in {args.path}:\n{exc}")
    client = AdsClient(
        bootstrap,
        source,
        node,
        _targets(static, cluster),
        cache_dir,
        link,
        initial_timeout=args.initial_timeout,
        local_secrets=(LOCAL_CERTIFICATE,) if identity else (),
    )
    run = loop.create_task(client.run())
    certificates = loop.create_task(run_identity(client, identity)) if identity else None
    # The parent closing our stdin (it exited) ends this process; nothing else is read from
    # stdin outside ParentLink.apply, which holds the same reader.
    while not run.done():
        if reader.at_eof():
            break
        await asyncio.sleep(0.5)
    run.cancel()
    if certificates is not None:
        certificates.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ubimesh.proxy.xds.ads_client")
    parser.add_argument("path")
    parser.add_argument("--service-node", default="")
    parser.add_argument("--service-cluster", default="")
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--initial-timeout", type=float, default=INITIAL_TIMEOUT)
    parser.add_argument(
        "--join-token-file",
        default="",
        help="a one-time join token for the proxy's first certificate (with node metadata "
        "ubimesh.identity)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="[%(asctime)s][%(process)d][%(levelname)s][%(name)s] %(message)s",
        stream=sys.stderr,
    )
    # asyncio's own loop: grpc.aio integrates with it (and the child carries no traffic).
    return asyncio.run(_main_async(args))


if __name__ == "__main__":
    sys.exit(main())
