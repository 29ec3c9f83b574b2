"""Mint SPIFFE PKIs for tests: a root, an intermediate and leaf X.509-SVIDs, good and bad.

All keys are ECDSA P-256, all outputs PEM bytes. A :class:`Pki` is one trust domain::

    pki = Pki("example.org")
    chain_pem, key_pem = pki.leaf("spiffe://example.org/ns/default/sa/web")
    pki.bundle_pem                      # the root, for a verifier's trust bundle
    pki.write(tmp_path)                 # root.pem, intermediate.pem, bundle.pem on disk

``leaf`` takes overrides that produce every case of the validation matrix (issue 4 item 7);
:func:`bad_leaves` returns them all by name, :func:`good_leaves` the ones a verifier must accept.
The chain returned by ``leaf`` is leaf + intermediate (the way a workload presents it) unless
``include_intermediate=False``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Pki", "bad_leaves", "good_leaves", "key_pem", "new_key"]

_UNSET: object = object()
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _ca_cert(
    *,
    name: str,
    trust_domain: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    path_length: int | None,
    ca: bool = True,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    issuer_name = issuer.subject if issuer is not None else subject
    issuer_public = issuer_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
            False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """One trust domain's CA: ``root`` (self-signed) and ``intermediate`` (signed by the root).

    ``root_key``/``intermediate_key`` are the private keys. ``intermediate_ca=False`` makes a
    broken intermediate (CA:false) for the "intermediate without CA:true" case.
    """

    def __init__(
        self,
        trust_domain: str = "example.org",
        *,
        root_ttl: dt.timedelta = dt.timedelta(days=3650),
        intermediate_ttl: dt.timedelta = dt.timedelta(days=30),
        intermediate_ca: bool = True,
    ) -> None:
        self.trust_domain = trust_domain
        now = _now()
        self.root_key = new_key()
        self.root = _ca_cert(
            name=f"{trust_domain} root",
            trust_domain=trust_domain,
            key=self.root_key,
            issuer=None,
            issuer_key=self.root_key,
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + root_ttl,
            path_length=1,
        )
        self.intermediate_key = new_key()
        self.intermediate = _ca_cert(
            name=f"{trust_domain} intermediate",
            trust_domain=trust_domain,
            key=self.intermediate_key,
            issuer=self.root,
            issuer_key=self.root_key,
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + intermediate_ttl,
            path_length=0,
            ca=intermediate_ca,
        )

    @property
    def root_pem(self) -> bytes:
        return cert_pem(self.root)

    @property
    def intermediate_pem(self) -> bytes:
        return cert_pem(self.intermediate)

    @property
    def bundle_pem(self) -> bytes:
        """The trust bundle: the root only."""
        return cert_pem(self.root)

    def spiffe_id(self, ns: str = "default", sa: str = "web") -> str:
        return f"spiffe://{self.trust_domain}/ns/{ns}/sa/{sa}"

    def leaf(
        self,
        spiffe_id: str | None = None,
        *,
        uris: Sequence[str] | None = None,
        dns: Sequence[str] = (),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        ca: bool = False,
        key_cert_sign: bool = False,
        eku: Sequence[x509.ObjectIdentifier] | None = (SERVER_AUTH, CLIENT_AUTH),
        include_intermediate: bool = True,
        self_signed: bool = False,
        key: ec.EllipticCurvePrivateKey | None = None,
    ) -> tuple[bytes, bytes]:
        """A leaf SVID for ``spiffe_id`` (default ``spiffe://<td>/ns/default/sa/web``).

        Returns ``(chain_pem, key_pem)``. Overrides: ``uris`` replaces the URI SANs entirely
        (``[]`` for none, two for two); ``dns`` adds DNS SANs; ``not_before``/``not_after`` set
        the validity (default now-1 min .. now+1 h); ``ca``/``key_cert_sign`` break the leaf's
        constraints; ``eku=None`` omits the EKU, ``(SERVER_AUTH,)`` makes it server-only;
        ``include_intermediate=False`` drops the intermediate from the chain; ``self_signed``
        signs the leaf with its own key (chain = the leaf alone).
        """
        spiffe_id = spiffe_id if spiffe_id is not None else self.spiffe_id()
        key = key if key is not None else new_key()
        now = _now()
        names: list[x509.GeneralName] = [
            x509.UniformResourceIdentifier(u) for u in (uris if uris is not None else [spiffe_id])
        ]
        names += [x509.DNSName(d) for d in dns]
        if self_signed:
            issuer_name = x509.Name([])
            signer = key
        else:
            issuer_name = self.intermediate.subject
            signer = self.intermediate_key
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=1))
            .not_valid_after(not_after or now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=key_cert_sign,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
        )
        if names:
            # Empty subject: the SAN extension must be critical (RFC 5280 4.1.2.6).
            builder = builder.add_extension(x509.SubjectAlternativeName(names), True)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), False)
        cert = builder.sign(signer, hashes.SHA256())
        chain = [cert]
        if include_intermediate and not self_signed:
            chain.append(self.intermediate)
        return cert_pem(*chain), key_pem(key)

    def write(self, directory: Path | str) -> dict[str, Path]:
        """Write ``root.pem``, ``intermediate.pem``, ``bundle.pem`` and the two keys (0600)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = {
            "root": (d / "root.pem", self.root_pem),
            "intermediate": (d / "intermediate.pem", self.intermediate_pem),
            "bundle": (d / "bundle.pem", self.bundle_pem),
            "root_key": (d / "root.key", key_pem(self.root_key)),
            "intermediate_key": (d / "intermediate.key", key_pem(self.intermediate_key)),
        }
        for path, data in files.values():
            path.write_bytes(data)
            if path.suffix == ".key":
                path.chmod(0o600)
        return {name: path for name, (path, _data) in files.items()}

    def write_leaf(
        self, directory: Path | str, name: str, chain_key: tuple[bytes, bytes]
    ) -> tuple[Path, Path]:
        """Write ``<name>.pem`` (chain) and ``<name>.key`` (0600); returns both paths."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = d / f"{name}.pem", d / f"{name}.key"
        cert_path.write_bytes(chain_key[0])
        key_path.write_bytes(chain_key[1])
        key_path.chmod(0o600)
        return cert_path, key_path


def good_leaves(pki: Pki, spiffe_id: str | None = None) -> dict[str, tuple[bytes, bytes]]:
    """Leaves a SPIFFE verifier trusting ``pki.root`` must accept (for ``spiffe_id``)."""
    sid = spiffe_id or pki.spiffe_id()
    return {
        "plain": pki.leaf(sid),
        "extra DNS SAN": pki.leaf(sid, dns=["web.default.svc"]),
        "no EKU": pki.leaf(sid, eku=None),
    }


def bad_leaves(
    pki: Pki, other: Pki, spiffe_id: str | None = None
) -> dict[str, tuple[bytes, bytes]]:
    """Every case of the validation matrix (issue 4 item 7) for a verifier trusting only
    ``pki.root`` for ``pki.trust_domain`` and ``other.root`` for ``other.trust_domain``, and
    allowing exactly ``spiffe_id`` (default ``spiffe://<td>/ns/default/sa/web``).

    Cases a pure SVID verifier cannot refuse without an authorization policy: "server-only
    EKU" (refused when used as a client certificate) and "prefix-sharing ID" (a valid SVID
    whose ID only starts with the allowed one; refused by an exact SAN matcher).
    """
    sid = spiffe_id or pki.spiffe_id()
    td = pki.trust_domain
    now = _now()
    hour = dt.timedelta(hours=1)
    return {
        "expired": pki.leaf(sid, not_before=now - 3 * hour, not_after=now - hour),
        "not yet valid": pki.leaf(sid, not_before=now + hour, not_after=now + 3 * hour),
        "wrong trust domain": pki.leaf(f"spiffe://{other.trust_domain}/ns/default/sa/web"),
        "other trust domain's CA": other.leaf(sid),
        "two URI SANs": pki.leaf(sid, uris=[sid, f"spiffe://{td}/ns/default/sa/other"]),
        "no URI SAN": pki.leaf(sid, uris=[], dns=["web.default.svc"]),
        "non-spiffe URI": pki.leaf(sid, uris=[f"https://{td}/ns/default/sa/web"]),
        "ID with no path": pki.leaf(f"spiffe://{td}"),
        "SPIFFE ID only in a DNS SAN": pki.leaf(sid, uris=[], dns=[sid]),
        "leaf with CA=true": pki.leaf(sid, ca=True),
        "leaf with keyCertSign": pki.leaf(sid, key_cert_sign=True),
        "server-only EKU": pki.leaf(sid, eku=[SERVER_AUTH]),
        "missing intermediate": pki.leaf(sid, include_intermediate=False),
        "self-signed": pki.leaf(sid, self_signed=True),
        "prefix-sharing ID": pki.leaf(sid + "-admin"),
    }
