"""The process's TLS state: the current SDS secrets and one ``TlsEndpoint`` per TLS context.

``TlsManager.set_secrets`` takes a snapshot's secrets (at start and on every apply, before the
listeners and clusters change). A ``TlsEndpoint`` resolves its context's secret references at
each new connection (a few dict lookups) and rebuilds its ``ssl.SSLContext`` and verifier only
when a secret it uses changed: new handshakes then use the new certificate or roots, while
open connections keep theirs (rotation without touching listeners, clusters or connections).

Nothing here imports ``ssl`` or ``cryptography`` until the first context is built.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ubimesh.proxy.snapshot.types import (
    CertificateValidation,
    Secret,
    TlsCertificate,
    TlsContext,
)
from ubimesh.proxy.tls.peer import PeerInfo

if TYPE_CHECKING:
    import ssl

    from ubimesh.proxy.tls.verify import PeerVerifier

log = logging.getLogger("ubimesh.tls")


class TlsUnavailable(ValueError):
    """A TLS context cannot be built now (a secret it names is missing or unusable)."""


class TlsManager:
    """Secrets by name and the endpoints built from TLS contexts (shared by equal contexts)."""

    def __init__(self) -> None:
        self.secrets: Mapping[str, Secret] = {}
        self._endpoints: dict[TlsContext, TlsEndpoint] = {}

    def set_secrets(self, secrets: Mapping[str, Secret]) -> None:
        self.secrets = dict(secrets)
        # Forget endpoints of contexts no longer in use? They are few and small; endpoints of
        # the current snapshot are looked up again by the listeners and clusters that use them.

    def endpoint(self, spec: TlsContext) -> TlsEndpoint:
        found = self._endpoints.get(spec)
        if found is None:
            found = self._endpoints[spec] = TlsEndpoint(spec, self)
        return found


class TlsEndpoint:
    """One TLS context at run time: its current SSLContext and peer verifier."""

    def __init__(self, spec: TlsContext, manager: TlsManager) -> None:
        self.spec = spec
        self.manager = manager
        self.sni = spec.sni
        self._key: tuple[Any, ...] | None = None
        self._context: ssl.SSLContext | None = None
        self._verifier: PeerVerifier | None = None

    def _resolve(self) -> tuple[TlsCertificate | None, CertificateValidation | None]:
        spec = self.spec
        secrets = self.manager.secrets
        certificate: TlsCertificate | None = spec.certificates[0] if spec.certificates else None
        if spec.certificate_secrets:
            name = spec.certificate_secrets[0]
            found = secrets.get(name)
            if not isinstance(found, TlsCertificate):
                raise TlsUnavailable(f"no tls_certificate secret {name!r} yet")
            certificate = found
        validation = spec.validation
        if spec.validation_secret:
            name = spec.validation_secret
            dynamic = secrets.get(name)
            if not isinstance(dynamic, CertificateValidation):
                raise TlsUnavailable(f"no validation_context secret {name!r} yet")
            validation = validation.merged(dynamic) if validation is not None else dynamic
        return certificate, validation

    def current(self) -> tuple[ssl.SSLContext, PeerVerifier]:
        """The SSLContext for a new connection and the verifier for its peer (keep the pair:
        a secret may change while the handshake runs). Raises ``TlsUnavailable``."""
        certificate, validation = self._resolve()
        key = (certificate, validation)
        context, verifier = self._context, self._verifier
        if key != self._key or context is None or verifier is None:
            if validation is not None and validation.san_matchers and not validation.trusted_ca:
                raise TlsUnavailable(
                    "SAN matchers without trusted_ca verify nothing (Envoy refuses this too)"
                )
            from ubimesh.proxy.tls import context as contexts
            from ubimesh.proxy.tls.verify import PeerVerifier, local_uri_sans

            try:
                context = contexts.build(self.spec, certificate, validation)
                local = local_uri_sans(certificate.certificate_chain) if certificate else ()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise TlsUnavailable(f"cannot build the TLS context: {exc}") from exc
            verifier = PeerVerifier(validation, peer_is_server=not self.spec.server, local=local)
            self._key, self._context, self._verifier = key, context, verifier
        return context, verifier

    def ssl_context(self) -> ssl.SSLContext:
        """The SSLContext for a new connection. Raises ``TlsUnavailable``."""
        return self.current()[0]

    def verify(self, sslobj: Any) -> PeerInfo:
        """Check the peer of a completed handshake made with this endpoint's context. Raises
        ``verify.PeerRejected`` (or ``TlsUnavailable`` if the context cannot be built)."""
        verifier = self._verifier
        if verifier is None:
            verifier = self.current()[1]
        return verifier.verify(sslobj)
