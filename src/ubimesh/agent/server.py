"""The agent: certificate and bundle from the control plane, served over SDS on a Unix socket.

Every SDS client (whatever its node id) sees the same two secrets, since the socket is private
to the workload's user (mode 0600):

- ``default``: ``tls_certificate`` with the certificate chain (leaf first) and the private key
  inline; a new one after each renewal (half-life, +-10% jitter);
- ``ROOTCA``: ``validation_context.trusted_ca`` = the trust bundle, from the sign answer and
  then from ``GET /api/v1/identity/bundle`` every ``bundle_refresh`` seconds (so a root
  rotation reaches the Envoy without a renewal).

A change is pushed on every open stream at once (state of the world: the stream's last
response is replaced, Envoy swaps the certificate for new handshakes and keeps its open
connections).  The SDS server starts before the first certificate is there; requests wait for
it.  The private key exists in this process's memory, in what it sends on the socket and,
with ``state_dir`` (``--state-dir``), in ``<state_dir>/svid.json`` (0600) so that a restarted
agent renews with it instead of needing a new join token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Any

from ubimesh.agent.cache import SecretSet, SharedSnapshotCache
from ubimesh.control.ads import AdsServer
from ubimesh.control.ads.secrets import ROOTCA, secrets_version, trust_bundle_secret
from ubimesh.identity.credentials import CredentialStore
from ubimesh.identity.workload import (
    IdentityError,
    WorkloadCertificate,
    WorkloadIdentity,
    read_token_file,
)
from ubimesh.proxy.xds.dynamic import LOCAL_CERTIFICATE, SECRET_TYPE, certificate_secret

__all__ = ["Agent", "AgentOptions", "serve"]

log = logging.getLogger("ubimesh.agent")

#: How often the trust bundle is fetched again (seconds).
BUNDLE_REFRESH = 60.0


@dataclass(frozen=True)
class AgentOptions:
    control_api: str  # http://HOST:PORT of `ubimesh control`
    join_token_file: str  # "" = none (then a stored credential must exist)
    identity: str  # spiffe://TD/ns/N/sa/S
    socket_path: str
    cert_ttl: str = ""  # asked of the CA ("1h"); "" = the CA's default
    state_dir: str = ""  # where the credential is kept across restarts; "" = memory only
    bundle_refresh: float = BUNDLE_REFRESH
    identifier: str = "ubimesh-agent"


class Agent:
    """``await start()`` reads the token and starts the SDS server; ``await run()`` gets and
    renews the certificate (raising :class:`IdentityError` when that can no longer work);
    ``await stop()``."""

    def __init__(self, options: AgentOptions) -> None:
        if options.bundle_refresh <= 0:
            raise ValueError(
                f"bundle refresh {options.bundle_refresh}: expected seconds > 0"
            )
        self.options = options
        self.cache = SharedSnapshotCache()
        self.server = AdsServer(self.cache, services=("sds",), identifier=options.identifier)
        self.identity: WorkloadIdentity | None = None
        self.secrets: dict[str, Any] = {}
        self.certificate: WorkloadCertificate | None = None

    async def start(self) -> None:
        opts = self.options
        token: str | None = None
        problem: IdentityError | None = None
        if opts.join_token_file:
            try:
                token = read_token_file(opts.join_token_file)
            except IdentityError as exc:
                problem = exc
        store = CredentialStore(opts.state_dir) if opts.state_dir else None
        self.identity = WorkloadIdentity(
            opts.control_api, opts.identity, token, ttl=opts.cert_ttl, store=store
        )
        # A stored credential (a restart) needs no token; without one the token is a must.
        if token is None and self.identity.restore() is None:
            raise problem or IdentityError(
                f"{opts.identity}: no join token and no stored credential"
                + (f" in {opts.state_dir}" if opts.state_dir else "")
                + f"; create a token with `ubimesh token create --identity {opts.identity}` "
                "and pass it with --join-token-file FILE"
            )
        await self.server.start_unix(opts.socket_path)

    async def run(self) -> None:
        assert self.identity is not None, "Agent.run before start"
        refresher = asyncio.get_running_loop().create_task(self._refresh_bundle())
        try:
            await self.identity.run(self._on_certificate)
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher

    async def stop(self) -> None:
        await self.server.stop(0.5)

    async def _on_certificate(self, cert: WorkloadCertificate) -> None:
        self.certificate = cert
        self.secrets[LOCAL_CERTIFICATE] = certificate_secret(
            LOCAL_CERTIFICATE, cert.chain_pem, cert.key_pem
        )
        if ROOTCA not in self.secrets:
            self.secrets[ROOTCA] = trust_bundle_secret(cert.bundle_pem)
        self._publish()

    def _set_bundle(self, bundle_pem: bytes) -> None:
        secret = trust_bundle_secret(bundle_pem)
        if self.secrets.get(ROOTCA) != secret:
            self.secrets[ROOTCA] = secret
            log.info("trust bundle changed")
            self._publish()

    def _publish(self) -> None:
        if LOCAL_CERTIFICATE not in self.secrets:
            return  # serve nothing until the workload has its certificate
        secrets = dict(self.secrets)
        self.cache.set_shared(
            SecretSet({SECRET_TYPE: secrets}, {SECRET_TYPE: secrets_version(secrets)})
        )

    async def _refresh_bundle(self) -> None:
        assert self.identity is not None
        while True:
            await asyncio.sleep(self.options.bundle_refresh)
            try:
                bundle = await asyncio.to_thread(self.identity.client.bundle)
                self._set_bundle(bundle)
            except (IdentityError, ValueError) as exc:
                log.warning("cannot refresh the trust bundle (keeping the last one): %s", exc)


async def serve(options: AgentOptions, *, out: Any = None) -> int:
    """Run the agent until SIGINT/SIGTERM; 1 when the identity cannot be had or kept."""
    out = out if out is not None else sys.stdout
    agent = Agent(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except (IdentityError, OSError) as exc:
        print(f"ubimesh agent: {exc}", file=sys.stderr, flush=True)
        await agent.stop()
        return 1
    print(f"ubimesh agent: SDS on unix:{options.socket_path} for {options.identity}",
          file=out, flush=True)
    running = loop.create_task(agent.run())
    stopping = loop.create_task(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (running, stopping):
            task.cancel()
        await agent.stop()
    if running.done() and not running.cancelled():
        failure = running.exception()
        if failure is not None:
            print(f"ubimesh agent: {failure}", file=sys.stderr, flush=True)
            return 1
    return 0
