"""``ubimesh control``: the store, the API, the compiler, the ADS server and the registry.

One replica is stateless apart from its store: it watches the store, recompiles everything
(``compile_all``, debounced, one compilation at a time in one task) and hands each proxy its
new XdsSet, so a change to one resource reaches every connected proxy. Several replicas may
share one etcd store; each watches and compiles on its own.

After binding, the replica writes ``<data dir>/control.json`` (``api``, ``xds``, ``pid``,
``replica``): ports given as 0 are resolved there, which is how tests and ``ubimesh up`` find
a replica they started.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ubimesh.control.ads import SDS, AdsServer, NodeInfo, SnapshotCache
from ubimesh.control.ads.secrets import ROOTCA, secrets_version, trust_bundle_secret
from ubimesh.control.api import Identity, make_app
from ubimesh.control.compiler import XdsSet, compile_all, compile_proxy, empty_set, proxy_ref
from ubimesh.control.compiler.model import CompileOptions
from ubimesh.control.registry import DEFAULT_GRACE_S, Registry
from ubimesh.control.resources import Resource
from ubimesh.control.store import Store, open_store

log = logging.getLogger("ubimesh.control")

ADDRESSES_FILE = "control.json"
#: The CA's directory and the join token / issued-leaf databases, under the data dir.
CA_DIR = "ca"
TOKENS_DB = "tokens.db"
ISSUED_DB = "issued.db"
DEFAULT_TRUST_DOMAIN = "cluster.local"
TOKEN_FILE = "admin-token"
#: The collector's directory (spans.db) under the data dir.
COLLECTOR_DIR = "collector"
#: ``collector_url`` placeholder until the API's port is known.
API_COLLECTOR = "api"
DEFAULT_API = "127.0.0.1:15000"
DEFAULT_XDS = "127.0.0.1:15010"
#: Changes closer together than this are compiled once.
DEBOUNCE_S = 0.05
#: Watch events buffered between the store and the compile task (beyond: the pump waits).
EVENT_QUEUE = 1024


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ubimesh"


@dataclass(frozen=True)
class ControlOptions:
    data_dir: Path
    store_url: str = ""  # "" = sqlite:///<data_dir>/ubimesh.db
    api_address: tuple[str, int] = ("127.0.0.1", 15000)
    xds_address: tuple[str, int] = ("127.0.0.1", 15010)
    token_file: Path | None = None
    grace: float = DEFAULT_GRACE_S
    debounce: float = DEBOUNCE_S
    #: Print the generated admin token (once, when it is created).
    announce: bool = True
    #: Trust domain of a CA created at first start ("": the Mesh's trustDomain, else
    #: cluster.local). An existing CA keeps its own.
    trust_domain: str = ""
    #: How often the CA's files are checked (a root rotation done on disk, an intermediate
    #: past half-life).
    identity_check_s: float = 10.0
    #: The CA's directory (None: ``<data dir>/ca``). Replicas of one control plane give the
    #: same shared directory, so they sign from one CA and publish one bundle.
    ca_dir: Path | None = None
    #: Run the trace collector (docs/telemetry.md, "Tracing in a ubimesh mesh").
    collector: bool = True
    #: Its own listener; None: on the API's listener.
    collector_address: tuple[str, int] | None = None
    collector_retention_s: float = 24 * 3600.0
    collector_max_spans: int = 0
    #: Serve the collector's query API without the admin token (for Zipkin's UI or Grafana
    #: on a trusted network). Ingest never needs it.
    collector_open_query: bool = False


def load_or_create_token(data_dir: Path, token_file: Path | None) -> tuple[str, bool]:
    """The admin token, and whether it was just created (then it is shown once).

    ``token_file`` given: read from it (it must exist and not be empty). Otherwise
    ``<data dir>/admin-token``, created mode 0600 with a random token at first start.
    """
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise ValueError(f"--token-file: cannot read {token_file}: {exc.strerror}") from None
        if not token:
            raise ValueError(f"--token-file: {token_file} is empty; expected the admin token")
        return token, False
    path = data_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, False
        path.unlink()
    # Hex, not urlsafe base64: a token that starts with "-" would read as an option in
    # `ubimesh ... --token TOKEN` (argparse refuses it), one time in 64.
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token, True


class ControlPlane:
    """One replica. ``await start()`` binds everything; ``await stop()`` undoes it."""

    def __init__(self, options: ControlOptions) -> None:
        self.options = options
        self.cache = SnapshotCache()
        self.store: Store | None = None
        self.registry: Registry | None = None
        self.ads: AdsServer | None = None
        self.runner: web.AppRunner | None = None
        self.api_url = ""
        #: The collector's base URL ("": off); the API's URL when mounted there.
        self.collector_url = ""
        self.collector_runner: web.AppRunner | None = None
        self.xds_address = ("", 0)
        self.token = ""
        self.token_created = False
        self.compiles = 0
        self.last_error = ""
        self._connected: dict[str, NodeInfo] = {}
        self._compiled: set[str] = set()
        self._resources: list[Resource] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.identity: Identity | None = None
        self._trust: dict[str, Any] = {}  # SDS secrets every proxy gets: ROOTCA
        self._trust_version = ""

    async def start(self) -> None:
        opts = self.options
        opts.data_dir.mkdir(parents=True, exist_ok=True)
        self.token, self.token_created = load_or_create_token(opts.data_dir, opts.token_file)
        store_url = opts.store_url or f"sqlite:///{opts.data_dir / 'ubimesh.db'}"
        self.store = store = open_store(store_url)
        self.registry = Registry(store, grace=opts.grace)
        revision = await store.revision()
        self.identity = identity = await self._open_identity(store)
        self.set_trust_bundle(identity.ca.bundle_pem())
        # A rotation through the API pushes its new bundle at once (not at the next check).
        identity.on_change = lambda: self.set_trust_bundle(identity.ca.bundle_pem())
        # The API (and the collector) are bound before the first compile: the compiler
        # points every proxy's tracing at the collector's bound address.
        app = make_app(store, token=self.token, proxies=self.registry.proxies,
                       identity=self.identity, open_query=opts.collector_open_query)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._start_collector(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, *opts.api_address)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.api_url = f"http://{_url_host(host)}:{port}"
        if self.collector_url == API_COLLECTOR:
            self.collector_url = self.api_url
        await self._compile()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[None] = asyncio.Queue(EVENT_QUEUE)
        self._tasks.append(loop.create_task(self._pump(store, revision, events), name="watch"))
        self._tasks.append(loop.create_task(self._compile_loop(events), name="compile"))
        self.ads = AdsServer(self.cache, on_connect=self._on_connect,
                             on_disconnect=self._on_disconnect)
        xds_port = await self.ads.start(*opts.xds_address)
        self.xds_address = (opts.xds_address[0], xds_port)
        self._tasks.append(loop.create_task(self._identity_loop(), name="identity"))
        self._write_addresses(store_url)

    async def _start_collector(self, api: web.Application) -> None:
        """Mount the trace collector (data in ``<data dir>/collector``): on the API app, or
        bound on ``collector_address`` when given. Ingest needs no token; the query API needs
        the admin token unless ``collector_open_query``. Sets ``collector_url``."""
        opts = self.options
        if not opts.collector:
            log.info("the trace collector is off (--no-collector): the Mesh's builtin "
                     "tracing provider sends spans nowhere")
            return
        from ubimesh.collector.api import CollectorOptions, add_collector

        options = CollectorOptions(data_dir=opts.data_dir / COLLECTOR_DIR,
                                   retention_s=opts.collector_retention_s,
                                   max_spans=opts.collector_max_spans)
        if opts.collector_address is None:
            add_collector(api, options)
            self.collector_url = API_COLLECTOR  # known once the API is bound
            return
        app = web.Application(middlewares=[_collector_auth(self.token, opts.collector_open_query)])
        add_collector(app, options)
        self.collector_runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.collector_runner.setup()
        await web.TCPSite(self.collector_runner, *opts.collector_address).start()
        host, port = self.collector_runner.addresses[0][:2]
        self.collector_url = f"http://{_url_host(host)}:{port}"

    def compile_options(self) -> CompileOptions:
        """What the compiler gets from this replica: where proxies reach its collector (an
        unspecified bind address is reached on loopback)."""
        if not self.collector_url:
            return CompileOptions()
        host_port = self.collector_url.split("://", 1)[1]
        for unspecified, loopback in (("0.0.0.0:", "127.0.0.1:"), ("[::]:", "[::1]:")):
            if host_port.startswith(unspecified):
                host_port = loopback + host_port[len(unspecified):]
        return CompileOptions(collector=host_port)

    async def _open_identity(self, store: Store) -> Identity:
        """Open the CA in ``--ca-dir`` or ``<data dir>/ca`` (creating one at first start) and
        the tokens."""
        from ubimesh.identity.ca import CertificateAuthority
        from ubimesh.identity.issued import IssuedLeaves
        from ubimesh.identity.tokens import JoinTokens

        wanted = self.options.trust_domain
        if not wanted:
            meshes = await store.list("Mesh")
            wanted = next((str(m.spec["trustDomain"]) for m in meshes
                           if m.spec.get("trustDomain")), DEFAULT_TRUST_DOMAIN)
        data_dir = self.options.data_dir
        ca_dir = self.options.ca_dir or data_dir / CA_DIR
        ca, created = CertificateAuthority.open_or_init(ca_dir, wanted)
        if created:
            log.info("created a CA for trust domain %s in %s", wanted, ca_dir)
        elif ca.trust_domain != wanted:
            if self.options.trust_domain:
                raise ValueError(f"--trust-domain {wanted}: the CA in {ca_dir} is for "
                                 f"{ca.trust_domain}; use that, or another --data-dir")
            log.warning("the CA is for trust domain %s but the Mesh says %s; identities are "
                        "issued for %s", ca.trust_domain, wanted, ca.trust_domain)
        ca.renew_intermediate_if_due()
        return Identity(ca, JoinTokens(data_dir / TOKENS_DB), IssuedLeaves(data_dir / ISSUED_DB))

    async def _identity_loop(self) -> None:
        """Renew the intermediate at half-life; pick up CA changes made on disk (``ubimesh ca``
        or a root rotation) and push a changed bundle to every proxy; log a WARNING once per
        certificate near its expiry (``identity_metrics.ExpiryWarner``)."""
        from ubimesh.control.identity_metrics import ExpiryWarner
        from ubimesh.identity.ca import BUNDLE_FILE, INT_CERT, CaError, CertificateAuthority

        assert self.identity is not None
        directory = self.identity.ca.directory
        warner = ExpiryWarner()

        def stamp() -> tuple[float, ...]:
            return tuple(_mtime(directory / name) for name in (BUNDLE_FILE, INT_CERT))

        seen = stamp()
        while True:
            try:
                warner.check(self.identity.ca.status(), self.identity.issued.list())
            except Exception as exc:  # sqlite3.Error included: a warning must not stop the loop
                log.warning("certificate expiry check failed: %s", exc)
            await asyncio.sleep(self.options.identity_check_s)
            try:
                if self.identity.ca.renew_intermediate_if_due():
                    log.info("renewed the CA's intermediate certificate")
                elif stamp() != seen:
                    self.identity.ca = CertificateAuthority.load(directory)
                    log.info("reloaded the CA from %s", directory)
                seen = stamp()
                self.set_trust_bundle(self.identity.ca.bundle_pem())
            except (CaError, OSError, ValueError) as exc:
                log.warning("CA check failed (%s); the loaded CA stays in use", exc)

    def _write_addresses(self, store_url: str) -> None:
        data = {
            "api": self.api_url,
            "xds": f"{self.xds_address[0]}:{self.xds_address[1]}",
            "pid": os.getpid(),
            "replica": self.registry.replica if self.registry else "",
            "store": store_url,
            "collector": self.collector_url,
        }
        path = self.options.data_dir / ADDRESSES_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a file

    async def stop(self) -> None:
        # Cleaning up an app that holds the collector writes its queued spans first.
        if self.runner is not None:
            await self.runner.cleanup()
        if self.collector_runner is not None:
            await self.collector_runner.cleanup()
        if self.ads is not None:
            await self.ads.stop(1.0)
        if self.registry is not None:
            await self.registry.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.store is not None:
            await self.store.close()
        if self.identity is not None:
            self.identity.tokens.close()
            self.identity.issued.close()
        with contextlib.suppress(OSError):
            (self.options.data_dir / ADDRESSES_FILE).unlink()

    async def _pump(self, store: Store, revision: int, events: asyncio.Queue[None]) -> None:
        """Turn store events into wake-ups of the compile task; watch again if the watch ends.

        After a failure (history compacted, fell behind) the watch restarts from the current
        revision and a compile is forced: compiling lists everything, so nothing is missed.
        """
        since = revision
        while True:
            try:
                async for event in store.watch(since=since):
                    since = event.revision
                    if events.empty():  # one pending wake-up is enough
                        events.put_nowait(None)
                log.warning("the store ended the watch; watching again in 1 s")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("store watch failed (%s); watching again in 1 s", exc)
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                since = await store.revision()
            if events.empty():
                events.put_nowait(None)

    async def _compile_loop(self, events: asyncio.Queue[None]) -> None:
        while True:
            await events.get()
            await asyncio.sleep(self.options.debounce)
            while not events.empty():
                events.get_nowait()
            await self._compile()

    async def _compile(self) -> None:
        """Compile every proxy from the store's content and update the cache.

        A failure keeps the last good snapshots serving and is logged (the store was
        validated on the way in, so this is a compiler bug or a partial registration).
        """
        assert self.store is not None
        started = time.monotonic()
        try:
            resources = await self.store.list()
            loop = asyncio.get_running_loop()
            # A pure CPU job: off the loop so the API and ADS streams stay responsive.
            options = self.compile_options()
            compiled = await loop.run_in_executor(None, compile_all, resources, options)
            for node_id, info in self._connected.items():
                if node_id not in compiled:
                    compiled[node_id] = await loop.run_in_executor(
                        None, compile_proxy, resources, proxy_ref(node_id, info.metadata),
                        options,
                    )
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("compiling the mesh failed; the last good configuration stays")
            return
        self._resources = resources
        for node_id, xds in compiled.items():
            self._set(node_id, xds)
        for gone in self._compiled - set(compiled):
            # A proxy the resources no longer name: an empty set removes its listeners.
            self._set(gone, empty_set())
        self._compiled = set(compiled)
        self.compiles += 1
        self.last_error = ""
        log.debug("compiled %d proxies from %d resources in %.1f ms", len(compiled),
                  len(resources), (time.monotonic() - started) * 1000)

    def _set(self, node_id: str, xds: XdsSet) -> None:
        try:
            self.cache.set(node_id, self._with_trust(xds))
        except (TypeError, ValueError) as exc:
            log.error("proxy %s: snapshot refused by the ADS cache: %s", node_id, exc)

    # -- the trust bundle: SDS secret ROOTCA ---------------------------------------------

    def set_trust_bundle(self, bundle_pem: bytes) -> None:
        """Serve ``bundle_pem`` (the CA's bundle, every trusted root) to every proxy as the SDS
        secret ``ROOTCA`` (``validation_context.trusted_ca``), with its own SDS version.

        Call it once the CA is loaded and again whenever its bundle changes (root rotation):
        every snapshot is set again, so connected proxies get the new bundle pushed (SDS goes
        out after CDS/EDS and before LDS).  Raises ValueError for a bundle with no certificate.
        """
        secret = trust_bundle_secret(bundle_pem)
        if self._trust.get(ROOTCA) == secret:
            return
        self._trust = {ROOTCA: secret}
        self._trust_version = secrets_version(self._trust)
        for node_id in self.cache.nodes():
            current = self.cache.get(node_id)
            if isinstance(current, XdsSet):
                self._set(node_id, current)

    def _with_trust(self, xds: XdsSet) -> XdsSet:
        """``xds`` plus the trust secrets (replacing any SDS resources it had)."""
        if not self._trust:
            return xds
        return dataclasses.replace(
            xds,
            resources={**xds.resources, SDS: self._trust},
            versions={**xds.versions, SDS: self._trust_version},
        )

    async def _on_connect(self, info: NodeInfo) -> None:
        self._connected[info.id] = info
        if self.registry is not None:
            await self.registry.on_connect(info)
        if self.cache.get(info.id) is None:
            # Not named by the resources (yet): compile it alone so it gets what applies.
            try:
                xds = compile_proxy(self._resources, proxy_ref(info.id, info.metadata),
                                    self.compile_options())
            except Exception as exc:
                log.warning("proxy %s: cannot compile its configuration: %s", info.id, exc)
                return
            self._set(info.id, xds)

    async def _on_disconnect(self, info: NodeInfo) -> None:
        if self.registry is not None:
            await self.registry.on_disconnect(info)
            still = any(p["id"] == info.id for p in self.registry.proxies())
        else:
            still = False
        if not still:
            self._connected.pop(info.id, None)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _collector_auth(token: str, open_query: bool) -> Any:
    """The collector listener's rule: ingest (POST) and ``/health`` are open, the query API
    (``GET /api/v2/...``) needs ``Authorization: Bearer <admin token>`` unless ``open_query``."""
    expected = token.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if not open_query and request.method != "POST" and request.path.startswith("/api/"):
            scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), expected
            ):
                return web.json_response(
                    {"error": "missing or wrong admin token (Authorization: Bearer <token>)"},
                    status=401,
                )
        response: web.StreamResponse = await handler(request)
        return response

    return middleware


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def serve(options: ControlOptions, *, out: Any = None) -> int:
    """Run a replica until SIGINT or SIGTERM. Returns the exit code."""
    out = out if out is not None else sys.stdout
    plane = ControlPlane(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await plane.start()
    except BaseException:
        await plane.stop()
        raise
    print(f"ubimesh control: API {plane.api_url}  xDS {plane.xds_address[0]}:"
          f"{plane.xds_address[1]}  data {options.data_dir}", file=out, flush=True)
    if plane.collector_url:
        print(f"trace collector: {plane.collector_url} (Zipkin /api/v2/spans, OTLP /v1/traces; "
              "queries need the admin token)" if not options.collector_open_query else
              f"trace collector: {plane.collector_url} (queries open)", file=out, flush=True)
    if plane.token_created:
        print(f"admin token (shown once; kept in {options.data_dir / TOKEN_FILE}): "
              f"{plane.token}", file=out, flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await plane.stop()
    return 0
