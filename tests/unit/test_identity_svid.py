"""verify_svid (specs.md 2.3) against the validation matrix of tests/support/pki.py."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from tests.support.pki import Pki, bad_leaves, good_leaves

from ubimesh.identity import SpiffeId, SvidError, verify_svid

A = Pki("example.org")
B = Pki("other.org")
BUNDLES = {A.trust_domain: [A.root], B.trust_domain: [B.root]}
WEB = A.spiffe_id()
BAD = bad_leaves(A, B, WEB)
GOOD = good_leaves(A, WEB)

#: Why each bad case is refused (a fragment of the SvidError's message).
REASONS = {
    "expired": "expired",
    "not yet valid": "not valid before",
    "wrong trust domain": "no valid path to a root of trust domain 'other.org'",
    "other trust domain's CA": "no valid path to a root of trust domain 'example.org'",
    "two URI SANs": "2 URI SANs",
    "no URI SAN": "no URI SAN",
    "non-spiffe URI": "not a SPIFFE ID",
    "ID with no path": "has no path",
    "SPIFFE ID only in a DNS SAN": "no URI SAN",
    "leaf with CA=true": "CA:true",
    "leaf with keyCertSign": "keyCertSign",
    "server-only EKU": "lacks clientAuth",
    "missing intermediate": "intermediate is missing",
    "self-signed": "no valid path",
}


@pytest.mark.parametrize("case", sorted(REASONS))
def test_every_bad_certificate_is_refused_with_its_reason(case: str) -> None:
    chain, _key = BAD[case]
    with pytest.raises(SvidError) as info:
        verify_svid(chain, BUNDLES)
    assert REASONS[case] in str(info.value), str(info.value)


@pytest.mark.parametrize("case", sorted(GOOD))
def test_good_certificates_verify_to_their_id(case: str) -> None:
    chain, _key = GOOD[case]
    assert verify_svid(chain, BUNDLES) == SpiffeId.parse(WEB)


def test_a_prefix_sharing_id_verifies_but_is_not_the_allowed_one() -> None:
    # A valid SVID; refusing it is the authorization's job (exact match, never a prefix).
    got = verify_svid(BAD["prefix-sharing ID"][0], BUNDLES)
    assert str(got) == WEB + "-admin"
    assert got != SpiffeId.parse(WEB) and str(got).startswith(WEB)


def test_the_bundle_is_chosen_by_the_leafs_trust_domain_never_the_union() -> None:
    chain = B.leaf(WEB)[0]  # other.org's CA minting an example.org ID
    # With both roots filed under example.org it would verify: the union is what must not
    # be used, so the per-domain map is the whole defence.
    assert verify_svid(chain, {A.trust_domain: [A.root, B.root]}) == SpiffeId.parse(WEB)
    with pytest.raises(SvidError, match="no valid path"):
        verify_svid(chain, BUNDLES)
    with pytest.raises(SvidError, match=r"no trust bundle for trust domain 'example\.org'"):
        verify_svid(A.leaf(WEB)[0], {B.trust_domain: [B.root]})


def test_an_intermediate_without_ca_true_is_refused() -> None:
    broken = Pki("example.org", intermediate_ca=False)
    with pytest.raises(SvidError, match=r"cA must be asserted|no valid path"):
        verify_svid(broken.leaf(WEB)[0], {broken.trust_domain: [broken.root]})


def test_now_moves_the_validity_window_and_der_input_works() -> None:
    chain, _ = A.leaf(WEB)
    certs = x509.load_pem_x509_certificates(chain)
    from cryptography.hazmat.primitives.serialization import Encoding

    der = [c.public_bytes(Encoding.DER) for c in certs]
    assert verify_svid(der, BUNDLES) == SpiffeId.parse(WEB)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
    with pytest.raises(SvidError, match="expired"):
        verify_svid(der, BUNDLES, now=later)


def test_garbage_and_empty_chains_are_refused() -> None:
    with pytest.raises(SvidError, match="not a PEM or DER"):
        verify_svid(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", BUNDLES)
    with pytest.raises(SvidError, match="empty"):
        verify_svid(b"", BUNDLES)
