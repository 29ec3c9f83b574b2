"""``ssl.SSLContext``s from TLS snapshot types (imported only when a TLS context exists).

Python's ``ssl`` loads a certificate chain and key from files only; the PEM held in the
snapshot is handed to it through an anonymous in-memory file (``memfd``), so a key never
touches a disk. The translator calls ``load_certificate``/``load_roots`` too, so that a bad
PEM or a key that does not match its certificate is refused with its field path at load time.
"""

from __future__ import annotations

import os
import ssl
import tempfile

from ubimesh.proxy.snapshot.types import (
    CertificateValidation,
    TlsCertificate,
    TlsContext,
    TlsVersion,
)

_VERSIONS = {
    TlsVersion.TLSv1_2: ssl.TLSVersion.TLSv1_2,
    TlsVersion.TLSv1_3: ssl.TLSVersion.TLSv1_3,
}


def load_certificate(context: ssl.SSLContext, certificate: TlsCertificate) -> None:
    """Load a PEM chain and key into ``context``. Raises ``ssl.SSLError`` (or ``OSError``)."""
    data = certificate.certificate_chain.rstrip(b"\n") + b"\n" + certificate.private_key
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("ubimesh-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    # Without memfd (not Linux): a private temporary file, removed at once.
    with tempfile.NamedTemporaryFile(prefix="ubimesh-tls-") as f:  # pragma: no cover
        f.write(data)
        f.flush()
        context.load_cert_chain(f.name)


def load_roots(context: ssl.SSLContext, pem: bytes) -> None:
    """Trust the PEM certificates of ``pem``. Raises ``ssl.SSLError``."""
    context.load_verify_locations(cadata=pem.decode("ascii", "replace"))


def build(
    spec: TlsContext,
    certificate: TlsCertificate | None,
    validation: CertificateValidation | None,
) -> ssl.SSLContext:
    """An SSLContext for ``spec`` with its resolved certificate and validation context.

    Server: asks for a client certificate when there is a validation context and requires one
    with ``require_client_certificate``. Client: verifies the server against ``trusted_ca``
    when given (no validation context: the server is not verified, as in Envoy). Host names
    are never checked; SAN matchers do that job (``verify.PeerVerifier``)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if spec.server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = _VERSIONS[spec.min_version]
    context.maximum_version = _VERSIONS[spec.max_version]
    if not spec.server:
        context.check_hostname = False
    if validation is not None and validation.trusted_ca:
        load_roots(context, validation.trusted_ca)
        if spec.server and not spec.require_client_certificate:
            context.verify_mode = ssl.CERT_OPTIONAL
        else:
            context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    if certificate is not None:
        load_certificate(context, certificate)
    if spec.alpn_protocols:
        context.set_alpn_protocols(list(spec.alpn_protocols))
    return context


def check_certificate(certificate: TlsCertificate) -> str | None:
    """Why ``certificate`` cannot be loaded (bad PEM, key not matching), or None."""
    try:
        load_certificate(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), certificate)
    except (ssl.SSLError, OSError, ValueError) as exc:
        return _reason(exc)
    return None


def check_roots(pem: bytes) -> str | None:
    """Why ``pem`` cannot serve as trusted roots, or None."""
    try:
        load_roots(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), pem)
    except (ssl.SSLError, OSError, ValueError) as exc:
        return _reason(exc)
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason} ({exc.library or 'ssl'})"
    return str(exc) or type(exc).__name__
