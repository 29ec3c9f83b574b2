"""Control-plane replicas that share one CA directory (``ubimesh control --ca-dir``).

Two real ``ubimesh control`` processes, each with its own data dir, started together on one
empty ``--ca-dir``: exactly one CA is made (the lock in the directory), both publish the same
bundle, and a workload that joined at one replica renews at the other (renewal is proof of the
current key, checked against the shared CA). Join tokens stay with the replica that made them.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from tests.support.control import ControlReplica, start_control

from ubimesh.identity.workload import IdentityError, SignClient, WorkloadIdentity

WEB = "spiffe://cluster.local/ns/default/sa/web"



def test_replicas_sharing_a_ca_directory_sign_from_one_ca(tmp_path: Path) -> None:
    shared = tmp_path / "shared-ca"
    started: dict[str, ControlReplica] = {}
    errors: list[BaseException] = []

    def start(name: str) -> None:
        try:
            started[name] = start_control(tmp_path, name, extra=["--ca-dir", str(shared)])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        a, b = started["a"], started["b"]
        assert not (a.data_dir / "ca").exists() and not (b.data_dir / "ca").exists()
        bundle_a = SignClient(a.api).bundle()
        bundle_b = SignClient(b.api).bundle()
        assert bundle_a == bundle_b and b"BEGIN CERTIFICATE" in bundle_a

        identity = WorkloadIdentity(a.api, WEB, a.join_token(WEB), ttl="5m")
        first = asyncio.run(identity.obtain())
        # The same workload renews at the other replica.
        identity.client = SignClient(b.api)
        second = asyncio.run(identity.renew())
        assert second.serial != first.serial and second.bundle_pem == first.bundle_pem

        # A token is redeemed at the replica that made it (tokens.db is per data dir).
        with pytest.raises(IdentityError) as info:
            asyncio.run(WorkloadIdentity(b.api, WEB, a.join_token(WEB)).obtain())
        assert info.value.permanent
    finally:
        for replica in started.values():
            replica.stop()
