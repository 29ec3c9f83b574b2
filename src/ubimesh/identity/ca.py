"""The mesh's certificate authority: a root, an intermediate that signs leaf SVIDs, a bundle.

Files in the CA directory (``<data dir>/ca``), keys mode 0600, every file written atomically:

- ``ca.json``: ``{"trust_domain", "mode": generated|imported-root|imported-intermediate,
  "rotating": bool}``
- ``root.pem`` (+ ``root.key`` when the CA holds the root's key): the current root
- ``intermediate.pem`` + ``intermediate.key``: the signing certificate and key
- ``chain.pem``: what follows a leaf in every issued chain (the intermediate, plus the
  imported intermediates above it)
- ``bundle.pem``: every trusted root (two during a root rotation)

Signing (:meth:`CertificateAuthority.sign`) keeps the loaded key, issuer name and
AuthorityKeyIdentifier in memory, so one CSR costs a parse, a signature check and a signature.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ubimesh.identity.files import write_atomic
from ubimesh.identity.spiffe_id import SpiffeId, SpiffeIdError, validate_trust_domain
from ubimesh.identity.svid import certificate_pem, load_certificates

__all__ = ["CaError", "CertificateAuthority"]

DEFAULT_ROOT_TTL = dt.timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL = dt.timedelta(days=30)
DEFAULT_LEAF_TTL = dt.timedelta(hours=24)
#: The shortest leaf lifetime granted (short lifetimes are for tests of renewal and rotation).
MIN_LEAF_TTL = dt.timedelta(seconds=10)
MAX_LEAF_TTL = dt.timedelta(days=90)
#: notBefore is backdated this much for clock skew between machines.
BACKDATE = dt.timedelta(minutes=1)

CA_FILE = "ca.json"
ROOT_CERT, ROOT_KEY = "root.pem", "root.key"
INT_CERT, INT_KEY = "intermediate.pem", "intermediate.key"
CHAIN_FILE, BUNDLE_FILE = "chain.pem", "bundle.pem"
PREVIOUS_ROOTS = "previous-roots.pem"

GENERATED = "generated"
IMPORTED_ROOT = "imported-root"
IMPORTED_INTERMEDIATE = "imported-intermediate"

_CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
    encipher_only=False, decipher_only=False,
)
_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True, content_commitment=False, key_encipherment=False,
    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
    encipher_only=False, decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH])
_LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)


class CaError(ValueError):
    """A CA operation failed (bad input, bad files); the message names the cause and fix."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _ca_cert(
    trust_domain: str,
    common_name: str,
    key: CertificateIssuerPrivateKeyTypes,
    issuer: x509.Certificate | None,
    issuer_key: CertificateIssuerPrivateKeyTypes,
    ttl: dt.timedelta,
    path_length: int | None,
) -> x509.Certificate:
    now = _now()
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ubimesh"),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])
    public = key.public_key()
    not_after = now + ttl
    if issuer is not None:
        not_after = min(not_after, issuer.not_valid_after_utc)  # never outlive the issuer
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, Exception):
        return False
    return True


def _cert_info(cert: x509.Certificate) -> dict[str, Any]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "spiffe_id": next((u for u in uris if u.startswith("spiffe://")), ""),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
    }


def _load_key(data: bytes, what: str) -> CertificateIssuerPrivateKeyTypes:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(f"{what}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
                      | ed25519.Ed25519PrivateKey):
        raise CaError(f"{what}: {type(key).__name__} keys cannot sign certificates here; "
                      "expected ECDSA, RSA or Ed25519")
    return key


def _same_public_key(key: CertificateIssuerPrivateKeyTypes, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


class CertificateAuthority:
    """A loaded CA. Build with :meth:`init`, :meth:`import_` or :meth:`load`."""

    def __init__(
        self,
        directory: Path,
        trust_domain: str,
        mode: str,
        signing_cert: x509.Certificate,
        signing_key: CertificateIssuerPrivateKeyTypes,
        chain: Sequence[x509.Certificate],
        root: x509.Certificate,
        root_key: CertificateIssuerPrivateKeyTypes | None,
        roots: Sequence[x509.Certificate],
        rotating: bool = False,
    ) -> None:
        self.directory = directory
        self.trust_domain = trust_domain
        self.mode = mode
        self.signing_cert = signing_cert
        self.signing_key = signing_key
        self.chain = list(chain)
        self.root = root
        self.root_key = root_key
        self.roots = list(roots)
        self.rotating = rotating
        self._prepare()

    def _prepare(self) -> None:
        """Cache what every signature reuses."""
        self._issuer_name = self.signing_cert.subject
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
            self.signing_key.public_key()
        )
        self._chain_pem = certificate_pem(*self.chain)
        self._bundle_pem = certificate_pem(*self.roots)
        self._not_after_limit = self.signing_cert.not_valid_after_utc
        self._hash = None if isinstance(self.signing_key, ed25519.Ed25519PrivateKey) else (
            hashes.SHA256()
        )

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path | str,
        trust_domain: str,
        *,
        root_ttl: dt.timedelta = DEFAULT_ROOT_TTL,
        intermediate_ttl: dt.timedelta = DEFAULT_INTERMEDIATE_TTL,
    ) -> CertificateAuthority:
        """Make a self-signed root and an intermediate under it (ECDSA P-256) in
        ``directory``; refuses to overwrite an existing CA."""
        directory = Path(directory)
        _check_trust_domain(trust_domain)
        if (directory / CA_FILE).exists():
            raise CaError(f"{directory}: a CA already exists here; use it (CertificateAuthority."
                          "load / `ubimesh ca status`) or choose another --data-dir")
        root_key = _new_key()
        root = _ca_cert(trust_domain, f"ubimesh root {trust_domain}", root_key, None, root_key,
                        root_ttl, None)
        int_key = _new_key()
        intermediate = _ca_cert(trust_domain, f"ubimesh intermediate {trust_domain}", int_key,
                                root, root_key, intermediate_ttl, 0)
        ca = cls(directory, trust_domain, GENERATED, intermediate, int_key, [intermediate], root,
                 root_key, [root])
        ca._save()
        return ca

    @classmethod
    def import_(
        cls,
        directory: Path | str,
        trust_domain: str,
        cert_pem: bytes,
        key_pem: bytes,
        chain_pem: bytes = b"",
        *,
        intermediate_ttl: dt.timedelta = DEFAULT_INTERMEDIATE_TTL,
    ) -> CertificateAuthority:
        """Use the operator's own CA: a root (a new intermediate is made under it) or an
        intermediate with ``chain_pem`` (the certificates above it, ending with the root).

        Refuses a certificate that is not a CA, cannot sign certificates, is expired, whose
        key does not match, whose SPIFFE ID is another trust domain's, or a chain that does
        not link up to a self-signed root.
        """
        directory = Path(directory)
        _check_trust_domain(trust_domain)
        if (directory / CA_FILE).exists():
            raise CaError(f"{directory}: a CA already exists here; import into an empty "
                          "--data-dir")
        certs = load_certificates(cert_pem, "--cert")
        if len(certs) != 1:
            raise CaError(f"--cert: {len(certs)} certificates; expected exactly one (put the "
                          "certificates above it in --chain)")
        cert = certs[0]
        key = _load_key(key_pem, "--key")
        _check_ca_cert(cert, "--cert", trust_domain)
        if not _same_public_key(key, cert):
            raise CaError("--key: does not match --cert's public key; give the key of this "
                          "certificate")
        above = load_certificates(chain_pem, "--chain") if chain_pem.strip() else []
        if _self_signed(cert):
            if above:
                raise CaError("--chain: --cert is a self-signed root; nothing goes above it")
            int_key = _new_key()
            intermediate = _ca_cert(trust_domain, f"ubimesh intermediate {trust_domain}",
                                    int_key, cert, key, intermediate_ttl, 0)
            ca = cls(directory, trust_domain, IMPORTED_ROOT, intermediate, int_key,
                     [intermediate], cert, key, [cert])
        else:
            if not above or not _self_signed(above[-1]):
                raise CaError("--chain: --cert is an intermediate; give the certificates above "
                              "it in --chain, ending with the self-signed root")
            links = [cert, *above]
            for i, (child, parent) in enumerate(itertools.pairwise(links)):
                _check_ca_cert(parent, f"--chain certificate {i + 1}", trust_domain)
                try:
                    child.verify_directly_issued_by(parent)
                except (ValueError, TypeError, Exception) as exc:
                    raise CaError(f"--chain: certificate {i + 1} did not sign the one below it "
                                  f"({exc}); order the chain from --cert's issuer up to the "
                                  "root") from None
            root = above[-1]
            ca = cls(directory, trust_domain, IMPORTED_INTERMEDIATE, cert, key, links[:-1], root,
                     None, [root])
        ca._save()
        return ca

    @classmethod
    def load(cls, directory: Path | str) -> CertificateAuthority:
        """The CA kept in ``directory``; CaError when missing or broken."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / CA_FILE).read_text())
            trust_domain = str(meta["trust_domain"])
            mode = str(meta["mode"])
            signing = load_certificates((directory / INT_CERT).read_bytes(), str(INT_CERT))[0]
            signing_key = _load_key((directory / INT_KEY).read_bytes(), str(INT_KEY))
            chain = load_certificates((directory / CHAIN_FILE).read_bytes(), CHAIN_FILE)
            root = load_certificates((directory / ROOT_CERT).read_bytes(), ROOT_CERT)[0]
            root_key_path = directory / ROOT_KEY
            root_key = (_load_key(root_key_path.read_bytes(), ROOT_KEY)
                        if root_key_path.exists() else None)
            roots = load_certificates((directory / BUNDLE_FILE).read_bytes(), BUNDLE_FILE)
        except FileNotFoundError as exc:
            raise CaError(f"{directory}: no CA here ({exc.filename} is missing); create one "
                          "with `ubimesh ca init` or `ubimesh ca import`") from None
        except (KeyError, ValueError, OSError) as exc:
            raise CaError(f"{directory}: the CA files are unreadable: {exc}") from None
        return cls(directory, trust_domain, mode, signing, signing_key, chain, root, root_key,
                   roots, bool(meta.get("rotating", False)))

    @classmethod
    def open_or_init(cls, directory: Path | str, trust_domain: str) -> tuple[
        CertificateAuthority, bool
    ]:
        """:meth:`load` when ``directory`` holds a CA, else :meth:`init`; and whether it was
        just created. Processes sharing ``directory`` (control-plane replicas starting
        together) serialize on a lock file in it, so exactly one of them creates the CA."""
        d = Path(directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(d / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if (d / CA_FILE).exists():
                return cls.load(directory), False
            return cls.init(directory, trust_domain), True

    def _save(self) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        write_atomic(d / INT_KEY, _key_pem(self.signing_key), 0o600)
        if self.root_key is not None:
            write_atomic(d / ROOT_KEY, _key_pem(self.root_key), 0o600)
        write_atomic(d / INT_CERT, certificate_pem(self.signing_cert))
        write_atomic(d / CHAIN_FILE, certificate_pem(*self.chain))
        write_atomic(d / ROOT_CERT, certificate_pem(self.root))
        write_atomic(d / BUNDLE_FILE, certificate_pem(*self.roots))
        meta = {"trust_domain": self.trust_domain, "mode": self.mode, "rotating": self.rotating}
        write_atomic(d / CA_FILE, json.dumps(meta, indent=2).encode() + b"\n")
        self._prepare()

    # -- signing --------------------------------------------------------------------------

    def sign(self, csr_pem: bytes, spiffe_id: SpiffeId,
             ttl: dt.timedelta = DEFAULT_LEAF_TTL) -> bytes:
        """A leaf SVID for ``spiffe_id`` with the CSR's public key: leaf + chain PEM.

        The CSR's own SANs and subject are ignored (the CA writes the one URI SAN and an
        empty subject, so the SAN is critical). The leaf never outlives the intermediate.
        Raises CaError for a bad CSR (signature, key type) or an ID this CA cannot issue.
        """
        if spiffe_id.trust_domain != self.trust_domain:
            raise CaError(f"{spiffe_id}: this CA issues for trust domain "
                          f"{self.trust_domain!r} only")
        if not spiffe_id.is_workload:
            raise CaError(f"{spiffe_id}: a leaf SVID needs a non-root path")
        if not MIN_LEAF_TTL <= ttl <= MAX_LEAF_TTL:
            raise CaError(f"ttl: {ttl} is outside {MIN_LEAF_TTL} .. {MAX_LEAF_TTL}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CaError(f"csr: not a PEM certificate signing request ({exc})") from None
        if not csr.is_signature_valid:
            raise CaError("csr: its signature does not verify (corrupted, or not signed by the "
                          "key it carries)")
        public = csr.public_key()
        if isinstance(public, ec.EllipticCurvePublicKey):
            if public.curve.name not in ("secp256r1", "secp384r1"):
                raise CaError(f"csr: curve {public.curve.name} is not accepted; use P-256")
        elif isinstance(public, rsa.RSAPublicKey):
            if public.key_size < 2048:
                raise CaError(f"csr: a {public.key_size}-bit RSA key is too small; use P-256")
        elif not isinstance(public, ed25519.Ed25519PublicKey):
            raise CaError(f"csr: {type(public).__name__} keys are not accepted; use ECDSA P-256")
        now = _now()
        not_after = min(now + ttl, self._not_after_limit)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._issuer_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(_LEAF_BC, critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
                critical=True,  # the subject is empty (RFC 5280 4.1.2.6)
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(self._aki, critical=False)
            .sign(self.signing_key, self._hash)
        )
        return cert.public_bytes(serialization.Encoding.PEM) + self._chain_pem

    # -- bundle, status, rotation ---------------------------------------------------------

    def bundle_pem(self) -> bytes:
        """Every trusted root, PEM (two during a root rotation)."""
        return self._bundle_pem

    def bundles(self) -> dict[str, list[x509.Certificate]]:
        """``{trust domain: roots}`` for :func:`ubimesh.identity.verify_svid`."""
        return {self.trust_domain: list(self.roots)}

    def status(self) -> dict[str, Any]:
        """Roots and intermediates: subject, SPIFFE ID, serial, validity."""
        return {
            "trust_domain": self.trust_domain,
            "mode": self.mode,
            "rotating": self.rotating,
            "roots": [{**_cert_info(c), "current": c == self.root} for c in self.roots],
            "intermediates": [_cert_info(c) for c in self.chain],
        }

    def begin_root_rotation(
        self,
        *,
        root_ttl: dt.timedelta = DEFAULT_ROOT_TTL,
        intermediate_ttl: dt.timedelta = DEFAULT_INTERMEDIATE_TTL,
    ) -> None:
        """Make a new root and a new intermediate under it. The bundle then holds both the
        old and the new roots (leaves of either verify); new leaves come from the new
        intermediate. Workloads must get the new bundle before :meth:`finish_root_rotation`.
        """
        if self.mode == IMPORTED_INTERMEDIATE:
            raise CaError("root rotation: this CA signs with an imported intermediate and "
                          "holds no root; import the new CA instead")
        if self.rotating:
            raise CaError("root rotation: already under way; finish it first")
        root_key = _new_key()
        root = _ca_cert(self.trust_domain, f"ubimesh root {self.trust_domain}", root_key, None,
                        root_key, root_ttl, None)
        int_key = _new_key()
        intermediate = _ca_cert(self.trust_domain, f"ubimesh intermediate {self.trust_domain}",
                                int_key, root, root_key, intermediate_ttl, 0)
        write_atomic(self.directory / PREVIOUS_ROOTS, certificate_pem(*self.roots))
        self.roots = [root, *self.roots]
        self.root, self.root_key = root, root_key
        self.signing_cert, self.signing_key, self.chain = intermediate, int_key, [intermediate]
        self.mode = GENERATED
        self.rotating = True
        self._save()

    def finish_root_rotation(self) -> None:
        """Drop every root but the current one from the bundle (old-root leaves then fail)."""
        if not self.rotating:
            raise CaError("root rotation: none under way; begin_root_rotation() first")
        self.roots = [self.root]
        self.rotating = False
        self._save()
        (self.directory / PREVIOUS_ROOTS).unlink(missing_ok=True)

    def renew_intermediate(self, *, ttl: dt.timedelta = DEFAULT_INTERMEDIATE_TTL) -> None:
        """A new intermediate under the current root (needs the root's key)."""
        if self.root_key is None:
            raise CaError("renew intermediate: this CA does not hold the root's key; import a "
                          "new intermediate instead")
        key = _new_key()
        cert = _ca_cert(self.trust_domain, f"ubimesh intermediate {self.trust_domain}", key,
                        self.root, self.root_key, ttl, 0)
        self.signing_cert, self.signing_key, self.chain = cert, key, [cert]
        self._save()

    def renew_intermediate_if_due(self, now: dt.datetime | None = None) -> bool:
        """Renew the intermediate past half its lifetime, when the root's key is held."""
        now = now or _now()
        cert = self.signing_cert
        half = cert.not_valid_before_utc + (cert.not_valid_after_utc
                                            - cert.not_valid_before_utc) / 2
        if self.root_key is None or now < half:
            return False
        self.renew_intermediate()
        return True


def _check_trust_domain(trust_domain: str) -> None:
    try:
        validate_trust_domain(trust_domain)
    except SpiffeIdError as exc:
        raise CaError(f"trust domain {trust_domain!r}: {exc.reason}") from None


def _check_ca_cert(cert: x509.Certificate, what: str, trust_domain: str) -> None:
    subject = cert.subject.rfc4514_string() or "(empty subject)"
    if not _is_ca(cert):
        raise CaError(f"{what} ({subject}): not a CA certificate (basicConstraints CA:false or "
                      "absent); expected a root or intermediate CA")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CaError(f"{what} ({subject}): its keyUsage lacks keyCertSign; it cannot sign "
                          "certificates")
    except x509.ExtensionNotFound:
        pass
    if cert.not_valid_after_utc <= _now():
        raise CaError(f"{what} ({subject}): expired at {cert.not_valid_after_utc.isoformat()}")
    info = _cert_info(cert)
    if info["spiffe_id"] and info["spiffe_id"] != f"spiffe://{trust_domain}":
        raise CaError(f"{what} ({subject}): its SPIFFE ID is {info['spiffe_id']}; this CA is for "
                      f"trust domain {trust_domain!r} (pass --trust-domain to match)")
