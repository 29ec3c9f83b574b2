"""Certificate expiry for operators: the control plane's Prometheus text and its one-time
warnings, the rotation guard, and the proxy's ``server.days_until_first_cert_expiring``."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pytest
from tests.support.pki import Pki

from ubimesh.control.identity_metrics import (
    ExpiryWarner,
    render_metrics,
    rotation_stragglers,
)
from ubimesh.identity.ca import CaError, CertificateAuthority
from ubimesh.identity.csr import new_key_and_csr
from ubimesh.identity.spiffe_id import SpiffeId
from ubimesh.proxy.snapshot.types import (
    CertificateValidation,
    Cluster,
    DiscoveryType,
    NodeInfo,
    Snapshot,
    TlsCertificate,
    TlsContext,
)
from ubimesh.proxy.tls.expiry import ExpiryTracker, first_expiry

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
H = dt.timedelta(hours=1)
D = dt.timedelta(days=1)


def _iso(t: dt.datetime) -> str:
    return t.isoformat()


def status(root_left: dt.timedelta, int_left: dt.timedelta, *, rotating: bool = False,
           new_root_born: dt.datetime | None = None) -> dict[str, object]:
    roots: list[dict[str, object]] = [
        {"subject": 'CN=ubimesh root "td"', "serial": "a1", "current": not rotating,
         "not_before": _iso(NOW - 3000 * D), "not_after": _iso(NOW + root_left)}]
    if rotating:
        assert new_root_born is not None
        roots.insert(0, {"subject": "CN=new root", "serial": "b2", "current": True,
                         "not_before": _iso(new_root_born),
                         "not_after": _iso(new_root_born + 3650 * D)})
    return {"rotating": rotating, "roots": roots,
            "intermediates": [{"subject": "CN=int", "serial": "c3",
                               "not_before": _iso(NOW - 20 * D),
                               "not_after": _iso(NOW + int_left)}]}


def leaf(identity: str, born: dt.datetime, lifetime: dt.timedelta, serial: str,
         node: str = "") -> dict[str, object]:
    return {"identity": identity, "node": node, "serial": serial,
            "not_before": born.timestamp(), "not_after": (born + lifetime).timestamp()}


def test_metrics_text_has_every_ca_certificate_and_the_soonest_live_leaf_per_identity() -> None:
    leaves = [
        leaf("spiffe://td/ns/a/sa/web", NOW - 2 * H, 24 * H, "1", "web-1.a"),
        leaf("spiffe://td/ns/a/sa/web", NOW - 20 * H, 24 * H, "2", "web-2.a"),
        leaf("spiffe://td/ns/a/sa/gone", NOW - 48 * H, 24 * H, "3"),  # expired: not live
        leaf('spiffe://td/ns/a/sa/q"uo\\te', NOW, H, "4"),
    ]
    text = render_metrics(status(400 * D, 10 * D), leaves, now=NOW)
    lines = text.splitlines()
    assert "# TYPE ubimesh_ca_cert_expiry_seconds gauge" in lines
    assert "# TYPE ubimesh_issued_leaf_expiry_seconds gauge" in lines
    assert ('ubimesh_ca_cert_expiry_seconds{kind="root",subject="CN=ubimesh root \\"td\\"",'
            f'serial="a1"}} {400 * 86400}') in lines
    assert f'ubimesh_ca_cert_expiry_seconds{{kind="intermediate",subject="CN=int",serial="c3"}} ' \
           f"{10 * 86400}" in lines
    # web: the soonest of its two live leaves (4 h left), not the later one (22 h).
    assert f'ubimesh_issued_leaf_expiry_seconds{{identity="spiffe://td/ns/a/sa/web"}} ' \
           f"{4 * 3600}" in lines
    assert "gone" not in text
    assert 'identity="spiffe://td/ns/a/sa/q\\"uo\\\\te"' in text  # label escaping
    assert text.endswith("\n")


def test_warner_logs_once_per_certificate_within_its_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    warner = ExpiryWarner()
    leaves = [
        leaf("spiffe://td/ns/a/sa/ok", NOW - 2 * H, 24 * H, "1"),  # 22 h of 24 left: fine
        leaf("spiffe://td/ns/a/sa/late", NOW - 20 * H, 24 * H, "2", "late-1.a"),  # 4 h < 20 %
        leaf("spiffe://td/ns/a/sa/gone", NOW - 48 * H, 24 * H, "3"),  # expired: went away
    ]
    # The root has 6 days left (< 7 days); the intermediate 10 of 30 (> 20 %, > 7 days).
    with caplog.at_level(logging.WARNING, "ubimesh.control.identity"):
        first = warner.check(status(6 * D, 10 * D), leaves, now=NOW)
        second = warner.check(status(6 * D, 10 * D), leaves, now=NOW + H)
    assert len(first) == 2, first
    assert any("CA root certificate" in m and "expires in 6.0 d" in m and "rotate" in m
               for m in first)
    assert any("spiffe://td/ns/a/sa/late" in m and "late-1.a" in m and "expires in 4.0 h" in m
               for m in first)
    assert second == []  # once only
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    # A renewed leaf (new serial) that is late again warns again.
    renewed = [leaf("spiffe://td/ns/a/sa/late", NOW - 20 * H, 24 * H, "9", "late-1.a")]
    assert len(warner.check(status(400 * D, 10 * D), renewed, now=NOW)) == 1


def test_rotation_stragglers_are_the_live_leaves_from_before_begin() -> None:
    began = NOW - 5 * H
    leaves = [
        leaf("spiffe://td/ns/a/sa/old", NOW - 10 * H, 24 * H, "1"),  # before begin, live
        leaf("spiffe://td/ns/a/sa/new", NOW - H, 24 * H, "2"),  # after begin
        leaf("spiffe://td/ns/a/sa/dead", NOW - 30 * H, 24 * H, "3"),  # before, expired
    ]
    found = rotation_stragglers(status(400 * D, 10 * D, rotating=True, new_root_born=began),
                                leaves, now=NOW)
    assert [r["identity"] for r in found] == ["spiffe://td/ns/a/sa/old"]
    assert rotation_stragglers(status(400 * D, 10 * D), leaves, now=NOW) == []


def test_stragglers_with_a_real_ca_rotation(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", "td")
    web = SpiffeId.parse("spiffe://td/ns/a/sa/web")
    # The CA backdates notBefore by a minute; issue "before begin" by a whole second at least.
    old = ca.sign(new_key_and_csr(web)[1], web, dt.timedelta(seconds=10))
    from cryptography import x509

    def row(chain: bytes) -> dict[str, object]:
        cert = x509.load_pem_x509_certificate(chain)
        return {"identity": str(web), "node": "", "serial": format(cert.serial_number, "x"),
                "not_before": cert.not_valid_before_utc.timestamp(),
                "not_after": cert.not_valid_after_utc.timestamp()}

    import time

    time.sleep(1.1)
    ca.begin_root_rotation()
    new = ca.sign(new_key_and_csr(web)[1], web, dt.timedelta(seconds=10))
    assert [r["serial"] for r in rotation_stragglers(ca.status(), [row(old), row(new)])] == [
        row(old)["serial"]]
    assert rotation_stragglers(ca.status(), [row(new)]) == []
    # The floor is 10 s (short lifetimes for renewal and rotation tests); below it is refused.
    with pytest.raises(CaError, match="outside"):
        ca.sign(new_key_and_csr(web)[1], web, dt.timedelta(seconds=9))


def _snapshot(*contexts: TlsContext, secrets: dict[str, object] | None = None) -> Snapshot:
    clusters = {f"c{i}": Cluster(name=f"c{i}", type=DiscoveryType.STATIC, transport_socket=c)
                for i, c in enumerate(contexts)}
    return Snapshot(version="1", node=NodeInfo("n", "c"), listeners=(), clusters=clusters,
                    secrets=dict(secrets or {}))  # type: ignore[arg-type]


def test_first_expiry_counts_presented_chains_and_trusted_roots_inline_and_by_sds() -> None:
    pki = Pki("td")
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=30)
    chain, key = pki.leaf(not_after=soon)
    assert first_expiry(_snapshot()) is None
    inline = TlsContext(server=False, certificates=(TlsCertificate(chain, key),))
    assert first_expiry(_snapshot(inline)) == pytest.approx(soon.timestamp(), abs=1)
    # By SDS: the leaf secret named by the context, and the roots of the validation secret.
    by_sds = TlsContext(server=True, certificate_secrets=("default",), validation_secret="ROOTCA")
    secrets: dict[str, object] = {"default": TlsCertificate(chain, key),
                                  "ROOTCA": CertificateValidation(trusted_ca=pki.bundle_pem)}
    assert first_expiry(_snapshot(by_sds, secrets=secrets)) == pytest.approx(
        soon.timestamp(), abs=1)
    roots_only = TlsContext(server=False, validation_secret="ROOTCA")
    root = x509_not_after(pki.bundle_pem)
    assert first_expiry(_snapshot(roots_only, secrets=secrets)) == pytest.approx(root, abs=1)
    # A secret no context names does not count.
    assert first_expiry(_snapshot(secrets=secrets)) is None
    tracker = ExpiryTracker()
    assert tracker.first_expiry(_snapshot(inline)) == tracker.first_expiry(_snapshot(inline))


def x509_not_after(pem: bytes) -> float:
    from cryptography import x509

    return min(c.not_valid_after_utc.timestamp() for c in x509.load_pem_x509_certificates(pem))
