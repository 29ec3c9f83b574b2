"""When the first certificate the proxy uses expires: Envoy's
``server.days_until_first_cert_expiring`` gauge (and ubimesh's finer
``server.seconds_until_first_cert_expiring``: mesh leaves live a day, so days say little).

As Envoy, every certificate of every TLS context in use counts: the chains the contexts
present and the roots they trust, inline or by SDS secret (``Snapshot.secrets``). With no
certificate at all the days gauge is Envoy's "none" value, 2^32 - 1.

``cryptography`` is imported only when the snapshot has a TLS context (the idle-RSS budget).
"""

from __future__ import annotations

from collections.abc import Iterator

from ubimesh.proxy.snapshot.types import CertificateValidation, Snapshot, TlsCertificate, TlsContext

__all__ = ["NO_CERTIFICATE_DAYS", "ExpiryTracker", "first_expiry", "tls_contexts"]

#: The days gauge when no certificate is in use (Envoy: the uint32 maximum).
NO_CERTIFICATE_DAYS = 2**32 - 1
#: PEM blobs remembered with their earliest notAfter (beyond: forgotten oldest first).
_CACHE_SIZE = 256


def tls_contexts(snapshot: Snapshot) -> Iterator[TlsContext]:
    """Every TLS context of the snapshot's listeners (filter chains) and clusters."""
    for listener in snapshot.listeners:
        chains = list(listener.filter_chains)
        if listener.default_filter_chain is not None:
            chains.append(listener.default_filter_chain)
        for chain in chains:
            if chain.transport_socket is not None:
                yield chain.transport_socket
    for cluster in snapshot.clusters.values():
        if cluster.transport_socket is not None:
            yield cluster.transport_socket


def _pems(snapshot: Snapshot) -> Iterator[bytes]:
    for spec in tls_contexts(snapshot):
        certificates: list[TlsCertificate] = list(spec.certificates)
        validations: list[CertificateValidation] = (
            [spec.validation] if spec.validation is not None else []
        )
        for name in spec.secret_names:
            secret = snapshot.secrets.get(name)
            if isinstance(secret, TlsCertificate):
                certificates.append(secret)
            elif isinstance(secret, CertificateValidation):
                validations.append(secret)
        for certificate in certificates:
            yield certificate.certificate_chain
        for validation in validations:
            if validation.trusted_ca:
                yield validation.trusted_ca


class ExpiryTracker:
    """:meth:`first_expiry` with the parsing of each distinct PEM blob done once."""

    def __init__(self) -> None:
        self._parsed: dict[bytes, float | None] = {}

    def first_expiry(self, snapshot: Snapshot) -> float | None:
        """The earliest notAfter (epoch seconds) of the certificates in use, or None."""
        soonest: float | None = None
        for pem in _pems(snapshot):
            when = self._parsed.get(pem, -1.0)
            if when == -1.0:
                when = self._parsed[pem] = _earliest(pem)
                if len(self._parsed) > _CACHE_SIZE:
                    self._parsed.pop(next(iter(self._parsed)))
            if when is not None and (soonest is None or when < soonest):
                soonest = when
        return soonest


def _earliest(pem: bytes) -> float | None:
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        return None  # refused at load time already; nothing to report here
    return min((c.not_valid_after_utc.timestamp() for c in certs), default=None)


def first_expiry(snapshot: Snapshot) -> float | None:
    """The earliest notAfter (epoch seconds) of the certificates ``snapshot`` uses, or None."""
    return ExpiryTracker().first_expiry(snapshot)
