"""The workload side of joining (ubimesh.identity.workload) against a real ``ubimesh control``:
first certificate with a join token, renewals with proof of the current key, the renewal
schedule (half-life +-10% from issuance, on a fake clock), and the failures that need a new
token.  One control plane child serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography import x509
from tests.support.control import ControlReplica, start_control
from tests.support.procs import free_ports

from ubimesh.identity import verify_svid
from ubimesh.identity.credentials import CredentialStore
from ubimesh.identity.workload import (
    IdentityError,
    WorkloadCertificate,
    WorkloadIdentity,
    renewal_delay,
)

T = TypeVar("T")
WEB = "spiffe://cluster.local/ns/default/sa/web"
API_TTL = "2m"


@pytest.fixture(scope="module")
def control(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlReplica]:
    replica = start_control(tmp_path_factory.mktemp("sds-workload"))
    try:
        yield replica
    finally:
        replica.stop()



def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def roots(bundle: bytes) -> dict[str, list[x509.Certificate]]:
    return {"cluster.local": x509.load_pem_x509_certificates(bundle)}


def test_first_certificate_with_a_token_then_renewals_with_a_new_key(
    control: ControlReplica,
) -> None:
    identity = WorkloadIdentity(control.api, WEB, control.join_token(WEB), ttl=API_TTL)
    first = run(identity.obtain())
    assert first.spiffe_id == WEB
    assert str(verify_svid(first.chain_pem, roots(first.bundle_pem))) == WEB
    assert b"PRIVATE KEY" in first.key_pem
    # The CA backdates notBefore; the useful life starts at receipt and lasts the ttl asked.
    assert 115 <= first.lifetime <= 121, first.lifetime
    assert identity.token is None  # used up

    second = run(identity.renew())
    assert second.serial != first.serial
    assert second.key_pem != first.key_pem  # a fresh key every renewal
    assert str(verify_svid(second.chain_pem, roots(second.bundle_pem))) == WEB
    assert identity.renewals == 1 and identity.current is second


def test_a_token_works_once(control: ControlReplica) -> None:
    once = control.join_token(WEB)
    run(WorkloadIdentity(control.api, WEB, once).obtain())
    again = WorkloadIdentity(control.api, WEB, once)
    with pytest.raises(IdentityError) as info:
        run(again.obtain())
    assert info.value.permanent
    assert "403" in str(info.value)


def test_a_token_for_another_identity_is_refused(control: ControlReplica) -> None:
    other = control.join_token("spiffe://cluster.local/ns/default/sa/db")
    with pytest.raises(IdentityError) as info:
        run(WorkloadIdentity(control.api, WEB, other).obtain())
    assert info.value.permanent


def test_run_renews_at_half_life_with_jitter_and_hands_over_each_certificate(
    control: ControlReplica,
) -> None:
    """run() on a fake clock: each sleep is the renewal delay; the clock then jumps there."""
    now = [time.time()]
    sleeps: list[float] = []
    handed: list[WorkloadCertificate] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds
        if len(sleeps) >= 3:
            raise asyncio.CancelledError

    async def take(cert: WorkloadCertificate) -> None:
        handed.append(cert)

    rands = iter([0.0, 1.0, 0.5])
    identity = WorkloadIdentity(control.api, WEB, control.join_token(WEB), ttl=API_TTL,
                                clock=lambda: now[0], rand=lambda: next(rands),
                                sleep=fake_sleep)
    with pytest.raises(asyncio.CancelledError):
        run(identity.run(take))
    assert len(handed) == 3 and len({c.serial for c in handed}) == 3
    # rand 0.0 -> 45% of the lifetime, 1.0 -> 55%, 0.5 -> 50%.
    for delay, cert, fraction in zip(sleeps, handed, (0.45, 0.55, 0.50), strict=True):
        assert delay == pytest.approx(cert.lifetime * fraction, abs=0.5), (delay, fraction)


def test_renewal_delay_bounds() -> None:
    cert = WorkloadCertificate(WEB, b"", b"", b"", not_before=1000.0, not_after=2060.0,
                               serial=1, received_at=1060.0)
    assert cert.lifetime == 1000.0
    assert renewal_delay(cert, 1060.0, lambda: 0.5) == pytest.approx(500.0)
    assert renewal_delay(cert, 1060.0, lambda: 0.0) == pytest.approx(450.0)
    assert renewal_delay(cert, 1060.0, lambda: 0.999999) == pytest.approx(550.0, abs=0.01)
    assert renewal_delay(cert, 1700.0, lambda: 0.5) == 0.0  # overdue: now


def test_an_expired_certificate_cannot_be_renewed(control: ControlReplica) -> None:
    now = [time.time()]
    identity = WorkloadIdentity(control.api, WEB, control.join_token(WEB), ttl=API_TTL,
                                clock=lambda: now[0])
    cert = run(identity.obtain())
    now[0] = cert.not_after + 1
    with pytest.raises(IdentityError) as info:
        run(identity.renew())
    assert info.value.permanent and "new join token" in str(info.value)


def test_an_unreachable_control_plane_is_retried_with_backoff(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    sleeps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) >= 4:
            raise asyncio.CancelledError

    async def never(cert: WorkloadCertificate) -> None:
        raise AssertionError("no certificate can come from a closed port")

    identity = WorkloadIdentity(f"http://127.0.0.1:{port}", WEB, "t", timeout=1.0,
                                sleep=fake_sleep, retry=(1.0, 4.0))
    with pytest.raises(asyncio.CancelledError):
        run(identity.run(never))
    assert identity.token == "t"  # not used up by a failed call
    # Doubling up to the cap, each drawn in [50%, 100%].
    for delay, cap in zip(sleeps, (1.0, 2.0, 4.0, 4.0), strict=True):
        assert cap / 2 <= delay <= cap


# --- a stored credential: a restart without a new join token --------------------------------


def test_a_restarted_workload_renews_with_its_stored_credential_without_a_token(
    control: ControlReplica, tmp_path: Path
) -> None:
    store = CredentialStore(tmp_path / "state")
    first = run(WorkloadIdentity(control.api, WEB, control.join_token(WEB), ttl=API_TTL,
                                 store=store).obtain())
    assert stat.S_IMODE(os.stat(store.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600
    assert json.loads(store.path.read_text())["key"] == first.key_pem.decode()

    # "Restart": a new process-worth of state, no token at all.
    handed: list[WorkloadCertificate] = []

    async def take(cert: WorkloadCertificate) -> None:
        handed.append(cert)

    async def stop_after_renewal(seconds: float) -> None:
        raise asyncio.CancelledError

    again = WorkloadIdentity(control.api, WEB, None, ttl=API_TTL, store=store,
                             sleep=stop_after_renewal)
    with pytest.raises(asyncio.CancelledError):
        run(again.run(take))
    # The stored certificate is served at once, then renewed with proof of its key.
    assert [c.serial for c in handed][:1] == [first.serial]
    assert len(handed) == 2 and handed[1].serial != first.serial
    assert handed[1].key_pem != first.key_pem and again.renewals == 1
    # The renewal replaced the stored credential.
    assert json.loads(store.path.read_text())["key"] == handed[1].key_pem.decode()


def test_a_stored_credential_is_refused_unless_it_is_valid_for_this_identity(
    control: ControlReplica, tmp_path: Path
) -> None:
    store = CredentialStore(tmp_path / "state")
    cert = run(WorkloadIdentity(control.api, WEB, control.join_token(WEB), ttl=API_TTL,
                                store=store).obtain())
    assert WorkloadIdentity(control.api, WEB, None, store=store).restore() is not None
    # Another identity.
    other = "spiffe://cluster.local/ns/default/sa/other"
    assert WorkloadIdentity(control.api, other, None, store=store).restore() is None
    # Expired by the workload's clock.
    late = WorkloadIdentity(control.api, WEB, None, store=store,
                            clock=lambda: cert.not_after + 1)
    assert late.restore() is None
    # A key that is not the leaf's.
    doc = json.loads(store.path.read_text())
    other_key = run(WorkloadIdentity(control.api, WEB, control.join_token(WEB)).obtain()).key_pem
    store.path.write_text(json.dumps({**doc, "key": other_key.decode()}))
    assert WorkloadIdentity(control.api, WEB, None, store=store).restore() is None
    # Not something ubimesh wrote.
    store.path.write_text("not json")
    assert WorkloadIdentity(control.api, WEB, None, store=store).restore() is None
    # Nothing to restore and no token: obtain() says what to do.
    store.clear()
    bare = WorkloadIdentity(control.api, WEB, None, store=store)
    assert bare.restore() is None
    with pytest.raises(IdentityError, match="ubimesh token create"):
        run(bare.obtain())


def test_a_stored_credential_the_ca_no_longer_accepts_falls_back_to_the_token(
    control: ControlReplica, tmp_path: Path
) -> None:
    """The CA was replaced (another control plane, another root): renewing with the stored
    credential is refused, and the join token at hand joins the workload again."""
    store = CredentialStore(tmp_path / "state")
    old = run(WorkloadIdentity(control.api, WEB, control.join_token(WEB), ttl=API_TTL,
                               store=store).obtain())
    other = start_control(tmp_path, "other-control")
    try:
        handed: list[WorkloadCertificate] = []

        async def take(cert: WorkloadCertificate) -> None:
            handed.append(cert)

        async def stop(seconds: float) -> None:
            raise asyncio.CancelledError

        identity = WorkloadIdentity(other.api, WEB, other.join_token(WEB), ttl=API_TTL, store=store,
                                    sleep=stop)
        with pytest.raises(asyncio.CancelledError):
            run(identity.run(take))
        assert handed[0].serial == old.serial  # served while the renewal was tried
        assert len(handed) == 2 and identity.token is None  # then joined with the token
        assert handed[1].bundle_pem != old.bundle_pem  # the other CA's
    finally:
        other.stop()
