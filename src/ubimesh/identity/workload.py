"""A workload's own certificate: get it with a join token, renew it with proof of the current one.

Shared by the proxy's ADS child (the ``default`` secret of ``ubimesh proxy``) and by
``ubimesh agent`` (docs/identity.md, "workload"):

1. make a fresh key and a CSR for the workload's SPIFFE ID (:func:`new_key_and_csr`); the key
   stays in this process's memory and is never written anywhere;
2. ``POST <control API>/api/v1/identity/sign`` with ``{"csr", "token"}`` the first time, later
   ``{"csr", "chain", "proof"}`` where ``proof`` is the base64 ECDSA-SHA256 signature of the new
   CSR's DER by the *current* key (a new key every renewal);
3. check what came back: the leaf is for the key just made and carries the expected SPIFFE ID,
   and it chains to the bundle that came with it (``verify_svid``);
4. renew at half of the leaf's lifetime, jittered by +-10% so that a fleet issued together does
   not renew together (:func:`renewal_delay`); a renewal that fails is retried with backoff
   until the certificate expires, after which only a new join token helps (there is no way to
   prove the identity any more).

Tokens are single-use, so a restarted process could not prove its identity again from the
token alone. With a :class:`~ubimesh.identity.credentials.CredentialStore` (the proxy's cache
directory, the agent's ``--state-dir``), every new certificate is also written to the
workload's own disk (0600), and a restarted process renews with that stored credential; the
token is used only when there is none (or the control plane refuses it).  Without a store the
key lives in memory only and a restart needs a fresh token.  The HTTP calls use ``urllib`` in
a worker thread (no proxy from the environment, bounded timeouts), so this module loads no HTTP
library into a serving process.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ubimesh.identity import SpiffeId, new_key_and_csr, verify_svid
from ubimesh.identity.credentials import CredentialStore
from ubimesh.identity.csr import sign_proof

__all__ = [
    "DEFAULT_TIMEOUT",
    "IdentityError",
    "SignClient",
    "WorkloadCertificate",
    "WorkloadIdentity",
    "read_token_file",
    "renewal_delay",
]

log = logging.getLogger("ubimesh.identity.workload")

#: Seconds one HTTP call to the control plane may take.
DEFAULT_TIMEOUT = 10.0
#: The largest answer read from the control plane (a chain and a bundle are a few KB).
MAX_ANSWER = 1024 * 1024
#: Renew at this fraction of the lifetime ...
RENEW_AT = 0.5
#: ... plus or minus this fraction of that point.
JITTER = 0.1
#: Retry delays after a failed sign call: doubling from the first to the last.
RETRY = (1.0, 30.0)

SIGN_PATH = "/api/v1/identity/sign"
BUNDLE_PATH = "/api/v1/identity/bundle"


class IdentityError(Exception):
    """Getting or renewing the certificate failed; ``permanent`` when retrying cannot help
    (the token was refused, the certificate expired): a new join token is needed."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class WorkloadCertificate:
    """The workload's current X.509-SVID. ``key_pem`` is in memory (and, with a credential
    store, on the workload's own disk)."""

    spiffe_id: str
    key_pem: bytes = field(repr=False)
    chain_pem: bytes  # leaf first, then the intermediate(s)
    bundle_pem: bytes  # the trust bundle the control plane returned with it
    not_before: float  # epoch seconds
    not_after: float
    serial: int
    received_at: float = 0.0  # epoch seconds, by this workload's clock

    @property
    def lifetime(self) -> float:
        """Seconds from issuance (the later of notBefore and receipt: the CA backdates
        notBefore by a minute for clock skew, which is no part of the useful life) to expiry."""
        return self.not_after - self.issued_at

    @property
    def issued_at(self) -> float:
        return max(self.not_before, self.received_at)


def renewal_delay(
    cert: WorkloadCertificate,
    now: float,
    rand: Callable[[], float] = random.random,
    *,
    at: float = RENEW_AT,
    jitter: float = JITTER,
) -> float:
    """Seconds from ``now`` until ``cert`` should be renewed: at ``at`` of its lifetime (from
    issuance), that point moved by a uniform +-``jitter`` of itself (``rand()`` in [0, 1));
    0 when overdue."""
    offset = cert.lifetime * at * (1.0 + jitter * (2.0 * rand() - 1.0))
    return max(0.0, cert.issued_at + offset - now)


def read_token_file(path: str) -> str:
    """The join token in ``path`` (surrounding whitespace stripped); ``IdentityError`` naming
    the file when it cannot be read or is empty."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise IdentityError(f"join token file {path}: cannot read it: {reason}") from None
    if not token:
        raise IdentityError(
            f"join token file {path} is empty; put the token from `ubimesh token create "
            "--identity ID` in it",
            permanent=True,
        )
    return token


def _certificate(
    spiffe_id: SpiffeId, key_pem: bytes, chain_pem: bytes, bundle_pem: bytes, now: float
) -> WorkloadCertificate:
    """Check the control plane's answer against the key we made and the identity we asked for."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        roots = x509.load_pem_x509_certificates(bundle_pem)
    except ValueError as exc:
        raise IdentityError(f"the control plane's answer is not PEM certificates: {exc}") from None
    leaf = chain[0]
    key = serialization.load_pem_private_key(key_pem, password=None)
    ours = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    theirs = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if ours != theirs:
        raise IdentityError("the certificate the control plane returned is not for our key")
    try:
        got = verify_svid(chain_pem, {spiffe_id.trust_domain: roots})
    except Exception as exc:  # SvidError and anything the chain's oddities raise
        raise IdentityError(
            f"the certificate the control plane returned is invalid: {exc}"
        ) from None
    if str(got) != str(spiffe_id):
        raise IdentityError(
            f"the control plane issued a certificate for {got}, but this workload is "
            f"{spiffe_id}: check the join token's identity (ubimesh token create --identity)",
            permanent=True,
        )
    return WorkloadCertificate(
        spiffe_id=str(spiffe_id),
        key_pem=key_pem,
        chain_pem=chain_pem,
        bundle_pem=bundle_pem,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
        serial=leaf.serial_number,
        received_at=now,
    )


class SignClient:
    """The control plane's identity API (blocking calls; run them in a thread)."""

    def __init__(self, control_api: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not control_api.startswith(("http://", "https://")):
            raise IdentityError(
                f"control plane API {control_api!r}: expected a URL such as "
                "http://127.0.0.1:15000",
                permanent=True,
            )
        self.base = control_api.rstrip("/")
        self.timeout = timeout
        # Never send the join token through a proxy named by the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def sign(self, body: dict[str, Any]) -> tuple[bytes, bytes]:
        """POST the sign request; returns (chain PEM, bundle PEM)."""
        answer = self._call("POST", SIGN_PATH, json.dumps(body).encode())
        try:
            doc = json.loads(answer)
            return doc["chain"].encode(), doc["bundle"].encode()
        except (ValueError, KeyError, TypeError, AttributeError):
            raise IdentityError(
                f"{self.base}{SIGN_PATH}: expected JSON with `chain` and `bundle` (PEM), got "
                f"{answer[:200]!r}"
            ) from None

    def bundle(self) -> bytes:
        """GET the trust bundle (every trusted root, PEM)."""
        answer = self._call("GET", BUNDLE_PATH, None)
        if b"-----BEGIN CERTIFICATE-----" not in answer:
            # The API may wrap it in JSON; accept {"bundle": PEM} too.
            try:
                return str(json.loads(answer)["bundle"]).encode()
            except (ValueError, KeyError, TypeError):
                raise IdentityError(
                    f"{self.base}{BUNDLE_PATH}: no PEM certificate in the answer"
                ) from None
        return answer

    def _call(self, method: str, path: str, data: bytes | None) -> bytes:
        url = self.base + path
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return bytes(response.read(MAX_ANSWER))
        except urllib.error.HTTPError as exc:
            detail = exc.read(4096).decode("utf-8", "replace").strip()
            # 4xx: the request is refused (token unknown, used or expired; bad proof); the
            # same request will be refused again.  5xx: the control plane's trouble, retry.
            raise IdentityError(
                f"{method} {url}: HTTP {exc.code}: {detail}", permanent=400 <= exc.code < 500
            ) from None
        except (OSError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise IdentityError(f"{method} {url}: {reason}") from None


OnCertificate = Callable[[WorkloadCertificate], Awaitable[None]]


class WorkloadIdentity:
    """Gets and renews one workload's certificate; :meth:`run` does it forever.

    ``token`` is the join token for the first certificate (None: :meth:`obtain` refuses).
    ``ttl`` (e.g. "1h"), when given, is asked of the control plane; it grants at most what
    the CA allows. ``node`` (the proxy's node id) is recorded with the leaf.  ``store``, when
    given, keeps every new certificate on disk and gives :meth:`run` the one to start from
    after a restart.  ``clock``, ``rand`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        control_api: str,
        spiffe_id: str | SpiffeId,
        token: str | None,
        *,
        ttl: str = "",
        node: str = "",
        timeout: float = DEFAULT_TIMEOUT,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry: tuple[float, float] = RETRY,
        store: CredentialStore | None = None,
    ) -> None:
        try:
            self.spiffe_id = (
                spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
            )
        except ValueError as exc:
            raise IdentityError(f"workload identity {spiffe_id!r}: {exc}", permanent=True) from None
        self.client = SignClient(control_api, timeout=timeout)
        self.token = token
        self.ttl = ttl
        self.node = node
        self.clock = clock
        self.rand = rand
        self.sleep = sleep
        self.retry = retry
        self.store = store
        self.current: WorkloadCertificate | None = None
        #: The current certificate came from the store (not yet renewed by this process).
        self.restored = False
        self.renewals = 0

    async def obtain(self) -> WorkloadCertificate:
        """The first certificate, with the join token (used up by this call)."""
        if not self.token:
            raise IdentityError(
                f"{self.spiffe_id}: no join token; create one with `ubimesh token create "
                f"--identity {self.spiffe_id}` and pass it with --join-token-file",
                permanent=True,
            )
        key_pem, csr_pem = new_key_and_csr(self.spiffe_id)
        body = self._body(csr_pem, token=self.token)
        chain, bundle = await asyncio.to_thread(self.client.sign, body)
        self.token = None  # single use: never sent again
        self.current = _certificate(self.spiffe_id, key_pem, chain, bundle, self.clock())
        self._save(self.current)
        log.info("certificate for %s obtained (serial %x, expires %s)", self.spiffe_id,
                 self.current.serial, _iso(self.current.not_after))
        return self.current

    async def renew(self) -> WorkloadCertificate:
        """A new key and certificate, proving the identity with the current one."""
        current = self.current
        if current is None:
            return await self.obtain()
        if self.clock() >= current.not_after:
            raise IdentityError(
                f"the certificate of {self.spiffe_id} expired at {_iso(current.not_after)}; "
                "it can no longer prove the identity: a new join token is needed",
                permanent=True,
            )
        key_pem, csr_pem = new_key_and_csr(self.spiffe_id)
        body = self._body(
            csr_pem,
            chain=current.chain_pem.decode("ascii"),
            proof=sign_proof(current.key_pem, csr_pem),
        )
        chain, bundle = await asyncio.to_thread(self.client.sign, body)
        self.current = _certificate(self.spiffe_id, key_pem, chain, bundle, self.clock())
        self._save(self.current)
        self.restored = False
        self.renewals += 1
        log.info("certificate for %s renewed (serial %x, expires %s)", self.spiffe_id,
                 self.current.serial, _iso(self.current.not_after))
        return self.current

    async def run(self, on_certificate: OnCertificate) -> None:
        """Obtain (if needed), then renew forever, awaiting ``on_certificate`` with each new
        certificate.  Returns only by raising :class:`IdentityError` when retrying cannot help
        (token refused, certificate expired); transient failures are retried with backoff.

        With a store holding a valid credential for this identity, that credential is handed
        out first (the workload serves at once) and renewed straight away, which proves the
        control plane still accepts it; if it refuses and a token is at hand, the token is
        redeemed instead."""
        if self.current is None:
            self.restore()
        if self.restored and self.current is not None:
            await on_certificate(self.current)
            try:
                await on_certificate(await self._retrying(self.renew))
            except IdentityError as exc:
                if not self.token:
                    raise
                log.warning("renewing the stored certificate of %s failed (%s); joining again "
                            "with the join token", self.spiffe_id, exc)
                self.current = None
                self.restored = False
        if self.current is None:
            await on_certificate(await self._retrying(self.obtain))
        while True:
            current = self.current
            assert current is not None
            await self.sleep(renewal_delay(current, self.clock(), self.rand))
            await on_certificate(await self._retrying(self.renew))

    async def _retrying(
        self, attempt: Callable[[], Awaitable[WorkloadCertificate]]
    ) -> WorkloadCertificate:
        delay = self.retry[0]
        while True:
            try:
                return await attempt()
            except IdentityError as exc:
                if exc.permanent:
                    raise
                wait = delay * random.uniform(0.5, 1.0)
                current = self.current
                if current is not None:
                    left = current.not_after - self.clock()
                    if left <= 0:
                        raise IdentityError(
                            f"{exc}; and the certificate of {self.spiffe_id} has expired: a "
                            "new join token is needed",
                            permanent=True,
                        ) from None
                    # Keep several attempts before the expiry, however near it is.
                    wait = min(wait, max(0.05, left / 10))
                log.warning("%s; trying again in %.1f s", exc, wait)
                await self.sleep(wait)
                delay = min(delay * 2, self.retry[1])

    def restore(self) -> WorkloadCertificate | None:
        """Make the store's credential the current one when it is valid for this identity
        (key matches, chain verifies against its bundle, not expired); None otherwise."""
        if self.store is None:
            return None

        def check(
            key: bytes, chain: bytes, bundle: bytes, received_at: float
        ) -> WorkloadCertificate:
            cert = _certificate(self.spiffe_id, key, chain, bundle, received_at)
            if self.clock() >= cert.not_after:
                raise IdentityError(f"it expired at {_iso(cert.not_after)}")
            return cert

        restored = self.store.load(self.spiffe_id, check)
        if restored is not None:
            self.current = restored
            self.restored = True
            log.info("certificate for %s restored from %s (serial %x, expires %s)",
                     self.spiffe_id, self.store.path, restored.serial, _iso(restored.not_after))
        return restored

    def _save(self, cert: WorkloadCertificate) -> None:
        if self.store is None:
            return
        try:
            self.store.save(cert.key_pem, cert.chain_pem, cert.bundle_pem, cert.received_at)
        except OSError as exc:
            # Serving with the new certificate matters more; a restart will need a token.
            log.warning("cannot store the certificate of %s in %s: %s", self.spiffe_id,
                        self.store.path, exc.strerror or exc)

    def _body(self, csr_pem: bytes, **fields: str) -> dict[str, Any]:
        body: dict[str, Any] = {"csr": csr_pem.decode("ascii"), **fields}
        if self.ttl:
            body["ttl"] = self.ttl
        if self.node:
            body["node"] = self.node  # shown by `ubimesh certs status`: who holds the leaf
        return body


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="seconds")
