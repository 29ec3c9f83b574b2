"""The CA: files, the fields of every issued leaf (specs.md 2.2), import, root rotation."""

from __future__ import annotations

import base64
import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from tests.support.pki import Pki, key_pem

from ubimesh.identity import (
    CaError,
    CertificateAuthority,
    SpiffeId,
    SvidError,
    new_key_and_csr,
    sign_proof,
    verify_proof,
    verify_svid,
)

TD = "example.org"
WEB = SpiffeId.parse(f"spiffe://{TD}/ns/default/sa/web")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path_factory.mktemp("ca") / "ca", TD)


def _issue(ca: CertificateAuthority, sid: SpiffeId = WEB, **kw: dt.timedelta) -> list[
    x509.Certificate
]:
    _key, csr = new_key_and_csr(sid)
    return x509.load_pem_x509_certificates(ca.sign(csr, sid, **kw))


def test_init_writes_the_files_keys_private(ca: CertificateAuthority) -> None:
    d = ca.directory
    for name in ("ca.json", "root.pem", "intermediate.pem", "chain.pem", "bundle.pem"):
        assert (d / name).is_file(), name
    for name in ("root.key", "intermediate.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    assert not list(d.glob(".*.tmp"))
    with pytest.raises(CaError, match="already exists"):
        CertificateAuthority.init(d, TD)
    again = CertificateAuthority.load(d)
    assert again.bundle_pem() == ca.bundle_pem()
    assert again.signing_cert == ca.signing_cert


def test_root_and_intermediate_are_p256_cas(ca: CertificateAuthority) -> None:
    for cert, pathlen in ((ca.root, None), (ca.signing_cert, 0)):
        key = cert.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == pathlen
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    ca.signing_cert.verify_directly_issued_by(ca.root)
    assert ca.root.not_valid_after_utc - ca.root.not_valid_before_utc > dt.timedelta(days=3000)


def test_an_issued_leaf_meets_every_svid_requirement(ca: CertificateAuthority) -> None:
    before = dt.datetime.now(dt.UTC)
    leaf, intermediate = _issue(ca)
    assert intermediate == ca.signing_cert
    ext = leaf.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # the subject is empty
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert len(list(san.value)) == 1
    assert leaf.subject == x509.Name([])
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(leaf.public_key())  # type: ignore[arg-type]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.signing_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier).value.digest
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    assert before - dt.timedelta(minutes=1, seconds=5) <= nb <= before - dt.timedelta(seconds=55)
    assert abs((na - nb) - dt.timedelta(hours=24, minutes=1)) < dt.timedelta(seconds=5)
    leaf.verify_directly_issued_by(ca.signing_cert)
    assert verify_svid(ca.sign(new_key_and_csr(WEB)[1], WEB), ca.bundles()) == WEB


def test_the_csrs_own_sans_are_ignored_and_ttl_is_bounded(ca: CertificateAuthority) -> None:
    other = SpiffeId.parse(f"spiffe://{TD}/ns/kube-system/sa/admin")
    _key, csr = new_key_and_csr(other)
    leaf = x509.load_pem_x509_certificates(ca.sign(csr, WEB))[0]
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(uris.get_values_for_type(x509.UniformResourceIdentifier)) == [str(WEB)]
    short = _issue(ca, ttl=dt.timedelta(hours=1))[0]
    assert short.not_valid_after_utc - short.not_valid_before_utc < dt.timedelta(hours=1, minutes=2)
    # Never beyond the intermediate.
    long = _issue(ca, ttl=dt.timedelta(days=90))[0]
    assert long.not_valid_after_utc <= ca.signing_cert.not_valid_after_utc
    with pytest.raises(CaError, match="ttl"):
        _issue(ca, ttl=dt.timedelta(days=365))


def test_bad_csrs_and_ids_are_refused(ca: CertificateAuthority) -> None:
    _key, csr = new_key_and_csr(WEB)
    with pytest.raises(CaError, match="not a PEM certificate signing request"):
        ca.sign(b"garbage", WEB)
    # Flip a bit of the signature: it no longer verifies with the CSR's public key.
    tampered = bytearray(x509.load_pem_x509_csr(csr).public_bytes(Encoding.DER))
    tampered[-5] ^= 0xFF
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(tampered))
           + b"-----END CERTIFICATE REQUEST-----\n")
    with pytest.raises(CaError, match=r"signature|not a PEM"):
        ca.sign(pem, WEB)
    with pytest.raises(CaError, match=r"trust domain 'example\.org' only"):
        ca.sign(csr, SpiffeId.parse("spiffe://other.org/ns/a/sa/b"))
    with pytest.raises(CaError, match="non-root path"):
        ca.sign(csr, SpiffeId.parse(f"spiffe://{TD}"))


def test_the_renewal_proof_binds_the_csr_to_the_current_key(ca: CertificateAuthority) -> None:
    key, csr = new_key_and_csr(WEB)
    leaf = x509.load_pem_x509_certificates(ca.sign(csr, WEB))[0]
    _new_key, new_csr = new_key_and_csr(WEB)
    verify_proof(leaf, new_csr, sign_proof(key, new_csr))
    other_key, _ = new_key_and_csr(WEB)
    with pytest.raises(ValueError, match="does not verify"):
        verify_proof(leaf, new_csr, sign_proof(other_key, new_csr))
    with pytest.raises(ValueError, match="does not verify"):
        verify_proof(leaf, csr, sign_proof(key, new_csr))


def test_import_a_root(tmp_path: Path) -> None:
    pki = Pki(TD)
    ca = CertificateAuthority.import_(tmp_path / "ca", TD, pki.root_pem, key_pem(pki.root_key))
    assert ca.bundle_pem() == pki.root_pem
    assert ca.signing_cert != pki.root  # a fresh intermediate under the imported root
    chain = ca.sign(new_key_and_csr(WEB)[1], WEB)
    assert verify_svid(chain, {TD: [pki.root]}) == WEB
    assert CertificateAuthority.load(tmp_path / "ca").mode == "imported-root"


def test_import_an_intermediate_with_its_chain(tmp_path: Path) -> None:
    pki = Pki(TD)
    ca = CertificateAuthority.import_(tmp_path / "ca", TD, pki.intermediate_pem,
                                      key_pem(pki.intermediate_key), pki.root_pem)
    chain = ca.sign(new_key_and_csr(WEB)[1], WEB)
    certs = x509.load_pem_x509_certificates(chain)
    assert certs[1] == pki.intermediate and len(certs) == 2
    assert verify_svid(chain, {TD: [pki.root]}) == WEB
    with pytest.raises(CaError, match="holds no root"):
        ca.begin_root_rotation()


def test_import_refuses_non_cas_wrong_keys_and_broken_chains(tmp_path: Path) -> None:
    pki, other = Pki(TD), Pki(TD)
    leaf_chain, leaf_key = pki.leaf()
    leaf_pem = leaf_chain.split(b"-----END CERTIFICATE-----\n")[0] + b"-----END CERTIFICATE-----\n"
    with pytest.raises(CaError, match="not a CA certificate"):
        CertificateAuthority.import_(tmp_path / "a", TD, leaf_pem, leaf_key)
    with pytest.raises(CaError, match="does not match"):
        CertificateAuthority.import_(tmp_path / "b", TD, pki.root_pem, key_pem(other.root_key))
    with pytest.raises(CaError, match="ending with the self-signed root"):
        CertificateAuthority.import_(tmp_path / "c", TD, pki.intermediate_pem,
                                     key_pem(pki.intermediate_key))
    with pytest.raises(CaError, match="did not sign"):
        CertificateAuthority.import_(tmp_path / "d", TD, pki.intermediate_pem,
                                     key_pem(pki.intermediate_key), other.root_pem)
    with pytest.raises(CaError, match=r"trust domain 'example\.org'"):
        CertificateAuthority.import_(tmp_path / "e", TD, Pki("other.org").root_pem,
                                     key_pem(pki.root_key))
    assert not (tmp_path / "a" / "ca.json").exists()


def test_root_rotation_keeps_old_leaves_until_finished(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TD)
    old_root = ca.root
    old_leaf = ca.sign(new_key_and_csr(WEB)[1], WEB)
    ca.begin_root_rotation()
    assert ca.rotating and ca.root != old_root
    assert len(x509.load_pem_x509_certificates(ca.bundle_pem())) == 2
    new_leaf = ca.sign(new_key_and_csr(WEB)[1], WEB)
    x509.load_pem_x509_certificates(new_leaf)[1].verify_directly_issued_by(ca.root)
    during = CertificateAuthority.load(tmp_path / "ca")  # the state is on disk too
    assert during.rotating
    for chain in (old_leaf, new_leaf):
        assert verify_svid(chain, during.bundles()) == WEB
    with pytest.raises(CaError, match="already under way"):
        ca.begin_root_rotation()
    ca.finish_root_rotation()
    after = CertificateAuthority.load(tmp_path / "ca")
    assert not after.rotating
    assert x509.load_pem_x509_certificates(after.bundle_pem()) == [ca.root]
    assert verify_svid(new_leaf, after.bundles()) == WEB
    with pytest.raises(SvidError, match="no valid path"):
        verify_svid(old_leaf, after.bundles())


def test_intermediate_renewal_when_past_half_life(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", TD, intermediate_ttl=dt.timedelta(days=2))
    first = ca.signing_cert
    assert not ca.renew_intermediate_if_due()
    assert ca.renew_intermediate_if_due(dt.datetime.now(dt.UTC) + dt.timedelta(days=1, hours=1))
    assert ca.signing_cert != first
    assert verify_svid(ca.sign(new_key_and_csr(WEB)[1], WEB), ca.bundles()) == WEB
    signed = x509.load_pem_x509_csr(new_key_and_csr(WEB)[1])
    assert signed.signature_hash_algorithm is not None
    assert isinstance(signed.signature_hash_algorithm, hashes.SHA256)
