"""X.509-SVID verification (specs.md 2.3) and certificate helpers.

:func:`verify_svid` does the SPIFFE leaf checks itself, then RFC 5280 path building and
validation with ``cryptography.x509.verification`` against the bundle of the leaf's own trust
domain only (never the union: one domain's CA must not mint another's IDs). That verifier
accepts SPIFFE leaves (empty subject, critical URI SAN) as they are, so no hand-written chain
walk is needed; its client profile also refuses a leaf whose EKU lacks clientAuth.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from ubimesh.identity.spiffe_id import SpiffeId, SpiffeIdError

__all__ = [
    "SvidError",
    "TrustBundles",
    "certificate_pem",
    "leaf_spiffe_id",
    "load_certificates",
    "verify_svid",
]

TrustBundles = Mapping[str, Sequence[x509.Certificate]]

#: Longest chain accepted from a peer (leaf + intermediates), to bound path building.
MAX_CHAIN = 8


class SvidError(ValueError):
    """The certificate chain is not an acceptable X.509-SVID; the message says why."""


def load_certificates(data: bytes | str | Sequence[bytes], what: str = "certificate") -> list[
    x509.Certificate
]:
    """Certificates from PEM (one or several, concatenated), one DER blob or a list of DER."""
    try:
        if isinstance(data, str):
            data = data.encode()
        if isinstance(data, bytes):
            if b"-----BEGIN" in data:
                return x509.load_pem_x509_certificates(data)
            if not data:
                raise SvidError(f"{what}: empty; expected PEM or DER certificates")
            return [x509.load_der_x509_certificate(data)]
        return [x509.load_der_x509_certificate(bytes(d)) for d in data]
    except ValueError as exc:
        if isinstance(exc, SvidError):
            raise
        raise SvidError(f"{what}: not a PEM or DER X.509 certificate ({exc})") from None


def certificate_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _uris(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


def leaf_spiffe_id(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in ``cert``'s single URI SAN (a non-root path); SvidError otherwise."""
    uris = _uris(cert)
    if not uris:
        raise SvidError("the leaf certificate has no URI SAN; an X.509-SVID carries its SPIFFE "
                        "ID in exactly one URI SAN")
    if len(uris) > 1:
        raise SvidError(f"the leaf certificate has {len(uris)} URI SANs ({', '.join(uris)}); "
                        "an X.509-SVID has exactly one")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise SvidError(f"the leaf's URI SAN is not a SPIFFE ID: {exc}") from None
    if not spiffe_id.is_workload:
        raise SvidError(f"the leaf's SPIFFE ID {spiffe_id} has no path; a leaf SVID needs a "
                        "non-root path such as /ns/<namespace>/sa/<account>")
    return spiffe_id


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    spiffe_id = leaf_spiffe_id(leaf)
    try:
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise SvidError(f"{spiffe_id}: the leaf has basicConstraints CA:true; a leaf SVID "
                            "must not be a CA")
    except x509.ExtensionNotFound:
        pass  # absent = CA:false, as go-spiffe
    try:
        ku_ext = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise SvidError(f"{spiffe_id}: the leaf has no keyUsage; an SVID needs it, critical, "
                        "with digitalSignature") from None
    ku = ku_ext.value
    if not ku_ext.critical:
        raise SvidError(f"{spiffe_id}: the leaf's keyUsage is not critical")
    if ku.key_cert_sign or ku.crl_sign:
        raise SvidError(f"{spiffe_id}: the leaf's keyUsage has keyCertSign or cRLSign; a leaf "
                        "SVID must not")
    if not ku.digital_signature:
        raise SvidError(f"{spiffe_id}: the leaf's keyUsage lacks digitalSignature")
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        pass
    else:
        missing = [
            name
            for name, oid in (("serverAuth", ExtendedKeyUsageOID.SERVER_AUTH),
                              ("clientAuth", ExtendedKeyUsageOID.CLIENT_AUTH))
            if oid not in eku
        ]
        if missing:
            raise SvidError(f"{spiffe_id}: the leaf's extendedKeyUsage lacks "
                            f"{' and '.join(missing)}; an SVID with an EKU must have both")
    return spiffe_id


def verify_svid(
    chain_pem_or_der: bytes | str | Sequence[bytes],
    bundles: TrustBundles,
    *,
    now: dt.datetime | None = None,
) -> SpiffeId:
    """Verify an X.509-SVID chain (leaf first, then untrusted intermediates) against the
    roots of the leaf's trust domain in ``bundles`` (trust domain name -> root certificates).

    Returns the leaf's SPIFFE ID; raises SvidError naming the reason. ``now`` (UTC) defaults
    to the current time.
    """
    chain = load_certificates(chain_pem_or_der, "certificate chain")
    if not chain:
        raise SvidError("certificate chain: empty; expected the leaf and its intermediates")
    if len(chain) > MAX_CHAIN:
        raise SvidError(f"certificate chain: {len(chain)} certificates; at most {MAX_CHAIN}")
    leaf = chain[0]
    spiffe_id = _check_leaf(leaf)
    roots = bundles.get(spiffe_id.trust_domain)
    if not roots:
        known = ", ".join(sorted(bundles)) or "none"
        raise SvidError(f"{spiffe_id}: no trust bundle for trust domain "
                        f"{spiffe_id.trust_domain!r} (bundles for: {known})")
    when = now or dt.datetime.now(dt.UTC)
    builder = verification.PolicyBuilder().store(verification.Store(list(roots))).time(when)
    try:
        builder.build_client_verifier().verify(leaf, chain[1:])
    except verification.VerificationError as exc:
        raise SvidError(f"{spiffe_id}: no valid path to a root of trust domain "
                        f"{spiffe_id.trust_domain!r}: {_reason(exc, leaf, when)}") from None
    return spiffe_id


def _reason(exc: Exception, leaf: x509.Certificate, now: dt.datetime) -> str:
    # The verifier's text is precise but terse; name the common cases plainly.
    if leaf.not_valid_after_utc < now:
        return f"the leaf expired at {leaf.not_valid_after_utc.isoformat()}"
    if leaf.not_valid_before_utc > now:
        return f"the leaf is not valid before {leaf.not_valid_before_utc.isoformat()}"
    text = str(exc).removeprefix("validation failed: ")
    if "candidates exhausted" in text and "no interior errors" in text:
        return ("it was not signed by a trusted CA of that domain, or an intermediate is "
                "missing from the chain")
    return text
