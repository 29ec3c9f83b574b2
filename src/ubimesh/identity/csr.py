"""The workload side: its key and CSR, and the proof of its current key for renewals.

Keys never leave the workload: it makes the key and CSR here, sends only the CSR (and, to
renew, its current chain plus a :func:`sign_proof` made with its current key).
"""

from __future__ import annotations

import base64
import binascii

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from ubimesh.identity.spiffe_id import SpiffeId

__all__ = ["ProofError", "new_key_and_csr", "requested_uris", "sign_proof", "verify_proof"]


class ProofError(ValueError):
    """The renewal proof does not verify with the presented certificate's key."""


def new_key_and_csr(spiffe_id: SpiffeId) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 key and a CSR for ``spiffe_id``: ``(key PEM, CSR PEM)``.

    The CSR carries the ID as its one URI SAN (the CA writes its own SAN anyway, but refuses
    a CSR that asks for an ID other than the one it is signing for).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


def _csr_der(csr_pem: bytes) -> bytes:
    try:
        return x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise ProofError(f"csr: not a PEM certificate signing request ({exc})") from None


def sign_proof(key_pem: bytes, csr_pem: bytes) -> str:
    """Base64 (standard) signature of the CSR's DER by the current key (ECDSA/RSA: SHA-256,
    RSA with PKCS#1 v1.5; Ed25519 as is): the ``proof`` of a renewal request."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    data = _csr_der(csr_pem)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        sig = key.sign(data)
    else:
        raise ProofError(f"key: {type(key).__name__} keys cannot make a renewal proof; "
                         "expected ECDSA, RSA or Ed25519")
    return base64.b64encode(sig).decode()


def verify_proof(cert: x509.Certificate, csr_pem: bytes, proof: str) -> None:
    """Check ``proof`` (from :func:`sign_proof`) with ``cert``'s public key; ProofError if not."""
    try:
        sig = base64.b64decode(proof, validate=True)
    except (binascii.Error, ValueError):
        raise ProofError("proof: not base64; expected the base64 signature of the CSR's DER "
                         "made with the current certificate's key") from None
    data = _csr_der(csr_pem)
    public = cert.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey):
            public.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public, rsa.RSAPublicKey):
            public.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(sig, data)
        else:
            raise ProofError(f"chain: {type(public).__name__} keys are not supported")
    except InvalidSignature:
        raise ProofError("proof: the signature does not verify with the current certificate's "
                         "key (sign the CSR's DER with the key of the chain you present)") from None


def requested_uris(csr_pem: bytes) -> list[str]:
    """The URI SANs a CSR asks for (ValueError naming the problem for a bad CSR)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise ValueError(f"csr: not a PEM certificate signing request ({exc})") from None
    if not csr.is_signature_valid:
        raise ValueError("csr: its signature does not verify (corrupted, or not signed by the "
                         "key it carries)")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))
