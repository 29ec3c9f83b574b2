"""Peer certificate checks after OpenSSL's: SAN matchers, X.509-SVID rules, trust domain.

OpenSSL has already verified the chain against ``trusted_ca`` (signatures, validity, CA flags,
path length, the EKU for the peer's role) when ``verify_peer`` runs. What it cannot do is done
here with ``cryptography`` (loaded only with TLS), in this order:

1. SAN matchers (Envoy's ``match_typed_subject_alt_names``): some SAN of a matcher's type must
   match one matcher; no matchers accepts any SAN.
2. A leaf with a ``spiffe://`` URI SAN is an X.509-SVID and must follow the SPIFFE rules
   (../shared/docs/specs.md 2.2-2.3): exactly one URI SAN, a valid SPIFFE ID with a non-root
   path, CA:false, key usage present and critical with digitalSignature and neither keyCertSign
   nor cRLSign, and the EKU (when present) allowing the peer's role.
3. Trust domain: the root OpenSSL anchored the chain to must belong to the leaf's trust domain
   (a root names its trust domain with a ``spiffe://<td>`` URI SAN), so that one trust domain's
   CA cannot vouch for another's IDs even when both roots are trusted. A root that names no
   trust domain anchors any (a CA imported without a SPIFFE ID).

A failure raises ``PeerRejected`` with the reason; the caller closes the connection before any
byte reaches the other side.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from ubimesh.proxy.snapshot.types import CertificateValidation, SanMatcher, SanType, StringMatchKind
from ubimesh.proxy.tls.peer import NO_PEER_CERTIFICATE, PeerInfo

#: Leaves remembered (by DER digest) with what their parsing found; bounded.
_CACHE_SIZE = 1024

# specs.md 2.1: trust domain [a-z0-9._-]+, path segments [a-zA-Z0-9._-]+ (no . or ..).
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")


class PeerRejected(Exception):
    """The peer's certificate is not acceptable; ``str()`` says why."""


def spiffe_id_problem(uri: str, *, leaf: bool) -> str | None:
    """Why ``uri`` is not a valid SPIFFE ID (for a leaf: with a non-root path), or None."""
    if not uri.startswith("spiffe://"):
        return "the scheme is not spiffe"
    if len(uri) > 2048:
        return "longer than 2048 bytes"
    rest = uri[len("spiffe://") :]
    td, slash, path = rest.partition("/")
    if not td:
        return "the trust domain is missing"
    if not _TRUST_DOMAIN.fullmatch(td):
        return (
            "trust domain characters are limited to lowercase letters, numbers, dots, dashes, "
            "and underscores"
        )
    if not slash:
        return "a leaf SVID needs a path (the ID has none)" if leaf else None
    for segment in path.split("/"):
        if not segment:
            return "path cannot contain empty segments or a trailing slash"
        if segment in (".", ".."):
            return "path cannot contain dot segments"
        if not _SEGMENT.fullmatch(segment):
            return (
                "path segment characters are limited to letters, numbers, dots, dashes, and "
                "underscores"
            )
    return None


def trust_domain_of(spiffe_id: str) -> str:
    return spiffe_id[len("spiffe://") :].partition("/")[0]


def _sans(cert: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), ()
    uris = tuple(ext.get_values_for_type(x509.UniformResourceIdentifier))
    dns = tuple(ext.get_values_for_type(x509.DNSName))
    return uris, dns


def roots_by_trust_domain(pem: bytes) -> dict[bytes, str]:
    """The roots of a PEM bundle: DER -> the trust domain they name ("" for none)."""
    out: dict[bytes, str] = {}
    for cert in x509.load_pem_x509_certificates(pem):
        from cryptography.hazmat.primitives.serialization import Encoding

        uris, _ = _sans(cert)
        domains = [trust_domain_of(u) for u in uris if u.startswith("spiffe://")]
        out[cert.public_bytes(Encoding.DER)] = domains[0] if len(domains) == 1 else ""
    return out


def local_uri_sans(chain_pem: bytes) -> tuple[str, ...]:
    """The URI SANs of a PEM chain's leaf (XFCC's ``By``)."""
    certs = x509.load_pem_x509_certificates(chain_pem)
    return _sans(certs[0])[0] if certs else ()


class _Leaf:
    """What the checks need from one leaf, computed once per distinct certificate."""

    __slots__ = ("dns", "problem", "sha256", "spiffe_id", "subject", "uris")

    def __init__(self, der: bytes, *, peer_is_server: bool) -> None:
        cert = x509.load_der_x509_certificate(der)
        self.sha256 = hashlib.sha256(der).hexdigest()
        self.uris, self.dns = _sans(cert)
        self.subject = cert.subject.rfc4514_string()
        self.spiffe_id = ""
        self.problem = ""
        if any(u.startswith("spiffe://") for u in self.uris):
            problem = _svid_problem(cert, self.uris, peer_is_server=peer_is_server)
            if problem:
                self.problem = problem
            else:
                self.spiffe_id = self.uris[0]


def _svid_problem(
    cert: x509.Certificate, uris: tuple[str, ...], *, peer_is_server: bool
) -> str | None:
    if len(uris) != 1:
        return f"an X.509-SVID has exactly one URI SAN, this one has {len(uris)}"
    problem = spiffe_id_problem(uris[0], leaf=True)
    if problem:
        return f"invalid SPIFFE ID {uris[0]!r}: {problem}"
    ext = cert.extensions
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "a leaf SVID must have CA:false"
    except x509.ExtensionNotFound:
        pass
    try:
        ku_ext = ext.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        return "a leaf SVID needs the key usage extension"
    ku = ku_ext.value
    if not ku_ext.critical:
        return "a leaf SVID's key usage must be critical"
    if not ku.digital_signature:
        return "a leaf SVID's key usage must have digitalSignature"
    if ku.key_cert_sign or ku.crl_sign:
        return "a leaf SVID's key usage must not have keyCertSign or cRLSign"
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    wanted = ExtendedKeyUsageOID.SERVER_AUTH if peer_is_server else ExtendedKeyUsageOID.CLIENT_AUTH
    if wanted not in eku:
        role = "serverAuth" if peer_is_server else "clientAuth"
        return f"the extended key usage does not allow {role}"
    return None


def _matches(matcher: SanMatcher, uris: Iterable[str], dns: Iterable[str]) -> bool:
    values = uris if matcher.san_type is SanType.URI else dns
    m = matcher.matcher
    if m.kind is StringMatchKind.EXACT:
        return any(v == m.value for v in values)
    return any(v.startswith(m.value) for v in values)


class PeerVerifier:
    """The checks of one validation context, for peers in one role (``peer_is_server``)."""

    def __init__(
        self,
        validation: CertificateValidation | None,
        *,
        peer_is_server: bool,
        local: tuple[str, ...],
    ) -> None:
        self.matchers = validation.san_matchers if validation is not None else ()
        self.peer_is_server = peer_is_server
        self.local = local
        self.roots: Mapping[bytes, str] = (
            roots_by_trust_domain(validation.trusted_ca)
            if validation is not None and validation.trusted_ca
            else {}
        )
        self.verifying = validation is not None and bool(validation.trusted_ca)
        self._leaves: dict[bytes, _Leaf] = {}

    def verify(self, sslobj: Any) -> PeerInfo:
        """Check the peer of a completed handshake (``sslobj``: ``ssl.SSLObject``)."""
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            return NO_PEER_CERTIFICATE
        leaf = self._leaf(der)
        if not self.verifying:
            # No validation context: the certificate is not verified (Envoy's behaviour);
            # report what it says without vouching for a SPIFFE ID.
            return PeerInfo(True, "", leaf.uris, leaf.dns, leaf.subject, leaf.sha256, self.local)
        if self.matchers and not any(_matches(m, leaf.uris, leaf.dns) for m in self.matchers):
            raise PeerRejected(
                f"no SAN of the peer certificate (URI {list(leaf.uris)}, DNS {list(leaf.dns)}) "
                "matches the validation context's match_typed_subject_alt_names"
            )
        if leaf.problem:
            raise PeerRejected(leaf.problem)
        if leaf.spiffe_id:
            self._check_anchor(sslobj, trust_domain_of(leaf.spiffe_id))
        return PeerInfo(
            True, leaf.spiffe_id, leaf.uris, leaf.dns, leaf.subject, leaf.sha256, self.local
        )

    def _leaf(self, der: bytes) -> _Leaf:
        leaf = self._leaves.get(der)
        if leaf is None:
            leaf = _Leaf(der, peer_is_server=self.peer_is_server)
            if len(self._leaves) >= _CACHE_SIZE:
                self._leaves.pop(next(iter(self._leaves)))
            self._leaves[der] = leaf
        return leaf

    def _check_anchor(self, sslobj: Any, trust_domain: str) -> None:
        anchor = _anchor_der(sslobj)
        if anchor is None:
            return
        owner = self.roots.get(anchor)
        if owner is None:
            raise PeerRejected("the chain does not end at a root of trusted_ca")
        if owner and owner != trust_domain:
            raise PeerRejected(
                f"the peer's ID is in trust domain {trust_domain!r} but its chain ends at the "
                f"root of trust domain {owner!r}"
            )


def _anchor_der(sslobj: Any) -> bytes | None:
    """The DER of the root OpenSSL verified the peer's chain up to, or None when the Python
    build cannot tell (``get_verified_chain`` is private before Python 3.13)."""
    inner = getattr(sslobj, "_sslobj", sslobj)
    get_chain = getattr(inner, "get_verified_chain", None)
    if get_chain is None:
        return None
    chain = get_chain()
    if not chain:
        return None
    import _ssl

    der: bytes = chain[-1].public_bytes(_ssl.ENCODING_DER)
    return der
